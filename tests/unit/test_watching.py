"""LeaseWatcher against the in-memory store: one peer per subnet whatever the key names."""

from __future__ import annotations

import asyncio
import gc
import json
import time
from collections.abc import Awaitable, Callable
from ipaddress import IPv4Address, IPv4Network

from leaseagent.agent import watching
from leaseagent.agent.watching import LeaseWatcher
from leaseagent.core.leases import KeyLayout, PeerChanges
from leaseagent.core.network import parse_network_config
from leaseagent.metrics import Metrics
from leaseagent.store.base import EventType, KeyValue, WatchEvent
from leaseagent.store.memory import MemoryStore

PREFIX = "/coreos.com/network/subnets/"
NETWORK = parse_network_config(b'{"Network": "10.5.0.0/16", "Backend": {"Type": "alloc"}}')
SUBNET = IPv4Network("10.5.3.0/24")


def lease(ip: str) -> bytes:
    # A NodeID: a key with no etcd lease (store.put) and nothing else is an unclaimed reservation.
    return json.dumps({"PublicIP": ip, "BackendType": "alloc", "NodeID": ip}).encode()


async def until(check, within: float = 2.0) -> None:  # type: ignore[no-untyped-def]
    async with asyncio.timeout(within):
        while not check():  # noqa: ASYNC110 - polling the watcher's state is the point
            await asyncio.sleep(0.005)


async def start(store: MemoryStore, *, check: float = 0.0
                ) -> tuple[LeaseWatcher, Metrics, asyncio.Task[None]]:
    """A watcher (own key 10.5.1.0/24) running and synced; `check`: its --lease-check-interval."""
    metrics = Metrics()

    async def on_peers(changes: PeerChanges, full: bool, started: float) -> None:
        return None

    watcher = LeaseWatcher(
        store, layout=KeyLayout("/coreos.com/network"), network=NETWORK,
        own_public_ip=IPv4Address("10.250.0.1"),
        own_key=lambda: PREFIX + "10.5.1.0-24", metrics=metrics, on_peers=on_peers,
        on_own=lambda kv, rev: None, check_seconds=check)
    task = asyncio.create_task(watcher.run())
    await until(watcher.synced.is_set)
    return watcher, metrics, task


def watcher_of(store: MemoryStore,
               on_peers: Callable[[PeerChanges, bool, float], Awaitable[None]]) -> LeaseWatcher:
    """A watcher with no key of its own, handing its passes to `on_peers`."""
    return LeaseWatcher(
        store, layout=KeyLayout("/coreos.com/network"), network=NETWORK,
        own_public_ip=IPv4Address("10.250.0.1"), own_key=lambda: None, metrics=Metrics(),
        on_peers=on_peers, on_own=lambda kv, rev: None)


def holder_ip(watcher: LeaseWatcher) -> str | None:
    peer = watcher.book.peers.get(SUBNET)
    return str(peer.public_ip) if peer else None


async def test_a_second_key_for_a_listed_subnet_is_a_skipped_duplicate() -> None:
    store = MemoryStore()
    await store.put(PREFIX + "10.5.3.0-24", lease("10.250.0.3"))
    await store.put(PREFIX + "10.5.3.0-24&fd00:5:3::-64", lease("10.250.0.9"))
    watcher, metrics, task = await start(store)
    try:
        assert holder_ip(watcher) == "10.250.0.3"  # the older key
        assert metrics.registry.get_sample_value(
            "leaseagent_invalid_leases_skipped_total", {"reason": "duplicate_subnet"}) == 1
        # Deleting the duplicate must not take the holder's peer away.
        await store.delete(PREFIX + "10.5.3.0-24&fd00:5:3::-64")
        await asyncio.sleep(0.05)
        assert holder_ip(watcher) == "10.250.0.3"
    finally:
        task.cancel()


