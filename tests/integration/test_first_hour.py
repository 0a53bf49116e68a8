"""An operator's first hour: local mistakes found before etcd, one clear line each; what the
agent says about itself in its log and metrics; Docker options where they are asked for."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from etcd_server import put_config

from leaseagent.lab.probes import parse_metrics

pytestmark = pytest.mark.shared_etcd  # tests/conftest.py: one etcd, emptied before each test

ALLOC = {"Network": "10.6.0.0/16", "Backend": {"Type": "alloc"}}


def run_agent(*args: str, env: dict[str, str] | None = None, timeout: float = 20
              ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "leaseagent.agent", "--node-id", "n", *args],
                          capture_output=True, text=True, timeout=timeout, check=False,
                          env={"PATH": "/usr/bin:/bin", **(env or {})})


@pytest.mark.fresh_etcd  # stops it
def test_local_mistakes_are_exit_2_before_etcd_is_asked(tmp_path, etcd):
    etcd.stop()  # nobody answers: only local checks can give a quick, clear answer
    common = ["--etcd-endpoints", etcd.url, "--subnet-file", str(tmp_path / "s.env"),
              "--state-dir", str(tmp_path / "state")]
    started = time.monotonic()
    nosuch = run_agent(*common, "--iface", "nosuch0")
    assert nosuch.returncode == 2, nosuch.stderr
    assert "--iface nosuch0: no such interface" in nosuch.stderr
    assert time.monotonic() - started < 10
    planted = tmp_path / "planted"
    planted.symlink_to("/etc/passwd")
    # The other mistakes four at a time: each is a Python process (~0.5 s of CPU before it
    # exits), independent of the others. 60 s: a hang guard for a loaded machine, not a bound.
    addresses = (("127.0.0.11", "loopback"), ("0.0.0.0", "unspecified"),
                 ("224.0.0.1", "multicast"), ("169.254.1.1", "link-local"))
    with ThreadPoolExecutor(4) as pool:
        by_ip = [(why, pool.submit(run_agent, *common, "--public-ip", ip, timeout=60))
                 for ip, why in addresses]
        from_env_run = pool.submit(run_agent, *common, env={"LEASEAGENT_LEASE_TTL": "abc"},
                                   timeout=60)
        symlink_run = pool.submit(run_agent, *common[:2], "--subnet-file", str(planted),
                                  "--public-ip", "10.200.0.1", timeout=60)
        typo_run = pool.submit(run_agent, "--lease-tll", "5", timeout=60)
    for why, running in by_ip:
        result = running.result()
        assert result.returncode == 2 and f"a {why} address" in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    from_env = from_env_run.result()
    assert from_env.returncode == 2
    assert "LEASEAGENT_LEASE_TTL='abc': not a whole number" in from_env.stderr
    symlink = symlink_run.result()
    assert symlink.returncode == 2 and "is a symlink" in symlink.stderr
    typo = typo_run.result()
    assert typo.returncode == 2
    assert typo.stderr.strip().splitlines() == [
        "leaseagent: error: unrecognized arguments: --lease-tll (see leaseagent --help)"]


def test_a_misspelt_variable_is_reported_and_the_start_says_who_the_agent_is(etcd, agents):
    put_config(etcd, ALLOC)
    a = agents("a", "10.200.0.1", env={"LEASEAGENT_LEASETTL": "5"},
               extra=["--log-format", "json"]).start(metrics=True)
    a.wait_subnet()
    a.wait_log('"msg": "ready:')
    log = a.log()
    assert ("leaseagent: warning: ignoring LEASEAGENT_LEASETTL: no such setting "
            "(did you mean LEASEAGENT_LEASE_TTL?)") in log
    records = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    first = next(r for r in records if r["msg"].startswith("leaseagent "))
    for part in ("backend alloc", "PublicIP 10.200.0.1", "node id a", f"etcd {etcd.url}"):
        assert part in first["msg"]
    held = next(r for r in records if r["msg"].startswith("lease held:"))
    assert held["public_ip"] == "10.200.0.1" and held["node_id"] == "a"
    assert held["subnet"] in held["msg"]


def test_metrics_say_which_agent_and_lease_and_start_every_series_at_zero(etcd, agents):
    put_config(etcd, ALLOC)
    a = agents("a", "10.200.0.1").start(metrics=True)
    subnet = a.wait_subnet().replace(".1/", ".0/")
    a.wait_log("ready:")
    _, text = a.http("/metrics")
    assert "_created" not in text
    metrics = parse_metrics(text)
    assert any(k.startswith("leaseagent_build_info{version=") for k in metrics)
    info = [k for k in metrics if k.startswith("leaseagent_lease_info{")]
    assert len(info) == 1 and f'subnet="{subnet}"' in info[0] and 'public_ip="10.200.0.1"' in info[0]
    for series in ('leaseagent_invalid_leases_skipped_total{reason="bad_vtep_mac"}',
                   'leaseagent_watch_relists_total{reason="compacted"}',
                   'leaseagent_watch_events_total{type="delete"}',
                   'leaseagent_dataplane_drift_repairs_total{kind="device"}'):
        assert metrics.get(series) == 0.0, series
    assert 'leaseagent_etcd_request_duration_seconds_count{operation="allocate"}' in metrics
    expiry = metrics["leaseagent_lease_expiry_timestamp_seconds"]
    assert time.time() < expiry <= time.time() + 10 + 1


def test_docker_opts_daemon_json_goes_to_stdout_unless_a_file_is_named(tmp_path):
    env_file = tmp_path / "subnet.env"
    env_file.write_text("FLANNEL_NETWORK=10.5.0.0/16\nFLANNEL_SUBNET=10.5.34.1/24\n"
                        "FLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n")
    cmd = [sys.executable, "-m", "leaseagent.cli.leasectl", "docker-opts", "-f", str(env_file)]
    out = subprocess.run([*cmd, "--daemon-json"], capture_output=True, text=True, check=False)
    assert out.returncode == 0 and json.loads(out.stdout) == {"bip": "10.5.34.1/24", "mtu": 1450,
                                                             "ip-masq": True}
    target = tmp_path / "daemon.json"
    assert subprocess.run([*cmd, "-o", "daemon-json", "-d", str(target)],
                          check=False).returncode == 0
    assert json.loads(target.read_text())["bip"] == "10.5.34.1/24"
    # It needs no etcd, and does not even load its client.
    probe = subprocess.run(
        [sys.executable, "-c", "import sys; from leaseagent.cli import leasectl; "
         "leasectl.main(['docker-opts', '-f', sys.argv[1], '-d', '-']); "
         "print('grpc' in sys.modules)", str(env_file)],
        capture_output=True, text=True, check=False)
    assert probe.stdout.strip().endswith("False"), probe.stdout + probe.stderr
