"""Run `leaseagent` as a real process for integration tests, and stop it by PID.

Started and stopped with leaseagent.lab.processes (by PID and start time;
SIGCONT, SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import os
import signal
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from leaseagent.lab import processes
from leaseagent.lab.etcd import free_port
from leaseagent.lab.probes import parse_metrics


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
        # All at once (SIGTERM to each, then the waits), not one after the other: each
        # agent's shutdown (its lease kept or released, its watch closed) overlaps the
        # others'.
        processes.stop([a.proc for a in made if a.proc is not None])
        for agent in made:
            agent.proc = None


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
    proc: processes.Process | None = None

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
        self.proc = processes.spawn(args, log_file=self.log_file, env={**os.environ, **self.env},
                                    new_session=False)
        return self

    def wait_subnet(self, timeout: float = 20.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.subnet_file.exists():
                for line in self.subnet_file.read_text().splitlines():
                    if line.startswith("FLANNEL_SUBNET="):
                        return line.split("=", 1)[1]
            if self.proc is not None and not self.proc.alive:
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
        return parse_metrics(text).get(f"{name}{{{labels}}}" if labels else name)

    def signal(self, sig: int) -> None:
        if self.proc is not None:
            self.proc.send(sig)

    def wait_exit(self, timeout: float = 15.0) -> int:
        assert self.proc is not None
        code = self.proc.wait(timeout)
        assert code is not None
        return code

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
        self.proc = None

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.stop(first=signal.SIGKILL)
        self.proc = None
