"""A network config change, agent side, against the in-memory store: the lease fitted to
the new config (Leasing.refit), and the config followed, validated and coalesced
(ConfigFollower)."""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from ipaddress import IPv4Address, IPv6Address, IPv6Network
from typing import Any

import pytest

from leaseagent.agent.leasing import Leasing, OwnLease
from leaseagent.agent.netconfig import ConfigFollower
from leaseagent.core.configchange import ConfigChange
from leaseagent.core.leases import KeyLayout, LeaseValue
from leaseagent.core.network import NetworkConfig, parse_network_config
from leaseagent.dataplane import BACKENDS
from leaseagent.metrics import Metrics
from leaseagent.store.memory import MemoryStore

LAYOUT = KeyLayout("/coreos.com/network")
BASE: dict[str, Any] = {"Network": "10.5.0.0/16", "Backend": {"Type": "alloc"}}
VALUE = LeaseValue(public_ip=IPv4Address("192.168.64.2"), backend_type="alloc", node_id="a")


def config(**fields: object) -> NetworkConfig:
    return parse_network_config(json.dumps({**BASE, **fields}))


def leasing(store: MemoryStore, network: NetworkConfig, value: LeaseValue = VALUE) -> Leasing:
    return Leasing(store, layout=LAYOUT, network=network, value=value, ttl=60,
                   metrics=Metrics(), rng=random.Random(1))


async def keys(store: MemoryStore) -> list[str]:
    return sorted(kv.key[len(LAYOUT.subnets_prefix):]
                  for kv in (await store.list_prefix(LAYOUT.subnets_prefix)).items)


async def holding(store: MemoryStore, network: NetworkConfig, subnet: str) -> OwnLease:
    """A lease on `subnet` taken the way the agent takes one (previous subnet.env)."""
    from ipaddress import IPv4Network

    own = await leasing(store, network).acquire(previous=IPv4Network(subnet))
    assert str(own.subnet) == subnet
    return own


# ------------------------------------------------------------------ Leasing.refit


async def test_a_lease_that_still_fits_is_kept_as_it_is() -> None:
    store = MemoryStore()
    own = await holding(store, config(), "10.5.5.0/24")
    lease = leasing(store, config(Network="10.4.0.0/14"))
    revision = store.revision
    assert await lease.refit(own) == own
    assert store.revision == revision  # not a write


async def test_a_lease_outside_the_new_network_moves_and_the_old_key_goes() -> None:
    store = MemoryStore()
    own = await holding(store, config(), "10.5.200.0/24")
    lease = leasing(store, config(Network="10.5.0.0/17"))
    new = await lease.refit(own)
    assert new.subnet.subnet_of(config(Network="10.5.0.0/17").network)
    assert new.lease_id != own.lease_id
    assert await keys(store) == [f"{new.subnet.network_address}-24"]
    assert await store.time_to_live(own.lease_id) == -1  # revoked


async def test_a_changed_value_is_rewritten_under_the_same_key() -> None:
    store = MemoryStore()
    own = await holding(store, config(), "10.5.5.0/24")
    lease = leasing(store, config(), value=replace(VALUE, backend_type="host-gw"))
    new = await lease.refit(own)
    assert (new.key, new.lease_id, new.subnet) == (own.key, own.lease_id, own.subnet)
    kv = await store.get(own.key)
    assert kv is not None and kv.value == lease.value_bytes and kv.mod_revision > own.mod_revision


async def test_ipv6_turned_on_moves_the_key_with_the_ipv4_subnet_kept() -> None:
    store = MemoryStore()
    own = await holding(store, config(), "10.5.5.0/24")
    dual = config(EnableIPv6=True, IPv6Network="fd00:5::/48")
    value6 = replace(VALUE, public_ipv6=IPv6Address("fd00:200::2"))
    new = await leasing(store, dual, value6).refit(own)
    assert new.subnet == own.subnet and new.lease_id == own.lease_id
    assert new.ipv6_subnet == IPv6Network("fd00:5:0:5::/64")  # paired by position
    assert await keys(store) == ["10.5.5.0-24&fd00:5:0:5::-64"]
    back = await leasing(store, config()).refit(new)
    assert back.subnet == own.subnet and back.ipv6_subnet is None
    assert await keys(store) == ["10.5.5.0-24"]


async def test_a_key_someone_else_changed_is_left_to_the_holder() -> None:
    store = MemoryStore()
    own = await holding(store, config(), "10.5.5.0/24")
    await store.put(own.key, b'{"PublicIP": "192.168.64.9"}')
    lease = leasing(store, config(), value=replace(VALUE, backend_type="host-gw"))
    assert await lease.refit(own) == own  # the holder sees the overwrite and takes it back


# ------------------------------------------------------------------ ConfigFollower


