"""etcd for the lab, the tests and the bench: one member or a cluster, started and stopped by PID.

`Etcd(dir, size)` describes `size` members (m0, m1, ...); `start()` launches
them and returns once every one answers `etcdctl endpoint health`.

- Where: in network namespace `ns` (run through `ip netns exec`) or in the
  caller's; listening on `host` (127.0.0.1 unless told), on the given ports
  or, in the caller's namespace, on free ones. If a free port was taken
  meanwhile, the first `start` tries again with fresh ports.
- What it keeps: member i's data under `<dir>/m<i>/data`, its log in
  `<dir>/m<i>/etcd.log`, its PID and start time in `<dir>/m<i>/etcd.pid`
  (leaseagent.lab.processes), so another process can stop it after a crash.
- TLS (`tls=TlsFiles(...)`): clients speak https:// and must present a
  certificate signed by the CA (--client-cert-auth); peers stay on plain http.
- Stopping: `stop_member(i)` (SIGCONT, SIGTERM, SIGKILL after the grace
  period; the data dir stays, `start_member` brings the member back and it
  rejoins), `stop_all()`, and `close()`, which also removes `dir`.
- `etcdctl(...)`: the v3 client against the live members, run where etcd runs.

Faults (pausing, killing, leader hunting) are the tests' business
(tests/etcd_cluster.py, tests/labfaults.py); a member they SIGSTOP is marked
`paused`, so health checks and etcdctl leave it alone.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from leaseagent.lab import netns, processes
from leaseagent.lab.commands import tool
from leaseagent.lab.errors import LabError
from leaseagent.lab.processes import Process, log_tail


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on at `host`, in this process's namespace, right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class TlsFiles:
    ca: Path
    cert: Path  # the server's
    key: Path
    client_cert: Path | None = None  # what etcdctl presents
    client_key: Path | None = None


@dataclass
class Member:
    name: str
    dir: Path
    host: str
    client_port: int
    peer_port: int
    tls: bool = False
    process: Process | None = None
    paused: bool = False  # SIGSTOPped by a test: holds its sockets open, answers nothing

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://{self.host}:{self.peer_port}"

    @property
    def data_dir(self) -> Path:
        return self.dir / "data"

    @property
    def log_file(self) -> Path:
        return self.dir / "etcd.log"

    @property
    def pid_file(self) -> Path:
        return self.dir / "etcd.pid"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.alive

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None and self.running else None


class Etcd:
    def __init__(self, dir: Path, size: int = 1, *, ns: str | None = None,
                 host: str = "127.0.0.1", ports: Sequence[tuple[int, int]] | None = None,
                 tls: TlsFiles | None = None, log_level: str = "error",
                 extra_args: Sequence[str] = ()) -> None:
        """`ports`: (client, peer) per member; default: free ones (in the caller's
        namespace) or, inside a namespace of the caller's making, 2379/2380 upwards."""
        if ports is not None and len(ports) != size:
            raise LabError(f"etcd: {size} members but {len(ports)} port pairs")
        self.dir = dir
        self.ns = ns
        self.tls = tls
        self.log_level = log_level
        self.extra_args = list(extra_args)
        self._free_ports = ports is None and ns is None
        if ports is None:
            ports = [self._default_ports(host, i) for i in range(size)]
        self.members = [Member(f"m{i}", dir / f"m{i}", host, client, peer, tls=tls is not None)
                        for i, (client, peer) in enumerate(ports)]
        self.token = f"leaseagent-{os.getpid()}-{time.monotonic_ns()}"
        self._started = False

    def _default_ports(self, host: str, i: int) -> tuple[int, int]:
        if self.ns is None:
            return free_port(host), free_port(host)
        return 2379 + 2 * i, 2380 + 2 * i

    # --- addresses -------------------------------------------------------------------

    @property
    def endpoints(self) -> str:
        """All client URLs, comma-separated (what --etcd-endpoints takes)."""
        return ",".join(m.url for m in self.members)

    @property
    def url(self) -> str:
        """The first member's client URL."""
        return self.members[0].url

    def live_urls(self) -> list[str]:
        return [m.url for m in self.members if m.running and not m.paused]

    # --- life cycle ------------------------------------------------------------------

    def argv(self, m: Member) -> list[str]:
        initial = ",".join(f"{x.name}={x.peer_url}" for x in self.members)
        argv = [
            tool("etcd"),
            "--name", m.name,
            "--data-dir", str(m.data_dir),
            "--listen-client-urls", m.url,
            "--advertise-client-urls", m.url,
            "--listen-peer-urls", m.peer_url,
            "--initial-advertise-peer-urls", m.peer_url,
            "--initial-cluster", initial,
            "--initial-cluster-state", "new",
            "--initial-cluster-token", self.token,
            "--logger", "zap",
            "--log-level", self.log_level,
        ]
        if self.tls is not None:
            argv += ["--cert-file", str(self.tls.cert), "--key-file", str(self.tls.key),
                     "--trusted-ca-file", str(self.tls.ca), "--client-cert-auth"]
        return argv + self.extra_args

    def start_member(self, index: int) -> None:
        """Launch member `index` (not waiting for it); on its data dir if it has one, so
        a stopped or killed member rejoins with the same ports and data."""
        m = self.members[index]
        if m.running:
            raise LabError(f"etcd {m.name} already running (pid {m.pid})")
        m.dir.mkdir(parents=True, exist_ok=True)
        m.process = processes.spawn(self.argv(m), log_file=m.log_file, ns=self.ns,
                                    pid_file=m.pid_file)
        m.paused = False

    def start(self, timeout: float = 30.0, attempts: int = 3) -> Etcd:
        """Launch every member that is not running, return once all are healthy.

        The first start on free ports is tried `attempts` times, with fresh ports
        and data dirs each time (a free port can be taken by another process before
        etcd binds it). LabError, with the log's tail, if a member exits or stays
        unhealthy.
        """
        tries = attempts if self._free_ports and not self._started else 1
        for attempt in range(tries):
            for i, m in enumerate(self.members):
                if not m.running:
                    self.start_member(i)
            try:
                self._wait([m for m in self.members if not m.paused], timeout)
            except LabError:
                if attempt == tries - 1:
                    raise
                self.stop_all()
                self.token += "-retry"
                for m in self.members:
                    shutil.rmtree(m.dir, ignore_errors=True)
                    m.client_port, m.peer_port = free_port(m.host), free_port(m.host)
                continue
            self._started = True
            return self
        return self

    def attach(self) -> Etcd:
        """Adopt the members a pid file says are running (etcd started by another process)."""
        for m in self.members:
            m.process = processes.running(m.pid_file)
        self._started = True
        return self

    def wait_healthy(self, *, timeout: float = 30.0, members: Sequence[int] | None = None) -> None:
        """Until every (given) running, unpaused member answers `endpoint health`."""
        which = [self.members[i] for i in (members if members is not None
                                           else range(len(self.members)))]
        self._wait([m for m in which if m.running and not m.paused], timeout)

    def _wait(self, pending: list[Member], timeout: float) -> None:
        """Until each of `pending` answers `endpoint health`; LabError if one exits."""
        deadline = time.monotonic() + timeout
        last = ""
        while pending:
            for m in list(pending):
                if not m.running:
                    code = m.process.returncode if m.process is not None else None
                    raise LabError(f"etcd {m.name} exited ({code}); {m.log_file}:\n"
                                   + log_tail(m.log_file))
                r = self.etcdctl_run([m.url], "endpoint", "health", timeout=2)
                if r.returncode == 0:
                    pending.remove(m)
                else:
                    last = r.stderr.strip()
            if pending and time.monotonic() > deadline:
                raise LabError(f"etcd {[m.name for m in pending]} not healthy after {timeout}s: "
                               f"{last}")
            if pending:
                time.sleep(0.1)

    def healthy(self, index: int = 0) -> bool:
        return self.etcdctl_run([self.members[index].url], "endpoint", "health",
                                timeout=2).returncode == 0

    def send(self, index: int, sig: int) -> bool:
        """Send `sig` to member `index` if it is running (by PID and start time)."""
        proc = self.members[index].process
        return proc is not None and proc.send(sig)

    def stop_member(self, index: int, *, sig: int = signal.SIGTERM, grace: float = 10.0) -> None:
        """Stop member `index` by PID (SIGCONT, `sig`, SIGKILL after `grace` s); its data
        dir stays."""
        m = self.members[index]
        if m.process is not None:
            m.process.stop(first=sig, grace=grace)
        m.paused = False

    def stop_all(self, *, grace: float = 10.0) -> None:
        """Stop every member, one after the other (data dirs stay). Not all at once: a
        leader told to stop hands its leadership to a connected member first and waits up
        to etcd's request timeout (5 s + 2 election timeouts: 7 s) for it to take over,
        which a member stopping too never does. One at a time (0.1-0.3 s each), a leader
        hands over to a running member, and the last member has no peer left to wait for."""
        for index in range(len(self.members)):
            self.stop_member(index, grace=grace)

    def close(self) -> None:
        """Stop every member by PID and remove `dir`; safe to call twice."""
        self.stop_all()
        shutil.rmtree(self.dir, ignore_errors=True)

    # --- etcdctl ---------------------------------------------------------------------

    def etcdctl_run(self, urls: Sequence[str], *args: str, input: bytes | None = None,
                    timeout: float = 5) -> subprocess.CompletedProcess[str]:
        """etcdctl against `urls`; its result whatever it is (exit 124 on a hang)."""
        argv = [tool("etcdctl"), "--endpoints", ",".join(urls), f"--command-timeout={timeout:g}s",
                f"--dial-timeout={min(timeout, 2):g}s"]
        if self.tls is not None:
            argv += ["--cacert", str(self.tls.ca)]
            if self.tls.client_cert and self.tls.client_key:
                argv += ["--cert", str(self.tls.client_cert), "--key", str(self.tls.client_key)]
        argv += args
        if self.ns is not None:
            argv = netns.exec_argv(self.ns, argv)
        try:
            r = subprocess.run(argv, env={**os.environ, "ETCDCTL_API": "3"},
                               capture_output=True, input=input, check=False,
                               timeout=timeout + 10,
                               stdin=subprocess.DEVNULL if input is None else None)
        except subprocess.TimeoutExpired as exc:
            return subprocess.CompletedProcess(argv, 124, "", str(exc))
        return subprocess.CompletedProcess(argv, r.returncode, r.stdout.decode(errors="replace"),
                                           r.stderr.decode(errors="replace"))

    def etcdctl(self, *args: str, input: bytes | None = None, timeout: float = 5,
                urls: Sequence[str] | None = None) -> str:
        """Run etcdctl against the live members (or `urls`); its stdout, LabError with
        its stderr if it fails."""
        # With every member down, still name them: an empty --endpoints means 127.0.0.1:2379.
        urls = urls or self.live_urls() or [m.url for m in self.members]
        r = self.etcdctl_run(urls, *args, input=input, timeout=timeout)
        if r.returncode != 0:
            raise LabError(f"etcdctl {' '.join(args)}: {r.stderr.strip()}")
        return r.stdout


