"""An in-memory LeaseStore that behaves like etcd v3, for fast unit tests.

Kept faithful where the agent depends on it: one revision per write,
create/mod revisions and versions, lease expiry deleting keys, watch from a
revision with history and compaction (Compacted when the start revision is
below the compact revision, as etcd), and unavailability
(`set_available(False)` makes every call raise StoreUnavailable, like a
partition, and ends open watch streams). Time comes from an injected clock
so TTL tests need no sleeping: call `expire_leases()` after moving it.

etcd details mirrored (checked by tests/contract against a real etcd):
- revoking or expiring a lease deletes all its keys in one transaction, so
  their delete events share one revision;
- compaction at R keeps revision R itself: a watch may start at R, and
  compacting at or below the compact revision, or above the current
  revision, is an error;
- a watch from a future revision waits for that revision.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field, replace

from leaseagent.errors import Compacted, LeaseLost, StoreError, StoreUnavailable
from leaseagent.store.base import Census, EventType, KeyValue, Listing, WatchEvent

MIN_TTL = 2  # etcd's minimum lease TTL is about this


@dataclass
class _Lease:
    ttl: int
    expires_at: float
    keys: set[str] = field(default_factory=set)


class MemoryStore:
    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._kv: dict[str, KeyValue] = {}
        self._revision = 1
        self._compacted = 0
        self._history: list[WatchEvent] = []
        # Every write's (revision, key, exists after it), never compacted: `count` at a past
        # revision replays it (the watch history above is cut at compaction, as etcd's).
        self._ledger: list[tuple[int, str, bool]] = []
        self._leases: dict[int, _Lease] = {}
        self._lease_ids = itertools.count(0x1000)
        self._changed = asyncio.Event()
        self._available = True
        self.requests = 0  # every call made, for request-count tests

    # --- test controls ------------------------------------------------------

    def set_available(self, available: bool) -> None:
        self._available = available
        self._wake()  # a blocked watcher notices the partition at once

    @property
    def revision(self) -> int:
        return self._revision

    async def expire_leases(self) -> None:
        """Delete the keys of every lease whose time is up (etcd does this itself)."""
        now = self._clock()
        for lease_id in [i for i, lease in self._leases.items() if lease.expires_at <= now]:
            await self._drop_lease(lease_id)

    # --- internals ----------------------------------------------------------

    def _check(self) -> None:
        self.requests += 1
        if not self._available:
            raise StoreUnavailable("memory store: unavailable (test partition)")

    def _wake(self) -> None:
        """Wake every watcher; each waits on the Event current when it went to sleep."""
        self._changed.set()
        self._changed = asyncio.Event()

    async def _notify(self) -> None:
        self._wake()

    def _write(self, key: str, value: bytes, lease: int, *, new_revision: bool = True
               ) -> KeyValue:
        if new_revision:
            self._revision += 1
        old = self._kv.get(key)
        if old is not None and old.lease and old.lease in self._leases:
            self._leases[old.lease].keys.discard(key)
        kv = KeyValue(
            key=key,
            value=value,
            create_revision=old.create_revision if old else self._revision,
            mod_revision=self._revision,
            version=old.version + 1 if old else 1,
            lease=lease,
        )
        self._kv[key] = kv
        if lease:
            self._leases[lease].keys.add(key)
        self._history.append(WatchEvent(EventType.PUT, key, self._revision, kv))
        self._ledger.append((self._revision, key, True))
        return kv

    def _remove(self, key: str, *, new_revision: bool = True) -> None:
        if new_revision:
            self._revision += 1
        old = self._kv.pop(key)
        if old.lease and old.lease in self._leases:
            self._leases[old.lease].keys.discard(key)
        self._history.append(WatchEvent(EventType.DELETE, key, self._revision))
        self._ledger.append((self._revision, key, False))

    def _check_lease(self, lease: int) -> None:
        if lease and lease not in self._leases:
            raise LeaseLost(f"lease {lease:x} not found")

    async def _drop_lease(self, lease_id: int) -> None:
        lease = self._leases.pop(lease_id, None)
        if lease is None:
            return
        keys = sorted(k for k in lease.keys if k in self._kv)
        if not keys:
            return
        self._revision += 1  # one txn for all of them, as etcd's lessor does
        for key in keys:
            self._remove(key, new_revision=False)
        await self._notify()

    # --- LeaseStore ---------------------------------------------------------

    async def get(self, key: str) -> KeyValue | None:
        self._check()
        return self._kv.get(key)

    async def list_prefix(self, prefix: str) -> Listing:
        self._check()
        items = [kv for k, kv in sorted(self._kv.items()) if k.startswith(prefix)]
        return Listing(items=items, revision=self._revision)

    async def put(self, key: str, value: bytes) -> None:
        self._check()
        self._write(key, value, 0)
        await self._notify()

    def _taken(self, key: str, guard: str | None) -> bool:
        return key in self._kv if guard is None else any(k.startswith(guard) for k in self._kv)

    async def create(self, key: str, value: bytes, *, lease: int, guard: str | None = None
                     ) -> tuple[bool, KeyValue | None]:
        self._check()
        if self._taken(key, guard):
            return False, self._kv.get(key)
        self._check_lease(lease)
        kv = self._write(key, value, lease)
        await self._notify()
        return True, kv

    async def create_first(
        self, keys: Sequence[str], value: bytes, *, lease: int,
        guards: Sequence[str] | None = None,
    ) -> KeyValue | None:
        self._check()
        for key in keys:
            if lease and key in self._kv and self._kv[key].lease == lease:
                return self._kv[key]
        prefixes: Sequence[str | None] = guards or [None] * len(keys)
        for key, guard in zip(keys, prefixes, strict=True):
            if not self._taken(key, guard):
                self._check_lease(lease)
                kv = self._write(key, value, lease)
                await self._notify()
                return kv
        return None

    async def replace(
        self, key: str, value: bytes, *, mod_revision: int, lease: int
    ) -> tuple[bool, KeyValue | None]:
        self._check()
        current = self._kv.get(key)
        if current is None or current.mod_revision != mod_revision:
            return False, current
        self._check_lease(lease)
        kv = self._write(key, value, lease)
        await self._notify()
        return True, kv

    async def move(
        self, key: str, *, mod_revision: int, new_key: str, value: bytes, lease: int
    ) -> tuple[bool, KeyValue | None]:
        self._check()
        current = self._kv.get(key)
        if (current is None or current.mod_revision != mod_revision or new_key in self._kv):
            return False, self._kv.get(new_key)
        self._check_lease(lease)
        self._remove(key)  # etcd: one transaction, one revision, the delete event first
        kv = self._write(new_key, value, lease, new_revision=False)
        await self._notify()
        return True, kv

    async def delete(self, key: str, *, mod_revision: int | None = None) -> bool:
        self._check()
        current = self._kv.get(key)
        if current is None or (mod_revision is not None and current.mod_revision != mod_revision):
            return False
        self._remove(key)
        await self._notify()
        return True

    async def grant(self, ttl: int) -> tuple[int, int]:
        self._check()
        ttl = max(ttl, MIN_TTL)
        lease_id = next(self._lease_ids)
        self._leases[lease_id] = _Lease(ttl=ttl, expires_at=self._clock() + ttl)
        return lease_id, ttl

    async def keepalive(self, lease_id: int) -> int:
        self._check()
        lease = self._leases.get(lease_id)
        if lease is None or lease.expires_at <= self._clock():
            await self._drop_lease(lease_id)
            return 0
        lease.expires_at = self._clock() + lease.ttl
        return lease.ttl

    async def time_to_live(self, lease_id: int) -> int:
        self._check()
        lease = self._leases.get(lease_id)
        if lease is None:
            return -1
        return max(0, int(lease.expires_at - self._clock()))

    async def revoke(self, lease_id: int) -> None:
        self._check()
        await self._drop_lease(lease_id)

    async def count(self, prefix: str, *, revision: int = 0) -> tuple[int, int]:
        self._check()
        if revision == 0:
            return sum(1 for k in self._kv if k.startswith(prefix)), self._revision
        return len(self._written(prefix, revision)), revision

    async def census(self, prefix: str, *, changed_after: int, revision: int = 0) -> Census:
        self._check()
        revision = revision or self._revision
        written = self._written(prefix, revision)
        return Census(len(written), {key: rev for key, rev in written.items()
                                     if rev > changed_after}, revision)

    def _written(self, prefix: str, revision: int) -> dict[str, int]:
        """The keys under prefix at `revision`, each with its last write's revision."""
        if revision < self._compacted:
            raise Compacted(self._compacted)
        if revision > self._revision:
            raise StoreError("memory store: required revision is a future revision")
        written: dict[str, int] = {}
        for rev, key, present in self._ledger:
            if rev > revision:
                break
            if key.startswith(prefix):
                if present:
                    written[key] = rev
                else:
                    written.pop(key, None)
        return written

    async def compact(self, revision: int) -> None:
        self._check()
        if revision <= self._compacted:
            raise StoreError("memory store: required revision has been compacted")
        if revision > self._revision:
            raise StoreError("memory store: required revision is a future revision")
        self._compacted = revision
        # etcd keeps revision `revision` itself (the newest version of each key
        # at or below it), so history from there on stays watchable.
        self._history = [e for e in self._history if e.revision >= revision]

    async def watch(self, prefix: str, *, start_revision: int) -> AsyncIterator[list[WatchEvent]]:
        self._check()
        # etcd: start_revision 0 means "from the next write on".
        next_rev = start_revision if start_revision > 0 else self._revision + 1
        while True:
            if not self._available:
                raise StoreUnavailable("memory store: watch stream lost (test partition)")
            if next_rev < self._compacted:
                raise Compacted(self._compacted)
            changed = self._changed
            batch = [
                e for e in self._history if e.revision >= next_rev and e.key.startswith(prefix)
            ]
            next_rev = max(next_rev, self._revision + 1)
            if batch:
                yield [replace(e) for e in batch]
                continue
            await changed.wait()

    async def close(self) -> None:
        return None
