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
"""

from __future__ import annotations

import asyncio
import logging
import random
from typing import Protocol

from leaseagent.errors import Compacted, StoreError
from leaseagent.store.base import Census, LeaseStore

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

    async def run(self) -> None:
        """Compare the keys known with etcd's every check (the module docstring)."""
        if self._check_seconds <= 0:
            await asyncio.Event().wait()  # never
        watched, prefix = self._watched, self._prefix
        last_seen, confirming, checked_to = -1, False, -1
        while True:
            await asyncio.sleep(min(VIEW_CHECK_CONFIRM_SECONDS, self._check_seconds) if confirming
                                else self._check_seconds * random.uniform(0.8, 1.2))
            if not watched.synced.is_set():
                continue
            if checked_to < 0:
                checked_to = watched.listed_at  # the book was complete at that listing
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
