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
    # iptables' set match needs CAP_NET_RAW (tests/e2e/test_unit_capabilities.py).
    assert d["CapabilityBoundingSet"] == ["CAP_NET_ADMIN CAP_NET_RAW"]
    assert d["AmbientCapabilities"] == ["CAP_NET_ADMIN CAP_NET_RAW"]
    for key, value in {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes",
                       "PrivateTmp": "yes", "SystemCallFilter": "@system-service",
                       "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6 AF_NETLINK"}.items():
        assert d[key] == [value], key
    assert set(d["ReadWritePaths"][0].split()) == {"/run/leaseagent", "/run/flannel",
                                                   "/run/wireguard", "/var/lib/leaseagent"}
    # /run/flannel/subnet.env can be written; wireguard-go can make its control socket
    assert d["RuntimeDirectory"] == ["leaseagent flannel wireguard"]
    # wireguard-go opens /dev/net/tun, and no other device is reachable
    assert d["DevicePolicy"] == ["closed"] and d["DeviceAllow"] == ["/dev/net/tun rw"]
    assert "password" not in " ".join(d["ExecStart"]).lower()


def test_every_setting_comes_from_the_environment_file_and_config_errors_are_not_restarted():
    d = _directives(SYSTEMD / "leaseagent.service")
    assert d["ExecStart"] == ["/usr/local/bin/leaseagent"]  # no flag the file could not override
    # The unit's own defaults are variables set before the file, which wins over them.
    text = (SYSTEMD / "leaseagent.service").read_text()
    assert text.index("Environment=LEASEAGENT_METRICS_ADDR") < text.index("EnvironmentFile=")
    assert d["RestartPreventExitStatus"] == ["2"]
    assert 0 < int(d["TimeoutStartSec"][0]) <= 600


def test_the_shipped_defaults_file_sets_nothing_and_names_only_real_settings():
    from leaseagent.config import OTHER_VARIABLES, agent_parser, env_name

    known = {env_name(o) for a in agent_parser({})._actions for o in a.option_strings
             if o.startswith("--")} - OTHER_VARIABLES
    text = (Path(__file__).parents[2] / "deploy" / "leaseagent.default").read_text()
    lines = [line for line in text.splitlines() if line.strip()]
    assert all(line.startswith("#") for line in lines), "an active setting is shipped"
    named = {line.lstrip("#").split("=", 1)[0] for line in lines if "=" in line and
             line.lstrip("#").startswith("LEASEAGENT_")}
    assert named and named <= known
    assert "192.168." not in text


def test_docker_drop_in_orders_after_the_agent_and_adds_the_network_options():
    d = _directives(SYSTEMD / "docker.service.d" / "leaseagent.conf")
    assert d["After"] == ["leaseagent.service"]
    # Docker starts without the options file too (its own default bridge): an agent not
    # configured, failed or not ready yet never keeps Docker down.
    assert d["EnvironmentFile"] == ["-/run/leaseagent/docker_opts.env"]
    assert d["ExecStart"][0] == ""  # clears the packaged ExecStart first
    # Debian's docker.io command, the operator's $DOCKER_OPTS kept, ours added.
    assert d["ExecStart"][1].endswith("$DOCKER_OPTS $DOCKER_NETWORK_OPTIONS")


def test_docker_never_depends_on_the_agent():
    """Nothing that stops or restarts Docker with the agent (Requires=, BindsTo=, PartOf=:
    a restart, crash, watchdog kill or exit 2 of the agent would take the containers
    down), nor that starts the agent with Docker (Wants=, Requires=: a `systemctl restart
    docker` would wait for an unconfigured agent, a socket-activated Docker would start a
    failed one again and again)."""
    d = _directives(SYSTEMD / "docker.service.d" / "leaseagent.conf")
    for key in ("Requires", "Requisite", "BindsTo", "PartOf", "Wants", "Upholds",
                "PropagatesReloadTo", "PropagatesStopTo", "StopPropagatedFrom"):
        assert key not in d, key
    unit = _directives(SYSTEMD / "leaseagent.service")
    for key in ("RequiredBy", "BoundBy", "ConsistsOf", "PropagatesStopTo",
                "PropagatesReloadTo", "OnFailure"):
        assert key not in unit, key
    assert unit["Before"] == ["docker.service"]  # the same order, said from both sides


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_docker_drop_in_verifies_on_a_docker_service(tmp_path):
    """systemd-analyze reads docker.service with the drop-in beside it (a stand-in for
    docker.io's unit: its ExecStart= and socket) and finds nothing wrong in the drop-in."""
    units = tmp_path / "units"
    (units / "docker.service.d").mkdir(parents=True)
    true = shutil.which("true")
    (units / "docker.service").write_text(
        f"[Unit]\nDescription=stand-in\n[Service]\nType=notify\nExecStart={true}\n")
    dropin = (SYSTEMD / "docker.service.d" / "leaseagent.conf").read_text()
    dropin = dropin.replace("/usr/sbin/dockerd", true)
    (units / "docker.service.d" / "leaseagent.conf").write_text(dropin)
    result = subprocess.run(["systemd-analyze", "verify", str(units / "docker.service")],
                            capture_output=True, text=True, check=False,
                            env={"SYSTEMD_UNIT_PATH": f"{units}:", "PATH": "/usr/bin:/bin"})
    problems = [line for line in result.stderr.splitlines()
                if "leaseagent.conf" in line or "docker.service:" in line]
    assert not problems, result.stderr


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_docker_restart_hook_verifies_and_watches_the_options_file(tmp_path):
    for name in ("leaseagent-docker-restart.path", "leaseagent-docker-restart.service"):
        (tmp_path / name).write_text((SYSTEMD / name).read_text())
    result = subprocess.run(["systemd-analyze", "verify", str(tmp_path / "leaseagent-docker-restart.path")],
                            capture_output=True, text=True, check=False)
    problems = [line for line in result.stderr.splitlines() if "leaseagent-docker-restart" in line]
    assert not problems, result.stderr
    path = _directives(SYSTEMD / "leaseagent-docker-restart.path")
    unit = _directives(SYSTEMD / "leaseagent.service")
    assert path["PathChanged"] == [unit["Environment"][1].split("=", 1)[1]]  # the opts file
    service = _directives(SYSTEMD / "leaseagent-docker-restart.service")
    assert service["ExecStart"] == ["/bin/systemctl try-restart docker.service"]
