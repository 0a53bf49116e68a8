"""One contract for the reconciler and its kernel, run against FakeNetlink and a real kernel.

Whatever a test or a simulation learns from the fake kernel must hold on the
real one: every test here runs on both (the `subject` fixture) and must pass
on both, with the vxlan and the host-gw backend. The fake needs no root; the
real kernel is a network namespace this module creates (tests/netns.py, a
unique name, deleted afterwards) and is skipped without root.

The kernel is read back through a second socket of the same adapter (`hand`,
someone else's: its changes are drift to the backend). The e2e tests
(tests/e2e/test_dataplane_kernel.py) read the real kernel with iproute2.
"""

from __future__ import annotations

import asyncio
import errno
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address
from pathlib import Path

import pytest
from netns import sh, underlay

from leaseagent.core.leases import Peer, PeerChanges
from leaseagent.core.network import network_config_from_dict
from leaseagent.core.plan import KernelObject, Neighbour, Route, compare
from leaseagent.core.profiles.base import NoLeaseData
from leaseagent.core.profiles.vxlan import VxlanLeaseData
from leaseagent.dataplane.base import DataPlaneSettings, HostInfo
from leaseagent.dataplane.fakenetlink import EVENT_QUEUE_LIMIT, FakeKernel
from leaseagent.dataplane.host import resolve_host
from leaseagent.dataplane.hostgw import HostGwBackend
from leaseagent.dataplane.kernelport import Kernel, KernelOpener
from leaseagent.dataplane.netlink import DUMP_ATTEMPTS, Action, Netlink
from leaseagent.dataplane.reconciling import ReconcilingBackend
from leaseagent.dataplane.vxlan import VxlanBackend
from leaseagent.errors import DataPlaneError

PROTOCOL = 76
OWN = IPv4Network("10.5.1.0/24")
# Deadlines: a repair takes milliseconds; the margin is for a loaded 2-core CI machine.
WITHIN = 10.0


@dataclass
class Subject:
    """A kernel under test: its name, the namespace's host facts, how a backend opens it
    (None: the real adapter), and the fake itself when it is one."""

    name: str
    netns: str | None
    host: HostInfo
    opener: KernelOpener | None
    fake: FakeKernel | None = None

    async def hand(self) -> Kernel:
        """Someone else's socket on the same kernel."""
        if self.fake is not None:
            return self.fake.socket()
        return await Netlink.open(self.netns)


UNDERLAY6 = "fd00:250::1"  # eth0's IPv6 address (nodad: no second of DAD)


@pytest.fixture
def namespace() -> Iterator[str]:
    with underlay(1, prefix="lakc") as lab:
        ns = lab.hosts[0]
        sh("ip", "-n", ns, "addr", "add", f"{UNDERLAY6}/64", "dev", "eth0", "nodad")
        yield ns


@pytest.fixture(params=["fake", pytest.param("kernel", marks=pytest.mark.root)])
async def subject(request: pytest.FixtureRequest) -> AsyncIterator[Subject]:
    if request.param == "fake":
        fake = FakeKernel()
        host = replace(fake.underlay("eth0", "10.99.0.1/24", f"{UNDERLAY6}/64"), public_ipv6=None)
        yield Subject("fake", None, host, fake.open, fake)
        return
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces)")
    ns: str = request.getfixturevalue("namespace")
    yield Subject("kernel", ns, await resolve_host("eth0", None, netns=ns), None)


def vxlan_peer(i: int, public: str | None = None, mac: str | None = None) -> Peer:
    return Peer(IPv4Network(f"10.5.{i}.0/24"), IPv4Address(public or f"10.99.0.{i}"), "vxlan",
                VxlanLeaseData(mac or f"02:00:00:00:00:{i:02x}"))


def host_gw_peer(i: int, public: str | None = None) -> Peer:
    return Peer(IPv4Network(f"10.5.{i}.0/24"), IPv4Address(public or f"10.99.0.{i}"), "host-gw",
                NoLeaseData())


BACKENDS: dict[str, tuple[type[ReconcilingBackend], Callable[..., Peer]]] = {
    "vxlan": (VxlanBackend, vxlan_peer),
    "host-gw": (HostGwBackend, host_gw_peer),
}


@pytest.fixture(params=list(BACKENDS))
def backend_type(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def peers_of(*peers: Peer) -> dict[IPv4Network, Peer]:
    return {p.subnet: p for p in peers}


OWN6 = IPv6Network("fd00:5:0:1::/64")


def dual(p: Peer) -> Peer:
    """`p` dual-stack: fd00:5:0:<i>::/64 at fd00:250::<i> (on eth0's network)."""
    i = int(p.subnet.network_address.packed[2])
    data6 = VxlanLeaseData(f"02:00:00:00:06:{i:02x}") if p.backend_type == "vxlan" else p.data
    return replace(p, ipv6_subnet=IPv6Network(f"fd00:5:0:{i}::/64"),
                   public_ipv6=IPv6Address(f"fd00:250::{i}"), data6=data6)


def settings(subject: Subject, backend_type: str, state_dir: Path, *, resync: float = 30.0,
             ipv6: bool = False) -> DataPlaneSettings:
    net: dict[str, object] = {"Network": "10.5.0.0/16", "Backend": {"Type": backend_type}}
    host = subject.host
    if ipv6:
        net |= {"EnableIPv6": True, "IPv6Network": "fd00:5::/48"}
        host = replace(host, public_ipv6=IPv6Address(UNDERLAY6))
    return DataPlaneSettings(network=network_config_from_dict(net), host=host,
                             state_dir=state_dir, netns=subject.netns, resync_seconds=resync,
                             kernel=subject.opener)


@asynccontextmanager
async def started(subject: Subject, backend_type: str, state_dir: Path,
                  peers: dict[IPv4Network, Peer], *, resync: float = 30.0, ipv6: bool = False
                  ) -> AsyncIterator[ReconcilingBackend]:
    """The backend prepared, holding OWN (and OWN6 with `ipv6`), synced with `peers`;
    closed afterwards."""
    cls = BACKENDS[backend_type][0]
    backend = cls(settings(subject, backend_type, state_dir, resync=resync, ipv6=ipv6))
    try:
        await backend.prepare()
        await backend.start(OWN, own_ipv6=OWN6)
        await backend.sync(peers)
        yield backend
    finally:
        await backend.close()


@asynccontextmanager
async def running(backend: ReconcilingBackend, peers: dict[IPv4Network, Peer]
                  ) -> AsyncIterator[None]:
    runner = asyncio.create_task(backend.run(lambda: peers))
    try:
        await asyncio.sleep(0.2)  # let run() subscribe
        yield
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)


