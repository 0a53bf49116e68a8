"""One contract for the lease store, run against MemoryStore and a real etcd.

Whatever the agent's unit tests learn from the fake must hold on etcd: every
test here runs twice (the `subject` fixture) and must pass on both.

One etcd serves the whole module (one per test would dominate the run time);
each test works under a fresh key prefix, and revisions are only ever
compared relative to one another, so tests cannot see each other.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
from etcd_server import EtcdServer

from leaseagent.errors import Compacted, LeaseLost, StoreError, StoreUnavailable
from leaseagent.store.base import Census, EventType, LeaseStore, WatchEvent
from leaseagent.store.etcd import EtcdSettings, EtcdStore
from leaseagent.store.memory import MemoryStore


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Subject:
    """A store under test plus what differs in driving it: time."""

    name: str
    store: LeaseStore
    prefix: str
    clock: FakeClock | None = None

    @property
    def memory(self) -> MemoryStore:
        assert isinstance(self.store, MemoryStore)
        return self.store


@pytest.fixture(params=["memory", "etcd"])
async def subject(request: pytest.FixtureRequest) -> AsyncIterator[Subject]:
    prefix = f"/contract/{uuid.uuid4().hex[:12]}/"
    if request.param == "memory":
        clock = FakeClock()
        yield Subject("memory", MemoryStore(clock=clock), prefix, clock)
        return
    server: EtcdServer = request.getfixturevalue("etcd_server")
    store = await EtcdStore.connect(EtcdSettings(endpoints=server.url, timeout=5.0))
    try:
        yield Subject("etcd", store, prefix)
    finally:
        await store.close()


async def current_revision(s: Subject) -> int:
    return (await s.store.list_prefix(s.prefix)).revision


async def collect(stream: AsyncIterator[list[WatchEvent]], count: int, *, within: float = 5.0
                  ) -> list[WatchEvent]:
    """The first `count` events of a watch (batching may differ between stores)."""
    events: list[WatchEvent] = []
    try:
        async with asyncio.timeout(within):
            async for batch in stream:
                events.extend(batch)
                if len(events) >= count:
                    break
    finally:
        await stream.aclose()  # type: ignore[attr-defined]
    return events


def summary(events: list[WatchEvent]) -> list[tuple[EventType, str, int, bytes | None]]:
    return [(e.type, e.key, e.revision, e.kv.value if e.kv else None) for e in events]


# --- keys -------------------------------------------------------------------------


async def test_get_and_put(subject: Subject) -> None:
    store, key = subject.store, subject.prefix + "config"
    assert await store.get(key) is None

    await store.put(key, b"one")
    first = await store.get(key)
    assert first is not None
    assert (first.key, first.value, first.version, first.lease) == (key, b"one", 1, 0)
    assert first.create_revision == first.mod_revision == await current_revision(subject)

    await store.put(key, b"two")
    second = await store.get(key)
    assert second is not None
    assert (second.value, second.version) == (b"two", 2)
    assert second.create_revision == first.create_revision
    assert second.mod_revision == first.mod_revision + 1


async def test_list_prefix_returns_only_the_prefix_sorted_with_the_current_revision(
    subject: Subject,
) -> None:
    store, p = subject.store, subject.prefix
    await store.put(p + "subnets/10.5.2.0-24", b"b")
    await store.put(p + "subnets/10.5.1.0-24", b"a")
    await store.put(p + "subnetsX", b"sibling")  # shares the string prefix minus the slash
    await store.put(p + "config", b"c")

    listing = await store.list_prefix(p + "subnets/")

    assert [(kv.key, kv.value) for kv in listing.items] == [
        (p + "subnets/10.5.1.0-24", b"a"),
        (p + "subnets/10.5.2.0-24", b"b"),
    ]
    config = await store.get(p + "config")
    assert config is not None
    assert listing.revision == config.mod_revision  # the store's, not the newest listed key's
    assert (await store.list_prefix(p + "nothing/")).items == []
    assert (await store.list_prefix(p + "nothing/")).revision == listing.revision


async def test_create_if_absent_wins_once_and_returns_the_current_key_on_loss(
    subject: Subject,
) -> None:
    store, key = subject.store, subject.prefix + "subnets/10.5.1.0-24"

    won, kv = await store.create(key, b"first", lease=0)
    assert won
    assert kv is not None and kv.value == b"first" and kv.version == 1

    lost, current = await store.create(key, b"second", lease=0)
    assert not lost
    assert current == kv
    assert await store.get(key) == kv


async def test_create_first_creates_the_first_absent_key_only(subject: Subject) -> None:
    store, p = subject.store, subject.prefix
    lease, _ = await store.grant(30)
    other, _ = await store.grant(30)
    await store.create(p + "a", b"theirs", lease=other)
    created = await store.create_first([p + "a", p + "b", p + "c"], b"ours", lease=lease)
    assert created is not None and created.key == p + "b" and created.lease == lease
    assert await store.get(p + "c") is None
    assert (await store.get(p + "a")).value == b"theirs"  # type: ignore[union-attr]


async def test_create_first_never_creates_a_second_key_for_the_same_lease(subject: Subject) -> None:
    # What a txn retried after it was applied looks like: one candidate is already ours.
    store, p = subject.store, subject.prefix
    lease, _ = await store.grant(30)
    first = await store.create_first([p + "a", p + "b"], b"ours", lease=lease)
    again = await store.create_first([p + "a", p + "b"], b"ours", lease=lease)
    assert first is not None and again is not None and again.key == first.key == p + "a"
    assert await store.get(p + "b") is None


async def test_create_first_returns_none_when_all_exist(subject: Subject) -> None:
    store, p = subject.store, subject.prefix
    lease, _ = await store.grant(30)
    other, _ = await store.grant(30)
    for name in ("a", "b"):
        await store.create(p + name, b"theirs", lease=other)
    before = await current_revision(subject)
    assert await store.create_first([p + "a", p + "b"], b"ours", lease=lease) is None
    assert await current_revision(subject) == before


async def test_replace_is_fenced_on_mod_revision(subject: Subject) -> None:
    store, key = subject.store, subject.prefix + "subnets/10.5.1.0-24"
    assert await store.replace(key, b"x", mod_revision=1, lease=0) == (False, None)
    _, kv = await store.create(key, b"v1", lease=0)
    assert kv is not None
    await store.put(key, b"v2")  # someone else writes in between
    stale = kv.mod_revision

    won, current = await store.replace(key, b"mine", mod_revision=stale, lease=0)
    assert not won
    assert current is not None and current.value == b"v2"

    won, new = await store.replace(key, b"mine", mod_revision=current.mod_revision, lease=0)
    assert won
    assert new is not None
    assert (new.value, new.version, new.create_revision) == (b"mine", 3, kv.create_revision)
    assert new.mod_revision == current.mod_revision + 1
    assert await store.get(key) == new


async def test_a_guard_refuses_a_create_while_any_key_starts_with_it(subject: Subject) -> None:
    """A lease key's IPv4 part guards its subnet whatever IPv6 part a key adds."""
    store, p = subject.store, subject.prefix + "subnets/"
    guard = p + "10.5.1.0-24"
    won, _ = await store.create(guard + "&fd00:5:0:1::-64", b"a", lease=0, guard=guard)
    assert won
    won, current = await store.create(guard + "&fd00:5:0:9::-64", b"b", lease=0, guard=guard)
    assert not won and current is None  # the key itself does not exist, its subnet is taken
    won, _ = await store.create(guard, b"c", lease=0, guard=guard)
    assert not won
    won, _ = await store.create(p + "10.5.1.64-26", b"d", lease=0, guard=p + "10.5.1.64-26")
    assert won  # another subnet (not under the guard)
    created = await store.create_first(
        [guard + "&fd00:5:0:2::-64", p + "10.5.2.0-24&fd00:5:0:2::-64"], b"e", lease=0,
        guards=[guard, p + "10.5.2.0-24"])
    assert created is not None and created.key == p + "10.5.2.0-24&fd00:5:0:2::-64"


