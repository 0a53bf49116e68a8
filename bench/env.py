"""The bench's world: its namespaces, an etcd, the agent processes, a kernel probe.

- `<tag>h` is the host under test: `eth0` (a veth whose other end `sw0`
  stays in the same namespace) holds 172.31.0.1/16 and fd31::1/64 (nodad),
  the underlay every peer's PublicIP (PublicIPv6) is on; etcd listens on
  127.0.0.1 there; the agents run there, one after the other (the IPv4 one
  under PREFIX, the dual-stack one under PREFIX6). The bench process itself
  enters this namespace (setns on its main thread before any other thread
  exists), so everything it starts is inside.
- `<tag>r` (and `<tag>r6` for the dual-stack part) are the fresh namespaces
  iproute2's `ip -batch` programs for the reference: the same eth0 and vxlan
  device(s), nothing else.

`Stack` holds what differs between the IPv4 and the dual-stack runs: the
prefix, the lease keys and values, the kernel objects of a peer.

Namespaces come from the project's one namespace helper (leaseagent.lab.netns),
etcd from its one launcher (leaseagent.lab.etcd), the agent from
leaseagent.lab.processes. Only namespace-internal addresses are used; nothing
is sent anywhere. Every namespace, process (by PID) and directory is removed
in `World.close()`, which `__main__` runs in a `finally`.
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import errno
import json
import os
import resource
import secrets
import shutil
import signal
import socket
import struct
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Coroutine, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from pathlib import Path
from typing import Any, TypeVar

from leaseagent.core.leases import KeyLayout, LeaseValue
from leaseagent.dataplane import rtnl
from leaseagent.lab import netns, processes
from leaseagent.lab.commands import run
from leaseagent.lab.etcd import Etcd
from leaseagent.lab.etcd import free_port as free_port  # the bench's metrics ports too

T = TypeVar("T")

UNDERLAY = IPv4Network("172.31.0.0/16")
HOST_IP = IPv4Address("172.31.0.1")
NETWORK = IPv4Network("10.0.0.0/9")  # room for 32,767 /24 leases
UNDERLAY6 = IPv6Network("fd31::/64")
HOST_IP6 = IPv6Address("fd31::1")
NETWORK6 = IPv6Network("fd10::/48")  # room for 65,535 /64 leases
PREFIX = "/coreos.com/network"
PREFIX6 = "/bench-dual-stack/network"  # the dual-stack run's own, fresh prefix
ROUTE_PROTOCOL = 76
# The probe's kinds of kernel object: IPv4 and IPv6 (suffix 6; an FDB entry is of
# the family of its remote, `dst`).
KINDS = ("route", "neighbour", "fdb", "route6", "neighbour6", "fdb6")


def sh(*argv: str, check: bool = True, input: str | None = None) -> str:
    """Run a command (no time limit: `ip -batch` of thousands of objects), its stdout."""
    return run(argv, check=check, input=input, timeout=None)


def peer_subnet(i: int) -> IPv4Network:
    """The i-th peer's /24 (i >= 1), from the bottom of NETWORK."""
    return IPv4Network((int(NETWORK.network_address) + (i << 8), 24))


def peer_ip(i: int) -> IPv4Address:
    return IPv4Address(int(UNDERLAY.network_address) + 256 + i)


def peer_mac(i: int, *, ipv6: bool = False) -> str:
    """The i-th peer's VtepMAC (of its IPv6 device: another one, as flannel makes)."""
    return ("02:b6:" if ipv6 else "02:be:") + ":".join(
        f"{(i >> shift) & 255:02x}" for shift in (24, 16, 8, 0))


def peer_subnet6(i: int) -> IPv6Network:
    """The i-th peer's IPv6 /64, at the same position in NETWORK6 as its /24 in NETWORK
    (where the agent pairs them too)."""
    return IPv6Network((int(NETWORK6.network_address) + (i << 64), 64))


def peer_ip6(i: int) -> IPv6Address:
    return IPv6Address(int(UNDERLAY6.network_address) + 256 + i)


