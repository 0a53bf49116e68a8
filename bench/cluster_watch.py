"""etcd's side of H hosts' watch fan-out, with real watch clients and no agents.

    python -m bench.cluster_watch --watchers 1000,10000 --writes 250 [--via etcd,proxy]
                                  [--workers 4] [--limit 900] [--json FILE]

What `python -m bench.cluster` cannot simulate at 10,000 hosts on this
machine (each simulated agent keeps and judges every peer: H^2 peer records
and deliveries in Python) is measured here from etcd's side: H real watch
clients, each its own gRPC channel (its own TCP connection, as each host has)
and one Watch stream on the subnets prefix, as each agent's watcher opens;
and the writes of `--writes` hosts acquiring a lease as the agent does (a
LeaseGrant with the agent's default TTL, 24 h, then a create-if-absent Txn
of its lease key with a flannel-shaped value, through the agent's own
EtcdStore), 64 at a time, every watch stream open before the first. Each
write is one watch event per watcher: H x writes deliveries.

Measured, per run: the deliveries counted at the clients; the events the
members' watchers sent (`etcd_debugging_mvcc_events_total`); the members'
CPU (/proc) over the phase, and above their idle rate; the proxy's CPU
(`--via proxy`: one `etcd grpc-proxy start` in front of the members, every
client's only endpoint); the clients' CPU; the time from the first write to
the last delivery. What it leaves out: the agents' own work (judging,
planning, their unary requests: ~6 a host), the config key's watch (no
events), keepalives (none within a run at a 24 h TTL: one every 8 h), and
writes beyond `--writes` (a cold start of H hosts is H writes, ~H^2
deliveries; each write is fanned out to the same H watchers, so its cost
is the measured per-delivery cost times H^2 if it stays linear).

Clients are grouped `--watchers`/`--workers` per process; every member,
proxy and client is stopped by PID (bench.cluster's reaper covers a driver
killed outright).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

from etcd3aio.kv import prefix_range_end

from bench.cluster import (
    PREFIX,
    UNDERLAY_BASE,
    Reaper,
    WorkerProc,
    cpu_seconds,
    delta,
    member_sample,
    network_config,
    proxy_delta,
    proxy_sample,
    raise_fd_limit,
    rss_bytes,
    start_proxy,
    stop_workers,
)
from leaseagent.config import DEFAULT_LEASE_TTL
from leaseagent.core.leases import KeyLayout, LeaseValue
from leaseagent.errors import StoreUnavailable
from leaseagent.lab import processes
from leaseagent.lab.etcd import Etcd
from leaseagent.lab.processes import Process
from leaseagent.store.etcd import EtcdSettings, EtcdStore

SUBNETS = KeyLayout(PREFIX).subnets_prefix
WRITERS = 64  # hosts acquiring at once


# -- a worker: its share of the watch clients ---------------------------------------------


class Watchers:
    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.counts = [0] * int(spec["count"])
        self.created = 0
        self.channels: list[Any] = []
        self.tasks: list[asyncio.Task[None]] = []
        self.errors: list[str] = []

    async def watch(self, i: int, target: str) -> None:
        """One client: its own channel, one Watch stream on the subnets prefix."""
        import grpc
        from etcd3aio.proto.etcd.api.etcdserverpb import rpc_pb2, rpc_pb2_grpc

        pb: Any = rpc_pb2
        channel = grpc.aio.insecure_channel(target)
        self.channels.append(channel)
        call = rpc_pb2_grpc.WatchStub(channel).Watch()
        await call.write(pb.WatchRequest(create_request=pb.WatchCreateRequest(
            key=SUBNETS.encode(), range_end=prefix_range_end(SUBNETS.encode()),
            start_revision=int(self.spec["start_revision"]))))
        counts = self.counts
        async for resp in call:
            if resp.created:
                self.created += 1
            if resp.canceled or resp.compact_revision:
                self.errors.append(f"watch {i}: canceled {resp.cancel_reason!r}")
                return
            counts[i] += len(resp.events)

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        targets = self.spec["targets"]
        first = int(self.spec["first"])
        for i in range(len(self.counts)):  # each client to one endpoint, spread over them
            self.tasks.append(asyncio.ensure_future(
                self.watch(i, targets[(first + i) % len(targets)])))
            if i % 100 == 99:
                await asyncio.sleep(0)
        while self.created < len(self.counts) and not self.errors:
            if any(t.done() for t in self.tasks):
                self.errors += [repr(t.exception()) for t in self.tasks
                                if t.done() and not t.cancelled() and t.exception()][:3]
                break
            await asyncio.sleep(0.1)
        _say({"created": self.created, "errors": self.errors[:3]})
        try:
            while line := await reader.readline():
                cmd = json.loads(line)
                if cmd["do"] == "count":
                    want = int(cmd["want"])
                    _say({"events": sum(self.counts), "done": sum(c >= want for c in self.counts),
                          "min": min(self.counts), "errors": self.errors[:3],
                          "rss_bytes": rss_bytes()})
                elif cmd["do"] == "stop":
                    break
        finally:
            for t in self.tasks:
                t.cancel()
            await asyncio.gather(*self.tasks, return_exceptions=True)
            await asyncio.gather(*(c.close() for c in self.channels), return_exceptions=True)
            _say({"stopped": True})


def _say(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def worker_main(spec_text: str) -> None:
    logging.basicConfig(level=logging.ERROR, stream=sys.stderr)
    raise_fd_limit()
    asyncio.run(Watchers(json.loads(spec_text)).serve())


# -- the writers: hosts acquiring a lease as the agent does --------------------------------


def lease_value(i: int, backend: str) -> bytes:
    data = {"VtepMAC": f"02:42:{i >> 24 & 255:02x}:{i >> 16 & 255:02x}:{i >> 8 & 255:02x}:"
                       f"{i & 255:02x}"} if backend == "vxlan" else {}
    return LeaseValue(public_ip=IPv4Address(UNDERLAY_BASE + 1 + i), backend_type=backend,
                      backend_data=data, node_id=f"h{i}").encode()


async def write_leases(endpoints: str, writes: int, backend: str) -> dict[str, Any]:
    """`writes` hosts' acquisitions, WRITERS at a time: LeaseGrant, then the Txn creating
    the lease key (the agent's store's own calls). Their wall time."""
    store = await EtcdStore.connect(EtcdSettings(endpoints=endpoints, timeout=60))
    subnets = list(IPv4Network(network_config(writes)["Network"]).subnets(new_prefix=24))
    layout = KeyLayout(PREFIX)
    queue = list(range(writes))
    started = time.monotonic()

    retries = 0

    async def retried(what: Any) -> Any:
        """A request etcd timed out is sent again, as the agent does (up to 10 a write)."""
        nonlocal retries
        while True:
            try:
                return await what()
            except StoreUnavailable:
                retries += 1
                if retries > 10 * writes:
                    raise

    async def writer() -> None:
        while queue:
            i = queue.pop()
            key = layout.lease_key(subnets[i + 1])
            lease, _ttl = await retried(lambda: store.grant(DEFAULT_LEASE_TTL))
            made, held = await retried(
                lambda: store.create(key, lease_value(i, backend), lease=lease))  # noqa: B023
            assert made or (held is not None and held.lease == lease), (i, held)

    try:
        await asyncio.gather(*(writer() for _ in range(WRITERS)))
    finally:
        await store.close()
    return {"writes_s": time.monotonic() - started, "write_retries": retries}


# -- the driver ------------------------------------------------------------------------------


def run_one(*, watchers: int, writes: int, via: str, workers: int, limit: float,
            backend: str) -> dict[str, Any]:
    base = Path(tempfile.mkdtemp(prefix=f"leaseagent-cluster-watch-{via}-{watchers}-",
                                 dir="/dev/shm" if os.path.isdir("/dev/shm") else None))
    print(f"run directory {base}", file=sys.stderr, flush=True)
    reaper = Reaper(base)
    etcd: Etcd | None = None
    proxy: Process | None = None
    procs: list[WorkerProc] = []
    try:
        etcd = Etcd(base / "etcd", 3)
        for m in etcd.members:
            reaper.watch_pid_file(m.pid_file)
        etcd.start()
        if via == "proxy":
            proxy, url = start_proxy(etcd, base / "proxy", reaper)
            endpoints, targets = url, [url.split("://", 1)[1]]
        else:
            endpoints = etcd.endpoints
            targets = [m.url.split("://", 1)[1] for m in etcd.members]
        revision = int(json.loads(etcd.etcdctl(
            "endpoint", "status", "-w", "json", urls=[etcd.url]))[0]["Status"]["header"]
            ["revision"])
        per = -(-watchers // workers)
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        for k in range(workers):
            count = min(per, watchers - k * per)
            if count <= 0:
                break
            spec = {"first": k * per, "count": count, "targets": targets,
                    "start_revision": revision + 1}
            logf = base / f"w{k}.log"
            with logf.open("w") as errs:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "bench.cluster_watch", "--worker", json.dumps(spec)],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errs, text=True,
                    env=env)
            procs.append(WorkerProc(proc, logf))
            reaper.watch_process(Process(proc.pid, processes.start_time(proc.pid) or 0))
        opened = time.monotonic()
        made = [w.answer() for w in procs]
        errors = [e for m in made for e in m["errors"]]
        if errors or sum(m["created"] for m in made) < watchers:
            raise RuntimeError(f"watches not created: {made}")
        out: dict[str, Any] = {"watchers": watchers, "writes": writes, "via": via,
                               "workers": len(procs), "backend": backend,
                               "watches_opened_s": time.monotonic() - opened,
                               "value_bytes": len(lease_value(writes - 1, backend))}
        clients = [w.proc.pid for w in procs]
        idle0 = member_sample(etcd)
        time.sleep(3)
        s0 = (member_sample(etcd), proxy_sample(proxy.pid) if proxy else None,
              cpu_seconds(clients))
        out["etcd_idle"] = delta(idle0, s0[0])
        started = time.monotonic()
        out.update(asyncio.run(write_leases(endpoints, writes, backend)))
        counted: list[dict[str, Any]] = []
        while time.monotonic() - started < limit:
            counted = []
            for w in procs:
                w.send({"do": "count", "want": writes})
                counted.append(w.answer())
            if sum(c["done"] for c in counted) == watchers:
                break
            time.sleep(0.5)
        delivered = time.monotonic() - started
        s1 = (member_sample(etcd), proxy_sample(proxy.pid) if proxy else None,
              cpu_seconds(clients))
        e = delta(s0[0], s1[0])
        idle = out["etcd_idle"]
        out.update({
            "delivered_s": delivered,
            "watchers_complete": sum(c["done"] for c in counted),
            "deliveries": sum(c["events"] for c in counted),
            "errors": [x for c in counted for x in c["errors"]][:3],
            "etcd": e,
            "etcd_cpu_above_idle_s": max(0.0, e["cpu_seconds"]
                                         - idle["cpu_seconds"] / idle["seconds"] * e["seconds"]),
            "clients_cpu_s": s1[2] - s0[2],
            "clients_rss_mib": sum(c["rss_bytes"] for c in counted) / 2**20,
        })
        if proxy is not None:
            out["proxy"] = proxy_delta(s0[1], s1[1])  # type: ignore[arg-type]
        return out
    finally:
        try:
            stop_workers(procs)
            if proxy is not None:
                proxy.stop()
            if etcd is not None:
                etcd.close()
            shutil.rmtree(base, ignore_errors=True)
        finally:
            reaper.close()


def line(r: dict[str, Any]) -> str:
    e = r["etcd"]
    d = max(1, r["deliveries"])
    text = (f"H={r['watchers']:,} watchers via {r['via']}, {r['writes']:,} writes: "
            f"{r['watchers_complete']:,}/{r['watchers']:,} got every write, last at "
            f"{r['delivered_s']:.1f} s (writes {r['writes_s']:.1f} s, "
            f"{r.get('write_retries', 0)} timed out and retried); deliveries "
            f"{r['deliveries']:,}; members sent {e['watch_events_sent']:,.0f} events, "
            f"CPU {e['cpu_seconds']:.1f} s ({r['etcd_cpu_above_idle_s']:.1f} above idle: "
            f"{r['etcd_cpu_above_idle_s'] / d * 1e6:.2f} us a delivery), client bytes "
            f"{(e['client_bytes_sent'] + e['client_bytes_received']) / 1e6:,.0f} MB, "
            f"RSS {e['rss_mib']:.0f} MiB")
    if "proxy" in r:
        p = r["proxy"]
        text += (f"; proxy CPU {p['cpu_seconds']:.1f} s ({p['cpu_seconds'] / d * 1e6:.2f} us "
                 f"a delivery), RSS {p['rss_mib']:.0f} MiB")
    text += (f"; clients CPU {r['clients_cpu_s']:.1f} s "
             f"({r['clients_cpu_s'] / d * 1e6:.2f} us a delivery), RSS "
             f"{r['clients_rss_mib']:,.0f} MiB")
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.cluster_watch",
                                description=__doc__.split("\n")[0])
    p.add_argument("--watchers", default="1000,10000", help="H values, comma-separated")
    p.add_argument("--writes", type=int, default=250, help="hosts acquiring a lease")
    p.add_argument("--via", default="etcd", help="comma-separated: etcd, proxy")
    p.add_argument("--workers", type=int, default=4, help="client processes")
    p.add_argument("--backend", choices=("alloc", "vxlan"), default="alloc",
                   help="the lease values' shape (vxlan: with a VtepMAC)")
    p.add_argument("--limit", type=float, default=900.0, help="longest wait for delivery (s)")
    p.add_argument("--json", type=Path, default=Path("bench-cluster-watch.json"))
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker_main(args.worker)
        return 0
    raise_fd_limit()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    results = []
    for watchers in (int(h) for h in args.watchers.split(",")):
        for via in args.via.split(","):
            results.append(run_one(watchers=watchers, writes=args.writes, via=via,
                                   workers=args.workers, limit=args.limit,
                                   backend=args.backend))
            args.json.write_text(json.dumps(results, indent=1))
            print(line(results[-1]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
