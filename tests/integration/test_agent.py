"""The agent against a real etcd (alloc backend: no kernel needed).

Agents run as real processes against a real etcd (tests/etcd_server.py; one for the
module, emptied before each test, and one of its own for a test that stops it), all
stopped by PID whatever happens.
"""

from __future__ import annotations

import json
import signal
import time
from ipaddress import IPv4Interface, IPv4Network

import pytest
from etcd_server import PREFIX, put_config
from subnets import free_subnets

pytestmark = pytest.mark.shared_etcd  # tests/conftest.py: one etcd, emptied before each test

# Agent processes started at once on a range of exactly that many subnets. 12, not the 30 of
# before: the race itself is run at 100 agents in tests/faults/test_start_storm.py (in-process);
# here it is real processes, each ~0.7 s of CPU to start on a 2-core machine.
FLEET = 12
ALLOC_FLEET = {"Network": "10.6.0.0/16", "SubnetMin": "10.6.1.0",
               "SubnetMax": f"10.6.{FLEET}.0", "Backend": {"Type": "alloc"}}
ALLOC = {"Network": "10.6.0.0/16", "Backend": {"Type": "alloc"}}
# For a test that waits for a peer's removal but is not about holding it down.
NO_HOLD = ["--peer-hold-time", "0"]


def leases(etcd) -> dict[str, dict]:
    """key -> {value, lease} as etcd has them (etcdctl, JSON output)."""
    out = json.loads(etcd.etcdctl("get", "--prefix", f"{PREFIX}/subnets/", "-w", "json"))
    import base64

    res = {}
    for kv in out.get("kvs", []):
        key = base64.b64decode(kv["key"]).decode()
        res[key] = {"value": json.loads(base64.b64decode(kv["value"])), "lease": kv.get("lease", 0)}
    return res


def key_of(subnet_line: str) -> str:
    net = IPv4Interface(subnet_line).network
    return f"{PREFIX}/subnets/{net.network_address}-{net.prefixlen}"


def test_a_fleet_started_at_once_gets_distinct_subnets_and_one_more_fails(etcd, agents):
    put_config(etcd, ALLOC_FLEET)
    fleet = [agents(f"h{i}", f"10.200.0.{i + 1}", metrics_port=None) for i in range(FLEET)]
    started = time.monotonic()
    for agent in fleet:
        agent.start(metrics=True)
    subnets = [agent.wait_subnet(timeout=60) for agent in fleet]
    elapsed = time.monotonic() - started
    assert len(set(subnets)) == FLEET
    held = leases(etcd)
    assert len(held) == FLEET
    for agent, subnet in zip(fleet, subnets, strict=True):
        assert held[key_of(subnet)]["value"]["PublicIP"] == agent.public_ip
    attempts = sum(agent.metric("leaseagent_allocation_attempts_total") or 0 for agent in fleet)
    conflicts = sum(agent.metric("leaseagent_allocation_conflicts_total") or 0 for agent in fleet)
    print(f"\n{FLEET} agents held distinct leases {elapsed:.2f}s after start; "
          f"{attempts / FLEET:.2f} create txns per acquisition ({int(conflicts)} lost races)")

    extra = agents(f"h{FLEET + 1}", f"10.200.0.{FLEET + 1}").start()
    assert extra.wait_exit(30) == 1
    log = extra.log()
    assert "no free subnet in network 10.6.0.0/16" in log
    assert f"all {FLEET} subnets are taken" in log
    assert "Traceback" not in log


def test_restart_after_sigkill_takes_back_the_same_subnet(etcd, agents):
    put_config(etcd, ALLOC)
    a = agents("a", "10.200.0.1").start()
    first = a.wait_subnet()
    a.kill()
    a.subnet_file.unlink()  # not by subnet.env: by the lease naming this host
    a.start()
    assert a.wait_subnet() == first
    a.wait_log("took over this host's lease")
    assert len(leases(etcd)) == 1


def test_sigterm_keeps_the_lease_and_release_on_exit_revokes_it(etcd, agents):
    put_config(etcd, ALLOC)
    a = agents("a", "10.200.0.1").start()
    b = agents("b", "10.200.0.2", extra=["--release-on-exit"]).start()
    key_a, key_b = key_of(a.wait_subnet()), key_of(b.wait_subnet())
    a.wait_log("ready:")
    b.wait_log("ready:")
    a.signal(signal.SIGTERM)
    b.signal(signal.SIGTERM)
    assert a.wait_exit() == 0 and b.wait_exit() == 0
    held = leases(etcd)
    assert key_a in held
    assert key_b not in held