def lease_value(i: int) -> str:
    return json.dumps({"PublicIP": str(peer_ip(i)), "BackendType": "vxlan",
                       "BackendData": {"VNI": 1, "VtepMAC": peer_mac(i)}})


@dataclass(frozen=True)
class Stack:
    """One run's flavour: IPv4 (3 kernel objects a peer) or dual-stack (6)."""

    label: str  # "" or "dual-stack ": the table's rows start with it
    prefix: str
    dual: bool
    agent_name: str  # its state directory and log under World.dir
    # The reference namespace's suffix: "" is `<tag>r`, made with the world; any other
    # is a fresh `<tag>r<suffix>` made when the stack's reference is programmed.
    reference: str = ""

    @property
    def layout(self) -> KeyLayout:
        return KeyLayout(self.prefix)

    @property
    def kinds(self) -> tuple[str, ...]:
        return KINDS if self.dual else KINDS[:3]

    @property
    def per_peer(self) -> int:
        return len(self.kinds)

    @property
    def devices(self) -> tuple[str, ...]:
        """The agent's vxlan devices (VNI 1), the IPv4 one first."""
        return ("flannel.1", "flannel-v6.1") if self.dual else ("flannel.1",)

    def network_config(self) -> dict[str, Any]:
        config: dict[str, Any] = {"Network": str(NETWORK), "SubnetLen": 24,
                                  "Backend": {"Type": "vxlan", "VNI": 1, "Port": 8472}}
        if self.dual:
            config |= {"EnableIPv6": True, "IPv6Network": str(NETWORK6), "IPv6SubnetLen": 64}
        return config

    def key(self, i: int) -> str:
        return self.layout.lease_key(peer_subnet(i), peer_subnet6(i) if self.dual else None)

    def value(self, i: int) -> bytes:
        if not self.dual:
            return lease_value(i).encode()
        return LeaseValue(public_ip=peer_ip(i), backend_type="vxlan",
                          backend_data={"VNI": 1, "VtepMAC": peer_mac(i)},
                          public_ipv6=peer_ip6(i),
                          backend_v6_data={"VNI": 1, "VtepMAC": peer_mac(i, ipv6=True)}
                          ).encode()

    def objects(self, i: int) -> list[tuple[str, object]]:
        """(kind, identity) of the i-th peer's objects, as KernelProbe names them."""
        sub = peer_subnet(i)
        out: list[tuple[str, object]] = [
            ("route", sub), ("neighbour", sub.network_address), ("fdb", peer_mac(i))]
        if self.dual:
            sub6 = peer_subnet6(i)
            out += [("route6", sub6), ("neighbour6", sub6.network_address),
                    ("fdb6", peer_mac(i, ipv6=True))]
        return out

    def at_least(self, n: int) -> Callable[[dict[str, int]], bool]:
        return lambda c: all(c[k] >= n for k in self.kinds)

    def at_most(self, n: int) -> Callable[[dict[str, int]], bool]:
        return lambda c: all(c[k] <= n for k in self.kinds)


IPV4 = Stack(label="", prefix=PREFIX, dual=False, agent_name="agent")
DUAL = Stack(label="dual-stack ", prefix=PREFIX6, dual=True, agent_name="agent-dual",
             reference="6")


def ipv4_sized(n: int) -> Stack:
    """The IPv4 stack of an extra join with n peers: its own agent and reference."""
    return replace(IPV4, agent_name=f"agent-{n}", reference=f"s{n}")


def own_index(world: World, stack: Stack) -> int | None:
    """The position of the agent's own /24 as a peer number (peer_subnet(i)), from
    its subnet.env; None before it wrote one. Event peers skip it."""
    try:
        text = (world.dir / stack.agent_name / "subnet.env").read_text()
    except FileNotFoundError:
        return None
    for line in text.splitlines():
        if line.startswith("FLANNEL_SUBNET="):
            subnet = IPv4Network(line.split("=", 1)[1].strip(), strict=False)
            return (int(subnet.network_address) - int(NETWORK.network_address)) >> 8
    return None