async def test_move_deletes_and_creates_in_one_revision_fenced(subject: Subject) -> None:
    store, p = subject.store, subject.prefix + "subnets/"
    old, new = p + "10.5.1.0-24", p + "10.5.1.0-24&fd00:5:0:1::-64"
    lease, _ = await store.grant(60)
    _, kv = await store.create(old, b"v4 only", lease=lease)
    assert kv is not None
    start = await current_revision(subject)

    # Fenced on the old key's revision: a stale one moves nothing.
    assert await store.move(old, mod_revision=kv.mod_revision - 1, new_key=new, value=b"dual",
                            lease=lease) == (False, None)
    won, moved = await store.move(old, mod_revision=kv.mod_revision, new_key=new,
                                  value=b"dual", lease=lease)
    assert won and moved is not None
    assert (moved.key, moved.value, moved.lease) == (new, b"dual", lease)
    assert moved.mod_revision == start + 1  # one revision for both
    assert await store.get(old) is None
    events = await collect(store.watch(p, start_revision=start + 1), 2)
    assert [(e.type, e.key, e.revision) for e in events] == [
        (EventType.DELETE, old, start + 1), (EventType.PUT, new, start + 1)]
    # The new key must not exist yet: someone else's is never overwritten.
    _, again = await store.create(old, b"v4 again", lease=lease)
    assert again is not None
    won, current = await store.move(old, mod_revision=again.mod_revision, new_key=new,
                                    value=b"other", lease=lease)
    assert not won and current == moved
    assert await store.get(old) == again


