"""The agent's peer filter guards every port a vxlan device of its data plane receives on
(leaseagent.agent.plane.Plane.filter_ports): during a rebuild's roll-out the kept
device's too (a Port change's flaside.<VNI>, the vxlan device a change to host-gw
keeps), until that device is removed; after a restart within that hold, the devices
of ours the new start's backend does not use, taken over as kept (`Plane.prepare`,
leaseagent.dataplane.kept). On the fake kernel and the in-memory firewall."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest

from leaseagent.agent.leasing import OwnLease
from leaseagent.agent.plane import Peers, Plane
from leaseagent.agent.supervision import Tasks
from leaseagent.config import parse_agent_config
from leaseagent.core.leases import Peer, PeerChanges
from leaseagent.core.network import NetworkConfig, parse_network_config
from leaseagent.core.profiles.base import NoLeaseData
from leaseagent.core.profiles.vxlan import VxlanLeaseData
from leaseagent.core.rules import peer_filter_rules
from leaseagent.dataplane import BACKENDS
from leaseagent.dataplane.base import DataPlane
from leaseagent.dataplane.fakefirewall import MemoryFirewall
from leaseagent.dataplane.fakenetlink import FakeKernel
from leaseagent.metrics import Metrics

OWN = OwnLease(IPv4Network("10.5.1.0/24"), "/coreos.com/network/subnets/10.5.1.0-24", b"{}",
               lease_id=1, ttl=30, mod_revision=1, how="test")


def config(backend: dict[str, object]) -> NetworkConfig:
    return parse_network_config(json.dumps({"Network": "10.5.0.0/16", "Backend": backend}))


class Rig:
    def __init__(self, tmp_path: Path) -> None:
        self.kernel = FakeKernel()
        self.host = self.kernel.underlay("eth0", "10.99.0.1/24")
        self.firewall = MemoryFirewall(4)
        cfg = parse_agent_config([
            "--etcd-endpoints", "http://127.0.0.1:1", "--subnet-file", str(tmp_path / "s.env"),
            "--state-dir", str(tmp_path), "--node-id", "h1", "--peer-hold-time", "0.05"],
            environ={})
        self.cfg = cfg
        self.backends = {name: self._on_fake(make) for name, make in BACKENDS.items()}
        self.plane = self.new_plane(config({"Type": "vxlan"}))

    def new_plane(self, network: NetworkConfig) -> Plane:
        return Plane(self.cfg, network, self.host, metrics=Metrics(), tasks=Tasks(),
                     backends=self.backends, firewalls=lambda _nftables, _family: self.firewall)

    async def restart(self, network: NetworkConfig, peers: Peers | None = None) -> None:
        """The agent stopped (its kernel state kept) and started again on `network`: its
        start-up's `Plane.prepare` and first programming (then the roll-out followed)."""
        await self.plane.close()
        self.plane = self.new_plane(network)
        await self.plane.prepare()
        await self.plane.backend.start(OWN.subnet)
        await self.plane.program_all(peers or {}, OWN)

    def _on_fake(self, make):  # type: ignore[no-untyped-def]
        return lambda s: make(replace(s, kernel=self.kernel.open))

    async def switch(self, network: NetworkConfig, *, aside: bool,
                     peers: Peers | None = None) -> DataPlane:
        """What ConfigSwitcher._replace_backend does for a rebuild beside the old one."""
        plane = self.plane
        old, new = plane.backend, plane.new_backend(network, self.host)
        if aside:
            assert await old.step_aside()
            await plane.drop_leaving()
        await new.prepare()
        await new.start(OWN.subnet)
        plane.backend = new
        plane.use_network(network)
        await plane.drop_leaving()  # a roll-out (or devices kept at start) replaced
        plane.leaving = old
        await plane.program_all(peers or {}, OWN)
        return old

    async def hold_over(self) -> None:
        """The roll-out over (no peer of another type) and --peer-hold-time past: the
        kept device removed, and the rules made again."""
        await self.plane.finish_rollout()
        for _ in range(500):
            if self.plane.leaving is None and self.plane._leaving_timer is None:
                return
            await asyncio.sleep(0.01)
        raise AssertionError("the kept device was not removed within 5 s")

    @property
    def ports(self) -> tuple[int, ...]:
        held = self.firewall.held
        assert held is not None
        return held.peer_ports

    @property
    def devices(self) -> set[str]:
        return {link.name for link in self.kernel.links()} - {"lo", "eth0"}