async def in_sync(backend: ReconcilingBackend, peers: dict[IPv4Network, Peer]) -> bool:
    """The kernel holds exactly what the backend wants (core.plan.compare finds nothing)."""
    return not compare(backend.spec(OWN, peers, own_ipv6=OWN6), await backend.observe())


async def eventually(check: Callable[[], Awaitable[bool]], *, within: float = WITHIN) -> None:
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {within}s")
        await asyncio.sleep(0.02)


async def ours(backend: ReconcilingBackend) -> set[KernelObject]:
    return set((await backend.observe()).objects)


def planned(backend: ReconcilingBackend, peers: dict[IPv4Network, Peer]) -> set[KernelObject]:
    return {obj for objects in backend.spec(OWN, peers, own_ipv6=OWN6).objects.values()
            for obj in objects}


# --- join, leave, replace -------------------------------------------------------------


async def test_join_programs_every_peer_and_nothing_else(
        subject: Subject, backend_type: str, tmp_path: Path) -> None:
    make = BACKENDS[backend_type][1]
    peers = peers_of(make(2), make(3), make(4))
    async with started(subject, backend_type, tmp_path, peers) as backend:
        assert await in_sync(backend, peers)
        objects = await ours(backend)
        assert objects == planned(backend, peers)
        assert len(objects) == (9 if backend_type == "vxlan" else 3)
        routes = {r for r in objects if isinstance(r, Route)}
        assert {r.dst for r in routes} == set(peers)
        assert backend.status.in_sync and backend.status.added["route"] == 3


async def test_leave_removes_the_peer_and_keeps_the_others(
        subject: Subject, backend_type: str, tmp_path: Path) -> None:
    make = BACKENDS[backend_type][1]
    peers = peers_of(make(2), make(3))
    async with started(subject, backend_type, tmp_path, peers) as backend:
        gone = peers.pop(IPv4Network("10.5.3.0/24"))
        await backend.update(PeerChanges(removed=[gone]), peers)
        assert await in_sync(backend, peers)
        assert {r.dst for r in await ours(backend) if isinstance(r, Route)} == set(peers)


async def test_a_mass_removal_frees_what_the_gone_peers_held(
        subject: Subject, tmp_path: Path) -> None:
    """Leases expiring together (one update removing several peers, the reconciler's
    `_plan_removal`): an FDB entry a remaining peer shares stays; a removed peer that
    was in conflict is no longer reported; a VtepMAC a removed peer held is free for the
    next peer that claims it."""
    shared, sharing = (vxlan_peer(i, public="10.99.0.20", mac="02:00:00:00:00:20")
                       for i in (2, 3))  # one host's two leases: one FDB entry
    holder = vxlan_peer(4, mac="02:00:00:00:00:40")
    rival = vxlan_peer(5, mac="02:00:00:00:00:40")  # claims holder's VtepMAC: in conflict
    peers = peers_of(shared, sharing, holder, rival)
    async with started(subject, "vxlan", tmp_path, peers) as backend:
        assert set(backend.status.conflicting_peers) == {rival.subnet}
        gone = [peers.pop(p.subnet) for p in (shared, holder, rival)]
        await backend.update(PeerChanges(removed=gone), peers)
        # Asked before `in_sync`/`ours`, whose `spec` judges every peer again.
        assert backend.status.conflicting_peers == {}
        newcomer = vxlan_peer(6, mac="02:00:00:00:00:40")  # holder's VtepMAC, another host
        peers[newcomer.subnet] = newcomer
        await backend.update(PeerChanges(added=[newcomer]), peers)
        assert backend.status.conflicting_peers == {}
        assert await in_sync(backend, peers)
        assert await ours(backend) == planned(backend, peers_of(sharing, newcomer))
        assert len(await ours(backend)) == 6  # sharing's FDB entry stayed


async def test_what_was_kept_for_a_removed_peer_of_another_type_goes_at_once(
        subject: Subject, tmp_path: Path) -> None:
    """A peer of another backend type is served the old way meanwhile (a roll-out: its
    route, made before, is kept); when it is removed, a full pass removes that at once,
    not at the next periodic one."""
    other = host_gw_peer(3)
    peers = peers_of(vxlan_peer(2), other)
    hand = await subject.hand()
    old_way = Route(other.subnet, other.public_ip, subject.host.iface_index)
    try:
        await hand.apply(Action.REPLACE, [old_way], protocol=PROTOCOL)
        async with started(subject, "vxlan", tmp_path, peers, resync=600.0) as backend:
            async with running(backend, peers):
                assert backend.status.foreign_peers == 1
                assert old_way in await ours(backend)
                del peers[other.subnet]
                await backend.update(PeerChanges(removed=[other]), peers)
                assert backend.status.foreign_peers == 0
                await eventually(lambda: in_sync(backend, peers))
                assert old_way not in await ours(backend)
    finally:
        hand.close()


async def test_a_peer_that_moves_is_replaced_in_place(
        subject: Subject, backend_type: str, tmp_path: Path) -> None:
    make = BACKENDS[backend_type][1]
    peers = peers_of(make(2), make(3))
    async with started(subject, backend_type, tmp_path, peers) as backend:
        moved = make(3, public="10.99.0.33")
        peers[moved.subnet] = moved
        await backend.update(PeerChanges(changed=[moved]), peers)
        assert await in_sync(backend, peers)
        objects = await ours(backend)
        assert objects == planned(backend, peers)
        # One route per subnet: replaced, never a second one beside the first.
        assert sorted(str(r.dst) for r in objects if isinstance(r, Route)) == [
            "10.5.2.0/24", "10.5.3.0/24"]


async def test_a_full_sync_removes_what_no_peer_wants(
        subject: Subject, backend_type: str, tmp_path: Path) -> None:
    make = BACKENDS[backend_type][1]
    peers = peers_of(make(2), make(3), make(4))
    async with started(subject, backend_type, tmp_path, peers) as backend:
        del peers[IPv4Network("10.5.4.0/24")]
        await backend.sync(peers)
        assert await in_sync(backend, peers)
        assert backend.status.removed["route"] == 1