def test_subnet_env_is_what_flannel_writes(etcd, agents):
    put_config(etcd, ALLOC)
    a = agents("a", "10.200.0.1").start()
    subnet = IPv4Interface(a.wait_subnet())
    assert a.subnet_file.read_text() == (
        "FLANNEL_NETWORK=10.6.0.0/16\n"
        f"FLANNEL_SUBNET={subnet.network.network_address + 1}/24\n"
        "FLANNEL_MTU=1500\n"
        "FLANNEL_IPMASQ=false\n"
    )
    assert a.subnet_file.stat().st_mode & 0o777 == 0o644


def test_a_stopped_agents_key_expires_and_the_others_see_it_removed(etcd, agents):
    put_config(etcd, ALLOC)
    # No --peer-hold-time (5 s by default): the expiry is what is timed here, not the hold.
    a = agents("a", "10.200.0.1", ttl=3, extra=NO_HOLD).start()
    b = agents("b", "10.200.0.2", ttl=3).start()
    a.wait_subnet()
    subnet_b = str(IPv4Interface(b.wait_subnet()).network)
    a.wait_log(f"peer added: {subnet_b}")
    b.kill()  # no keepalive any more, lease not revoked
    waited = a.wait_log(f"peer removed: {subnet_b}", timeout=10)
    print(f"\nexpired peer removed {waited:.2f}s after its agent was killed (ttl 3s)")
    assert key_of(str(IPv4Interface(b.subnet_file.read_text().split("FLANNEL_SUBNET=")[1].split()[0])))\
        not in leases(etcd)


def test_a_reservation_is_honoured_and_keeps_no_ttl_after_restart(etcd, agents):
    put_config(etcd, ALLOC)
    from leasectl_run import leasectl

    assert leasectl(etcd, "reserve", "10.6.77.0/24", "--public-ip", "10.200.0.7").returncode == 0
    a = agents("a", "10.200.0.7").start()
    assert a.wait_subnet() == "10.6.77.1/24"
    a.wait_log("(reservation)")
    key = f"{PREFIX}/subnets/10.6.77.0-24"
    assert leases(etcd)[key]["lease"] == 0
    assert leases(etcd)[key]["value"]["NodeID"] == "a"
    a.kill()
    a.start()
    assert a.wait_subnet() == "10.6.77.1/24"
    time.sleep(0.5)
    assert leases(etcd)[key]["lease"] == 0
    assert len(leases(etcd)) == 1


def test_missing_then_invalid_then_valid_config_is_waited_for_and_logged_once(etcd, agents):
    a = agents("a", "10.200.0.1").start()
    a.wait_log(f"waiting for a usable network config: {PREFIX}/config is missing")
    put_config(etcd, {"Network": "10.6.0.0/16", "SubnetLen": 31})
    a.wait_log("SubnetLen=31: must be at most 30")
    time.sleep(1.5)
    assert a.log().count("SubnetLen=31") == 1
    assert a.log().count("config is missing") == 1
    put_config(etcd, ALLOC)
    assert a.wait_subnet().startswith("10.6.")


def test_malformed_peer_data_is_skipped_and_counted(etcd, agents):
    put_config(etcd, ALLOC)
    # Written with no etcd lease: each names a NodeID, or it would be an unclaimed
    # reservation (no peer, and no error either).
    bad = {
        "10.6.200.0-24": "not json",
        "10.6.201.0-24": json.dumps({"PublicIP": "127.0.0.1", "BackendType": "alloc", "NodeID": "x"}),
        "10.7.1.0-24": json.dumps({"PublicIP": "10.200.9.9", "BackendType": "alloc", "NodeID": "x"}),
        "10.6.202.0-24": json.dumps({"PublicIP": "10.200.9.8", "BackendType": "udp", "NodeID": "x"}),
        "10.6.203.5-24": json.dumps({"PublicIP": "10.200.9.7", "BackendType": "alloc", "NodeID": "x"}),
    }
    for name, value in bad.items():
        etcd.etcdctl("put", f"{PREFIX}/subnets/{name}", value)
    etcd.etcdctl("put", f"{PREFIX}/subnets/10.6.204.0-24",
                 json.dumps({"PublicIP": "10.200.9.6", "BackendType": "alloc", "NodeID": "y"}))
    a = agents("a", "10.200.0.1").start(metrics=True)
    a.wait_subnet()
    a.wait_log("ready: 1 peer programmed")
    counts = {
        reason: a.metric("leaseagent_invalid_leases_skipped_total", f'reason="{reason}"')
        for reason in ("malformed_json", "bad_public_ip", "subnet_outside_network",
                       "unknown_backend", "bad_key")
    }
    assert counts == dict.fromkeys(counts, 1.0)
    # A later bad write is counted once more; the agent is still serving.
    etcd.etcdctl("put", f"{PREFIX}/subnets/10.6.200.0-24", "{still not json")
    deadline = time.monotonic() + 5
    while a.metric("leaseagent_invalid_leases_skipped_total", 'reason="malformed_json"') != 2.0:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert a.http("/healthz")[0] == 200
    assert "Traceback" not in a.log()