async def test_a_duplicate_written_later_is_skipped_and_takes_over_when_the_holder_goes() -> None:
    store = MemoryStore()
    await store.put(PREFIX + "10.5.3.0-24", lease("10.250.0.3"))
    watcher, metrics, task = await start(store)
    try:
        await store.put(PREFIX + "10.5.3.0-024", lease("10.250.0.9"))
        await until(lambda: metrics.registry.get_sample_value(
            "leaseagent_invalid_leases_skipped_total", {"reason": "duplicate_subnet"}) == 1)
        assert holder_ip(watcher) == "10.250.0.3"
        await store.delete(PREFIX + "10.5.3.0-24")
        # The holder is gone; the remaining key holds the subnet at once (no re-list).
        await until(lambda: holder_ip(watcher) == "10.250.0.9")
    finally:
        task.cancel()


async def test_a_slow_data_plane_gets_the_changes_gathered_and_ends_in_the_book_peers() -> None:
    """While one pass is being programmed the stream is judged on: 60 additions and 40
    removals arriving during slow passes are programmed in a few passes, and what was
    programmed is the book's peer set (docs/benchmarks.md, mass removal)."""
    store = MemoryStore()
    programmed: dict[IPv4Network, object] = {}
    passes: list[int] = []

    async def on_peers(changes: PeerChanges, full: bool, started: float) -> None:
        passes.append(len(changes))
        await asyncio.sleep(0.05)  # a busy data plane
        for p in changes.removed:
            programmed.pop(p.subnet, None)
        for p in [*changes.added, *changes.changed]:
            programmed[p.subnet] = p

    watcher = watcher_of(store, on_peers)
    task = asyncio.create_task(watcher.run())
    try:
        await until(watcher.synced.is_set)
        for i in range(10, 70):
            await store.put(f"{PREFIX}10.5.{i}.0-24", lease(f"10.250.1.{i}"))
        for i in range(10, 50):
            await store.delete(f"{PREFIX}10.5.{i}.0-24")
        await until(lambda: programmed == dict(watcher.peers) and len(programmed) == 20)
        assert len(passes) < 10, passes
    finally:
        task.cancel()


async def test_a_burst_of_changes_is_programmed_in_gathered_passes_even_by_a_fast_data_plane(
        ) -> None:
    """A mass expiry brings a change a watch response, faster than one a pass: once
    changes come in a burst (BURST_CHANGES within BURST_SECONDS) a pass waits a moment so
    it takes many (4,900 deletions: 1.74 s -> 0.46-0.72 s after a bare watch, benchmarks).
    A change that comes alone is not held back."""
    store = MemoryStore()
    passes: list[int] = []

    async def on_peers(changes: PeerChanges, full: bool, started: float) -> None:
        passes.append(len(changes))  # a fast data plane: no await at all

    watcher = watcher_of(store, on_peers)
    task = asyncio.create_task(watcher.run())
    try:
        await until(watcher.synced.is_set)
        passes.clear()
        for i in range(10, 210):
            await store.put(f"{PREFIX}10.5.{i}.0-24", lease(f"10.250.1.{i}"))
            await asyncio.sleep(0)  # a watch response at a time, as etcd sends them
        await until(lambda: sum(passes) == 200)
        assert len(passes) < 50, passes
        await asyncio.sleep(2 * watching.BURST_SECONDS)
        assert not watcher._in_burst()  # a lone change later is programmed at once
    finally:
        task.cancel()


# --- the periodic check of the keys known against etcd's count -------------------------


class Forgetful(MemoryStore):
    """A store whose watch streams drop the events `forget` names, or (`stuck`) deliver
    nothing at all: what a watch behind etcd's gRPC proxy was seen to do."""

    def __init__(self) -> None:
        super().__init__()
        self.forget: set[str] = set()
        self.stuck = False
        self.censuses = 0

    async def census(self, prefix: str, *, changed_after: int, revision: int = 0):  # type: ignore[no-untyped-def]
        self.censuses += 1
        return await super().census(prefix, changed_after=changed_after, revision=revision)

    async def watch(self, prefix: str, *, start_revision: int):  # type: ignore[no-untyped-def]
        async for batch in super().watch(prefix, start_revision=start_revision):
            kept = [e for e in batch if e.key not in self.forget and not self.stuck]
            if kept:
                yield kept


