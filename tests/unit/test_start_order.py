"""The agent's start-up order for a fresh vxlan host (leaseagent.agent.daemon): the
VtepMAC is chosen and stored before the lease, the lease taken naming it, and the
device made with it by the first sync, once the listing is judged. A device that
cannot be made then leaves no lease of this start's behind (the agent stops, as a
device that could not be made before the lease did), and the next start makes it
with the MAC kept. An in-process agent on the in-memory store and the fake kernel."""

from __future__ import annotations

import asyncio
import errno
import json
import os
from dataclasses import replace
from pathlib import Path

import pytest

from leaseagent.agent.daemon import Agent
from leaseagent.config import parse_agent_config
from leaseagent.core.leases import KeyLayout
from leaseagent.dataplane import BACKENDS
from leaseagent.dataplane.fakefirewall import MemoryFirewall
from leaseagent.dataplane.fakenetlink import FakeKernel
from leaseagent.dataplane.kernelport import Kernel
from leaseagent.store.memory import MemoryStore

LAYOUT = KeyLayout("/coreos.com/network")
CONFIG = {"Network": "10.5.0.0/16", "Backend": {"Type": "vxlan"}}
PEER = "10.5.7.0-24"
PEER_MAC = "02:00:00:00:07:01"
WITHIN = 10.0  # a fake start takes milliseconds; the margin is for a loaded CI machine


class Rig:
    """A host on the fake kernel whose agents record, at each vxlan device's creation,
    the leases etcd holds (`at_device`)."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.kernel = FakeKernel()
        self.host = self.kernel.underlay("eth0", "10.99.0.1/24")
        self.store = MemoryStore()
        self.at_device: list[dict[str, bytes]] = []

    async def open(self, netns: str | None) -> Kernel:
        kernel = await self.kernel.open(netns)
        create, store, seen = kernel.create_vxlan, self.store, self.at_device

        async def create_vxlan(name: str, **kw: object) -> None:
            listing = await store.list_prefix(LAYOUT.subnets_prefix)
            seen.append({kv.key: kv.value for kv in listing.items})
            await create(name, **kw)  # type: ignore[arg-type]

        kernel.create_vxlan = create_vxlan  # type: ignore[method-assign]
        return kernel

    def agent(self) -> Agent:
        cfg = parse_agent_config([
            "--etcd-endpoints", "http://127.0.0.1:1",
            "--subnet-file", str(self.tmp_path / "subnet.env"),
            "--state-dir", str(self.tmp_path), "--node-id", "h1"], environ={})
        backends = {"vxlan": lambda s: BACKENDS["vxlan"](replace(s, kernel=self.open))}
        return Agent(cfg, self.store, host=self.host, notify=lambda _: None, backends=backends,
                     firewalls=lambda _nftables, family: MemoryFirewall(family))

    async def own_leases(self) -> dict[str, dict[str, object]]:
        listing = await self.store.list_prefix(LAYOUT.subnets_prefix)
        values = {kv.key: json.loads(kv.value) for kv in listing.items}
        return {k: v for k, v in values.items() if v["PublicIP"] == "10.99.0.1"}


async def running(agent: Agent) -> tuple[asyncio.Event, asyncio.Task[None]]:
    stop = asyncio.Event()
    task = asyncio.ensure_future(agent.run(stop))
    async with asyncio.timeout(WITHIN):
        while agent.watcher is None or not agent.watcher.synced.is_set():
            if task.done():
                break
            await asyncio.sleep(0.01)
    return stop, task


async def put_config_and_peer(store: MemoryStore) -> None:
    await store.put(LAYOUT.config_key, json.dumps(CONFIG).encode())
    await store.put(f"{LAYOUT.subnets_prefix}{PEER}", json.dumps({
        "PublicIP": "10.99.0.7", "BackendType": "vxlan",
        "BackendData": {"VNI": 1, "VtepMAC": PEER_MAC}}).encode())


async def test_a_fresh_start_makes_its_device_after_the_lease_that_names_its_mac(
        tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    await put_config_and_peer(rig.store)
    agent = rig.agent()
    stop, task = await running(agent)
    try:
        assert not task.done(), task.exception()
        device = await rig.kernel.socket().device_state("flannel.1")
        assert device is not None and device.up
        # When the device was made, etcd already held this host's lease naming its MAC.
        [leases] = rig.at_device
        own = {k: json.loads(v) for k, v in leases.items()
               if json.loads(v)["PublicIP"] == "10.99.0.1"}
        assert [v["BackendData"]["VtepMAC"] for v in own.values()] == [device.mac]
        assert (tmp_path / "vtep-mac").read_text().strip() == device.mac
        # ... and the peer, judged before, is on it.
        assert PEER_MAC in {n.lladdr for n in await rig.kernel.socket().neighbours(device.index)}
    finally:
        stop.set()
        await asyncio.gather(task, return_exceptions=True)
        await agent.shutdown()


async def test_a_device_the_first_sync_cannot_make_gives_back_the_lease_this_start_made(
        tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    await put_config_and_peer(rig.store)
    hand = rig.kernel.socket()
    # Someone else's device on flannel's VNI and port: flannel.1 cannot be made.
    await hand.create_vxlan("other.1", vni=1, port=8472, local=rig.host.public_ip,
                            link=rig.host.iface_index, mtu=1450, mac="02:00:00:00:01:07")
    agent = rig.agent()
    stop, task = await running(agent)
    with pytest.raises(RuntimeError, match=os.strerror(errno.EEXIST)):
        await asyncio.wait_for(task, WITHIN)
    await agent.shutdown()
    assert await hand.device_state("flannel.1") is None
    assert await rig.own_leases() == {}  # no lease naming a MAC no device has
    mac = (tmp_path / "vtep-mac").read_text().strip()

    # The way clear, the next start makes the device with the MAC kept, the lease
    # naming it.
    other = await hand.link_by_name("other.1")
    assert other is not None
    await hand.delete_link(other.index)
    again = rig.agent()
    stop, task = await running(again)
    try:
        assert not task.done(), task.exception()
        device = await hand.device_state("flannel.1")
        assert device is not None and device.mac == mac
        assert [v["BackendData"]["VtepMAC"] for v in (await rig.own_leases()).values()] == [mac]
    finally:
        stop.set()
        await asyncio.gather(task, return_exceptions=True)
        await again.shutdown()


async def test_a_lease_of_this_host_taken_over_is_kept_when_the_device_cannot_be_made(
        tmp_path: Path) -> None:
    """Only a lease this start made is given back: one it took over (a restart after a
    reboot) was there before and stays, as when the device could not be made before."""
    rig = Rig(tmp_path)
    await put_config_and_peer(rig.store)
    first = rig.agent()
    stop, task = await running(first)
    stop.set()
    await asyncio.gather(task, return_exceptions=True)
    await first.shutdown()  # no --release-on-exit: the lease stays
    held = await rig.own_leases()
    assert len(held) == 1
    hand = rig.kernel.socket()
    device = await hand.device_state("flannel.1")
    assert device is not None
    await hand.delete_link(device.index)  # a reboot
    await hand.create_vxlan("other.1", vni=1, port=8472, local=rig.host.public_ip,
                            link=rig.host.iface_index, mtu=1450, mac="02:00:00:00:01:07")
    again = rig.agent()
    stop, task = await running(again)
    with pytest.raises(RuntimeError):
        await asyncio.wait_for(task, WITHIN)
    await again.shutdown()
    assert set(await rig.own_leases()) == set(held)
