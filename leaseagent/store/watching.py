"""Keeping up with a prefix: list, then watch from the list's revision + 1, list again.

The one list -> watch -> re-list engine, used by the agent's lease watcher
and by `leasectl watch` (flannel pairs its WatchLeases with a lease watcher
the same way). `ListWatch(store, prefix).stream()` yields, forever:

- `Snapshot(items, revision, reason)`: a complete listing in one range
  request (the first may be one the caller made already: `first`, e.g. the
  agent's acquisition of its lease, so start-up lists the prefix once). `reason`
  says why it was taken: "start", "compacted" (the watch
  asked for history etcd no longer keeps), "stream_lost" (etcd went away and
  the adapter could not resume the stream), "stream_behind" (a lost stream
  would have resumed too far behind to trust: the adapter's Behind),
  "stream_missed" (a silent stream is past a change it did not send: the
  adapter's Missed),
  "stream_ended", or the reason
  given to `request_relist` (e.g. the caller knows etcd came back, so a
  stream that lived through the outage may be half-open);
- `Events(events)`: a batch of watch events after the latest snapshot.

A consumer that diffs each snapshot against what it knew never misses an
add or a remove, and never acts on a partial view: nothing is inferred
from a stream that broke, only from the next complete listing. The engine
keeps no listing while it watches (a consumer should not either: 5,000 keys
are ~2 MiB).

Failed listings are retried with the project's policy (leaseagent.retrying);
`on_unavailable(exc)` is told of every failed attempt (log it once per
state, not per attempt). Before the first complete listing, errors other
than an unreachable etcd propagate (a wrong setting is said at once); after
it, no store error stops the stream (a permission revoked, a response etcd
cannot give): it is reported and the listing retried, the consumer keeps
what it has. A ConfigError (the password no longer valid) still propagates.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import cast

from leaseagent.errors import Behind, Compacted, Missed, StoreError, StoreUnavailable, TooLarge
from leaseagent.retrying import Backoff, retrying
from leaseagent.store.base import KeyValue, LeaseStore, Listing, WatchEvent
from leaseagent.waiting import first_to_end

# Why the engine lists again by itself (`Snapshot.reason` past the first, "start").
ENGINE_REASONS = ("compacted", "stream_lost", "stream_behind", "stream_missed", "stream_ended")


@dataclass(frozen=True)
class Snapshot:
    items: list[KeyValue]
    revision: int
    reason: str
    oversize: list[KeyValue] = field(default_factory=list)  # as in Listing


@dataclass(frozen=True)
class Events:
    events: list[WatchEvent]


class ListWatch:
    def __init__(
        self,
        store: LeaseStore,
        prefix: str,
        *,
        on_unavailable: Callable[[BaseException], None] | None = None,
        first: Listing | None = None,
    ) -> None:
        self._store = store
        self._prefix = prefix
        self._on_unavailable = on_unavailable
        self._first = first
        self._relist = asyncio.Event()
        self._relist_reason = "requested"
        self._backoff = Backoff()
        self._listed = False  # a complete listing was had (given or made)

    def request_relist(self, reason: str) -> None:
        """List again as soon as the consumer asks for the next item."""
        self._relist_reason = reason
        self._relist.set()

    async def _list(self) -> Listing:
        retry_on = (StoreError,) if self._listed else (StoreUnavailable,)
        async for attempt in retrying(on_retry=self._on_unavailable, retry_on=retry_on):
            with attempt:
                listing = await self._store.list_prefix(self._prefix)
        self._listed = True
        return listing

    async def stream(self) -> AsyncIterator[Snapshot | Events]:
        reason = "start"
        while True:
            if self._first is not None:
                self._listed = True
            listing, self._first = self._first or await self._list(), None
            self._relist.clear()
            revision = listing.revision
            yield Snapshot(listing.items, revision, reason, listing.oversize)
            del listing  # applied by now: not kept while watching
            watch = self._store.watch(self._prefix, start_revision=revision + 1)
            try:
                while True:
                    if self._relist.is_set():
                        reason = self._relist_reason
                        break
                    batch = await self._next(watch)
                    if batch is None:
                        reason = self._relist_reason
                        break
                    self._backoff.reset()
                    yield Events(batch)
            except StopAsyncIteration:
                reason = "stream_ended"
            except Compacted:
                reason = "compacted"
            except Behind:
                reason = "stream_behind"  # not an outage: etcd answered
            except Missed:
                reason = "stream_missed"  # nor this one
            except TooLarge:
                reason = "stream_lost"  # a listing skips what the stream cannot bring
            except StoreError as exc:  # StoreUnavailable, or a refusal (after a listing)
                reason = "stream_lost"
                if self._on_unavailable is not None:
                    self._on_unavailable(exc)
                await self._backoff.sleep()
            finally:
                await watch.aclose()  # type: ignore[attr-defined]

    async def _next(self, watch: AsyncIterator[list[WatchEvent]]) -> list[WatchEvent] | None:
        """The next batch, or None when a re-list was requested first."""
        # A batch that arrived in the same step as the request is returned, not lost.
        which, batch = await first_to_end(anext(watch), self._relist.wait())
        return cast("list[WatchEvent]", batch) if which == 0 else None
