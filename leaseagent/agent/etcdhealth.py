"""Whether etcd answers, as the agent last found it: leaseagent_etcd_up, the log line
per state change, and a probe that asks etcd while it is down.

Every part that talks to etcd (the lease holder, the lease watcher, the config
follower, the metrics target) reports here: `down` with the error it got,
`up` when etcd answered. A refusal (StoreAuthError: a permission revoked) is
not an outage: it is kept apart (`refusal`) and the data plane stays as it is.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from leaseagent.agent.logs import StateLog
from leaseagent.errors import LeaseagentError, StoreAuthError
from leaseagent.metrics import Metrics
from leaseagent.retrying import Backoff
from leaseagent.store.base import LeaseStore


class EtcdHealth:
    def __init__(self, store: LeaseStore, *, probe_key: str, states: StateLog,
                 metrics: Metrics, on_recovered: Callable[[], object]) -> None:
        self._store = store
        self._probe_key = probe_key  # what the probe reads (one key)
        self._states = states
        self._metrics = metrics
        # etcd is back after an outage: a stream that lived through it may be half-open.
        self._on_recovered = on_recovered
        self.reachable = True  # as last found (leaseagent_etcd_up)
        self.down_since = 0.0  # when it was last found unreachable (monotonic)
        self.refusal: str | None = None  # why etcd refuses to list the leases, if it does
        self._probe: asyncio.Future[None] | None = None  # asks etcd while it is down

    @property
    def down_now(self) -> bool:
        """Whether etcd was last logged as unreachable."""
        return self._states.get("etcd") == "down"

    def down(self, exc: BaseException) -> None:
        if isinstance(exc, StoreAuthError):
            # etcd answers but refuses (a permission revoked): not an outage. The lease
            # watcher retries its listing; what is programmed stays.
            self.refusal = str(exc)
            self._states.set("etcd-refusal", "refused", "%s (retrying; the data plane "
                             "is kept as it is)", exc, level=logging.WARNING)
            return
        if self.reachable:
            self.down_since = time.monotonic()
        self.reachable = False
        self._metrics.etcd_up.set(0)
        self._states.set("etcd", "down", "etcd unreachable: %s (retrying)", exc,
                         level=logging.WARNING)
        if self._probe is None or self._probe.done():
            self._probe = asyncio.ensure_future(self._probe_etcd())

    async def _probe_etcd(self) -> None:
        """While etcd is down, ask it (one key, capped jittered backoff) until it answers:
        whoever found it down may not ask again soon (a watch resumed in the adapter, a
        renewal hours away), and etcd_up must say when it is back."""
        backoff = Backoff()
        while not self.reachable:
            await backoff.sleep()
            try:
                await self._store.get(self._probe_key)
            except LeaseagentError:
                continue  # also a refusal (StoreAuthError): the supervised tasks report it
            self.up()

    def up(self, *, listed: bool = False) -> None:
        """etcd answered; `listed`: with a complete listing of the leases (nothing to
        list again)."""
        self.reachable = True
        self._metrics.etcd_up.set(1)
        if listed and self.refusal is not None:
            self.refusal = None
            self._states.set("etcd-refusal", None, "etcd lists the leases again")
        if self._states.set("etcd", "up", "etcd reachable") and not listed:
            self._on_recovered()

    async def close(self) -> None:
        """Stop the probe, if it runs."""
        if self._probe is not None:
            self._probe.cancel()
            await asyncio.gather(self._probe, return_exceptions=True)
