"""Scenario 9: a slow / half-open etcd member (SIGSTOP: connections stay open, nothing answers).

Agents (alloc, --lease-ttl 6, --etcd-timeout 1) are given the paused member
as their *first* endpoint. While it is paused: renewals continue (the gap
between two successful renewals is measured and must stay under RENEWAL_GAP
s, well inside the TTL), /readyz stays 200, a host that joins is seen by
every agent within PEER_BOUND s (their watch streams on the paused member are
probed and moved), and leasectl with the paused member first answers within
LEASECTL_BOUND s.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

from faultkit import ALLOC, check_no_lease_lost_or_duplicated, put_config, renewals, wait_until

TTL = 6
# The renewal is due 2 s (TTL/3) after the last one; one that goes to the paused member
# first (gRPC balances round robin, and the member keeps its turn until keepalive gives it
# up, 10 s + 5 s) times out (1 s) and is sent again at once, taking the next member's turn
# (leaseagent.retrying): 3.0 s, plus this sampler's own latency (0.2 s sleeps, three
# scrapes, a leasectl run). Measured: 2.86-3.15 s in 12 runs (load 1.2-6, 4 of them beside
# two busy loops). Before, the retry waited its jitter first, and etcd's health probe and
# the listing after it often took the healthy members' turns: a second or third timeout,
# 4.1-5.3 s in 9 of 36 runs (4.73 s once in CI). Still inside the TTL, and no lease may be
# lost (checked below).
RENEWAL_GAP = 4.5
PEER_BOUND = 10.0
LEASECTL_BOUND = 5.0
PAUSED_FOR = 20.0  # longer than gRPC keepalive detection (10 s + 5 s)


def peers(agent) -> float:
    return agent.metric("leaseagent_peers", 'backend="alloc"') or 0.0


def test_a_paused_member_costs_bounded_waits_not_hangs(etcd_cluster, cluster_agents):
    cluster = etcd_cluster
    put_config(cluster, ALLOC)
    leader = cluster.leader()
    victim = (leader + 1) % 3  # a follower: the cluster keeps its leader and quorum
    first = cluster.endpoints_starting_with(victim)
    flags = ["--etcd-timeout", "1", "--release-on-exit"]
    fleet = [cluster_agents(f"h{i}", f"10.200.0.{i}", ttl=TTL, endpoints=first,
                            extra=flags).start(metrics=True) for i in range(1, 4)]
    for a in fleet:
        a.wait_subnet()
    wait_until("all see 2 peers", lambda: all(peers(a) == 2 for a in fleet), 10)

    cluster.pause(victim)
    paused_at = time.monotonic()
    last = {a.name: (renewals(a), time.monotonic()) for a in fleet}
    gap = 0.0
    not_ready = 0
    samples = 0
    joined_at = None
    joiner = None
    peer_seen = None
    leasectl_s = None
    try:
        while time.monotonic() - paused_at < PAUSED_FOR:
            now = time.monotonic()
            for a in fleet:
                count = renewals(a)
                prev = last[a.name][0]
                if count > prev:
                    last[a.name] = (count, now)
                gap = max(gap, now - last[a.name][1])
                samples += 1
                if a.http("/readyz")[0] != 200:
                    not_ready += 1
            if joiner is None and now - paused_at > 3:
                joiner = cluster_agents("h9", "10.200.0.9", ttl=TTL, endpoints=first,
                                        extra=flags).start(metrics=True)
                joined_at = time.monotonic()
            if joiner is not None and peer_seen is None and all(peers(a) == 3 for a in fleet):
                assert joined_at is not None
                peer_seen = time.monotonic() - joined_at
            if leasectl_s is None and now - paused_at > 1:
                t0 = time.monotonic()
                r = subprocess.run(
                    [sys.executable, "-m", "leaseagent.cli.leasectl", "--etcd-endpoints", first,
                     "--etcd-timeout", "1", "list", "--json"],
                    capture_output=True, text=True, timeout=30)
                leasectl_s = time.monotonic() - t0
                assert r.returncode == 0, r.stderr
                assert len(json.loads(r.stdout)) == 3
            time.sleep(0.2)
    finally:
        cluster.resume(victim)
    assert joiner is not None
    joiner.wait_subnet()
    keys = check_no_lease_lost_or_duplicated(cluster, [*fleet, joiner], [*fleet, joiner])
    print(f"\nscenario 9: member m{victim} paused {PAUSED_FOR:.0f}s (first endpoint of every "
          f"agent): longest gap between renewals {gap:.2f}s (ttl {TTL}s, bound {RENEWAL_GAP}s); "
          f"/readyz not 200 in {not_ready} of {samples} samples; a joining host seen by all in "
          f"{peer_seen if peer_seen is None else round(peer_seen, 2)}s (bound {PEER_BOUND}s); "
          f"leasectl list answered in {leasectl_s:.2f}s (bound {LEASECTL_BOUND}s); "
          f"{keys} leases, none lost")
    assert gap < RENEWAL_GAP
    assert not_ready == 0
    assert peer_seen is not None and peer_seen < PEER_BOUND
    assert leasectl_s is not None and leasectl_s < LEASECTL_BOUND