def view_checks(metrics: Metrics) -> float:
    return metrics.registry.get_sample_value(
        "leaseagent_watch_relists_total", {"reason": "view_check"}) or 0.0


async def test_a_missed_join_and_a_missed_leave_are_listed_again() -> None:
    store = Forgetful()
    await store.put(PREFIX + "10.5.1.0-24", lease("10.250.0.1"))  # our own key: counted too
    await store.put(PREFIX + "10.5.2.0-24", lease("10.250.0.2"))
    watcher, metrics, task = await start(store, check=0.02)
    try:
        store.forget = {PREFIX + "10.5.3.0-24"}
        await store.put(PREFIX + "10.5.3.0-24", lease("10.250.0.3"))
        await store.put(PREFIX + "10.5.4.0-24", lease("10.250.0.4"))  # seen: the stream goes on
        await until(lambda: IPv4Network("10.5.4.0/24") in watcher.book.peers)
        await until(lambda: SUBNET in watcher.book.peers)  # the missed one, by a new listing
        assert view_checks(metrics) == 1
        store.forget = {PREFIX + "10.5.2.0-24"}
        await store.delete(PREFIX + "10.5.2.0-24")
        await until(lambda: IPv4Network("10.5.2.0/24") not in watcher.book.peers)
        assert view_checks(metrics) == 2
    finally:
        task.cancel()


async def test_a_missed_change_that_keeps_the_count_is_listed_again() -> None:
    """A lost write that changes a lease (a new PublicIP, as a new VtepMAC would) keeps the
    number of keys: the census's keys written since the last check show it."""
    store = Forgetful()
    await store.put(PREFIX + "10.5.3.0-24", lease("10.250.0.3"))
    watcher, metrics, task = await start(store, check=0.02)
    try:
        await asyncio.sleep(0.1)  # a few checks with nothing to find
        assert view_checks(metrics) == 0
        store.forget = {PREFIX + "10.5.3.0-24"}
        await store.put(PREFIX + "10.5.3.0-24", lease("10.250.9.3"))  # lost
        await store.put(PREFIX + "10.5.4.0-24", lease("10.250.0.4"))  # seen
        await until(lambda: str(watcher.book.peers[SUBNET].public_ip) == "10.250.9.3")
        assert view_checks(metrics) == 1
    finally:
        task.cancel()


async def test_a_missed_leave_and_join_in_one_stretch_are_listed_again() -> None:
    """One host gone and another come in the same lost stretch: the count is the same."""
    store = Forgetful()
    await store.put(PREFIX + "10.5.2.0-24", lease("10.250.0.2"))
    watcher, metrics, task = await start(store, check=0.02)
    try:
        store.forget = {PREFIX + "10.5.2.0-24", PREFIX + "10.5.3.0-24"}
        await store.delete(PREFIX + "10.5.2.0-24")
        await store.put(PREFIX + "10.5.3.0-24", lease("10.250.0.3"))
        await until(lambda: SUBNET in watcher.book.peers
                    and IPv4Network("10.5.2.0/24") not in watcher.book.peers)
        assert view_checks(metrics) >= 1
    finally:
        task.cancel()


async def test_a_stream_that_delivers_nothing_more_is_listed_again() -> None:
    store = Forgetful()
    await store.put(PREFIX + "10.5.2.0-24", lease("10.250.0.2"))
    watcher, metrics, task = await start(store, check=0.02)
    try:
        store.stuck = True
        await store.put(PREFIX + "10.5.3.0-24", lease("10.250.0.3"))
        await until(lambda: SUBNET in watcher.book.peers)
        assert view_checks(metrics) >= 1
    finally:
        task.cancel()


