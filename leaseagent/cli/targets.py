"""`leasectl prometheus-targets`: Prometheus file_sd JSON from what the agents publish.

Every agent with a metrics address other hosts can reach publishes it under
`<prefix>/metrics/<node id>` (leaseagent.core.monitoring, which also says why a
key of its own and not a field of the lease). This command lists that prefix
and then watches it through the project's one list -> watch -> re-list engine
(leaseagent.store.watching), and after each listing and each batch of events
writes the whole target list to FILE atomically (temp file, fsync, rename;
only when its content changes), so Prometheus's file_sd never reads half a
file and hears of a host within a watch event of its agent starting.

A value that is not a target is skipped with one line on stderr per key
version (never written, never fatal). While etcd is unreachable the file stays
as it was and the engine retries; a compaction or a lost stream makes it list
again, so no change is missed.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from pathlib import Path

from leaseagent.core.escaping import escaped
from leaseagent.core.leases import KeyLayout
from leaseagent.core.monitoring import MetricsTarget, decode_target, file_sd
from leaseagent.errors import ConfigError, LeaseagentError
from leaseagent.files import refuse_non_regular, write_if_changed
from leaseagent.store.base import EventType, KeyValue, LeaseStore
from leaseagent.store.watching import ListWatch, Snapshot


def _note(text: str) -> None:
    print(f"leasectl: {text}", file=sys.stderr, flush=True)


class Targets:
    """The published targets by key, as the listing and events say."""

    def __init__(self, *, note: Callable[[str], None] = _note) -> None:
        self._note = note
        self.by_key: dict[str, MetricsTarget] = {}
        self._refused: set[tuple[str, int]] = set()  # (key, mod_revision) reported

    def put(self, kv: KeyValue) -> None:
        try:
            self.by_key[kv.key] = decode_target(kv.value)
        except ValueError as exc:
            self.by_key.pop(kv.key, None)
            if (kv.key, kv.mod_revision) not in self._refused:
                self._refused.add((kv.key, kv.mod_revision))
                self._note(f"skipping {escaped(kv.key)}: {exc}")

    def delete(self, key: str) -> None:
        self.by_key.pop(key, None)

    def reset(self, items: Iterable[KeyValue]) -> None:
        self.by_key = {}
        for kv in items:
            self.put(kv)

    def render(self) -> str:
        return file_sd(self.by_key.values())


def check_writable(path: Path) -> None:
    """ConfigError (exit 2) for a FILE that cannot be the targets file: its directory is
    missing, or something that is not a regular file is there."""
    if not path.parent.is_dir():
        raise ConfigError(f"{path}: directory {path.parent} does not exist")
    refuse_non_regular(path)


async def keep_targets(store: LeaseStore, layout: KeyLayout, path: Path | None, *,
                       once: bool = False) -> None:
    """Write the targets to `path` (None: standard output) after every change; with
    `once`, from one listing (one attempt: an unreachable etcd is an error), then return."""
    targets = Targets()
    if once:
        targets.reset((await store.list_prefix(layout.metrics_prefix)).items)
        _write(targets, path)
        return
    outage = False

    def unavailable(exc: BaseException) -> None:
        nonlocal outage
        if not outage:
            _note(f"{escaped(exc)}; retrying (the targets file stays as it is)")
        outage = True

    engine = ListWatch(store, layout.metrics_prefix, on_unavailable=unavailable)
    async for item in engine.stream():
        if isinstance(item, Snapshot):
            outage = False
            targets.reset(item.items)
        else:
            for ev in item.events:
                if ev.type is EventType.PUT and ev.kv is not None:
                    targets.put(ev.kv)
                else:
                    targets.delete(ev.key)
        _write(targets, path)


def _write(targets: Targets, path: Path | None) -> None:
    text = targets.render()
    if path is None:
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    try:
        written = write_if_changed(path, text.encode(), mode=0o644)
    except OSError as exc:
        raise LeaseagentError(f"cannot write {path}: {exc.strerror or exc}") from None
    if written:
        _note(f"{len(targets.by_key)} targets written to {path}")