PROXY_PID_FILE = "proxy.pid"  # under the proxy's directory: its PID and start time


def start_grpc_proxy(etcd: Etcd, pdir: Path, *, timeout: float = 30.0) -> tuple[Process, str]:
    """`etcd grpc-proxy start` in front of `etcd`'s members, on a free 127.0.0.1 port (the
    caller's namespace), serving once this returns: the process (stop it by PID:
    `.stop()`; also recorded in `<pdir>/proxy.pid`) and its client URL. Its data and log
    (`proxy.log`) go under `pdir`."""
    listen = free_port()
    proxy = processes.spawn(
        [tool("etcd"), "grpc-proxy", "start",
         "--endpoints", ",".join(m.url.split("://", 1)[1] for m in etcd.members),
         "--listen-addr", f"127.0.0.1:{listen}",
         "--data-dir", str(pdir / "data")],
        log_file=pdir / "proxy.log", pid_file=pdir / PROXY_PID_FILE)
    url = f"http://127.0.0.1:{listen}"
    deadline = time.monotonic() + timeout
    try:
        while etcd.etcdctl_run([url], "endpoint", "health", timeout=2).returncode != 0:
            if not proxy.alive or time.monotonic() > deadline:
                raise LabError(f"etcd grpc-proxy not serving at {url}:\n"
                               + log_tail(pdir / "proxy.log"))
            time.sleep(0.2)
    except BaseException:
        proxy.stop()
        raise
    return proxy, url