async def test_a_watch_that_misses_nothing_is_never_listed_again() -> None:
    store = Forgetful()
    watcher, metrics, task = await start(store, check=0.02)
    try:
        await store.put(PREFIX + "10.5.1.0-24", lease("10.250.0.1"))  # our own key
        for i in range(2, 60):  # churn through many checks: joins, changes, leaves
            await store.put(PREFIX + f"10.5.{i}.0-24", lease(f"10.250.0.{i}"))
            if i % 3 == 0:
                await store.put(PREFIX + f"10.5.{i}.0-24", lease(f"10.250.1.{i}"))
            if i % 4 == 0:
                await store.delete(PREFIX + f"10.5.{i - 2}.0-24")
            await asyncio.sleep(0.005)
        await store.put(PREFIX.rstrip("/") + "x/other", b"beside the prefix")
        await asyncio.sleep(0.1)
        asked = store.censuses
        await asyncio.sleep(0.3)  # ~15 checks with nothing changing
        assert view_checks(metrics) == 0
        assert store.censuses - asked <= 1  # a quiet prefix is asked its count alone
        assert len(watcher.book.peers) == 58 - 14
    finally:
        task.cancel()



async def test_the_first_listing_is_judged_with_the_keys_the_acquisition_parsed() -> None:
    """The listing handed over by the lease acquisition (Leasing.take_listing) comes with
    what its keys name: judged with those (not parsed again), the next listing parses."""
    store = MemoryStore()
    await store.put(PREFIX + "10.5.3.0-24", lease("192.168.64.3"))
    layout = KeyLayout("/coreos.com/network")
    listing = await store.list_prefix(layout.subnets_prefix)
    parsed = {PREFIX + "10.5.3.0-24": layout.parse_lease_key(PREFIX + "10.5.3.0-24")}
    watcher = LeaseWatcher(
        store, layout=layout, network=NETWORK, own_public_ip=IPv4Address("10.250.0.1"),
        own_key=lambda: None, metrics=Metrics(), on_peers=lambda *_: asyncio.sleep(0),
        on_own=lambda kv, rev: None, first=listing, parsed=parsed)
    task = asyncio.create_task(watcher.run())
    try:
        await until(watcher.synced.is_set)
        assert watcher.peers[SUBNET].subnet is parsed[PREFIX + "10.5.3.0-24"].ipv4
        await watcher.relist("test")
        assert watcher.peers[SUBNET].subnet == SUBNET
        assert watcher.peers[SUBNET].subnet is not parsed[PREFIX + "10.5.3.0-24"].ipv4
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_a_batch_of_deletions_is_gathered_in_order_with_the_changes_around_it() -> None:
    """The deletions in a row of one watch response are held down and folded as one
    change (a mass expiry); a key written again later in the same response still ends as
    a change of its peer, and one deleted after its new write as a removal."""
    store = MemoryStore()
    for n in (3, 4, 5, 6):
        await store.put(PREFIX + f"10.5.{n}.0-24", lease(f"192.168.64.{n}"))
    passes: list[PeerChanges] = []

    async def on_peers(changes: PeerChanges, full: bool, started: float) -> None:
        passes.append(changes)

    watcher = watcher_of(store, on_peers)
    task = asyncio.create_task(watcher.run())
    try:
        await until(watcher.synced.is_set)
        lease_id, _ = await store.grant(60)
        rewritten = KeyValue(PREFIX + "10.5.4.0-24", lease("192.168.64.44"), 20, 20, 1, lease_id)
        batch = [WatchEvent(EventType.DELETE, PREFIX + f"10.5.{n}.0-24", 10 + n)
                 for n in (3, 4, 5)]
        batch += [WatchEvent(EventType.PUT, rewritten.key, 20, rewritten),
                  WatchEvent(EventType.DELETE, PREFIX + "10.5.6.0-24", 21)]
        async with watcher.gate:
            watcher._apply_events(batch)
        await until(lambda: len(passes) == 2)
        last = passes[-1]
        assert sorted(str(p.subnet) for p in last.removed) == [
            "10.5.3.0/24", "10.5.5.0/24", "10.5.6.0/24"]
        assert [(str(p.subnet), str(p.public_ip)) for p in last.changed] == [
            ("10.5.4.0/24", "192.168.64.44")]
        assert not last.added
        assert sorted(str(s) for s in watcher.peers) == ["10.5.4.0/24"]
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_leases_expiring_together_are_one_pass_of_their_removals() -> None:
    """A response of deletions only (an etcd lease revoked: its keys in one revision):
    one pass removes each of their peers once, and the other peers stay; they are judged
    with the cyclic collector paused."""
    store = MemoryStore()
    lease_id, _ = await store.grant(60)
    for n in (3, 4, 5):
        await store.create(PREFIX + f"10.5.{n}.0-24", lease(f"192.168.64.{n}"), lease=lease_id)
    await store.put(PREFIX + "10.5.6.0-24", lease("192.168.64.6"))
    passes: list[PeerChanges] = []

    async def on_peers(changes: PeerChanges, full: bool, started: float) -> None:
        passes.append(changes)

    watcher = watcher_of(store, on_peers)
    collecting: list[bool] = []  # whether the cyclic collector ran as each was judged
    delete = watcher.book.delete

    def spying(key: str) -> PeerChanges:
        collecting.append(gc.isenabled())
        return delete(key)

    watcher.book.delete = spying  # type: ignore[method-assign]
    task = asyncio.create_task(watcher.run())
    try:
        await until(watcher.synced.is_set)
        listed = len(passes)
        await store.revoke(lease_id)
        await until(lambda: len(passes) == listed + 1)
        await asyncio.sleep(0.05)  # no second pass
        assert len(passes) == listed + 1
        gone = passes[-1]
        assert sorted(str(p.subnet) for p in gone.removed) == [
            "10.5.3.0/24", "10.5.4.0/24", "10.5.5.0/24"]
        assert not gone.added and not gone.changed
        assert sorted(str(s) for s in watcher.peers) == ["10.5.6.0/24"]
        # Judged with the collector paused (leaseagent.memory.collector_paused), and it
        # runs again after.
        assert collecting == [False] * 3
        assert gc.isenabled()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def relists_of(metrics: Metrics, reason: str) -> float:
    return metrics.registry.get_sample_value(
        "leaseagent_watch_relists_total", {"reason": reason}) or 0.0


