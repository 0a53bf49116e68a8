"""The lease holder's state machine (leaseagent/agent/holder.py), every transition, on
the in-memory store with a clock the test moves (no sleeping for TTLs).

Each test drives `LeaseHolder.step` with the event the watcher, the config change or
the renewal timer would hand it, and checks the state, etcd's keys, what was adopted
and the gauges.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from ipaddress import IPv4Network

import pytest
from test_leasing import key, lease_value

from leaseagent.agent.etcdhealth import EtcdHealth
from leaseagent.agent.holder import (
    HolderState,
    LeaseHolder,
    OwnKeySeen,
    Refit,
    RenewalDue,
)
from leaseagent.agent.leasing import Leasing, OwnLease
from leaseagent.agent.logs import StateLog
from leaseagent.core.leases import KeyLayout, LeaseValue, Verdict, decode_lease_value, judge
from leaseagent.core.network import NetworkConfig, parse_network_config
from leaseagent.errors import StoreTimeout, SubnetsExhausted
from leaseagent.metrics import Metrics
from leaseagent.store.base import KeyValue, Listing
from leaseagent.store.memory import MemoryStore

PREFIX = "/coreos.com/network"
LAYOUT = KeyLayout(PREFIX)
NETWORK = parse_network_config(b'{"Network": "10.5.0.0/16"}')
TTL = 30
log = logging.getLogger("leaseagent")


class Clock:
    """The holder's and the store's clock: moved by the test only."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Rig:
    holder: LeaseHolder
    store: MemoryStore
    clock: Clock
    metrics: Metrics
    etcd: EtcdHealth
    adopted: list[tuple[OwnLease, bool, bool]] = field(default_factory=list)
    statuses: list[str] = field(default_factory=list)

    def gauge(self, name: str) -> float | None:
        return self.metrics.registry.get_sample_value(name)

    async def close(self) -> None:
        await self.etcd.close()


async def rig(*, own: OwnLease | None = None, store: MemoryStore | None = None,
              clock: Clock | None = None, network: NetworkConfig = NETWORK,
              margin: float | None = None,
              on_recovered: Callable[[], object] = lambda: None) -> Rig:
    clock = clock or Clock()
    store = store or MemoryStore(clock=clock)
    metrics = Metrics()
    states = StateLog(log)
    etcd = EtcdHealth(store, probe_key=LAYOUT.config_key, states=states, metrics=metrics,
                      on_recovered=on_recovered)
    leasing = Leasing(store, layout=LAYOUT, network=network, value=lease_value(), ttl=TTL,
                      metrics=metrics, rng=random.Random(1))
    if own is None:
        own = await leasing.acquire()
    adopted: list[tuple[OwnLease, bool, bool]] = []
    statuses: list[str] = []

    async def adopt(lease: OwnLease, first: bool, changed: bool) -> None:
        adopted.append((lease, first, changed))

    holder = LeaseHolder(own, leasing, store, etcd=etcd, metrics=metrics, states=states,
                         adopt=adopt, status=statuses.append, renew_margin=margin, clock=clock)
    await holder.take(own, first=True)
    return Rig(holder, store, clock, metrics, etcd, adopted, statuses)


async def put_lease(store: MemoryStore, subnet: str, value: LeaseValue) -> OwnLease:
    """A key written as another agent (or this one) writes it: under an etcd lease."""
    lease_id, ttl = await store.grant(TTL)
    await store.create(key(subnet), value.encode(), lease=lease_id)
    kv = await store.get(key(subnet))
    assert kv is not None
    return OwnLease(subnet=IPv4Network(subnet), key=kv.key, value=kv.value, lease_id=lease_id,
                    ttl=ttl, mod_revision=kv.mod_revision, how="test",
                    create_revision=kv.create_revision)


async def verdict_of(store: MemoryStore, key_name: str) -> Verdict:
    listing = await store.list_prefix(LAYOUT.subnets_prefix)
    return judge(listing.items, layout=LAYOUT, network=NETWORK).verdicts[key_name]