async def test_delete_with_and_without_mod_revision(subject: Subject) -> None:
    store, p = subject.store, subject.prefix
    await store.put(p + "a", b"1")
    assert await store.delete(p + "a")
    assert await store.get(p + "a") is None
    assert not await store.delete(p + "a")

    await store.put(p + "b", b"1")
    kv = await store.get(p + "b")
    assert kv is not None
    assert not await store.delete(p + "b", mod_revision=kv.mod_revision - 1)
    assert await store.get(p + "b") == kv
    assert await store.delete(p + "b", mod_revision=kv.mod_revision)
    assert await store.get(p + "b") is None
    assert not await store.delete(p + "b", mod_revision=kv.mod_revision)


# --- etcd leases -------------------------------------------------------------------


async def test_grant_keepalive_time_to_live(subject: Subject) -> None:
    store = subject.store
    lease_id, ttl = await store.grant(30)
    assert lease_id != 0
    assert ttl == 30
    assert 0 < await store.time_to_live(lease_id) <= 30
    assert await store.keepalive(lease_id) == 30

    _, short_ttl = await store.grant(1)
    assert short_ttl == 2  # etcd's floor


async def test_revoke_deletes_attached_keys_and_the_lease_is_gone(subject: Subject) -> None:
    store, p = subject.store, subject.prefix
    lease_id, _ = await store.grant(30)
    _, kv = await store.create(p + "a", b"1", lease=lease_id)
    assert kv is not None and kv.lease == lease_id
    await store.put(p + "unleased", b"stays")

    await store.revoke(lease_id)

    assert await store.get(p + "a") is None
    assert await store.get(p + "unleased") is not None
    assert await store.time_to_live(lease_id) == -1
    assert await store.keepalive(lease_id) <= 0
    await store.revoke(lease_id)  # revoking twice is harmless


async def test_writes_with_a_revoked_lease_raise_lease_lost(subject: Subject) -> None:
    store, p = subject.store, subject.prefix
    lease_id, _ = await store.grant(30)
    await store.revoke(lease_id)
    with pytest.raises(LeaseLost):
        await store.create(p + "a", b"1", lease=lease_id)
    assert await store.get(p + "a") is None

    await store.put(p + "b", b"1")
    kv = await store.get(p + "b")
    assert kv is not None
    with pytest.raises(LeaseLost):
        await store.replace(p + "b", b"2", mod_revision=kv.mod_revision, lease=lease_id)
    assert await store.get(p + "b") == kv
    # A txn whose compare fails never looks at the lease.
    assert await store.create(p + "b", b"2", lease=lease_id) == (False, kv)


async def test_revoking_a_lease_deletes_its_keys_in_one_revision(subject: Subject) -> None:
    store, p = subject.store, subject.prefix
    lease_id, _ = await store.grant(30)
    await store.create(p + "b", b"1", lease=lease_id)
    await store.create(p + "a", b"2", lease=lease_id)
    start = await current_revision(subject) + 1

    await store.revoke(lease_id)

    events = await collect(store.watch(p, start_revision=start), 2)
    assert summary(events) == [
        (EventType.DELETE, p + "a", start, None),
        (EventType.DELETE, p + "b", start, None),
    ]
    assert await current_revision(subject) == start


async def test_lease_expiry_deletes_keys(subject: Subject) -> None:
    store, p = subject.store, subject.prefix
    lease_id, ttl = await store.grant(2)
    await store.create(p + "a", b"1", lease=lease_id)
    await store.put(p + "unleased", b"stays")

    if subject.clock is not None:
        subject.clock.now += ttl - 1
        await subject.memory.expire_leases()
        assert await store.get(p + "a") is not None  # not yet
        subject.clock.now += 1
        await subject.memory.expire_leases()
    else:
        deadline = time.monotonic() + ttl + 4  # etcd checks expiry twice a second
        for _ in range(100):
            if await store.get(p + "a") is None or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)

    assert await store.get(p + "a") is None
    assert await store.get(p + "unleased") is not None
    assert await store.time_to_live(lease_id) == -1
    assert await store.keepalive(lease_id) <= 0


