"""The vxlan and host-gw backends against the real kernel, in namespaces.

No etcd: each test builds a NetworkConfig and a peer set by hand and drives
the backend directly (DataPlaneSettings(netns=...)). The kernel is read back
with iproute2's JSON output, i.e. independently of the code under test.
Needs root; every namespace is removed afterwards (tests/netns.py).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import replace
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from pathlib import Path
from typing import Any

import pytest
from netns import Underlay, ajson, ash, sh, underlay

from leaseagent.core.leases import Peer, PeerChanges
from leaseagent.core.network import network_config_from_dict
from leaseagent.core.plan import Comparison, Route, compare
from leaseagent.core.profiles.base import NoLeaseData
from leaseagent.core.profiles.vxlan import VxlanLeaseData
from leaseagent.dataplane.base import BackendAttrs, DataPlaneSettings
from leaseagent.dataplane.host import resolve_host
from leaseagent.dataplane.hostgw import HostGwBackend
from leaseagent.dataplane.vxlan import VxlanBackend
from leaseagent.errors import ConfigError

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)"),
]

NET = {"Network": "10.5.0.0/16"}
OWN = IPv4Network("10.5.1.0/24")
OWN6 = IPv6Network("fd00:5:0:1::/64")  # this host's IPv6 subnet on a dual-stack network
PEER_MAC = "02:00:00:00:00:02"
PEER = Peer(IPv4Network("10.5.2.0/24"), IPv4Address("10.99.0.2"), "vxlan",
            VxlanLeaseData(PEER_MAC))
FAR_PEER = Peer(IPv4Network("10.5.3.0/24"), IPv4Address("10.99.0.3"), "vxlan",
                VxlanLeaseData("02:00:00:00:00:03"))


@pytest.fixture
def lab() -> Iterator[Underlay]:
    with underlay(2) as topo:
        yield topo


def peers_of(*peers: Peer) -> dict[IPv4Network, Peer]:
    return {p.subnet: p for p in peers}


async def make_settings(
    ns: str, state_dir: Path, *, backend: dict[str, Any] | None = None, resync: float = 30.0,
    ipv6: bool = False,
) -> DataPlaneSettings:
    """Settings of host `ns` on NET (with `ipv6`, on NET6 with its PublicIPv6)."""
    host = await resolve_host("eth0", None, want_ipv6=ipv6, netns=ns)
    config = network_config_from_dict(
        {**(NET6 if ipv6 else NET), "Backend": backend or {"Type": "vxlan"}})
    return DataPlaneSettings(
        network=config, host=host, state_dir=state_dir, netns=ns,
        resync_seconds=resync,
    )


async def eventually(check: Callable[[], Awaitable[bool]], *, within: float = 1.0) -> float:
    """Poll until check() holds; return how long it took, fail after `within` seconds."""
    start = time.monotonic()
    while True:
        if await check():
            return time.monotonic() - start
        if time.monotonic() - start > within:
            pytest.fail(f"condition not met within {within}s")
        await asyncio.sleep(0.01)


async def routes(ns: str, proto: str = "76") -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = await ajson("ip", "-j", "-n", ns, "route", "show", "proto",
                                                proto)
    return result


async def neighbours(ns: str) -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = await ajson("ip", "-j", "-n", ns, "neigh", "show", "dev",
                                                "flannel.1")
    return result


async def fdb(ns: str) -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = await ajson("bridge", "-j", "-n", ns, "fdb", "show", "dev",
                                                "flannel.1")
    return [e for e in result if e.get("dst")]


async def link(ns: str, name: str = "flannel.1") -> dict[str, Any] | None:
    out = await ash("ip", "-j", "-d", "-n", ns, "link", "show", name, check=False)
    return json.loads(out)[0] if out.strip() else None


async def peer_state(ns: str) -> tuple[set[str], set[tuple[str, str]], set[tuple[str, str]]]:
    rs = {f"{r['dst']} via {r.get('gateway')} dev {r['dev']} {r.get('flags', [])}"
          for r in await routes(ns)}
    ns_ = {(n["dst"], n["lladdr"]) for n in await neighbours(ns) if "PERMANENT" in n["state"]}
    fs = {(f["mac"], f["dst"]) for f in await fdb(ns)}
    return rs, ns_, fs


async def started(settings: DataPlaneSettings, peers: dict[IPv4Network, Peer],
                  own: IPv4Network = OWN) -> tuple[VxlanBackend, BackendAttrs]:
    """A vxlan backend prepared, holding `own` (and OWN6 when dual-stack), synced."""
    backend = VxlanBackend(settings)
    attrs = await backend.prepare()
    await backend.start(own, own_ipv6=OWN6)
    await backend.sync(peers)
    return backend, attrs


@asynccontextmanager
async def running(backend: VxlanBackend, peers: dict[IPv4Network, Peer]
                  ) -> AsyncIterator[asyncio.Task[None]]:
    """`backend.run` in the background, subscribed to events; cancelled and the backend
    closed on the way out."""
    runner = asyncio.create_task(backend.run(lambda: peers))
    try:
        await asyncio.sleep(0.2)  # let run() subscribe
        yield runner
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
        await backend.close()


def same_as(read: Callable[[str], Awaitable[object]], ns: str, want: object
            ) -> Callable[[], Awaitable[bool]]:
    """A check for `eventually`: `read(ns)` is `want` again."""
    async def check() -> bool:
        return await read(ns) == want
    return check


async def as_doctor_sees_it(settings: DataPlaneSettings, peers: dict[IPv4Network, Peer], *,
                            own_ipv6: IPv6Network | None = None) -> Comparison:
    """The comparison of a backend that never prepared, as doctor uses it: it observes
    first, learning its devices from the kernel."""
    reader = VxlanBackend(settings)
    try:
        observed = await reader.observe()
        return compare(reader.spec(OWN, peers, own_ipv6=own_ipv6), observed)
    finally:
        await reader.close()


async def test_vxlan_kernel_objects_are_as_designed(lab: Underlay, tmp_path: Path) -> None:
    ns = lab.hosts[0]
    settings = await make_settings(ns, tmp_path)
    backend, attrs = await started(settings, peers_of(PEER, FAR_PEER))
    try:
        mac = attrs.backend_data["VtepMAC"]
        assert attrs.backend_type == "vxlan" and attrs.mtu == 1450
        assert attrs.backend_data["VNI"] == 1
        assert (tmp_path / "vtep-mac").read_text().strip() == mac

        dev = await link(ns)
        assert dev is not None
        info = dev["linkinfo"]["info_data"]
        assert dev["linkinfo"]["info_kind"] == "vxlan"
        assert (info["id"], info["local"], info["port"], info["learning"], info["link"]) == (
            1, "10.99.0.1", 8472, False, "eth0")
        assert dev["mtu"] == 1450 and dev["address"] == mac and "UP" in dev["flags"]
        addrs = await ajson("ip", "-j", "-4", "-n", ns, "addr", "show", "flannel.1")
        assert [(a["local"], a["prefixlen"]) for a in addrs[0]["addr_info"]] == [("10.5.1.0", 32)]

        rs, neigh, fdbs = await peer_state(ns)
        assert rs == {"10.5.2.0/24 via 10.5.2.0 dev flannel.1 ['onlink']",
                      "10.5.3.0/24 via 10.5.3.0 dev flannel.1 ['onlink']"}
        assert neigh == {("10.5.2.0", PEER_MAC), ("10.5.3.0", "02:00:00:00:00:03")}
        assert fdbs == {(PEER_MAC, "10.99.0.2"), ("02:00:00:00:00:03", "10.99.0.3")}
        assert all("permanent" in f.get("state", "") for f in await fdb(ns))
        # No subnet or broadcast route for our own /32.
        assert not [r for r in await ajson("ip", "-j", "-n", ns, "route", "show", "dev",
                                           "flannel.1") if r["dst"] == "10.5.1.0/24"]
        assert backend.status.in_sync
    finally:
        await backend.close()


async def test_spec_and_observe_compare_empty_after_sync_and_name_the_drift(
    lab: Underlay, tmp_path: Path
) -> None:
    """The one comparison reconcile and doctor use: nothing after a sync, then exactly
    what was changed by hand."""
    ns = lab.hosts[0]
    settings = await make_settings(ns, tmp_path)
    peers = peers_of(PEER, FAR_PEER)
    backend, _ = await started(settings, peers)
    try:
        assert not compare(backend.spec(OWN, peers), await backend.observe())
        await ash("ip", "-n", ns, "route", "del", "10.5.2.0/24")
        await ash("ip", "-n", ns, "link", "set", "flannel.1", "mtu", "1400")
        found = compare(backend.spec(OWN, peers), await backend.observe())
        assert found.objects.to_add == (
            Route(IPv4Network("10.5.2.0/24"), IPv4Address("10.5.2.0"),
                  (await link(ns) or {})["ifindex"], onlink=True),)
        assert found.objects.to_remove == ()
        assert [d.text for d in found.devices] == ["device flannel.1 MTU is 1400, want 1450"]
        assert await as_doctor_sees_it(settings, peers) == found
    finally:
        await backend.close()


async def test_sync_removes_stale_entries_and_leaves_foreign_ones(
    lab: Underlay, tmp_path: Path
) -> None:
    ns = lab.hosts[0]
    settings = await make_settings(ns, tmp_path)
    backend, _ = await started(settings, peers_of(PEER, FAR_PEER))
    try:
        # A peer that vanished while we were down, and somebody else's route.
        await ash("ip", "-n", ns, "route", "add", "10.5.9.0/24", "via", "10.99.0.9",
                  "dev", "eth0", "proto", "76")
        await ash("ip", "-n", ns, "route", "add", "10.5.8.0/24", "via", "10.99.0.8",
                  "dev", "eth0", "proto", "static")
        await ash("ip", "-n", ns, "neigh", "add", "10.5.9.0", "lladdr", "02:00:00:00:00:09",
                  "dev", "flannel.1", "nud", "permanent")
        await ash("bridge", "-n", ns, "fdb", "append", "02:00:00:00:00:09", "dev", "flannel.1",
                  "dst", "10.99.0.9")
        await backend.sync(peers_of(PEER))  # FAR_PEER is gone too
        rs, neigh, fdbs = await peer_state(ns)
        assert rs == {"10.5.2.0/24 via 10.5.2.0 dev flannel.1 ['onlink']"}
        assert neigh == {("10.5.2.0", PEER_MAC)}
        assert fdbs == {(PEER_MAC, "10.99.0.2")}
        foreign = await routes(ns, "static")
        assert [r["dst"] for r in foreign] == ["10.5.8.0/24"]
        assert backend.status.removed["route"] == 2
    finally:
        await backend.close()


async def test_a_backend_built_beside_another_takes_its_routes_over_peer_by_peer(
        lab: Underlay, tmp_path: Path) -> None:
    """A rebuild's roll-out, make before break: a host-gw backend built beside the
    running vxlan one replaces the routes of peers that switched, keeps what vxlan made
    for a peer still on vxlan, replaces that too once it switches; the vxlan device then
    goes alone (its neighbour and FDB entries with it). A vanished foreign peer's kept
    objects go with the next full pass."""
    ns = lab.hosts[0]
    vxlan, _ = await started(await make_settings(ns, tmp_path), peers_of(PEER, FAR_PEER))
    hostgw = HostGwBackend(await make_settings(ns, tmp_path, backend={"Type": "host-gw"}))
    near = Peer(PEER.subnet, PEER.public_ip, "host-gw", NoLeaseData())
    far = Peer(FAR_PEER.subnet, FAR_PEER.public_ip, "host-gw", NoLeaseData())
    on_vxlan = {"10.5.3.0/24 via 10.5.3.0 dev flannel.1 ['onlink']"}
    try:
        await hostgw.prepare()
        await hostgw.start(OWN)
        await hostgw.sync(peers_of(near, FAR_PEER))
        rs, neigh, fdbs = await peer_state(ns)
        assert rs == {"10.5.2.0/24 via 10.99.0.2 dev eth0 []", *on_vxlan}
        assert ("10.5.3.0", "02:00:00:00:00:03") in neigh
        assert ("02:00:00:00:00:03", "10.99.0.3") in fdbs
        assert hostgw.status.foreign_peers == 1 and hostgw.status.in_sync
        await hostgw.update(PeerChanges(changed=[far]), peers_of(near, far))
        assert (await peer_state(ns))[0] == {"10.5.2.0/24 via 10.99.0.2 dev eth0 []",
                                             "10.5.3.0/24 via 10.99.0.3 dev eth0 []"}
        await vxlan.remove(objects=False)
        assert {f"{r['dst']} via {r['gateway']} dev {r['dev']}" for r in await routes(ns)} == {
            "10.5.2.0/24 via 10.99.0.2 dev eth0", "10.5.3.0/24 via 10.99.0.3 dev eth0"}
        assert await ajson("ip", "-j", "-n", ns, "link", "show", "type", "vxlan") == []
        # A peer that switches away meanwhile keeps its route; once gone, a pass removes it.
        await hostgw.update(PeerChanges(changed=[FAR_PEER]), peers_of(near, FAR_PEER))
        assert "10.5.3.0/24" in {r["dst"] for r in await routes(ns)}
        peers = peers_of(near, FAR_PEER)
        async with running(hostgw, peers):  # type: ignore[arg-type]
            del peers[FAR_PEER.subnet]
            await hostgw.update(PeerChanges(removed=[FAR_PEER]), peers)

            async def only_near() -> bool:
                return [r["dst"] for r in await routes(ns)] == ["10.5.2.0/24"]

            await eventually(only_near, within=2.0)
    finally:
        await vxlan.close()
        await hostgw.close()


async def test_update_converges_to_what_sync_produces(lab: Underlay, tmp_path: Path) -> None:
    ns = lab.hosts[0]
    settings = await make_settings(ns, tmp_path)
    backend, _ = await started(settings, peers_of(PEER))
    try:
        moved = Peer(PEER.subnet, IPv4Address("10.99.0.7"), "vxlan",
                     VxlanLeaseData("02:00:00:00:00:77"))
        peers = peers_of(moved, FAR_PEER)
        await backend.update(PeerChanges(added=[FAR_PEER], changed=[moved]), peers)
        assert await peer_state(ns) == (
            {"10.5.2.0/24 via 10.5.2.0 dev flannel.1 ['onlink']",
             "10.5.3.0/24 via 10.5.3.0 dev flannel.1 ['onlink']"},
            {("10.5.2.0", "02:00:00:00:00:77"), ("10.5.3.0", "02:00:00:00:00:03")},
            {("02:00:00:00:00:77", "10.99.0.7"), ("02:00:00:00:00:03", "10.99.0.3")},
        )
        del peers[FAR_PEER.subnet]
        await backend.update(PeerChanges(removed=[FAR_PEER]), peers)
        after_update = await peer_state(ns)
        await backend.sync(peers)
        assert await peer_state(ns) == after_update
        assert len(after_update[0]) == 1
    finally:
        await backend.close()


async def test_a_peer_the_watcher_adds_during_a_full_sync_is_programmed_by_its_update(
        lab: Underlay, tmp_path: Path) -> None:
    # The agent hands the data plane the watcher's own peer map. A peer that arrives
    # while a full sync awaits (here: while it waits for the traffic rules, `ready`) is
    # in that map before the pass ends, and comes to `update` after it: the pass must
    # not count it as programmed, or its update finds nothing to add (seen in the lab:
    # a host that joined just as another finished its first sync was never reached).
    ns = lab.hosts[0]
    settings = await make_settings(ns, tmp_path)
    backend = VxlanBackend(settings)
    await backend.prepare()
    await backend.start(OWN)
    peers = peers_of(PEER)

    async def rules_then_a_new_peer() -> None:
        peers[FAR_PEER.subnet] = FAR_PEER

    try:
        await backend.sync(peers, ready=rules_then_a_new_peer())
        await backend.update(PeerChanges(added=[FAR_PEER]), peers)
        assert (await peer_state(ns))[0] == {"10.5.2.0/24 via 10.5.2.0 dev flannel.1 ['onlink']",
                                             "10.5.3.0/24 via 10.5.3.0 dev flannel.1 ['onlink']"}
    finally:
        await backend.close()


async def test_an_object_two_peers_plan_is_added_once_and_kept_while_one_wants_it(
        lab: Underlay, tmp_path: Path) -> None:
    # Two leases naming one host (a leftover beside its new key): one VtepMAC and
    # PublicIP, so one FDB entry for both. A join plans it twice and adds it once; it
    # stays while either peer wants it.
    ns = lab.hosts[0]
    settings = await make_settings(ns, tmp_path)
    twin = Peer(FAR_PEER.subnet, PEER.public_ip, "vxlan", VxlanLeaseData(PEER_MAC))
    peers = peers_of(PEER, twin)
    backend, _ = await started(settings, peers)
    try:
        assert backend.status.in_sync
        rs, _neighbours, fs = await peer_state(ns)
        assert len(rs) == 2 and fs == {(PEER_MAC, "10.99.0.2")}
        del peers[twin.subnet]
        await backend.update(PeerChanges(removed=[twin]), peers)
        assert (await peer_state(ns))[2] == {(PEER_MAC, "10.99.0.2")}
        await backend.sync(peers)
        assert backend.status.in_sync and len((await peer_state(ns))[0]) == 1
        await backend.update(PeerChanges(removed=[PEER]), {})
        assert (await peer_state(ns))[2] == set()
    finally:
        await backend.close()


async def test_hand_deleted_route_fdb_and_neighbour_come_back_within_a_second(
    lab: Underlay, tmp_path: Path
) -> None:
    ns = lab.hosts[0]
    settings = await make_settings(ns, tmp_path)
    peers = peers_of(PEER, FAR_PEER)
    backend, _ = await started(settings, peers)
    async with running(backend, peers) as runner:
        unchanged = same_as(peer_state, ns, await peer_state(ns))
        await ash("ip", "-n", ns, "route", "del", "10.5.2.0/24")
        await eventually(unchanged)
        await ash("bridge", "-n", ns, "fdb", "del", PEER_MAC, "dev", "flannel.1",
                  "dst", "10.99.0.2")
        await eventually(unchanged)
        await ash("ip", "-n", ns, "neigh", "del", "10.5.3.0", "dev", "flannel.1")
        await eventually(unchanged)

        for kind in ("route", "fdb", "neighbour"):
            assert backend.status.repairs[kind] >= 1, kind
        assert not runner.done()


async def test_deleted_device_is_recreated_with_same_mac_and_refilled(
    lab: Underlay, tmp_path: Path
) -> None:
    ns = lab.hosts[0]
    settings = await make_settings(ns, tmp_path)
    peers = peers_of(PEER, FAR_PEER)
    backend, attrs = await started(settings, peers)
    async with running(backend, peers):
        want = await peer_state(ns)
        old = await link(ns)
        assert old is not None
        await ash("ip", "-n", ns, "link", "del", "flannel.1")

        async def refilled() -> bool:
            dev = await link(ns)
            return dev is not None and dev["ifindex"] != old["ifindex"] and \
                await peer_state(ns) == want

        await eventually(refilled, within=2.0)
        dev = await link(ns)
        assert dev is not None
        assert dev["address"] == attrs.backend_data["VtepMAC"] and "UP" in dev["flags"]
        addrs = await ajson("ip", "-j", "-4", "-n", ns, "addr", "show", "flannel.1")
        assert [a["local"] for a in addrs[0]["addr_info"]] == ["10.5.1.0"]
        assert backend.status.repairs["device"] >= 1


async def test_close_leaves_device_and_peer_state(lab: Underlay, tmp_path: Path) -> None:
    ns = lab.hosts[0]
    settings = await make_settings(ns, tmp_path)
    peers = peers_of(PEER)
    backend, _ = await started(settings, peers)
    runner = asyncio.create_task(backend.run(lambda: peers))
    await asyncio.sleep(0.1)
    before = await peer_state(ns)
    runner.cancel()
    await asyncio.gather(runner, return_exceptions=True)
    await backend.close()
    assert await link(ns) is not None
    assert await peer_state(ns) == before and before[0]


async def test_vtep_mac_survives_restarts(lab: Underlay, tmp_path: Path) -> None:
    ns = lab.hosts[0]
    first = VxlanBackend(await make_settings(ns, tmp_path))
    mac = (await first.prepare()).backend_data["VtepMAC"]
    await first.close()
    assert int(mac[:2], 16) & 0b11 == 0b10  # locally administered unicast

    # Device kept, state file lost: the device's MAC wins.
    (tmp_path / "vtep-mac").unlink()
    second = VxlanBackend(await make_settings(ns, tmp_path))
    assert (await second.prepare()).backend_data["VtepMAC"] == mac
    await second.close()
    assert (tmp_path / "vtep-mac").read_text().strip() == mac

    # Device lost while the agent was down: the stored MAC wins.
    await ash("ip", "-n", ns, "link", "del", "flannel.1")
    third = VxlanBackend(await make_settings(ns, tmp_path))
    assert (await third.prepare()).backend_data["VtepMAC"] == mac
    await third.close()
    dev = await link(ns)
    assert dev is not None and dev["address"] == mac


async def test_mismatched_device_is_recreated_keeping_its_mac(
    lab: Underlay, tmp_path: Path
) -> None:
    ns = lab.hosts[0]
    await ash("ip", "-n", ns, "link", "add", "flannel.1", "address", "02:aa:00:00:00:01",
              "type", "vxlan", "id", "1", "dstport", "4789", "local", "10.99.0.1",
              "dev", "eth0")
    backend = VxlanBackend(await make_settings(ns, tmp_path))
    attrs = await backend.prepare()
    await backend.close()
    dev = await link(ns)
    assert dev is not None
    assert dev["linkinfo"]["info_data"]["port"] == 8472
    assert dev["linkinfo"]["info_data"]["learning"] is False
    assert dev["address"] == attrs.backend_data["VtepMAC"] == "02:aa:00:00:00:01"


async def test_flannel_vxlan_options_gbp_learning_and_mtu_reach_the_device(
    lab: Underlay, tmp_path: Path
) -> None:
    """Backend {"GBP": true, "Learning": true, "MTU": 1400} as flanneld makes the device:
    the GBP extension and learning on, MTU 1400 - 50; an existing device with GBP or
    learning off is made again (keeping its MAC); peers are programmed as usual."""
    ns = lab.hosts[0]
    await ash("ip", "-n", ns, "link", "add", "flannel.1", "address", "02:aa:00:00:00:07",
              "type", "vxlan", "id", "1", "dstport", "8472", "local", "10.99.0.1",
              "dev", "eth0", "nolearning")
    settings = await make_settings(ns, tmp_path, backend={
        "Type": "vxlan", "gbp": True, "Learning": True, "MTU": 1400})
    backend, attrs = await started(settings, peers_of(PEER))
    try:
        dev = await link(ns)
        assert dev is not None
        info = dev["linkinfo"]["info_data"]
        assert info.get("gbp") is True and info["learning"] is True, info
        assert dev["mtu"] == 1350 and attrs.mtu == 1350
        assert dev["address"] == "02:aa:00:00:00:07"
        _, neigh, fdbs = await peer_state(ns)
        assert neigh == {("10.5.2.0", PEER_MAC)} and fdbs == {(PEER_MAC, "10.99.0.2")}
        assert not await as_doctor_sees_it(settings, peers_of(PEER))
    finally:
        await backend.close()
    # Back to flannel's defaults: both flags off again.
    plain = await make_settings(ns, tmp_path)
    backend, _ = await started(plain, peers_of(PEER))
    await backend.close()
    dev = await link(ns)
    assert dev is not None
    info = dev["linkinfo"]["info_data"]
    assert not info.get("gbp") and info["learning"] is False and dev["mtu"] == 1450


async def test_direct_routing_uses_underlay_route_for_same_segment(
    lab: Underlay, tmp_path: Path
) -> None:
    ns = lab.hosts[0]
    settings = await make_settings(ns, tmp_path, backend={"Type": "vxlan", "DirectRouting": True})
    far = Peer(IPv4Network("10.5.4.0/24"), IPv4Address("172.16.0.4"), "vxlan",
               VxlanLeaseData("02:00:00:00:00:04"))
    backend, _ = await started(settings, peers_of(PEER, far))
    try:
        rs, neigh, fdbs = await peer_state(ns)
        assert rs == {"10.5.2.0/24 via 10.99.0.2 dev eth0 []",
                      "10.5.4.0/24 via 10.5.4.0 dev flannel.1 ['onlink']"}
        assert neigh == {("10.5.4.0", "02:00:00:00:00:04")}
        assert fdbs == {("02:00:00:00:00:04", "172.16.0.4")}
    finally:
        await backend.close()


async def test_host_gw_routes_and_refusal(lab: Underlay, tmp_path: Path) -> None:
    ns = lab.hosts[0]
    settings = await make_settings(ns, tmp_path, backend={"Type": "host-gw"})
    backend = HostGwBackend(settings)
    attrs = await backend.prepare()
    assert (attrs.backend_type, attrs.mtu) == ("host-gw", 1500)
    await backend.start(OWN)
    gw = Peer(IPv4Network("10.5.2.0/24"), IPv4Address("10.99.0.2"), "host-gw", NoLeaseData())
    gw3 = Peer(IPv4Network("10.5.3.0/24"), IPv4Address("10.99.0.3"), "host-gw", NoLeaseData())
    await backend.sync(peers_of(gw, gw3, FAR_PEER))
    peers = peers_of(gw)
    await backend.sync(peers)
    runner = asyncio.create_task(backend.run(lambda: peers))
    try:
        got = {(r["dst"], r["gateway"], r["dev"]) for r in await routes(ns)}
        assert got == {("10.5.2.0/24", "10.99.0.2", "eth0")}
        await asyncio.sleep(0.2)
        await ash("ip", "-n", ns, "route", "del", "10.5.2.0/24")

        async def back() -> bool:
            return len(await routes(ns)) == 1

        await eventually(back)
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
        await backend.close()

    host = await resolve_host("eth0", "10.99.0.50", netns=ns)
    wrong = DataPlaneSettings(network=settings.network, host=host, state_dir=tmp_path, netns=ns)
    with pytest.raises(ConfigError, match="not an address of eth0"):
        await HostGwBackend(wrong).prepare()


async def test_peer_counts_follow_a_full_sync(lab: Underlay, tmp_path: Path) -> None:
    """foreign_peers and refused_peers tell what is true after each full sync: a peer of
    another backend type, or one whose gateway is not on the link (refused, the data
    plane still in sync for the rest), that a listing no longer has is no longer
    counted."""
    ns = lab.hosts[0]
    backend = HostGwBackend(await make_settings(ns, tmp_path, backend={"Type": "host-gw"}))
    await backend.prepare()
    await backend.start(OWN)
    gw = Peer(IPv4Network("10.5.2.0/24"), IPv4Address("10.99.0.2"), "host-gw", NoLeaseData())
    off_link = Peer(IPv4Network("10.5.4.0/24"), IPv4Address("192.0.2.77"), "host-gw",
                    NoLeaseData())
    try:
        await backend.sync(peers_of(gw, off_link, FAR_PEER))  # FAR_PEER runs vxlan
        status = backend.status
        assert (status.foreign_peers, list(status.refused_peers)) == (1, [off_link.subnet])
        assert "Network is unreachable" in status.refused_peers[off_link.subnet]
        assert status.in_sync, status.last_error
        assert {r["dst"] for r in await routes(ns)} == {"10.5.2.0/24"}
        await backend.sync(peers_of(gw))
        assert (status.foreign_peers, status.refused_peers, status.in_sync) == (0, {}, True)
    finally:
        await backend.close()


async def test_resolve_host(lab: Underlay) -> None:
    ns = lab.hosts[1]
    with pytest.raises(ConfigError, match="no IPv4 default route"):
        await resolve_host(None, None, netns=ns)
    with pytest.raises(ConfigError, match="--iface nope: no such interface"):
        await resolve_host("nope", None, netns=ns)
    with pytest.raises(ConfigError, match=r"--iface 10\.99\.0\.77: no interface"):
        await resolve_host("10.99.0.77", None, netns=ns)
    with pytest.raises(ConfigError, match="--public-ip"):
        await resolve_host("eth0", "not-an-ip", netns=ns)
    await ash("ip", "-n", ns, "route", "add", "default", "via", "10.99.0.254")
    host = await resolve_host(None, None, netns=ns)
    assert (host.iface, str(host.public_ip), host.iface_mtu) == ("eth0", "10.99.0.2", 1500)
    by_ip = await resolve_host("10.99.0.2", None, netns=ns)
    assert by_ip == host


async def test_containers_ping_across_vxlan(lab: Underlay, tmp_path: Path) -> None:
    subnets = [IPv4Network("10.5.1.0/24"), IPv4Network("10.5.2.0/24")]
    containers = [
        lab.add_container(i, gateway=f"10.5.{i + 1}.1/24", address=f"10.5.{i + 1}.2/24")
        for i in range(2)
    ]
    backends: list[VxlanBackend] = []
    attrs: list[BackendAttrs] = []
    for i, ns in enumerate(lab.hosts):
        backend = VxlanBackend(await make_settings(ns, tmp_path / ns))
        attrs.append(await backend.prepare())
        await backend.start(subnets[i])
        backends.append(backend)
    try:
        for i, backend in enumerate(backends):
            j = 1 - i
            peer = Peer(subnets[j], IPv4Address(lab.ip_of(j)), "vxlan",
                        VxlanLeaseData(attrs[j].backend_data["VtepMAC"]))
            await backend.sync(peers_of(peer))
        out = await ash("ip", "netns", "exec", containers[0], "ping", "-c", "2", "-W", "2",
                        "10.5.2.2", check=False)
        assert " 0% packet loss" in out, out
    finally:
        for backend in backends:
            await backend.close()


def test_namespaces_are_cleaned_up() -> None:
    with underlay(1) as topo:
        names = list(topo.created)
        assert set(names) <= set(sh("ip", "netns", "list").split())
    left = sh("ip", "netns", "list").split()
    assert not set(names) & set(left)


# ------------------------------------------------------------------ dual-stack
#
# The underlay also carries ULA addresses fd00:250::<i+1>/64, the network
# fd00:5::/48 gives /64s; every IPv6 address is added `nodad` (no second of
# duplicate address detection in a fresh namespace).

NET6 = {**NET, "EnableIPv6": True, "IPv6Network": "fd00:5::/48"}


@pytest.fixture
def lab6() -> Iterator[Underlay]:
    with underlay(3) as topo:
        for i, ns in enumerate(topo.hosts):
            sh("ip", "-n", ns, "addr", "add", f"{ip6_of(i)}/64", "dev", "eth0", "nodad")
        yield topo


def ip6_of(i: int) -> str:
    return f"fd00:250::{i + 1}"


def subnet6(n: int) -> IPv6Network:
    return IPv6Network(f"fd00:5:0:{n}::/64")


def dual_peer(n: int, vxlan: bool = True) -> Peer:
    """Host n-1 of lab6 as a dual-stack peer holding 10.5.<n>.0/24 and fd00:5:0:<n>::/64."""
    data: VxlanLeaseData | NoLeaseData = (
        VxlanLeaseData(f"02:00:00:00:00:{n:02x}") if vxlan else NoLeaseData())
    data6: VxlanLeaseData | NoLeaseData = (
        VxlanLeaseData(f"02:00:00:00:06:{n:02x}") if vxlan else NoLeaseData())
    return Peer(IPv4Network(f"10.5.{n}.0/24"), IPv4Address(f"10.99.0.{n}"),
                "vxlan" if vxlan else "host-gw", data, ipv6_subnet=subnet6(n),
                public_ipv6=IPv6Address(ip6_of(n - 1)), data6=data6)


async def state6(ns: str) -> tuple[set[str], set[tuple[str, str]], set[tuple[str, str]]]:
    """Our IPv6 routes, permanent neighbours and FDB remotes of flannel-v6.1 (none
    without the device), as iproute2 shows them."""
    rs = {f"{r['dst']} via {r.get('gateway')} dev {r['dev']} {r.get('flags', [])}"
          for r in await ajson("ip", "-j", "-6", "-n", ns, "route", "show", "proto", "76")}
    if await link(ns, "flannel-v6.1") is None:
        return rs, set(), set()
    neigh = {(n["dst"], n["lladdr"])
             for n in await ajson("ip", "-j", "-6", "-n", ns, "neigh", "show", "dev",
                                  "flannel-v6.1")
             if "PERMANENT" in n["state"]}
    fdbs = {(f["mac"], f["dst"])
            for f in await ajson("bridge", "-j", "-n", ns, "fdb", "show", "dev", "flannel-v6.1")
            if f.get("dst")}
    return rs, neigh, fdbs


async def addresses6(ns: str, dev: str) -> list[tuple[str, int]]:
    addrs = await ajson("ip", "-j", "-6", "-n", ns, "addr", "show", "dev", dev, "scope", "global")
    # iproute2 leaves an empty object where its scope filter dropped an address.
    return [(a["local"], a["prefixlen"]) for a in addrs[0]["addr_info"] if a] if addrs else []


async def test_dual_stack_vxlan_devices_objects_and_mtu(lab6: Underlay, tmp_path: Path) -> None:
    ns = lab6.hosts[0]
    await ash("ip", "-n", ns, "link", "set", "eth0", "mtu", "9000")
    settings = await make_settings(ns, tmp_path, ipv6=True)
    peers = peers_of(dual_peer(2), dual_peer(3))
    backend, attrs = await started(settings, peers)
    try:
        mac6 = attrs.backend_v6_data["VtepMAC"]
        assert attrs.backend_v6_data == {"VNI": 1, "VtepMAC": mac6}
        assert mac6 != attrs.backend_data["VtepMAC"]
        assert (tmp_path / "vtep-mac-v6").read_text().strip() == mac6
        # Each device its family's overhead; FLANNEL_MTU fits both.
        v4, v6 = await link(ns), await link(ns, "flannel-v6.1")
        assert v4 is not None and v6 is not None
        assert (v4["mtu"], v6["mtu"], attrs.mtu) == (9000 - 50, 9000 - 70, 9000 - 70)
        info = v6["linkinfo"]["info_data"]
        assert v6["linkinfo"]["info_kind"] == "vxlan"
        assert (info["id"], info["local6"], info["port"], info["learning"], info["link"]) == (
            1, "fd00:250::1", 8472, False, "eth0")
        assert v6["address"] == mac6 and "UP" in v6["flags"]
        assert await addresses6(ns, "flannel-v6.1") == [("fd00:5:0:1::", 128)]

        assert await state6(ns) == (
            {"fd00:5:0:2::/64 via fd00:5:0:2:: dev flannel-v6.1 ['onlink']",
             "fd00:5:0:3::/64 via fd00:5:0:3:: dev flannel-v6.1 ['onlink']"},
            {("fd00:5:0:2::", "02:00:00:00:06:02"), ("fd00:5:0:3::", "02:00:00:00:06:03")},
            {("02:00:00:00:06:02", "fd00:250::2"), ("02:00:00:00:06:03", "fd00:250::3")},
        )
        rs, neigh, fdbs = await peer_state(ns)  # IPv4 as before, on flannel.1
        assert len(rs) == len(neigh) == len(fdbs) == 2
        assert all("10.99.0." in dst for _, dst in fdbs)

        assert not compare(backend.spec(OWN, peers, own_ipv6=OWN6), await backend.observe())
        assert not await as_doctor_sees_it(settings, peers, own_ipv6=OWN6)
    finally:
        await backend.close()


async def test_dual_stack_pings_across_vxlan_in_both_families(
    lab6: Underlay, tmp_path: Path
) -> None:
    """Three hosts, a "container" behind each with 10.5.<n>.2 and fd00:5:0:<n>::2; the
    first reaches the other two over the overlay in IPv4 and IPv6."""
    containers = []
    for i, host in enumerate(lab6.hosts):
        n = i + 1
        ns = lab6.add_container(i, gateway=f"10.5.{n}.1/24", address=f"10.5.{n}.2/24")
        hostdev = f"vc{len(lab6.created) - 1}"
        sh("ip", "-n", host, "addr", "add", f"fd00:5:0:{n}::1/64", "dev", hostdev, "nodad")
        sh("ip", "-n", ns, "addr", "add", f"fd00:5:0:{n}::2/64", "dev", "eth0", "nodad")
        sh("ip", "-n", ns, "-6", "route", "add", "default", "via", f"fd00:5:0:{n}::1")
        sh("ip", "netns", "exec", host, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")
        containers.append(ns)
    backends: list[VxlanBackend] = []
    attrs: list[BackendAttrs] = []
    try:
        for i, ns in enumerate(lab6.hosts):
            backend = VxlanBackend(await make_settings(ns, tmp_path / ns, ipv6=True))
            backends.append(backend)
            attrs.append(await backend.prepare())
            await backend.start(IPv4Network(f"10.5.{i + 1}.0/24"), own_ipv6=subnet6(i + 1))
        for i, backend in enumerate(backends):
            peers = [
                replace(dual_peer(j + 1), data=VxlanLeaseData(attrs[j].backend_data["VtepMAC"]),
                        data6=VxlanLeaseData(attrs[j].backend_v6_data["VtepMAC"]))
                for j in range(3) if j != i
            ]
            await backend.sync(peers_of(*peers))
        pings = [ash("ip", "netns", "exec", containers[0], "ping", "-c", "2", "-i", "0.2",
                     "-W", "2", dst, check=False)
                 for dst in ("10.5.2.2", "10.5.3.2", "fd00:5:0:2::2", "fd00:5:0:3::2")]
        for out in await asyncio.gather(*pings):
            assert " 0% packet loss" in out, out
    finally:
        for backend in backends:
            await backend.close()


async def test_dual_stack_drift_ipv6_route_and_device_are_repaired(
    lab6: Underlay, tmp_path: Path
) -> None:
    ns = lab6.hosts[0]
    peers = peers_of(dual_peer(2), dual_peer(3))
    backend, attrs = await started(await make_settings(ns, tmp_path, ipv6=True), peers)
    async with running(backend, peers):
        want = await state6(ns)
        unchanged = same_as(state6, ns, want)
        await ash("ip", "-n", ns, "-6", "route", "del", "fd00:5:0:2::/64")
        await eventually(unchanged)
        await ash("ip", "-n", ns, "-6", "neigh", "del", "fd00:5:0:3::", "dev", "flannel-v6.1")
        await eventually(unchanged)
        await ash("bridge", "-n", ns, "fdb", "del", "02:00:00:00:06:02", "dev", "flannel-v6.1",
                  "dst", "fd00:250::2")
        await eventually(unchanged)
        for kind in ("route", "neighbour", "fdb"):
            assert backend.status.repairs[kind] >= 1, kind

        old = await link(ns, "flannel-v6.1")
        assert old is not None
        await ash("ip", "-n", ns, "link", "del", "flannel-v6.1")

        async def refilled() -> bool:
            dev = await link(ns, "flannel-v6.1")
            return (dev is not None and dev["ifindex"] != old["ifindex"]
                    and await state6(ns) == want)

        await eventually(refilled, within=2.0)
        dev = await link(ns, "flannel-v6.1")
        assert dev is not None and dev["address"] == attrs.backend_v6_data["VtepMAC"]
        assert await addresses6(ns, "flannel-v6.1") == [("fd00:5:0:1::", 128)]
        assert backend.status.repairs["device"] >= 1
        assert not compare(backend.spec(OWN, peers, own_ipv6=OWN6), await backend.observe())


async def test_dual_stack_update_converges_to_what_sync_produces(
    lab6: Underlay, tmp_path: Path
) -> None:
    """A peer's IPv6 part moves (new VtepMAC and PublicIPv6), another loses it: the
    incremental update leaves what a full sync would."""
    ns = lab6.hosts[0]
    moving, dropping = dual_peer(2), dual_peer(3)
    backend, _ = await started(await make_settings(ns, tmp_path, ipv6=True),
                               peers_of(moving, dropping))
    try:
        moved = replace(moving, data6=VxlanLeaseData("02:00:00:00:06:77"),
                        public_ipv6=IPv6Address("fd00:250::77"))
        ipv4_only = replace(dropping, ipv6_subnet=None, public_ipv6=None, data6=None)
        peers = peers_of(moved, ipv4_only)
        await backend.update(PeerChanges(changed=[moved, ipv4_only]), peers)
        after_update = await state6(ns), await peer_state(ns)
        assert after_update[0] == (
            {"fd00:5:0:2::/64 via fd00:5:0:2:: dev flannel-v6.1 ['onlink']"},
            {("fd00:5:0:2::", "02:00:00:00:06:77")},
            {("02:00:00:00:06:77", "fd00:250::77")},
        )
        await backend.sync(peers)
        assert (await state6(ns), await peer_state(ns)) == after_update
    finally:
        await backend.close()


async def test_dual_stack_direct_routing_by_family(lab6: Underlay, tmp_path: Path) -> None:
    """A peer whose PublicIPv6 is on the underlay's IPv6 network is routed to directly
    in IPv6, whatever its PublicIP (here on no network of ours: encapsulated in IPv4)."""
    ns = lab6.hosts[0]
    settings = await make_settings(ns, tmp_path, backend={"Type": "vxlan", "DirectRouting": True},
                                   ipv6=True)
    near6 = replace(dual_peer(2), public_ip=IPv4Address("172.16.0.2"))
    far6 = replace(dual_peer(3), public_ipv6=IPv6Address("fd00:251::3"))
    backend, _ = await started(settings, peers_of(near6, far6))
    try:
        rs6, neigh6, fdb6 = await state6(ns)
        assert rs6 == {"fd00:5:0:2::/64 via fd00:250::2 dev eth0 []",
                       "fd00:5:0:3::/64 via fd00:5:0:3:: dev flannel-v6.1 ['onlink']"}
        assert (neigh6, fdb6) == ({("fd00:5:0:3::", "02:00:00:00:06:03")},
                                  {("02:00:00:00:06:03", "fd00:251::3")})
        rs, _, _ = await peer_state(ns)
        assert rs == {"10.5.2.0/24 via 10.5.2.0 dev flannel.1 ['onlink']",
                      "10.5.3.0/24 via 10.99.0.3 dev eth0 []"}
    finally:
        await backend.close()


async def test_ipv6_vtep_mac_survives_device_deletion(lab6: Underlay, tmp_path: Path) -> None:
    ns = lab6.hosts[0]
    first = VxlanBackend(await make_settings(ns, tmp_path, ipv6=True))
    mac6 = (await first.prepare()).backend_v6_data["VtepMAC"]
    await first.close()
    await ash("ip", "-n", ns, "link", "del", "flannel-v6.1")
    second = VxlanBackend(await make_settings(ns, tmp_path, ipv6=True))
    assert (await second.prepare()).backend_v6_data["VtepMAC"] == mac6
    await second.close()
    dev = await link(ns, "flannel-v6.1")
    assert dev is not None and dev["address"] == mac6
    assert (tmp_path / "vtep-mac-v6").read_text().strip() == mac6


async def test_ipv4_only_network_makes_no_ipv6_device(lab6: Underlay, tmp_path: Path) -> None:
    ns = lab6.hosts[0]
    settings = await make_settings(ns, tmp_path)
    backend, attrs = await started(settings, peers_of(dual_peer(2)))
    try:
        assert (attrs.mtu, attrs.backend_v6_data) == (1450, {})
        assert await link(ns, "flannel-v6.1") is None
        assert not (tmp_path / "vtep-mac-v6").exists()
        assert await state6(ns) == (set(), set(), set())
    finally:
        await backend.close()


async def test_host_gw_dual_stack_routes_and_refusal(lab6: Underlay, tmp_path: Path) -> None:
    ns = lab6.hosts[0]
    settings = await make_settings(ns, tmp_path, backend={"Type": "host-gw"}, ipv6=True)
    backend = HostGwBackend(settings)
    await backend.prepare()
    await backend.start(OWN, own_ipv6=OWN6)
    peers = peers_of(dual_peer(2, vxlan=False), dual_peer(3, vxlan=False))
    await backend.sync(peers)
    try:
        assert (await state6(ns))[0] == {"fd00:5:0:2::/64 via fd00:250::2 dev eth0 []",
                                         "fd00:5:0:3::/64 via fd00:250::3 dev eth0 []"}
        assert {r["dst"] for r in await routes(ns)} == {"10.5.2.0/24", "10.5.3.0/24"}
        assert not compare(backend.spec(OWN, peers, own_ipv6=OWN6), await backend.observe())
    finally:
        await backend.close()
    host = await resolve_host("eth0", None, public_ipv6="fd00:250::50", want_ipv6=True, netns=ns)
    wrong = replace(settings, host=host)
    with pytest.raises(ConfigError, match="PublicIPv6 fd00:250::50 is not an address of eth0"):
        await HostGwBackend(wrong).prepare()


async def test_resolve_host_ipv6(lab6: Underlay) -> None:
    ns = lab6.hosts[1]
    host = await resolve_host("eth0", None, want_ipv6=True, netns=ns)
    assert (str(host.public_ip), str(host.public_ipv6)) == ("10.99.0.2", "fd00:250::2")
    assert (await resolve_host("eth0", None, netns=ns)).public_ipv6 is None
    given = await resolve_host("eth0", None, public_ipv6="fd00:250::77", want_ipv6=True, netns=ns)
    assert str(given.public_ipv6) == "fd00:250::77"
    with pytest.raises(ConfigError, match=r"^--public-ipv6 '10\.0\.0\.1': not an IPv6 address$"):
        await resolve_host("eth0", None, public_ipv6="10.0.0.1", want_ipv6=True, netns=ns)
    # An address still in duplicate address detection (made to last a minute here) is
    # passed over, though listed first (newest first).
    await ash("ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv6.neigh.eth0.retrans_time_ms=60000")
    await ash("ip", "-n", ns, "addr", "add", "fd00:250::99/64", "dev", "eth0")
    assert str((await resolve_host("eth0", None, want_ipv6=True, netns=ns)).public_ipv6) == \
        "fd00:250::2"
    await ash("ip", "-n", ns, "addr", "flush", "dev", "eth0", "scope", "global", "to", "fd00::/8")
    with pytest.raises(ConfigError, match=r"^interface eth0 has no global IPv6 address; add one "
                       r"or pass --public-ipv6$"):
        await resolve_host("eth0", None, want_ipv6=True, netns=ns)