def make_underlay(namespaces: netns.Namespaces, ns: str) -> None:
    """Namespace `ns` with eth0 on the underlay: a veth whose other end, sw0, stays in
    `ns` (nothing is plugged into it; the peers are only addresses in leases). The
    IPv6 address is added nodad, so it is usable (the agent's PublicIPv6) at once."""
    namespaces.add(ns)
    netns.veth(ns, "eth0", "sw0")
    netns.address(ns, "eth0", f"{HOST_IP}/{UNDERLAY.prefixlen}")
    netns.address(ns, "eth0", f"{HOST_IP6}/{UNDERLAY6.prefixlen}")
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
    # BENCH_TAG (6 hex digits) names the run's namespaces `lbench<tag>...`, so a caller can
    # tell its own from a concurrent run's (the smoke test); random otherwise.
    tag: str = field(default_factory=lambda: os.environ.get("BENCH_TAG")
                     or secrets.token_hex(3))
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

    def reference_ns(self, stack: Stack) -> str:
        """The reference namespace of `stack`: `<tag>r`, or (the dual-stack run, an extra
        join size) a fresh `<tag>r<suffix>` made now."""
        if not stack.reference:
            return self.ref_ns
        ns = self.ref_ns + stack.reference
        make_underlay(self.namespaces, ns)
        return ns

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

    def agent(self, *, extra_env: dict[str, str], metrics_port: int, stack: Stack = IPV4,
              resync: float = 30.0, extra_args: Sequence[str] = ()) -> Proc:
        """The agent of `stack` (its prefix, state directory and log), a full resync every
        `resync` seconds (+-20 %). A dual-stack agent finds its PublicIPv6 on eth0 (the
        first global address)."""
        state = self.dir / stack.agent_name
        state.mkdir(exist_ok=True)
        proc = Proc([
            os.environ.get("BENCH_PYTHON", "") or _python(), "-m", "leaseagent.agent",
            "--etcd-endpoints", self.endpoint, "--etcd-prefix", stack.prefix,
            "--iface", "eth0", "--public-ip", str(HOST_IP),
            "--subnet-file", str(state / "subnet.env"), "--state-dir", str(state),
            "--node-id", "bench-host", "--metrics-addr", f"127.0.0.1:{metrics_port}",
            "--log-level", "info", "--resync-interval", f"{resync:g}",
            # Deleted leases leave the kernel at once: the event figures measure the data
            # plane's pace, not the hold-down a vanished lease gets by default.
            "--peer-hold-time", "0", *extra_args,
        ], self.dir / f"{stack.agent_name}.log", env={**os.environ, **extra_env})
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


class _IoVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


class _MsgHdr(ctypes.Structure):
    _fields_ = [("name", ctypes.c_void_p), ("namelen", ctypes.c_uint32),
                ("iov", ctypes.POINTER(_IoVec)), ("iovlen", ctypes.c_size_t),
                ("control", ctypes.c_void_p), ("controllen", ctypes.c_size_t),
                ("flags", ctypes.c_int)]


class _MMsgHdr(ctypes.Structure):
    _fields_ = [("hdr", _MsgHdr), ("len", ctypes.c_uint)]


# The probe's loop decodes after a burst (this long without a message), at a device's
# creation (the join's span starts there, and the agent's CPU is read then), or after
# PROBE_BACKLOG messages.
PROBE_QUIET_SECONDS = 0.005
# The reader thread's SCHED_FIFO priority (the kernel's RT throttling keeps 5 % of each
# second for everything else; the thread sleeps between batches), and how long it lets
# a burst gather after each batch: real-time, it would wake for every message, and take
# the core from a sender of one message a syscall (iproute2) at each, which its own
# time then counted (0.32-0.52 s for 500 peers' removal against 36 ms unwatched).
PROBE_PRIORITY = 10
PROBE_GATHER_SECONDS = 0.001
PROBE_BACKLOG = 100_000
_NEWLINK = rtnl.RTM_NEWLINK.to_bytes(2, sys.byteorder)  # nlmsghdr's type, at bytes 4-5


def tell_at_once(batch: Sequence[bytes], untold: int) -> bool:
    """Whether the probe's reader wakes its loop for `batch` (`untold` messages not yet
    told, the batch's among them) before the burst is over: for a device's creation,
    or a backlog too large."""
    return untold >= PROBE_BACKLOG or any(data[4:6] == _NEWLINK for data in batch)