# --- watch -------------------------------------------------------------------------


async def test_watch_from_a_revision_yields_puts_and_deletes_in_order(subject: Subject) -> None:
    store, p = subject.store, subject.prefix
    await store.put(p + "before", b"old")
    start = await current_revision(subject) + 1
    await store.put(p + "a", b"1")
    await store.put(subject.prefix.rstrip("/") + "-outside", b"not watched")
    await store.put(p + "a", b"2")
    await store.delete(p + "a")
    await store.put(p + "b", b"3")

    events = await collect(store.watch(p, start_revision=start), 4)

    assert summary(events) == [
        (EventType.PUT, p + "a", start, b"1"),
        (EventType.PUT, p + "a", start + 2, b"2"),
        (EventType.DELETE, p + "a", start + 3, None),
        (EventType.PUT, p + "b", start + 4, b"3"),
    ]
    second = events[1].kv
    assert second is not None
    assert (second.create_revision, second.mod_revision, second.version) == (start, start + 2, 2)


async def test_watch_delivers_writes_made_after_it_started(subject: Subject) -> None:
    store, p = subject.store, subject.prefix
    start = await current_revision(subject) + 1
    watching = asyncio.create_task(collect(store.watch(p, start_revision=start), 2))
    await asyncio.sleep(0.2)  # the stream is open and waiting
    await store.put(p + "a", b"1")
    await store.delete(p + "a")
    events = await watching
    assert summary(events) == [
        (EventType.PUT, p + "a", start, b"1"),
        (EventType.DELETE, p + "a", start + 1, None),
    ]


async def test_watch_from_a_future_revision_skips_what_comes_before(subject: Subject) -> None:
    store, p = subject.store, subject.prefix
    start = await current_revision(subject) + 2
    watching = asyncio.create_task(collect(store.watch(p, start_revision=start), 1))
    await asyncio.sleep(0.2)
    await store.put(p + "a", b"skipped")
    await store.put(p + "a", b"seen")
    events = await watching
    assert summary(events) == [(EventType.PUT, p + "a", start, b"seen")]


async def test_watch_from_a_compacted_revision_raises_compacted(subject: Subject) -> None:
    store, p = subject.store, subject.prefix
    start = await current_revision(subject) + 1
    await store.put(p + "a", b"1")
    await store.put(p + "a", b"2")
    compact_at = await current_revision(subject)
    await store.put(p + "a", b"3")
    await store.compact(compact_at)

    with pytest.raises(Compacted) as err:
        await collect(store.watch(p, start_revision=start), 1)
    assert err.value.compact_revision == compact_at

    # The compact revision itself is kept: a watch may resume from there.
    events = await collect(store.watch(p, start_revision=compact_at), 2)
    assert summary(events) == [
        (EventType.PUT, p + "a", compact_at, b"2"),
        (EventType.PUT, p + "a", compact_at + 1, b"3"),
    ]


async def test_compacting_an_old_or_future_revision_is_an_error(subject: Subject) -> None:
    store, p = subject.store, subject.prefix
    await store.put(p + "a", b"1")
    now = await current_revision(subject)
    await store.compact(now)
    with pytest.raises(StoreError):
        await store.compact(now)
    with pytest.raises(StoreError):
        await store.compact(now + 100)


async def test_count_now_and_at_a_past_revision(subject: Subject) -> None:
    store, p = subject.store, subject.prefix
    assert await store.count(p) == (0, await current_revision(subject))
    await store.put(p + "a", b"1")
    await store.put(p + "b", b"1")
    two = await current_revision(subject)
    await store.put(p + "a", b"2")  # a change: still two keys
    await store.delete(p + "b")
    await store.put(p + "c", b"1")
    await store.put(p + "d", b"1")
    await store.put(p.rstrip("/") + "x/e", b"1")  # beside the prefix, not under it
    now = await current_revision(subject)
    assert await store.count(p) == (3, now)
    assert await store.count(p, revision=two) == (2, two)
    assert await store.count(p, revision=two + 2) == (1, two + 2)  # after b's deletion


