"""Run leasectl as a process against a test etcd."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from etcd_server import EtcdServer


def leasectl(etcd: EtcdServer, *args: str, input: bytes | None = None
             ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "leaseagent.cli.leasectl", "--etcd-endpoints", etcd.url, *args],
        capture_output=True, text=True, input=input.decode() if input else None, timeout=60,
    )


def leasectl_all(etcd: EtcdServer, *commands: Sequence[str]
                 ) -> list[subprocess.CompletedProcess[str]]:
    """`leasectl(etcd, *command)` for each command, four at a time (each a process that
    spends ~0.5 s of CPU starting): for commands that do not depend on one another's
    effects. Results in the order given."""
    with ThreadPoolExecutor(min(4, len(commands))) as pool:
        return list(pool.map(lambda command: leasectl(etcd, *command), commands))
