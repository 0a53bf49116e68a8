"""Run leasectl as a process against a test etcd."""

from __future__ import annotations

import subprocess
import sys

from etcd_server import EtcdServer


def leasectl(etcd: EtcdServer, *args: str, input: bytes | None = None
             ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "leaseagent.cli.leasectl", "--etcd-endpoints", etcd.url, *args],
        capture_output=True, text=True, input=input.decode() if input else None, timeout=60,
    )
