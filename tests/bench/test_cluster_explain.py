"""`bench.cluster`'s account of a host that did not converge (`Worker.explain`).

Against a real etcd (one member): a worker runs 2 of 3 hosts; a lease for the third
host's place, naming host 0's PublicIP, is written once both watch. Host 1 takes it as a
peer and converges; host 0's own judging refuses it (a PublicIP that is its own), so
host 0 lacks one peer. `explain` must name that key at its mod revision, say host 0's
book holds it at that revision but not as a peer, and that a watch stream of host 0's
covered that revision (started at or before it, seen up to it); host 1 is not listed.
The lease check's reads of host 0 (a count, a census, one that fails) are in its account
with what etcd said or the error.

Run in a child process (as a worker is: the harness patches the store's module).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(shutil.which("etcd") is None,
                                reason="needs etcd (Debian etcd-server)")

CHECK = r'''
import asyncio, json, sys, time
from pathlib import Path

from bench.cluster import PREFIX, SUBNETS, Worker, network_config, subnet_keys
from leaseagent.errors import StoreError
from leaseagent.core.leases import KeyLayout
from leaseagent.lab.etcd import Etcd

base = Path(sys.argv[1])
etcd = Etcd(base / "etcd", 1).start()
try:
    etcd.etcdctl("put", KeyLayout(PREFIX).config_key, json.dumps(network_config(3, "alloc")))
    (base / "w").mkdir()
    worker = Worker({"hosts": 3, "pattern": "leaseagent", "dir": str(base / "w"), "first": 0,
                     "count": 2, "endpoints": etcd.endpoints, "seed": 1, "etcd_timeout": 5,
                     "backend": "alloc"})
    h0, h1 = worker.hosts

    async def main() -> list:
        for h in worker.hosts:
            await worker.boot(h)
        deadline = time.time() + 60
        while not all(h.agent.watcher is not None and len(h.agent.watcher.peers) == 1
                      for h in worker.hosts):
            assert time.time() < deadline, "the two hosts did not see each other"
            await asyncio.sleep(0.1)
        held = {str(h.agent.own.subnet) for h in worker.hosts}
        free = next(f"10.0.{i}.0/24" for i in range(1, 8) if f"10.0.{i}.0/24" not in held)
        key = SUBNETS + free.replace("/", "-")
        value = {"PublicIP": str(h0.public_ip), "BackendType": "alloc", "BackendData": None,
                 "NodeID": "h2"}
        etcd.etcdctl("put", key, json.dumps(value))
        while h1.converged_at is None:  # host 0 never does
            assert time.time() < deadline + 60, "host 1 did not take the third lease"
            worker._check(None)
            await asyncio.sleep(0.1)
        assert h0.converged_at is None
        # The lease check's reads, as the agent makes them: recorded with what etcd said;
        # one at a revision etcd has not reached fails, and is recorded with its error.
        count, now = await h0.store.count(SUBNETS)
        await h0.store.census(SUBNETS, changed_after=0, revision=now)
        try:
            await h0.store.census(SUBNETS, changed_after=0, revision=now + 1000)
        except StoreError:
            pass
        else:
            raise AssertionError("a census at a future revision was answered")
        keys = subnet_keys(etcd)
        found = worker.explain(keys, cap=5)
        for h in worker.hosts:
            await worker.halt(h)
        return [found, key, keys[key], count, now]

    found, key, revision, count, now = asyncio.run(main())
    (u,) = found
    assert u["host"] == "h0" and u["peers"] == 1 and u["missing_count"] == 1, u
    (m,) = u["missing"]
    assert m["key"] == key.rsplit("/", 1)[1] and m["mod_revision"] == revision, m
    assert m["book"] == {"mod_revision": revision, "peer": False}, m
    assert m["covered_by"], u["trace"]
    stream = u["trace"][m["covered_by"][0]]
    assert stream["stream"] <= revision <= stream["seen"] and stream["events"] >= 1, stream
    assert any("list" in t for t in u["trace"]) and u["trace"][0].get("boot"), u["trace"]
    assert u["extra"] == [] and u["error"] is None, u
    assert stream["last_at"] >= stream["at"], stream
    assert u["synced"] is True and u["check_errors"] == 1, u
    c, k, f = u["checks"]
    assert c["count"] == 0 and c["result"] == [count, now], c
    assert k["census"] == now and k["result"][0] == count and k["result"][2] == now, k
    assert f["census"] == now + 1000 and "error" in f and "result" not in f, f
finally:
    etcd.close()
print("ok")
'''


def test_explain_names_the_missing_key_its_revision_and_the_stream(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", CHECK, str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


def test_a_worker_takes_an_explain_command_with_every_key(tmp_path: Path) -> None:
    """The driver sends every subnet key in one command line (2,500 keys ~ 150 kB, more
    than asyncio's 64 KiB default: it ended a 2,500-host run); a worker process reads it
    and answers. No etcd is reached: its one host never started."""
    spec = {"hosts": 2, "pattern": "leaseagent", "dir": str(tmp_path), "first": 0, "count": 1,
            "endpoints": "http://127.0.0.1:9", "seed": 1, "etcd_timeout": 5, "backend": "alloc"}
    keys = {f"/bench-cluster/network/subnets/10.{i // 256}.{i % 256}.0-24": i
            for i in range(10_000)}
    proc = subprocess.run(
        [sys.executable, "-m", "bench.cluster", "--worker", json.dumps(spec)], cwd=ROOT,
        input=json.dumps({"do": "explain", "keys": keys, "cap": 20}) + "\n"
        + json.dumps({"do": "stop"}) + "\n", capture_output=True, text=True, timeout=120)
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert lines == [{"ready": 1}, {"unconverged": []}, {"stopped": True}], proc.stderr[-3000:]
