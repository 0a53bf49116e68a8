"""The agent's memory alone, faster than the whole suite: `sudo .venv/bin/python -m bench.memory`.

The same measurement as the suite's --join-sizes (scenarios.join_sizes): for each
size, a fresh agent joins that many vxlan peers; its RSS after the join and after its
first periodic full resync (every 3 s here), and the bytes per added peer from the
smallest size to the largest; beside them, in the same round, the RSS of an interpreter
that only imported the agent's modules ("imports alone", scenarios.python_baseline_rss).
Several rounds (--rounds, each its own namespaces and
etcd) show the spread. The agent's
environment is this process's, so `MALLOC_ARENA_MAX=2 python -m bench.memory` measures
the agent with that setting. The package's bytecode is compiled first, as an install
does: an agent that compiles its modules from source at start (a stale `__pycache__`
under PYTHONDONTWRITEBYTECODE) keeps ~1.4 MiB more. See docs/benchmarks.md, "Memory at
5,000 peers".
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import sys
from typing import Any

import leaseagent
from bench import scenarios
from bench.env import World, as_bench_process, in_world
from leaseagent.store.etcd import EtcdSettings, EtcdStore


async def join(world: World, sizes: list[int], limit: float) -> dict[Any, dict[str, Any]]:
    world.start_etcd()
    store = await EtcdStore.connect(EtcdSettings(endpoints=world.endpoint, timeout=30))
    try:
        await scenarios.put_network_config(store)
        out: dict[Any, dict[str, Any]] = dict(
            await scenarios.join_sizes(world, store, sizes, limit=limit))
    finally:
        await store.close()
    out["imports"] = {"rss_mib": scenarios.python_baseline_rss(world) / 2**20}
    return out


def summary(sizes: list[int], runs: list[dict[Any, dict[str, Any]]]) -> dict[str, Any]:
    small, large = min(sizes), max(sizes)
    out: dict[str, Any] = {"sizes": sizes, "rounds": []}
    for r in runs:
        row: dict[Any, Any] = {
            n: {"after_join_mib": r[n]["rss_after_join_mib"],
                "after_resync_mib": r[n]["rss_after_resync_mib"]} for n in sizes}
        row["imports_alone_mib"] = r["imports"]["rss_mib"]
        if large > small:
            row["per_peer_bytes"] = {
                k: (r[large][f"rss_{k}_mib"] - r[small][f"rss_{k}_mib"]) * 2**20
                / (large - small) for k in ("after_join", "after_resync")}
        out["rounds"].append(row)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="The agent's memory after a join and a resync.")
    p.add_argument("--sizes", default="1000,5000", help="comma-separated peer counts")
    p.add_argument("--rounds", type=int, default=1, help="times the sizes are joined")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds any phase may take")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if not as_bench_process("bench.memory"):
        return 2
    sizes = sorted(int(s) for s in args.sizes.split(",") if s)
    compileall.compile_dir(os.path.dirname(leaseagent.__file__), quiet=1)
    runs = [in_world("bench.memory", lambda world: join(world, sizes, args.timeout))
            for _ in range(args.rounds)]
    results = summary(sizes, runs)
    print(json.dumps(results, indent=1))
    for r in results["rounds"]:
        print(f"imports alone: {r['imports_alone_mib']:.1f} MiB  "
              + "  ".join(f"{n}: {r[n]['after_join_mib']:.1f} / {r[n]['after_resync_mib']:.1f} MiB"
                          for n in sizes)
              + ("  per peer: {after_join:.0f} / {after_resync:.0f} B".format(**r["per_peer_bytes"])
                 if "per_peer_bytes" in r else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
