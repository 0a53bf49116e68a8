"""`leasectl doctor` on a lab host: silent and 0 when healthy, names each difference otherwise.

Runs doctor inside a host namespace with that host's agent flags (taken from
Lab.agent_argv), as an operator would on the host. The drift is made by hand
while the host's agent is stopped (SIGTERM keeps the kernel state), so the
agent cannot repair it before doctor looks; restarting the agent repairs it
and doctor is quiet again, leaving the shared lab as it was.
"""

from __future__ import annotations

import json
import subprocess
import time
from ipaddress import IPv4Network
from pathlib import Path

import pytest
from labdoctor import doctor
from subnets import lab_free

from leaseagent.lab import Host, Lab

pytestmark = pytest.mark.root

# Nobody holds it (the lab's hosts get random subnets of 10.244.0.0/16 in 10.244.1-255.x):
# 10.244.0.0/24 is below SubnetMin, so it can only be a leftover.
STALE_SUBNET = "10.244.0.0/24"


@pytest.fixture
def lab(vxlan_lab: Lab) -> Lab:
    """The shared vxlan lab (tests/e2e/conftest.py): 3 hosts, every agent ready."""
    return vxlan_lab


def wait_healthy(lab: Lab, host: Host, timeout: float = 10) -> subprocess.CompletedProcess[str]:
    # The agent may still be adding the last peer's entries when /readyz first says 200.
    deadline = time.monotonic() + timeout
    while True:
        result = doctor(lab, host)
        if result.returncode == 0 or time.monotonic() > deadline:
            return result
        time.sleep(0.2)


def test_healthy_host_is_ok(lab: Lab) -> None:
    for host in lab.hosts.values():
        result = wait_healthy(lab, host)
        assert result.returncode == 0, result.stdout + result.stderr
        assert result.stdout.startswith("ok: "), result.stdout
        assert "2 valid peers" in result.stdout and "6 kernel entries" in result.stdout
        as_json = doctor(lab, host, "--json")
        assert as_json.returncode == 0
        assert json.loads(as_json.stdout) == {"ok": True, "problems": []}


def test_drift_is_named_line_by_line_and_fixed_by_the_agent(lab: Lab, tmp_path: Path) -> None:
    host, peer = lab.hosts[1], lab.hosts[2]
    assert peer.subnet is not None and host.subnet is not None
    peer_net = peer.subnet.network
    gw = peer_net.network_address
    assert wait_healthy(lab, host).returncode == 0

    kv = json.loads(lab.etcdctl("get", lab.lease_key(host), "-w", "json"))["kvs"][0]
    lease = format(int(kv["lease"]), "x")

    def renewed() -> Lab:
        """The stopped agent's renewal, done by hand: on a busy machine the doctor runs
        below outlast the lease's TTL, and doctor would rightly find no lease."""
        lab.etcdctl("lease", "keep-alive", "--once", lease)
        return lab

    lab.stop_agent(host)  # SIGTERM: the kernel state stays, nobody repairs it
    try:
        ns = host.ns
        subprocess.run(["ip", "-n", ns, "route", "del", str(peer_net)], check=True)
        subprocess.run(["ip", "-n", ns, "neigh", "del", str(gw), "dev", "flannel.1"], check=True)
        subprocess.run(["ip", "-n", ns, "route", "add", STALE_SUBNET, "via",
                        str(IPv4Network(STALE_SUBNET).network_address), "dev", "flannel.1",
                        "onlink", "proto", "76"], check=True)
        # A subnet.env that disagrees with the lease, beside the real one (read-only test).
        env = host.subnet_file.read_text().replace(str(host.subnet), "10.244.0.1/24")
        wrong_env = tmp_path / "subnet.env"
        wrong_env.write_text(env)

        result = doctor(renewed(), host)
        assert result.returncode == 1, result.stdout + result.stderr
        lines = result.stdout.splitlines()
        assert any(line.startswith(f"missing route {peer_net} via {gw} dev flannel.1 onlink")
                   for line in lines), lines
        assert any(line.startswith(f"missing neighbour {gw} lladdr ") for line in lines), lines
        assert any(line.startswith(f"stale route {STALE_SUBNET} via ") for line in lines), lines
        assert len(lines) == 3, lines  # nothing else is wrong
        assert result.stderr == ""
        print("doctor after drift:\n" + result.stdout)

        as_json = doctor(renewed(), host, "--json")
        assert as_json.returncode == 1
        report = json.loads(as_json.stdout)
        assert report["ok"] is False
        missing = [p for p in report["problems"] if p["kind"] == "missing"]
        assert f"route {peer_net} via {gw} dev flannel.1 onlink" in [p["object"] for p in missing]
        assert all(set(p) == {"kind", "object", "detail"} for p in report["problems"])

        env_result = doctor(renewed(), host, overrides={"--subnet-file": str(wrong_env)})
        assert (f"subnet.env FLANNEL_SUBNET=10.244.0.1/24 but the lease is {host.subnet.network}"
                in env_result.stdout), env_result.stdout
    finally:
        lab.start_agent(host)
    lab.wait_ready(host, timeout=20)
    # The agent's start-up sync puts back what is missing and removes the stale route.
    result = wait_healthy(lab, host)
    assert result.returncode == 0, result.stdout + result.stderr


def test_bad_flag_is_one_line(lab: Lab) -> None:
    result = doctor(lab, lab.hosts[1], overrides={"--iface": "nosuch0"})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "leasectl: error: --iface nosuch0: no such interface"], result.stderr


def test_two_keys_for_one_subnet_agent_leasectl_and_doctor_agree(lab: Lab) -> None:
    """One rule for every tool: the older key holds the subnet. The agent programs it,
    `leasectl list` calls the younger a duplicate of it, doctor finds the host healthy."""
    host = lab.hosts[1]
    subnet = lab_free(lab, first=34)[0]  # no host's: theirs are random
    older_key = lab.keys.lease_key(subnet)
    younger_key = older_key + "&fd00::-64"
    older = {"PublicIP": "10.250.0.200", "PublicIPv6": None, "BackendType": "vxlan",
             "BackendData": {"VNI": 1, "VtepMAC": "0a:00:00:00:00:c8"}, "NodeID": "older"}
    younger = {**older, "PublicIP": "10.250.0.201", "NodeID": "younger",
               "BackendData": {"VNI": 1, "VtepMAC": "0a:00:00:00:00:c9"}}
    try:
        lab.etcdctl("put", older_key, json.dumps(older))
        lab.etcdctl("put", younger_key, json.dumps(younger))
        deadline = time.monotonic() + 10
        while len(lab.kernel_entries(host, subnet, "0a:00:00:00:00:c8")) != 3:
            assert time.monotonic() < deadline, "the agent did not program the older key"
            time.sleep(0.1)
        entries = " ".join(lab.kernel_entries(host, subnet, "0a:00:00:00:00:c9"))
        assert "0a:00:00:00:00:c9" not in entries and "10.250.0.201" not in entries

        rows = json.loads(lab.leasectl("list", "-o", "json").stdout)
        by_ip = {row["public_ip"]: row for row in rows}
        assert by_ip["10.250.0.200"]["valid"] is True
        assert by_ip["10.250.0.201"]["valid"] is False
        assert by_ip["10.250.0.201"]["status"] == "duplicate"
        assert by_ip["10.250.0.201"]["error"] == f"duplicate: {subnet} is held under key {older_key}"

        result = wait_healthy(lab, host)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "3 valid peers" in result.stdout
    finally:
        lab.etcdctl("del", younger_key)
        lab.etcdctl("del", older_key)