async def test_after_an_outage_a_stream_that_delivered_since_is_not_listed_again() -> None:
    """etcd found down by another part (the config key's quiet watch given up on a starved
    host, seen in bench.cluster at 2,500 hosts) while this stream delivered: no listing of
    the whole prefix when etcd answers again. A stream that brought nothing since the
    outage began may be half-open: listed again if etcd changed the prefix meanwhile
    (here a write the stream lost), not if it did not (a renewal's timeout at a paused
    member, say: no listing of every lease for it)."""
    store = Forgetful()
    watcher, metrics, task = await start(store)  # no periodic check: the outage's alone
    try:
        began = time.monotonic()
        await store.put(PREFIX + "10.5.2.0-24", lease("10.250.0.2"))
        await until(lambda: IPv4Network("10.5.2.0/24") in watcher.book.peers)
        watcher.relist_after_outage(began)
        await asyncio.sleep(0.05)
        assert relists_of(metrics, "etcd_recovered") == 0
        await store.put(PREFIX.rstrip("/") + "x/other", b"etcd's revision moves on")
        watcher.relist_after_outage(time.monotonic())  # nothing heard since; nothing changed
        await asyncio.sleep(0.05)
        assert relists_of(metrics, "etcd_recovered") == 0
        store.forget = {PREFIX + "10.5.3.0-24"}
        await store.put(PREFIX + "10.5.3.0-24", lease("10.250.0.3"))  # lost in the outage
        watcher.relist_after_outage(time.monotonic())
        await until(lambda: relists_of(metrics, "etcd_recovered") == 1)
        await until(lambda: SUBNET in watcher.book.peers)
        store.forget = {PREFIX + "10.5.2.0-24"}
        await store.put(PREFIX + "10.5.2.0-24", lease("10.250.9.2"))  # a change: same count
        watcher.relist_after_outage(time.monotonic())
        await until(lambda: relists_of(metrics, "etcd_recovered") == 2)
    finally:
        task.cancel()