async def test_dual_stack_peers_join_move_and_leave_in_both_families(
        subject: Subject, backend_type: str, tmp_path: Path) -> None:
    make = BACKENDS[backend_type][1]
    peers = peers_of(dual(make(2)), dual(make(3)))
    async with started(subject, backend_type, tmp_path, peers, ipv6=True) as backend:
        assert await in_sync(backend, peers)
        routes = {r.dst for r in await ours(backend) if isinstance(r, Route)}
        assert routes == {*peers, IPv6Network("fd00:5:0:2::/64"), IPv6Network("fd00:5:0:3::/64")}
        assert all(r.metric == 1024 for r in await ours(backend)
                   if isinstance(r, Route) and r.dst.version == 6)  # the kernel's default
        moved = replace(peers[IPv4Network("10.5.3.0/24")], public_ipv6=IPv6Address("fd00:250::33"))
        peers[moved.subnet] = moved
        await backend.update(PeerChanges(changed=[moved]), peers)
        assert await in_sync(backend, peers)
        gone = peers.pop(IPv4Network("10.5.2.0/24"))
        await backend.update(PeerChanges(removed=[gone]), peers)
        assert await in_sync(backend, peers)
        assert len(await ours(backend)) == (6 if backend_type == "vxlan" else 2)


async def test_an_ipv6_gateway_off_the_link_is_refused(subject: Subject, tmp_path: Path) -> None:
    peers = peers_of(dual(host_gw_peer(2)),
                     replace(dual(host_gw_peer(3)), public_ipv6=IPv6Address("fd00:251::3")))
    async with started(subject, "host-gw", tmp_path, peers, ipv6=True) as backend:
        refused = backend.status.refused_peers
        assert list(refused) == [IPv4Network("10.5.3.0/24")]
        assert os.strerror(errno.EHOSTUNREACH) in refused[IPv4Network("10.5.3.0/24")]


async def test_our_own_changes_are_not_drift(
        subject: Subject, backend_type: str, tmp_path: Path) -> None:
    make = BACKENDS[backend_type][1]
    peers = peers_of(make(2))
    async with started(subject, backend_type, tmp_path, peers) as backend, \
            running(backend, peers):
        joined = [make(3), make(4)]
        peers.update(peers_of(*joined))
        await backend.update(PeerChanges(added=joined), peers)
        gone = peers.pop(IPv4Network("10.5.2.0/24"))
        await backend.update(PeerChanges(removed=[gone]), peers)
        await asyncio.sleep(0.5)  # the echoes of our requests have come by now
        assert await in_sync(backend, peers)
        assert sum(backend.status.repairs.values()) == 0
        assert backend.status.reconciles.count == 1  # no pass but the first sync


async def test_a_pass_that_catches_up_with_peer_changes_is_not_drift(
        subject: Subject, backend_type: str, tmp_path: Path) -> None:
    """Under churn a periodic pass reads the watcher's peers before `update` has them:
    what it programs for them is a peer change, not a repair (a 1M-event soak logged
    "drift repaired" at every pass). Real drift beside it is still counted."""
    make = BACKENDS[backend_type][1]
    peers = peers_of(make(2), make(3))
    async with started(subject, backend_type, tmp_path, peers, resync=0.3) as backend:
        peers.update(peers_of(make(4)))            # joined: the watcher has it, update not yet
        del peers[IPv4Network("10.5.3.0/24")]      # left, likewise
        async with running(backend, peers):
            await eventually(lambda: in_sync(backend, peers))
            await eventually(lambda: asyncio.sleep(0, backend.status.reconciles.count >= 3))
            assert sum(backend.status.repairs.values()) == 0
            assert backend.status.removed["route"] == 1 and backend.status.added["route"] == 3
            hand = await subject.hand()
            try:
                victim = next(r for r in planned(backend, peers) if isinstance(r, Route))
                done, failed = await hand.apply(Action.REMOVE, [victim], protocol=PROTOCOL)
                assert done == [victim] and not failed
                await eventually(lambda: asyncio.sleep(0, backend.status.repairs["route"] >= 1))
                assert await in_sync(backend, peers)
            finally:
                hand.close()


# --- drift ------------------------------------------------------------------------------


async def test_a_route_someone_deletes_is_put_back(
        subject: Subject, backend_type: str, tmp_path: Path) -> None:
    make = BACKENDS[backend_type][1]
    peers = peers_of(make(2), make(3))
    async with started(subject, backend_type, tmp_path, peers) as backend, \
            running(backend, peers):
        hand = await subject.hand()
        try:
            victim = next(r for r in planned(backend, peers) if isinstance(r, Route))
            done, failed = await hand.apply(Action.REMOVE, [victim], protocol=PROTOCOL)
            assert done == [victim] and not failed
            await eventually(lambda: in_sync(backend, peers))
            assert backend.status.repairs["route"] >= 1
        finally:
            hand.close()


async def test_a_route_someone_changes_is_put_right(
        subject: Subject, backend_type: str, tmp_path: Path) -> None:
    make = BACKENDS[backend_type][1]
    peers = peers_of(make(2), make(3))
    async with started(subject, backend_type, tmp_path, peers) as backend, \
            running(backend, peers):
        hand = await subject.hand()
        try:
            wrong = Route(IPv4Network("10.5.2.0/24"), IPv4Address("10.99.0.77"),
                          subject.host.iface_index)
            done, failed = await hand.apply(Action.REPLACE, [wrong], protocol=PROTOCOL)
            assert done == [wrong] and not failed
            await eventually(lambda: in_sync(backend, peers))
        finally:
            hand.close()


async def test_a_stale_route_of_ours_goes_at_the_next_pass(
        subject: Subject, backend_type: str, tmp_path: Path) -> None:
    make = BACKENDS[backend_type][1]
    peers = peers_of(make(2))
    async with started(subject, backend_type, tmp_path, peers, resync=0.3) as backend, \
            running(backend, peers):
        hand = await subject.hand()
        try:
            stale = Route(IPv4Network("10.5.9.0/24"), IPv4Address("10.99.0.9"),
                          subject.host.iface_index)
            await hand.apply(Action.REPLACE, [stale], protocol=PROTOCOL)
            await eventually(lambda: in_sync(backend, peers))
            assert stale not in await hand.routes(protocol=PROTOCOL)
        finally:
            hand.close()


