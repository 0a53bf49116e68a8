"""The agent's own CPU per peer at a join and a mass removal, in memory: `python -m bench.pace_cpu`.

No kernel, no etcd, no root: the parts of `python -m bench --pace-only`'s
join and removal that are the agent's Python work, run on the same lease
keys and values (bench.env's IPv4 stack) and timed by CPU (process_time),
each the best of --repeats:

- **judge**: `LeaseBook.reset` of the n-key listing (key parse, JSON decode,
  validation, election: what the watcher does with its first listing);
- **plan+apply (join)**: the vxlan backend's full sync of the n peers on the
  fake kernel (leaseagent.dataplane.fakenetlink): conflict checks, the plan,
  the table reads, the comparison, the requests (the fake's own bookkeeping
  counts here; the real kernel's counts in the kernel's time instead);
- **book delete** and **plan+apply (removal)**: `LeaseBook.delete` of every key,
  then `update` with every peer removed.

It checks what it times: the fake kernel holds the 3n objects after the join
and none after the removal. `--profile` prints cProfile's top functions of
one more run of each part. docs/benchmarks.md, "Join and mass removal at
500-5,000 peers", says what the figures meant for that work; compare them
only within one run (the machine is shared).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import pstats
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path

from bench.env import Stack, peer_subnet
from leaseagent.core.leases import Identity, LeaseBook, PeerChanges
from leaseagent.core.network import parse_network_config
from leaseagent.dataplane.base import DataPlaneSettings
from leaseagent.dataplane.fakenetlink import FakeKernel
from leaseagent.dataplane.vxlan import VxlanBackend

STACK = Stack(label="", prefix="/coreos.com/network", dual=False, agent_name="pace-cpu")
OWN = peer_subnet(0)  # this host's lease: peers are 1..n


@dataclass(frozen=True)
class Item:
    """A listed key, as etcd's KeyValue has it (core.leases.judging.RawLease)."""

    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    lease: int


def listing(n: int) -> list[Item]:
    return [Item(STACK.key(i), STACK.value(i), 10 + i, 10 + i, 77) for i in range(1, n + 1)]


def new_book() -> LeaseBook:
    network = parse_network_config(json.dumps(STACK.network_config()))
    return LeaseBook(layout=STACK.layout, network=network,
                     identity=Identity(own_key=STACK.key(0)))


async def one_run(n: int, items: list[Item], state_dir: Path,
                  timer: Callable[[str, Callable[[], object]], object],
                  atimer: Callable[[str, Callable[[], Awaitable[object]]], Awaitable[object]]
                  ) -> None:
    book = new_book()
    changes = timer("judge", lambda: book.reset(items))
    assert isinstance(changes, PeerChanges) and len(changes.added) == n, "every lease is a peer"
    peers = dict(book.peers)
    fake = FakeKernel()
    host = replace(fake.underlay("eth0", "172.31.0.1/16"), public_ipv6=None)
    settings = DataPlaneSettings(network=book.network, host=host, state_dir=state_dir,
                                 kernel=fake.open)
    backend = VxlanBackend(settings)
    try:
        await backend.prepare()
        await backend.start(OWN)
        await atimer("plan+apply (join)", lambda: backend.sync(peers))
        held = len(fake.routes(settings.route_protocol)) + len(fake.neighbours()) + len(fake.fdb())
        assert held == 3 * n, f"the fake kernel holds {held} objects, not {3 * n}"
        removed: list[PeerChanges] = []
        timer("book delete", lambda: removed.extend(book.delete(kv.key) for kv in items))
        gone = PeerChanges()
        for change in removed:
            gone.extend(change)
        assert len(gone.removed) == n
        await atimer("plan+apply (removal)", lambda: backend.update(gone, {}))
        left = len(fake.routes(settings.route_protocol)) + len(fake.neighbours()) + len(fake.fdb())
        assert left == 0, f"{left} objects left after the removal"
    finally:
        await backend.close()


async def measure(n: int, repeats: int, profile: bool) -> dict[str, float]:
    items = listing(n)
    best: dict[str, float] = {}

    def timer(name: str, fn: Callable[[], object]) -> object:
        started = time.process_time()
        out = fn()
        best[name] = min(best.get(name, float("inf")), time.process_time() - started)
        return out

    async def atimer(name: str, fn: Callable[[], Awaitable[object]]) -> object:
        started = time.process_time()
        out = await fn()
        best[name] = min(best.get(name, float("inf")), time.process_time() - started)
        return out

    with tempfile.TemporaryDirectory(prefix="pace-cpu-") as tmp:
        for _ in range(repeats):
            await one_run(n, items, Path(tmp), timer, atimer)
        if profile:
            prof = cProfile.Profile()

            def ptimer(name: str, fn: Callable[[], object]) -> object:
                return prof.runcall(fn)

            async def patimer(name: str, fn: Callable[[], Awaitable[object]]) -> object:
                prof.enable()
                try:
                    return await fn()
                finally:
                    prof.disable()

            await one_run(n, items, Path(tmp), ptimer, patimer)
            pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--peers", type=lambda v: [int(x) for x in v.split(",") if x],
                   default=[500, 1000, 2000, 5000], help="comma-separated peer counts")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--profile", action="store_true", help="cProfile one more run of each size")
    args = p.parse_args()
    parts = ("judge", "plan+apply (join)", "book delete", "plan+apply (removal)")
    print(f"{'peers':>6}  " + "  ".join(f"{part:>22}" for part in parts)
          + "   (CPU per peer, best of runs)")
    for n in args.peers:
        if n < 1 or n >= 32767:
            raise SystemExit(f"--peers: {n} is not 1..32766 (NETWORK's /24 leases)")
        best = asyncio.run(measure(n, args.repeats, args.profile))
        print(f"{n:>6}  " + "  ".join(f"{best[part] / n * 1e6:>19.1f} us" for part in parts))


if __name__ == "__main__":
    main()
