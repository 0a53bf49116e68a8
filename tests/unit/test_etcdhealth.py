"""EtcdHealth.down_since: when the outage that is going on began.

The lease watcher lists again after an outage only if its stream brought nothing
since that moment (LeaseWatcher.relist_after_outage, tests/unit/test_watching.py),
so the moment must be the first failure of the outage, not the latest, and a
refusal (etcd answers but denies) is no outage at all.
"""

from __future__ import annotations

import asyncio
import logging
import time

from leaseagent.agent.etcdhealth import EtcdHealth
from leaseagent.agent.logs import StateLog
from leaseagent.errors import StoreAuthError, StoreUnavailable
from leaseagent.metrics import Metrics
from leaseagent.store.memory import MemoryStore


def health(store: MemoryStore) -> EtcdHealth:
    return EtcdHealth(store, probe_key="/coreos.com/network/config",
                      states=StateLog(logging.getLogger("leaseagent")), metrics=Metrics(),
                      on_recovered=lambda: None)


async def stop_probe(etcd: EtcdHealth) -> None:
    probe = etcd._probe
    if probe is not None and not probe.done():
        probe.cancel()
        await asyncio.gather(probe, return_exceptions=True)


async def test_down_since_is_the_first_failure_of_an_outage() -> None:
    store = MemoryStore()
    # Unreachable for real while the outage lasts: the probe that down() starts must
    # not find etcd back and end the outage between the two failures.
    store.set_available(False)
    etcd = health(store)
    try:
        assert etcd.down_since == 0.0
        before = time.monotonic()
        etcd.down(StoreUnavailable("no answer"))
        first = etcd.down_since
        assert before <= first <= time.monotonic()
        await asyncio.sleep(0.01)
        etcd.down(StoreUnavailable("still no answer"))  # the same outage
        assert etcd.down_since == first
        store.set_available(True)
        etcd.up()
        await asyncio.sleep(0.01)
        etcd.down(StoreUnavailable("a new outage"))
        assert etcd.down_since > first
    finally:
        await stop_probe(etcd)


async def test_a_refusal_is_not_an_outage() -> None:
    etcd = health(MemoryStore())
    try:
        etcd.down(StoreAuthError("permission denied"))
        assert etcd.down_since == 0.0
        assert etcd.reachable
        assert etcd.refusal == "permission denied"
    finally:
        await stop_probe(etcd)
