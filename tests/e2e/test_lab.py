"""End to end: hosts, etcd and containers in network namespaces, real agents.

What a user of the cluster sees: every container reaches a container on every
other host; a new host is reachable within 2 s of its lease appearing; a dead
host whose lease is gone leaves nothing behind in its peers' kernels within
2 s; restarting an agent drops no packet across hosts.
"""

from __future__ import annotations

import json
import signal
import time

import pytest
from peerhold import peer_hold
from subnets import lab_free

from leaseagent.lab import Container, Host, Lab, parse_ping_summary, run
from leaseagent.lab.probes import REPLY_WAIT

CONVERGE = 2.0  # seconds: the promise for joins and removals (after the hold-down)


@pytest.mark.root
def test_all_pairs_reach_with_vxlan(vxlan_lab: Lab) -> None:
    reach = vxlan_lab.wait_reachable(timeout=10)
    assert reach.all_ok, "\n" + reach.format()
    assert len(reach.cells) == 3 * 2 * 2
    for host in vxlan_lab.hosts.values():
        assert host.mtu == 1450  # underlay 1500 - 50, as subnet.env says


@pytest.mark.root
def test_all_pairs_reach_with_host_gw(hostgw_lab: Lab) -> None:
    reach = hostgw_lab.wait_reachable(timeout=10)
    assert reach.all_ok, "\n" + reach.format()
    assert len(reach.cells) == 3 * 2 * 2


def _pairs_with(lab: Lab, host: Host) -> list[tuple[Container, Host]]:
    return [(c, h) for (c, h) in lab.pairs() if h is host or c in host.containers]


@pytest.mark.root
def test_new_host_reachable_within_2s_of_its_lease(vxlan_lab: Lab) -> None:
    lab = vxlan_lab
    host = lab.add_host(containers=1)
    try:
        assert host.subnet_seen_at is not None
        pairs = _pairs_with(lab, host)
        # Short ping waits so a miss costs 0.2 s, not 1 s, of the 2 s budget.
        deadline = host.subnet_seen_at + CONVERGE
        reach = lab.reachability(pairs, wait=0.2)
        while not reach.all_ok and time.monotonic() < deadline:
            reach = lab.reachability(pairs, wait=0.2)
        took = time.monotonic() - host.subnet_seen_at
        assert reach.all_ok, f"after {took:.2f}s:\n{reach.format()}"
        print(f"new host reachable from all {took:.2f}s after its lease appeared")
    finally:
        lab.remove_host(host)
        # Or its peers would keep it until the TTL runs out, and the next test's
        # new host (same index, same address) would start from that.
        lab.delete_lease(host)


@pytest.mark.root
def test_a_new_host_makes_its_device_after_its_lease_with_the_mac_it_names(
        vxlan_lab: Lab) -> None:
    """A fresh host's agent takes its lease (naming a VtepMAC it chose and stored) before
    it makes flannel.1, with that MAC (leaseagent.agent.daemon): as its log tells it."""
    lab = vxlan_lab
    host = lab.add_host(containers=0)
    try:
        lab.wait_ready(host, timeout=10)
        lines = host.log_file.read_text().splitlines()
        held = next(i for i, line in enumerate(lines) if "lease held:" in line)
        made = next(i for i, line in enumerate(lines) if "creating flannel.1" in line)
        assert held < made, "\n".join(lines[min(held, made):max(held, made) + 1])
        value = lab.lease_value(host)
        assert value is not None
        mac = value["BackendData"]["VtepMAC"]  # type: ignore[index]
        [link] = json.loads(run(["ip", "-j", "-n", host.ns, "link", "show", "flannel.1"]))
        assert link["address"] == mac and f"MAC {mac}" in lines[made]
    finally:
        lab.remove_host(host)
        lab.delete_lease(host)


@pytest.mark.root
def test_dead_host_leaves_nothing_in_peers_within_2s_of_the_hold_time(vxlan_lab: Lab) -> None:
    lab = vxlan_lab
    victim = lab.add_host(containers=1)
    try:
        assert lab.wait_reachable(timeout=5).all_ok
        value = lab.lease_value(victim)
        assert value is not None
        mac = value["BackendData"]["VtepMAC"]  # type: ignore[index]
        assert victim.subnet is not None
        subnet = victim.subnet.network
        others = [h for h in lab.hosts.values() if h is not victim]
        for h in others:
            assert len(lab.kernel_entries(h, subnet, mac)) == 3, h.name  # route, neigh, fdb

        lab.stop_agent(victim, sig=signal.SIGKILL)
        lab.delete_lease(victim)
        gone_at = time.monotonic()
        # Held for --peer-hold-time in case the lease comes back (it does not)...
        hold = peer_hold(lab)
        time.sleep(hold / 2)
        assert all(len(lab.kernel_entries(h, subnet, mac)) == 3 for h in others)
        # ...then removed everywhere.
        left = {h.name: lab.kernel_entries(h, subnet, mac) for h in others}
        while any(left.values()) and time.monotonic() < gone_at + hold + CONVERGE:
            time.sleep(0.05)
            left = {h.name: lab.kernel_entries(h, subnet, mac) for h in others}
        assert not any(left.values()), left
        print(f"dead host's entries gone {time.monotonic() - gone_at:.2f}s after its lease "
              f"(held {hold:g}s)")
    finally:
        lab.remove_host(victim)
    assert lab.wait_reachable(timeout=5).all_ok