async def test_the_vxlan_device_deleted_comes_back_with_every_peer(
        subject: Subject, tmp_path: Path) -> None:
    peers = peers_of(vxlan_peer(2), vxlan_peer(3))
    async with started(subject, "vxlan", tmp_path, peers) as backend, running(backend, peers):
        hand = await subject.hand()
        try:
            device = await hand.link_by_name("flannel.1")
            assert device is not None and device.up
            await hand.delete_link(device.index)
            assert not {r for r in await hand.routes(protocol=PROTOCOL)
                        if r.ifindex == device.index}  # gone with the device, untold
            await eventually(lambda: in_sync(backend, peers))
            again = await hand.link_by_name("flannel.1")
            assert again is not None and again.address == device.address  # the same VtepMAC
            assert backend.status.repairs["device"] >= 1
        finally:
            hand.close()


async def test_the_underlay_down_and_up_again_gets_its_routes_back(
        subject: Subject, tmp_path: Path) -> None:
    peers = peers_of(host_gw_peer(2), host_gw_peer(3))
    async with started(subject, "host-gw", tmp_path, peers) as backend, running(backend, peers):
        hand = await subject.hand()
        try:
            await hand.set_link(subject.host.iface_index, up=False)
            await eventually(lambda: _no_routes(hand))  # the kernel drops them
            await hand.set_link(subject.host.iface_index, up=True)
            await eventually(lambda: in_sync(backend, peers))
        finally:
            hand.close()


async def _no_routes(hand: Kernel) -> bool:
    return not await hand.routes(protocol=PROTOCOL)  # type: ignore[attr-defined]


# --- the kernel's answers, as the port gives them ------------------------------------------


async def test_removing_what_is_not_there_is_done(subject: Subject, tmp_path: Path) -> None:
    async with started(subject, "vxlan", tmp_path, {}) as backend:
        hand = await subject.hand()
        try:
            device = await hand.link_by_name("flannel.1")
            assert device is not None
            missing: list[KernelObject] = [
                Route(IPv4Network("10.5.7.0/24"), IPv4Address("10.99.0.7"),
                      subject.host.iface_index),
                Neighbour(device.index, IPv4Address("10.5.7.0"), "02:00:00:00:00:07"),
            ]
            done, failed = await hand.apply(Action.REMOVE, missing, protocol=PROTOCOL)
            assert done == missing and not failed
            assert await in_sync(backend, {})
        finally:
            hand.close()


# --- the agent's start: a missing device made by the first sync ---------------------


@pytest.mark.parametrize("ipv6", [False, True], ids=["ipv4", "dual-stack"])
async def test_a_start_leaves_a_missing_device_to_the_first_sync_with_the_mac_it_chose(
        subject: Subject, tmp_path: Path, ipv6: bool) -> None:
    """`prepare(devices_at_sync=True)` chooses and stores each VtepMAC for the lease and
    makes no device; `start` (the lease held) makes none either; the first sync makes
    each with its MAC and address, then the peers' objects on it."""
    peers = peers_of(dual(vxlan_peer(2)) if ipv6 else vxlan_peer(2))
    backend = VxlanBackend(settings(subject, "vxlan", tmp_path, ipv6=ipv6))
    names = {"flannel.1": ("vtep-mac", "backend_data", OWN.network_address)}
    if ipv6:
        names["flannel-v6.1"] = ("vtep-mac-v6", "backend_v6_data", OWN6.network_address)
    hand = await subject.hand()
    try:
        attrs = await backend.prepare(devices_at_sync=True)
        await backend.start(OWN, own_ipv6=OWN6)
        for name, (file, data, _) in names.items():
            assert await hand.device_state(name) is None, name
            mac = getattr(attrs, data)["VtepMAC"]
            assert (tmp_path / file).read_text().strip() == mac
        await backend.sync(peers)
        for name, (_, data, address) in names.items():
            state = await hand.device_state(name)
            assert state is not None and state.up
            assert state.mac == getattr(attrs, data)["VtepMAC"]
            assert [a.ip for a in state.addresses] == [address]
        assert await in_sync(backend, peers)
        assert await ours(backend) == planned(backend, peers)
    finally:
        hand.close()
        await backend.close()


async def test_a_start_adopts_a_device_that_is_there_at_once(
        subject: Subject, tmp_path: Path) -> None:
    """A restart over its device: `prepare(devices_at_sync=True)` adopts it (its MAC is
    the lease's) and `start` gives it its address, as before."""
    peers = peers_of(vxlan_peer(2))
    async with started(subject, "vxlan", tmp_path, peers):
        pass
    (tmp_path / "vtep-mac").unlink()  # the device's MAC wins over a lost state file
    hand = await subject.hand()
    backend = VxlanBackend(settings(subject, "vxlan", tmp_path))
    try:
        before = await hand.device_state("flannel.1")
        assert before is not None
        attrs = await backend.prepare(devices_at_sync=True)
        assert attrs.backend_data["VtepMAC"] == before.mac
        await backend.start(IPv4Network("10.5.9.0/24"))  # another lease: its address at once
        after = await hand.device_state("flannel.1")
        assert after is not None and after.index == before.index
        assert [a.ip for a in after.addresses] == [IPv4Address("10.5.9.0")]
    finally:
        hand.close()
        await backend.close()


async def test_a_device_the_first_sync_cannot_make_keeps_the_lease_mac_for_the_next_start(
        subject: Subject, tmp_path: Path) -> None:
    """Someone else's vxlan device on the VNI and port: the first sync fails before
    anything is programmed; the MAC the lease names stays stored, and the next start,
    the way clear, makes the device with it."""
    peers = peers_of(vxlan_peer(2))
    hand = await subject.hand()
    first = VxlanBackend(settings(subject, "vxlan", tmp_path))
    try:
        mac = (await first.prepare(devices_at_sync=True)).backend_data["VtepMAC"]
        await first.start(OWN)
        await hand.create_vxlan("other.1", vni=1, port=8472, local=subject.host.public_ip,
                                link=subject.host.iface_index, mtu=1450,
                                mac="02:00:00:00:01:07")
        with pytest.raises(DataPlaneError, match=os.strerror(errno.EEXIST)):
            await first.sync(peers)
        assert await hand.device_state("flannel.1") is None
        assert not await hand.routes(protocol=PROTOCOL)
        await first.close()
        other = await hand.link_by_name("other.1")
        assert other is not None
        await hand.delete_link(other.index)
        again = VxlanBackend(settings(subject, "vxlan", tmp_path))
        try:
            assert (await again.prepare(devices_at_sync=True)).backend_data["VtepMAC"] == mac
            await again.start(OWN)
            await again.sync(peers)
            state = await hand.device_state("flannel.1")
            assert state is not None and state.mac == mac
            assert await in_sync(again, peers)
        finally:
            await again.close()
    finally:
        hand.close()
        await first.close()


