"""Network config changes applied by running agents (alloc backend: no kernel), real etcd.

The data-plane side (MTU, DirectRouting, vxlan <-> host-gw, pings) is in
tests/e2e/test_config_changes.py; here the lease side: who keeps, who moves,
subnet.env, invalid versions ignored, a burst of writes coalesced.
"""

from __future__ import annotations

import json
import time
from ipaddress import IPv4Interface, IPv4Network

import pytest
from etcd_server import PREFIX, put_config
from leasectl_run import leasectl, leasectl_all
from polling import wait_for

pytestmark = pytest.mark.shared_etcd  # tests/conftest.py: one etcd, emptied before each test

ALLOC = {"Network": "10.6.0.0/16", "SubnetMin": "10.6.1.0", "SubnetMax": "10.6.200.0",
         "Backend": {"Type": "alloc"}}


def env_of(agent) -> dict[str, str]:  # type: ignore[no-untyped-def]
    return dict(line.split("=", 1) for line in agent.subnet_file.read_text().splitlines())


def revision_of_config(etcd) -> int:  # type: ignore[no-untyped-def]
    doc = json.loads(etcd.etcdctl("get", f"{PREFIX}/config", "-w", "json"))
    return int(doc["kvs"][0]["mod_revision"])


def test_shrinking_the_network_moves_only_the_host_outside_it(etcd, agents, workdir):
    put_config(etcd, ALLOC)
    docker_opts = workdir / "in.docker_opts.env"
    inside = agents("in", "10.200.0.1", extra=["--docker-opts-file", str(docker_opts)])
    outside = agents("out", "10.200.0.2")
    # Where each starts is up to allocation: reserve the one outside the new network.
    etcd.etcdctl("put", f"{PREFIX}/subnets/10.6.150.0-24", json.dumps({"PublicIP": "10.200.0.2"}))
    etcd.etcdctl("put", f"{PREFIX}/subnets/10.6.5.0-24", json.dumps({"PublicIP": "10.200.0.1"}))
    inside.start(metrics=True)
    outside.start(metrics=True)
    assert inside.wait_subnet() == "10.6.5.1/24"
    assert outside.wait_subnet() == "10.6.150.1/24"

    put_config(etcd, {**ALLOC, "Network": "10.6.0.0/17", "SubnetMax": "10.6.100.0"})
    took = wait_for(lambda: env_of(outside)["FLANNEL_NETWORK"] == "10.6.0.0/17"
                      and env_of(inside)["FLANNEL_NETWORK"] == "10.6.0.0/17",
                      timeout=10, what="both subnet.env on the new network")
    moved = IPv4Interface(env_of(outside)["FLANNEL_SUBNET"]).network
    assert moved.subnet_of(IPv4Network("10.6.0.0/17")) and moved != IPv4Network("10.6.5.0/24")
    assert env_of(inside)["FLANNEL_SUBNET"] == "10.6.5.1/24"
    assert "--bip=10.6.5.1/24" in docker_opts.read_text()
    outside.wait_log("SUBNET MOVED: subnet 10.6.150.0/24 is outside the network 10.6.0.0/17 "
                     f"(a network config change); took {moved} and gave 10.6.150.0/24 up")
    assert "SUBNET MOVED" not in inside.log()
    keys = etcd.etcdctl("get", "--prefix", "--keys-only", f"{PREFIX}/subnets/").split()
    assert sorted(keys) == sorted([f"{PREFIX}/subnets/10.6.5.0-24",
                                   f"{PREFIX}/subnets/{moved.network_address}-24"])
    assert outside.metric("leaseagent_lease_subnet_changes_total") == 1
    assert inside.metric("leaseagent_lease_subnet_changes_total") == 0
    for agent in (inside, outside):
        wait_for(lambda a=agent: a.metric("leaseagent_network_config_changes_total",
                                            'class="re-lease"') == 1, timeout=10, what="counted")
        assert agent.metric("leaseagent_network_config_revision") == revision_of_config(etcd)
        assert "Traceback" not in agent.log()
    print(f"\nshrink: both subnet.env on the new network {took:.2f}s after the write")


