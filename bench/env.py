"""The bench's world: two namespaces, an etcd, the agent process, a kernel probe.

- `<tag>h` is the host under test: `eth0` (a veth whose other end `sw0`
  stays in the same namespace) holds 172.31.0.1/16, the underlay every
  peer's PublicIP is on; etcd listens on 127.0.0.1 there; the agent runs
  there. The bench process itself enters this namespace (setns on its main
  thread before any other thread exists), so everything it starts is inside.
- `<tag>r` is the fresh namespace iproute2's `ip -batch` programs for the
  reference: the same eth0 and vxlan device, nothing else.

Namespaces come from the project's one namespace helper (leaseagent.lab.netns),
etcd from its one launcher (leaseagent.lab.etcd), the agent from
leaseagent.lab.processes. Only namespace-internal addresses are used; nothing
is sent anywhere. Every namespace, process (by PID) and directory is removed
in `World.close()`, which `__main__` runs in a `finally`.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

from leaseagent.core.leases import KeyLayout
from leaseagent.dataplane import rtnl
from leaseagent.lab import netns, processes
from leaseagent.lab.commands import run
from leaseagent.lab.etcd import Etcd
from leaseagent.lab.etcd import free_port as free_port  # the bench's metrics ports too

UNDERLAY = IPv4Network("172.31.0.0/16")
HOST_IP = IPv4Address("172.31.0.1")
NETWORK = IPv4Network("10.0.0.0/9")  # room for 32,767 /24 leases
PREFIX = "/coreos.com/network"
ROUTE_PROTOCOL = 76


def sh(*argv: str, check: bool = True, input: str | None = None) -> str:
    """Run a command (no time limit: `ip -batch` of thousands of objects), its stdout."""
    return run(argv, check=check, input=input, timeout=None)


def peer_subnet(i: int) -> IPv4Network:
    """The i-th peer's /24 (i >= 1), from the bottom of NETWORK."""
    return IPv4Network((int(NETWORK.network_address) + (i << 8), 24))


def peer_ip(i: int) -> IPv4Address:
    return IPv4Address(int(UNDERLAY.network_address) + 256 + i)


def peer_mac(i: int) -> str:
    return "02:be:" + ":".join(f"{(i >> shift) & 255:02x}" for shift in (24, 16, 8, 0))


def lease_value(i: int) -> str:
    return json.dumps({"PublicIP": str(peer_ip(i)), "BackendType": "vxlan",
                       "BackendData": {"VNI": 1, "VtepMAC": peer_mac(i)}})


lease_key = KeyLayout(PREFIX).lease_key


def make_underlay(namespaces: netns.Namespaces, ns: str) -> None:
    """Namespace `ns` with eth0 on the underlay: a veth whose other end, sw0, stays in
    `ns` (nothing is plugged into it; the peers are only addresses in leases)."""
    namespaces.add(ns)
    netns.veth(ns, "eth0", "sw0")
    netns.address(ns, "eth0", f"{HOST_IP}/{UNDERLAY.prefixlen}")
    netns.link_up(ns, "sw0")
    netns.link_up(ns, "eth0")