async def test_a_port_change_guards_the_old_port_while_its_device_is_kept(
        tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    await rig.plane.backend.prepare()
    await rig.plane.backend.start(OWN.subnet)
    await rig.plane.program_all({}, OWN)
    assert rig.ports == (8472,) and rig.devices == {"flannel.1"}
    await rig.switch(config({"Type": "vxlan", "Port": 4789}), aside=True)
    assert rig.devices == {"flannel.1", "flaside.1"}
    assert rig.ports == (4789, 8472)
    held = rig.firewall.held
    assert held is not None and [r.tag for r in held.chain("input")] == [
        peer_filter_rules(port)[0].tag for port in (4789, 8472)]
    await rig.hold_over()
    assert rig.devices == {"flannel.1"}
    assert rig.ports == (4789,)


async def test_a_change_to_host_gw_guards_the_port_while_the_vxlan_device_is_kept(
        tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    await rig.plane.backend.prepare()
    await rig.plane.backend.start(OWN.subnet)
    await rig.plane.program_all({}, OWN)
    await rig.switch(config({"Type": "host-gw"}), aside=False)
    assert rig.devices == {"flannel.1"} and rig.ports == (8472,)
    await rig.hold_over()
    assert rig.devices == set()
    held = rig.firewall.held
    assert held is not None and held.peer_ports == () and not held.chain("input")
    assert rig.firewall.members is None  # no set without a filter


@pytest.mark.parametrize(("there", "aside", "kept", "ports", "left"), [
    ({"Type": "host-gw"}, False, "flannel.1", (8472,), ()),
    ({"Type": "vxlan", "Port": 4789}, True, "flaside.1", (4789, 8472), (4789,)),
    ({"Type": "vxlan", "VNI": 2}, False, "flannel.1", (8472,), (8472,)),  # flannel.2's too
])
async def test_a_restart_within_the_hold_keeps_the_old_device_guarded_until_it_ends(
        tmp_path: Path, there: dict[str, object], aside: bool, kept: str,
        ports: tuple[int, ...], left: tuple[int, ...]) -> None:
    """The agent stopped within a rebuild's hold: the next start takes the old device
    over (its port guarded, as before the stop) and removes it --peer-hold-time after
    no peer runs another type, its port's rule with it. Before, a change to host-gw or
    another VNI left it for good (unguarded on its own port), a Port change's was
    removed at once."""
    rig = Rig(tmp_path)
    await rig.plane.backend.prepare()
    await rig.plane.backend.start(OWN.subnet)
    await rig.plane.program_all({}, OWN)
    network = config(there)
    await rig.switch(network, aside=aside)
    before = {link.name: link.index for link in rig.kernel.links()}
    assert kept in before and rig.ports == ports
    await rig.restart(network)
    assert {link.name: link.index for link in rig.kernel.links()} == before  # adopted, kept
    assert rig.ports == ports
    await rig.hold_over()
    assert kept not in rig.devices
    assert rig.ports == left
    held = rig.firewall.held
    assert held is not None and len(held.chain("input")) == len(rig.ports)


async def test_a_device_in_the_way_of_a_wanted_one_takes_its_name_back_at_start(
        tmp_path: Path) -> None:
    """Changed back to Port 8472 while the agent was down within a Port change's hold:
    flaside.1 (VNI 1 on 8472) cannot stand beside the flannel.1 wanted there again, so it
    takes flannel's name back at start and the 4789 device is kept aside, guarded, until
    its hold is over."""
    rig = Rig(tmp_path)
    await rig.plane.backend.prepare()
    await rig.plane.backend.start(OWN.subnet)
    await rig.plane.program_all({}, OWN)
    first = next(link.index for link in rig.kernel.links() if link.name == "flannel.1")
    await rig.switch(config({"Type": "vxlan", "Port": 4789}), aside=True)
    await rig.restart(config({"Type": "vxlan"}))
    now = {link.name: (link.index, link.vxlan.port if link.vxlan else 0)
           for link in rig.kernel.links() if link.vxlan is not None}
    assert now["flannel.1"] == (first, 8472) and now["flaside.1"][1] == 4789
    assert rig.ports == (4789, 8472)
    await rig.hold_over()
    assert rig.devices == {"flannel.1"} and rig.ports == (8472,)


async def test_a_kept_device_the_running_backend_takes_back_is_not_removed(
        tmp_path: Path) -> None:
    """Restarted within a vxlan -> host-gw hold (flannel.2 on 4789 left too, say from an
    earlier VNI), then changed back to vxlan: the new backend adopts the kept flannel.1
    (its name), so dropping the kept devices (the roll-out replaced) removes flannel.2
    and its port's rule, but not flannel.1."""
    rig = Rig(tmp_path)
    await rig.plane.backend.prepare()
    await rig.plane.backend.start(OWN.subnet)
    await rig.plane.program_all({}, OWN)
    await rig.switch(config({"Type": "host-gw"}), aside=False)
    hand = rig.kernel.socket()
    await hand.create_vxlan("flannel.2", vni=2, port=4789, local=rig.host.public_ip,
                            link=rig.host.iface_index, mtu=1450, mac="02:00:00:00:02:02")
    await rig.restart(config({"Type": "host-gw"}))
    assert rig.ports == (4789, 8472)
    device = next(link.index for link in rig.kernel.links() if link.name == "flannel.1")
    await rig.switch(config({"Type": "vxlan"}), aside=False)  # drops the kept ones first
    assert [(link.name, link.index) for link in rig.kernel.links()
            if link.name.startswith("flannel.")] == [("flannel.1", device)]
    assert rig.ports == (8472,)
    await rig.hold_over()
    assert rig.devices == {"flannel.1"} and rig.ports == (8472,)


async def test_a_peer_not_yet_switched_keeps_the_device_a_restart_took_over(
        tmp_path: Path) -> None:
    """Restarted within a vxlan -> host-gw roll-out, a peer still on vxlan: what it needs
    stays (its route through flannel.1, flannel.1 with its entries, 8472 guarded) for as
    long as it runs vxlan; once it has switched, the device goes --peer-hold-time later."""
    rig = Rig(tmp_path)
    peer = Peer(IPv4Network("10.5.2.0/24"), IPv4Address("10.99.0.2"), "vxlan",
                VxlanLeaseData("02:00:00:00:00:02"))
    await rig.plane.backend.prepare()
    await rig.plane.backend.start(OWN.subnet)
    await rig.plane.program_all({peer.subnet: peer}, OWN)
    host_gw = config({"Type": "host-gw"})
    await rig.switch(host_gw, aside=False, peers={peer.subnet: peer})
    await rig.restart(host_gw, {peer.subnet: peer})
    device = next(link.index for link in rig.kernel.links() if link.name == "flannel.1")
    routes = await rig.kernel.socket().routes(protocol=76)
    assert [(r.dst, r.ifindex) for r in routes] == [(peer.subnet, device)]
    await rig.plane.finish_rollout()  # a peer of another type: no hold begins
    await asyncio.sleep(0.2)  # --peer-hold-time 0.05 s, four times over
    assert rig.devices == {"flannel.1"} and rig.ports == (8472,)
    switched = replace(peer, backend_type="host-gw", data=NoLeaseData())
    await rig.plane.program_all({peer.subnet: switched}, OWN)
    await rig.hold_over()
    assert rig.devices == set() and rig.ports == ()


async def test_a_removal_does_not_wait_for_the_rules_keeper(tmp_path: Path) -> None:
    """Peers only removed (a mass expiry): their routes go first, the peer filter's
    retirement after (the filter must admit before routes exist, not retire before they
    go), so a rules check in progress (it holds the keeper) does not hold the kernel's
    work back. Before, every update waited for the rules first."""
    rig = Rig(tmp_path)
    plane = rig.plane
    await plane.backend.prepare()
    await plane.backend.start(OWN.subnet)
    stay, go = (Peer(IPv4Network(f"10.5.{i}.0/24"), IPv4Address(f"10.99.0.{i}"), "vxlan",
                     VxlanLeaseData(f"02:00:00:00:00:{i:02x}")) for i in (2, 3))
    await plane.peers_changed(PeerChanges(added=[stay, go]), {stay.subnet: stay, go.subnet: go},
                              OWN, full=True, started=0.0)
    assert {r.dst for r in rig.kernel.routes(76)} == {stay.subnet, go.subnet}
    keeper = plane.rules[0].keeper
    async with keeper._lock:  # a check in progress
        removal = asyncio.ensure_future(plane.peers_changed(
            PeerChanges(removed=[go]), {stay.subnet: stay}, OWN, full=False, started=0.0))
        for _ in range(500):
            if {r.dst for r in rig.kernel.routes(76)} == {stay.subnet}:
                break
            await asyncio.sleep(0.01)
        assert {r.dst for r in rig.kernel.routes(76)} == {stay.subnet}
        assert not removal.done()  # the retirement waits for the keeper
    await asyncio.wait_for(removal, 5)
