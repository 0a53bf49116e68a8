"""A watch stream gRPC has already finished under the store is resumed, never fatal.

Behind etcd's gRPC proxy at 2,500 hosts, agents died with "task config failed:
RPC already finished.": the store wrote its watch request (or its progress
probe) on a stream the server had ended, and gRPC's aio call answers a write on
a finished call with asyncio.InvalidStateError, which the store let through.
Here the first Watch call the store opens is a real gRPC call to a real etcd,
cancelled before the store writes on it (finished, as the proxy left it); the
store must treat it as a lost stream and resume on a new one.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from etcd_server import EtcdServer
from faultkit import WatchStub, first_batch

from leaseagent.store.etcd import EtcdSettings, EtcdStore


class FinishingFirstWatch(WatchStub):
    """The watch stub, whose first Watch call comes back already finished."""

    finished = 0

    def Watch(self, *args: Any, **kwargs: Any) -> Any:
        call = super().Watch(*args, **kwargs)
        if not self.finished:
            call.cancel()
            self.finished += 1
        return call


async def test_a_watch_on_a_finished_stream_resumes(etcd_server: EtcdServer) -> None:
    prefix = f"/finished/{uuid.uuid4().hex[:12]}/"
    store = await EtcdStore.connect(EtcdSettings(endpoints=etcd_server.url, timeout=5.0))
    try:
        finishing = FinishingFirstWatch.install(store)
        start = (await store.list_prefix(prefix)).revision + 1
        reading = first_batch(store.watch(prefix, start_revision=start))
        await store.put(prefix + "a", b"1")
        async with asyncio.timeout(15):
            batch = await reading
        assert finishing.finished == 1  # the finished stream was met, and got over
        assert [e.key for e in batch] == [prefix + "a"]
    finally:
        await store.close()