@pytest.mark.fresh_etcd  # stops, restarts and compacts it
def test_compaction_during_a_watch_misses_no_add_or_remove(etcd, agents):
    put_config(etcd, ALLOC)
    peer = {"BackendType": "alloc", "NodeID": "x"}  # no etcd lease: a NodeID, or it is a reservation
    etcd.etcdctl("put", f"{PREFIX}/subnets/10.6.100.0-24", json.dumps({**peer, "PublicIP": "10.200.9.1"}))
    a = agents("a", "10.200.0.1", ttl=30, extra=NO_HOLD).start(metrics=True)  # removals at once
    own = IPv4Interface(a.wait_subnet()).network
    a.wait_log("ready: 1 peer programmed")
    # Two more peers, on subnets the agent does not hold (its own is random).
    second, third = free_subnets(IPv4Network(ALLOC["Network"]), [own], 2, first=101)
    # Freeze the agent, break its watch stream (restart etcd), change the leases
    # and compact the history it would need; then let it run again.
    a.signal(signal.SIGSTOP)
    try:
        etcd.stop()
        etcd.start()
        etcd.etcdctl("del", f"{PREFIX}/subnets/10.6.100.0-24")
        etcd.etcdctl("put", f"{PREFIX}/subnets/{second.network_address}-24",
                     json.dumps({**peer, "PublicIP": "10.200.9.2"}))
        rev = json.loads(etcd.etcdctl("get", "/", "-w", "json"))["header"]["revision"]
        etcd.etcdctl("compact", str(rev))
    finally:
        a.signal(signal.SIGCONT)
    a.wait_log("peer removed: 10.6.100.0/24", timeout=20)
    a.wait_log(f"peer added: {second}", timeout=20)
    relisted = a.metric("leaseagent_watch_relists_total", 'reason="compacted"')
    assert relisted is not None and relisted >= 1
    # And the watch works again afterwards.
    etcd.etcdctl("put", f"{PREFIX}/subnets/{third.network_address}-24",
                 json.dumps({**peer, "PublicIP": "10.200.9.3"}))
    a.wait_log(f"peer added: {third}")


def test_the_lease_count_check_finds_nothing_to_fix_in_a_watch_that_missed_nothing(
        etcd, agents):
    """--lease-check-interval against a real etcd: while peers join, change and leave (and
    the agent renews its own key), every check agrees with etcd's count, so the prefix is
    never listed again for it. (A watch that misses events: tests/unit/test_watching.py.)"""
    put_config(etcd, ALLOC)
    a = agents("a", "10.200.0.1", ttl=4, extra=["--lease-check-interval", "0.2"]).start(
        metrics=True)
    own = IPv4Interface(a.wait_subnet()).network
    a.wait_log("ready:")
    peer = {"BackendType": "alloc", "NodeID": "x"}
    subnets = free_subnets(IPv4Network(ALLOC["Network"]), [own], 12, first=110)
    for i, subnet in enumerate(subnets):
        key = f"{PREFIX}/subnets/{subnet.network_address}-24"
        etcd.etcdctl("put", key, json.dumps({**peer, "PublicIP": f"10.200.9.{i + 1}"}))
        if i % 3 == 0:
            etcd.etcdctl("put", key, json.dumps({**peer, "PublicIP": f"10.200.8.{i + 1}"}))
        if i % 4 == 3:
            etcd.etcdctl("del", f"{PREFIX}/subnets/{subnets[i - 2].network_address}-24")
        time.sleep(0.1)
    a.wait_log(f"peer added: {subnets[-1]}")
    time.sleep(2.0)  # about ten checks with nothing changing (and a renewal of our key)
    assert a.metric("leaseagent_peers", 'backend="alloc"') == 12 - 3
    assert (a.metric("leaseagent_watch_relists_total", 'reason="view_check"') or 0) == 0
    assert "differ from etcd" not in a.log()


