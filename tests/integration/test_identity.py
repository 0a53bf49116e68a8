"""Two agents with one identity (same node id and PublicIP: a cloned machine, or the agent
started twice): recognised, said once, and never a fight over the key."""

from __future__ import annotations

import json
import time

import pytest
from etcd_server import PREFIX, put_config
from lengths import FULL

pytestmark = pytest.mark.shared_etcd  # tests/conftest.py: one etcd, emptied before each test

ALLOC = {"Network": "10.6.0.0/16", "Backend": {"Type": "alloc"}}
IP = "10.200.0.7"
# Watched for writes after the conflict: the first agent's re-reads come after growing,
# jittered pauses (about 1, 2, 4 s...), so 4 s sees the first ones; 8 with LEASEAGENT_FULL=1.
# (The longer the watch, the longer the pause before the first sees the key free again.)
QUIET_SECONDS = 8.0 if FULL else 4.0


def revision(etcd) -> int:  # type: ignore[no-untyped-def]
    return int(json.loads(etcd.etcdctl("get", "/", "-w", "json"))["header"]["revision"])


def keys_naming(etcd, ip: str) -> list[str]:  # type: ignore[no-untyped-def]
    out = json.loads(etcd.etcdctl("get", f"{PREFIX}/subnets/", "--prefix", "-w", "json"))
    import base64

    keys = []
    for kv in out.get("kvs", []):
        value = json.loads(base64.b64decode(kv["value"]))
        if value.get("PublicIP") == ip:
            keys.append(base64.b64decode(kv["key"]).decode())
    return keys


def error_lines(*agents) -> list[str]:  # type: ignore[no-untyped-def]
    return [line for a in agents for line in a.log().splitlines() if " ERROR " in line]


def test_a_second_agent_with_our_identity_is_recognised_not_fought(etcd, agents):
    put_config(etcd, ALLOC)
    first = agents("first", IP, extra=["--node-id", "twin"]).start(metrics=True)
    first.wait_subnet()
    first.wait_log("ready:")
    before = revision(etcd)
    second = agents("second", IP, extra=["--node-id", "twin"]).start(metrics=True)
    second.wait_log("ready:")
    first.wait_log("IDENTITY CONFLICT", timeout=15)
    settled = revision(etcd)
    time.sleep(QUIET_SECONDS)  # the first re-reads with a growing pause: reads only, no write
    after = revision(etcd)
    print(f"\ntwo agents, one identity: {settled - before} etcd writes to settle, "
          f"{after - settled} in the next {QUIET_SECONDS:g} s")
    assert settled - before <= 6, "the second's take-over and the first's one attempt, no more"
    assert after == settled
    assert len(keys_naming(etcd, IP)) == 1
    errors = error_lines(first, second)
    assert len(errors) == 1 and "node id twin" in errors[0] and "machine-id" in errors[0], errors
    code, body = first.http("/readyz")
    assert code == 503 and "identity conflict" in body
    assert first.metric("leaseagent_identity_conflict") == 1.0
    assert second.http("/readyz")[0] == 200
    # leaseagent_ready says what /readyz says (the alert rules read it), and the lease
    # TTL is exported for "about to expire" (a fraction of it).
    assert (first.metric("leaseagent_ready"), second.metric("leaseagent_ready")) == (0.0, 1.0)
    assert second.metric("leaseagent_lease_ttl_seconds") == float(second.ttl)

    # The second one goes (with its lease): the first takes the subnet back by itself.
    second.stop()
    etcd.etcdctl("del", f"{PREFIX}/subnets/", "--prefix")
    first.wait_log("identity conflict over", timeout=90)
    deadline = time.monotonic() + 10
    while first.http("/readyz")[0] != 200:
        assert time.monotonic() < deadline, first.log()
        time.sleep(0.1)
    assert first.metric("leaseagent_identity_conflict") == 0.0


def test_twins_started_together_end_with_one_key(etcd, agents):
    put_config(etcd, ALLOC)
    twins = [agents(name, IP, extra=["--node-id", "twin"]) for name in ("left", "right")]
    for agent in twins:
        agent.start(metrics=True)
    for agent in twins:
        agent.wait_subnet()
    deadline = time.monotonic() + 15
    while len(keys_naming(etcd, IP)) != 1:
        assert time.monotonic() < deadline, [a.log() for a in twins]
        time.sleep(0.1)
    time.sleep(1)
    assert len(keys_naming(etcd, IP)) == 1
    assert len(error_lines(*twins)) <= 1
