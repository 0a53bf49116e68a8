"""The lease watcher's periodic check against etcd: a watch is checked, not trusted.

Every `check_seconds` (+-20 %; 0: never) what the lease watcher knows (LeaseWatcher
in leaseagent.agent.watching) is checked against etcd with one range request, keys
and revisions only (`LeaseStore.census`).

- If the stream brought events since the last check: how many keys the prefix held
  at the revision the watcher has seen up to, and which keys were last written
  after the last check, with that write's revision. The watcher is complete up to
  that revision, so no event can still be on its way: a different count, a key
  written that it does not know or knows at another revision, or a key it knows as
  written that etcd does not have, is an event the stream silently missed, whatever
  lost it (etcd's gRPC proxy, an etcd that answered a progress request ahead of its
  events: leaseagent.store.etcd). The prefix is listed again at once
  ("view_check"). Every kind of miss shows: a join, a leave, a change that keeps
  the count (a new VtepMAC), a key replaced by another in the same lost stretch.
- If it brought nothing for a whole check: etcd's count now, and only if etcd's
  revision has moved past the one the watcher is known complete up to, the keys
  written since. A change is asked about again VIEW_CHECK_CONFIRM_SECONDS later (an
  event may have been on its way) and the prefix listed again if it is still there;
  no change makes the watcher known complete up to etcd's revision.

So a missed event is repaired within one check (+20 %) of the next event the stream
brings, and within two checks (+20 %) and the confirmation if none comes. etcd reads
every key of the prefix to say which were written after a revision (~10 ms of a
member's CPU at 5,000 keys, against ~2 for a count: README, "Large clusters"),
which is why a quiet cluster is asked for a count alone.

When etcd answers again after an outage through which the stream brought nothing
(it may be half-open: LeaseWatcher.relist_after_outage), the same question is asked at
once, and the prefix listed again ("etcd_recovered") only if etcd changed it since the
revision seen: a renewal's timeout at a paused member no longer costs every host a
listing of every lease. A half-open stream is the store's to end (its silent-stream
probe, leaseagent.store.etcd); what it lost before that shows here or at the next check.
"""

from __future__ import annotations

import asyncio
import logging
import random
import sys
from typing import Protocol

from leaseagent.errors import Compacted, StoreError
from leaseagent.store.base import Census, LeaseStore
from leaseagent.waiting import within

log = logging.getLogger("leaseagent.watching")

# A stream that brought nothing for a whole check while etcd changed is asked again this
# much later (an event may have been on its way) before the prefix is listed again.
VIEW_CHECK_CONFIRM_SECONDS = 10.0


class Watched(Protocol):
    """What the check needs of the watcher (LeaseWatcher)."""

    gate: asyncio.Lock
    synced: asyncio.Event

    @property
    def listed_at(self) -> int: ...

    def view(self, after: int) -> tuple[int, int, dict[str, int]]: ...

    def request_relist(self, reason: str) -> None: ...


def _missed(census: Census, known: int, written: dict[str, int]) -> str:
    """What a census at the revision the watcher is complete up to shows it missed, in
    words ("" for nothing): `known` keys, and those `written` after the census's
    revision bound. With no event on its way, any difference is one lost."""
    if census.count != known:
        return f"{known} keys known, etcd had {census.count}"
    theirs = census.changed
    if theirs == written:
        return ""
    key = min(k for k in theirs.keys() | written.keys() if theirs.get(k) != written.get(k))
    if key not in written:
        return f"etcd's {key} written at revision {theirs[key]}, not known here"
    if key not in theirs:
        return f"{key} known as written at revision {written[key]}, which etcd has not"
    return f"etcd's {key} written at revision {theirs[key]}, known here at {written[key]}"


class ViewCheck:
    def __init__(self, watched: Watched, store: LeaseStore, prefix: str,
                 check_seconds: float) -> None:
        self._watched = watched
        self._store = store
        self._prefix = prefix
        self._check_seconds = check_seconds
        self._outage_ended = asyncio.Event()

    def after_outage(self) -> None:
        """etcd answers again after an outage through which the stream brought nothing
        (it may be half-open): look at once (the module docstring)."""
        self._outage_ended.set()

    async def _wait(self, seconds: float) -> bool:
        """Sleep `seconds` (0: until an outage ends); True if an outage's end cut it short."""
        try:
            await within(self._outage_ended.wait(), seconds or None)
        except TimeoutError:
            return False
        self._outage_ended.clear()
        return True

    async def run(self) -> None:
        """Compare the keys known with etcd's every check and after an outage (the module
        docstring)."""
        watched, prefix, every = self._watched, self._prefix, self._check_seconds
        last_seen, confirming, checked_to = -1, False, -1
        while True:
            after_outage = await self._wait(
                0.0 if every <= 0 else min(VIEW_CHECK_CONFIRM_SECONDS, every) if confirming
                else every * random.uniform(0.8, 1.2))
            if not watched.synced.is_set():
                continue
            if checked_to < 0:
                checked_to = watched.listed_at  # the book was complete at that listing
            if after_outage:
                checked_to = await self._after_outage(checked_to)
                continue
            async with watched.gate:
                seen, known, written = watched.view(checked_to)
            missed = moved = ""
            try:
                if checked_to < seen:  # the stream brought events since: all of them?
                    try:
                        missed = _missed(await self._store.census(
                            prefix, revision=seen, changed_after=checked_to), known, written)
                    except Compacted:
                        pass  # that history is gone: no word on it
                    checked_to = seen
                elif seen == last_seen:  # it brought nothing for a whole check: etcd neither?
                    moved, checked_to = await self._moved(seen, known, checked_to)
            except StoreError:
                continue  # etcd unreachable or refusing: the stream's own handling says so
            if missed or (moved and confirming):
                log.warning("the leases known here differ from etcd's (%s): a watch event was "
                            "missed; listing again", missed or moved)
                watched.request_relist("view_check")
                moved = ""
            if not confirming:
                last_seen = seen
            confirming = bool(moved)

    async def _after_outage(self, checked_to: int) -> int:
        """List again if etcd changed the prefix since the revision seen (a stream that
        lived through an outage may be half-open and have lost it); the revision the
        watcher is known complete up to."""
        async with self._watched.gate:
            seen, known, _ = self._watched.view(sys.maxsize)
        try:
            moved, complete_to = await self._moved(seen, known, max(checked_to, seen))
        except StoreError:
            return checked_to  # down again: its end is looked at again
        if moved:
            log.info("etcd answers again and changed while the watch brought nothing (%s): "
                     "listing again", moved)
            self._watched.request_relist("etcd_recovered")
            return checked_to
        return max(checked_to, complete_to)

    async def _moved(self, seen: int, known: int, checked_to: int) -> tuple[str, int]:
        """Whether etcd changed the prefix after `seen`, in words ("" for no), and the
        revision the watcher is then known complete up to. Its count now; the keys written
        since only if etcd's revision moved past `checked_to` (a quiet cluster: a count)."""
        count, revision = await self._store.count(self._prefix)
        changed = {} if count != known or revision <= checked_to else (
            await self._store.census(self._prefix, changed_after=seen,
                                     revision=revision)).changed
        if count != known or changed:
            return (f"{known} keys known at revision {seen}; etcd has {count} at {revision}, "
                    f"{len(changed)} written since, none came"), checked_to
        return "", revision  # nothing under the prefix since: complete up to `revision`
