"""A real 3-member etcd cluster on 127.0.0.1 for fault tests, and the faults to inflict on it.

Each member gets a free client port and a free peer port and a data dir under
one temp dir. Faults: `kill` (SIGKILL), `stop` (SIGTERM), `restart` (same
ports, same data dir: it rejoins), `pause` (SIGSTOP: the kernel still accepts
connections but nothing answers, a half-open member) and `resume` (SIGCONT).
Operations: `leader()` (from `etcdctl endpoint status -w json`), `compact()`,
`defragment()`.

`close()` stops every member by PID (SIGCONT first, so a paused member can
die of SIGTERM; SIGKILL if it does not) and removes the temp dir; the
fixtures call it in a finalizer, so it runs when a test fails too.

Optional TLS (`tls=TlsFiles(...)`): clients speak https:// and must present a
certificate signed by the CA (--client-cert-auth); peers stay on plain http
on 127.0.0.1.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from etcd_server import free_port


@dataclass(frozen=True)
class TlsFiles:
    ca: Path
    cert: Path
    key: Path
    client_cert: Path | None = None  # what etcdctl presents (root's)
    client_key: Path | None = None


@dataclass
class Member:
    name: str
    data_dir: Path
    tls: bool = False
    client_port: int = field(default_factory=free_port)
    peer_port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    paused: bool = False

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.running and self.proc is not None else None


class EtcdCluster:
    def __init__(self, size: int = 3, *, tls: TlsFiles | None = None,
                 extra_args: list[str] | None = None) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="leaseagent-etcd-cluster-"))
        self.tls = tls
        self.extra_args = list(extra_args or [])
        self.members = [Member(f"m{i}", self.dir / f"m{i}", tls=tls is not None)
                        for i in range(size)]
        self.token = f"cluster-{os.getpid()}-{time.monotonic_ns()}"

    # --- addresses -------------------------------------------------------------------

    @property
    def endpoints(self) -> str:
        """All client URLs, comma-separated (what --etcd-endpoints takes)."""
        return ",".join(m.url for m in self.members)

    def endpoints_starting_with(self, index: int) -> str:
        order = self.members[index:] + self.members[:index]
        return ",".join(m.url for m in order)

    # --- life cycle ------------------------------------------------------------------

    def _args(self, m: Member) -> list[str]:
        etcd = shutil.which("etcd")
        if etcd is None:
            raise RuntimeError("etcd not found on PATH (install Debian's etcd-server)")
        initial = ",".join(f"{x.name}={x.peer_url}" for x in self.members)
        args = [
            etcd,
            "--name", m.name,
            "--data-dir", str(m.data_dir / "data"),
            "--listen-client-urls", m.url,
            "--advertise-client-urls", m.url,
            "--listen-peer-urls", m.peer_url,
            "--initial-advertise-peer-urls", m.peer_url,
            "--initial-cluster", initial,
            "--initial-cluster-state", "new",
            "--initial-cluster-token", self.token,
            "--log-level", "error",
            "--logger", "zap",
        ]
        if self.tls is not None:
            args += ["--cert-file", str(self.tls.cert), "--key-file", str(self.tls.key),
                     "--trusted-ca-file", str(self.tls.ca), "--client-cert-auth"]
        return args + self.extra_args

    def _spawn(self, m: Member) -> None:
        m.data_dir.mkdir(parents=True, exist_ok=True)
        with open(m.data_dir / "etcd.log", "ab") as log:
            m.proc = subprocess.Popen(self._args(m), stdout=log, stderr=log,
                                      stdin=subprocess.DEVNULL, start_new_session=True)
        m.paused = False

    def start(self, timeout: float = 30.0, attempts: int = 3) -> EtcdCluster:
        """Start every member; on failure (e.g. a free port taken meanwhile by another
        process) stop them all and try again with fresh ports and data dirs."""
        for attempt in range(attempts):
            for m in self.members:
                self._spawn(m)
            try:
                self.wait_healthy(timeout=timeout)
                return self
            except RuntimeError:
                self._stop_all()
                if attempt == attempts - 1:
                    raise
                self.token += "-retry"
                for m in self.members:
                    shutil.rmtree(m.data_dir, ignore_errors=True)
                    m.client_port, m.peer_port = free_port(), free_port()
        return self

    def wait_healthy(self, *, timeout: float = 30.0, members: list[int] | None = None) -> None:
        """Until every (given) running, unpaused member answers a linearizable read."""
        which = [self.members[i] for i in (members if members is not None else
                                           range(len(self.members)))]
        deadline = time.monotonic() + timeout
        pending = [m for m in which if m.running and not m.paused]
        while pending:
            for m in list(pending):
                if m.proc is not None and m.proc.poll() is not None:
                    raise RuntimeError(f"etcd {m.name} exited with {m.proc.returncode}; "
                                       f"see {m.data_dir}/etcd.log")
                if self._healthy(m):
                    pending.remove(m)
            if pending and time.monotonic() > deadline:
                raise RuntimeError(f"etcd {[m.name for m in pending]} not healthy in {timeout}s")
            if pending:
                time.sleep(0.1)

    def _healthy(self, m: Member) -> bool:
        r = self._etcdctl_run([m.url], "endpoint", "health", timeout=2)
        return r.returncode == 0

    def kill(self, index: int) -> None:
        """SIGKILL: the member dies at once, connections are reset."""
        m = self.members[index]
        if m.proc is not None and m.running:
            os.kill(m.proc.pid, signal.SIGKILL)
            m.proc.wait(10)
        m.paused = False

    def stop(self, index: int) -> None:
        """SIGTERM (SIGKILL after 10 s)."""
        m = self.members[index]
        if m.proc is None:
            return
        if m.running:
            if m.paused:
                os.kill(m.proc.pid, signal.SIGCONT)
            os.kill(m.proc.pid, signal.SIGTERM)
            try:
                m.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(m.proc.pid, signal.SIGKILL)
                m.proc.wait(10)
        m.paused = False

    def restart(self, index: int, *, wait: bool = True) -> None:
        """Start a stopped or killed member again (same ports and data: it rejoins)."""
        m = self.members[index]
        if m.running:
            self.stop(index)
        self._spawn(m)
        if wait:
            self.wait_healthy(members=[index])

    def pause(self, index: int) -> None:
        """SIGSTOP: the process holds its sockets open and answers nothing (half-open)."""
        m = self.members[index]
        if m.proc is not None and m.running:
            os.kill(m.proc.pid, signal.SIGSTOP)
            m.paused = True

    def resume(self, index: int) -> None:
        m = self.members[index]
        if m.proc is not None and m.running:
            os.kill(m.proc.pid, signal.SIGCONT)
        m.paused = False

    def kill_all(self) -> None:
        for i in range(len(self.members)):
            self.kill(i)

    def pause_all(self) -> None:
        for i in range(len(self.members)):
            self.pause(i)

    def resume_all(self) -> None:
        for i in range(len(self.members)):
            self.resume(i)

    def close(self) -> None:
        """Stop every member by PID and remove the data dirs; safe to call twice."""
        self._stop_all()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _stop_all(self) -> None:
        for m in self.members:
            proc = m.proc
            if proc is None:
                continue
            if proc.poll() is None:
                try:
                    os.kill(proc.pid, signal.SIGCONT)
                    os.kill(proc.pid, signal.SIGTERM)
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    os.kill(proc.pid, signal.SIGKILL)
                    proc.wait(10)
                except ProcessLookupError:
                    pass
            m.proc = None

    # --- etcdctl ---------------------------------------------------------------------

    def _live_urls(self) -> list[str]:
        return [m.url for m in self.members if m.running and not m.paused]

    def _etcdctl_run(self, urls: list[str], *args: str, input: bytes | None = None,
                     timeout: float = 5) -> subprocess.CompletedProcess[bytes]:
        cmd = ["etcdctl", "--endpoints", ",".join(urls), f"--command-timeout={timeout}s",
               f"--dial-timeout={min(timeout, 2)}s"]
        if self.tls is not None:
            cmd += ["--cacert", str(self.tls.ca)]
            if self.tls.client_cert and self.tls.client_key:
                cmd += ["--cert", str(self.tls.client_cert), "--key", str(self.tls.client_key)]
        try:
            return subprocess.run(cmd + list(args), env={**os.environ, "ETCDCTL_API": "3"},
                                  capture_output=True, input=input, check=False,
                                  timeout=timeout + 10)
        except subprocess.TimeoutExpired as exc:
            return subprocess.CompletedProcess(cmd, 124, b"", str(exc).encode())

    def etcdctl(self, *args: str, input: bytes | None = None, timeout: float = 5,
                urls: list[str] | None = None) -> str:
        """Run etcdctl against the live members; raise with its stderr if it fails."""
        r = self._etcdctl_run(urls or self._live_urls(), *args, input=input, timeout=timeout)
        if r.returncode != 0:
            raise RuntimeError(f"etcdctl {' '.join(args)} failed: {r.stderr.decode().strip()}")
        return r.stdout.decode()

    def status(self) -> dict[str, dict[str, object]]:
        """member name -> its `endpoint status` (live, unpaused members only)."""
        out: dict[str, dict[str, object]] = {}
        for m in self.members:
            if not m.running or m.paused:
                continue
            r = self._etcdctl_run([m.url], "endpoint", "status", "-w", "json", timeout=2)
            if r.returncode != 0:
                continue
            for item in json.loads(r.stdout):
                out[m.name] = item["Status"]
        return out

    def leader(self, timeout: float = 10.0) -> int:
        """Index of the current leader (waits while an election is going on)."""
        deadline = time.monotonic() + timeout
        while True:
            for name, st in self.status().items():
                header = st["header"]
                assert isinstance(header, dict)
                if st["leader"] == header["member_id"]:
                    return int(name[1:])
            if time.monotonic() > deadline:
                raise RuntimeError("no etcd leader")
            time.sleep(0.1)

    def revision(self) -> int:
        out = json.loads(self.etcdctl("get", "--prefix", "/", "--limit", "1", "-w", "json"))
        return int(out["header"]["revision"])

    def compact(self, revision: int | None = None) -> int:
        """Compact up to `revision` (default: the current one); returns it."""
        rev = revision if revision is not None else self.revision()
        self.etcdctl("compact", str(rev), "--physical")
        return rev

    def defragment(self, index: int | None = None) -> None:
        """Defragment one member, or every live one."""
        urls = [self.members[index].url] if index is not None else self._live_urls()
        for url in urls:
            self.etcdctl("defrag", urls=[url], timeout=30)

    def get_prefix(self, prefix: str) -> dict[str, tuple[bytes, int]]:
        """key -> (value, etcd lease id) under prefix."""
        out = json.loads(self.etcdctl("get", "--prefix", prefix, "-w", "json"))
        res = {}
        for kv in out.get("kvs", []):
            key = base64.b64decode(kv["key"]).decode()
            res[key] = (base64.b64decode(kv.get("value", "")), int(kv.get("lease", 0)))
        return res
