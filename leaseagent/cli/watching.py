"""`leasectl watch`: the lease prefix as a stream of added/changed/removed/expired events.

The store layer's list -> watch -> re-list engine (leaseagent.store.watching)
lists first (so the current state is known and nothing already there is
reported), then watches from the list's revision + 1. On compaction or a lost
stream it lists again; the listing is diffed against what was known, so no
change is missed and none is reported twice.

Removed or expired? A DELETE carries no reason. A key that was attached to
an etcd lease whose lease no longer exists (TimeToLive answers -1) went
with its lease: "expired". A key deleted by hand (`leasectl release`,
`etcdctl del`) while its lease lives on, or a reservation (no etcd lease),
was "removed". An agent stopped with --release-on-exit revokes its lease, so
its key shows as "expired" too: in both cases the host let go of the lease.

`lease_events` yields `LeaseEvent`s; presentation (and judging each key, by
the lease layer) is leasectl's job. Store errors other than an unavailable
etcd propagate.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass

from leaseagent.store.base import EventType, KeyValue, LeaseStore
from leaseagent.store.watching import ListWatch, Snapshot

ADDED, CHANGED, REMOVED, EXPIRED = "added", "changed", "removed", "expired"


@dataclass(frozen=True)
class LeaseEvent:
    """One change of a lease key. `kv` is the key as it is now (added, changed) or as it
    was last seen (removed, expired)."""

    kind: str
    kv: KeyValue
    revision: int


def diff_listing(known: Mapping[str, KeyValue], items: Sequence[KeyValue]
                 ) -> tuple[list[tuple[str, KeyValue]], list[KeyValue]]:
    """Compare a fresh listing with what was known: ([(added|changed, kv)], [gone kvs])."""
    now = {kv.key: kv for kv in items}
    puts: list[tuple[str, KeyValue]] = []
    for key, kv in now.items():
        old = known.get(key)
        if old is None:
            puts.append((ADDED, kv))
        elif old.mod_revision != kv.mod_revision:
            puts.append((CHANGED, kv))
    gone = [kv for key, kv in known.items() if key not in now]
    return puts, gone


class _LeaseCheck:
    """Whether an etcd lease still exists, asked once per lease per batch."""

    def __init__(self, store: LeaseStore) -> None:
        self._store = store
        self._answers: dict[int, bool] = {}

    async def gone_kind(self, kv: KeyValue) -> str:
        if not kv.lease:
            return REMOVED
        if kv.lease not in self._answers:
            self._answers[kv.lease] = await self._store.time_to_live(kv.lease) == -1
        return EXPIRED if self._answers[kv.lease] else REMOVED


async def lease_events(
    store: LeaseStore,
    subnets_prefix: str,
    *,
    on_listed: Callable[[Sequence[KeyValue], int, str], None] | None = None,
    on_unavailable: Callable[[BaseException], None] | None = None,
) -> AsyncIterator[LeaseEvent]:
    """Every change under `subnets_prefix` from now on, forever.

    `on_listed(items, revision, reason)` is told after every (re-)list, before the
    changes it found are yielded; reason is "start", "compacted" or "reconnected".
    `on_unavailable(exc)` is told when etcd cannot be reached (once per outage; the
    stream retries by itself).
    """
    known: dict[str, KeyValue] = {}
    outage = False

    def unavailable(exc: BaseException) -> None:
        nonlocal outage
        if not outage and on_unavailable is not None:
            on_unavailable(exc)
        outage = True

    engine = ListWatch(store, subnets_prefix, on_unavailable=unavailable)
    async for item in engine.stream():
        if isinstance(item, Snapshot):
            outage = False
            reason = item.reason if item.reason in ("start", "compacted") else "reconnected"
            if on_listed is not None:
                on_listed(item.items, item.revision, reason)
            if item.reason == "start":
                known = {kv.key: kv for kv in item.items}
                continue
            puts, gone = diff_listing(known, item.items)
            check = _LeaseCheck(store)
            # `known` follows each reported event, so a failure half-way
            # through reports neither a change twice nor none at all.
            for kv in gone:
                kind = await check.gone_kind(kv)
                del known[kv.key]
                yield LeaseEvent(kind, kv, item.revision)
            for kind, kv in puts:
                known[kv.key] = kv
                yield LeaseEvent(kind, kv, kv.mod_revision)
            continue
        check = _LeaseCheck(store)
        for ev in item.events:
            if ev.type is EventType.PUT and ev.kv is not None:
                kind = CHANGED if ev.key in known else ADDED
                known[ev.key] = ev.kv
                yield LeaseEvent(kind, ev.kv, ev.revision)
                continue
            old = known.get(ev.key)
            if old is None:
                # Every key that exists was listed or put since, so an
                # unknown key's delete has nothing to report.
                continue
            kind = await check.gone_kind(old)
            del known[ev.key]
            yield LeaseEvent(kind, old, ev.revision)
