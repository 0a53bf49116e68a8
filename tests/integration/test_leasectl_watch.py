"""`leasectl watch` as a process against a real etcd and real agents (alloc backend).

The watcher's stdout is read line by line on a thread; every assertion waits
for the next event with a timeout, so a missing event fails with the events
seen so far. Agents and the watcher are stopped by PID whatever happens.
The re-list after a compaction is checked against the in-memory store, where
a compaction can be placed exactly between the list and the watch.
"""

from __future__ import annotations

import json
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from ipaddress import IPv4Network
from typing import Any

import pytest
from etcd_server import PREFIX, EtcdServer, put_config
from subnets import free_subnet

from leaseagent.cli.watching import lease_events
from leaseagent.store.memory import MemoryStore

pytestmark = pytest.mark.shared_etcd  # tests/conftest.py: one etcd, emptied before each test

ALLOC = {"Network": "10.6.0.0/16", "Backend": {"Type": "alloc"}}
NETWORK = IPv4Network(ALLOC["Network"])
JSON_FIELDS = ["event", "subnet", "ipv6_subnet", "public_ip", "public_ipv6", "backend", "node_id",
               "status", "valid", "error"]


class Watch:
    """`leasectl watch` running; `.next()` returns its next stdout line."""

    def __init__(self, etcd: EtcdServer, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "leaseagent.cli.leasectl", "--etcd-endpoints", etcd.url,
             "watch", *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self._wait_listening()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))

    def _wait_listening(self) -> None:
        # The status line on stderr says the list is done: from here on, no change is missed.
        assert self.proc.stderr is not None
        line = self.proc.stderr.readline()
        assert line.startswith("leasectl: watching "), line

    def next(self, timeout: float = 15) -> str:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no event within {timeout}s; seen: {self.seen}") from None
        self.seen.append(line)
        return line

    def next_json(self, timeout: float = 15) -> dict[str, Any]:
        doc = json.loads(self.next(timeout))
        assert list(doc) == JSON_FIELDS, doc
        return doc

    def stop(self, sig: int = signal.SIGTERM) -> tuple[int, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait(10)
        assert self.proc.stderr is not None
        return code, self.proc.stderr.read()


@pytest.fixture
def watching(etcd: EtcdServer) -> Iterator[list[Watch]]:
    made: list[Watch] = []
    try:
        yield made
    finally:
        for w in made:
            if w.proc.poll() is None:
                w.proc.kill()
                w.proc.wait(10)


def subnet_of(line: str) -> str:
    return line.replace(".1/", ".0/")


def test_json_events_for_agents_and_hand_made_keys(etcd, agents, watching):
    put_config(etcd, ALLOC)
    w = Watch(etcd, "--output", "json")
    watching.append(w)

    a = agents("a", "10.200.0.1", ttl=3).start()
    subnet_a = subnet_of(a.wait_subnet())
    ev = w.next_json()
    assert ev == {"event": "added", "subnet": subnet_a, "ipv6_subnet": None,
                  "public_ip": "10.200.0.1", "public_ipv6": None, "backend": "alloc",
                  "node_id": "a", "status": "ok", "valid": True, "error": None}

    # By hand: a key appears, changes, goes (no etcd lease: "removed"); on a subnet the
    # agent does not hold (its own is random).
    by_hand = str(free_subnet(NETWORK, [IPv4Network(subnet_a)], first=200))
    key = f"{PREFIX}/subnets/{by_hand.replace('/', '-')}"
    etcd.etcdctl("put", key, json.dumps({"PublicIP": "10.200.0.50", "BackendType": "alloc"}))
    ev = w.next_json()
    assert (ev["event"], ev["subnet"], ev["public_ip"]) == ("added", by_hand, "10.200.0.50")
    etcd.etcdctl("put", key, "garbage")
    ev = w.next_json()
    assert (ev["event"], ev["valid"], ev["error"]) == ("changed", False, "value is not valid JSON")
    etcd.etcdctl("del", key)
    ev = w.next_json()
    assert (ev["event"], ev["subnet"]) == ("removed", by_hand)

    # A live agent's key deleted by hand: its etcd lease lives on, so "removed";
    # the agent takes its subnet back at once: "added" again.
    etcd.etcdctl("del", f"{PREFIX}/subnets/{subnet_a.replace('/', '-')}")
    ev = w.next_json()
    assert (ev["event"], ev["subnet"], ev["node_id"]) == ("removed", subnet_a, "a")
    ev = w.next_json()
    assert (ev["event"], ev["subnet"], ev["node_id"]) == ("added", subnet_a, "a")

    # A dead agent (SIGKILL): its etcd lease runs out after the TTL: "expired".
    a.kill()
    killed = time.monotonic()
    ev = w.next_json(timeout=15)
    assert (ev["event"], ev["subnet"], ev["public_ip"]) == ("expired", subnet_a, "10.200.0.1")
    assert time.monotonic() - killed > 1  # it went with the TTL, not with the process

    code, err = w.stop(signal.SIGTERM)
    assert code == 0, err
    assert "Traceback" not in err
    assert w.lines.empty(), w.lines.get()


def test_table_lines_and_ctrl_c(etcd, agents, watching):
    put_config(etcd, ALLOC)
    w = Watch(etcd)
    watching.append(w)
    head = w.next()
    assert head.split() == ["TIME", "EVENT", "SUBNET", "PUBLIC", "IP", "BACKEND", "NODE", "ID",
                            "STATUS"]
    b = agents("b", "10.200.0.2", ttl=3).start()
    subnet_b = subnet_of(b.wait_subnet())
    cells = w.next().split()
    assert cells[1:] == ["added", subnet_b, "10.200.0.2", "alloc", "b", "ok"], cells
    by_hand = str(free_subnet(NETWORK, [IPv4Network(subnet_b)], first=201))  # not b's
    etcd.etcdctl("put", f"{PREFIX}/subnets/{by_hand.replace('/', '-')}", "{}")
    cells = w.next().split(maxsplit=6)
    assert cells[1:3] == ["added", by_hand]
    assert cells[-1].startswith("invalid: ")
    code, err = w.stop(signal.SIGINT)
    assert code == 0 and "Traceback" not in err, err


def test_unreachable_etcd_is_one_line():
    result = subprocess.run(
        [sys.executable, "-m", "leaseagent.cli.leasectl", "--etcd-endpoints",
         "http://127.0.0.1:9", "--etcd-timeout", "1", "watch"],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert result.stderr.startswith("leasectl: error: etcd unavailable")


class _CompactsOnce:
    """The in-memory store, whose first watch finds `changes` made and the history
    compacted away after the list: the watcher must re-list and diff."""

    def __init__(self, inner: MemoryStore, changes: Any) -> None:
        self._inner = inner
        self._changes = changes
        self.compactions = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def watch(self, prefix: str, *, start_revision: int) -> Any:
        if not self.compactions:
            self.compactions += 1
            await self._changes()
            await self._inner.compact(self._inner.revision)
        async for batch in self._inner.watch(prefix, start_revision=start_revision):
            yield batch


async def test_relist_after_compaction_reports_each_change_once():
    inner = MemoryStore()
    prefix = "/p/subnets/"
    lease_gone, _ = await inner.grant(60)
    lease_kept, _ = await inner.grant(60)
    await inner.create(prefix + "10.6.1.0-24", b"expires", lease=lease_gone)
    await inner.create(prefix + "10.6.2.0-24", b"deleted", lease=lease_kept)
    await inner.create(prefix + "10.6.3.0-24", b"v1", lease=0)

    async def changes() -> None:
        await inner.revoke(lease_gone)
        await inner.delete(prefix + "10.6.2.0-24")
        await inner.put(prefix + "10.6.3.0-24", b"v2")
        await inner.put(prefix + "10.6.4.0-24", b"new")

    store = _CompactsOnce(inner, changes)
    reasons: list[str] = []
    stream = lease_events(store, prefix,  # type: ignore[arg-type]
                          on_listed=lambda items, rev, why: reasons.append(why))
    got = []
    async for event in stream:
        got.append((event.kind, event.kv.key[len(prefix):]))
        if len(got) == 4:
            break
    assert got == [("expired", "10.6.1.0-24"), ("removed", "10.6.2.0-24"),
                   ("changed", "10.6.3.0-24"), ("added", "10.6.4.0-24")]
    assert reasons == ["start", "compacted"]
    # Live events after the re-list still flow.
    await inner.delete(prefix + "10.6.4.0-24")
    event = await stream.__anext__()
    assert (event.kind, event.kv.key) == ("removed", prefix + "10.6.4.0-24")
    await stream.aclose()
