"""`leasectl prometheus-targets` as a process against a real etcd: the file_sd file follows
the published metrics keys (added, changed, deleted, junk skipped), is replaced atomically,
and an agent whose metrics address no other host can reach withdraws a stale entry of its
own. An agent that publishes its address is scraped for real in the namespace lab
(tests/e2e/test_prometheus_lab.py)."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from etcd_server import PREFIX, EtcdServer, put_config
from leasectl_run import leasectl

from leaseagent.core.leases import KeyLayout
from leaseagent.core.monitoring import MetricsTarget

pytestmark = pytest.mark.shared_etcd  # tests/conftest.py: one etcd, emptied before each test

LAYOUT = KeyLayout(PREFIX)
ALLOC = {"Network": "10.6.0.0/16", "Backend": {"Type": "alloc"}}


def _target(node: str, address: str) -> str:
    return MetricsTarget(node_id=node, address=address,
                         public_ip=address.rsplit(":", 1)[0]).encode().decode()


def _wait_file(path: Path, want: list[dict[str, Any]], timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    seen = None
    while time.monotonic() < deadline:
        try:
            seen = json.loads(path.read_text())
        except (OSError, ValueError):
            seen = None  # not there yet (it is renamed into place: never half a file)
        if seen == want:
            return
        time.sleep(0.05)
    raise AssertionError(f"{path} is {seen!r}, not {want!r} after {timeout}s")


def _group(node: str, address: str) -> dict[str, Any]:
    return {"targets": [address], "labels": {"node": node, "public_ip": address.split(":")[0]}}


@pytest.fixture
def keeper(etcd: EtcdServer, workdir: Path) -> Iterator[tuple[subprocess.Popen[str], Path]]:
    path = workdir / "sd" / "targets.json"
    path.parent.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-m", "leaseagent.cli.leasectl", "--etcd-endpoints", etcd.url,
         "prometheus-targets", str(path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    try:
        yield proc, path
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_the_file_follows_the_published_keys(etcd, agents, keeper) -> None:
    proc, path = keeper
    put_config(etcd, ALLOC)
    _wait_file(path, [])

    etcd.etcdctl("put", LAYOUT.metrics_key("h2"), _target("h2", "10.0.0.12:9643"))
    etcd.etcdctl("put", LAYOUT.metrics_key("h1"), _target("h1", "10.0.0.11:9643"))
    _wait_file(path, [_group("h1", "10.0.0.11:9643"), _group("h2", "10.0.0.12:9643")])
    assert path.stat().st_mode & 0o777 == 0o644
    assert [p.name for p in path.parent.iterdir()] == ["targets.json"]  # no temp file left

    etcd.etcdctl("put", LAYOUT.metrics_key("h2"), _target("h2", "10.0.0.22:9100"))
    _wait_file(path, [_group("h1", "10.0.0.11:9643"), _group("h2", "10.0.0.22:9100")])

    # Junk is skipped and said once; the file keeps the good ones.
    etcd.etcdctl("put", LAYOUT.metrics_key("junk"), "{not json")
    etcd.etcdctl("put", LAYOUT.metrics_key("h3"), _target("h3", "10.0.0.13:9643"))
    _wait_file(path, [_group("h1", "10.0.0.11:9643"), _group("h2", "10.0.0.22:9100"),
                      _group("h3", "10.0.0.13:9643")])

    etcd.etcdctl("del", LAYOUT.metrics_key("h2"))
    _wait_file(path, [_group("h1", "10.0.0.11:9643"), _group("h3", "10.0.0.13:9643")])

    # An agent whose metrics listen on 127.0.0.1 (the unit's default) publishes nothing,
    # and removes what an earlier run of its node published.
    etcd.etcdctl("put", LAYOUT.metrics_key("a"), _target("a", "10.200.0.1:9643"))
    _wait_file(path, [_group("a", "10.200.0.1:9643"), _group("h1", "10.0.0.11:9643"),
                      _group("h3", "10.0.0.13:9643")])
    agent = agents("a", "10.200.0.1").start(metrics=True)
    agent.wait_subnet()
    _wait_file(path, [_group("h1", "10.0.0.11:9643"), _group("h3", "10.0.0.13:9643")])

    once = leasectl(etcd, "prometheus-targets", "--once", "-")
    assert once.returncode == 0, once.stderr
    assert json.loads(once.stdout) == [_group("h1", "10.0.0.11:9643"),
                                       _group("h3", "10.0.0.13:9643")]

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == 0
    assert proc.stderr is not None
    err = proc.stderr.read()
    assert "Traceback" not in err
    skipped = [line for line in err.splitlines() if "skipping" in line]
    assert skipped == [f"leasectl: skipping {LAYOUT.metrics_key('junk')}: value is not valid JSON"]


@pytest.mark.parametrize("name", ["dir", "missing/targets.json"])
def test_a_path_that_cannot_be_the_file_is_one_line_and_exit_2(etcd, workdir, name) -> None:
    (workdir / "dir").mkdir()
    result = leasectl(etcd, "prometheus-targets", "--once", str(workdir / name))
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
    assert str(workdir / name) in result.stderr



async def test_an_agent_publishes_where_its_metrics_are_and_withdraws_it_on_release(
        etcd, workdir) -> None:
    """An agent on 0.0.0.0 publishes its PublicIP with the port (in this process: the
    address is published, nothing listens); stopping with --release-on-exit deletes the
    key with the lease. (A plain stop keeps it: the lab's stopped agent stays a target and
    its LeaseagentDown fires, tests/e2e/test_prometheus_lab.py.) The key is written while
    the first listing is programmed, before READY=1: `ready` here is the first listing
    programmed, so the key is waited for."""
    from faults.inproc import make_agent, wait_all

    put_config(etcd, ALLOC)
    agent = (await make_agent(workdir, "pub", "10.200.0.7", endpoints=etcd.url,
                              extra=["--metrics-addr", "0.0.0.0:9643"])).start()
    try:
        await wait_all([agent], lambda a: a.ready, timeout=20, what="the agent ready")
        async with asyncio.timeout(10):
            while (kv := await agent.store.get(LAYOUT.metrics_key("pub"))) is None:  # noqa: ASYNC110 - the key in etcd is the point
                await asyncio.sleep(0.05)
        assert kv.lease == 0  # no TTL: it outlives a long outage
        assert json.loads(kv.value) == {"Address": "10.200.0.7:9643", "NodeID": "pub",
                                        "PublicIP": "10.200.0.7"}
    finally:
        store = agent.store
        agent.stop.set()
        if agent.task is not None:
            await asyncio.gather(agent.task, return_exceptions=True)
        await agent.agent.shutdown()  # --release-on-exit (make_agent's)
    try:
        assert await store.get(LAYOUT.metrics_key("pub")) is None
    finally:
        await store.close()


def test_once_without_etcd_is_one_line_and_exit_1(workdir) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "leaseagent.cli.leasectl", "--etcd-endpoints",
         "http://127.0.0.1:1", "--etcd-timeout", "1", "prometheus-targets", "--once",
         str(workdir / "targets.json")],
        capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 1, result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
    assert not (workdir / "targets.json").exists()