async def test_a_device_of_an_existing_name_is_refused(subject: Subject, tmp_path: Path) -> None:
    async with started(subject, "vxlan", tmp_path, {}):
        hand = await subject.hand()
        try:
            with pytest.raises(DataPlaneError, match=os.strerror(errno.EEXIST)):
                await hand.create_vxlan("flannel.1", vni=7, port=8472,
                                        local=subject.host.public_ip,
                                        link=subject.host.iface_index, mtu=1450,
                                        mac="02:00:00:00:01:07")
        finally:
            hand.close()


async def test_a_vni_is_refused_on_a_port_it_has_and_made_on_another(
        subject: Subject, tmp_path: Path) -> None:
    async with started(subject, "vxlan", tmp_path, {}):
        hand = await subject.hand()
        try:
            def made(name: str, port: int) -> Awaitable[object]:
                return hand.create_vxlan(name, vni=1, port=port, local=subject.host.public_ip,
                                         link=subject.host.iface_index, mtu=1450,
                                         mac="02:00:00:00:01:07")
            with pytest.raises(DataPlaneError, match=os.strerror(errno.EEXIST)):
                await made("other.1", 8472)
            await made("other.1", 4789)
            other = await hand.link_by_name("other.1")
            assert other is not None and other.vxlan is not None and other.vxlan.port == 4789
        finally:
            hand.close()


async def test_a_running_device_renamed_keeps_its_index_and_entries(
        subject: Subject, tmp_path: Path) -> None:
    peers = peers_of(vxlan_peer(2), vxlan_peer(3))
    async with started(subject, "vxlan", tmp_path, peers):
        hand = await subject.hand()
        try:
            device = await hand.link_by_name("flannel.1")
            assert device is not None and device.up
            before = (await hand.routes(protocol=PROTOCOL), await hand.fdb(device.index))
            await hand.rename_link(device.index, "flaside.1")
            renamed = await hand.link_by_name("flaside.1")
            assert renamed is not None and renamed.index == device.index and renamed.up
            assert await hand.link_by_name("flannel.1") is None
            assert (await hand.routes(protocol=PROTOCOL), await hand.fdb(device.index)) == before
            with pytest.raises(DataPlaneError, match=os.strerror(errno.EEXIST)):
                await hand.rename_link(device.index, "eth0")
        finally:
            hand.close()


def port_settings(subject: Subject, state_dir: Path, port: int, *, ipv6: bool = False,
                  vni: int = 1) -> DataPlaneSettings:
    base = settings(subject, "vxlan", state_dir, ipv6=ipv6)
    net: dict[str, object] = {"Network": "10.5.0.0/16",
                              "Backend": {"Type": "vxlan", "Port": port, "VNI": vni}}
    if ipv6:
        net |= {"EnableIPv6": True, "IPv6Network": "fd00:5::/48"}
    return replace(base, network=network_config_from_dict(net))


async def test_a_port_change_makes_the_new_device_beside_the_old_one(
        subject: Subject, tmp_path: Path) -> None:
    """The old device renamed aside, running with its entries (peers not yet switched
    still reach this host on the old port); the new one of flannel's name on the new
    port, with the same VtepMAC, takes every route; the old one goes with
    remove(objects=False)."""
    peers = peers_of(vxlan_peer(2), vxlan_peer(3))
    async with started(subject, "vxlan", tmp_path, peers) as old:
        hand = await subject.hand()
        new = VxlanBackend(port_settings(subject, tmp_path, 4789))
        try:
            device = await hand.link_by_name("flannel.1")
            assert device is not None
            entries = await hand.fdb(device.index)
            assert await old.step_aside()
            attrs = await new.prepare()
            await new.start(OWN)
            await new.sync(peers)
            aside = await hand.link_by_name("flaside.1")
            made = await hand.link_by_name("flannel.1")
            assert aside is not None and aside.index == device.index and aside.up
            assert aside.vxlan is not None and aside.vxlan.port == 8472
            assert await hand.fdb(aside.index) == entries  # still there for the old port
            assert made is not None and made.vxlan is not None and made.vxlan.port == 4789
            assert made.up and made.address == device.address == attrs.backend_data["VtepMAC"]
            assert {r.ifindex for r in await hand.routes(protocol=PROTOCOL)} == {made.index}
            assert await in_sync(new, peers)
            await old.remove(objects=False)
            assert await hand.link_by_name("flaside.1") is None
            assert await in_sync(new, peers)
        finally:
            await new.close()
            hand.close()


async def test_a_port_change_back_within_the_hold_takes_the_aside_device_back(
        subject: Subject, tmp_path: Path) -> None:
    """8472 -> 4789 -> 8472 before flaside.1 is removed: flaside.1 (on 8472, the port
    wanted again) takes flannel's name back and the third instance adopts it (the same
    device, never a moment without one on 8472); the 4789 one is put aside instead."""
    peers = peers_of(vxlan_peer(2))
    async with started(subject, "vxlan", tmp_path, peers) as first:
        hand = await subject.hand()
        there = VxlanBackend(port_settings(subject, tmp_path, 4789))
        back = VxlanBackend(port_settings(subject, tmp_path, 8472))
        try:
            device = await hand.link_by_name("flannel.1")
            assert await first.step_aside()
            await there.prepare()
            await there.start(OWN)
            await there.sync(peers)
            made = await hand.link_by_name("flannel.1")
            assert await there.step_aside()
            await back.prepare()
            await back.start(OWN)
            await back.sync(peers)
            again, aside = await hand.link_by_name("flannel.1"), await hand.link_by_name("flaside.1")
            assert device is not None and made is not None
            assert again is not None and again.index == device.index
            assert again.vxlan is not None and again.vxlan.port == 8472
            assert aside is not None and aside.index == made.index
            assert await hand.link_by_name("flback.1") is None
            assert await in_sync(back, peers)
            await there.remove(objects=False)  # its hold over
            assert await hand.link_by_name("flaside.1") is None
            kept = await hand.link_by_name("flannel.1")
            assert kept is not None and kept.index == device.index
            assert await in_sync(back, peers)
        finally:
            await there.close()
            await back.close()
            hand.close()


