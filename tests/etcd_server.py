"""Start a real etcd (Debian's etcd-server) for tests: 127.0.0.1, free ports, temp dir.

Used by the fixtures in tests/conftest.py. The process is stopped by PID
(SIGTERM, then SIGKILL) and its data dir removed, whatever the test did.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path


def stop_process(proc: subprocess.Popen[bytes], *, grace: float = 10.0) -> None:
    """SIGCONT (in case a test paused it), SIGTERM, then SIGKILL after `grace` seconds."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGCONT)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(grace)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class EtcdServer:
    data_dir: Path
    client_port: int = field(default_factory=free_port)
    peer_port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"

    def start(self, timeout: float = 20.0) -> None:
        etcd = shutil.which("etcd")
        if etcd is None:
            raise RuntimeError("etcd not found on PATH (install Debian's etcd-server)")
        log = open(self.data_dir / "etcd.log", "ab")
        self.proc = subprocess.Popen(
            [
                etcd,
                "--name", "test",
                "--data-dir", str(self.data_dir / "data"),
                "--listen-client-urls", self.url,
                "--advertise-client-urls", self.url,
                "--listen-peer-urls", f"http://127.0.0.1:{self.peer_port}",
                "--initial-advertise-peer-urls", f"http://127.0.0.1:{self.peer_port}",
                "--initial-cluster", f"test=http://127.0.0.1:{self.peer_port}",
                "--log-level", "error",
                "--logger", "zap",
            ],
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"etcd exited with {self.proc.returncode}; see {self.data_dir}/etcd.log")
            if self.healthy():
                return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError("etcd did not become healthy in time")

    def healthy(self) -> bool:
        r = subprocess.run(
            ["etcdctl", "--endpoints", self.url, "--command-timeout=1s", "endpoint", "health"],
            env={**os.environ, "ETCDCTL_API": "3"},
            capture_output=True,
            check=False,
        )
        return r.returncode == 0

    def etcdctl(self, *args: str, input: bytes | None = None) -> str:
        r = subprocess.run(
            ["etcdctl", "--endpoints", self.url, *args],
            env={**os.environ, "ETCDCTL_API": "3"},
            capture_output=True,
            input=input,
            check=True,
        )
        return r.stdout.decode()

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
        self.proc = None


def make_etcd() -> EtcdServer:
    return EtcdServer(data_dir=Path(tempfile.mkdtemp(prefix="leaseagent-etcd-")))


def remove(server: EtcdServer) -> None:
    server.stop()
    shutil.rmtree(server.data_dir, ignore_errors=True)


PREFIX = "/coreos.com/network"


def put_config(etcd: EtcdServer, config: dict[str, object], prefix: str = PREFIX) -> None:
    etcd.etcdctl("put", f"{prefix}/config", json.dumps(config))
