"""Metrics on a live lab agent: promtool accepts them, and each family moves when its
event happens (a peer joins; a route is deleted by hand and repaired)."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from polling import wait_for, wait_value

from leaseagent.lab import Lab, run


@pytest.mark.root
def test_metric_families_move_with_their_events(vxlan_lab: Lab) -> None:
    lab = vxlan_lab
    watcher = lab.hosts[1]
    before = lab.metrics(watcher)
    assert before['leaseagent_lease_held'] == 1
    assert before['leaseagent_etcd_up'] == 1
    assert any(k.startswith("leaseagent_etcd_endpoint_info{") for k in before), sorted(before)
    peers_key = 'leaseagent_peers{backend="vxlan"}'

    joiner = lab.add_host(containers=1)
    try:
        moving = ('leaseagent_watch_events_total{type="put"}',
                  'leaseagent_dataplane_objects_added_total{kind="route"}',
                  'leaseagent_dataplane_objects_added_total{kind="neighbour"}',
                  'leaseagent_dataplane_objects_added_total{kind="fdb"}',
                  "leaseagent_peer_programming_seconds_count")

        def moved(m: dict[str, float]) -> bool:
            # The peer is counted when it is known, its objects once they are programmed a
            # moment later: a scrape between the two saw the first only (one CI run).
            return m.get(peers_key, 0) == before[peers_key] + 1 and all(
                m.get(name, 0) > before.get(name, 0) for name in moving)

        after = wait_value(lambda: m if moved(m := lab.metrics(watcher)) else None,
                           timeout=5, what="the new peer and its objects in the metrics",
                           every=0.05)
        assert after["leaseagent_lease_renewals_total"] >= before["leaseagent_lease_renewals_total"]

        assert joiner.subnet is not None
        subnet = str(joiner.subnet.network)
        repairs = 'leaseagent_dataplane_drift_repairs_total{kind="route"}'
        run(["ip", "-n", watcher.ns, "route", "del", subnet])
        wait_for(lambda: subnet in run(["ip", "-n", watcher.ns, "route", "show"]),
                 what="the route back", every=0.05,
                 timeout=1.0 + 1.0)  # 1 s promise, plus a second of margin for a busy machine
        repaired = wait_value(lambda: (
            m if (m := lab.metrics(watcher)).get(repairs, 0) > before.get(repairs, 0) else None),
            timeout=5, what="the repair counted", every=0.05)
        assert repaired[repairs] >= 1
    finally:
        lab.remove_host(joiner)
        lab.delete_lease(joiner)


@pytest.mark.root
@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian: prometheus) missing")
def test_promtool_accepts_a_vxlan_agents_metrics(vxlan_lab: Lab) -> None:
    status, text = vxlan_lab.http_get(vxlan_lab.hosts[1], "/metrics")
    assert status == 200
    result = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True,
                            text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