class _Batches:
    """Every datagram queued on a blocking socket in one recvmmsg(2) (MSG_WAITFORONE:
    it waits for the first only). ctypes lets the GIL go for the call, so another
    thread's Python work delays a whole batch by at most one switch interval instead
    of each datagram (Python's socket methods take the GIL back after each one)."""

    SIZE, COUNT = 8192, 1024  # a notification fits NLMSG_GOODSIZE (<= 8 KiB)
    MSG_WAITFORONE = 0x10000

    def __init__(self, sock: socket.socket) -> None:
        self._fd = sock.fileno()
        self._buffers = [ctypes.create_string_buffer(self.SIZE) for _ in range(self.COUNT)]
        self._iovs = (_IoVec * self.COUNT)(*(
            _IoVec(ctypes.cast(b, ctypes.c_void_p), self.SIZE) for b in self._buffers))
        self._msgs = (_MMsgHdr * self.COUNT)()
        for i in range(self.COUNT):
            self._msgs[i].hdr.iov = ctypes.pointer(self._iovs[i])
            self._msgs[i].hdr.iovlen = 1
        self._libc = ctypes.CDLL(None, use_errno=True)

    def receive(self) -> tuple[float, list[bytes]]:
        """When the datagrams queued were received (the clock read before they are
        copied out), and they (waits for one); no datagram when the receive timeout
        passed."""
        n = self._libc.recvmmsg(self._fd, self._msgs, self.COUNT, self.MSG_WAITFORONE, None)
        now = time.perf_counter()
        if n < 0:
            err = ctypes.get_errno()
            if err in (errno.EAGAIN, errno.EINTR):
                return now, []
            raise OSError(err, os.strerror(err))
        return now, [ctypes.string_at(self._buffers[i], self._msgs[i].len) for i in range(n)]


