"""The cluster-scale benchmark at 20 hosts (alloc backend): both patterns run all three
phases to the end; and at 10 hosts (vxlan on the fake kernel) through `etcd grpc-proxy`.

`python -m bench.cluster` as a subprocess (it starts its own 3-member etcd,
the proxy and worker processes, and stops them by PID). No timing is
asserted: every host holds a distinct lease and sees the others after the
cold start and after the restart, every watcher gets the restart's last
write, only flannel's pattern sends TimeToLive requests, and through the
proxy the members send fewer watch events than the agents receive (the
proxy coalesces the agents' identical watches).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HOSTS = 20
# A hang guard, not a timing: the first run took ~36 s on a quieter machine, the proxy
# run ~4 s of CPU; on this 2-core machine at load 20-27 (seven engineers' tests and
# benches at once) each took 140 s and more.
HANG = 400

pytestmark = pytest.mark.skipif(shutil.which("etcd") is None,
                                reason="needs etcd (Debian etcd-server)")


def bench(out: Path, *args: str) -> str:
    """`python -m bench.cluster ARGS --json OUT`; its stdout."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.cluster", *args, "--steady", "1", "--restart-spread", "1",
         "--limit", "30", "--json", str(out)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=HANG)
    except subprocess.TimeoutExpired:
        proc.terminate()  # its finally stops the workers, the proxy and etcd
        try:
            stdout, stderr = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()  # its reaper stops them
            stdout, stderr = proc.communicate()
        raise AssertionError(f"still running after {HANG} s:\n{stderr[-3000:]}") from None
    assert proc.returncode == 0, stderr[-3000:]
    return stdout


def test_cluster_bench_both_patterns_converge(tmp_path: Path) -> None:
    out = tmp_path / "cluster.json"
    stdout = bench(out, "--hosts", str(HOSTS), "--workers", "2", "--backend", "alloc")
    results = {r["pattern"]: r for r in json.loads(out.read_text())["runs"]}
    assert set(results) == {"leaseagent", "flannel"}
    for pattern, r in results.items():
        for phase in ("cold", "restart"):
            got = r[phase]
            assert got["converged"]["reached"] == HOSTS, (pattern, phase, got)
            assert got["distinct_subnets"] == got["leases"] == HOSTS, (pattern, phase, got)
            assert not got["errors"], (pattern, phase, got["errors"])
        assert r["restart"]["settled"]["reached"] == HOSTS, pattern
        assert r["steady"]["etcd"]["watchers"] >= HOSTS, pattern  # one watch per agent at least
        assert f"H={HOSTS} {pattern} via etcd: cold start all converged" in stdout
    ttl = {p: r["cold"]["etcd"]["unary_requests"].get("LeaseTimeToLive", 0)
           for p, r in results.items()}
    assert ttl["leaseagent"] == 0
    assert ttl["flannel"] >= HOSTS  # at least one per lease listed


def test_cluster_bench_through_the_grpc_proxy(tmp_path: Path) -> None:
    out = tmp_path / "proxy.json"
    hosts = 10
    bench(out, "--hosts", str(hosts), "--workers", "1", "--patterns", "leaseagent",
          "--via", "proxy")
    (r,) = json.loads(out.read_text())["runs"]
    assert r["via"] == "proxy"
    for phase in ("cold", "restart"):
        got = r[phase]
        assert got["converged"]["reached"] == hosts, (phase, got)
        assert got["distinct_subnets"] == got["leases"] == hosts, (phase, got)
        assert not got["errors"], (phase, got["errors"])
        # Each agent got every other's lease as an event or in its listing; the members
        # sent each event once per proxy watcher, not once per agent.
        assert got["etcd"]["watch_events_sent"] < got["events_received"], (phase, got)
        assert got["proxy"]["cpu_seconds"] > 0, (phase, got["proxy"])
    assert r["restart"]["settled"]["reached"] == hosts


def test_a_killed_run_leaves_no_process(tmp_path: Path) -> None:
    """SIGKILL to the driver (no `finally` runs) once the proxy is up: its reaper stops
    the etcd members, the proxy and the workers by PID and removes the run directory."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.cluster", "--hosts", "2", "--workers", "1",
         "--patterns", "leaseagent", "--via", "proxy", "--backend", "alloc", "--steady", "300",
         "--json", str(tmp_path / "killed.json")],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base: Path | None = None
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            if line.startswith("run directory "):
                base = Path(line.split(" ", 2)[2].strip())
                break
        assert base is not None, "the driver did not say its run directory"
        deadline = time.monotonic() + HANG
        while not running_in(base) >= 5:  # 3 members, the proxy, the worker
            assert time.monotonic() < deadline and proc.poll() is None, running_in(base)
            time.sleep(0.2)
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 60
    while running_in(base) or base.exists():
        assert time.monotonic() < deadline, f"left running: {running_in(base)}"
        time.sleep(0.2)


def running_in(base: Path) -> int:
    """Processes whose command line names `base` (the run's members, proxy and workers)."""
    count = 0
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            count += str(base).encode() in cmd
    return count


def test_watch_fan_out_bench(tmp_path: Path) -> None:
    """`python -m bench.cluster_watch` at 20 watchers and 5 writes, direct and through the
    proxy: every watcher gets every write; the proxy's members send one event per write
    per proxy watch, fewer than the deliveries."""
    out = tmp_path / "watch.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.cluster_watch", "--watchers", "20", "--writes", "5",
         "--via", "etcd,proxy", "--workers", "1", "--limit", "60", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=HANG)
    assert proc.returncode == 0, proc.stderr[-3000:]
    direct, proxied = json.loads(out.read_text())
    for r in (direct, proxied):
        assert r["watchers_complete"] == 20 and r["deliveries"] == 100, r
        assert not r["errors"], r["errors"]
    assert direct["etcd"]["watch_events_sent"] == 100
    assert proxied["etcd"]["watch_events_sent"] < 100
    # The proxy was sampled (its RSS read from its /proc). Its CPU for 5 writes can be
    # under one clock tick (10 ms), so 0.0 is a true reading and only < 0 is wrong.
    assert proxied["proxy"]["rss_mib"] > 0
    assert proxied["proxy"]["cpu_seconds"] >= 0