@pytest.mark.parametrize(("there", "kept"), [
    ({"port": 4789}, ("flaside.1", "flaside6.1")),
    ({"port": 8472, "vni": 2}, ("flannel.2", "flannel-v6.2")),
])
async def test_a_dual_stack_change_back_within_the_hold_takes_both_devices_back(
        subject: Subject, tmp_path: Path, there: dict[str, int], kept: tuple[str, str]) -> None:
    """Port 8472 -> 4789 -> 8472 and VNI 1 -> 2 -> 1 on a dual-stack host, each back
    before the first change's hold is over: flannel.1 and flannel-v6.1 are the devices
    they were (same ifindex, port and VNI), every route of both families on them, the
    first change's devices kept beside until their hold is over."""
    peers = peers_of(dual(vxlan_peer(2)), dual(vxlan_peer(3)))
    names = ("flannel.1", "flannel-v6.1")
    async with started(subject, "vxlan", tmp_path, peers, ipv6=True) as first:
        hand = await subject.hand()
        went = VxlanBackend(port_settings(subject, tmp_path, ipv6=True, **there))
        back = VxlanBackend(port_settings(subject, tmp_path, 8472, ipv6=True))
        try:
            before = {n: await hand.link_by_name(n) for n in names}
            aside = "port" in there and there["port"] != 8472
            if aside:
                assert await first.step_aside()
            await went.prepare()
            await went.start(OWN, own_ipv6=OWN6)
            await went.sync(peers)
            assert await in_sync(went, peers)
            # The first change's devices, by the names they are kept under.
            made = {k: await hand.link_by_name(n)
                    for k, n in zip(kept, names if aside else kept, strict=True)}
            if aside:
                assert await went.step_aside()
            await back.prepare()
            await back.start(OWN, own_ipv6=OWN6)
            await back.sync(peers)
            for name, link in before.items():
                now = await hand.link_by_name(name)
                assert link is not None and now is not None and now.index == link.index, name
                assert now.vxlan is not None and (now.vxlan.port, now.vxlan.vni) == (8472, 1)
            for name, link in made.items():  # the first change's, kept for its hold
                now = await hand.link_by_name(name)
                assert link is not None and now is not None and now.index == link.index, name
            assert {await hand.link_by_name(n) for n in ("flback.1", "flback6.1")} == {None}
            indexes = {link.index for link in before.values() if link is not None}
            assert {r.ifindex for r in await hand.routes(protocol=PROTOCOL)} == indexes
            assert await in_sync(back, peers)
            await went.remove(objects=False)  # its hold over
            assert {await hand.link_by_name(n) for n in kept} == {None}
            assert await in_sync(back, peers)
        finally:
            await went.close()
            await back.close()
            hand.close()


def on_vni(p: Peer, vni: int | None, mac: str) -> Peer:
    """`p` (dual-stack) as its lease reads once its host runs VNI `vni` with VtepMAC
    `mac` (BackendData and BackendV6Data both name the VNI, as flanneld writes them;
    None: neither names one, as older flanneld wrote them)."""
    assert isinstance(p.data6, VxlanLeaseData)
    return replace(p, data=VxlanLeaseData(mac, vni), data6=VxlanLeaseData(p.data6.vtep_mac, vni))


def families(p: Peer) -> tuple[IPv4Network, IPv6Network]:
    assert p.ipv6_subnet is not None
    return p.subnet, p.ipv6_subnet


async def test_a_vni_change_moves_each_peer_once_its_lease_says_the_new_vni(
        subject: Subject, tmp_path: Path) -> None:
    """VNI 1 -> 2 on a dual-stack host: the new flannel.2 takes only the peers whose
    lease says VNI 2 (or no VNI: any); a peer still on VNI 1 is planned nothing and
    keeps its route, neighbour and FDB entries of both families on the kept flannel.1
    (a send on VNI 2 would reach no device of its), through a full pass too, until its
    lease says VNI 2: then its routes move onto the new devices in one replace each."""
    slow, fast, silent = (on_vni(dual(vxlan_peer(i)), 1, f"02:00:00:00:00:{i:02x}")
                          for i in (2, 3, 4))
    async with started(subject, "vxlan", tmp_path, peers_of(slow, fast, silent),
                       ipv6=True) as old:
        hand = await subject.hand()
        new = VxlanBackend(port_settings(subject, tmp_path, 8472, ipv6=True, vni=2))
        try:
            olds = [await hand.link_by_name(n) for n in ("flannel.1", "flannel-v6.1")]
            old_index = [link.index for link in olds if link is not None]
            kept = {i: (await hand.neighbours(i), await hand.fdb(i)) for i in old_index}
            fast = on_vni(fast, 2, "02:00:00:00:02:03")  # switched before this host
            silent = on_vni(silent, None, "02:00:00:00:02:04")
            peers = peers_of(slow, fast, silent)
            await new.prepare()
            await new.start(OWN, own_ipv6=OWN6)
            for _ in range(2):  # the first pass, and a full pass again
                await new.sync(peers)
                news = [await hand.link_by_name(n) for n in ("flannel.2", "flannel-v6.2")]
                new_index = [link.index for link in news if link is not None]
                on = {r.dst: r.ifindex for r in await hand.routes(protocol=PROTOCOL)}
                assert [on[k] for k in families(slow)] == old_index
                assert [on[k] for k in families(fast)] == [on[k] for k in families(silent)] \
                    == new_index
                for index, entries in kept.items():  # slow's among them
                    assert (await hand.neighbours(index), await hand.fdb(index)) == entries
                assert new.status.foreign_peers == 1
                assert planned(new, peers) == planned(new, peers_of(fast, silent))
            switched = on_vni(slow, 2, "02:00:00:00:02:02")
            peers[slow.subnet] = switched
            await new.update(PeerChanges(changed=[switched]), peers)
            on = {r.dst: r.ifindex for r in await hand.routes(protocol=PROTOCOL)}
            assert [on[k] for k in families(switched)] == new_index
            assert new.status.foreign_peers == 0
            await new.sync(peers)
            assert await in_sync(new, peers)
            await old.remove(objects=False)  # its hold over
            assert await in_sync(new, peers)
        finally:
            await new.close()
            hand.close()


