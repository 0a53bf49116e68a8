"""No cyclic collection while a burst's objects live (leaseagent.memory.collector_paused):
a mass expiry's pass, from its plan to the kernel's last answer, runs with the collector
paused, and it runs again after (docs/benchmarks.md, "Round 8")."""

from __future__ import annotations

import gc
from dataclasses import replace
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

from leaseagent import memory
from leaseagent.core.leases import Peer, PeerChanges
from leaseagent.core.network import network_config_from_dict
from leaseagent.core.plan import PlanDiff
from leaseagent.core.profiles.vxlan import VxlanLeaseData
from leaseagent.dataplane.base import DataPlaneSettings
from leaseagent.dataplane.fakenetlink import FakeKernel
from leaseagent.dataplane.kernelport import Kernel
from leaseagent.dataplane.netlink import Failure
from leaseagent.dataplane.vxlan import VxlanBackend

OWN = IPv4Network("10.5.1.0/24")


def test_the_collector_waits_inside_and_runs_again_after_the_outermost() -> None:
    assert gc.isenabled()
    with memory.collector_paused():
        assert not gc.isenabled()
        with memory.collector_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()  # the outer pause is not over
    assert gc.isenabled()


def test_a_collector_turned_off_before_stays_off() -> None:
    gc.disable()
    try:
        with memory.collector_paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()


def peer(i: int) -> Peer:
    return Peer(IPv4Network(f"10.5.{i}.0/24"), IPv4Address(f"10.99.0.{i}"), "vxlan",
                VxlanLeaseData(f"02:00:00:00:00:{i:02x}"))


async def test_a_mass_removal_is_planned_and_sent_with_the_collector_paused(
        tmp_path: Path) -> None:
    fake = FakeKernel()
    host = replace(fake.underlay("eth0", "10.99.0.1/24"), public_ipv6=None)
    net = network_config_from_dict({"Network": "10.5.0.0/16", "Backend": {"Type": "vxlan"}})
    backend = VxlanBackend(DataPlaneSettings(network=net, host=host, state_dir=tmp_path,
                                             kernel=fake.open))
    peers = {p.subnet: p for p in map(peer, range(2, 12))}
    collecting: list[bool] = []
    program = backend._program

    async def spying(nl: Kernel, changes: PlanDiff
                     ) -> tuple[list[object], list[object], list[Failure]]:
        collecting.append(gc.isenabled())
        return await program(nl, changes)  # type: ignore[return-value]

    try:
        await backend.prepare()
        await backend.start(OWN)
        await backend.sync(peers)
        backend._program = spying  # type: ignore[assignment,method-assign]
        gone = [peers.pop(subnet) for subnet in list(peers)[:8]]
        await backend.update(PeerChanges(removed=gone), peers)
    finally:
        await backend.close()
    assert collecting == [False]
    assert gc.isenabled()
    assert len(fake.routes(backend._settings.route_protocol)) == 2  # the two that stay
