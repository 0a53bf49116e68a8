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

import pytest

pytestmark = pytest.mark.shared_etcd  # tests/conftest.py: one etcd, emptied before each test

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


def test_a_state_dir_others_may_write_to_is_refused(etcd, tmp_path: Path) -> None:
    """0777, group-writable, owned by another user: exit 2, one line naming the path,
    nothing taken in etcd (the state dir holds the VtepMAC and WireGuard's key)."""
    state = tmp_path / "state"
    for how in ("0777", "0775", "other user"):
        state.mkdir(exist_ok=True)
        os.chown(state, 0, 0)
        state.chmod(0o755)
        if how == "other user":
            os.chown(state, 65534, 65534)
        else:
            state.chmod(int(how, 8))
        result = _agent(tmp_path, "--etcd-endpoints", etcd.url)
        assert result.returncode == 2, (how, result.stderr)
        line = _one_line(result.stderr)
        assert line.endswith(f"--state-dir: {state} is "
                             + {"0777": "writable by others, writable by its group",
                                "0775": "writable by its group",
                                "other user": "owned by uid 65534, not root"}[how]
                             + "; make it root's and mode 0700 or 0755"), line
        assert etcd.etcdctl("get", "--prefix", "/coreos.com/network/subnets/") == ""


def test_a_password_file_others_may_read_is_refused_by_agent_and_leasectl(etcd, tmp_path: Path
                                                                          ) -> None:
    secret = tmp_path / "etcd-password"
    secret.write_text(PASSWORD + "\n")
    for mode, problem in ((0o644, "readable by others"), (0o660, "writable by its group")):
        secret.chmod(mode)
        flags = ["--etcd-endpoints", etcd.url, "--etcd-username", "leaseagent",
                 "--etcd-password-file", str(secret)]
        agent = _agent(tmp_path, *flags)
        ctl = subprocess.run([sys.executable, "-m", "leaseagent.cli.leasectl", *flags, "list"],
                             capture_output=True, text=True, timeout=60)
        for result in (agent, ctl):
            assert result.returncode == 2, result.stderr
            line = _one_line(result.stderr)
            assert f"--etcd-password-file: {secret} is {problem}; keep it root's and mode 0600" \
                in line, line
            assert PASSWORD not in result.stdout + result.stderr


def test_tls_files_others_may_read_or_change_are_warned_and_still_used(secure_etcd,
                                                                       tmp_path: Path) -> None:
    """flannel accepts such files: a flannel user's keep working, with one warning each."""
    loose_key = tmp_path / "client.key"
    loose_key.write_bytes(Path(secure_etcd.pki.client[1]).read_bytes())
    loose_key.chmod(0o644)
    foreign_ca = tmp_path / "ca.pem"
    foreign_ca.write_bytes(Path(secure_etcd.pki.ca).read_bytes())
    os.chown(foreign_ca, 65534, 65534)
    flags = ["--etcd-endpoints", secure_etcd.url, "--etcd-cafile", str(foreign_ca),
             "--etcd-certfile", str(secure_etcd.pki.client[0]), "--etcd-keyfile", str(loose_key),
             *secure_etcd.auth_flags()]
    ctl = subprocess.run([sys.executable, "-m", "leaseagent.cli.leasectl", *flags, "list"],
                         capture_output=True, text=True, timeout=60)
    assert ctl.returncode == 0, ctl.stderr
    warnings = ctl.stderr.strip().splitlines()
    assert len(warnings) == 2, ctl.stderr
    assert f"--etcd-cafile: {foreign_ca} is owned by uid 65534, not root" in warnings[0]
    assert f"--etcd-keyfile: {loose_key} is readable by others; another user could read " \
        "the key" in warnings[1]
    assert secure_etcd.password not in ctl.stderr