async def test_a_dual_stack_port_change_puts_both_devices_aside(
        subject: Subject, tmp_path: Path) -> None:
    peers = peers_of(dual(vxlan_peer(2)))
    async with started(subject, "vxlan", tmp_path, peers, ipv6=True) as old:
        hand = await subject.hand()
        new = VxlanBackend(port_settings(subject, tmp_path, 4789, ipv6=True))
        try:
            assert await old.step_aside()
            await new.prepare()
            await new.start(OWN, own_ipv6=OWN6)
            await new.sync(peers)
            for aside, name in (("flaside.1", "flannel.1"), ("flaside6.1", "flannel-v6.1")):
                kept, made = await hand.link_by_name(aside), await hand.link_by_name(name)
                assert kept is not None and kept.vxlan is not None and kept.vxlan.port == 8472
                assert made is not None and made.vxlan is not None and made.vxlan.port == 4789
            assert await in_sync(new, peers)
            await old.remove(objects=False)
            assert {await hand.link_by_name(n) for n in ("flaside.1", "flaside6.1")} == {None}
            assert await in_sync(new, peers)
        finally:
            await new.close()
            hand.close()


async def test_a_port_change_not_made_puts_the_old_device_back(
        subject: Subject, tmp_path: Path) -> None:
    peers = peers_of(vxlan_peer(2))
    async with started(subject, "vxlan", tmp_path, peers) as old:
        hand = await subject.hand()
        new = VxlanBackend(port_settings(subject, tmp_path, 4789))
        try:
            device = await hand.link_by_name("flannel.1")
            assert await old.step_aside()
            await new.prepare()  # then refused later (a missing program, say)
            await new.close()
            await old.step_back()
            back = await hand.link_by_name("flannel.1")
            assert device is not None and back is not None and back.index == device.index
            assert await hand.link_by_name("flaside.1") is None
            assert await in_sync(old, peers)
        finally:
            hand.close()


async def test_a_device_left_aside_by_a_stop_is_taken_over_at_start(
        subject: Subject, tmp_path: Path) -> None:
    """An agent stopped within a Port change's hold: the next start's backend takes
    flaside.1 over (`take_over`: still on its port, named by the kept devices' spec, so
    the peer filter guards it) and `remove(objects=False)` deletes it once the hold is
    over; flaside6.1 likewise on a dual-stack host."""
    peers = peers_of(dual(vxlan_peer(2)))
    async with started(subject, "vxlan", tmp_path, peers, ipv6=True) as old:
        new = VxlanBackend(port_settings(subject, tmp_path, 4789, ipv6=True))
        try:
            assert await old.step_aside()
            await new.prepare()
        finally:
            await new.close()  # and the agent stops before the hold is over
    restarted = VxlanBackend(port_settings(subject, tmp_path, 4789, ipv6=True))
    hand = await subject.hand()
    try:
        aside = {n: await hand.link_by_name(n) for n in ("flaside.1", "flaside6.1")}
        await restarted.clear_the_way()
        await restarted.prepare()
        kept = await restarted.take_over(lambda: {"flannel.1", "flannel-v6.1"})
        assert kept is not None
        assert {(d.name, d.vxlan.port if d.vxlan else 0) for d in kept.spec(None, {}).devices} \
            == {("flaside.1", 8472), ("flaside6.1", 8472)}
        for name, link in aside.items():
            now = await hand.link_by_name(name)
            assert link is not None and now is not None and now.index == link.index
        await kept.remove(objects=False)
        assert {await hand.link_by_name(n) for n in aside} == {None}
        made = await hand.link_by_name("flannel.1")
        assert made is not None and made.vxlan is not None and made.vxlan.port == 4789
    finally:
        await restarted.close()
        hand.close()


async def test_an_ipv6_onlink_route_is_moved_to_another_device_in_one_step(
        subject: Subject, tmp_path: Path) -> None:
    """IPv6 refuses to replace our onlink route onto another device (its gateway's route
    is the old one: EINVAL); `move` removes it and puts the new one in, one pair of
    requests back to back; an old route already gone counts as removed."""
    peers = peers_of(dual(vxlan_peer(2)))
    async with started(subject, "vxlan", tmp_path, peers, ipv6=True):
        hand = await subject.hand()
        try:
            other = await hand.create_vxlan(
                "other.7", vni=7, port=4789, local=IPv6Address(UNDERLAY6),
                link=subject.host.iface_index, mtu=1430, mac="02:00:00:00:07:07")
            await hand.set_link(other.index, up=True)
            old = next(r for r in await hand.routes(protocol=PROTOCOL) if r.dst.version == 6)
            new = replace(old, ifindex=other.index)
            done, failed = await hand.apply(Action.REPLACE, [new], protocol=PROTOCOL)
            assert not done and failed and os.strerror(errno.EINVAL) in str(failed[0].error)
            done, failed = await hand.move([(old, new)], protocol=PROTOCOL)
            assert done == [new] and not failed
            assert [r for r in await hand.routes(protocol=PROTOCOL) if r.dst.version == 6] \
                == [new]
            for _ in range(2):  # and back; the second time `new` is already gone
                back, failed = await hand.move([(new, old)], protocol=PROTOCOL)
                assert back == [old] and not failed
        finally:
            hand.close()


async def test_a_device_in_the_way_of_a_wanted_one_takes_its_name_back_at_start(
        subject: Subject, tmp_path: Path) -> None:
    """Changed back to the old Port while the agent was down within the hold: flaside.1
    is on the VNI and port flannel.1 wants again (the kernel refuses a second), so
    `clear_the_way` gives it flannel's name back (by way of flback.1) and puts the 4789
    device aside, as a change back within the hold does: flannel.1 is adopted with its
    entries, the other kept for its hold."""
    peers = peers_of(vxlan_peer(2))
    async with started(subject, "vxlan", tmp_path, peers) as old:
        new = VxlanBackend(port_settings(subject, tmp_path, 4789))
        hand = await subject.hand()
        try:
            device = await hand.link_by_name("flannel.1")
            assert device is not None
            entries = await hand.fdb(device.index)
            assert await old.step_aside()
            await new.prepare()
            made = await hand.link_by_name("flannel.1")
        finally:
            await new.close()
    restarted = VxlanBackend(port_settings(subject, tmp_path, 8472))
    try:
        await restarted.clear_the_way()
        back, aside = await hand.link_by_name("flannel.1"), await hand.link_by_name("flaside.1")
        assert back is not None and back.index == device.index and back.vxlan is not None
        assert back.vxlan.port == 8472 and await hand.fdb(back.index) == entries
        assert made is not None and aside is not None and aside.index == made.index
        assert await hand.link_by_name("flback.1") is None
        await restarted.prepare()
        await restarted.start(OWN)
        await restarted.sync(peers)
        adopted = await hand.link_by_name("flannel.1")
        assert adopted is not None and adopted.index == device.index
        kept = await restarted.take_over(lambda: {"flannel.1"})
        assert kept is not None
        assert [(d.name, d.vxlan.port if d.vxlan else 0)
                for d in kept.spec(None, {}).devices] == [("flaside.1", 4789)]
        assert await in_sync(restarted, peers)
    finally:
        await restarted.close()
        hand.close()


