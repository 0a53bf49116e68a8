"""A host switched from flanneld to leaseagent while its containers talk: nothing lost.

Twice: on the namespace lab (two hosts, a namespace container each), and on the
lab with real Docker (leaseagent.lab.docker: a dockerd per host on the options
file, written as `mk-docker-opts.sh -k DOCKER_NETWORK_OPTIONS` writes it, a
busybox container each from `docker run`; the hosts forward only once dockerd
turns it on, so dockerd sets FORWARD's policy to DROP itself; skipped, with the
reason, where dockerd cannot run). Each lab is first
turned into what flanneld leaves running on a host, as flanneld makes it
(flannel's sources: pkg/subnet, pkg/backend/vxlan, pkg/trafficmngr):

- etcd: the network config as an operator wrote it for flanneld (lower-case keys,
  `"mtu": 1400`, which flanneld reads as the path MTU: a 1350 device), and each
  host's lease in flannel's form (no NodeID) on a 24-hour etcd lease;
- the kernel: flannel.1 with its MAC, neighbour and FDB entries, routes to the
  peers with the kernel's default protocol (flanneld sets none), flanneld's
  iptables chains FLANNEL-POSTRTG and FLANNEL-FWD with its rules and jumps, an
  nftables table `ip flannel-ipv4` from an nftables-mode run, a stale device
  flannel.9 (vxlan: of the names the agent owns, so it takes it over as a device
  a rebuild kept, guards its port and removes it --peer-hold-time later; doctor
  names it `kept:`) and a stale route to a subnet nobody holds; FORWARD's policy DROP and
  Docker's DOCKER-USER chain (first in FORWARD) with an operator's rule dropping
  echo requests from the container on h2 to the one on h1. With Docker, FORWARD,
  DOCKER-USER, DOCKER and the DOCKER-ISOLATION chains are dockerd's own (flanneld's
  FLANNEL-FWD jump comes after Docker's rules, as flanneld appends it); only the
  operator's rule is the test's.

Then, with a ping running between the containers, each host starts leaseagent
with flanneld's own flags in Go's syntax (one host's --ip-masq as FLANNELD_IP_MASQ)
and `leasectl cleanup --flannel` removes flanneld's leftovers. Checked: the same
subnets, lease keys and VtepMACs, FLANNEL_MTU 1350 (as flanneld's), no leftover
that doctor names, the DOCKER-USER rule still in effect, and no ping lost. With
Docker also: the agent, given the options file dockerd runs on, writes it byte
for byte as it was (so the restart hook, which restarts dockerd on a change, does
nothing), the same dockerd and the same containers (ids, start times, PIDs) run
throughout, Docker's own FORWARD rules are as dockerd left them, in their order,
with the agent's jump right after DOCKER-USER's.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
from collections.abc import Iterator

import pytest
from polling import wait_for
from subnets import lab_free

from leaseagent.config import DEFAULT_PEER_HOLD_SECONDS
from leaseagent.core.subnetenv import parse_environment_file
from leaseagent.dataplane.firewall import IptablesFirewall
from leaseagent.lab import (
    CONTAINER_NETWORK,
    ETCD_PREFIX,
    Host,
    Lab,
    run,
    tool,
)
from leaseagent.lab import agents as lab_agents
from leaseagent.lab.agents import METRICS_ADDR
from leaseagent.lab.docker import unavailable as docker_unavailable
from leaseagent.lab.probes import REPLY_WAIT
from leaseagent.lab.topology import Container

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)")]

FLANNEL_CONFIG = {"Network": str(CONTAINER_NETWORK), "subnetLen": 24,
                  "backend": {"type": "vxlan", "vni": 1, "mtu": 1400}}
FLANNEL_MTU = 1350  # flanneld: Backend.MTU 1400 is the path's; the device gets 50 less


class FlannelConfigLab(Lab):
    def network_config(self) -> dict[str, object]:
        return FLANNEL_CONFIG


def flannel_lab(tag: str, *, docker: bool) -> Iterator[Lab]:
    if docker and (why := docker_unavailable()):
        pytest.skip(f"dockerd cannot run here: {why}")
    # With Docker the hosts do not forward until dockerd turns it on: it then sets
    # FORWARD's policy to DROP itself, as on a host where nothing did before.
    lab = FlannelConfigLab(f"{tag}{os.getpid() % 100000}", ip_masq=True, lease_ttl=30,
                           docker=docker, forwarding=not docker)
    try:
        lab.up(2, 1)
        for host in lab.hosts.values():
            lab.wait_ready(host, timeout=30)
        reach = lab.wait_reachable(timeout=15)
        assert reach.all_ok, reach.format()
        yield lab
    finally:
        warnings = lab.down()
        assert not warnings, warnings


@pytest.fixture
def lab() -> Iterator[Lab]:
    yield from flannel_lab("fm", docker=False)


@pytest.fixture
def docker_lab() -> Iterator[Lab]:
    yield from flannel_lab("fd", docker=True)


def sh(host: Host, *argv: str, check: bool = True) -> str:
    return run(["ip", "netns", "exec", host.ns, *argv], check=check)


def become_flanneld_host(lab: Lab, host: Host, stale: str) -> dict[str, str]:
    """Leave `host` as flanneld leaves it (see the module docstring), with a route to
    `stale` (a peer that left while flanneld ran); its lease value. FORWARD's policy
    and DOCKER-USER are made here only where no dockerd made them."""
    assert host.subnet is not None
    pod, net = str(host.subnet.network), str(CONTAINER_NETWORK)
    lab.stop_agent(host)  # SIGTERM: device, entries and routes stay
    asyncio.run(IptablesFirewall(netns=host.ns).remove())  # flanneld has none of ours
    # flanneld's routes: the same, with the kernel's default protocol (it sets none).
    for route in json.loads(run(["ip", "-j", "-n", host.ns, "route", "show", "proto", "76"])):
        run(["ip", "-n", host.ns, "route", "replace", route["dst"], "via", route["gateway"],
             "dev", route["dev"], *(["onlink"] if "onlink" in route.get("flags", []) else []),
             "proto", "boot"])
    masq = [f"-s {pod} -d {net} -j RETURN", f"-s {net} -d {pod} -j RETURN",
            f"! -s {net} -d {pod} -j RETURN", f"-s {net} ! -d 224.0.0.0/4 -j MASQUERADE "
            "--random-fully", f"! -s {net} -d {net} -j MASQUERADE --random-fully"]
    rules = ["*nat", ":FLANNEL-POSTRTG - [0:0]",
             '-A POSTROUTING -m comment --comment "flanneld masq" -j FLANNEL-POSTRTG',
             '-A FLANNEL-POSTRTG -m mark --mark 0x4000/0x4000 -m comment --comment '
             '"flanneld masq" -j RETURN',
             *(f'-A FLANNEL-POSTRTG {r.split(" -j ")[0]} -m comment --comment "flanneld masq" '
               f'-j {r.split(" -j ")[1]}' for r in masq),
             "COMMIT", "*filter", ":FLANNEL-FWD - [0:0]",
             # Declaring DOCKER-USER would flush dockerd's: only where there is none.
             *([] if lab.docker else [":DOCKER-USER - [0:0]", "-P FORWARD DROP",
                                      "-I FORWARD 1 -j DOCKER-USER",
                                      "-A DOCKER-USER -j RETURN"]),
             '-A FORWARD -m comment --comment "flanneld forward" -j FLANNEL-FWD',
             f'-A FLANNEL-FWD -s {net} -m comment --comment "flanneld forward" -j ACCEPT',
             f'-A FLANNEL-FWD -d {net} -m comment --comment "flanneld forward" -j ACCEPT',
             "COMMIT", ""]
    subprocess.run(["ip", "netns", "exec", host.ns, "iptables-restore", "--noflush"],
                   input="\n".join(rules), text=True, check=True)
    sh(host, "nft", "add table ip flannel-ipv4")
    sh(host, "nft", "add chain ip flannel-ipv4 forward "
       "{ type filter hook forward priority filter; policy accept; }")
    sh(host, "ip", "link", "add", "flannel.9", "type", "vxlan", "id", "9", "dstport", "4789",
       "dev", "eth0", "local", str(host.public_ip), "nolearning")
    sh(host, "ip", "route", "add", stale, "via", stale.split("/")[0], "dev",
       "flannel.1", "onlink", "proto", "boot")
    # Its lease as flanneld writes it: no NodeID, a 24-hour etcd lease.
    key = lab.lease_key(host)
    value = lab.lease_value(host)
    assert value is not None
    flannel_value = json.dumps({"PublicIP": value["PublicIP"], "PublicIPv6": None,
                                "BackendType": "vxlan", "BackendData": value["BackendData"]},
                               separators=(",", ":"))
    lease = lab.etcdctl("lease", "grant", "86400").split()[1]
    lab.etcdctl("put", f"--lease={lease}", key, flannel_value)
    return {"key": key, "value": flannel_value}


def flanneld_argv(lab: Lab, host: Host) -> list[str]:
    """flanneld's flags, in Go's syntax, plus what leaseagent needs on top in the lab
    (its state dir and node id; /healthz where the lab looks)."""
    ip, port = METRICS_ADDR.split(":")
    return [
        tool("leaseagent"),
        f"-etcd-endpoints={lab.endpoints}", "-etcd-prefix", ETCD_PREFIX,
        "-iface", "nosuch9", "--iface=eth0",  # flanneld takes the first that matches
        f"-subnet-file={host.subnet_file}", "-public-ip", str(host.public_ip),
        "-iptables-resync=2", "--iptables-forward-rules=true",
        f"-healthz-ip={ip}", f"-healthz-port={port}", "-subnet-lease-renew-margin=60",
        "-v=0", "--kube-subnet-mgr=false",
        "--state-dir", str(host.dir / "state"), "--node-id", f"{lab.name}-{host.name}",
    ]


def doctor_argv(lab: Lab, host: Host) -> list[str]:
    return [tool("leasectl"), "--etcd-endpoints", lab.endpoints, "doctor", "--iface", "eth0",
            "--public-ip", str(host.public_ip), "--subnet-file", str(host.subnet_file),
            "--state-dir", str(host.dir / "state"), "--ip-masq"]


def docker_forward(host: Host) -> list[str]:
    """Docker's part of FORWARD and its chains, as `iptables -S` lists them (the
    agent's and flanneld's jumps left out), in order."""
    lines = []
    for chain in ("FORWARD", "DOCKER-USER", "DOCKER", "DOCKER-ISOLATION-STAGE-1",
                  "DOCKER-ISOLATION-STAGE-2"):
        lines += [line for line in sh(host, "iptables", "-S", chain).splitlines()
                  if "LEASEAGENT-" not in line and "FLANNEL-" not in line]
    return lines


def docker_identity(lab: Lab, host: Host) -> dict[str, str]:
    """What changes if dockerd or a container restarts: dockerd's PID, each container's
    id, start time and PID, and Docker's options file."""
    dockerd = lab.dockerd(host)
    running = dockerd.running()
    assert running is not None, host.name
    out = {"dockerd": str(running.pid), "options": dockerd.options_file.read_text()}
    for c in host.containers:
        out[f"c{c.index}"] = dockerd.docker(
            "inspect", "-f", "{{.Id}} {{.State.StartedAt}} {{.State.Pid}} {{.State.Running}}",
            f"c{c.index}").strip()
    return out