async def test_count_at_a_compacted_revision_raises_compacted(subject: Subject) -> None:
    store, p = subject.store, subject.prefix
    await store.put(p + "a", b"1")
    before = await current_revision(subject)
    await store.put(p + "b", b"1")
    kept = await current_revision(subject)
    await store.compact(kept)
    assert await store.count(p, revision=kept) == (2, kept)  # the compact revision is kept
    with pytest.raises(Compacted):
        await store.count(p, revision=before)


async def test_census_counts_and_names_the_keys_written_after_a_revision(subject: Subject) -> None:
    store, p = subject.store, subject.prefix
    await store.put(p + "a", b"1")
    await store.put(p + "b", b"1")
    await store.put(p + "gone", b"1")
    before = await current_revision(subject)
    await store.put(p + "a", b"2")  # a change: still the same keys
    await store.delete(p + "gone")  # gone: in the count, not among the written
    await store.put(p + "c", b"1")
    await store.put(p.rstrip("/") + "x/e", b"1")  # beside the prefix, not under it
    at = await current_revision(subject)
    await store.put(p + "b", b"2")  # after `at`: not in a census at `at`
    now = await current_revision(subject)
    census = await store.census(p, revision=at, changed_after=before)
    assert (census.count, census.revision) == (3, at)
    assert census.changed == {p + "a": before + 1, p + "c": before + 3}
    assert await store.census(p, revision=at, changed_after=at) == Census(3, {}, at)
    latest = await store.census(p, changed_after=at)
    assert (latest.count, latest.changed, latest.revision) == (3, {p + "b": now}, now)
    everything = await store.census(p, revision=at, changed_after=0)
    assert everything.changed == {p + "a": before + 1, p + "b": before - 1, p + "c": before + 3}


async def test_census_of_more_keys_than_one_answer_holds(subject: Subject) -> None:
    store, p = subject.store, subject.prefix
    for i in range(7):
        await store.put(p + f"k{i}", b"1")
    at = await current_revision(subject)
    if hasattr(store, "census_limit"):
        store.census_limit = 3  # three answers of at most 3 keys
    census = await store.census(p, revision=at, changed_after=0)
    assert census.count == 7
    assert census.changed == {p + f"k{i}": at - 6 + i for i in range(7)}


async def test_census_at_a_compacted_revision_raises_compacted(subject: Subject) -> None:
    store, p = subject.store, subject.prefix
    await store.put(p + "a", b"1")
    before = await current_revision(subject)
    await store.put(p + "b", b"1")
    await store.compact(await current_revision(subject))
    with pytest.raises(Compacted):
        await store.census(p, revision=before, changed_after=0)


# --- fake-only controls ------------------------------------------------------------


async def test_memory_partition_ends_a_blocked_watch(subject: Subject) -> None:
    if subject.clock is None:
        pytest.skip("a MemoryStore control; etcd partitions are tested in tests/integration")
    store = subject.memory
    watching = asyncio.create_task(
        collect(store.watch(subject.prefix, start_revision=store.revision + 1), 1, within=2)
    )
    await asyncio.sleep(0.05)  # blocked, waiting for a write
    store.set_available(False)
    with pytest.raises(StoreUnavailable):
        await watching
    store.set_available(True)
    assert await store.get(subject.prefix + "x") is None


# --- etcd-only ------------------------------------------------------------------------


async def test_stores_sharing_a_channel_watch_apart_and_close_apart(
        etcd_server: EtcdServer) -> None:
    """`sharing_channel` (the cluster bench's thousands of hosts in one process): each store
    has its own calls and watches; closing a sharer leaves the owner's channel working."""
    prefix = f"/contract/{uuid.uuid4().hex[:12]}/"
    owner = await EtcdStore.connect(EtcdSettings(endpoints=etcd_server.url, timeout=5.0))
    try:
        sharers = [owner.sharing_channel() for _ in range(3)]
        start = (await owner.list_prefix(prefix)).revision + 1
        watches = [asyncio.create_task(collect(s.watch(prefix, start_revision=start), 2))
                   for s in sharers]
        await asyncio.sleep(0.2)
        await sharers[0].put(prefix + "a", b"1")
        await sharers[1].put(prefix + "b", b"2")
        for got in await asyncio.gather(*watches):
            assert [(e.key, e.kv.value if e.kv else None) for e in got] == [
                (prefix + "a", b"1"), (prefix + "b", b"2")]
        for s in sharers:
            await s.close()
        assert (await owner.get(prefix + "b")) is not None  # the channel is still open
    finally:
        await owner.close()