# --- start ------------------------------------------------------------------------------


async def test_a_taken_lease_is_held_and_adopted_once_as_the_first() -> None:
    r = await rig()
    assert r.holder.state is HolderState.HELD and r.holder.held
    assert r.adopted == [(r.holder.own, True, False)]
    assert r.gauge("leaseagent_lease_held") == 1
    assert r.gauge("leaseagent_lease_ttl_seconds") == TTL


# --- renewal ------------------------------------------------------------------------------


async def test_renewal_is_due_every_third_of_the_ttl_from_the_last_one() -> None:
    r = await rig()
    assert r.holder.renewal_due_in() == pytest.approx(TTL / 3)
    r.clock.now += 4
    assert r.holder.renewal_due_in() == pytest.approx(TTL / 3 - 4)
    r.clock.now += TTL / 3  # overdue (the etcd lease still lives): at once
    assert r.holder.renewal_due_in() == 0
    await r.holder.step(RenewalDue())
    assert r.holder.state is HolderState.HELD
    assert r.holder.renewal_due_in() == pytest.approx(TTL / 3)
    assert r.gauge("leaseagent_lease_renewals_total") == 1


async def test_the_renew_margin_brings_the_renewal_forward() -> None:
    r = await rig(margin=25)
    assert r.holder.renewal_due_in() == pytest.approx(TTL - 25)


async def test_a_reservation_is_never_renewed() -> None:
    store = MemoryStore(clock=Clock())
    await store.put(key("10.5.9.0/24"), lease_value().encode())
    kv = await store.get(key("10.5.9.0/24"))
    assert kv is not None
    own = OwnLease(subnet=IPv4Network("10.5.9.0/24"), key=kv.key, value=kv.value, lease_id=0,
                   ttl=0, mod_revision=kv.mod_revision, how="reserved")
    r = await rig(own=own, store=store)
    assert r.holder.renewal_due_in() is None
    assert r.gauge("leaseagent_lease_ttl_seconds") == float("inf")


async def test_held_to_lost_to_held_when_the_etcd_lease_expired() -> None:
    """HELD --renewal finds the etcd lease gone--> LOST --the same subnet back--> HELD."""
    r = await rig()
    before = r.holder.own
    r.clock.now += TTL + 1
    await r.store.expire_leases()
    assert await r.store.get(before.key) is None
    await r.holder.step(RenewalDue())
    after = r.holder.own
    assert r.holder.state is HolderState.HELD
    assert after.subnet == before.subnet and after.lease_id != before.lease_id
    kv = await r.store.get(after.key)
    assert kv is not None and kv.lease == after.lease_id
    assert r.adopted[-1] == (after, False, False)
    assert r.holder.renewal_due_in() == pytest.approx(TTL / 3)  # counted from the take-back


async def test_the_lease_runs_out_by_this_hosts_clock_while_etcd_is_away() -> None:
    """etcd unreachable past the TTL: still HELD (the data plane kept) but the gauge says
    it can no longer be held; the next answer (the etcd lease gone) takes it back."""
    r = await rig()
    before = r.holder.own
    r.store.set_available(False)
    r.clock.now += TTL + 1
    renewal = asyncio.ensure_future(r.holder.step(RenewalDue()))
    for _ in range(200):
        if r.holder.ran_out:
            break
        await asyncio.sleep(0.01)
    assert r.holder.ran_out and r.holder.state is HolderState.HELD
    assert r.gauge("leaseagent_lease_held") == 0
    assert r.gauge("leaseagent_etcd_up") == 0
    assert (r.gauge("leaseagent_lease_renewal_failures_total") or 0) >= 1
    r.store.set_available(True)
    await asyncio.wait_for(renewal, 10)
    assert r.holder.state is HolderState.HELD and not r.holder.ran_out
    assert r.holder.own.subnet == before.subnet and r.holder.own.lease_id != before.lease_id
    assert r.gauge("leaseagent_lease_held") == 1 and r.gauge("leaseagent_etcd_up") == 1
    await r.close()