def test_an_invalid_config_is_ignored_counted_and_logged_once(etcd, agents):
    put_config(etcd, ALLOC)
    a = agents("a", "10.200.0.1").start(metrics=True)
    first = a.wait_subnet()
    good = revision_of_config(etcd)
    etcd.etcdctl("put", f"{PREFIX}/config", '{"Network": "10.6.0.0/33"}')
    a.wait_log("network config revision")
    wait_for(lambda: a.metric("leaseagent_network_config_ignored_total",
                                'reason="invalid"') == 1, timeout=10, what="counted")
    etcd.etcdctl("put", f"{PREFIX}/config", "not json")
    wait_for(lambda: a.metric("leaseagent_network_config_ignored_total",
                                'reason="invalid"') == 2, timeout=10, what="counted again")
    etcd.etcdctl("del", f"{PREFIX}/config")
    wait_for(lambda: a.metric("leaseagent_network_config_ignored_total",
                                'reason="missing"') == 1, timeout=10, what="deletion counted")
    errors = [line for line in a.log().splitlines() if " ERROR " in line]
    assert len(errors) == 3, errors
    assert "Network=\"10.6.0.0/33\"" in errors[0] and "keeps running on the last good" in errors[0]
    assert a.metric("leaseagent_network_config_revision") == good
    assert env_of(a)["FLANNEL_SUBNET"] == first
    status, _ = a.http("/readyz")
    assert status == 200
    # A good one again: applied.
    put_config(etcd, {**ALLOC, "Network": "10.6.0.0/15"})
    wait_for(lambda: env_of(a)["FLANNEL_NETWORK"] == "10.6.0.0/15", timeout=10, what="applied")
    assert env_of(a)["FLANNEL_SUBNET"] == first
    assert "Traceback" not in a.log()


def test_a_burst_of_writes_is_coalesced_and_the_latest_applied(etcd, agents):
    put_config(etcd, ALLOC)
    a = agents("a", "10.200.0.1").start(metrics=True)
    a.wait_subnet()
    for prefix in range(15, 10, -1):  # five writes, a few ms apart
        put_config(etcd, {**ALLOC, "Network": f"10.0.0.0/{prefix}", "SubnetMin": "10.6.1.0",
                          "SubnetMax": "10.6.200.0"})
    wait_for(lambda: env_of(a)["FLANNEL_NETWORK"] == "10.0.0.0/11", timeout=10, what="the latest")
    time.sleep(1.0)
    applied = a.metric("leaseagent_network_config_changes_total", 'class="re-lease"')
    coalesced = a.metric("leaseagent_network_config_coalesced_total")
    assert applied is not None and coalesced is not None
    assert applied + coalesced == 5 and applied <= 2, (applied, coalesced)
    assert a.metric("leaseagent_network_config_revision") == revision_of_config(etcd)


def test_leasectl_config_set_says_who_re_leases_and_restarts_docker(etcd, agents, tmp_path):
    put_config(etcd, ALLOC)
    for ip, subnet in (("10.200.0.1", "10.6.5.0"), ("10.200.0.2", "10.6.150.0")):
        etcd.etcdctl("put", f"{PREFIX}/subnets/{subnet}-24", json.dumps({"PublicIP": ip}))
    fleet = [agents(name, ip).start() for name, ip in (("in", "10.200.0.1"),
                                                        ("out", "10.200.0.2"))]
    for agent in fleet:
        agent.wait_subnet()
    written = revision_of_config(etcd)
    shrunk = tmp_path / "shrunk.json"
    shrunk.write_text(json.dumps({**ALLOC, "Network": "10.6.0.0/17", "SubnetMax": "10.6.100.0"}))
    retyped = tmp_path / "vxlan.json"
    retyped.write_text(json.dumps({**ALLOC, "Backend": {"Type": "vxlan"}}))
    dry, dry_retyped = leasectl_all(etcd, ["config", "set", "--dry-run", str(shrunk)],
                                    ["config", "set", "--dry-run", str(retyped)])
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.splitlines() == [
        "change: re-lease",
        "  Network 10.6.0.0/16 -> 10.6.0.0/17 (re-lease)",
        "  SubnetMax 10.6.200.0 -> 10.6.100.0 (re-lease)",
        "  10.6.150.0/24 (10.200.0.2, node out): re-leases: takes a new subnet (subnet "
        "10.6.150.0/24 is outside the network 10.6.0.0/17); restart Docker (FLANNEL_SUBNET)",
        "hosts: 2, 1 affected as above, the others keep their subnet and Docker's options",
    ]
    assert revision_of_config(etcd) == written  # a dry run writes nothing

    dry = dry_retyped
    assert dry.stdout.splitlines()[:2] == ["change: rebuild", "  Backend.Type alloc -> vxlan (rebuild)"]
    assert ("  10.6.5.0/24 (10.200.0.1, node in): rebuilds its data plane (alloc -> vxlan); "
            "restart Docker (FLANNEL_MTU)") in dry.stdout.splitlines()

    grown = tmp_path / "grown.json"
    grown.write_text(json.dumps({**ALLOC, "Network": "10.6.0.0/15"}))
    done = leasectl(etcd, "config", "set", str(grown))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].endswith("set: network 10.6.0.0/15, /24 subnets, backend alloc")
    assert lines[1:] == ["change: re-lease", "  Network 10.6.0.0/16 -> 10.6.0.0/15 (re-lease)",
                         "hosts: 2, 0 affected as above, the others keep their subnet and "
                         "Docker's options"]
    again = leasectl(etcd, "config", "set", "--dry-run", str(grown))
    assert again.stdout.splitlines() == [
        "change: none (the agents read it as the config in force)"]


