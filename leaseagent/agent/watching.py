"""Keeping the peer set equal to etcd's leases: the one engine, judged by the one rule.

The store layer's list -> watch -> re-list engine (leaseagent.store.watching)
delivers complete listings and event batches; the lease layer's `LeaseBook`
(leaseagent.core.leases) judges them exactly as `leasectl list` and
`leasectl doctor` judge a listing, and says what changed in the peer set.
One range request lists the whole prefix (flannel spends one request per
lease); the watch then carries every change; nothing is removed on a
partial view, only on a complete listing or an event.

Invalid and duplicate keys are skipped, counted once per key version and
logged once. Events on this host's own key go to `on_own` (the lease holder
decides), with the revision they were seen at (the event's, or the
listing's), so the holder can ignore news older than its own last write.
When our own subnet changes the prefix is listed again; when etcd comes back
after an outage through which the stream brought nothing (it may be half-open),
if etcd changed the prefix meanwhile (leaseagent.agent.viewcheck).

A peer whose key is deleted, or that a listing no longer has, is held in the
kernel for `--peer-hold-time` seconds (leaseagent.core.holddown): a lease
taken back within that time (a mass expiry when a paused etcd resumes) costs
no packet. `peers` is what the data plane must program: the valid peers
plus the held ones.

When the network config changes (`set_network`), the book judges with the
new config from then on and the agent lists the prefix again (`relist`), so
every key is judged anew; a peer the new config no longer admits (its subnet outside the
new network, say) is removed like one a listing no longer has: after the
hold time, so a host moving to a new subnet has its new entries in place
before its old ones go. `relist()` waits until such a listing is applied.
`gate` is held while a listing or an event batch is judged and applied: the
agent takes it while it changes its own key on purpose, so no event is judged
against a key that is about to change.

Every `check_seconds` the watcher's view is checked against etcd, and listed again
if a watch event was missed (leaseagent.agent.viewcheck).

A key naming this host's PublicIP *and* node id that is not ours is a second
agent with this host's identity (a cloned machine, or the agent started
twice): `on_twin` is told, once per key version.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from ipaddress import IPv4Address, IPv4Network

from leaseagent import memory
from leaseagent.agent.viewcheck import ViewCheck
from leaseagent.core.holddown import HoldDown
from leaseagent.core.leases import (
    Identity,
    KeyLayout,
    LeaseBook,
    Peer,
    PeerChanges,
    PendingChanges,
    SubnetKey,
    Verdict,
)
from leaseagent.core.network import NetworkConfig
from leaseagent.core.profiles import BACKEND_TYPES
from leaseagent.metrics import Metrics
from leaseagent.store.base import EventType, KeyValue, LeaseStore, Listing, WatchEvent
from leaseagent.store.watching import ENGINE_REASONS, ListWatch, Snapshot
from leaseagent.waiting import first_to_end, within

log = logging.getLogger("leaseagent.watching")

OnPeers = Callable[[PeerChanges, bool, float], Awaitable[None]]
OnOwn = Callable[[KeyValue | None, int], None]
OnTwin = Callable[[Verdict], None]
# Why the prefix is listed again: the engine's reasons, and the agent's own requests.
RELIST_REASONS = (*ENGINE_REASONS, "etcd_recovered", "own_subnet_changed", "config_changed",
                  "view_check")
# A burst (a mass expiry, the end of a partition) is BURST_CHANGES watch responses with
# changes within BURST_SECONDS; a pass in one waits BURST_GATHER_SECONDS first, so the
# stream is read on and the pass takes more than the change or two a response brings.
# Changes that come one at a time (a host joining, a client that writes after seeing the
# last change programmed) are programmed at once (figures: docs/benchmarks.md, "Mass
# removal").
BURST_CHANGES = 3
BURST_SECONDS = 0.005
BURST_GATHER_SECONDS = 0.01


def _log_held(changes: PeerChanges, out: PeerChanges, seconds: float) -> None:
    """Say which removed peers the hold-down kept (one line for a crowd)."""
    now_removed = {peer.subnet for peer in out.removed}
    held = [peer for peer in changes.removed if peer.subnet not in now_removed]
    if len(held) > 20:
        log.info("%d peers gone; their entries are held for %gs in case they come back",
                 len(held), seconds)
        return
    for peer in held:
        log.info("peer %s gone; its entries are held for %gs in case it comes back",
                 peer.subnet, seconds)


class LeaseWatcher:
    def __init__(
        self,
        store: LeaseStore,
        *,
        layout: KeyLayout,
        network: NetworkConfig,
        own_public_ip: IPv4Address,
        own_key: Callable[[], str | None],
        metrics: Metrics,
        on_peers: OnPeers,
        on_own: OnOwn,
        on_unavailable: Callable[[BaseException], None] | None = None,
        on_listed: Callable[[], None] | None = None,
        node_id: str | None = None,
        on_twin: OnTwin | None = None,
        hold_seconds: float = 0.0,
        first: Listing | None = None,
        parsed: Mapping[str, SubnetKey] | None = None,
        check_seconds: float = 0.0,
    ) -> None:
        self._layout = layout
        self._store = store
        self._check = ViewCheck(self, store, layout.subnets_prefix, check_seconds)
        self._seen = 0  # the revision the book is complete up to (listing, events)
        self._listed_at = 0  # the revision of the last listing
        self.heard_at = 0.0  # when the stream last brought a listing or events (monotonic)
        # Our own key and the revision of its last write, as the stream last said.
        self._own_present: tuple[str, int] | None = None
        self._own_ip = own_public_ip
        self._own_key = own_key
        self._node_id = node_id
        self._on_twin = on_twin
        self.hold = HoldDown(hold_seconds)
        self._hold_changed = asyncio.Event()
        self._metrics = metrics
        self._on_peers = on_peers
        self._on_own = on_own
        self._on_listed = on_listed
        self._oversize: dict[str, int] = {}  # keys too large to fetch, as last reported
        # What the keys of `first` name, parsed already (Leasing.take_listing): read by the
        # first listing's judging, then dropped.
        self._parsed = parsed
        self.book = LeaseBook(layout=layout, network=network, identity=self._identity())
        self.synced = asyncio.Event()  # set after the first complete list is applied
        self.gate = asyncio.Lock()
        self._listings = 0  # complete listings applied so far
        self._listed = asyncio.Event()  # set each time one is
        # Judged but not programmed yet (see `_program`): the changes, folded; how many
        # listings they hold (a listing makes the next pass a full one); when the oldest
        # arrived.
        self._pending = PendingChanges()
        self._pending_listings = 0
        self._pending_since: float | None = None
        self._queued_at: deque[float] = deque(maxlen=BURST_CHANGES)  # the last few _queue()s
        self._work = asyncio.Event()
        self._engine = ListWatch(store, layout.subnets_prefix, on_unavailable=on_unavailable,
                                 first=first)

    def _identity(self) -> Identity:
        return Identity(public_ip=self._own_ip, own_key=self._own_key())

    def request_relist(self, reason: str) -> None:
        self._engine.request_relist(reason)

    def relist_after_outage(self, began: float) -> None:
        """etcd answers again after an outage found at `began` (monotonic): a stream that
        lived through it may be half-open, so the prefix is listed again if etcd changed
        it since the revision seen (ViewCheck.after_outage: a count, and the keys written
        since only if etcd's revision moved), unless the stream has brought something
        since (it is alive, and in order: another part found etcd down, e.g. the config
        key's quiet watch given up on a starved host while this one delivered)."""
        if self.heard_at < began:
            self._check.after_outage()

    def set_network(self, network: NetworkConfig) -> None:
        """Judge with `network` from now on (events at once; `relist` so that every key
        is judged by it)."""
        self.book.network = network

    async def relist(self, reason: str) -> None:
        """List again, and return once a listing asked for after this call is applied."""
        wanted = self._listings + 1
        self.request_relist(reason)
        while self._listings < wanted:
            self._listed.clear()
            await self._listed.wait()

    @property
    def peers(self) -> Mapping[IPv4Network, Peer]:
        """What the data plane must program: the valid peers, and the held ones."""
        if not len(self.hold):
            return self.book.peers
        return {**self.hold.held, **self.book.peers}

    def _report_rejected(self) -> None:
        for verdict in self.book.rejected:
            assert verdict.reason is not None
            value = verdict.value
            if verdict.reason == "released":
                log.info("peer %s released its lease (%s)", verdict.subnet, verdict.key)
                continue
            if (verdict.reason == "public_ip_is_ours" and value is not None
                    and self._node_id is not None and value.node_id == self._node_id):
                if self._on_twin is not None:
                    self._on_twin(verdict)
                continue
            self._metrics.invalid_leases.labels(reason=verdict.reason).inc()
            log.warning("skipping invalid lease %s: %s", verdict.key, verdict.detail)

    def _report_oversize(self, oversize: list[KeyValue]) -> None:
        """Keys a listing could not fetch (a value over gRPC's receive limit): skipped like
        any invalid lease (too_large), counted and logged once per version of the key."""
        seen = {kv.key: kv.mod_revision for kv in oversize}
        for kv in oversize:
            if self._oversize.get(kv.key) != kv.mod_revision:
                self._metrics.invalid_leases.labels(reason="too_large").inc()
                log.warning("skipping invalid lease %s: its value is too large to receive "
                            "(over gRPC's 4 MiB message limit)", kv.key)
        self._oversize = seen

    def _held(self, changes: PeerChanges, *, hold_removals: bool) -> PeerChanges:
        held_before = len(self.hold)
        out = self.hold.filter(changes, now=time.monotonic(), hold_removals=hold_removals)
        if len(self.hold) != held_before:
            self._hold_changed.set()
        if len(out.removed) != len(changes.removed):
            _log_held(changes, out, self.hold.seconds)
        return out

    def _update_gauges(self) -> None:
        for backend in BACKEND_TYPES:
            self._metrics.peers.labels(backend=backend).set(self.book.counts.get(backend, 0))

    def _apply_listing(self, snapshot: Snapshot) -> None:
        started = time.perf_counter()
        identity = self._identity()
        own = [kv for kv in snapshot.items if kv.key == identity.own_key]
        self._seen = self._listed_at = snapshot.revision
        self._own_present = (own[0].key, own[0].mod_revision) if own else None
        if identity.own_key is not None:
            self._on_own(own[0] if own else None, snapshot.revision)
        parsed, self._parsed = self._parsed, None
        changes = self._held(self.book.reset(
            [kv for kv in snapshot.items if kv.key != identity.own_key], identity=identity,
            parsed=parsed), hold_removals=True)
        self._report_rejected()
        self._report_oversize(snapshot.oversize)
        self._update_gauges()
        self._queue(changes, started, listing=True)
        if self._on_listed is not None:
            self._on_listed()

    def _apply_events(self, batch: list[WatchEvent]) -> None:
        started = time.perf_counter()
        own_key = self._own_key()  # the book learns a new one at the re-list that follows
        changes = PendingChanges()
        # Peers whose key was deleted, in a row: held down and gathered as one change, not
        # one per event (a mass expiry is thousands of deletions in one batch). Added to
        # `changes` before any other change, so that they are folded in order.
        gone: list[Peer] = []
        puts = 0  # the events counted by type once per batch (a mass expiry is thousands)
        for ev in batch:
            puts += ev.type is EventType.PUT
            self._seen = max(self._seen, ev.revision)
            if ev.key == own_key:
                self._own_present = (own_key, ev.revision) if ev.type is EventType.PUT else None
                self._on_own(ev.kv if ev.type is EventType.PUT else None, ev.revision)
                continue
            if ev.type is EventType.PUT and ev.kv is not None:
                # A key changed to something that is no peer (invalid, released): at once.
                changed = self.book.put(ev.kv)
                hold_removals = False
            else:
                changed = self.book.delete(ev.key)
                if not changed.added and not changed.changed and not self.book.rejected:
                    gone += changed.removed  # nothing, for a key that named no peer
                    continue
                hold_removals = True
            if gone:
                changes.add(self._held(PeerChanges(removed=gone), hold_removals=True))
                gone = []
            if changed:
                changes.add(self._held(changed, hold_removals=hold_removals))
            if self.book.rejected:
                self._report_rejected()
        only_gone = PeerChanges()
        if gone:
            held = self._held(PeerChanges(removed=gone), hold_removals=True)
            if changes:
                changes.add(held)
            else:  # only deletions (a mass expiry): folded once, by `_queue`, not twice
                only_gone = held
        for etype, count in ((EventType.PUT, puts), (EventType.DELETE, len(batch) - puts)):
            if count:
                self._metrics.watch_events.labels(type=etype.value).inc(count)
        # The counts change with no change to program too (a removal held down).
        self._update_gauges()
        if changes:
            self._queue(changes.take(), started)
        elif only_gone:
            self._queue(only_gone, started)

    def _queue(self, changes: PeerChanges, started: float, *, listing: bool = False) -> None:
        """Hand judged changes to `_program` (a listing makes its next pass a full one)."""
        self._pending.add(changes)
        self._pending_listings += listing
        if self._pending_since is None:
            self._pending_since = started
        self._queued_at.append(time.monotonic())
        self._work.set()

    async def _program(self) -> None:
        """Program what was judged, everything gathered since the last pass at once: while
        the data plane works on one pass, the stream is judged on and the next gathers
        (a mass expiry, a partition's end), instead of a pass per watch response. A pass
        holding a listing is a full one (level-triggered: it programs the whole peer set,
        whatever the changes say)."""
        while True:
            await self._work.wait()
            if self._in_burst():
                await asyncio.sleep(BURST_GATHER_SECONDS)
            self._work.clear()
            changes, listings, started = (self._pending.take(), self._pending_listings,
                                          self._pending_since or time.perf_counter())
            self._pending_listings, self._pending_since = 0, None
            if not changes and not listings:
                continue
            await self._on_peers(changes, listings > 0, started)
            if listings:
                self.synced.set()
                self._listings += listings
                self._listed.set()

    def _in_burst(self) -> bool:
        queued = self._queued_at
        return (len(queued) == BURST_CHANGES
                and time.monotonic() - queued[0] < BURST_SECONDS)

    async def _follow(self) -> None:
        async for item in self._engine.stream():
            self.heard_at = time.monotonic()
            async with self.gate:
                if isinstance(item, Snapshot):
                    if item.reason != "start":
                        self._metrics.relists.labels(reason=item.reason).inc()
                        log.info("listing leases again (%s)", item.reason.replace("_", " "))
                    self._apply_listing(item)
                else:
                    with memory.collector_paused():  # a mass expiry: thousands judged
                        self._apply_events(item.events)
            del item  # a listing is not kept while the stream waits

    async def _expire_held(self) -> None:
        """Remove each held peer when its time is up (unless its lease came back)."""
        while True:
            self._hold_changed.clear()
            deadline = self.hold.next_deadline()
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                await within(self._hold_changed.wait(), wait)
                continue
            except TimeoutError:
                pass
            due = self.hold.due(time.monotonic())
            if due:
                for peer in due:
                    log.info("peer %s did not come back within %gs; removing its entries",
                             peer.subnet, self.hold.seconds)
                self._queue(PeerChanges(removed=due), time.perf_counter())

    def view(self, after: int) -> tuple[int, int, dict[str, int]]:
        """What the watcher knows (hold `gate`): the revision it is complete up to, how
        many keys under the prefix (the book's, our own, too large), and those of them
        last written after `after` with that write's revision."""
        written = {key: rev for key, rev in self._oversize.items() if rev > after}
        written.update(self.book.written_after(after))
        if self._own_present is not None and self._own_present[1] > after:
            written[self._own_present[0]] = self._own_present[1]
        known = self.book.keys_known() + (self._own_present is not None) + len(self._oversize)
        return self._seen, known, written

    @property
    def listed_at(self) -> int:
        """The revision of the last listing."""
        return self._listed_at

    async def run(self) -> None:
        await first_to_end(self._follow(), self._expire_held(), self._program(),
                           self._check.run())
