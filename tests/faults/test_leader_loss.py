"""Scenario 2: leader loss and member churn while hosts join and leave.

Agents (alloc backend, --lease-ttl 6, all three endpoints) hold leases while
the etcd leader is killed, then each member in turn (one down at a time:
quorum kept), and meanwhile new hosts start and old ones stop with
--release-on-exit. Asserted: no lease lost or duplicated; every agent renews
within FAILOVER_BOUND seconds of each kill (measured from the SIGKILL until
its leaseagent_lease_renewals_total next goes up).
"""

from __future__ import annotations

import signal
import time

from faultkit import (
    ALLOC,
    check_no_lease_lost_or_duplicated,
    put_config,
    renewals,
    wait_until,
)

TTL = 6
FAILOVER_BOUND = 5.0


def test_leader_loss_and_member_churn_lose_and_duplicate_no_lease(etcd_cluster, cluster_agents):
    cluster = etcd_cluster
    put_config(cluster, ALLOC)
    serial = iter(range(1, 250))
    everyone = []

    def new_agent(first_member: int):
        n = next(serial)
        agent = cluster_agents(f"h{n}", f"10.200.0.{n}", ttl=TTL,
                               endpoints=cluster.endpoints_starting_with(first_member),
                               extra=["--release-on-exit", "--etcd-timeout", "1"])
        everyone.append(agent)
        return agent.start(metrics=True)

    running = [new_agent(i % 3) for i in range(5)]
    for agent in running:
        agent.wait_subnet()

    worst = 0.0
    kills = joined = left = 0
    victims = [cluster.leader(), 0, 1, 2]
    for victim in victims:
        before = {a.name: renewals(a) for a in running}
        # The agents whose first endpoint is the victim are the ones the issue names.
        cluster.kill(victim)
        killed_at = time.monotonic()
        kills += 1
        # Churn while the member is down: one host joins, one leaves.
        joiner = new_agent(victim)
        leaver = running.pop(0)
        leaver.signal(signal.SIGTERM)
        assert leaver.wait_exit(15) == 0, leaver.log()
        left += 1
        for agent in running:
            wait_until(f"{agent.name} renews after member m{victim} was killed",
                       lambda a=agent, b=before: renewals(a) > b[a.name], timeout=FAILOVER_BOUND + 3)
            worst = max(worst, time.monotonic() - killed_at)
        joiner.wait_subnet(timeout=20)
        running.append(joiner)
        joined += 1
        cluster.restart(victim)

    # Let every agent pass one more renewal on the healed cluster, then check.
    marks = {a.name: renewals(a) for a in running}
    for agent in running:
        wait_until(f"{agent.name} renews", lambda a=agent: renewals(a) > marks[a.name], 10)
    keys = check_no_lease_lost_or_duplicated(cluster, running, everyone)
    assert keys == len(running), "released leases must be gone, held ones present"
    for agent in everyone:
        assert agent not in running or agent.proc is not None
        if agent not in running:
            assert "could not release" not in agent.log(), agent.log()
    failures = sum(a.metric("leaseagent_lease_renewal_failures_total") or 0 for a in running)
    print(f"\nscenario 2: {kills} member kills (leader first), {joined} hosts joined, "
          f"{left} left; {keys} leases held = {len(running)} agents, 0 lost, 0 duplicated; "
          f"slowest renewal after a kill {worst:.2f}s (bound {FAILOVER_BOUND}s); "
          f"{int(failures)} failed renewal attempts among survivors")
    assert worst < FAILOVER_BOUND
