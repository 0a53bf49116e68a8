"""Hostile or careless settings: credentials in an etcd URL.

A URL such as `https://user:pw@host:2379` used to be accepted, its credentials
silently ignored (gRPC connects without them), and the whole URL printed in the
agent's start-up line. It is refused, exit 2, one line that points at
--etcd-password-file, and the password appears nowhere (stdout, stderr, log),
whether it came as a flag or as LEASEAGENT_ETCD_ENDPOINTS.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

PASSWORD = "s3cret-Pw-9f2c"


def _one_line(text: str) -> str:
    assert "Traceback" not in text, text
    lines = [line for line in text.strip().splitlines() if line.strip()]
    assert len(lines) == 1, text
    return lines[0]


def _agent(tmp_path: Path, *flags: str, env: dict[str, str] | None = None
           ) -> subprocess.CompletedProcess[str]:
    """The agent as a process that must stop at its checks (it is killed after 30 s)."""
    argv = [sys.executable, "-m", "leaseagent.agent", "--public-ip", "10.200.0.1",
            "--subnet-file", str(tmp_path / "subnet.env"), "--state-dir", str(tmp_path / "state"),
            "--log-format", "text", *flags]
    return subprocess.run(argv, capture_output=True, text=True, timeout=30,
                          env={**os.environ, **(env or {})})


def test_credentials_in_an_etcd_url_are_refused_and_never_printed(etcd, tmp_path: Path) -> None:
    host_port = etcd.url.split("://", 1)[1]
    url = f"http://leaseagent:{PASSWORD}@{host_port}"
    for flags, env in ((["--etcd-endpoints", url], {}),
                       ([], {"LEASEAGENT_ETCD_ENDPOINTS": f"{etcd.url},{url}"})):
        result = _agent(tmp_path, *flags, env=env)
        assert result.returncode == 2
        line = _one_line(result.stderr)
        assert "holds credentials" in line and "--etcd-password-file" in line, line
        assert ("LEASEAGENT_ETCD_ENDPOINTS" in line) == bool(env), line
        assert PASSWORD not in result.stdout + result.stderr
        assert not (tmp_path / "subnet.env").exists()
    ctl = subprocess.run([sys.executable, "-m", "leaseagent.cli.leasectl", "--etcd-endpoints", url,
                          "list"], capture_output=True, text=True, timeout=60)
    assert ctl.returncode == 2
    assert "holds credentials" in _one_line(ctl.stderr)
    assert PASSWORD not in ctl.stdout + ctl.stderr
    assert etcd.etcdctl("get", "--prefix", "/coreos.com/network/subnets/") == ""  # nothing taken


def test_a_malformed_endpoint_is_one_line_not_a_traceback(tmp_path: Path) -> None:
    result = _agent(tmp_path, "--etcd-endpoints", "http://[::1")
    assert result.returncode == 2
    assert "is not an http(s)://HOST:PORT URL" in _one_line(result.stderr)
