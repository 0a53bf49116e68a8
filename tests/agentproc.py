"""Run `leaseagent` as a real process for integration tests, and stop it by PID."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from etcd_server import free_port, stop_process


@contextmanager
def agent_factory(workdir: Path, endpoints: str) -> Iterator[Callable[..., AgentProc]]:
    """make(name, public_ip, **AgentProc fields) -> AgentProc; all stopped by PID at the end."""
    made: list[AgentProc] = []

    def make(name: str, public_ip: str, **kw: Any) -> AgentProc:
        kw.setdefault("endpoints", endpoints)
        agent = AgentProc(workdir=workdir, name=name, public_ip=public_ip, **kw)
        made.append(agent)
        return agent

    try:
        yield make
    finally:
        for agent in made:
            agent.stop()


@dataclass
class AgentProc:
    workdir: Path
    name: str
    endpoints: str
    public_ip: str
    ttl: int = 10
    extra: list[str] = field(default_factory=list)
    metrics_port: int | None = None
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def subnet_file(self) -> Path:
        return self.workdir / f"{self.name}.env"

    @property
    def log_file(self) -> Path:
        return self.workdir / f"{self.name}.log"

    def start(self, *, metrics: bool = False) -> AgentProc:
        if metrics and self.metrics_port is None:
            self.metrics_port = free_port()
        args = [
            sys.executable, "-m", "leaseagent.agent",
            "--etcd-endpoints", self.endpoints,
            "--public-ip", self.public_ip,
            "--subnet-file", str(self.subnet_file),
            "--state-dir", str(self.workdir / f"{self.name}.state"),
            "--lease-ttl", str(self.ttl),
            "--node-id", self.name,
            *self.extra,
        ]
        if self.metrics_port is not None:
            args += ["--metrics-addr", f"127.0.0.1:{self.metrics_port}"]
        with open(self.log_file, "ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                                         env={**os.environ, **self.env})
        return self

    def wait_subnet(self, timeout: float = 20.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.subnet_file.exists():
                for line in self.subnet_file.read_text().splitlines():
                    if line.startswith("FLANNEL_SUBNET="):
                        return line.split("=", 1)[1]
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited {self.proc.returncode}: {self.log()}")
            time.sleep(0.05)
        raise AssertionError(f"{self.name}: no subnet.env after {timeout}s: {self.log()}")

    def log(self) -> str:
        return self.log_file.read_text() if self.log_file.exists() else ""

    def wait_log(self, text: str, timeout: float = 10.0) -> float:
        """Seconds until `text` appears in the log."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if text in self.log():
                return time.monotonic() - start
            time.sleep(0.05)
        raise AssertionError(f"{self.name}: {text!r} not logged within {timeout}s:\n{self.log()}")

    def http(self, path: str) -> tuple[int, str]:
        assert self.metrics_port is not None
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}{path}", timeout=5) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def metric(self, name: str, labels: str = "") -> float | None:
        _, text = self.http("/metrics")
        want = f"{name}{{{labels}}}" if labels else name
        for line in text.splitlines():
            if line.startswith(want + " "):
                return float(line.split()[-1])
        return None

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def wait_exit(self, timeout: float = 15.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
        self.proc = None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None
