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

import grpc.aio
import pytest
from etcd_server import EtcdServer, put_config
from faultkit import WatchStub, first_batch
from inproc import gauge, make_agent, wait_all

import leaseagent.store.etcd as etcd_module
from leaseagent.errors import LeaseLost
from leaseagent.store.etcd import EtcdSettings, EtcdStore
from leaseagent.store.watching import ListWatch, Snapshot


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


class StalledWatch(WatchStub):
    """The watch stub, each stream stalled once it is made: its events never reach the
    store, while the stream stays open and the proxy goes on answering reads. So behaved
    one of the proxy's shared watches in the 5,000-host bench (round 7): 219 streams
    open and silent past hundreds of new leases."""

    def Watch(self, *args: Any, **kwargs: Any) -> Any:
        return _Stalled(super().Watch(*args, **kwargs))


class _Stalled:
    def __init__(self, call: Any) -> None:
        self._call = call

    def __getattr__(self, name: str) -> Any:
        return getattr(self._call, name)

    async def read(self) -> Any:
        while True:
            resp = await self._call.read()
            if resp is grpc.aio.EOF or not resp.events:
                return resp  # `created`, the end: passed on; events: dropped


@pytest.mark.parametrize("writes_elsewhere", [0, 3])
async def test_a_silent_watch_through_the_proxy_is_kept(
        writes_elsewhere: int, proxy_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The proxy drops a watch's progress requests (etcd-io/etcd#19710): a silent watch
    through it was taken for half-open after probe + timeout and made again, each time
    a new watcher at the proxy and a Range at the members. It stays now (the proxy
    answers a read on the same connection), and still delivers; so it does when keys
    outside its prefix are written meanwhile (the store's revision moves: the check
    beside the stream reads the prefix and finds nothing it owes)."""
    monkeypatch.setattr(etcd_module, "WATCH_PROBE_AFTER", 1.0)  # probed after 1 s silent
    prefix = f"/proxy-silent/{uuid.uuid4().hex[:12]}/"
    store = await EtcdStore.connect(EtcdSettings(endpoints=proxy_url, timeout=0.5))
    try:
        counting = CountingWatch.install(store)
        checks: list[tuple[int, Any] | None] = []
        check = store._answers_beside

        async def recorded(*args: Any) -> tuple[int, Any] | None:
            checks.append(answer := await check(*args))
            return answer

        monkeypatch.setattr(store, "_answers_beside", recorded)
        start = (await store.list_prefix(prefix)).revision + 1
        reading = first_batch(store.watch(prefix, start_revision=start))
        for i in range(writes_elsewhere):
            await store.put(f"{prefix[:-1]}-elsewhere/{i}", b"1")
            await asyncio.sleep(1.6)  # a probe (1 s silent + 0.5 s unanswered) after each
        await asyncio.sleep(5)  # three probes or more, each left unanswered
        await store.put(prefix + "a", b"1")
        async with asyncio.timeout(15):
            batch = await reading
        assert [e.key for e in batch] == [prefix + "a"]
        assert counting.opened == 1
        assert len(checks) >= 3 and None not in checks
        # With writes elsewhere the store's revision passed the stream's: the prefix was
        # read at it and nothing was found missing; without, only counted.
        read = [c for c in checks if c is not None and c[0] >= start]
        assert bool(read) == bool(writes_elsewhere)
        assert all(c is not None and c[1] is None for c in checks)
    finally:
        await store.close()


async def test_a_watch_the_proxy_stopped_feeding_lists_again(
        proxy_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Its stream open and silent, the proxy answering reads: before, the check beside
    the stream (a count) kept it, and the keys written meanwhile stayed unseen until the
    lease count check (300 s). Now the check finds a key of the prefix changed after the
    stream's last event, waits one more timeout for it, and the engine lists again."""
    monkeypatch.setattr(etcd_module, "WATCH_PROBE_AFTER", 1.0)
    prefix = f"/proxy-stalled/{uuid.uuid4().hex[:12]}/"
    store = await EtcdStore.connect(EtcdSettings(endpoints=proxy_url, timeout=0.5))
    view: dict[str, int] = {}
    reasons: list[str] = []
    try:
        await store.put(prefix + "before", b"1")
        StalledWatch.install(store)

        async def follow() -> None:
            async for item in ListWatch(store, prefix).stream():
                if isinstance(item, Snapshot):
                    reasons.append(item.reason)
                    view.clear()
                    view.update({kv.key: kv.mod_revision for kv in item.items})
                else:
                    view.update({e.key: e.revision for e in item.events})

        following = asyncio.ensure_future(follow())
        try:
            async with asyncio.timeout(10):
                while not reasons:  # noqa: ASYNC110
                    await asyncio.sleep(0.02)
            await store.put(prefix + "unseen", b"1")
            async with asyncio.timeout(15):  # probe 1 s + 0.5 s unanswered + 0.5 s for it
                while prefix + "unseen" not in view:  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
        finally:
            following.cancel()
            await asyncio.gather(following, return_exceptions=True)
        assert reasons[:2] == ["start", "stream_missed"]
        listing = await store.list_prefix(prefix)
        assert view == {kv.key: kv.mod_revision for kv in listing.items}
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