class Applied:
    """The follower's `apply`: records each change it is handed."""

    def __init__(self, network: NetworkConfig, *, ok: bool = True) -> None:
        self.network = network
        self.ok = ok
        self.changes: list[tuple[ConfigChange, int]] = []

    async def __call__(self, network: NetworkConfig, change: ConfigChange, revision: int) -> bool:
        self.changes.append((change, revision))
        if self.ok:
            self.network = network
        return self.ok


@pytest.fixture
def errors(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    caplog.set_level(logging.INFO, logger="leaseagent")
    yield caplog


@dataclass
class Following:
    store: MemoryStore
    applied: Applied
    metrics: Metrics


@asynccontextmanager
async def following(*, ok: bool = True) -> AsyncIterator[Following]:
    """A follower of the config key (BASE in force) with a quiet time of 50 ms and a
    longest wait of 0.3 s, running for the block."""
    f = Following(MemoryStore(), Applied(config(), ok=ok), Metrics())
    follower = ConfigFollower(f.store, LAYOUT.config_key, current=lambda: f.applied.network,
                              revision=await put(f.store, BASE), apply=f.applied,
                              backends=BACKENDS, metrics=f.metrics, settle=0.05, longest=0.3)
    task = asyncio.ensure_future(follower.run())
    await asyncio.sleep(0.02)
    try:
        yield f
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        assert task.cancelled(), "the follower ended by itself"


async def put(store: MemoryStore, raw: str | dict[str, Any]) -> int:
    await store.put(LAYOUT.config_key, (raw if isinstance(raw, str) else json.dumps(raw)).encode())
    return store.revision


def value(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


async def test_a_change_is_handed_over_with_its_class_and_a_rewrite_is_not() -> None:
    async with following() as f:
        store, applied, metrics = f.store, f.applied, f.metrics
        same = await put(store, {**BASE, "SubnetLen": 24})  # the default, written out
        await asyncio.sleep(0.15)
        assert applied.changes == []
        assert value(metrics, "leaseagent_network_config_revision") == same
        grown = await put(store, {**BASE, "Network": "10.4.0.0/14"})
        await asyncio.sleep(0.15)
        assert [(c.kind, r) for c, r in applied.changes] == [("re-lease", grown)]


async def test_a_burst_is_coalesced_to_its_latest_version() -> None:
    async with following() as f:
        store, applied, metrics = f.store, f.applied, f.metrics
        for prefix in (15, 14, 13, 12):
            last = await put(store, {**BASE, "Network": f"10.0.0.0/{prefix}"})
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)
        assert [r for _, r in applied.changes] == [last]
        assert applied.network.network.prefixlen == 12
        assert value(metrics, "leaseagent_network_config_coalesced_total") == 3


async def test_a_steady_stream_of_writes_is_applied_at_least_every_longest_seconds() -> None:
    async with following() as f:
        store, applied = f.store, f.applied
        for i in range(40):  # every 20 ms, never 50 ms quiet, for 0.8 s
            await put(store, {**BASE, "Network": f"10.0.0.0/{8 + i % 6}"})
            await asyncio.sleep(0.02)
        assert 2 <= len(applied.changes) <= 4


async def test_invalid_and_deleted_versions_are_ignored_logged_once_and_counted(
        errors: pytest.LogCaptureFixture) -> None:
    async with following() as f:
        store, applied, metrics = f.store, f.applied, f.metrics
        bad = await put(store, {**BASE, "SubnetLen": 7})
        await asyncio.sleep(0.15)
        await store.delete(LAYOUT.config_key)
        await asyncio.sleep(0.15)
        assert applied.changes == []
        assert value(metrics, "leaseagent_network_config_ignored_total", reason="invalid") == 1
        assert value(metrics, "leaseagent_network_config_ignored_total", reason="missing") == 1
        lines = [r.getMessage() for r in errors.records if r.levelno == logging.ERROR]
        assert lines == [
            f"network config revision {bad} ignored: /coreos.com/network/config: SubnetLen=7: "
            "must be at least the Network prefix + 2 (18) so the network holds four subnets; "
            "the agent keeps running on the last good one",
            f"network config revision {bad + 1} ignored: /coreos.com/network/config was "
            "deleted; the agent keeps running on the last good one"]


async def test_a_version_the_agent_refused_is_not_tried_again_until_the_key_changes() -> None:
    async with following(ok=False) as f:
        store, applied = f.store, f.applied
        await put(store, {**BASE, "Network": "10.4.0.0/14"})
        await asyncio.sleep(0.15)
        store.set_available(False)  # the stream breaks; the re-list shows the same version
        await asyncio.sleep(0.05)
        store.set_available(True)
        await asyncio.sleep(0.8)
        assert len(applied.changes) == 1
        applied.ok = True
        await put(store, {**BASE, "Network": "10.4.0.0/14"})  # written again: tried again
        await asyncio.sleep(0.15)
        assert len(applied.changes) == 2 and applied.network.network.prefixlen == 14
