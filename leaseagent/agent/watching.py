"""Keeping the peer table equal to etcd: list, then watch from the list's revision + 1.

One range request lists the whole subnets prefix (flannel spends one request
per lease); the watch then carries every change. On compaction, a lost
stream, or a request from elsewhere (etcd came back after an outage, so a
half-open stream may be stale; our own subnet changed) the prefix is listed
again and diffed against the table: no add or remove is ever missed, and
nothing is removed on a partial view.

Invalid leases are skipped, counted once per key version and logged once.
Events on this host's own key go to `on_own` (the lease holder decides),
with the revision they were seen at (the event's, or the listing's), so the
holder can ignore news older than its own last write of the key.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from ipaddress import IPv4Address, IPv4Network

from leaseagent.agent.retry import store_retrying
from leaseagent.core.lease import (
    InvalidLease,
    Peer,
    decode_lease_value,
    parse_lease_key,
    validate_peer,
)
from leaseagent.core.network import NetworkConfig
from leaseagent.core.peers import PeerChanges, PeerTable
from leaseagent.errors import Compacted, StoreUnavailable
from leaseagent.metrics import Metrics
from leaseagent.store.base import EventType, KeyValue, LeaseStore, WatchEvent

log = logging.getLogger("leaseagent.watching")

OnPeers = Callable[[PeerChanges, bool, float], Awaitable[None]]
OnOwn = Callable[[KeyValue | None, int], None]


class LeaseWatcher:
    def __init__(
        self,
        store: LeaseStore,
        *,
        subnets_prefix: str,
        network: NetworkConfig,
        own_public_ip: IPv4Address,
        own_key: Callable[[], str | None],
        metrics: Metrics,
        on_peers: OnPeers,
        on_own: OnOwn,
    ) -> None:
        self._store = store
        self._prefix = subnets_prefix
        self._network = network
        self._own_ip = own_public_ip
        self._own_key = own_key
        self._metrics = metrics
        self._on_peers = on_peers
        self._on_own = on_own
        self.table = PeerTable()
        self.synced = asyncio.Event()  # set after the first complete list is applied
        self._relist = asyncio.Event()
        self._relist_reason = "requested"
        self._invalid_seen: dict[str, tuple[int, str]] = {}
        # Which key the table's peer for a subnet came from. Two keys can name one
        # subnet (`10.5.3.0-24` and `10.5.3.0-24&fd00::-64`): the oldest wins, the
        # others are skipped as duplicates, and deleting one never removes the other's peer.
        self._key_for: dict[IPv4Network, str] = {}
        self._duplicates: dict[IPv4Network, set[str]] = {}

    def request_relist(self, reason: str) -> None:
        self._relist_reason = reason
        self._relist.set()

    def _skip(self, kv: KeyValue, exc: InvalidLease) -> None:
        """Count and log an invalid lease once per version of its key."""
        if self._invalid_seen.get(kv.key, (0, ""))[0] != kv.mod_revision:
            self._invalid_seen[kv.key] = (kv.mod_revision, exc.reason)
            self._metrics.invalid_leases.labels(reason=exc.reason).inc()
            log.warning("skipping invalid lease %s: %s", kv.key, exc.detail)

    def _duplicate(self, kv: KeyValue, subnet: IPv4Network, holder: str) -> None:
        self._duplicates.setdefault(subnet, set()).add(kv.key)
        self._skip(kv, InvalidLease("duplicate_subnet",
                                    f"{subnet} is already held under key {holder}"))

    def _decode(self, kv: KeyValue) -> Peer | None:
        try:
            subnet = parse_lease_key(kv.key, self._prefix)
            own_key = self._own_key()
            if own_key is not None and subnet == self._subnet_of(own_key):
                # Another key naming our subnet (e.g. `<ours>-24&fd00::-64` or `-024`):
                # programming it would route our own subnet to someone else.
                raise InvalidLease("own_subnet", f"key {kv.key} names this host's subnet {subnet}")
            return validate_peer(
                subnet, decode_lease_value(kv.value),
                network=self._network, own_public_ip=self._own_ip)
        except InvalidLease as exc:
            self._skip(kv, exc)
            return None

    def _subnet_of(self, key: str) -> IPv4Network | None:
        try:
            return parse_lease_key(key, self._prefix)
        except InvalidLease:
            return None

    async def _apply_listing(self, items: list[KeyValue], revision: int) -> None:
        started = time.perf_counter()
        own_key = self._own_key()
        snapshot: dict[IPv4Network, Peer] = {}
        self._key_for, self._duplicates = {}, {}
        present = set()
        for kv in sorted(items, key=lambda kv: (kv.create_revision, kv.key)):
            present.add(kv.key)
            if kv.key == own_key:
                self._on_own(kv, revision)
                continue
            peer = self._decode(kv)
            if peer is None:
                continue
            if peer.subnet in snapshot:
                self._duplicate(kv, peer.subnet, self._key_for[peer.subnet])
                continue
            snapshot[peer.subnet] = peer
            self._key_for[peer.subnet] = kv.key
        for key in [k for k in self._invalid_seen if k not in present]:
            del self._invalid_seen[key]
        if own_key is not None and own_key not in present:
            self._on_own(None, revision)
        changes = self.table.replace(snapshot)
        self._update_gauges()
        await self._on_peers(changes, True, started)
        self.synced.set()

    def _update_gauges(self) -> None:
        counts: dict[str, int] = {}
        for peer in self.table.peers.values():
            counts[peer.backend_type] = counts.get(peer.backend_type, 0) + 1
        for backend in ("vxlan", "host-gw", "alloc"):
            self._metrics.peers.labels(backend=backend).set(counts.get(backend, 0))

    async def _apply_events(self, batch: list[WatchEvent]) -> None:
        started = time.perf_counter()
        own_key = self._own_key()
        changes = PeerChanges()
        for ev in batch:
            self._metrics.watch_events.labels(type=ev.type.value).inc()
            if ev.key == own_key:
                self._on_own(ev.kv if ev.type is EventType.PUT else None, ev.revision)
                continue
            subnet = self._subnet_of(ev.key)
            if ev.type is EventType.DELETE or ev.kv is None:
                self._invalid_seen.pop(ev.key, None)
                if subnet is not None:
                    changes.extend(self._forget(subnet, ev.key))
                continue
            peer = self._decode(ev.kv)
            holder = self._key_for.get(subnet) if subnet is not None else None
            if peer is not None and holder not in (None, ev.key):
                assert holder is not None
                self._duplicate(ev.kv, peer.subnet, holder)
            elif peer is not None:
                changes.extend(self.table.put(peer))
                self._key_for[peer.subnet] = ev.key
            elif subnet is not None:
                # A valid peer turned invalid: stop programming it.
                changes.extend(self._forget(subnet, ev.key))
        if changes:
            self._update_gauges()
            await self._on_peers(changes, False, started)

    def _forget(self, subnet: IPv4Network, key: str) -> PeerChanges:
        """`key` no longer gives a valid peer for `subnet`: drop the peer if it came from it."""
        others = self._duplicates.get(subnet, set())
        others.discard(key)
        if self._key_for.get(subnet) != key:
            return PeerChanges()
        del self._key_for[subnet]
        if others:
            # A skipped duplicate may be valid now that the holder is gone: a list decides.
            self.request_relist("duplicate_released")
        return self.table.remove(subnet)

    async def _consume(self, start_revision: int) -> None:
        async for batch in self._store.watch(self._prefix, start_revision=start_revision):
            await self._apply_events(batch)

    async def run(self) -> None:
        while True:
            listing = None
            async for attempt in store_retrying(cap=5.0):
                with attempt:
                    listing = await self._store.list_prefix(self._prefix)
            assert listing is not None
            self._relist.clear()
            await self._apply_listing(listing.items, listing.revision)
            consume = asyncio.create_task(self._consume(listing.revision + 1))
            wait_relist = asyncio.create_task(self._relist.wait())
            try:
                done, _ = await asyncio.wait(
                    {consume, wait_relist}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in (consume, wait_relist):
                    task.cancel()
                await asyncio.gather(consume, wait_relist, return_exceptions=True)
            if consume in done and not consume.cancelled():
                exc = consume.exception()
                if isinstance(exc, Compacted):
                    reason = "compacted"
                elif isinstance(exc, StoreUnavailable):
                    reason = "stream_lost"
                    await asyncio.sleep(0.5)
                elif exc is None:
                    reason = "stream_ended"
                else:
                    raise exc
            else:
                reason = self._relist_reason
            self._metrics.relists.labels(reason=reason).inc()
            log.info("listing leases again (%s)", reason.replace("_", " "))