async def test_a_renewal_within_the_ttl_keeps_the_lease_as_it_is() -> None:
    r = await rig()
    before = r.holder.own
    r.clock.now += TTL - 1
    await r.holder.step(RenewalDue())
    r.clock.now += TTL - 1  # would have expired without that renewal
    await r.store.expire_leases()
    assert r.holder.own == before
    assert await r.store.get(before.key) is not None
    assert r.adopted == [(before, True, False)]


class RoundRobin(MemoryStore):
    """etcd behind gRPC's round robin over three members, the first paused (SIGSTOP: its
    connection stays open, so it keeps its turn): each request takes the next member's
    turn, and one at the paused member is never answered; the caller's timeout ends it
    (the store's StoreTimeout, after TIMEOUT here)."""

    TIMEOUT = 0.02

    def __init__(self, clock: Clock) -> None:
        super().__init__(clock=clock)
        self.paused = False
        self.turn = 0
        self.timed_out: list[str] = []

    async def _member(self, what: str) -> None:
        paused = self.paused and self.turn % 3 == 0
        self.turn += 1
        if paused:
            await asyncio.sleep(self.TIMEOUT)
            self.timed_out.append(what)
            raise StoreTimeout(f"etcd did not answer {what} in time")

    async def keepalive(self, lease_id: int) -> int:
        await self._member("keepalive")
        return await super().keepalive(lease_id)

    async def get(self, key: str) -> KeyValue | None:
        await self._member("get")
        return await super().get(key)

    async def list_prefix(self, prefix: str) -> Listing:
        await self._member("list")
        return await super().list_prefix(prefix)


async def test_a_renewal_timed_out_at_a_paused_member_is_sent_again_to_the_next() -> None:
    """test_paused_member's second mode (a renewal gap of 4 s, not 3): the renewal's
    first attempt timed out at the paused member, and its failure set off etcd's health
    probe (a read) and, when a member answered it, the watcher's listing again; with the
    retry's jittered wait those often went first, took the healthy members' turns, and
    the retry went back to the paused member. The retry now goes at once: the next turn
    is a healthy member's, every time."""
    clock = Clock()
    store = RoundRobin(clock)
    relists: list[asyncio.Task[Listing]] = []  # the watcher lists again when etcd is back
    r = await rig(store=store, clock=clock, on_recovered=lambda: relists.append(
        asyncio.ensure_future(store.list_prefix(LAYOUT.subnets_prefix))))
    store.paused = True
    for _ in range(8):
        store.turn = 0  # the paused member's turn comes first
        # Before, the retry's wait grew (0-0.2 s, 0-0.4, ...) while each probe's first was
        # 0-0.2 s again: the retry lost more races the longer it went on, and this
        # renewal could go on failing until keepalive gave the paused member up.
        async with asyncio.timeout(5):  # one timeout of 0.02 s; 5 s for a loaded CI machine
            await r.holder.step(RenewalDue())
        await asyncio.sleep(0.3)  # the probe (its first wait is at most 0.2 s) and what follows
    await asyncio.gather(*relists)
    assert store.timed_out.count("keepalive") == 8  # one timeout a renewal, not two
    assert r.holder.state is HolderState.HELD and not r.holder.ran_out
    assert r.gauge("leaseagent_lease_renewals_total") == 8
    await r.close()


# --- news of our key --------------------------------------------------------------------


async def test_held_to_lost_to_held_when_our_key_was_deleted() -> None:
    r = await rig()
    before = r.holder.own
    await r.store.delete(before.key)
    await r.holder.step(OwnKeySeen(before.key, None, r.store.revision))
    assert r.holder.state is HolderState.HELD
    kv = await r.store.get(before.key)
    assert kv is not None and kv.value == before.value
    assert r.holder.own.subnet == before.subnet and r.adopted[-1][1:] == (False, False)