def test_a_revoked_lease_is_taken_back(etcd, agents):
    put_config(etcd, ALLOC)
    a = agents("a", "10.200.0.1", ttl=30).start()
    subnet = a.wait_subnet()
    a.wait_log("ready:")
    lease_id = leases(etcd)[key_of(subnet)]["lease"]
    etcd.etcdctl("lease", "revoke", format(lease_id, "x"))
    a.wait_log("taken back")
    held = leases(etcd)
    assert held[key_of(subnet)]["value"]["NodeID"] == "a"
    assert held[key_of(subnet)]["lease"] not in (0, lease_id)
    assert a.wait_subnet() == subnet


def test_a_subnet_taken_by_another_host_is_never_overwritten(etcd, agents, workdir):
    put_config(etcd, ALLOC)
    docker_opts = workdir / "docker_opts.env"
    a = agents("a", "10.200.0.1", ttl=30,
               extra=["--docker-opts-file", str(docker_opts)]).start(metrics=True)
    subnet = a.wait_subnet()
    a.wait_log("ready:")
    assert f'DOCKER_OPT_BIP="--bip={subnet}"' in docker_opts.read_text()
    key = key_of(subnet)
    intruder = json.dumps({"PublicIP": "10.200.0.99", "BackendType": "alloc", "NodeID": "other"})
    # Another host writes over our key (as flanneld's blind Put does).
    etcd.etcdctl("put", key, intruder)
    a.wait_log("SUBNET LOST")
    deadline = time.monotonic() + 10
    while a.wait_subnet() == subnet:
        assert time.monotonic() < deadline, "subnet.env was not rewritten"
        time.sleep(0.05)
    held = leases(etcd)
    assert held[key]["value"]["NodeID"] == "other"
    assert held[key_of(a.wait_subnet())]["value"]["NodeID"] == "a"
    assert a.metric("leaseagent_lease_subnet_changes_total") == 1.0
    # Docker's options moved with subnet.env.
    assert docker_opts.read_text() == (
        f'DOCKER_OPT_BIP="--bip={a.wait_subnet()}"\nDOCKER_OPT_IPMASQ="--ip-masq=true"\n'
        f'DOCKER_OPT_MTU="--mtu=1500"\n'
        f'DOCKER_NETWORK_OPTIONS=" --bip={a.wait_subnet()} --ip-masq=true --mtu=1500"\n')


@pytest.mark.fresh_etcd  # stops it
def test_sigterm_while_waiting_for_etcd_exits_promptly(etcd, agents):
    etcd.stop()
    a = agents("a", "10.200.0.1").start()
    a.wait_log("etcd unreachable", timeout=30)  # waiting for etcd (a fixed 1.5 s sleep ended
    a.signal(signal.SIGTERM)                     # before a loaded machine got there)
    started = time.monotonic()
    assert a.wait_exit(5) == 0
    assert time.monotonic() - started < 3
    assert "Traceback" not in a.log()
    assert a.log().count("etcd unreachable") == 1


def test_json_logs_are_one_object_per_line_and_state_changes_are_logged_once(etcd, agents):
    put_config(etcd, ALLOC)
    a = agents("a", "10.200.0.1", ttl=3, extra=["--log-format", "json"]).start()
    a.wait_subnet()
    a.wait_log("ready:")
    time.sleep(2.5)  # a few renewals: none of them logs a line
    records = [json.loads(line) for line in a.log().splitlines() if line.strip()]
    assert records and all({"ts", "level", "logger", "msg"} <= set(r) for r in records)
    messages = [r["msg"] for r in records]
    assert sum(m.startswith("lease held:") for m in messages) == 1
    assert sum(m == "etcd reachable" for m in messages) == 1
    assert not any("renew" in m for m in messages)


def test_the_agent_and_config_set_say_the_same_of_a_config_flanneld_refuses(etcd, agents,
                                                                            tmp_path):
    """One validator: what flanneld's Go decoder refuses (a number given as a string), and
    what leaseagent refuses of flanneld's meaning (an MTU leaving the device below 68), is
    refused by `leasectl config set` and by the agent in the same words."""
    from leasectl_run import leasectl

    a = agents("a", "10.200.0.1").start()
    a.wait_log(f"waiting for a usable network config: {PREFIX}/config is missing")
    for doc in ({"network": "10.6.0.0/16", "subnetlen": "24"},
                {"Network": "10.6.0.0/16", "backend": {"type": "vxlan", "mtu": 0}}):
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps(doc))
        refused = leasectl(etcd, "config", "set", str(bad))
        assert refused.returncode == 2
        said = refused.stderr.strip().split(f"{bad}: ", 1)[1].split("; etcd left unchanged")[0]
        put_config(etcd, doc)
        a.wait_log(f"waiting for a usable network config: {PREFIX}/config: {said}")