class KernelProbe:
    """Watches the host namespace's rtnetlink broadcasts and timestamps them.

    Tracks our routes (protocol 76), permanent neighbours and permanent FDB
    entries of both families (KINDS) as they come and go, by identity (a
    route's destination, a neighbour's address, an FDB entry's MAC), so that a
    replaced object is not counted twice and the deletion of an object it never
    saw (a deletion's notification no longer says NUD_PERMANENT) is not
    counted at all; and resolves waiters for one object's arrival or removal,
    or for counts. Parses only what it needs. Sees only what happens after it
    was made: a fresh probe counts from zero. Also timestamps the first
    RTM_NEWLINK of each device name (`device_at`): when the agent created its
    vxlan device, where "device -> all objects" is counted from.

    Each datagram is timestamped when it is received, by a thread that does nothing
    else (`_Batches`: it waits without the GIL and takes every datagram queued in one
    call; this process's GIL switch interval is 0.5 ms while a probe runs), and
    decoded in the event loop after, once the burst is over (`tell_at_once`): decoding
    while it comes (~15 us a message: a 5,000-peer removal's 15,000 took as much CPU
    as the agent) took the GIL and a core from the reader and from the agent, and the
    last stamp came 9-95 ms after the agent's own mark of its last acknowledgement
    (docs/benchmarks.md, "Round 7"). Decoding a join's thousands of messages in
    Python (~10 us each) falls behind the kernel, and a stamp taken when a message
    was decoded counted that backlog as the agent's: 16-23 ms at 500 peers, ~0.2 s of
    a mass removal at 5,000 (netlink has no timestamps of its own). The reader runs
    real-time (SCHED_FIFO, where allowed): at the ordinary priority it waited for a
    core behind the agent's own work after its last acknowledgement, and stamped a
    5,000-peer removal 34-57 ms late under load ~3 (up to ~1 s under load 30), while
    iproute2's processes, done, left the cores free (docs/benchmarks.md, "Round 8");
    after each batch it sleeps PROBE_GATHER_SECONDS, so that a burst wakes it about
    once a millisecond, not at every message.
    `netns`: a probe of another namespace (iproute2's reference, timed the same way:
    scenarios.run_reference).
    """

    def __init__(self, netns: str | None = None) -> None:
        # In `netns` (None: this process's namespace): iproute2's reference namespace is
        # watched as the agent's is, so both are timed to the same kind of stamp.
        self._sock = rtnl.new_socket(netns)
        self._sock.setblocking(True)
        self._sock.setsockopt(socket.SOL_SOCKET, rtnl.SO_RCVBUFFORCE, 256 * 1024 * 1024)
        self._sock.bind((0, rtnl.RTMGRP_LINK | rtnl.RTMGRP_NEIGH | rtnl.RTMGRP_IPV4_ROUTE
                         | rtnl.RTMGRP_IPV6_ROUTE))
        # Blocking, with a receive timeout: a burst is over after this long without a
        # message (`tell_at_once`), and the reader looks at `_closed` this often.
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO,
                              struct.pack("ll", 0, int(PROBE_QUIET_SECONDS * 1e6)))
        self._received: collections.deque[tuple[float, bytes]] = collections.deque()
        self._arrived = asyncio.Event()
        self._reader: threading.Thread | None = None
        self._switch_interval = sys.getswitchinterval()
        self._failed: OSError | None = None
        self.present: dict[str, set[object]] = {k: set() for k in KINDS}
        self.counts = {k: 0 for k in KINDS}
        self.first_at: float | None = None
        self.last_at: float | None = None
        self.device_at: dict[str, float] = {}
        self.on_device: Callable[[str], None] | None = None  # told each new device's name
        # Read by the reader at each burst's end (PROBE_QUIET_SECONDS after its last
        # message), before the loop hears of it: the agent's CPU at the end of a span,
        # not after the loop has decoded the burst (15,000 messages: the agent's own work
        # after its last acknowledgement, ~0.1 s of CPU at 5,000 peers, counted too).
        self.cpu_of: Callable[[], float] | None = None
        self.burst_cpu: float | None = None
        self._waiters: dict[tuple[str, bool, object], asyncio.Future[float]] = {}
        self._count_waiters: list[tuple[Callable[[dict[str, int]], bool], asyncio.Future[float]]] \
            = []
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        sys.setswitchinterval(0.0005)
        self._reader = threading.Thread(target=self._read, args=(loop,), daemon=True,
                                        name="kernel-probe")
        self._reader.start()
        self._task = loop.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if not self._closed:
            self._closed = True
            if self._reader is not None:
                await asyncio.to_thread(self._reader.join)
                sys.setswitchinterval(self._switch_interval)
            self._sock.close()

    def _read(self, loop: asyncio.AbstractEventLoop) -> None:
        """The reader thread: every datagram queued, each batch with the time it was
        received (`_Batches`: one recvmmsg, one GIL acquisition, per batch)."""
        try:
            # Real-time: it wakes as a batch comes, ahead of whatever keeps the cores
            # busy (the agent's own work after its last acknowledgement, other load).
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(PROBE_PRIORITY))
        except OSError:
            pass  # not allowed here: stamped at the ordinary priority
        batches = _Batches(self._sock)
        untold = 0  # datagrams received since the loop was last told
        unread = False  # datagrams received since `burst_cpu` was last read
        while not self._closed:
            try:
                now, got = batches.receive()
            except OSError as exc:  # ENOBUFS: the queue overflowed (the loop raises it)
                if not self._closed:
                    self._failed = exc
                    loop.call_soon_threadsafe(self._arrived.set)
                return
            if not got:  # the receive timeout: a quiet moment (and `_closed` looked at)
                cpu_of = self.cpu_of  # the loop may unset it meanwhile
                if unread and cpu_of is not None:
                    try:
                        self.burst_cpu = cpu_of()  # before the loop resolves a waiter
                    except OSError:  # the process is gone
                        self.burst_cpu = None
                unread = False
                if untold:
                    untold = 0
                    loop.call_soon_threadsafe(self._arrived.set)
                continue
            self._received.extend((now, data) for data in got)
            untold += len(got)
            unread = True
            if tell_at_once(got, untold):
                untold = 0
                # The loop clears `_arrived` before it drains, so a batch added while it
                # drains must wake it again.
                loop.call_soon_threadsafe(self._arrived.set)
            time.sleep(PROBE_GATHER_SECONDS)  # the next batch is stamped <= this late

    def holding(self, objects: Iterable[tuple[str, object]]) -> None:
        """Count `objects` ((kind, identity), as Stack.objects names them) as present: what
        the namespace held before the probe was made, so that their deletions count."""
        for kind, ident in objects:
            self.present[kind].add(ident)
        self.counts = {k: len(v) for k, v in self.present.items()}

    def wait_object(self, kind: str, deleted: bool, ident: object) -> asyncio.Future[float]:
        fut: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self._waiters[(kind, deleted, ident)] = fut
        return fut

    def track_cpu(self, of: Callable[[], float] | None) -> None:
        """Read `of()` (a process's CPU seconds) at each burst's end from now on (None: stop)."""
        self.cpu_of, self.burst_cpu = of, None

    def cpu_at_burst_end(self) -> float:
        """`track_cpu`'s reading at the last burst's end, or now if none was taken."""
        if self.burst_cpu is not None:
            return self.burst_cpu
        assert self.cpu_of is not None, "track_cpu first"
        return self.cpu_of()

    def wait_counts(self, check: Callable[[dict[str, int]], bool]) -> asyncio.Future[float]:
        fut: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        if check(self.counts):
            fut.set_result(time.perf_counter())
        else:
            self._count_waiters.append((check, fut))
        return fut

    def _note(self, kind: str, deleted: bool, ident: object, now: float) -> None:
        objects = self.present[kind]
        if deleted:
            if ident not in objects:
                return
            objects.discard(ident)
        elif ident not in objects:
            objects.add(ident)
            if self.first_at is None:
                self.first_at = now
        self.counts[kind] = len(objects)
        self.last_at = now
        fut = self._waiters.pop((kind, deleted, ident), None)
        if fut is not None and not fut.done():
            fut.set_result(now)
        if self._count_waiters:  # told the time of the message that met them
            keep = []
            for check, fut in self._count_waiters:
                if fut.done():
                    continue
                if check(self.counts):
                    fut.set_result(now)
                else:
                    keep.append((check, fut))
            self._count_waiters = keep

    def _events(self) -> Iterator[tuple[float, int, bytes]]:
        """What the reader received so far: (when, type, body) of each message."""
        received = self._received
        while received:
            now, data = received.popleft()
            for kind, _flags, _seq, _pid, start, end in rtnl.messages(data):
                yield now, kind, data[start:end]

    async def _run(self) -> None:
        while True:
            await self._arrived.wait()
            self._arrived.clear()
            if self._failed is not None:
                raise self._failed
            for now, kind, body in self._events():
                if kind == rtnl.RTM_NEWLINK:
                    name = rtnl.decode_link(body, 0, len(body))[2]
                    if name is not None and name not in self.device_at:
                        self.device_at[name] = now
                        if self.on_device is not None:
                            self.on_device(name)
                elif kind in (rtnl.RTM_NEWROUTE, rtnl.RTM_DELROUTE):
                    if body[5] != ROUTE_PROTOCOL:
                        continue
                    route, _, _ = rtnl.decode_route(body, 0, len(body))
                    if route is not None:
                        which = "route6" if route.dst.version == 6 else "route"
                        self._note(which, kind == rtnl.RTM_DELROUTE, route.dst, now)
                elif kind in (rtnl.RTM_NEWNEIGH, rtnl.RTM_DELNEIGH):
                    n = rtnl.decode_neighbour(body, 0, len(body))
                    deleted = kind == rtnl.RTM_DELNEIGH
                    # A deletion's notification no longer carries NUD_PERMANENT.
                    if n.dst is None or not (deleted or n.state & rtnl.NUD_PERMANENT):
                        continue
                    six = "6" if n.dst.version == 6 else ""
                    if n.family == rtnl.AF_BRIDGE:
                        self._note("fdb" + six, deleted, n.lladdr, now)
                    else:
                        self._note("neighbour" + six, deleted, n.dst, now)