async def test_our_key_overwritten_by_another_host_gives_a_new_subnet() -> None:
    """LOST, and someone else holds the subnet now: a new one (adopt says it changed)."""
    r = await rig()
    before = r.holder.own
    other = lease_value(ip="192.168.64.9", node="node-z", mac="c6:d2:32:6f:8f:09")
    lease_id, _ = await r.store.grant(TTL)
    await r.store.delete(before.key)
    await r.store.create(before.key, other.encode(), lease=lease_id)
    kv = await r.store.get(before.key)
    await r.holder.step(OwnKeySeen(before.key, kv, kv.mod_revision if kv else 0))
    after = r.holder.own
    assert r.holder.state is HolderState.HELD
    assert after.subnet != before.subnet
    assert r.adopted[-1] == (after, False, True)
    assert r.gauge("leaseagent_lease_subnet_changes_total") == 1


async def test_an_echo_of_our_write_keeps_the_lease_and_moves_its_revision() -> None:
    r = await rig()
    before = r.holder.own
    kv = await r.store.get(before.key)
    assert kv is not None
    newer = type(kv)(key=kv.key, value=kv.value, create_revision=kv.create_revision,
                     mod_revision=kv.mod_revision + 5, version=kv.version, lease=kv.lease)
    await r.holder.step(OwnKeySeen(before.key, newer, newer.mod_revision))
    assert r.holder.state is HolderState.HELD
    assert r.holder.own.mod_revision == before.mod_revision + 5
    assert len(r.adopted) == 1


async def test_stale_news_of_our_key_and_news_of_an_old_key_change_nothing() -> None:
    r = await rig()
    before = r.holder.own
    await r.holder.step(OwnKeySeen(before.key, None, before.mod_revision - 1))  # stale
    await r.holder.step(OwnKeySeen(key("10.5.77.0/24"), None, r.store.revision))  # not ours
    assert r.holder.own == before and r.holder.state is HolderState.HELD
    assert len(r.adopted) == 1
    assert await r.store.get(before.key) is not None


async def test_run_hands_the_watchers_news_to_the_state_machine() -> None:
    r = await rig()
    before = r.holder.own
    task = asyncio.ensure_future(r.holder.run())
    try:
        await r.store.delete(before.key)
        r.holder.own_key_seen(None, r.store.revision)
        for _ in range(200):
            if len(r.adopted) == 2:
                break
            await asyncio.sleep(0.01)
        assert r.adopted[-1][0].key == before.key
        assert await r.store.get(before.key) is not None
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


# --- two agents with one identity --------------------------------------------------------


async def test_a_younger_twin_steps_back_and_ours_stays() -> None:
    r = await rig()
    before = r.holder.own
    await put_lease(r.store, "10.5.200.0/24", lease_value())
    await r.holder.step(await verdict_of(r.store, key("10.5.200.0/24")))
    assert r.holder.state is HolderState.HELD and r.holder.own == before
    assert await r.store.get(before.key) is not None
    assert r.holder.conflict is None


async def test_an_older_twin_wins_ours_sits_out_then_takes_its_key_back() -> None:
    """HELD --older twin--> CONFLICT --its key gone--> LOST --taken back--> HELD."""
    store = MemoryStore(clock=Clock())
    twin = await put_lease(store, "10.5.100.0/24", lease_value())
    own = await put_lease(store, "10.5.101.0/24", lease_value())
    r = await rig(own=own, store=store)
    step = asyncio.ensure_future(r.holder.step(await verdict_of(store, twin.key)))
    for _ in range(200):
        if r.holder.state is HolderState.CONFLICT:
            break
        await asyncio.sleep(0.01)
    assert r.holder.state is HolderState.CONFLICT and not r.holder.held
    assert r.holder.conflict is not None and twin.key in r.holder.conflict
    assert r.statuses and r.statuses[-1].startswith("identity conflict")
    assert r.gauge("leaseagent_identity_conflict") == 1
    assert r.gauge("leaseagent_lease_held") == 0
    assert await store.get(own.key) is None, "ours was given up"
    await store.revoke(twin.lease_id)  # the twin stops
    await asyncio.wait_for(step, 10)
    assert r.holder.state is HolderState.HELD and r.holder.conflict is None
    assert r.holder.own.key == own.key
    kv = await store.get(own.key)
    assert kv is not None and decode_lease_value(kv.value) == lease_value()
    assert r.gauge("leaseagent_identity_conflict") == 0


