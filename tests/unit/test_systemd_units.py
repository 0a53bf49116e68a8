"""The systemd units: `systemd-analyze verify` accepts them; the hardening the issue asks for is there."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SYSTEMD = Path(__file__).parents[2] / "systemd"


def _directives(path: Path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "[")) and "=" in line:
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_unit_file_verifies(tmp_path):
    bindir = Path(sys.executable).parent
    unit = (SYSTEMD / "leaseagent.service").read_text()
    unit = unit.replace("/usr/local/bin/", f"{bindir}/")
    target = tmp_path / "leaseagent.service"
    target.write_text(unit.replace("WantedBy=multi-user.target", ""))
    result = subprocess.run(["systemd-analyze", "verify", str(target)],
                            capture_output=True, text=True, check=False)
    problems = [line for line in result.stderr.splitlines()
                if "leaseagent.service" in line and "docker.service" not in line]
    assert result.returncode == 0 or not problems, result.stderr
    assert not problems, result.stderr


def test_unit_is_notify_with_watchdog_and_hardening():
    d = _directives(SYSTEMD / "leaseagent.service")
    assert d["Type"] == ["notify"]
    assert d["Restart"] == ["always"]
    assert int(d["WatchdogSec"][0]) > 0
    assert d["EnvironmentFile"] == ["-/etc/default/leaseagent"]
    assert d["CapabilityBoundingSet"] == ["CAP_NET_ADMIN"]
    assert d["AmbientCapabilities"] == ["CAP_NET_ADMIN"]
    for key, value in {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes",
                       "PrivateTmp": "yes", "SystemCallFilter": "@system-service",
                       "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6 AF_NETLINK"}.items():
        assert d[key] == [value], key
    assert set(d["ReadWritePaths"][0].split()) == {"/run/leaseagent", "/var/lib/leaseagent"}
    assert "password" not in " ".join(d["ExecStart"]).lower()


def test_docker_drop_in_orders_after_the_agent_and_uses_its_options():
    d = _directives(SYSTEMD / "docker.service.d" / "leaseagent.conf")
    assert "leaseagent.service" in d["After"][0]
    assert d["EnvironmentFile"] == ["/run/leaseagent/docker_opts.env"]
    assert d["ExecStart"][0] == ""  # clears the packaged ExecStart first
    assert "$DOCKER_OPTS" in d["ExecStart"][1]