class SwitchPings:
    """A ping every 50 ms across the switch, until `stop`, however long the switch takes
    (PingRun, every reply by number; from a Docker container, in its network namespace)."""

    def __init__(self, lab: Lab, source: Container, target: Container) -> None:
        self.run = lab.ping_run(source, target.ip, interval=0.05)

    def running(self) -> bool:
        return self.run.running()

    def stop(self) -> tuple[int, int, str]:
        """(sent, lost, ping's output); see PingRun.stop for the last second's pings."""
        sent, lost, out = self.run.stop()
        return sent, len(lost), out


def test_flanneld_host_switched_to_leaseagent_loses_nothing(lab: Lab) -> None:
    switch_from_flanneld(lab)


def test_a_docker_host_switched_from_flanneld_keeps_its_containers_and_loses_nothing(
        docker_lab: Lab) -> None:
    switch_from_flanneld(docker_lab)


def switch_from_flanneld(lab: Lab) -> None:
    h1, h2 = lab.hosts[1], lab.hosts[2]
    c1, c2 = h1.containers[0], h2.containers[0]
    before = {h.index: (parse_environment_file(h.subnet_file.read_text()),
                        sh(h, "cat", "/sys/class/net/flannel.1/address").strip())
              for h in (h1, h2)}
    assert {e["FLANNEL_MTU"] for e, _ in before.values()} == {str(FLANNEL_MTU)}
    if lab.docker:
        docker_before = {h.index: docker_forward(h) for h in (h1, h2)}
        for lines in docker_before.values():  # dockerd's own FORWARD, as it makes it
            assert lines[0] == "-P FORWARD DROP", lines
            for rule in ("-A FORWARD -j DOCKER-USER", "-A FORWARD -j DOCKER-ISOLATION-STAGE-1",
                         "-A FORWARD -o docker0 -j DOCKER", "-A DOCKER-USER -j RETURN"):
                assert rule in lines, (rule, lines)
        identity = {h.index: docker_identity(lab, h) for h in (h1, h2)}
    stale = str(lab_free(lab)[0])  # no host's: theirs are random in the same range
    leases = {h.index: become_flanneld_host(lab, h, stale) for h in (h1, h2)}
    sh(h1, "iptables", "-I", "DOCKER-USER", "1", "-s", str(c2.ip), "-d", str(c1.ip), "-p",
       "icmp", "--icmp-type", "echo-request", "-j", "DROP")
    # flanneld's data plane carries the traffic; DOCKER-USER already drops c2 -> c1.
    assert lab.ping(c1, c2.ip, count=2, wait=2)
    assert not lab.ping(c2, c1.ip, count=1, wait=1)

    pings = SwitchPings(lab, c1, c2)
    started = time.monotonic()
    try:
        for host in (h1, h2):
            env = ["env", "FLANNELD_IP_MASQ=true"] if host is h2 else []
            argv = flanneld_argv(lab, host) + ([] if host is h2 else ["-ip-masq"])
            if lab.docker:  # the file dockerd runs on
                argv += ["--docker-opts-file", str(lab.dockerd(host).options_file)]
            lab_agents.start(host, [*env, *argv])
        for host in (h1, h2):
            lab.wait_ready(host, timeout=30)
        # doctor names each leftover, one line each (and so is not "ok").
        named = lab.host_run(h1, doctor_argv(lab, h1))
        assert named.returncode == 1, named.stdout + named.stderr
        for thing in ("iptables nat chain FLANNEL-POSTRTG", "iptables filter chain FLANNEL-FWD",
                      '-j FLANNEL-POSTRTG', '-j FLANNEL-FWD', "nftables table ip flannel-ipv4",
                      f"route {stale} via"):
            assert any(line.startswith("flanneld leftover: ") and thing in line
                       for line in named.stdout.splitlines()), (thing, named.stdout)
        lines = named.stdout.splitlines()
        assert any(line.startswith("kept: device flannel.9 (vxlan VNI 9, UDP 4789)")
                   for line in lines), named.stdout  # the agent's to remove, not flanneld's
        assert not any("rule missing" in line for line in lines), named.stdout  # 4789 guarded
        cleaned = {}
        for host in (h1, h2):
            result = lab.host_run(host, [tool("leasectl"), "--etcd-endpoints", lab.endpoints,
                                         "cleanup", "--flannel", "--iface", "eth0",
                                         "--public-ip", str(host.public_ip), "--subnet-file",
                                         str(host.subnet_file), "--state-dir",
                                         str(host.dir / "state"), "--ip-masq"])
            assert result.returncode == 0, result.stdout + result.stderr
            cleaned[host.name] = result.stdout.splitlines()
        switched = time.monotonic() - started
        time.sleep(REPLY_WAIT + 0.5)  # every ping sent during the switch is settled
        # The pings counted cover the whole switch: still running once cleanup is done.
        assert pings.running(), f"the ping ended before the switch was done ({switched:.1f}s)"
    finally:
        sent, lost, out = pings.stop()
    assert sent > 0 and lost == 0, out
    print(f"\nping c1 -> c2 across the switch{' (Docker)' if lab.docker else ''}: "
          f"{sent - lost}/{sent}; switched in {switched:.1f}s; cleanup: " + json.dumps(cleaned))

    for host in (h1, h2):
        removed = cleaned[host.name]
        for thing in ("iptables nat chain FLANNEL-POSTRTG", "iptables filter chain FLANNEL-FWD",
                      "nftables table ip flannel-ipv4", f"route {stale} via"):
            assert any(thing in line for line in removed), (thing, removed)
        assert not any("device flannel." in line for line in removed)  # ours now
        # flannel.9 goes --peer-hold-time after the agent took it over.
        wait_for(lambda h=host: not sh(h, "ip", "link", "show", "flannel.9", check=False),
                 timeout=DEFAULT_PEER_HOLD_SECONDS + 10, what="flannel.9 removed by the agent")
        env = parse_environment_file(host.subnet_file.read_text())
        old_env, old_mac = before[host.index]
        assert env["FLANNEL_SUBNET"] == old_env["FLANNEL_SUBNET"]  # the same subnet
        assert env["FLANNEL_MTU"] == str(FLANNEL_MTU)  # the MTU flanneld gave it
        assert sh(host, "cat", "/sys/class/net/flannel.1/mtu").strip() == str(FLANNEL_MTU)
        assert sh(host, "cat", "/sys/class/net/flannel.1/address").strip() == old_mac
        assert lab.lease_key(host) == leases[host.index]["key"]
        value = lab.lease_value(host)
        assert value is not None and value["BackendData"]["VtepMAC"] == old_mac
        saved = sh(host, "iptables-save")
        assert "FLANNEL-" not in saved and "flanneld" not in saved
        assert "flannel-ipv4" not in sh(host, "nft", "list", "tables")
        assert stale not in run(["ip", "-n", host.ns, "route"])
        doctor = lab.host_run(host, doctor_argv(lab, host))
        assert doctor.returncode == 0, doctor.stdout + doctor.stderr
        if lab.docker:
            # The same dockerd, the same containers, the options file as it was.
            assert docker_identity(lab, host) == identity[host.index]
            now = docker_forward(host)
            operator = [line for line in now if "--icmp-type" in line]
            assert [line for line in now if line not in operator] == docker_before[host.index]
            forward = sh(host, "iptables", "-S", "FORWARD").splitlines()
            assert forward[1] == "-A FORWARD -j DOCKER-USER", forward
            assert forward[2].endswith("-j LEASEAGENT-FORWARD"), forward
    # The operator's DOCKER-USER rule still drops c2 -> c1; everything else flows.
    assert not lab.ping(c2, c1.ip, count=2, wait=1)
    assert lab.ping(c1, c2.ip, count=2, wait=2)
