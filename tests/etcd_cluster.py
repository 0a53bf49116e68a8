"""A real 3-member etcd cluster on 127.0.0.1 for fault tests, and the faults to inflict on it.

Launched by the project's one etcd launcher (leaseagent.lab.etcd): each
member gets a free client port and a free peer port and a data dir under one
temp dir. Faults: `kill` (SIGKILL), `stop` (SIGTERM), `restart` (same ports,
same data dir: it rejoins), `pause` (SIGSTOP: the kernel still accepts
connections but nothing answers, a half-open member) and `resume` (SIGCONT).
Operations: `leader()` (from `etcdctl endpoint status -w json`), `compact()`,
`defragment()`. `pause_member`/`resume_member` also serve the lab's etcd
(tests/labfaults.py).

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
import signal
import tempfile
import time
from pathlib import Path

from leaseagent.lab.etcd import Etcd, TlsFiles

__all__ = ["EtcdCluster", "TlsFiles", "pause_member", "resume_member"]


def pause_member(etcd: Etcd, index: int) -> None:
    """SIGSTOP: the process holds its sockets open and answers nothing (half-open)."""
    if etcd.send(index, signal.SIGSTOP):
        etcd.members[index].paused = True


def resume_member(etcd: Etcd, index: int) -> None:
    """SIGCONT (harmless if it was not paused)."""
    etcd.send(index, signal.SIGCONT)
    etcd.members[index].paused = False


class EtcdCluster(Etcd):
    def __init__(self, size: int = 3, *, tls: TlsFiles | None = None,
                 extra_args: list[str] | None = None) -> None:
        super().__init__(Path(tempfile.mkdtemp(prefix="leaseagent-etcd-cluster-")), size,
                         tls=tls, extra_args=extra_args or ())

    def endpoints_starting_with(self, index: int) -> str:
        order = self.members[index:] + self.members[:index]
        return ",".join(m.url for m in order)

    # --- faults ----------------------------------------------------------------------

    def kill(self, index: int) -> None:
        """SIGKILL: the member dies at once, connections are reset."""
        self.stop_member(index, sig=signal.SIGKILL)

    def stop(self, index: int) -> None:
        """SIGTERM (SIGKILL after 10 s)."""
        self.stop_member(index)

    def restart(self, index: int, *, wait: bool = True) -> None:
        """Start a stopped or killed member again (same ports and data: it rejoins)."""
        if self.members[index].running:
            self.stop(index)
        self.start_member(index)
        if wait:
            self.wait_healthy(members=[index])

    def pause(self, index: int) -> None:
        pause_member(self, index)

    def resume(self, index: int) -> None:
        resume_member(self, index)

    def kill_all(self) -> None:
        for i in range(len(self.members)):
            self.kill(i)

    def pause_all(self) -> None:
        for i in range(len(self.members)):
            self.pause(i)

    def resume_all(self) -> None:
        for i in range(len(self.members)):
            self.resume(i)

    # --- cluster state ---------------------------------------------------------------

    def status(self) -> dict[str, dict[str, object]]:
        """member name -> its `endpoint status` (live, unpaused members only)."""
        out: dict[str, dict[str, object]] = {}
        for m in self.members:
            if not m.running or m.paused:
                continue
            r = self.etcdctl_run([m.url], "endpoint", "status", "-w", "json", timeout=2)
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
        urls = [self.members[index].url] if index is not None else self.live_urls()
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
