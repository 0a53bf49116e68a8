"""The soak's bare subject (`python -m bench.soak --subject watch`): the agent's etcd
store watching the lease prefix and nothing else, so that the soak's RSS slope can be
measured without the agent around it (docs/benchmarks.md, "Soak (no leak)").

`python -m bench.soakwatch ENDPOINTS PREFIX METRICS_PORT [--count-every S]`: lists the
prefix, watches it from the listing's revision on (`EtcdStore.watch`, resumed and listed
again as the agent does), counts the events, and with --count-every also asks etcd for
the prefix's count that often (the unary call the agent's lease check makes). It says
READY=1 on $NOTIFY_SOCKET once watching and serves the two metrics the soak reads
(`leaseagent_watch_events_total`, `leaseagent_asyncio_tasks`) on 127.0.0.1:METRICS_PORT.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib

from leaseagent.agent.notify import sd_notify
from leaseagent.errors import StoreError
from leaseagent.store.etcd import EtcdSettings, EtcdStore


class Watcher:
    def __init__(self, store: EtcdStore, prefix: str) -> None:
        self.store = store
        self.prefix = prefix
        self.events = 0
        self.ready = asyncio.Event()

    async def run(self) -> None:
        while True:
            try:
                listing = await self.store.list_prefix(self.prefix)
                self.ready.set()
                async for batch in self.store.watch(self.prefix,
                                                    start_revision=listing.revision + 1):
                    self.events += len(batch)
            except StoreError:
                await asyncio.sleep(1.0)

    async def counting(self, every: float) -> None:
        while True:
            await asyncio.sleep(every)
            with contextlib.suppress(StoreError):
                await self.store.count(self.prefix)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            await reader.readuntil(b"\r\n\r\n")
            body = (f"leaseagent_watch_events_total {self.events}\n"
                    f"leaseagent_asyncio_tasks {len(asyncio.all_tasks())}\n").encode()
            writer.write(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            await writer.drain()
        writer.close()


async def main(args: argparse.Namespace) -> None:
    store = await EtcdStore.connect(EtcdSettings(endpoints=args.endpoints, timeout=5))
    watcher = Watcher(store, args.prefix)
    server = await asyncio.start_server(watcher.serve, "127.0.0.1", args.metrics_port)
    tasks = [asyncio.ensure_future(watcher.run())]
    if args.count_every:
        tasks.append(asyncio.ensure_future(watcher.counting(args.count_every)))
    await watcher.ready.wait()
    sd_notify("READY=1")
    async with server:
        await asyncio.gather(*tasks)


if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="python -m bench.soakwatch")
    p.add_argument("endpoints")
    p.add_argument("prefix")
    p.add_argument("metrics_port", type=int)
    p.add_argument("--count-every", type=float, default=0.0)
    asyncio.run(main(p.parse_args()))
