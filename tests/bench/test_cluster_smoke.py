"""The cluster-scale benchmark at 20 hosts: both patterns run all three phases to the end.

`python -m bench.cluster` as a subprocess (it starts its own 3-member etcd
and worker processes, and stops them by PID). No timing is asserted: every
host holds a distinct lease and sees the 19 others after the cold start and
after the restart, every watcher gets the restart's last write, and only
flannel's pattern sends TimeToLive requests.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HOSTS = 20

pytestmark = pytest.mark.skipif(shutil.which("etcd") is None,
                                reason="needs etcd (Debian etcd-server)")


def test_cluster_bench_both_patterns_converge(tmp_path: Path) -> None:
    out = tmp_path / "cluster.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.cluster", "--hosts", str(HOSTS), "--workers", "2",
         "--steady", "1", "--restart-spread", "1", "--limit", "30", "--json", str(out)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=150)
    except subprocess.TimeoutExpired:
        proc.terminate()  # its finally stops the workers and etcd
        stdout, stderr = proc.communicate(timeout=60)
        raise AssertionError(f"still running after 150 s:\n{stderr[-3000:]}") from None
    assert proc.returncode == 0, stderr[-3000:]
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
        assert f"H={HOSTS} {pattern}: cold start all converged" in stdout
    ttl = {p: r["cold"]["etcd"]["unary_requests"].get("LeaseTimeToLive", 0)
           for p, r in results.items()}
    assert ttl["leaseagent"] == 0
    assert ttl["flannel"] >= HOSTS  # at least one per lease listed
