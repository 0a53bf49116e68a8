"""Ready only when the traffic rules hold: an agent whose iptables-restore cannot write
them never sends READY=1, /readyz is 503, and STATUS=, /readyz and `leasectl doctor`
name the command and what the tool said.

The failure is the real one the issue met on systemd hosts, not a stand-in: the
agent runs (in a network namespace made here, with a real etcd in another) with
CAP_NET_ADMIN only, as the unit used to grant, and the real iptables-restore then
fails with "Can't open socket to ipset" (its set match needs CAP_NET_RAW). The
control runs the same agent with the unit's capabilities and becomes ready.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from leaseagent.lab import etcd as lab_etcd
from leaseagent.lab import netns, processes
from leaseagent.lab.probes import http_get

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)"),
              pytest.mark.skipif(shutil.which("setpriv") is None, reason="setpriv not installed")]

METRICS = "127.0.0.1:9643"
NETWORK_CONFIG = {"Network": "10.5.0.0/16", "Backend": {"Type": "vxlan"}}
UNIT_CAPS = "+net_admin,+net_raw"  # tests/e2e/test_unit_capabilities.py checks the unit has these
NOT_READY_WAIT = 8.0  # seconds an agent that cannot write its rules is watched for READY=1


@pytest.fixture
def world(tmp_path: Path) -> Iterator[dict[str, object]]:
    """etcd in one namespace, a host namespace with an underlay link to it."""
    tag = f"rr{secrets.token_hex(2)}"
    made = netns.Namespaces()
    etcd = None
    try:
        etcd_ns, host_ns = made.add(f"{tag}e"), made.add(f"{tag}h")
        netns.veth(host_ns, "eth0", "eth0", peer_ns=etcd_ns)
        netns.address(etcd_ns, "eth0", "10.98.1.1/24")
        netns.address(host_ns, "eth0", "10.98.1.2/24")
        for ns in (etcd_ns, host_ns):
            netns.link_up(ns, "eth0")
            netns.link_up(ns, "lo")
        etcd = lab_etcd.Etcd(tmp_path / "etcd", 1, ns=etcd_ns, host="10.98.1.1").start()
        etcd.etcdctl("put", "/coreos.com/network/config", json.dumps(NETWORK_CONFIG))
        yield {"host_ns": host_ns, "etcd": etcd}
    finally:
        if etcd is not None:
            etcd.close()
        made.close()


def start_agent(world: dict[str, object], tmp_path: Path, caps: str
                ) -> tuple[processes.Process, socket.socket]:
    etcd = world["etcd"]
    assert isinstance(etcd, lab_etcd.Etcd)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(tmp_path / "notify.sock"))
    caps = f"-all,{caps}"
    argv = ["ip", "netns", "exec", str(world["host_ns"]),
            "setpriv", f"--bounding-set={caps}", f"--inh-caps={caps}", f"--ambient-caps={caps}",
            "--", sys.executable, "-m", "leaseagent.agent", "--etcd-endpoints", etcd.url,
            "--iface", "eth0", "--subnet-file", str(tmp_path / "subnet.env"),
            "--state-dir", str(tmp_path / "state"), "--metrics-addr", METRICS]
    agent = processes.spawn(argv, log_file=tmp_path / "agent.log",
                            env={**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify.sock")},
                            new_session=False)
    return agent, listener


def messages_until(listener: socket.socket, done: object, timeout: float) -> list[str]:
    """sd_notify messages received until `done(messages)` is true or `timeout` s passed."""
    assert callable(done)
    got: list[str] = []
    deadline = time.monotonic() + timeout
    while not done(got) and time.monotonic() < deadline:
        listener.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            got += listener.recv(4096).decode().splitlines()
        except TimeoutError:
            break
    return got


def doctor(world: dict[str, object]) -> subprocess.CompletedProcess[str]:
    etcd = world["etcd"]
    assert isinstance(etcd, lab_etcd.Etcd)
    return subprocess.run(
        ["ip", "netns", "exec", str(world["host_ns"]), sys.executable, "-m", "leaseagent.cli.leasectl",
         "--etcd-endpoints", etcd.url, "doctor", "--iface", "eth0", "--metrics-addr", METRICS,
         "--subnet-file", str(world["subnet_file"]), "--state-dir", str(world["state_dir"])],
        capture_output=True, text=True, timeout=60, check=False)


def test_an_agent_that_cannot_write_its_rules_is_not_ready_and_says_why(
        world: dict[str, object], tmp_path: Path) -> None:
    agent, listener = start_agent(world, tmp_path, "+net_admin")
    world.update(subnet_file=tmp_path / "subnet.env", state_dir=tmp_path / "state")
    try:
        got = messages_until(listener, lambda m: any("Can't open socket to ipset" in x for x in m),
                             60)
        status = [m for m in got if m.startswith("STATUS=")]
        assert any(m.startswith("STATUS=not ready: traffic rules not in place: "
                                "iptables-restore --noflush: ") and "Can't open socket to ipset" in m
                   for m in status), got
        got += messages_until(listener, lambda m: "READY=1" in m, NOT_READY_WAIT)
        assert "READY=1" not in got, got
        assert (tmp_path / "subnet.env").exists()  # the lease and files hold: only the rules fail

        code, body = http_get(str(world["host_ns"]), f"http://{METRICS}/readyz")
        assert code == 503, body
        assert body.startswith("traffic rules not in place: iptables-restore --noflush: "), body
        assert "Can't open socket to ipset" in body

        found = doctor(world)
        assert found.returncode == 1, found.stdout + found.stderr
        assert any(line.startswith("agent not ready: traffic rules not in place: iptables-restore")
                   and "Can't open socket to ipset" in line
                   for line in found.stdout.splitlines()), found.stdout

        log = (tmp_path / "agent.log").read_text()
        assert "changed by someone else" not in log, log
        # One ERROR line for the error, not one per retry (a retry every 3 s).
        assert log.count("traffic rules cannot be applied: iptables-restore --noflush") == 1, log
        assert agent.alive
    finally:
        agent.stop()
        listener.close()


def test_with_the_units_capabilities_the_same_agent_is_ready(
        world: dict[str, object], tmp_path: Path) -> None:
    agent, listener = start_agent(world, tmp_path, UNIT_CAPS)
    world.update(subnet_file=tmp_path / "subnet.env", state_dir=tmp_path / "state")
    try:
        got = messages_until(listener, lambda m: "READY=1" in m, 60)
        assert "READY=1" in got, [*got, (tmp_path / "agent.log").read_text()]
        got += messages_until(listener, lambda m: any(x.startswith("STATUS=ready: lease 10.5.")
                                                      for x in m), 5)
        assert any(m.startswith("STATUS=ready: lease 10.5.") and m.endswith(", 0 peers")
                   for m in got), got
        assert http_get(str(world["host_ns"]), f"http://{METRICS}/readyz")[0] == 200
        found = doctor(world)
        assert found.returncode == 0, found.stdout + found.stderr
        assert found.stdout.startswith("ok: lease 10.5."), found.stdout
    finally:
        agent.stop()
        listener.close()
