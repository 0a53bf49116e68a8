"""The benchmark suite at reduced size: it runs, prints its table, writes JSON, cleans up;
its IPv4 and dual-stack parts program the kernel objects the reference does (3N, 6N).

No timing is asserted (machines are noisy; docs/benchmarks.md has the
figures of a full run). Runs `python -m bench` as a subprocess: the suite
moves its own process into a namespace, which must not happen to pytest.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)"),
    pytest.mark.skipif(shutil.which("etcd") is None, reason="needs etcd (Debian etcd-server)"),
]


def _bench_namespaces(tag: str) -> set[str]:
    """The namespaces of the bench run tagged `tag` (not another run's beside it)."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return {line.split()[0] for line in out.stdout.splitlines()
            if line.startswith(f"lbench{tag}")}


def test_bench_runs_prints_and_writes_json(tmp_path: Path) -> None:
    tag = secrets.token_hex(3)
    assert not _bench_namespaces(tag)
    out = tmp_path / "bench.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench", "--peers", "200", "--join-sizes", "100",
         "--pace-sizes", "50", "--pace-repeats", "1",
         "--small-peers", "20",
         "--events", "50", "--agents", "20", "--alloc-rounds", "1", "--idle", "2",
         "--timeout", "30", "--dual-peers", "200", "--dual-small-peers", "20",
         "--dual-events", "50", "--wireguard-peers", "50", "--wireguard-idle", "1",
         "--throughput-seconds", "1", "--rotations", "1", "--removals", "1",
         "--json", str(out)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "BENCH_TAG": tag},
    )
    try:
        stdout, stderr = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        # SIGTERM, not SIGKILL: the bench then removes its namespaces and processes.
        proc.terminate()
        stdout, stderr = proc.communicate(timeout=60)
        raise AssertionError(f"bench still running after 240 s:\n{stderr[-3000:]}") from None
    assert proc.returncode == 0, stderr[-3000:]
    for figure in ("join 50 peers (1 runs): device -> all objects",
                   "removal 50 peers (1 runs): all leases expire at once",
                   "programming rate", "device -> all", "event p99", "txn/acquisition", "RSS",
                   "bytes per added peer", "until the kernel is clean", "idle CPU",
                   "etcd unary requests at start", "iptables: one check",
                   "iptables: one full check", "nftables: one full check",
                   "dual-stack join 200 peers: programming rate", "dual-stack event p50",
                   "dual-stack event p99", "wireguard join 50 peers: device -> all peers",
                   "throughput container -> container, wireguard-go", "key rotation",
                   "peer removed by hand"):
        assert figure in stdout, stdout
    results = json.loads(out.read_text())
    assert results["host_namespace"] == f"lbench{tag}h"  # the run was the one tagged
    wg = results["wireguard"]
    assert wg["join"]["peers"] == 50 and wg["join"]["reference"]["peers"] == 50
    assert wg["lab"]["throughput"]["wireguard"]["bits_per_second"] > 0
    assert wg["lab"]["throughput"]["vxlan"]["bits_per_second"] > 0
    assert len(wg["lab"]["rotations"]) == 1 and len(wg["lab"]["removals_ms"]) == 1
    # Join and mass removal at a pace size, each beside ip/bridge -batch.
    pace = results["pace"]["50"]
    assert len(pace["runs"]) == 1 and pace["join_ratio"] > 0 and pace["removal_ratio"] > 0
    # From the agent's start: holds the span from the device and what comes before it.
    assert pace["start_ratio"] > 0 and pace["runs"][0]["start_s"] > pace["runs"][0]["join_s"]
    assert set(pace["runs"][0]["differences_from_reference"].values()) == {0}
    removal = pace["runs"][0]["removal"]
    assert removal["objects"] == 150 and removal["reference"]["objects"] == 150
    assert removal["seconds"] > 0 and removal["watch_last_deletion_s"] > 0
    assert results["join"]["objects"] == 600
    assert results["join"]["reference"]["objects"] == 600
    assert set(results["join"]["differences_from_reference"].values()) == {0}
    # The smaller join beside its own reference, counted from the device's creation,
    # with the agent's memory after it and after a periodic resync.
    small = results["join_sizes"]["100"]
    assert small["objects"] == 300 and small["reference"]["objects"] == 300
    assert set(small["differences_from_reference"].values()) == {0}
    assert small["device_to_objects_s"] > 0 and small["device_rate_ratio"] > 0
    assert small["rss_after_join_mib"] > 0 and small["rss_after_resync_mib"] > 0
    assert results["per_peer_bytes"]["from_peers"] == 100
    assert results["join"]["device_to_objects_s"] > 0
    # Mass removal beside a bare watch and iproute2 removing the same objects.
    shrink = results["shrink"]
    assert shrink["removed_peers"] == 180 and shrink["reference"]["objects"] == 540
    assert shrink["watch_last_deletion_s"] > 0
    assert results["events_large"]["events"] == 50
    assert results["events_large"]["timeouts"] == 0
    assert results["events_small"]["peers_present"] == 20
    assert {r["agents"] for r in results["allocation"]["leaseagent"]["rounds"]} == {20}
    assert results["footprint"]["rss_mib"] > 0
    assert results["etcd"]["range_requests_at_start"] >= 1
    assert results["rules"]["peers"] == 200
    assert {"iptables", "nftables"} <= results["rules"].keys()
    # Dual-stack: 6 kernel objects a peer (both families' neighbour, FDB entry, route),
    # the agent's and iproute2's counted in the kernel, and listed alike.
    dual = results["dual_stack"]
    kinds = {"route", "neighbour", "fdb", "route6", "neighbour6", "fdb6"}
    assert dual["join"]["objects"] == 1200
    assert dual["join"]["reference"]["objects"] == 1200
    assert dual["join"]["kernel_objects"] == dict.fromkeys(kinds, 200)
    assert dual["join"]["reference"]["kernel_objects"] == dict.fromkeys(kinds, 200)
    assert dual["join"]["differences_from_reference"] == dict.fromkeys(kinds, 0)
    for key in ("agent_rate", "rate_ratio", "start_to_objects_s", "start_to_ready_s"):
        assert dual["join"][key] > 0
    for key in ("events_large", "events_small"):
        assert dual[key]["events"] == 50
        assert dual[key]["timeouts"] == 0
        assert dual[key]["p50_ms"] > 0 and dual[key]["p99_ms"] > 0
        assert dual[key]["reference_p99_ms"] > 0
    assert dual["events_large"]["peers_present"] == 200
    assert dual["events_small"]["peers_present"] == 20
    assert dual["shrink"]["removed_peers"] == 180
    assert not _bench_namespaces(tag)  # its namespaces are gone
