"""Real Docker in the lab: a dockerd per host on the options its agent wrote, containers
made by `docker run`, pinging across hosts, over vxlan and host-gw.

Each dockerd reads the agent's options file the way the docker.service drop-in
does (leaseagent.lab.docker); nothing here derives --bip. Skipped, with the
check that failed, only where dockerd cannot run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from ipaddress import IPv4Interface

import pytest

from leaseagent.core.subnetenv import parse_environment_file
from leaseagent.lab import Host, Lab, processes, run
from leaseagent.lab.docker import unavailable

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)")]


def docker_lab(tag: str, backend: str = "vxlan", **options: bool) -> Iterator[Lab]:
    why = unavailable()
    if why:
        pytest.skip(f"dockerd cannot run here: {why}")
    lab = Lab(f"{tag}{os.getpid() % 100000}", backend=backend, docker=True, **options)
    try:
        lab.up(2, 1)
        yield lab
    finally:
        warnings = lab.down()
        assert not warnings, warnings


@pytest.fixture(scope="module")
def vxlan_docker() -> Iterator[Lab]:
    """With ip_masq (FLANNEL_IPMASQ=true): one Docker lab for these tests and the masquerade
    one (each Docker lab is two dockerds and an image load); host-gw's runs without it."""
    yield from docker_lab("dv", "vxlan", ip_masq=True)


@pytest.fixture(scope="module")
def hostgw_docker() -> Iterator[Lab]:
    yield from docker_lab("dg", "host-gw")


def subnet_env(host: Host) -> dict[str, str]:
    return parse_environment_file(host.subnet_file.read_text())


def docker0_address(host: Host) -> str | None:
    """docker0's IPv4 address, or None while it has none (a restarting dockerd has made
    the bridge but not yet given it its --bip)."""
    out = json.loads(run(["ip", "-n", host.ns, "-j", "-4", "addr", "show", "docker0"]))
    infos = out[0]["addr_info"] if out else []
    if not infos:
        return None
    return f"{infos[0]['local']}/{infos[0]['prefixlen']}"


def assert_docker_follows_subnet_env(lab: Lab) -> None:
    for host in lab.hosts.values():
        env = subnet_env(host)
        subnet = IPv4Interface(env["FLANNEL_SUBNET"])
        assert docker0_address(host) == env["FLANNEL_SUBNET"], host.name
        for c in host.containers:
            assert c.ip in subnet.network, (host.name, c.ip, subnet)
            eth0 = run(c.exec_argv(["cat", "/sys/class/net/eth0/mtu"])).strip()
            assert eth0 == env["FLANNEL_MTU"], (host.name, eth0)


@pytest.mark.parametrize("backend", ["vxlan", "host-gw"])
def test_real_containers_on_the_leased_subnets_ping_across_hosts(
        backend: str, request: pytest.FixtureRequest) -> None:
    lab: Lab = request.getfixturevalue("vxlan_docker" if backend == "vxlan" else "hostgw_docker")
    assert_docker_follows_subnet_env(lab)
    reach = lab.wait_reachable(timeout=15)
    assert reach.all_ok, reach.format()
    print(f"\n{backend}: {len(reach.cells)} cross-host pairs reachable from `docker exec`")


def test_a_dockerd_restart_keeps_reachability_once_containers_run_again(vxlan_docker: Lab) -> None:
    lab = vxlan_docker
    host = lab.hosts[1]
    started = time.monotonic()
    lab.dockerd(host).restart()
    lab.refresh_containers(host)
    reach = lab.wait_reachable(timeout=20)
    assert reach.all_ok, reach.format()
    print(f"\ndockerd restarted; all pairs reachable again {time.monotonic() - started:.1f}s later")


def test_a_forced_subnet_change_moves_docker0_through_the_restart_hook(vxlan_docker: Lab) -> None:
    """Another host's lease overwrites h1's key (flannel's blind Put does that): its agent
    logs SUBNET LOST, takes a new subnet, rewrites Docker's options; the hook restarts
    dockerd, docker0 and the containers move, and every pair reaches again."""
    lab = vxlan_docker
    host = lab.hosts[1]
    old = subnet_env(host)["FLANNEL_SUBNET"]
    thief = {"PublicIP": "10.250.0.99", "PublicIPv6": None, "BackendType": "vxlan",
             "BackendData": {"VNI": 1, "VtepMAC": "0a:00:00:00:00:63"}, "NodeID": "thief"}
    lab.etcdctl("put", lab.lease_key(host), json.dumps(thief))
    changed = time.monotonic()
    deadline = changed + 30
    while True:
        new = subnet_env(host)["FLANNEL_SUBNET"]
        moved = new != old and docker0_address(host) == new if _has_docker0(host) else False
        if moved:
            break
        assert time.monotonic() < deadline, (new, (host.dir / "docker-hook.log").read_text())
        time.sleep(0.2)
    took = time.monotonic() - changed
    assert "SUBNET LOST" in host.log_file.read_text()
    lab.wait_subnet(host)
    lab.refresh_containers(host)
    assert_docker_follows_subnet_env(lab)
    reach = lab.wait_reachable(timeout=20)
    assert reach.all_ok, reach.format()
    print(f"\nsubnet {old} -> {new}: docker0 moved {took:.1f}s after the overwrite")


def _has_docker0(host: Host) -> bool:
    try:
        docker0_address(host)
    except Exception:
        return False
    return True


def test_with_ip_masq_dockerd_leaves_masquerade_to_the_agent(vxlan_docker: Lab) -> None:
    """FLANNEL_IPMASQ=true: Docker's options say --ip-masq=false, the agent masquerades what
    leaves the cluster network, and a container on another host sees the sender's address."""
    lab = vxlan_docker
    assert lab.ip_masq
    h1, h2 = lab.hosts[1], lab.hosts[2]
    running = lab.dockerd(h1).running()
    assert running is not None and "--ip-masq=false" in processes.cmdline(running.pid)
    assert all(lab.outside().values())
    c1, c2 = h1.containers[0], h2.containers[0]
    pid = int(lab.dockerd(h2).docker("inspect", "-f", "{{.State.Pid}}", "c1").strip())
    listener = subprocess.Popen(
        ["nsenter", f"--net=/proc/{pid}/ns/net", sys.executable, "-c",
         "import socket; s = socket.socket(); s.bind(('0.0.0.0', 7000)); s.listen(); "
         "s.settimeout(15); c, a = s.accept(); print(a[0])"],
        stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(0.5)
        run(c1.exec_argv(["sh", "-c", f"echo hi | nc -w 2 {c2.ip} 7000"]))
        out, _ = listener.communicate(timeout=20)
    finally:
        if listener.poll() is None:
            listener.kill()
            listener.wait()
    assert out.strip() == str(c1.ip)
