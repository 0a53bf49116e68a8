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
from collections.abc import Awaitable, Callable, Iterator
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

import pytest
from netns import Underlay, ajson, ash, sh, underlay

from leaseagent.core.backends import NoLeaseData, VxlanLeaseData
from leaseagent.core.leases import Peer, PeerChanges
from leaseagent.core.network import network_config_from_dict
from leaseagent.core.plan import Route, compare
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
    ns: str, state_dir: Path, *, backend: dict[str, Any] | None = None, resync: float = 30.0
) -> DataPlaneSettings:
    host = await resolve_host("eth0", None, netns=ns)
    config = network_config_from_dict({**NET, "Backend": backend or {"Type": "vxlan"}})
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
    backend = VxlanBackend(settings)
    attrs = await backend.prepare()
    await backend.start(own)
    await backend.sync(peers)
    return backend, attrs


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
        # A backend that never prepared (as doctor uses it) sees the same.
        reader = VxlanBackend(settings)
        try:
            observed = await reader.observe()  # first: it learns the device from the kernel
            assert compare(reader.spec(OWN, peers), observed) == found
        finally:
            await reader.close()
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


async def test_hand_deleted_route_fdb_and_neighbour_come_back_within_a_second(
    lab: Underlay, tmp_path: Path
) -> None:
    ns = lab.hosts[0]
    settings = await make_settings(ns, tmp_path)
    peers = peers_of(PEER, FAR_PEER)
    backend, _ = await started(settings, peers)
    runner = asyncio.create_task(backend.run(lambda: peers))
    try:
        await asyncio.sleep(0.2)  # let run() subscribe
        want = await peer_state(ns)

        await ash("ip", "-n", ns, "route", "del", "10.5.2.0/24")
        await eventually(lambda: _same(ns, want))
        await ash("bridge", "-n", ns, "fdb", "del", PEER_MAC, "dev", "flannel.1",
                  "dst", "10.99.0.2")
        await eventually(lambda: _same(ns, want))
        await ash("ip", "-n", ns, "neigh", "del", "10.5.3.0", "dev", "flannel.1")
        await eventually(lambda: _same(ns, want))

        for kind in ("route", "fdb", "neighbour"):
            assert backend.status.repairs[kind] >= 1, kind
        assert not runner.done()
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
        await backend.close()


async def _same(ns: str, want: object) -> bool:
    return await peer_state(ns) == want


async def test_deleted_device_is_recreated_with_same_mac_and_refilled(
    lab: Underlay, tmp_path: Path
) -> None:
    ns = lab.hosts[0]
    settings = await make_settings(ns, tmp_path)
    peers = peers_of(PEER, FAR_PEER)
    backend, attrs = await started(settings, peers)
    runner = asyncio.create_task(backend.run(lambda: peers))
    try:
        await asyncio.sleep(0.2)
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
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
        await backend.close()


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