def kernel_listing(stack: Stack, ns: str | None = None) -> dict[str, list[str]]:
    """What iproute2 lists in `ns` (None: this namespace) of `stack`'s kinds, sorted
    lines: our routes, permanent neighbours and FDB remotes on flannel.1 (and
    flannel-v6.1). The same objects list the same in any namespace."""
    where = ["-n", ns] if ns is not None else []
    out: dict[str, list[str]] = {}
    for six, dev in (("", "flannel.1"), ("6", "flannel-v6.1")):
        if six and not stack.dual:
            break
        family = "-6" if six else "-4"
        out["route" + six] = sh("ip", *where, family, "route", "show", "proto",
                                str(ROUTE_PROTOCOL)).splitlines()
        out["neighbour" + six] = sh("ip", *where, family, "neigh", "show", "dev", dev,
                                    "nud", "permanent").splitlines()
        # Only remotes: a device also lists its multicast addresses as "self permanent".
        out["fdb" + six] = [line for line in sh("bridge", *where, "fdb", "show", "dev", dev)
                            .splitlines() if " dst " in line]
    return {k: sorted(v) for k, v in out.items()}


def kernel_objects(stack: Stack, ns: str | None = None) -> dict[str, int]:
    """How many objects of each kind `kernel_listing` finds."""
    return {k: len(v) for k, v in kernel_listing(stack, ns).items()}


