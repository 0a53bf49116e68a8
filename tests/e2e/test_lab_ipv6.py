"""The dual-stack lab (`deploy/lab up --ipv6`, `Lab(ipv6=True)`).

End to end (real agents, real kernel, real etcd): in a 3-host dual-stack lab,
on vxlan and on host-gw, every container reaches every other container, on its
own host and on the others, over IPv4 and over IPv6; the agents found their
PublicIPv6 on eth0 and wrote both families' subnets; the lab's own matrix is
complete per family. With a real dockerd per host, dockerd takes `--ipv6
--fixed-cidr-v6` from the agent's options and its containers reach each other
over both families too.

The lab's own side, without the data plane: the addresses it gives, the
network config it writes, how it reads subnet.env, the matrix per family, its
state file; and, in real namespaces with a stand-in agent that only writes
subnet.env, the wiring of both families on one host (no DAD wait), and a clean
failure when an agent writes no IPv6 subnet.

When the agent or the data plane is not dual-stack yet, the end-to-end tests
fail with the lab's message (subnet.env without FLANNEL_IPV6_SUBNET, or the
matrix of the family that does not reach), never by hanging.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from ipaddress import (
    IPv4Address,
    IPv4Interface,
    IPv4Network,
    IPv6Address,
    IPv6Interface,
)
from pathlib import Path

import pytest
from peerhold import peer_hold
from subnets import lab_free, lab_free6

from leaseagent.core.network import network_config_from_dict
from leaseagent.core.subnetenv import SubnetEnv, parse_environment_file
from leaseagent.lab import CONTAINER_NETWORK6, UNDERLAY6, Container, Host, Lab, LabError, run
from leaseagent.lab.agents import wait_subnet
from leaseagent.lab.cli import _parser
from leaseagent.lab.probes import OUTSIDE, Reachability, _ping_argv, check_target
from leaseagent.lab.state import StateDir
from leaseagent.lab.topology import Topology, underlay_ipv6

FAMILIES = (4, 6)
REACH_TIMEOUT = 10.0  # seconds after `up` for every pair, as `deploy/lab up` waits
CONVERGE = 2.0  # seconds: the promise for joins and removals (after the hold-down)

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)")


# --------------------------------------------------------------------------- end to end


def all_containers(lab: Lab) -> list[Container]:
    return [c for h in lab.hosts.values() for c in h.containers]


def unreachable(lab: Lab, family: int, *, timeout: float) -> list[str]:
    """Every ordered pair of distinct containers (same host or not) pinged over IPv`family`,
    the failed ones again until `timeout`; the pairs that never answered."""
    todo = [(a, b) for a in all_containers(lab) for b in all_containers(lab) if a is not b]
    deadline = time.monotonic() + timeout
    while True:
        todo = [(a, b) for a, b in todo if not lab.ping(a, b.address(family), wait=1)]
        if not todo or time.monotonic() > deadline:
            return [f"{a.ns} -> {b.ns} {b.address(family)}" for a, b in todo]


def assert_dual_stack(lab: Lab) -> None:
    """Both families' subnets as the agents wrote them, their PublicIPv6 in etcd, and every
    container reaching every other over IPv4 and IPv6."""
    for host in lab.hosts.values():
        env = parse_environment_file(host.subnet_file.read_text())
        assert env["FLANNEL_IPV6_NETWORK"] == str(CONTAINER_NETWORK6), host.name
        assert host.subnet6 == IPv6Interface(env["FLANNEL_IPV6_SUBNET"]), host.name
        value = lab.lease_value(host)
        assert value is not None and value.get("PublicIPv6") == str(host.public_ipv6), value
        for c in host.containers:
            assert c.ip6 is not None and host.subnet6 is not None
            assert c.ip6 in host.subnet6.network, (c.ns, c.ip6, host.subnet6)
    matrices = lab.wait_reachable_all(timeout=REACH_TIMEOUT)
    assert all(m.all_ok for m in matrices.values()), "\n" + "\n".join(
        m.format() for m in matrices.values())
    for family in FAMILIES:
        missed = unreachable(lab, family, timeout=5)
        assert not missed, f"IPv{family}: {missed}"
    n = len(all_containers(lab))
    print(f"\n{lab.backend}: {n} containers, all {n * (n - 1)} ordered pairs reachable over "
          "IPv4 and over IPv6\n" + "\n".join(m.format() for m in matrices.values()))


@pytest.mark.root
def test_dual_stack_vxlan_every_container_reaches_every_other(vxlan_lab6: Lab) -> None:
    assert_dual_stack(vxlan_lab6)


@pytest.mark.root
def test_dual_stack_host_gw_every_container_reaches_every_other(hostgw_lab6: Lab) -> None:
    assert_dual_stack(hostgw_lab6)


@pytest.mark.root
def test_dual_stack_status_shows_both_matrices(vxlan_lab6: Lab) -> None:
    """`deploy/lab status` on the running lab (another process, from state.json)."""
    done = run([sys.executable, "-m", "leaseagent.lab", "status", "--name", vxlan_lab6.name],
               check=False, timeout=60)
    assert "reachability (ping -c 1" in done and "reachability over IPv6 (ping -6" in done, done
    assert "12/12 cross-host pairs reachable\n" in done, done
    assert "12/12 cross-host pairs reachable over IPv6" in done, done
    assert f"outside host {OUTSIDE[6]}" in done, done


@pytest.mark.root
def test_dual_stack_host_joins_and_leaves_in_both_families(vxlan_lab6: Lab) -> None:
    """A new host is reachable over both families within CONVERGE s of its lease; once
    it is dead and its lease gone, its IPv6 entries (route, neighbour, FDB on
    flannel-v6.<VNI>) leave its peers as its IPv4 ones do, after the hold time."""
    lab = vxlan_lab6
    host = lab.add_host(containers=1)
    try:
        assert host.subnet_seen_at is not None and host.subnet6 is not None
        pairs = [(c, h) for (c, h) in lab.pairs() if h is host or c in host.containers]
        deadline = host.subnet_seen_at + CONVERGE
        for family in FAMILIES:
            reach = lab.reachability(pairs, wait=0.2, family=family)
            while not reach.all_ok and time.monotonic() < deadline:
                reach = lab.reachability(pairs, wait=0.2, family=family)
            assert reach.all_ok, reach.format()
        joined = time.monotonic() - host.subnet_seen_at
        value = lab.lease_value(host)
        assert value is not None
        macs = {4: value["BackendData"]["VtepMAC"], 6: value["BackendV6Data"]["VtepMAC"]}  # type: ignore[index]
        subnets = {4: host.subnet.network, 6: host.subnet6.network}  # type: ignore[union-attr]
        others = [h for h in lab.hosts.values() if h is not host]

        def entries() -> dict[str, int]:
            return {f"{h.name} IPv{f}": len(lab.kernel_entries(h, subnets[f], macs[f]))
                    for h in others for f in FAMILIES}

        assert set(entries().values()) == {3}, entries()  # route, neighbour, FDB
        lab.remove_host(host)
        lab.delete_lease(host)  # the dual-stack key
        gone_at = time.monotonic()
        while any(entries().values()) and \
                time.monotonic() < gone_at + peer_hold(lab) + CONVERGE:
            time.sleep(0.05)
        assert not any(entries().values()), entries()
        print(f"\nnew host reachable over both families {joined:.2f}s after its lease; its "
              f"entries of both gone {time.monotonic() - gone_at:.2f}s after its lease "
              f"(held {peer_hold(lab):g}s)")
    finally:
        if host.index in lab.hosts:
            lab.remove_host(host)
            lab.delete_lease(host)
    assert all(m.all_ok for m in lab.wait_reachable_all(timeout=5).values())


def docker0_ipv6(host: Host) -> list[str]:
    out = json.loads(run(["ip", "-n", host.ns, "-j", "-6", "addr", "show", "docker0"]))
    return [f"{a['local']}/{a['prefixlen']}" for a in out[0]["addr_info"] if a["scope"] == "global"]


@pytest.mark.root
def test_dual_stack_docker_takes_ipv6_from_the_agents_options(docker_lab6: Lab) -> None:
    """dockerd (Debian's docker.io) runs with `--ipv6 --fixed-cidr-v6=$FLANNEL_IPV6_SUBNET`
    from $DOCKER_NETWORK_OPTIONS inside the host's namespace: docker0 gets the subnet's
    first address, containers addresses in it, and they reach each other over both."""
    lab = docker_lab6
    for host in lab.hosts.values():
        assert host.subnet6 is not None
        running = lab.dockerd(host).running()
        assert running is not None
        argv = Path(f"/proc/{running.pid}/cmdline").read_text().split("\0")
        assert "--ipv6" in argv and f"--fixed-cidr-v6={host.subnet6}" in argv, argv
        assert docker0_ipv6(host) == [str(host.subnet6)], host.name
    assert_dual_stack(lab)


# --------------------------------------------------------------------------- the lab's side


def test_underlay_ipv6_mirrors_the_ipv4_address() -> None:
    topology = Topology("t", ipv6=True)
    host = topology.host(1, Path("/nonexistent"))
    assert (host.public_ip, host.public_ipv6) == (IPv4Address("10.250.0.11"),
                                                  IPv6Address("fd00:250::11"))
    assert OUTSIDE[6] == IPv6Address("fd00:250::254")
    addresses = [topology.host(i, Path("/nonexistent")).public_ipv6 for i in range(1, 201)]
    specials = {underlay_ipv6(IPv4Address(a)) for a in ("10.250.0.1", "10.250.0.2")}
    assert len(set(addresses)) == 200 and not specials & set(addresses)
    assert all(a is not None and a in UNDERLAY6 for a in addresses)
    assert Topology("t").host(1, Path("/nonexistent")).public_ipv6 is None  # IPv4-only


def test_network_config_is_dual_stack_only_with_ipv6() -> None:
    assert Lab("t").network_config() == {
        "Network": "10.244.0.0/16", "SubnetLen": 24,
        "Backend": {"Type": "vxlan", "VNI": 1, "Port": 8472}}
    config = Lab("t", ipv6=True, backend="host-gw").network_config()
    assert config["EnableIPv6"] is True and config["IPv6Network"] == "fd00:244::/56"
    parsed = network_config_from_dict(config)
    assert parsed.ipv6 is not None and parsed.ipv6.subnet_len == 64  # flannel's default


def subnet_file(tmp_path: Path, ipv6: bool) -> Host:
    host = Topology("t", ipv6=True).host(1, tmp_path)
    host.subnet_file.write_text(SubnetEnv(
        network=IPv4Network("10.244.0.0/16"), subnet=IPv4Network("10.244.7.0/24"), mtu=1430,
        ipv6_network=CONTAINER_NETWORK6 if ipv6 else None,
        ipv6_subnet=next(CONTAINER_NETWORK6.subnets(new_prefix=64)) if ipv6 else None,
    ).render())
    return host


def test_wait_subnet_reads_both_families(tmp_path: Path) -> None:
    host = subnet_file(tmp_path, ipv6=True)
    wait_subnet(host, timeout=1, ipv6=True)
    assert host.subnet == IPv4Interface("10.244.7.1/24") and host.mtu == 1430
    assert host.subnet6 == IPv6Interface("fd00:244::1/64")
    ipv4_only = subnet_file(tmp_path, ipv6=True)
    wait_subnet(ipv4_only, timeout=1)
    assert ipv4_only.subnet6 is None  # an IPv4 lab ignores the lines


def test_wait_subnet_without_the_ipv6_lines_fails_at_once(tmp_path: Path) -> None:
    host = subnet_file(tmp_path, ipv6=False)
    started = time.monotonic()
    with pytest.raises(LabError, match="FLANNEL_IPV6_SUBNET"):
        wait_subnet(host, timeout=30, ipv6=True)
    assert time.monotonic() - started < 1


def matrix(family: int) -> Reachability:
    hosts = []
    for i in (1, 2):
        host = Topology("t", ipv6=True).host(i, Path("/nonexistent"))
        host.containers = [Container(ns=f"la-t-c{i}-1", ip=IPv4Address(f"10.244.{i}.2"), index=1,
                                     ip6=IPv6Address(f"fd00:244:0:{i}::2"))]
        hosts.append(host)
    cells = {("la-t-c1-1", "la-t-h2"): True, ("la-t-c2-1", "la-t-h1"): family == 4}
    return Reachability(rows=[h.containers[0] for h in hosts], columns=hosts, cells=cells,
                        family=family)


def test_the_matrix_is_per_family() -> None:
    v4, v6 = matrix(4).format(), matrix(6).format()
    assert "c1-1 10.244.1.2" in v4 and "fd00" not in v4
    assert v4.endswith("2/2 cross-host pairs reachable")
    assert "c2-1 fd00:244:0:2::2" in v6 and "10.244" not in v6
    assert "FAIL" in v6 and v6.endswith("1/2 cross-host pairs reachable over IPv6")


def test_ping_targets_only_lab_addresses_and_uses_ping_6() -> None:
    c = Container(ns="la-t-c1-1", ip=IPv4Address("10.244.1.2"), index=1)
    assert _ping_argv(c, "10.244.2.2", "-c", "1")[-6:] == [
        "ping", "-n", "-q", "-c", "1", "10.244.2.2"]  # as before
    assert _ping_argv(c, "fd00:244:0:2::2")[-5:] == ["ping", "-6", "-n", "-q", "fd00:244:0:2::2"]
    for ok in ("fd00:244:0:ff::2", "fd00:250::11"):
        check_target(ok)
    for bad in ("fd00:245::1", "2001:db8::1", "::1", "fd00:251::11"):
        with pytest.raises(LabError):
            check_target(bad)


def test_state_file_keeps_both_families(tmp_path: Path) -> None:
    topology = Topology("t", ipv6=True)
    host = topology.host(1, tmp_path / "h1")
    host.subnet, host.subnet6 = IPv4Interface("10.244.7.1/24"), IPv6Interface("fd00:244:0:7::1/64")
    host.containers = [topology.container(host, 1, IPv4Address("10.244.7.2"),
                                          ip6=IPv6Address("fd00:244:0:7::2"))]
    state = StateDir(tmp_path, "t")
    state.create()
    state.save(name="t", backend="vxlan", lease_ttl=10, containers_per_host=1, hosts=[host],
               ipv6=True)
    fresh = Topology("t")
    saved = state.load(fresh)
    assert saved.ipv6 and fresh.ipv6
    (back,) = saved.hosts
    assert (back.public_ipv6, back.subnet6) == (host.public_ipv6, host.subnet6)
    assert back.containers[0].ip6 == IPv6Address("fd00:244:0:7::2")

    doc = json.loads(state.state_file.read_text())  # a state file from before --ipv6
    doc.pop("ipv6")
    for h in doc["hosts"]:
        h.pop("subnet6")
        for c in h["containers"]:
            c.pop("ip6")
    state.state_file.write_text(json.dumps(doc))
    old = state.load(Topology("t"))
    assert not old.ipv6 and old.hosts[0].subnet6 is None and old.hosts[0].containers[0].ip6 is None


def test_cli_takes_ipv6() -> None:
    assert _parser().parse_args(["up", "--ipv6"]).ipv6
    assert not _parser().parse_args(["up"]).ipv6


# --------------------------------------------------------------------------- lab wiring, stand-in agent

# Writes subnet.env as an agent would (10.244.<n>.0/24 and fd00:244:0:<n>::/64 for the
# host at 10.250.0.<n>; the IPv6 lines only if told), then sleeps until `down` stops it.
STAND_IN = """
import sys, time
from ipaddress import IPv4Address, IPv4Network, IPv6Network
from pathlib import Path
from leaseagent.core.subnetenv import SubnetEnv
six, args = sys.argv[1] == "six", sys.argv[2:]
n = int(IPv4Address(args[args.index("--public-ip") + 1])) & 0xFF
env = SubnetEnv(network=IPv4Network("10.244.0.0/16"), subnet=IPv4Network(f"10.244.{n}.0/24"),
                mtu=1450, ipv6_network=IPv6Network("fd00:244::/56") if six else None,
                ipv6_subnet=IPv6Network(f"fd00:244:0:{n:x}::/64") if six else None)
Path(args[args.index("--subnet-file") + 1]).write_text(env.render())
time.sleep(3600)
"""


@pytest.fixture
def stand_in_lab() -> Iterator[Lab]:
    with Lab(f"s6{os.getpid() % 100000}", ipv6=True,
             agent_command=[sys.executable, "-c", STAND_IN, "six"]) as lab:  # down on exit
        lab.up(2, 2)
        yield lab
    assert not lab.topology.present()


def ipv6_addresses(ns: str, dev: str) -> list[dict[str, object]]:
    out = json.loads(run(["ip", "-n", ns, "-j", "-6", "addr", "show", "dev", dev]))
    return [a for a in out[0]["addr_info"] if a["scope"] == "global"]


@pytest.mark.root
@needs_root
def test_stand_in_lab_wires_both_families_on_each_host(stand_in_lab: Lab) -> None:
    """Addresses and routes of both families, none tentative; on one host (no data plane)
    a container reaches its bridge and its sibling over IPv6 at the first ping; the hosts
    reach each other and the outside host over the IPv6 underlay."""
    lab = stand_in_lab
    h1, h2 = lab.hosts[1], lab.hosts[2]
    for host in (h1, h2):
        assert host.subnet6 == IPv6Interface(f"fd00:244:0:{int(host.public_ip) & 0xFF:x}::1/64")
        assert [a["local"] for a in ipv6_addresses(host.ns, "eth0")] == [str(host.public_ipv6)]
        assert [f"{a['local']}/{a['prefixlen']}" for a in ipv6_addresses(host.ns, "br0")] == [
            str(host.subnet6)]
        assert run(["ip", "netns", "exec", host.ns, "sysctl", "-n",
                    "net.ipv6.conf.all.forwarding"]).strip() == "1"
        for c in host.containers:
            assert host.subnet6 is not None and c.ip6 == host.subnet6.ip + c.index
            (addr,) = ipv6_addresses(c.ns, "eth0")
            assert addr["local"] == str(c.ip6) and not addr.get("tentative"), addr
            route = run(["ip", "-n", c.ns, "-6", "route", "show", "default"])
            assert f"via {host.subnet6.ip} dev eth0" in route, route
        first, second = host.containers
        assert host.subnet6 is not None
        assert lab.ping(first, host.subnet6.ip, wait=1)
        assert lab.ping(first, second.address(6), wait=1)
    assert lab.ping(h1.ns, str(h2.public_ipv6), wait=1)
    assert lab.ping(h1.ns, OUTSIDE[6], wait=1)

    again = Lab.load(lab.name)  # what `status` sees
    assert again.ipv6 and again.families == (4, 6)
    assert [c.ip6 for c in again.hosts[1].containers] == [c.ip6 for c in h1.containers]


@pytest.mark.root
@needs_root
def test_an_agent_without_ipv6_subnet_fails_up_cleanly() -> None:
    lab = Lab(f"s4{os.getpid() % 100000}", ipv6=True,
              agent_command=[sys.executable, "-c", STAND_IN, "four"])
    started = time.monotonic()
    try:
        with pytest.raises(LabError, match="FLANNEL_IPV6_SUBNET"):
            lab.up(1, 1)
        assert time.monotonic() - started < 15
    finally:
        assert not lab.down()
    assert not lab.topology.present()


# A dual-stack lease exactly as flanneld writes it (pkg/lease/lease.go's LeaseAttrs, in its
# field order; flannel's vxlan backend's BackendData and BackendV6Data), for a host that
# runs flanneld: its PublicIPs are the lab's spare underlay addresses .99 / ::99.
FLANNELD_VALUE = ('{"PublicIP":"10.250.0.99","PublicIPv6":"fd00:250::99","BackendType":"vxlan",'
                  '"BackendData":{"VNI":1,"VtepMAC":"a6:4f:0b:2f:10:63"},'
                  '"BackendV6Data":{"VNI":1,"VtepMAC":"a6:4f:0b:2f:16:63"}}')


def test_a_flanneld_dual_stack_lease_is_programmed_over_both_families(vxlan_lab6: Lab) -> None:
    lab = vxlan_lab6
    v4, v6 = lab_free(lab)[0], lab_free6(lab)[0]  # no host's: theirs are random
    key = lab.keys.lease_key(v4, v6)
    lab.etcdctl("put", key, FLANNELD_VALUE)
    try:
        deadline = time.monotonic() + CONVERGE
        want = {4: (v4, "a6:4f:0b:2f:10:63"), 6: (v6, "a6:4f:0b:2f:16:63")}

        def programmed() -> dict[str, list[str]]:
            return {f"{h.name} IPv{f}": lab.kernel_entries(h, subnet, mac)
                    for h in lab.hosts.values() for f, (subnet, mac) in want.items()}

        while any(len(e) != 3 for e in programmed().values()) and time.monotonic() < deadline:
            time.sleep(0.05)
        found = programmed()
        assert all(len(e) == 3 for e in found.values()), found  # route, neighbour, FDB
        h1 = next(iter(lab.hosts.values()))
        text = "\n".join(found[f"{h1.name} IPv6"])
        assert f"{v6} via {v6.network_address} dev flannel-v6.1" in text
        assert "dst fd00:250::99" in text  # the FDB entry to its PublicIPv6
    finally:
        lab.etcdctl("del", key)