async def test_a_host_gw_start_takes_over_the_vxlan_device_a_rebuild_kept(
        subject: Subject, tmp_path: Path) -> None:
    """Stopped within a vxlan -> host-gw hold: host-gw wants no device, so flannel.1 is
    taken over as kept (guarded on 8472), with its entries, until its hold is over; a
    device of another's (not of a backend profile's names) is never touched."""
    peers = peers_of(vxlan_peer(2))
    async with started(subject, "vxlan", tmp_path, peers):
        pass  # changed to host-gw, then stopped within the hold
    hand = await subject.hand()
    restarted = HostGwBackend(settings(subject, "host-gw", tmp_path))
    try:
        await hand.create_vxlan("other.1", vni=1, port=4789, local=subject.host.public_ip,
                                link=subject.host.iface_index, mtu=1450,
                                mac="02:00:00:00:01:07")
        device = await hand.link_by_name("flannel.1")
        assert device is not None
        entries = await hand.fdb(device.index)
        await restarted.clear_the_way()
        await restarted.prepare()
        kept = await restarted.take_over(set)
        assert kept is not None
        assert [(d.name, d.vxlan.port if d.vxlan else 0)
                for d in kept.spec(None, {}).devices] == [("flannel.1", 8472)]
        assert await hand.fdb(device.index) == entries
        await kept.remove(objects=False)
        assert await hand.link_by_name("flannel.1") is None
        assert await hand.link_by_name("other.1") is not None
    finally:
        await restarted.close()
        hand.close()


async def test_a_gateway_off_the_link_is_refused_for_that_peer_only(
        subject: Subject, tmp_path: Path) -> None:
    peers = peers_of(host_gw_peer(2), host_gw_peer(3, public="10.98.0.3"))
    async with started(subject, "host-gw", tmp_path, peers) as backend:
        refused = backend.status.refused_peers
        assert list(refused) == [IPv4Network("10.5.3.0/24")]
        assert os.strerror(errno.ENETUNREACH) in refused[IPv4Network("10.5.3.0/24")]
        assert {r.dst for r in await ours(backend)} == {IPv4Network("10.5.2.0/24")}
        assert backend.status.in_sync  # one broken peer does not make the host unready


async def test_a_replace_keeps_one_entry_per_key(subject: Subject, tmp_path: Path) -> None:
    async with started(subject, "vxlan", tmp_path, {}):
        hand = await subject.hand()
        try:
            device = await hand.link_by_name("flannel.1")
            assert device is not None
            dst = ip_address("10.5.8.0")
            first = Neighbour(device.index, dst, "02:00:00:00:00:08")
            second = Neighbour(device.index, dst, "02:00:00:00:00:09")
            for entry in (first, second):
                done, failed = await hand.apply(Action.REPLACE, [entry], protocol=PROTOCOL)
                assert done == [entry] and not failed
            assert await hand.neighbours(device.index) == {second}  # type: ignore[attr-defined]
        finally:
            hand.close()


# --- an interrupted dump: the fake's (the real kernel cannot be made to) -------------------


def fake_subject() -> Subject:
    fake = FakeKernel()
    return Subject("fake", None, fake.underlay("eth0", "10.99.0.1/24"), fake.open, fake)


@pytest.mark.parametrize("backend_type", list(BACKENDS))
async def test_an_interrupted_dump_is_read_again(backend_type: str, tmp_path: Path) -> None:
    subject = fake_subject()
    assert subject.fake is not None
    make = BACKENDS[backend_type][1]
    peers = peers_of(make(2), make(3))
    async with started(subject, backend_type, tmp_path, peers) as backend:
        peers[IPv4Network("10.5.4.0/24")] = make(4)
        subject.fake.interrupt_dumps(DUMP_ATTEMPTS - 1)
        await backend.sync(peers)
        assert await in_sync(backend, peers)


async def test_a_dump_interrupted_every_time_fails_the_pass(tmp_path: Path) -> None:
    subject = fake_subject()
    assert subject.fake is not None
    peers = peers_of(vxlan_peer(2))
    async with started(subject, "vxlan", tmp_path, peers) as backend:
        subject.fake.interrupt_dumps(DUMP_ATTEMPTS)
        with pytest.raises(DataPlaneError, match="changed during the dump"):
            await backend.sync(peers_of(vxlan_peer(2), vxlan_peer(3)))


async def test_a_table_changed_during_a_dump_interrupts_it(tmp_path: Path) -> None:
    subject = fake_subject()
    assert subject.fake is not None
    hand = await subject.hand()
    many = [Route(IPv4Network(f"10.6.{i // 256}.{i % 256}/32"), None, subject.host.iface_index)
            for i in range(2000)]
    await hand.apply(Action.REPLACE, many, protocol=PROTOCOL)

    async def change() -> None:
        await asyncio.sleep(0)
        await hand.apply(Action.REMOVE, many[:1], protocol=PROTOCOL)

    changing = asyncio.create_task(change())
    with pytest.raises(DataPlaneError, match="changed during the dump"):
        await hand.scan_routes(lambda _ident: False, protocol=PROTOCOL)
    await changing


async def test_an_overflowed_subscription_fails_and_a_new_one_works(tmp_path: Path) -> None:
    """As the real socket with ENOBUFS: what was queued is lost and receive fails (the
    reconciler then opens another subscription and makes a full pass)."""
    subject = fake_subject()
    assert subject.fake is not None
    hand = await subject.hand()
    events = await hand.events()
    many = [Route(IPv4Network((0x0A060000 + i, 32)), None, subject.host.iface_index)
            for i in range(EVENT_QUEUE_LIMIT + 1)]
    await hand.apply(Action.REPLACE, many, protocol=PROTOCOL)
    with pytest.raises(DataPlaneError, match=os.strerror(errno.ENOBUFS)):
        await events.receive()
    events.close()
    again = await hand.events()
    await hand.apply(Action.REMOVE, many[:1], protocol=PROTOCOL)
    assert [e.obj for e in await again.receive()] == many[:1]
    again.close()