async def test_a_twin_holding_our_key_when_we_take_it_back_is_sat_out() -> None:
    """LOST --a twin holds our key--> CONFLICT --gone--> LOST --taken back--> HELD."""
    r = await rig()
    before = r.holder.own
    await r.store.revoke(before.lease_id)
    twin_lease, _ = await r.store.grant(TTL)
    await r.store.create(before.key, lease_value().encode(), lease=twin_lease)
    kv = await r.store.get(before.key)
    assert kv is not None
    step = asyncio.ensure_future(r.holder.step(OwnKeySeen(before.key, kv, kv.mod_revision)))
    for _ in range(200):
        if r.holder.state is HolderState.CONFLICT:
            break
        await asyncio.sleep(0.01)
    assert r.holder.state is HolderState.CONFLICT
    await r.store.revoke(twin_lease)
    await asyncio.wait_for(step, 10)
    assert r.holder.state is HolderState.HELD and r.holder.own.key == before.key
    kv = await r.store.get(before.key)
    assert kv is not None and kv.lease == r.holder.own.lease_id != twin_lease


async def test_news_of_a_twin_on_a_key_we_gave_up_is_stale() -> None:
    r = await rig()
    before = r.holder.own
    await r.holder.step(await verdict_of(r.store, before.key))  # our own key
    assert r.holder.own == before and r.holder.state is HolderState.HELD


# --- config changes (refit) ---------------------------------------------------------------


async def test_a_refit_that_fits_keeps_the_lease() -> None:
    r = await rig()
    before = r.holder.own
    done: asyncio.Future[OwnLease] = asyncio.get_running_loop().create_future()
    await r.holder.step(Refit(done))
    assert done.result() == before and r.holder.state is HolderState.HELD


async def test_a_refit_to_a_network_without_our_subnet_moves_us() -> None:
    r = await rig()
    before = r.holder.own
    moved = parse_network_config(b'{"Network": "10.6.0.0/16"}')
    r.holder.leasing.reconfigure(moved, lease_value())
    done: asyncio.Future[OwnLease] = asyncio.get_running_loop().create_future()
    await r.holder.step(Refit(done))
    after = done.result()
    assert after.subnet.subnet_of(IPv4Network("10.6.0.0/16"))
    assert r.holder.own == after and r.adopted[-1] == (after, False, True)
    assert await r.store.get(before.key) is None, "the old subnet was given up"
    # News of the key given up, as a twin's, is stale from now on.
    await put_lease(r.store, str(before.subnet), lease_value())
    await r.holder.step(await verdict_of(r.store, before.key))
    assert r.holder.state is HolderState.HELD and r.holder.own == after


async def test_a_refit_that_cannot_be_met_leaves_the_lease_as_it_was() -> None:
    r = await rig()
    before = r.holder.own
    full = parse_network_config(b'{"Network": "10.7.0.0/28", "SubnetLen": 30}')
    for subnet in ("10.7.0.4/30", "10.7.0.8/30", "10.7.0.12/30"):  # every one taken
        await put_lease(r.store, subnet, lease_value(ip="192.168.64.9", node="node-z"))
    r.holder.leasing.reconfigure(full, lease_value())
    done: asyncio.Future[OwnLease] = asyncio.get_running_loop().create_future()
    await r.holder.step(Refit(done))
    with pytest.raises(SubnetsExhausted):
        done.result()
    assert r.holder.own == before and r.holder.state is HolderState.HELD
    assert len(r.adopted) == 1


# --- leaving ---------------------------------------------------------------------------------


async def test_release_marks_the_value_released_and_revokes() -> None:
    r = await rig()
    before = r.holder.own
    await r.holder.release()
    assert await r.store.get(before.key) is None
    assert await r.store.time_to_live(before.lease_id) == -1
