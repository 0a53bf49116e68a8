"""What an operator sees: sd_notify READY/WATCHDOG, /healthz, /readyz, /metrics (promtool)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time

import pytest
from etcd_server import put_config

from leaseagent.agent.notify import sd_notify

pytestmark = pytest.mark.shared_etcd  # tests/conftest.py: one etcd, emptied before each test


ALLOC = {"Network": "10.6.0.0/16", "Backend": {"Type": "alloc"}}


def _receive(sock: socket.socket, timeout: float) -> str | None:
    sock.settimeout(timeout)
    try:
        return sock.recv(4096).decode()
    except TimeoutError:
        return None


def test_ready_is_sent_only_after_subnet_env_exists_and_watchdog_at_the_configured_rate(
        etcd, agents, tmp_path):
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        # WatchdogSec=0.4s: the agent must ping every 0.2 s.
        a = agents("a", "10.200.0.1", env={"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "400000"})
        a.start()
        # No network config yet: the agent waits, must not claim readiness.
        early = []
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            msg = _receive(sock, 0.2)
            if msg:
                early.append(msg)
        assert not any("READY=1" in m for m in early)
        assert not a.subnet_file.exists()
        put_config(etcd, ALLOC)
        while True:
            msg = _receive(sock, 20)
            assert msg is not None, "no READY=1 within 20 s"
            if "READY=1" in msg:
                assert a.subnet_file.exists()
                break
        pings = 0
        start = time.monotonic()
        while time.monotonic() - start < 2.0:
            msg = _receive(sock, 0.5)
            if msg and "WATCHDOG=1" in msg:
                pings += 1
        print(f"\n{pings} WATCHDOG=1 in 2 s (expected ~10 at WatchdogSec=0.4s)")
        assert 6 <= pings <= 14


def test_sd_notify_reaches_an_abstract_socket():
    name = f"leaseagent-test-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        assert sd_notify("READY=1", socket_path="@" + name)
        assert _receive(sock, 2) == "READY=1"
    assert sd_notify("READY=1", socket_path="") is False


def test_readyz_is_503_with_a_reason_before_the_lease_and_200_after(etcd, agents):
    a = agents("a", "10.200.0.1").start(metrics=True)
    deadline = time.monotonic() + 10
    while True:
        try:
            status, body = a.http("/readyz")
            break
        except OSError:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    assert status == 503 and body.strip() == "no lease held yet"
    assert a.http("/healthz") == (200, "ok\n")
    put_config(etcd, ALLOC)
    a.wait_subnet()
    deadline = time.monotonic() + 10
    while a.http("/readyz")[0] != 200:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert a.metric("leaseagent_lease_held") == 1.0
    assert a.metric("leaseagent_etcd_up") == 1.0


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian: prometheus) missing")
def test_promtool_accepts_a_live_agents_metrics(etcd, agents):
    put_config(etcd, ALLOC)
    peer = agents("b", "10.200.0.2").start()
    peer.wait_subnet()
    a = agents("a", "10.200.0.1").start(metrics=True)
    a.wait_subnet()
    a.wait_log("ready:")
    _, text = a.http("/metrics")
    result = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True,
                            text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    for family in ("leaseagent_lease_held", "leaseagent_lease_expiry_timestamp_seconds",
                   "leaseagent_lease_renewals_total", "leaseagent_lease_renewal_failures_total",
                   "leaseagent_etcd_up", "leaseagent_etcd_request_duration_seconds",
                   "leaseagent_watch_events_total", "leaseagent_peers",
                   "leaseagent_invalid_leases_skipped_total", "leaseagent_allocation_attempts_total",
                   "leaseagent_allocation_conflicts_total", "leaseagent_reconcile_duration_seconds",
                   "leaseagent_peer_programming_seconds", "leaseagent_dataplane_objects_added_total",
                   "leaseagent_dataplane_drift_repairs_total"):
        base = family.removesuffix("_total")
        assert f"# TYPE {family} " in text or f"# TYPE {base} " in text, family


def test_a_metrics_address_in_use_is_a_one_line_configuration_error(etcd, agents):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        a = agents("a", "10.200.0.1", metrics_port=busy.getsockname()[1]).start()
        assert a.wait_exit(15) == 2
    log = a.log()
    assert "--metrics-addr 127.0.0.1:" in log and "cannot listen" in log
    assert "Traceback" not in log


def test_status_tells_the_current_peer_count_as_peers_join_and_leave(etcd, agents, tmp_path):
    """STATUS= (what `systemctl status` shows) follows the peers: it said "0 peers" for
    ever once sent at READY=1."""
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        put_config(etcd, ALLOC)
        # --peer-hold-time 0: a released peer leaves the count at once, not after the 5 s
        # hold (the count follows the peers; the hold is tested elsewhere).
        agents("a", "10.200.0.1", env={"NOTIFY_SOCKET": str(path)},
               extra=["--peer-hold-time", "0"]).start()

        def status_until(ending: str, timeout: float = 20) -> list[str]:
            seen: list[str] = []
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                msg = _receive(sock, max(0.01, deadline - time.monotonic()))
                if msg is None:
                    break
                seen += [m for m in msg.splitlines() if m.startswith("STATUS=")]
                if seen and seen[-1].startswith("STATUS=ready: lease 10.6.") \
                        and seen[-1].endswith(ending):
                    return seen
            raise AssertionError(f"no STATUS= ending {ending!r} within {timeout} s: {seen}")

        status_until(", 0 peers")
        b = agents("b", "10.200.0.2").start()
        status_until(", 1 peer")
        c = agents("c", "10.200.0.3", extra=["--release-on-exit"]).start()
        status_until(", 2 peers")
        c.stop()  # releases its lease: gone from a's peers at once
        status_until(", 1 peer")
        assert b.proc is not None and b.proc.alive
