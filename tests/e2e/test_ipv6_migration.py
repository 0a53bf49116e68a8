"""IPv6 turned on in a running IPv4 cluster, without renumbering and without loss.

A 3-host vxlan lab whose underlay already carries IPv6 starts with an IPv4-only
network config; containers ping each other over IPv4 all along. Then the
config gains EnableIPv6 and the agents are restarted one at a time, as the
README says an operator does. Each keeps its IPv4 subnet and gains an IPv6
one: its key is moved to the dual-stack key in one etcd transaction, so at
no revision of etcd's history is any host's subnet without a key; not one
IPv4 packet is lost; afterwards every container reaches every other over
IPv6 too. (flannel deletes such leases and gives every host a new IPv4
subnet: pkg/subnet/etcd/local_manager.go, isIPv6SubnetConfigCompat.)
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator

import pytest
from switching_lab import SwitchingLab, give_containers_ipv6

from leaseagent.lab import Lab
from leaseagent.lab.probes import REPLY_WAIT

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)")]

PING_INTERVAL = 0.02


@pytest.fixture
def lab() -> Iterator[SwitchingLab]:
    lab = SwitchingLab(f"mg{os.getpid() % 100000}", ipv6=True, lease_ttl=30)
    try:
        lab.up(3, 1)
        yield lab
    finally:
        warnings = lab.down()
        assert not warnings, warnings


def keys_at(lab: Lab, revision: int) -> list[str]:
    out = lab.etcdctl("get", "--prefix", "--keys-only", f"--rev={revision}",
                      lab.keys.subnets_prefix)
    return [line for line in out.splitlines() if line.strip()]


def current_revision(lab: Lab) -> int:
    header = json.loads(lab.etcdctl("get", lab.keys.config_key, "-w", "json"))["header"]
    return int(header["revision"])


def test_turning_ipv6_on_keeps_every_ipv4_subnet_and_loses_no_ipv4_packet(
        lab: SwitchingLab) -> None:
    hosts = list(lab.hosts.values())
    assert lab.wait_reachable(timeout=15).all_ok
    before = {h.index: h.subnet for h in hosts}
    assert all(h.subnet6 is None for h in hosts)
    start = current_revision(lab)

    # Every container pings the next host's container over IPv4 during the whole change
    # (until every ping sent during it is answered or lost, however long it takes).
    pings = [lab.ping_run(h.containers[0], hosts[(i + 1) % 3].containers[0].ip,
                          interval=PING_INTERVAL)
             for i, h in enumerate(hosts)]
    try:
        time.sleep(0.5)
        lab.ipv6_on = True
        lab._write_network_config()
        began = time.monotonic()
        for host in hosts:  # one at a time, as an operator restarts them
            lab.stop_agent(host)
            host.subnet_file.unlink()  # so wait_subnet sees the new one
            lab.start_agent(host)
            lab.wait_subnet(host)
            lab.wait_ready(host)
        took = time.monotonic() - began
        time.sleep(REPLY_WAIT + 0.5)  # every ping sent during the change is settled
        assert all(p.running() for p in pings), "a ping stopped by itself"
    finally:
        outcomes = [p.stop() for p in pings]
    print(f"\nrolling restart onto the IPv6 config: {took:.2f}s for 3 hosts")

    # Not one IPv4 packet lost.
    for sent, lost, out in outcomes:
        assert sent > 0 and lost == [], out

    # Same IPv4 subnets, each with an IPv6 one now, under dual-stack keys.
    end = current_revision(lab)
    for host in hosts:
        assert host.subnet == before[host.index], host.name
        assert host.subnet6 is not None
        value = lab.lease_value(host)
        assert value is not None and value["PublicIPv6"] == str(host.public_ipv6)
    assert sorted(keys_at(lab, end)) == sorted(lab.lease_key(h) for h in hosts)

    # At no revision in between was any host's IPv4 subnet without a key.
    names = {h.index: lab.keys.lease_key(h.subnet.network) for h in hosts if h.subnet}
    for revision in range(start, end + 1):
        keys = keys_at(lab, revision)
        for index, v4_key in names.items():
            assert any(k == v4_key or k.startswith(v4_key + "&") for k in keys), (
                f"revision {revision}: no key for host {index}'s subnet ({keys})")

    # And IPv6 works: Docker (here the lab's bridge) takes the new options.
    for host in hosts:
        give_containers_ipv6(host)
    assert lab.wait_reachable(timeout=15, family=6).all_ok
    assert lab.wait_reachable(timeout=5, family=4).all_ok
