"""The store through etcd's own gRPC proxy (`etcd grpc-proxy start`), a real one.

Found with the cluster bench behind etcd 3.4's proxy: every lease renewal
failed with "context canceled". etcd3aio's keep_alive closed the client's
side of the LeaseKeepAlive stream after its one request, and the proxy ends a
stream whose client has closed its side before it forwards the answer (a
member answers first). The agent's renewal then failed on every attempt.
The store now keeps its side open until the answer is read.

And the proxy drops a watch's progress requests, with which the store probes a
silent stream for a paused member or a half-open connection (below).
"""

from __future__ import annotations

import asyncio
import tempfile
import uuid
from pathlib import Path
from typing import Any

import pytest
from etcd_server import EtcdServer, put_config
from faultkit import WatchStub, first_batch
from inproc import gauge, make_agent, wait_all

import leaseagent.store.etcd as etcd_module
from leaseagent.errors import LeaseLost
from leaseagent.store.etcd import EtcdSettings, EtcdStore


async def test_a_lease_is_renewed_through_the_proxy(proxy_url: str) -> None:
    store = await EtcdStore.connect(EtcdSettings(endpoints=proxy_url, timeout=5.0))
    try:
        lease_id, ttl = await store.grant(60)
        for _ in range(3):  # one stream per renewal, as the agent renews
            assert 0 < await store.keepalive(lease_id) <= ttl
        await store.revoke(lease_id)
        try:
            left = await store.keepalive(lease_id)
        except LeaseLost:
            left = 0
        assert left <= 0  # a lease that is gone says so through the proxy too
    finally:
        await store.close()


async def test_renewals_through_the_proxy_keep_a_key(proxy_url: str,
                                                     etcd_server: EtcdServer) -> None:
    """A key on a 3 s lease, renewed through the proxy every second for three TTLs,
    is still there (read from the member itself)."""
    key = f"/proxy-renew/{uuid.uuid4().hex[:12]}"
    store = await EtcdStore.connect(EtcdSettings(endpoints=proxy_url, timeout=5.0))
    try:
        lease_id, _ = await store.grant(3)
        created, _ = await store.create(key, b"1", lease=lease_id)
        assert created
        for _ in range(9):
            await asyncio.sleep(1)
            assert await store.keepalive(lease_id) > 0
        assert etcd_server.etcdctl("get", key, "--print-value-only").strip() == "1"
    finally:
        await store.close()


class CountingWatch(WatchStub):
    """The watch stub, counting the Watch streams the store opens."""

    opened = 0

    def Watch(self, *args: Any, **kwargs: Any) -> Any:
        self.opened += 1
        return super().Watch(*args, **kwargs)


async def test_a_silent_watch_through_the_proxy_is_kept(
        proxy_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The proxy drops a watch's progress requests (etcd-io/etcd#19710): a silent watch
    through it was taken for half-open after probe + timeout and made again, each time
    a new watcher at the proxy and a Range at the members. It stays now (the proxy
    answers a read on the same connection), and still delivers."""
    monkeypatch.setattr(etcd_module, "WATCH_PROBE_AFTER", 1.0)  # probed after 1 s silent
    prefix = f"/proxy-silent/{uuid.uuid4().hex[:12]}/"
    store = await EtcdStore.connect(EtcdSettings(endpoints=proxy_url, timeout=0.5))
    try:
        counting = CountingWatch.install(store)
        start = (await store.list_prefix(prefix)).revision + 1
        reading = first_batch(store.watch(prefix, start_revision=start))
        await asyncio.sleep(5)  # three probes or more, each left unanswered
        await store.put(prefix + "a", b"1")
        async with asyncio.timeout(15):
            batch = await reading
        assert [e.key for e in batch] == [prefix + "a"]
        assert counting.opened == 1
    finally:
        await store.close()


async def test_an_agent_renews_its_lease_through_the_proxy(
        proxy_url: str, etcd_server: EtcdServer) -> None:
    """An agent behind the proxy, its lease on a 6 s TTL (renewed every 2 s): before the
    fix its first renewal failed with "context canceled", a StoreError nobody retries,
    and the agent stopped."""
    put_config(etcd_server, {"Network": "10.7.0.0/16", "Backend": {"Type": "alloc"}})
    with tempfile.TemporaryDirectory(prefix="leaseagent-proxy-agent-") as d:
        host = await make_agent(Path(d), "proxied", "10.202.0.1", endpoints=proxy_url, ttl=6)
        host.start()
        try:
            await wait_all([host], lambda a: a.ready, timeout=30, what="the agent ready")
            await wait_all([host], lambda a: (gauge(a, "leaseagent_lease_renewals_total")
                                              or 0) >= 3, timeout=30, what="three renewals")
            assert gauge(host, "leaseagent_etcd_up") == 1
        finally:
            await host.close()
