"""The lease store port: the few etcd v3 operations the agent and leasectl need.

Semantics follow etcd v3 exactly, so the in-memory fake and the etcd
adapter pass one contract suite (tests/contract):

- every write bumps the store revision by one; a key carries
  create_revision, mod_revision, version and the id of its etcd lease (0: none);
- `create` is create-if-absent (compare create_revision == 0) and
  `replace` is fenced on mod_revision; both return (won, current) where
  current is the key as it is after the transaction; `create_first` creates
  the first absent key of several candidates in one transaction; `move`
  deletes one key (fenced on its mod_revision) and creates another (if
  absent) in one transaction: one revision, never a moment with neither;
- `watch` yields batches of events from start_revision on and raises
  Compacted when that revision is no longer kept;
- an etcd lease that expires or is revoked deletes its keys (delete events).

Errors are the project's (leaseagent.errors), never a library's.

`OPERATIONS` names the requests an adapter reports to its observer (the
`operation` label of the etcd latency metric), in an operator's words.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol

OPERATIONS = ("get", "list", "put", "create", "allocate", "replace", "move", "delete",
              "grant", "keepalive", "time-to-live", "revoke", "compact", "members")


@dataclass(frozen=True, slots=True)
class KeyValue:
    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int = 0


class EventType(Enum):
    PUT = "put"
    DELETE = "delete"


@dataclass(frozen=True)
class WatchEvent:
    type: EventType
    key: str
    revision: int
    kv: KeyValue | None = None  # set for PUT


# The most changed keys one census answer holds (more are asked for in further answers):
# ~100 bytes each (key, revisions, lease), ~1 MB, well under gRPC's 4 MiB receive limit.
CENSUS_KEYS = 10_000


@dataclass(frozen=True)
class Census:
    """A prefix at one revision without its values: how many keys it held, and the keys
    last written after a given revision, with the revision of that write."""
    count: int
    changed: dict[str, int]
    revision: int


@dataclass(frozen=True)
class Listing:
    items: list[KeyValue]
    revision: int
    # Keys whose value is too large to receive (over gRPC's 4 MiB message limit): their
    # metadata, value empty. Skipped by every reader, and reported.
    oversize: list[KeyValue] = field(default_factory=list)


class LeaseStore(Protocol):
    """What leaseagent needs of etcd."""

    async def get(self, key: str) -> KeyValue | None: ...

    async def list_prefix(self, prefix: str) -> Listing:
        """All keys under prefix at one revision (the store's at the first request), in as
        many range requests as it takes; a key whose value cannot be received is in
        `oversize` instead of `items`."""
        ...

    async def count(self, prefix: str, *, revision: int = 0) -> tuple[int, int]:
        """How many keys are under prefix at `revision` (0: now), and that revision: one
        request, no keys or values. Compacted when `revision`'s history is gone."""
        ...

    async def census(self, prefix: str, *, changed_after: int, revision: int = 0) -> Census:
        """The keys under prefix at `revision` (0: now): their count, and the keys whose last
        write up to it came after `changed_after`: keys and revisions only, one request per
        CENSUS_KEYS changed keys. Compacted when `revision`'s history is gone."""
        ...

    async def put(self, key: str, value: bytes) -> None:
        """Unfenced write with no lease: only for operator-owned keys (config)."""
        ...

    async def create(
        self, key: str, value: bytes, *, lease: int, guard: str | None = None
    ) -> tuple[bool, KeyValue | None]:
        """Create `key` if it does not exist; with `guard`, only if no key starts with
        `guard` (a lease key's IPv4 part: one subnet, whatever IPv6 part a key adds)."""
        ...

    async def create_first(
        self, keys: Sequence[str], value: bytes, *, lease: int,
        guards: Sequence[str] | None = None,
    ) -> KeyValue | None:
        """Create the first of `keys` that does not exist (with `guards`, the first whose
        guard no key starts with), in one transaction.

        Returns the key created, or None when every key exists. Never creates
        two: if one of `keys` already carries `lease` (a retried transaction
        that had in fact been applied) that key is returned and nothing is written.
        """
        ...

    async def replace(
        self, key: str, value: bytes, *, mod_revision: int, lease: int
    ) -> tuple[bool, KeyValue | None]: ...

    async def move(
        self, key: str, *, mod_revision: int, new_key: str, value: bytes, lease: int
    ) -> tuple[bool, KeyValue | None]:
        """In one transaction, if `key` is still at `mod_revision` and `new_key` does not
        exist: delete `key` and create `new_key`. (won, `new_key` as it is after)."""
        ...

    async def delete(self, key: str, *, mod_revision: int | None = None) -> bool:
        """Delete key; fenced on mod_revision when given. True if it was deleted."""
        ...

    async def grant(self, ttl: int) -> tuple[int, int]:
        """A new etcd lease: (id, granted ttl)."""
        ...

    async def keepalive(self, lease_id: int) -> int:
        """Refresh a lease; its TTL after the refresh, 0 or less if it no longer exists."""
        ...

    async def time_to_live(self, lease_id: int) -> int:
        """Seconds left on a lease; -1 if it does not exist."""
        ...

    async def revoke(self, lease_id: int) -> None: ...

    def watch(self, prefix: str, *, start_revision: int) -> AsyncIterator[list[WatchEvent]]:
        """Event batches under prefix from start_revision; raises Compacted, and may
        raise StoreUnavailable, Behind, TooLarge or Missed (each: list again;
        leaseagent.store.watching)."""
        ...

    async def compact(self, revision: int) -> None: ...

    async def close(self) -> None: ...