@pytest.mark.root
def test_agent_restart_loses_no_packet(vxlan_lab: Lab) -> None:
    lab = vxlan_lab
    a, b = lab.hosts[1], lab.hosts[2]
    interval = 0.05
    pings = lab.ping_run(a.containers[0].ns, b.containers[0].ip, interval=interval)
    try:
        time.sleep(0.5)
        started = time.monotonic()
        for host in (a, b):  # the sender's side (routes to b) and the receiver's
            lab.stop_agent(host)
            lab.start_agent(host)
            lab.wait_ready(host, timeout=10)
        restarts = time.monotonic() - started
        time.sleep(REPLY_WAIT + 0.5)  # every ping sent during the restarts is settled
        assert pings.running(), "the ping stopped by itself"
    finally:
        sent, lost, out = pings.stop()
    assert sent > 0 and lost == [], out
    print(f"2 agent restarts ({restarts:.1f}s, stop to ready) under ping -i {interval}: "
          f"{sent} sent, none lost")


@pytest.mark.root
def test_start_removes_what_vanished_while_down_and_leaves_foreign_routes(vxlan_lab: Lab) -> None:
    """Entries of peers that vanished while the agent was down (flannel never removes
    them), and a stale route with our protocol, are gone after the first complete
    list; a route of another protocol is left alone."""
    lab = vxlan_lab
    target, gateway_host = lab.hosts[1], lab.hosts[2]
    victim = lab.add_host(containers=1)
    stale = foreign = ""
    try:
        assert lab.wait_reachable(timeout=5).all_ok
        # Two /24s no host of the lab holds (fixed ones clashed with a host's lease: the
        # route add failed with "File exists").
        stale, foreign = (str(n) for n in lab_free(lab, 2))
        value = lab.lease_value(victim)
        assert value is not None and victim.subnet is not None
        mac = value["BackendData"]["VtepMAC"]  # type: ignore[index]
        subnet = victim.subnet.network
        lab.stop_agent(target)  # SIGTERM: its kernel state stays as it was
        lab.stop_agent(victim, sig=signal.SIGKILL)
        lab.delete_lease(victim)  # the peer vanishes while target's agent is down
        via = str(gateway_host.public_ip)
        run(["ip", "-n", target.ns, "route", "add", stale, "via", via, "proto", "76"])
        run(["ip", "-n", target.ns, "route", "add", foreign, "via", via, "proto", "static"])
        assert len(lab.kernel_entries(target, subnet, mac)) == 3  # still there while down

        started = time.monotonic()
        lab.start_agent(target)
        lab.wait_ready(target, timeout=10)
        routes = run(["ip", "-n", target.ns, "route", "show"])
        assert lab.kernel_entries(target, subnet, mac) == []
        assert stale not in routes
        assert foreign in routes
        print(f"stale and vanished entries gone by READY, {time.monotonic() - started:.2f}s "
              "after start; foreign route kept")
    finally:
        for added in (foreign, stale):
            if added:
                run(["ip", "-n", target.ns, "route", "del", added], check=False)
        if not lab.agent_alive(target):
            lab.start_agent(target)
            lab.wait_ready(target, timeout=10)
        lab.remove_host(victim)
    assert lab.wait_reachable(timeout=5).all_ok


@pytest.mark.root
def test_an_ipv4_lab_carries_no_ipv6_of_its_own(vxlan_lab: Lab) -> None:
    """Without --ipv6 the lab is what it was: no EnableIPv6 in the network config, no IPv6
    lines in subnet.env, no global IPv6 address on a host's eth0 or br0, nor in a
    container (only the kernel's link-local ones)."""
    lab = vxlan_lab
    config = json.loads(lab.etcdctl("get", lab.keys.config_key, "--print-value-only"))
    assert "EnableIPv6" not in config and "IPv6Network" not in config, config
    for host in lab.hosts.values():
        assert "IPV6" not in host.subnet_file.read_text()
        assert host.public_ipv6 is None and host.subnet6 is None
        assert run(["ip", "-n", host.ns, "-6", "addr", "show", "scope", "global"]) == ""
        for c in host.containers:
            assert c.ip6 is None
            assert run(["ip", "-n", c.ns, "-6", "addr", "show", "scope", "global"]) == ""


def test_lab_owns_only_names_of_its_own_shape() -> None:
    lab = Lab("demo")
    for ns in ("la-demo-ul", "la-demo-etcd", "la-demo-h12", "la-demo-c3-1"):
        assert lab.owns(ns), ns
    for ns in ("la-demo2-h1", "la-demo-h1x", "la-demo-foo", "x-la-demo-h1", "la-dem-h1"):
        assert not lab.owns(ns), ns


def test_ping_summary_is_parsed() -> None:
    out = "--- 10.244.3.2 ping statistics ---\n80 packets transmitted, 79 received, 1% packet loss"
    assert parse_ping_summary(out) == (80, 79)
    assert parse_ping_summary("connect: Network is unreachable") == (0, 0)
