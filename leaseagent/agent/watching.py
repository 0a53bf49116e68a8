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
When our own subnet changes, or etcd comes back after an outage (a stream
that lived through it may be half-open), the prefix is listed again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from ipaddress import IPv4Address

from leaseagent.core.backends import BACKEND_TYPES
from leaseagent.core.leases import Identity, KeyLayout, LeaseBook, PeerChanges
from leaseagent.core.network import NetworkConfig
from leaseagent.metrics import Metrics
from leaseagent.store.base import EventType, KeyValue, LeaseStore, WatchEvent
from leaseagent.store.watching import ListWatch, Snapshot

log = logging.getLogger("leaseagent.watching")

OnPeers = Callable[[PeerChanges, bool, float], Awaitable[None]]
OnOwn = Callable[[KeyValue | None, int], None]


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
    ) -> None:
        self._layout = layout
        self._own_ip = own_public_ip
        self._own_key = own_key
        self._metrics = metrics
        self._on_peers = on_peers
        self._on_own = on_own
        self.book = LeaseBook(layout=layout, network=network, identity=self._identity())
        self.synced = asyncio.Event()  # set after the first complete list is applied
        self._engine = ListWatch(store, layout.subnets_prefix, on_unavailable=on_unavailable)

    def _identity(self) -> Identity:
        return Identity(public_ip=self._own_ip, own_key=self._own_key())

    def request_relist(self, reason: str) -> None:
        self._engine.request_relist(reason)

    def _report_rejected(self) -> None:
        for verdict in self.book.rejected:
            assert verdict.reason is not None
            self._metrics.invalid_leases.labels(reason=verdict.reason).inc()
            log.warning("skipping invalid lease %s: %s", verdict.key, verdict.detail)

    def _update_gauges(self) -> None:
        for backend in BACKEND_TYPES:
            self._metrics.peers.labels(backend=backend).set(self.book.counts.get(backend, 0))

    async def _apply_listing(self, snapshot: Snapshot) -> None:
        started = time.perf_counter()
        identity = self._identity()
        own = [kv for kv in snapshot.items if kv.key == identity.own_key]
        if identity.own_key is not None:
            self._on_own(own[0] if own else None, snapshot.revision)
        changes = self.book.reset(
            [kv for kv in snapshot.items if kv.key != identity.own_key], identity=identity)
        self._report_rejected()
        self._update_gauges()
        await self._on_peers(changes, True, started)
        self.synced.set()

    async def _apply_events(self, batch: list[WatchEvent]) -> None:
        started = time.perf_counter()
        own_key = self._own_key()  # the book learns a new one at the re-list that follows
        changes = PeerChanges()
        for ev in batch:
            self._metrics.watch_events.labels(type=ev.type.value).inc()
            if ev.key == own_key:
                self._on_own(ev.kv if ev.type is EventType.PUT else None, ev.revision)
                continue
            if ev.type is EventType.PUT and ev.kv is not None:
                changes.extend(self.book.put(ev.kv))
            else:
                changes.extend(self.book.delete(ev.key))
            self._report_rejected()
        if changes:
            self._update_gauges()
            await self._on_peers(changes, False, started)

    async def run(self) -> None:
        async for item in self._engine.stream():
            if isinstance(item, Snapshot):
                if item.reason != "start":
                    self._metrics.relists.labels(reason=item.reason).inc()
                    log.info("listing leases again (%s)", item.reason.replace("_", " "))
                await self._apply_listing(item)
            else:
                await self._apply_events(item.events)