def test_turning_ipv6_on_and_off_moves_the_key_and_keeps_the_ipv4_subnet(etcd, agents):
    put_config(etcd, ALLOC)
    a = agents("a", "10.200.0.1", extra=["--public-ipv6", "fd00:200::1"]).start(metrics=True)
    first = a.wait_subnet()
    subnet = IPv4Interface(first).network
    v4_key = f"{PREFIX}/subnets/{subnet.network_address}-24"

    def keys() -> list[str]:
        return etcd.etcdctl("get", "--prefix", "--keys-only", f"{PREFIX}/subnets/").split()

    assert keys() == [v4_key]
    put_config(etcd, {**ALLOC, "EnableIPv6": True, "IPv6Network": "fd00:6::/48"})
    wait_for(lambda: "FLANNEL_IPV6_SUBNET" in env_of(a), timeout=10, what="IPv6 in subnet.env")
    env = env_of(a)
    assert env["FLANNEL_SUBNET"] == first and env["FLANNEL_IPV6_NETWORK"] == "fd00:6::/48"
    (dual_key,) = keys()
    assert dual_key.startswith(v4_key + "&fd00:6:")
    value = json.loads(etcd.etcdctl("get", dual_key, "--print-value-only"))
    assert value["PublicIPv6"] == "fd00:200::1"
    a.wait_log("moved to")

    put_config(etcd, ALLOC)
    wait_for(lambda: "FLANNEL_IPV6_SUBNET" not in env_of(a), timeout=10, what="IPv6 gone")
    assert env_of(a)["FLANNEL_SUBNET"] == first
    assert keys() == [v4_key]
    assert json.loads(etcd.etcdctl("get", v4_key, "--print-value-only"))["PublicIPv6"] is None
    assert a.metric("leaseagent_lease_subnet_changes_total") == 0
    wait_for(lambda: a.metric("leaseagent_network_config_changes_total",
                              'class="re-lease"') == 2, timeout=5, what="both counted")
    assert "Traceback" not in a.log() and " ERROR " not in a.log()


def test_a_config_this_host_cannot_run_is_refused_and_the_last_good_one_kept(etcd, agents):
    put_config(etcd, ALLOC)
    etcd.etcdctl("put", f"{PREFIX}/subnets/10.6.150.0-24", json.dumps({"PublicIP": "10.200.0.2"}))
    for i in (1, 2, 3):  # every subnet of the smaller network is someone else's
        etcd.etcdctl("put", f"{PREFIX}/subnets/10.6.{i}.0-24",
                     json.dumps({"PublicIP": f"10.200.0.{10 + i}"}))
    a = agents("a", "10.200.0.2").start(metrics=True)
    assert a.wait_subnet() == "10.6.150.1/24"
    good = revision_of_config(etcd)
    put_config(etcd, {"Network": "10.6.0.0/22", "Backend": {"Type": "alloc"}})
    wait_for(lambda: a.metric("leaseagent_network_config_ignored_total",
                              'reason="unusable"') == 1, timeout=10, what="refused")
    a.wait_log("going back to the last good one")
    errors = [line for line in a.log().splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "no free subnet in network 10.6.0.0/22" in errors[0], errors
    assert env_of(a)["FLANNEL_NETWORK"] == "10.6.0.0/16"
    assert env_of(a)["FLANNEL_SUBNET"] == "10.6.150.1/24"
    assert a.metric("leaseagent_network_config_revision") == good
    assert a.metric("leaseagent_lease_subnet_changes_total") == 0
    status, _ = a.http("/readyz")
    assert status == 200
    assert "Traceback" not in a.log()