def cpu_seconds(pid: int) -> float:
    """CPU time of `pid`'s live threads so far, user and kernel (/proc/PID/task/*/schedstat:
    nanoseconds on a CPU; the kernel's work for its netlink requests runs in its
    sendmsg, so it counts here). A count of work that a machine shared with other
    load does not stretch as it stretches wall time."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (FileNotFoundError, ProcessLookupError):  # a thread that just ended
            continue
    return total / 1e9


def children_cpu_seconds() -> float:
    """CPU time (user and kernel) of this process's children that have ended (`sh`'s)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def proc_sample(pid: int) -> dict[str, float]:
    """RSS (bytes; and its anonymous and file-backed parts), CPU seconds, context switches
    and threads (all threads), open file descriptors."""
    ticks = os.sysconf("SC_CLK_TCK")
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()
    cpu = (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
    memory = {"VmRSS": 0.0, "RssAnon": 0.0, "RssFile": 0.0, "VmHWM": 0.0}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name = line.split(":", 1)[0]
        if name in memory:
            memory[name] = float(line.split()[1]) * 1024
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
        except (FileNotFoundError, ProcessLookupError):  # a thread that just ended
            continue
    return {"rss": memory["VmRSS"], "rss_anon": memory["RssAnon"], "rss_file": memory["RssFile"],
            "rss_peak": memory["VmHWM"], "cpu": cpu, "voluntary": voluntary,
            "involuntary": involuntary, "threads": threads,
            "fds": len(os.listdir(f"/proc/{pid}/fd"))}


# -- a benchmark as a process ---------------------------------------------------------


def as_bench_process(name: str) -> bool:
    """Ready this process to run benchmark `name`: False (with one line) when not root;
    else SIGTERM raises SystemExit, so every World is removed on the way out."""
    if os.geteuid() != 0:
        print(f"{name}: needs root (network namespaces)", file=sys.stderr)
        return False

    def terminate(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminate)
    return True


def in_world(name: str, run: Callable[[World], Coroutine[Any, Any, T]]) -> T:
    """`run(world)` in a fresh World under asyncio; the World removed afterwards, also
    on failure or SIGTERM, and what could not be removed said (prefixed `name`)."""
    world = World()
    try:
        world.build()
        return asyncio.run(run(world))
    finally:
        for problem in world.close():
            print(f"{name}: cleanup: {problem}", file=sys.stderr)


def render_table(header: Sequence[str], rows: Sequence[Sequence[str]],
                 machine: dict[str, Any]) -> str:
    """A benchmark's figures as aligned columns under a line naming the machine."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(col.ljust(w) for col, w in zip(row, widths, strict=True)).rstrip()
             for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.insert(0, f"machine: {machine['nproc']} cores, {machine['cpu']}, "
                    f"{machine['memory_gib']} GiB, Linux {machine['kernel']}, "
                    f"Python {machine['python']}")
    return "\n".join(lines)
