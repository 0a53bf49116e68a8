"""The soak benchmark (bench/soak.py) at small size: 300 peers, 1,500 lease events
(added, changed, removed; 7.5 s at 200 a second) with the agent's full resyncs every 2 s
and one etcd restart. No timing or RSS slope is asserted (a short run is mostly warm-up; the
full run's figures are in docs/benchmarks.md); asserted: the agent's open fds and
asyncio tasks come back to their baseline once the churn has settled, the agent
came back after etcd's restart, and the kernel holds exactly the objects the final
etcd peer set implies (3 a peer). Runs `python -m bench.soak` as a subprocess: it
moves its own process into a namespace, which must not happen to pytest.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EVENTS = 1500  # 3,000 until the suite had to fit in 15 minutes: the same phases, half as long

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)"),
    pytest.mark.skipif(shutil.which("etcd") is None, reason="needs etcd (Debian etcd-server)"),
]


def test_short_soak_returns_to_baseline(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.soak", "--peers", "300", "--events", str(EVENTS),
         "--rate", "200", "--etcd-restarts", "1", "--resync", "2", "--sample-interval", "0.5",
         "--warmup-events", str(EVENTS // 10), "--settle", "30", "--timeout", "30",
         "--json", str(out)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=150)
    except subprocess.TimeoutExpired:
        # SIGTERM, not SIGKILL: the soak then removes its namespace and processes.
        proc.terminate()
        stdout, stderr = proc.communicate(timeout=60)
        raise AssertionError(f"soak still running after 150 s:\n{stderr[-3000:]}") from None
    assert proc.returncode == 0, stdout + stderr[-3000:]
    for figure in ("RSS slope", "MiB / 10k events (95 % CI)", "fds: baseline -> end",
                   "tasks: baseline -> end", "etcd restart at event", "kernel vs final etcd set"):
        assert figure in stdout, stdout
    results = json.loads(out.read_text())
    churn = results["churn"]
    assert churn["events"] == EVENTS
    assert results["rss"]["mib_per_10k_events_ci95"] > 0
    assert all(churn["kinds"][k] > 0 for k in ("added", "changed", "removed"))
    assert churn["full_resyncs"] >= 1
    (restart,) = churn["etcd_restarts"]
    assert restart["healthy_to_peer_in_kernel_s"] > 0
    baseline, end = results["baseline"], results["end"]
    assert baseline["tasks"] is not None and baseline["fds"] > 0
    assert results["returned"] == {"fds": True, "tasks": True}, (baseline, end)
    assert end["fds"] <= baseline["fds"] and end["tasks"] <= baseline["tasks"]
    kernel = results["kernel"]
    assert kernel["equal"], kernel
    assert kernel["objects"] == dict.fromkeys(("route", "neighbour", "fdb"), kernel["peers"])
    assert all(s["tasks"] is not None for s in results["samples"])


def test_a_bare_watch_as_the_subject(tmp_path: Path) -> None:
    """`--subject watch` (bench/soakwatch.py: the store's watch and nothing else) takes
    the same churn: the watch receives every event, and nothing is said of a kernel."""
    out = tmp_path / "soak.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench.soak", "--subject", "watch", "--peers", "300",
         "--events", "600", "--rate", "200", "--etcd-restarts", "0", "--resync", "2",
         "--sample-interval", "0.5", "--settle", "10", "--timeout", "30", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    assert "not checked: --subject watch" in done.stdout
    results = json.loads(out.read_text())
    assert results["churn"]["events"] == 600 and results["kernel"] is None
    assert results["end"]["watch_events"] - results["baseline"]["watch_events"] == 600
    assert results["returned"] == {"fds": True, "tasks": True}
