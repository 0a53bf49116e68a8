"""The network config: read once at start, then followed while the agent runs.

`wait_for_network_config` is the start-up step: read `<prefix>/config` and
wait (logged once per reason) until a version is usable.

`ConfigFollower` keeps up with the key afterwards through the one list/watch
engine (leaseagent.store.watching, with the key itself as the prefix and
other keys that merely start with it skipped) and hands each new usable
version to the agent with its class (leaseagent.core.configchange), compared
with the config in force, never with the previous event: a re-list after a
lost stream or a compaction finds a change it missed, and one it has seen
applies nothing twice (docs/architecture.md, "Config changes").

- A version that fails validation, or a deleted key, is ignored: one ERROR
  line per version, counted in `leaseagent_network_config_ignored_total`
  (reason `invalid`, `missing`); the agent keeps the config in force.
- The change-rate guard: versions are applied once the key has been quiet
  for SETTLE_SECONDS, at most LONGEST_SECONDS after the first of a burst,
  and only the latest; each version passed over is counted in
  `leaseagent_network_config_coalesced_total`. A version written while one
  is being applied waits for it and is compared with its result.
- A usable version the agent could not apply (it says so and goes back; see
  leaseagent.agent.daemon) is not tried again until the key changes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from leaseagent.agent.logs import StateLog
from leaseagent.core.configchange import ConfigChange, classify
from leaseagent.core.leases import KeyLayout
from leaseagent.core.network import NetworkConfig, parse_network_config
from leaseagent.errors import NetworkConfigError, StoreUnavailable
from leaseagent.metrics import Metrics
from leaseagent.retrying import retrying
from leaseagent.store.base import EventType, KeyValue, LeaseStore
from leaseagent.store.watching import ListWatch, Snapshot
from leaseagent.waiting import first_to_end, within

log = logging.getLogger("leaseagent.netconfig")

SETTLE_SECONDS = 0.3  # a burst of writes is over once the key is this long quiet ...
LONGEST_SECONDS = 2.0  # ... or this long after its first write, whichever comes first

# Why a version was ignored: it fails validation, the key is gone, this host cannot run
# it (the agent says that one: leaseagent.agent.daemon).
IGNORED_REASONS = ("invalid", "missing", "unusable")

# apply(network, change, revision): True once in force, False if this host went back.
Apply = Callable[[NetworkConfig, ConfigChange, int], Awaitable[bool]]


def validated(key: str, raw: bytes, backends: Mapping[str, object]) -> NetworkConfig:
    """`raw` as a config every agent can run; NetworkConfigError naming the key and field."""
    try:
        network = parse_network_config(raw)
    except NetworkConfigError as exc:
        raise NetworkConfigError(f"{key}: {exc}") from None
    if network.backend_type not in backends:
        raise NetworkConfigError(
            f"{key}: Backend.Type={network.backend_type!r} is not supported "
            f"(supported: {', '.join(sorted(backends))})")
    return network


async def wait_for_network_config(store: LeaseStore, layout: KeyLayout, states: StateLog, *,
                                  backends: Mapping[str, object]) -> tuple[NetworkConfig, int]:
    """Read and validate <prefix>/config, waiting (logged once per reason) until it is
    usable; the config and the etcd revision it was written at."""
    key = layout.config_key

    def on_retry(exc: BaseException) -> None:
        if isinstance(exc, StoreUnavailable):
            states.set("etcd", "down", "etcd unreachable: %s (retrying)", exc,
                       level=logging.WARNING)
        else:
            states.set("netconfig", str(exc), "waiting for a usable network config: %s", exc,
                       level=logging.WARNING)

    async for attempt in retrying(on_retry=on_retry,
                                  retry_on=(StoreUnavailable, NetworkConfigError)):
        with attempt:
            kv = await store.get(key)
            if kv is None:
                raise NetworkConfigError(f"{key} is missing")
            network = validated(key, kv.value, backends)
            states.set("etcd", "up", "etcd reachable")
            return network, kv.mod_revision
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class Version:
    """The key as one listing or event left it: its value (None: deleted) and revision,
    and when the agent saw it."""

    value: bytes | None
    revision: int
    seen: float = 0.0
    too_large: bool = False  # a value too large to receive (`value` is empty)


class ConfigFollower:
    def __init__(
        self,
        store: LeaseStore,
        key: str,
        *,
        current: Callable[[], NetworkConfig],
        revision: int,
        apply: Apply,
        backends: Mapping[str, object],
        metrics: Metrics,
        on_unavailable: Callable[[BaseException], None] | None = None,
        settle: float = SETTLE_SECONDS,
        longest: float = LONGEST_SECONDS,
    ) -> None:
        self._key = key
        self._current = current
        self._apply = apply
        self._backends = backends
        self._metrics = metrics
        self._settle = settle
        self._longest = longest
        self._engine = ListWatch(store, key, on_unavailable=on_unavailable)
        self._handled = revision  # the revision of the last version acted on
        self._pending: Version | None = None
        self._first_pending = 0.0  # when the oldest version not yet applied arrived
        self._wake = asyncio.Event()

    async def run(self) -> None:
        await first_to_end(self._follow(), self._apply_loop())

    # -- following the key -----------------------------------------------------------

    async def _follow(self) -> None:
        async for item in self._engine.stream():
            if isinstance(item, Snapshot):
                found = [kv for kv in item.items if kv.key == self._key]
                large = [kv for kv in item.oversize if kv.key == self._key]
                if large:
                    self._offer(Version(b"", large[0].mod_revision, time.monotonic(),
                                        too_large=True))
                    continue
                self._offer(self._version(found[0] if found else None, item.revision))
                continue
            for ev in item.events:
                if ev.key == self._key:
                    kv = ev.kv if ev.type is EventType.PUT else None
                    self._offer(self._version(kv, ev.revision))

    @staticmethod
    def _version(kv: KeyValue | None, revision: int) -> Version:
        """A deleted key's version is the revision it was seen gone at."""
        if kv is None:
            return Version(None, revision, time.monotonic())
        return Version(kv.value, kv.mod_revision, time.monotonic())

    def _offer(self, version: Version) -> None:
        """Keep `version` as the one to apply next, unless it is already handled (a re-list
        shows the key as it was) or is the one kept (a deletion seen twice)."""
        if version.value is not None and version.revision <= self._handled:
            return
        if version.value is None and (self._handled_missing or (
                self._pending is not None and self._pending.value is None)):
            return
        if self._pending is not None:
            self._metrics.config_coalesced.inc()
        else:
            self._first_pending = time.monotonic()
        self._pending = version
        self._wake.set()

    @property
    def _handled_missing(self) -> bool:
        return self._handled < 0

    # -- applying it -----------------------------------------------------------------

    async def _settled(self) -> Version:
        """The latest version once the key is quiet (or the burst has gone on too long).
        Called with a version pending; only `_offer` sets one."""
        while True:
            left = self._first_pending + self._longest - time.monotonic()
            if left <= 0:
                break
            self._wake.clear()
            try:
                await within(self._wake.wait(), min(self._settle, left))
            except TimeoutError:
                break  # quiet
        version, self._pending = self._pending, None
        assert version is not None
        return version

    async def _apply_loop(self) -> None:
        while True:
            while self._pending is None:
                self._wake.clear()
                await self._wake.wait()
            await self._handle(await self._settled())

    async def _handle(self, version: Version) -> None:
        if version.value is None:
            self._handled = -1
            self._ignored("missing", version.revision, f"{self._key} was deleted")
            return
        self._handled = version.revision
        if version.too_large:
            self._ignored("invalid", version.revision, f"{self._key}: the value is too large "
                          "to receive (over gRPC's 4 MiB message limit)")
            return
        try:
            network = validated(self._key, version.value, self._backends)
        except NetworkConfigError as exc:
            self._ignored("invalid", version.revision, str(exc))
            return
        change = classify(self._current(), network)
        if not change:
            log.info("network config rewritten (revision %d) with no change that matters "
                     "to the agents", version.revision)
            self._metrics.config_revision.set(version.revision)
            return
        log.info("network config changed (revision %d): %s", version.revision, change.summary)
        if await self._apply(network, change, version.revision):
            log.info("network config revision %d in force (%s), %.2fs after it was seen",
                     version.revision, change.kind, time.monotonic() - version.seen)

    def _ignored(self, reason: str, revision: int, why: str) -> None:
        self._metrics.config_ignored.labels(reason=reason).inc()
        log.error("network config revision %d ignored: %s; the agent keeps running on the "
                  "last good one", revision, why)
