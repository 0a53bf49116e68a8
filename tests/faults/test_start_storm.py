"""Scenario 5: a start storm. 100 agents at once on a range of exactly 100 subnets.

In-process agents (tests/faults/inproc.py), each with its own EtcdStore, all
started in the same instant against the 3-member cluster; every round they
must all hold distinct subnets (the range is then full), and all release on
stop (--release-on-exit) so the next round starts from an empty range. Each
round uses fresh hosts (no subnet.env from the last round), so every round
is a real race. Counted: create transactions per acquisition and lost races.

CI runs 2 rounds; LEASEAGENT_FULL=1 runs 10 (docs/reliability.md).
"""

from __future__ import annotations

import asyncio
import json
import tempfile
import time
from ipaddress import IPv4Network
from pathlib import Path

from faultkit import FULL, PREFIX, SUBNETS, put_config
from inproc import counting_logs, make_agent, wait_all

from leaseagent.store.etcd import EtcdSettings, EtcdStore

HOSTS = 100
ROUNDS = 10 if FULL else 2
RANGE_100 = {"Network": "10.6.0.0/16", "SubnetMin": "10.6.1.0", "SubnetMax": "10.6.100.0",
             "Backend": {"Type": "alloc"}}


async def test_start_storm_100_agents_on_100_subnets(etcd_cluster):
    put_config(etcd_cluster, RANGE_100)
    endpoints = etcd_cluster.endpoints
    observer = await EtcdStore.connect(EtcdSettings(endpoints=endpoints))
    txns = conflicts = 0
    slowest = 0.0
    try:
        with counting_logs() as logs:
            for rnd in range(ROUNDS):
                with tempfile.TemporaryDirectory(prefix="leaseagent-storm-") as d:
                    fleet = await asyncio.gather(*(
                        make_agent(Path(d), f"r{rnd}h{i}", f"10.201.{i // 200}.{i % 200 + 1}",
                                   endpoints=endpoints)
                        for i in range(HOSTS)))
                    try:
                        started = time.monotonic()
                        for a in fleet:
                            a.start()
                        await wait_all(fleet, lambda a: a.ready, timeout=90,
                                       what=f"round {rnd}: agents holding a lease")
                        slowest = max(slowest, time.monotonic() - started)
                        subnets = [a.agent.own.subnet for a in fleet if a.agent.own]
                        assert len(set(subnets)) == HOSTS, f"round {rnd}: duplicates"
                        assert all(IPv4Network("10.6.1.0/24").network_address <= s.network_address
                                   <= IPv4Network("10.6.100.0/24").network_address
                                   for s in subnets)
                        held = (await observer.list_prefix(SUBNETS)).items
                        by_key = {kv.key: json.loads(kv.value)["PublicIP"] for kv in held}
                        assert len(by_key) == HOSTS
                        for a in fleet:
                            assert a.agent.own is not None
                            assert by_key[a.agent.own.key] == str(a.agent.leasing.value.public_ip)
                        for a in fleet:
                            assert a.agent.leasing is not None
                            txns += a.agent.leasing.transactions
                            conflicts += int(a.agent.metrics.registry.get_sample_value(
                                "leaseagent_allocation_conflicts_total") or 0)
                    finally:
                        await asyncio.gather(*(a.close() for a in fleet))
                    left = (await observer.list_prefix(SUBNETS)).items
                    assert left == [], f"round {rnd}: {len(left)} leases not released"
            assert not logs.errors, logs.errors
        config = await observer.get(f"{PREFIX}/config")
        assert config is not None
    finally:
        await observer.close()
    per = txns / (HOSTS * ROUNDS)
    print(f"\nscenario 5: {ROUNDS} rounds x {HOSTS} agents on {HOSTS} subnets: all distinct every "
          f"round; {per:.2f} create txns per acquisition ({conflicts} lost races in all); "
          f"slowest round fully leased in {slowest:.2f}s")
