"""Every gauge tells what is true now (docs/reliability.md, "Broken parts").

In-process agents (tests/faults/inproc.py) on a real etcd (one member):

- `leaseagent_peers` follows removals that are held down (--peer-hold-time): the
  kernel keeps a held peer's entries, the gauge counts the valid leases etcd has;
- `leaseagent_lease_held` drops to 0 when the lease's TTL has run out since the last
  renewal while etcd does not answer (paused), and is 1 again once it is taken back;
- `leaseagent_etcd_up` drops when etcd goes away even when no renewal is due for an
  hour (the watch finds it gone), and is 1 again when etcd is back.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

from etcd_cluster import pause_member, resume_member
from faultkit import ALLOC, SUBNETS, put_config
from inproc import gauge, make_agent, wait_all, wait_for

from leaseagent.store.etcd import EtcdSettings, EtcdStore


async def test_peers_gauge_follows_removals_that_are_held_down(etcd, tmp_path: Path):
    put_config(etcd, ALLOC)
    store = await EtcdStore.connect(EtcdSettings(endpoints=etcd.endpoints, timeout=5))
    a = await make_agent(tmp_path, "a", "10.200.0.1", endpoints=etcd.endpoints,
                         extra=["--peer-hold-time", "60"])
    try:
        keys = [f"{SUBNETS}10.6.{201 + n}.0-24" for n in range(5)]
        for n, key in enumerate(keys):
            await store.put(key, json.dumps({"PublicIP": f"10.210.0.{n + 1}",
                                             "BackendType": "alloc",
                                             "NodeID": f"peer{n}"}).encode())
        a.start()
        await wait_all([a], lambda x: x.ready, timeout=20, what="agent ready")
        peers = lambda: gauge(a, "leaseagent_peers", backend="alloc")  # noqa: E731
        await wait_for("5 peers counted", lambda: peers() == 5, 10)
        for key in keys[1:]:
            await store.delete(key)
        took = await wait_for("the gauge at 1 after 4 removals", lambda: peers() == 1, 5)
        assert a.agent.watcher is not None
        assert len(a.agent.watcher.peers) == 5, "the removed peers are held in the kernel"
        assert len(a.agent.watcher.hold) == 4
    finally:
        await a.close()
        await store.close()
    print(f"\ngauges: leaseagent_peers 5 -> 1 {took:.2f}s after 4 held-down removals "
          f"(4 still held in the kernel)")


async def test_lease_held_drops_when_the_ttl_runs_out_while_etcd_is_away(etcd, tmp_path: Path):
    ttl = 3
    put_config(etcd, ALLOC)
    a = await make_agent(tmp_path, "a", "10.200.0.1", endpoints=etcd.endpoints, ttl=ttl,
                         extra=["--etcd-timeout", "1"])
    held = lambda: gauge(a, "leaseagent_lease_held")  # noqa: E731
    try:
        a.start()
        await wait_all([a], lambda x: x.ready, timeout=20, what="agent ready")
        await asyncio.sleep(0.2)
        assert held() == 1
        paused = time.monotonic()
        pause_member(etcd, 0)
        try:
            # Renewals are every ttl/3: the last one was at most ttl/3 before the pause, so
            # the lease holds at least 2/3 ttl more; with no answer it is gone by ttl.
            dropped = await wait_for("lease_held 0", lambda: held() == 0, ttl + 3)
            assert dropped >= ttl / 2, f"lease_held dropped {dropped:.2f}s into the pause"
            assert a.agent.lease_held, "readiness is about forwarding: the data plane stays"
        finally:
            resume_member(etcd, 0)
        back = await wait_for("lease_held 1 again", lambda: held() == 1, 15)
        assert gauge(a, "leaseagent_etcd_up") == 1
    finally:
        await a.close()
    print(f"\ngauges: lease_held 0 {dropped:.2f}s after etcd was paused (ttl {ttl}s, "
          f"{time.monotonic() - paused:.1f}s in all), 1 again {back:.2f}s after resume")


async def test_etcd_up_drops_when_etcd_goes_away_with_no_renewal_due(etcd, tmp_path: Path):
    put_config(etcd, ALLOC)
    a = await make_agent(tmp_path, "a", "10.200.0.1", endpoints=etcd.endpoints, ttl=3600,
                         extra=["--etcd-timeout", "1"])
    up = lambda: gauge(a, "leaseagent_etcd_up")  # noqa: E731
    try:
        a.start()
        await wait_all([a], lambda x: x.ready, timeout=20, what="agent ready")
        assert up() == 1
        etcd.stop()
        down = await wait_for("etcd_up 0 (no renewal due for 20 minutes)", lambda: up() == 0, 20)
        assert gauge(a, "leaseagent_lease_held") == 1
        etcd.start()
        back = await wait_for("etcd_up 1 again", lambda: up() == 1, 20)
    finally:
        await a.close()
    print(f"\ngauges: etcd_up 0 {down:.2f}s after etcd stopped (ttl 3600 s: no renewal due), "
          f"1 again {back:.2f}s after it started")