def enter_netns(ns: str) -> None:
    """Move this (still single-threaded) process's main thread into `ns`."""
    fd = os.open(f"/run/netns/{ns}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        rtnl._libc_setns(fd)
    finally:
        os.close(fd)


@dataclass
class Proc:
    """A process of the bench's (the agent), stopped by PID and start time."""

    argv: list[str]
    log: Path
    env: dict[str, str] | None = None
    process: processes.Process | None = None

    def start(self) -> int:
        self.process = processes.spawn(self.argv, log_file=self.log, env=self.env)
        return self.process.pid

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.alive

    def stop(self, timeout: float = 10) -> None:
        if self.process is not None:
            self.process.stop(grace=timeout)
        self.process = None


@dataclass
class World:
    tag: str = field(default_factory=lambda: secrets.token_hex(3))
    dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(
        prefix="leaseagent-bench-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)))
    namespaces: netns.Namespaces = field(default_factory=netns.Namespaces)
    procs: list[Proc] = field(default_factory=list)
    etcd: Etcd | None = None

    @property
    def host_ns(self) -> str:
        return f"lbench{self.tag}h"

    @property
    def ref_ns(self) -> str:
        return f"lbench{self.tag}r"

    @property
    def endpoint(self) -> str:
        assert self.etcd is not None
        return self.etcd.url

    def build(self) -> None:
        for ns in (self.host_ns, self.ref_ns):
            make_underlay(self.namespaces, ns)
        enter_netns(self.host_ns)

    def start_etcd(self, timeout: float = 20) -> None:
        """One etcd member on 127.0.0.1 in the host namespace (this process is in it)."""
        self.etcd = Etcd(self.dir / "etcd")
        self.etcd.start(timeout=timeout)

    def etcd_metrics(self) -> dict[str, float]:
        """etcd's /metrics: gRPC calls handled/started per method, watch gauges."""
        from prometheus_client.parser import text_string_to_metric_families

        with urllib.request.urlopen(f"{self.endpoint}/metrics", timeout=5) as r:
            text = r.read().decode()
        out: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name in ("grpc_server_handled_total", "grpc_server_started_total"):
                    name = f"{sample.name}:{sample.labels.get('grpc_method')}"
                    out[name] = out.get(name, 0.0) + sample.value
                elif sample.name in ("etcd_debugging_mvcc_watch_stream_total",
                                     "etcd_debugging_mvcc_watcher_total"):
                    out[sample.name] = sample.value
        return out

    def agent(self, *, extra_env: dict[str, str], metrics_port: int) -> Proc:
        state = self.dir / "agent"
        state.mkdir(exist_ok=True)
        proc = Proc([
            os.environ.get("BENCH_PYTHON", "") or _python(), "-m", "leaseagent.agent",
            "--etcd-endpoints", self.endpoint, "--etcd-prefix", PREFIX,
            "--iface", "eth0", "--public-ip", str(HOST_IP),
            "--subnet-file", str(state / "subnet.env"), "--state-dir", str(state),
            "--node-id", "bench-host", "--metrics-addr", f"127.0.0.1:{metrics_port}",
            "--log-level", "info", "--resync-interval", "30",
            # Deleted leases leave the kernel at once: the event figures measure the data
            # plane's pace, not the hold-down a vanished lease gets by default.
            "--peer-hold-time", "0",
        ], self.dir / "agent.log", env={**os.environ, **extra_env})
        self.procs.append(proc)
        return proc

    def close(self) -> list[str]:
        problems = []
        for proc in reversed(self.procs):
            try:
                proc.stop()
            except Exception as exc:
                problems.append(f"stopping {proc.argv[0]}: {exc}")
        if self.etcd is not None:
            try:
                self.etcd.close()
            except Exception as exc:
                problems.append(f"stopping etcd: {exc}")
        problems += self.namespaces.close()
        shutil.rmtree(self.dir, ignore_errors=True)
        return problems


def _python() -> str:
    import sys

    return sys.executable


class KernelProbe:
    """Watches the host namespace's rtnetlink broadcasts and timestamps them.

    Counts our routes (protocol 76), permanent neighbours and permanent FDB
    entries as they appear, and resolves waiters for one object's arrival
    or removal. Parses only what it needs.
    """

    def __init__(self) -> None:
        self._sock = rtnl.RtnlSocket.open(
            None, groups=rtnl.RTMGRP_NEIGH | rtnl.RTMGRP_IPV4_ROUTE, rcvbuf=256 * 1024 * 1024)
        self.counts = {"route": 0, "neighbour": 0, "fdb": 0}
        self.first_at: float | None = None
        self.last_at: float | None = None
        self._waiters: dict[tuple[str, bool, object], asyncio.Future[float]] = {}
        self._count_waiters: list[tuple[Callable[[dict[str, int]], bool], asyncio.Future[float]]] \
            = []
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._sock.close()

    def wait_object(self, kind: str, deleted: bool, ident: object) -> asyncio.Future[float]:
        fut: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self._waiters[(kind, deleted, ident)] = fut
        return fut

    def wait_counts(self, check: Callable[[dict[str, int]], bool]) -> asyncio.Future[float]:
        fut: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        if check(self.counts):
            fut.set_result(time.perf_counter())
        else:
            self._count_waiters.append((check, fut))
        return fut

    def _note(self, kind: str, deleted: bool, ident: object, now: float) -> None:
        self.counts[kind] += -1 if deleted else 1
        if self.first_at is None:
            self.first_at = now
        self.last_at = now
        fut = self._waiters.pop((kind, deleted, ident), None)
        if fut is not None and not fut.done():
            fut.set_result(now)

    async def _run(self) -> None:
        while True:
            events = await self._sock.read_events(frozenset())
            now = time.perf_counter()
            for kind, _pid, body in events:
                if kind in (rtnl.RTM_NEWROUTE, rtnl.RTM_DELROUTE):
                    if body[5] != ROUTE_PROTOCOL:
                        continue
                    route, _, _ = rtnl.decode_route(body, 0, len(body))
                    if route is not None:
                        self._note("route", kind == rtnl.RTM_DELROUTE, route.dst, now)
                elif kind in (rtnl.RTM_NEWNEIGH, rtnl.RTM_DELNEIGH):
                    n = rtnl.decode_neighbour(body, 0, len(body))
                    deleted = kind == rtnl.RTM_DELNEIGH
                    # A deletion's notification no longer carries NUD_PERMANENT.
                    if n.dst is None or not (deleted or n.state & rtnl.NUD_PERMANENT):
                        continue
                    which = "fdb" if n.family == rtnl.AF_BRIDGE else "neighbour"
                    ident = n.lladdr if which == "fdb" else n.dst
                    self._note(which, deleted, ident, now)
            if self._count_waiters:
                keep = []
                for check, fut in self._count_waiters:
                    if fut.done():
                        continue
                    if check(self.counts):
                        fut.set_result(now)
                    else:
                        keep.append((check, fut))
                self._count_waiters = keep


def proc_sample(pid: int) -> dict[str, float]:
    """RSS (bytes), CPU seconds (all threads), context switches (all threads)."""
    ticks = os.sysconf("SC_CLK_TCK")
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()
    cpu = (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
    rss = 0.0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = float(line.split()[1]) * 1024
    voluntary = involuntary = 0
    threads = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        threads += 1
        try:
            for line in (task / "status").read_text().splitlines():
                if line.startswith("voluntary_ctxt_switches:"):
                    voluntary += int(line.split()[1])
                elif line.startswith("nonvoluntary_ctxt_switches:"):
                    involuntary += int(line.split()[1])
        except FileNotFoundError:
            continue
    return {"rss": rss, "cpu": cpu, "voluntary": voluntary, "involuntary": involuntary,
            "threads": threads}
