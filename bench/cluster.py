"""Cluster scale: H simulated hosts against one 3-member etcd cluster, and flannel's pattern beside.

    python -m bench.cluster [--hosts 250,500,1000] [--workers 4] [--steady 30]
                            [--restart-spread 10] [--limit 150] [--json FILE]
                            [--via etcd,proxy] [--backend vxlan|alloc] [--cold-only]

Each host is a real `Agent` with its own `EtcdStore` (its own gRPC channel,
its own etcd lease and watches; `--channel worker`: one channel per worker
process, each host its own streams on it), run in-process: `--workers`
processes hold H/workers agents each on one event loop. With `--backend
vxlan` (the default) each host runs the real vxlan backend, planning and
reconciling included, on a fake kernel of its own (FakeKernel, kept across
the agent's restarts as a host's kernel is; the hosts of a worker share
one intern dict, so equal kernel objects are held once), its traffic rules
in a memory firewall; with `alloc`, a lease and subnet.env only. Neither
touches the machine's kernel or firewall. What a worker's hosts would
parse alike (a key at one revision, a lease value, a key name) is parsed
once and shared (`share_parsed_leases`); each host still receives and
judges every event itself. etcd is a fresh 3-member cluster on 127.0.0.1
per run, from the project's one launcher (leaseagent.lab.etcd); `--via
proxy` puts one `etcd grpc-proxy start` in front of it (the agents'
only endpoint), which coalesces the agents' identical watches.

A run (one H, one pattern) has three phases, each measured from the
members' own /metrics and /proc:
 1. cold start: every host starts in the same instant; done when every host
    holds a lease and its watcher has every other host as a peer (H-1), and
    (vxlan) its kernel every other host's FDB entry;
 2. steady state: `--steady` seconds of nothing happening;
 3. cluster-wide restart: every agent stopped (the lease kept, as a restart
    keeps it) and started again after a random pause in [0, --restart-spread]
    seconds (the fleet's restarts spread out; the agent has no start-up jitter
    of its own); done when every new agent holds its lease and sees H-1
    peers, then "settled" when every watcher has been delivered the last
    write of the restart (flannel's pattern has a backlog there).

The two patterns, in the same harness, on the same code path:
 - `leaseagent`: the agent as it is;
 - `flannel`: flannel's etcd v3 registry (pkg/subnet/etcd/registry.go):
   allocation random among the first 100 free subnets, one candidate per
   transaction (bench.scenarios.flannel_candidates); one LeaseTimeToLive
   request per lease of every listing (getSubnets), and per PUT event of the
   watch (parseSubnetWatchResponse), sent one after the other before the
   listing or the event is used, as flannel does; and a second listing with
   its TimeToLives at start (flannel lists in tryAcquireLease and again in
   WatchLeases' reset; the agent reuses its acquisition's listing).

Workers are driven over stdin/stdout (one JSON object a line); every worker
and etcd member is stopped by PID in a `finally`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import functools
import json
import logging
import os
import random
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

from bench.scenarios import flannel_candidates
from leaseagent.agent.daemon import Agent
from leaseagent.config import parse_agent_config
from leaseagent.core.leases import KeyLayout, LeaseValue
from leaseagent.dataplane.base import HostInfo
from leaseagent.dataplane.fakefirewall import MemoryFirewall
from leaseagent.dataplane.fakenetlink import FakeKernel
from leaseagent.dataplane.vxlan import VxlanBackend
from leaseagent.errors import StoreError
from leaseagent.lab import processes
from leaseagent.lab.etcd import PROXY_PID_FILE, Etcd, start_grpc_proxy
from leaseagent.lab.processes import Process
from leaseagent.store.base import EventType, KeyValue
from leaseagent.store.etcd import EtcdSettings, EtcdStore

PREFIX = "/bench-cluster/network"
VIAS = ("etcd", "proxy")  # the agents' endpoints: the members, or one `etcd grpc-proxy`


BACKENDS = ("vxlan", "alloc")


def network_config(hosts: int, backend: str = "vxlan") -> dict[str, Any]:
    """/24s, at least twice as many as hosts (2,047 up to 1,000 hosts: flannel's "first
    100 free" stays cheap to list; 32,767 for 10,000)."""
    prefix = min(13, 24 - (2 * hosts).bit_length())
    return {"Network": f"10.0.0.0/{prefix}", "SubnetLen": 24, "Backend": {"Type": backend}}


UNDERLAY_BASE = int(IPv4Address("172.20.0.0"))
PATTERNS = ("leaseagent", "flannel")
UNARY = ("Range", "Txn", "Put", "DeleteRange", "LeaseGrant", "LeaseRevoke", "LeaseTimeToLive")
STREAMS = ("Watch", "LeaseKeepAlive")
log = logging.getLogger("bench.cluster")


# -- the worker: H/W agents on one event loop ------------------------------------------


def _refuse_firewall(_nftables: bool, _family: int) -> Any:
    raise RuntimeError("the cluster bench runs alloc agents: no traffic rules, no firewall")


SUBNETS = KeyLayout(PREFIX).subnets_prefix


class PatternStore:
    """An EtcdStore as the agent uses it, with what the pattern adds: flannel's TimeToLive
    per listed lease and per PUT event. Counts them, and keeps the revision of the last
    listing or event of the subnets it delivered (a watcher is settled once that reaches
    the last write; the config watch's listing and events do not count)."""

    def __init__(self, store: Any, *, flannel: bool, trace: deque[dict[str, Any]] | None = None
                 ) -> None:
        self._store = store
        self._flannel = flannel
        self._listings = 0
        self._trace = trace  # the subnets' listings, for `Worker.explain`
        # The lease check's reads of the subnets (count, census), the last few: when, at
        # which revision, what etcd said or the error (`Worker.explain`).
        self.checks: deque[dict[str, Any]] = deque(maxlen=CHECKS_LEN)
        self.check_errors = 0
        self.ttl_requests = 0
        self.ttl_errors = 0
        self.delivered = 0
        self.events = 0  # watch events of the subnets received (deliveries, whatever the path)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def _time_to_live(self, lease: int) -> None:
        if not lease:
            return
        self.ttl_requests += 1
        try:
            await self._store.time_to_live(lease)
        except StoreError:
            self.ttl_errors += 1  # flannel logs it and goes on (getSubnets: "Could not read ttl")

    async def _checked(self, what: str, read: Any, prefix: str, **how: Any) -> Any:
        if prefix != SUBNETS:
            return await read(prefix, **how)
        rec: dict[str, Any] = {what: how.get("revision", 0), "at": round(time.time(), 1)}
        self.checks.append(rec)
        try:
            result = await read(prefix, **how)
        except Exception as exc:  # not a cancellation (a stop): its record says neither
            self.check_errors += 1
            rec["error"] = repr(exc)[:120]
            raise
        rec["took"] = round(time.time() - rec["at"], 1)
        rec["result"] = (list(result) if isinstance(result, tuple)
                         else [result.count, len(result.changed), result.revision])
        return result

    async def count(self, prefix: str, **how: Any) -> Any:
        return await self._checked("count", self._store.count, prefix, **how)

    async def census(self, prefix: str, **how: Any) -> Any:
        return await self._checked("census", self._store.census, prefix, **how)

    async def list_prefix(self, prefix: str) -> Any:
        listing = await self._store.list_prefix(prefix)
        if prefix != SUBNETS:
            return listing
        if self._flannel:
            self._listings += 1
            rounds = [listing]
            if self._listings == 1:  # WatchLeases' reset lists again at start
                rounds.append(await self._store.list_prefix(prefix))
            for each in rounds:
                for kv in each.items:
                    await self._time_to_live(kv.lease)
        self.delivered = max(self.delivered, listing.revision)
        if self._trace is not None:
            self._trace.append({"list": listing.revision, "keys": len(listing.items),
                                "at": round(time.time(), 1)})
        return listing

    async def watch(self, prefix: str, *, start_revision: int) -> AsyncIterator[Any]:
        async for batch in self._store.watch(prefix, start_revision=start_revision):
            if prefix != SUBNETS:
                yield batch
                continue
            if self._flannel:
                for event in batch:
                    if event.type is EventType.PUT and event.kv is not None:
                        await self._time_to_live(event.kv.lease)
            if batch:
                self.events += len(batch)
                self.delivered = max(self.delivered, batch[-1].revision)
            yield batch


@dataclass
class Host:
    index: int
    name: str
    public_ip: IPv4Address
    kernel: FakeKernel | None = None  # vxlan: its kernel, kept across the agent's restarts
    info: HostInfo | None = None
    store: PatternStore | None = None
    agent: Any = None
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    started_at: float = 0.0  # wall clock, when this incarnation began
    converged_at: float | None = None
    settled_at: float | None = None
    ttl_requests: int = 0  # of incarnations gone
    events: int = 0  # watch events received by incarnations gone
    relists: dict[str, float] = field(default_factory=dict)  # by reason, incarnations gone
    # The last listings and watch streams of the subnets, every incarnation (`explain`).
    trace: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=TRACE_LEN))
    error: str | None = None
    pending: bool = True  # not (re)started yet: what it holds is not this phase's


COMMAND_LIMIT = 2**26  # a command line's bytes to a worker (explain: 10,000 keys ~ 0.6 MB)
TRACE_LEN = 16  # a host's last listings and watch streams of the subnets kept (explain)
CHECKS_LEN = 8  # a host's last lease-check reads kept (explain)


def trace_watch(store: Any, trace: deque[dict[str, Any]]) -> None:
    """Each stream of the subnets' watch `store` opens (the first, or a resume after a
    lost stream, which the agent does not see) is logged in `trace`: the revision it
    started from, the events it brought (how many, the first and last one's revision:
    the store resumes after the last) and how it ended. Wraps the store's one-stream
    reader on this instance only; what it yields is unchanged."""
    streams = store._watch_stream

    async def traced(prefix: str, start_revision: int, **how: Any) -> AsyncIterator[Any]:
        if prefix != SUBNETS:
            async for events in streams(prefix, start_revision, **how):
                yield events
            return
        rec: dict[str, Any] = {"stream": start_revision, "at": round(time.time(), 1),
                               "events": 0, "first": 0, "seen": 0, "end": None}
        trace.append(rec)
        try:
            async for events in streams(prefix, start_revision, **how):
                if events:
                    rec["events"] += len(events)
                    rec["first"] = rec["first"] or events[0].revision
                    rec["seen"] = max(rec["seen"], events[-1].revision)
                    rec["last_at"] = round(time.time(), 1)
                yield events
        except BaseException as exc:  # GeneratorExit: the watcher closed it (a relist, a stop)
            rec["end"] = repr(exc)[:160]
            raise
        rec["end"] = "returned"

    store._watch_stream = traced


def share_parsed_leases() -> None:
    """What every host of a worker would parse alike is parsed once and shared: the
    KeyValue of a key at one mod revision (a listing's or a watch event's: each host
    still receives and decodes its own gRPC message), the LeaseValue of the same value
    bytes, the subnets a key name says. Pure functions, immutable results (frozen
    dataclasses, networks), so sharing changes no behaviour; each host still judges
    every key itself (its own LeaseBook: entries, Peer, holder, counts)."""
    import leaseagent.store.etcd as etcd_adapter
    from leaseagent.core.leases import judging, keys

    make_kv, decode, parse_name = etcd_adapter._kv, judging.decode_lease_value, keys.parse_key_name
    kvs: dict[bytes, KeyValue] = {}
    values: dict[bytes, LeaseValue] = {}

    def shared_kv(pb: Any) -> KeyValue:
        kv = kvs.get(pb.key)
        if (kv is None or kv.mod_revision != pb.mod_revision or kv.lease != pb.lease
                or kv.version != pb.version):
            kvs[pb.key] = kv = make_kv(pb)
        return kv

    def shared_value(raw: bytes) -> LeaseValue:
        value = values.get(raw)
        if value is None:
            if len(values) > 100_000:
                values.clear()
            values[raw] = value = decode(raw)
        return value

    etcd_adapter._kv = shared_kv  # type: ignore[assignment]
    judging.decode_lease_value = shared_value  # type: ignore[assignment]
    keys.parse_key_name = functools.lru_cache(maxsize=65_536)(parse_name)  # type: ignore[assignment]


def share_judged_leases() -> None:
    """Each host of a worker still judges every key itself (classify, validate_peer,
    placement, election: its own LeaseBook, its own dicts, its own verdicts and counts),
    but the *results* that come out equal for every host (the `Peer` a valid lease
    makes, the book's `_Entry` of a key at one revision: frozen, slotted, compared by
    value) are then held once in the worker: each host's book points at the first equal
    copy instead of keeping its own. What a host does is unchanged (the same calls, the
    same values); what changes is that H hosts no longer hold H copies of one immutable
    result, the cost that made 5,000 hosts not fit (docs/benchmarks.md). An equal
    result is a value-equal one: a host whose judging differed (its own key, its own
    PublicIP) gets a different object, never another host's."""
    from leaseagent.core.leases import judging

    validate, entry = judging.validate_peer, judging._Entry
    peers: dict[Any, Any] = {}
    entries: dict[Any, Any] = {}

    def shared_peer(*args: Any, **kwargs: Any) -> Any:
        peer = validate(*args, **kwargs)  # the host's own judging, every time
        return peers.setdefault(peer, peer)

    def shared_entry(*args: Any) -> Any:
        made = entry(*args)
        return entries.setdefault(made, made)

    judging.validate_peer = shared_peer  # type: ignore[assignment]
    judging._Entry = shared_entry  # type: ignore[assignment,misc]


def relists(agent: Any) -> dict[str, float]:
    """An agent's leaseagent_watch_relists_total by reason (the counts that are not 0)."""
    return {s.labels["reason"]: s.value for metric in agent.metrics.relists.collect()
            for s in metric.samples if s.name.endswith("_total") and s.value}


def rss_bytes(pid: int | str = "self") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


class Worker:
    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.channel: EtcdStore | None = None  # the one gRPC channel its hosts share
        self.max_rss = float(spec.get("max_rss_mib", 0)) * 2**20
        self.out_of_memory = False
        self.intern: dict[Any, Any] = {}  # the hosts' fake kernels' equal objects, held once
        self.hosts_total = int(spec["hosts"])
        self.flannel = spec["pattern"] == "flannel"
        self.dir = Path(spec["dir"])
        self.rng = random.Random(int(spec["seed"]))
        self.hosts = [Host(i, f"h{i}", IPv4Address(UNDERLAY_BASE + 1 + i))
                      for i in range(spec["first"], spec["first"] + spec["count"])]

    def _config(self, host: Host) -> Any:
        return parse_agent_config([
            "--etcd-endpoints", self.spec["endpoints"], "--etcd-prefix", PREFIX,
            "--etcd-timeout", str(self.spec["etcd_timeout"]),
            "--subnet-file", str(self.dir / f"{host.name}.env"),
            "--state-dir", str(self.dir / f"{host.name}.state"),
            "--node-id", host.name, "--public-ip", str(host.public_ip),
            "--allow-any-public-ip"], environ={})

    def _data_plane(self, host: Host) -> dict[str, Any]:
        """alloc: no data path, no firewall. vxlan: the real backend (planning, reconciling)
        on the host's fake kernel, its traffic rules in a memory firewall."""
        if self.spec.get("backend", "alloc") == "alloc":
            return {"firewalls": _refuse_firewall}
        if host.kernel is None:
            host.kernel = FakeKernel(host.name, intern=self.intern)
            host.info = host.kernel.underlay("eth0", f"{host.public_ip}/16")
        kernel = host.kernel
        return {"backends": {"vxlan": lambda s: VxlanBackend(replace(s, kernel=kernel.open))},
                "firewalls": lambda _nftables, family: MemoryFirewall(family)}

    def _settings(self) -> EtcdSettings:
        return EtcdSettings(endpoints=self.spec["endpoints"], timeout=self.spec["etcd_timeout"])

    async def boot(self, host: Host, *, delay: float = 0.0) -> None:
        """Start (again) after `delay` s: a fresh store and agent, as a process would."""
        await asyncio.sleep(delay)
        host.started_at = time.time()
        host.converged_at = host.settled_at = None
        cfg = self._config(host)
        raw = (self.channel.sharing_channel() if self.channel is not None
               else await EtcdStore.connect(self._settings()))
        host.trace.append({"boot": round(host.started_at, 1)})
        trace_watch(raw, host.trace)
        host.store = PatternStore(raw, flannel=self.flannel, trace=host.trace)
        policy: dict[str, Any] = (
            {"choose": flannel_candidates, "candidates_per_txn": 1} if self.flannel else {})
        host.stop = asyncio.Event()
        data_plane = self._data_plane(host)
        host.agent = Agent(cfg, host.store,  # type: ignore[arg-type]
                           host=host.info or HostInfo(public_ip=host.public_ip),
                           notify=lambda _: None, rng=random.Random(self.rng.random()),
                           **data_plane, **policy)
        host.task = asyncio.ensure_future(host.agent.run(host.stop))
        host.pending = False

    async def halt(self, host: Host) -> None:
        """Stop as a restart does: the lease kept (no --release-on-exit)."""
        host.stop.set()
        if host.task is not None:
            await asyncio.gather(host.task, return_exceptions=True)
        if host.agent is not None:
            await host.agent.shutdown()
            for reason, n in relists(host.agent).items():
                host.relists[reason] = host.relists.get(reason, 0) + n
        if host.store is not None:
            host.ttl_requests += host.store.ttl_requests
            host.events += host.store.events
            await host.store.close()
        host.task = host.agent = host.store = None

    async def restart(self, host: Host, delay: float) -> None:
        await asyncio.sleep(delay)
        await self.halt(host)
        await self.boot(host)

    def spawn(self, host: Host, step: Any) -> None:
        """Run a host's start or restart; a failure is the host's error, reported."""
        host.pending = True

        def done(task: asyncio.Task[None]) -> None:
            if not task.cancelled() and task.exception() is not None:
                host.error = f"{host.name}: {task.exception()!r}"

        asyncio.ensure_future(step).add_done_callback(done)

    def _check(self, settle_at: int | None) -> None:
        now = time.time()
        for h in self.hosts:
            a = h.agent
            if a is None or h.pending:
                continue
            if h.task is not None and h.task.done() and not h.stop.is_set() and h.error is None:
                exc = h.task.exception() if not h.task.cancelled() else None
                h.error = f"{h.name} stopped: {exc!r}"

            if (h.converged_at is None and a.own is not None and a.watcher is not None
                    and len(a.watcher.peers) == self.hosts_total - 1
                    and (h.kernel is None or len(h.kernel.fdb()) == self.hosts_total - 1)):
                h.converged_at = now  # vxlan: and its kernel has every peer's FDB entry
            if (settle_at is not None and h.settled_at is None and h.converged_at is not None
                    and h.store is not None and h.store.delivered >= settle_at):
                h.settled_at = now

    async def wait(self, until: float, *, settle_at: int | None = None) -> None:
        """Until every host converged (and settled, if asked), or wall clock `until`, or
        this process's RSS is over its share of --max-rss-gib (then the run stops)."""
        while time.time() < until:
            self._check(settle_at)
            if self.max_rss and rss_bytes() > self.max_rss:
                self.out_of_memory = True
                return
            done = all(h.converged_at is not None and not h.pending
                       and (settle_at is None or h.settled_at is not None)
                       for h in self.hosts)
            if done or any(h.error for h in self.hosts):
                return
            await asyncio.sleep(0.1)

    def report(self) -> dict[str, Any]:
        return {
            "started": [h.started_at for h in self.hosts],
            "converged": [h.converged_at for h in self.hosts],
            "settled": [h.settled_at for h in self.hosts],
            "subnets": [str(h.agent.own.subnet) if h.agent is not None and h.agent.own
                        else None for h in self.hosts],
            "peers": [len(h.agent.watcher.peers) if h.agent is not None and h.agent.watcher
                      else 0 for h in self.hosts],
            "ttl_requests": sum(h.ttl_requests + (h.store.ttl_requests if h.store else 0)
                                for h in self.hosts),
            "ttl_errors": sum(h.store.ttl_errors for h in self.hosts if h.store),
            "events_received": sum(h.events + (h.store.events if h.store else 0)
                                   for h in self.hosts),
            "transactions": sum(h.agent.leasing.transactions for h in self.hosts
                                if h.agent is not None and h.agent.leasing is not None),
            "errors": [h.error for h in self.hosts if h.error][:5],
            "relists": self._relists(),
            "rss_bytes": rss_bytes(),
            "out_of_memory": self.out_of_memory,
        }

    def explain(self, keys: dict[str, int], cap: int) -> list[dict[str, Any]]:
        """For up to `cap` hosts not converged: which peer keys of `keys` (the subnets'
        keys in etcd now, with their mod revisions) each lacks and which it holds that etcd
        does not, whether its book has the key (at which revision; judged a peer or not),
        which of its current incarnation's watch streams covered the key's revision (started
        at or before it, its last event at or past it), its re-listings by reason and its trace."""
        self._check(None)
        layout = KeyLayout(PREFIX)
        subnets = {layout.parse_lease_key(k).ipv4: (k, rev) for k, rev in keys.items()}
        out: list[dict[str, Any]] = []
        for h in self.hosts:
            a = h.agent
            if h.converged_at is not None or h.pending or a is None or len(out) >= cap:
                continue
            watcher = a.watcher
            peers = set(watcher.peers) if watcher is not None else set()
            own = a.own.subnet if a.own is not None else None
            entries = watcher.book._entries if watcher is not None else {}
            trace = list(h.trace)
            since = max((i for i, t in enumerate(trace) if "boot" in t), default=0)
            missing = []
            for subnet in sorted(set(subnets) - peers - {own}):
                key, rev = subnets[subnet]
                entry = entries.get(key)
                missing.append({
                    "key": layout.name_of(key), "mod_revision": rev,
                    "book": None if entry is None else
                    {"mod_revision": entry.mod_revision, "peer": entry.peer is not None},
                    "covered_by": [i for i, t in enumerate(trace) if i > since and "stream" in t
                                   and t["stream"] <= rev <= t["seen"]]})
            out.append({"host": h.name, "own": str(own), "peers": len(peers),
                        "missing": missing[:8], "missing_count": len(missing),
                        "extra": sorted(str(s) for s in peers - set(subnets))[:8],
                        "relists": {r: h.relists.get(r, 0) + now.get(r, 0)
                                    for now in [relists(a)] for r in {*h.relists, *now}},
                        "held": len(watcher.hold) if watcher is not None else 0,
                        "synced": watcher is not None and watcher.synced.is_set(),
                        "check_errors": h.store.check_errors if h.store else None,
                        "checks": list(h.store.checks) if h.store else [],
                        "error": h.error, "trace": trace})
        return out

    def _relists(self) -> dict[str, float]:
        """The hosts' full re-listings of the lease prefix, by reason (their own
        leaseagent_watch_relists_total), every incarnation."""
        total: dict[str, float] = {}
        for h in self.hosts:
            for counts in (h.relists, relists(h.agent) if h.agent is not None else {}):
                for reason, n in counts.items():
                    total[reason] = total.get(reason, 0) + n
        return total

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=COMMAND_LIMIT)  # explain: every key, one line
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        if self.spec.get("channel", "host") == "worker":
            self.channel = await EtcdStore.connect(self._settings())
        if self.spec.get("share_parsing"):
            share_parsed_leases()
        if self.spec.get("share_judged"):
            share_judged_leases()
        _say({"ready": len(self.hosts)})
        try:
            while line := await reader.readline():
                cmd = json.loads(line)
                at, limit = float(cmd.get("at", 0)), float(cmd.get("limit", 0))
                if cmd["do"] == "start":
                    await asyncio.sleep(max(0.0, at - time.time()))
                    for h in self.hosts:
                        self.spawn(h, self.boot(h))
                    await asyncio.sleep(0)
                    await self.wait(at + limit)
                elif cmd["do"] == "restart":
                    await asyncio.sleep(max(0.0, at - time.time()))
                    spread = float(cmd["spread"])
                    for h in self.hosts:
                        self.spawn(h, self.restart(h, self.rng.uniform(0, spread)))
                    await asyncio.sleep(0)
                    await self.wait(at + limit)
                elif cmd["do"] == "settle":
                    await self.wait(at + limit, settle_at=int(cmd["revision"]))
                elif cmd["do"] == "explain":
                    _say({"unconverged": self.explain(cmd["keys"], int(cmd["cap"]))})
                    continue
                elif cmd["do"] == "stop":
                    break
                _say(self.report())
        finally:
            await asyncio.gather(*(self.halt(h) for h in self.hosts), return_exceptions=True)
            if self.channel is not None:
                await self.channel.close()
            _say({"stopped": True})


def _say(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def worker_main(spec_text: str) -> None:
    spec = json.loads(spec_text)
    logging.basicConfig(level=spec.get("log_level", "ERROR"), stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    raise_fd_limit()
    if not spec.get("profile"):
        asyncio.run(Worker(spec).serve())
        return
    import cProfile  # --profile DIR: each worker's own CPU, by function

    with cProfile.Profile() as prof:
        asyncio.run(Worker(spec).serve())
    prof.dump_stats(str(Path(spec["profile"]) / f"w{spec['first']}.prof"))


def raise_fd_limit() -> int:
    """The soft open-file limit raised to the hard one (each agent holds a gRPC
    connection to every member; etcd members inherit the limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


# -- the driver: etcd, workers, phases, figures -----------------------------------------


@dataclass
class WorkerProc:
    proc: subprocess.Popen[str]
    log: Path

    def send(self, cmd: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()

    def answer(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            tail = self.log.read_text()[-2000:] if self.log.exists() else ""
            raise RuntimeError(f"worker {self.proc.pid} exited ({self.proc.poll()}):\n{tail}")
        return dict(json.loads(line))

    def ask_to_stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(OSError, ValueError):
                self.send({"do": "stop"})

    def stop(self, deadline: float | None = None) -> None:
        """Asked to stop, and killed if not gone by `deadline` (monotonic; 60 s from now)."""
        self.ask_to_stop()
        try:
            self.proc.wait(timeout=max(0.0, (deadline or time.monotonic() + 60)
                                       - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def stop_workers(procs: list[WorkerProc]) -> None:
    """Every worker asked at once, then each given what is left of 60 s."""
    for w in procs:
        w.ask_to_stop()
    deadline = time.monotonic() + 60
    for w in procs:
        w.stop(deadline)


def member_sample(etcd: Etcd) -> list[dict[str, float]]:
    """Per member: the counters of its /metrics we report, CPU seconds and RSS from /proc."""
    from prometheus_client.parser import text_string_to_metric_families

    out = []
    tick = os.sysconf("SC_CLK_TCK")
    for m in etcd.members:
        with urllib.request.urlopen(f"{m.url}/metrics", timeout=10) as r:
            text = r.read().decode()
        sample: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name in ("grpc_server_handled_total", "grpc_server_started_total",
                              "grpc_server_msg_received_total", "grpc_server_msg_sent_total") \
                        and s.labels.get("grpc_service", "").startswith("etcdserverpb."):
                    key = f"{s.name}:{s.labels.get('grpc_method')}"
                    sample[key] = sample.get(key, 0.0) + s.value
                elif s.name.startswith(("etcd_network_client_grpc", "etcd_network_peer_",
                                        "etcd_debugging_mvcc_", "etcd_mvcc_db_total_size")) \
                        and not s.name.endswith(("_bucket", "_count", "_sum")):
                    sample[s.name] = sample.get(s.name, 0.0) + s.value
        pid = m.pid
        assert pid is not None
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        sample["cpu_seconds"] = (int(stat[11]) + int(stat[12])) / tick
        sample["rss_bytes"] = rss_bytes(pid)
        sample["at"] = time.monotonic()
        out.append(sample)
    return out


def proxy_sample(pid: int) -> dict[str, float]:
    """The proxy's CPU seconds and RSS (its /proc). etcd 3.4's proxy exports no metrics of
    its own: its /metrics (listen or --metrics-addr) relays a member's."""
    return {"cpu_seconds": cpu_seconds([pid]), "rss_bytes": rss_bytes(pid),
            "at": time.monotonic()}


def proxy_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    """A phase's cost at the proxy: its CPU, its RSS at the end."""
    seconds = after["at"] - before["at"]
    cpu = after["cpu_seconds"] - before["cpu_seconds"]
    return {"seconds": seconds, "cpu_seconds": cpu,
            "cpu_percent_of_a_core": cpu / seconds * 100 if seconds else 0,
            "rss_mib": after["rss_bytes"] / 2**20}


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of these processes (the agents' workers), from /proc."""
    total = 0
    for pid in pids:
        with contextlib.suppress(FileNotFoundError):
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(stat[11]) + int(stat[12])
    return total / os.sysconf("SC_CLK_TCK")


GAUGES = ("rss_bytes", "etcd_debugging_mvcc_watcher_total", "etcd_debugging_mvcc_watch_stream_total",
          "etcd_debugging_mvcc_keys_total", "etcd_mvcc_db_total_size_in_bytes",
          "etcd_debugging_mvcc_db_total_size_in_bytes", "etcd_debugging_mvcc_pending_events_total")


def delta(before: list[dict[str, float]], after: list[dict[str, float]]) -> dict[str, Any]:
    """A phase's cost, summed over the members (gauges: their value at the end)."""
    seconds = after[0]["at"] - before[0]["at"]
    total: dict[str, float] = {}
    for b, a in zip(before, after, strict=True):
        for k, v in a.items():
            if k == "at":
                continue
            total[k] = total.get(k, 0.0) + (v if k in GAUGES else v - b.get(k, 0.0))

    def by_method(name: str) -> dict[str, float]:
        return {k.split(":", 1)[1]: v for k, v in total.items()
                if k.startswith(name + ":") and v}

    return {
        "seconds": seconds,
        "unary_requests": {m: v for m, v in by_method("grpc_server_handled_total").items()
                           if m in UNARY},
        "streams_opened": {m: v for m, v in by_method("grpc_server_started_total").items()
                           if m in STREAMS},
        "stream_msgs_received": {m: v for m, v in by_method("grpc_server_msg_received_total")
                                 .items() if m in STREAMS},
        "stream_msgs_sent": {m: v for m, v in by_method("grpc_server_msg_sent_total").items()
                             if m in STREAMS},
        "client_bytes_received": total.get("etcd_network_client_grpc_received_bytes_total", 0),
        "client_bytes_sent": total.get("etcd_network_client_grpc_sent_bytes_total", 0),
        "peer_bytes_sent": total.get("etcd_network_peer_sent_bytes_total", 0),
        "watch_events_sent": total.get("etcd_debugging_mvcc_events_total", 0),
        "slow_watchers": total.get("etcd_debugging_mvcc_slow_watcher_total", 0),
        "watchers": total.get("etcd_debugging_mvcc_watcher_total", 0),
        "cpu_seconds": total.get("cpu_seconds", 0),
        "cpu_percent_of_a_core": total.get("cpu_seconds", 0) / seconds * 100 if seconds else 0,
        "rss_mib": total.get("rss_bytes", 0) / 2**20,
        "rss_mib_per_member": [m["rss_bytes"] / 2**20 for m in after],
        "db_mib": (total.get("etcd_mvcc_db_total_size_in_bytes", 0)) / 2**20 / len(after),
    }


def _times(report: list[dict[str, Any]], since: float, key: str) -> dict[str, Any]:
    """From the workers' reports: how many hosts reached `key`, and when (s after `since`;
    per host also from its own start)."""
    at = [t for r in report for t in r[key]]
    started = [t for r in report for t in r["started"]]
    reached = [t for t in at if t is not None]
    own = sorted(t - s for t, s in zip(at, started, strict=True) if t is not None)
    out: dict[str, Any] = {"hosts": len(at), "reached": len(reached)}
    peers = [n for r in report for n in r.get("peers", ())]
    if peers:  # how far the hosts got: the share of the other hosts each sees, on average
        out["peers_seen_mean_share"] = statistics.mean(peers) / max(1, len(peers) - 1)
    if reached:
        out["all_s" if len(reached) == len(at) else "last_of_reached_s"] = max(reached) - since
        out["per_host_p50_s"] = statistics.median(own)
        out["per_host_max_s"] = own[-1]
    return out


def subnet_keys(etcd: Etcd) -> dict[str, int]:
    """The subnets' keys in etcd now, with their mod revisions (read from a member)."""
    listing = json.loads(etcd.etcdctl("get", SUBNETS, "--prefix", "--keys-only", "-w", "json",
                                      timeout=30))
    return {base64.b64decode(kv["key"]).decode(): int(kv["mod_revision"])
            for kv in listing.get("kvs", [])}


def start_proxy(etcd: Etcd, pdir: Path, reaper: Reaper | None) -> tuple[Process, str]:
    """`etcd grpc-proxy start` in front of `etcd`'s members (told to the reaper before it
    starts), serving once this returns; the process and its client URL."""
    if reaper is not None:
        reaper.watch_pid_file(pdir / PROXY_PID_FILE)
    return start_grpc_proxy(etcd, pdir)


@dataclass
class Run:
    hosts: int
    pattern: str
    workers: int
    dir: Path
    steady: float
    spread: float
    limit: float
    etcd_timeout: float
    via: str = "etcd"
    channel: str = "host"
    share_parsing: bool = True
    share_judged: bool = True
    max_rss_mib: float = 0.0  # all workers together; 0: no limit
    restart: bool = True  # the steady state and restart phases after the cold start
    restart_anyway: bool = False  # ... even if some hosts did not converge cold (explained)
    backend: str = "vxlan"
    profile: str = ""  # a directory: each worker's cProfile stats written there
    log_level: str = "ERROR"  # the workers' (the agents') log level
    keep_logs: str = ""  # a directory: the workers' and the proxy's logs copied there
    reaper: Reaper | None = None  # told every process as it starts
    progress: Callable[[dict[str, Any]], None] = lambda _: None  # each phase's figures, as done
    seed: int = 1
    procs: list[WorkerProc] = field(default_factory=list)
    etcd: Etcd | None = None
    proxy: Process | None = None

    def start_proxy(self) -> str:
        """`etcd grpc-proxy start` in front of the three members; its client URL."""
        assert self.etcd is not None
        self.proxy, url = start_proxy(self.etcd, self.dir / "proxy", self.reaper)
        return url

    def _sample(self) -> tuple[list[dict[str, float]], dict[str, float] | None, float]:
        """The members', the proxy's (if any) and the workers' CPU, now."""
        assert self.etcd is not None
        proxy = proxy_sample(self.proxy.pid) if self.proxy is not None else None
        return member_sample(self.etcd), proxy, cpu_seconds([w.proc.pid for w in self.procs])

    def _phase(self, before: tuple[Any, ...], after: tuple[Any, ...],
               rep: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {"etcd": delta(before[0], after[0]),
                               "agents_cpu_seconds": after[2] - before[2]}
        if after[1] is not None:
            out["proxy"] = proxy_delta(before[1], after[1])
        if rep is not None:
            received = sum(r["events_received"] for r in rep)
            out["events_received_total"] = received  # since the workers started
            out["relists_total"] = {}  # since the workers started, by reason
            for r in rep:
                for reason, n in r.get("relists", {}).items():
                    out["relists_total"][reason] = out["relists_total"].get(reason, 0) + n
            out["agents_rss_mib"] = sum(r["rss_bytes"] for r in rep) / 2**20
            if any(r["out_of_memory"] for r in rep):
                out["out_of_memory"] = True
        return out

    def _all(self, cmd: dict[str, Any]) -> list[dict[str, Any]]:
        for w in self.procs:
            w.send(cmd)
        return [w.answer() for w in self.procs]

    def execute(self) -> dict[str, Any]:
        self.etcd = Etcd(self.dir / "etcd", 3)
        if self.reaper is not None:
            for m in self.etcd.members:
                self.reaper.watch_pid_file(m.pid_file)
        self.etcd.start()
        self.etcd.etcdctl("put", KeyLayout(PREFIX).config_key,
                          json.dumps(network_config(self.hosts, self.backend)))
        endpoints = self.start_proxy() if self.via == "proxy" else self.etcd.endpoints
        per = -(-self.hosts // self.workers)
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        for k in range(self.workers):
            first, count = k * per, min(per, self.hosts - k * per)
            if count <= 0:
                break
            wdir = self.dir / f"w{k}"
            wdir.mkdir()
            spec = {"hosts": self.hosts, "pattern": self.pattern, "dir": str(wdir),
                    "first": first, "count": count, "endpoints": endpoints,
                    "seed": self.seed * 1000 + k, "etcd_timeout": self.etcd_timeout,
                    "channel": self.channel, "share_parsing": self.share_parsing,
                    "share_judged": self.share_judged, "backend": self.backend,
                    "max_rss_mib": self.max_rss_mib / self.workers,
                    "profile": self.profile, "log_level": self.log_level}
            logf = self.dir / f"w{k}.log"
            with logf.open("w") as errs:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "bench.cluster", "--worker", json.dumps(spec)],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errs, text=True,
                    env=env)
            self.procs.append(WorkerProc(proc, logf))
            if self.reaper is not None:
                self.reaper.watch_process(
                    Process(proc.pid, processes.start_time(proc.pid) or 0))
        for w in self.procs:
            w.answer()  # imported and listening
        out: dict[str, Any] = {"hosts": self.hosts, "pattern": self.pattern, "via": self.via,
                               "channel": self.channel, "share_parsing": self.share_parsing,
                               "share_judged": self.share_judged, "backend": self.backend,
                               "workers": len(self.procs),
                               "agents_rss_idle_mib": sum(rss_bytes(w.proc.pid)
                                                          for w in self.procs) / 2**20}
        idle0 = self._sample()
        time.sleep(2)
        s0 = self._sample()
        out["etcd_before"] = delta(idle0[0], s0[0])

        at = time.time() + 0.5
        rep = self._all({"do": "start", "at": at, "limit": self.limit})
        s1 = self._sample()
        out["cold"] = {"converged": _times(rep, at, "converged"), **self._counts(rep),
                       **self._phase(s0, s1, rep)}
        out["cold"]["events_received"] = out["cold"]["events_received_total"]
        self.progress(out)
        if out["cold"]["converged"]["reached"] < self.hosts:
            out["stopped_after"] = "cold"
            out["cold"]["unconverged"] = self.explain()
            if not (self.restart and self.restart_anyway):
                return out
        if not self.restart:
            return out
        time.sleep(self.steady)
        s2 = self._sample()
        out["steady"] = self._phase(s1, s2)
        self.progress(out)

        at = time.time() + 0.5
        rep = self._all({"do": "restart", "at": at, "spread": self.spread,
                         "limit": self.limit + self.spread})
        converged = _times(rep, at, "converged")
        unconverged = self.explain() if converged["reached"] < self.hosts else None
        revision = int(json.loads(self.etcd.etcdctl(
            "endpoint", "status", "-w", "json", urls=[self.etcd.url]))[0]["Status"]["header"]
            ["revision"])
        rep = self._all({"do": "settle", "revision": revision, "at": time.time(),
                         "limit": self.limit})
        s3 = self._sample()
        out["restart"] = {"converged": converged, "settled": _times(rep, at, "settled"),
                          **self._counts(rep), **self._phase(s2, s3, rep)}
        out["restart"]["events_received"] = (out["restart"]["events_received_total"]
                                             - out["cold"]["events_received_total"])
        if unconverged is not None:
            out["restart"]["unconverged"] = unconverged
        return out

    def explain(self, cap: int = 20) -> list[dict[str, Any]]:
        """Hosts not converged at a phase's end (up to `cap`): the subnets' keys in etcd
        now (read from a member) against what each such host holds (`Worker.explain`)."""
        assert self.etcd is not None
        keys = subnet_keys(self.etcd)
        found = [u for r in self._all({"do": "explain", "keys": keys, "cap": cap})
                 for u in r["unconverged"]]
        return found[:cap]

    def _counts(self, rep: list[dict[str, Any]]) -> dict[str, Any]:
        subnets = [s for r in rep for s in r["subnets"] if s is not None]
        return {"distinct_subnets": len(set(subnets)), "leases": len(subnets),
                "ttl_requests_by_agents": sum(r["ttl_requests"] for r in rep),
                "ttl_errors": sum(r["ttl_errors"] for r in rep),
                "transactions": sum(r["transactions"] for r in rep),
                "errors": [e for r in rep for e in r["errors"]][:5]}

    def close(self) -> None:
        stop_workers(self.procs)
        if self.proxy is not None:
            self.proxy.stop()
        if self.etcd is not None:
            self.etcd.close()
        if self.keep_logs:
            self._keep_logs(Path(self.keep_logs))

    def _keep_logs(self, to: Path) -> None:
        """The workers' logs and the proxy's, copied out of the run directory (removed at
        the end) as <pattern>-<via>-<hosts>-<name>.log."""
        to.mkdir(parents=True, exist_ok=True)
        tag = f"{self.pattern}-{self.via}-{self.hosts}"
        for src in [w.log for w in self.procs] + [self.dir / "proxy" / "proxy.log"]:
            if src.exists():
                shutil.copyfile(src, to / f"{tag}-{src.name}")


class Reaper:
    """Stops a run's processes if the driver cannot: a child in its own session (a Ctrl-C
    or a timeout's signal to the driver's group does not reach it) that is told, on a
    pipe, the pid files of the etcd members and the proxy and the PIDs of the workers,
    as soon as they are known, and the run's directory. When the pipe ends (the driver
    is done, or gone however: SIGKILL, a crash, a timeout) it stops, by PID and start
    time, each of those processes still running, and removes the directory. After a
    clean run there is nothing left to stop."""

    def __init__(self, run_dir: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.cluster", "--reaper"], stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL, text=True, start_new_session=True,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
        self.tell("dir", str(run_dir))

    def tell(self, kind: str, what: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{kind} {what}\n")
        self.proc.stdin.flush()

    def watch_pid_file(self, path: Path) -> None:
        self.tell("pidfile", str(path))

    def watch_process(self, proc: Process) -> None:
        self.tell("pid", f"{proc.pid} {proc.start}")

    def close(self) -> None:
        """The driver is done: the reaper checks, and exits."""
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        try:
            self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def reaper_main() -> None:
    """The reaper's side (`--reaper`): collect what to stop until stdin ends, then stop it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # it ends at EOF, having stopped them
    pid_files: list[Path] = []
    procs: list[Process] = []
    dirs: list[Path] = []
    for line in sys.stdin:
        kind, _, what = line.rstrip("\n").partition(" ")
        if kind == "pidfile":
            pid_files.append(Path(what))
        elif kind == "pid":
            pid, start = what.split()
            procs.append(Process(int(pid), int(start)))
        elif kind == "dir":
            dirs.append(Path(what))
    procs += [p for p in map(Process.read, pid_files) if p is not None]
    left = [p for p in procs if p.alive]
    if left:
        print(f"bench.cluster reaper: stopping {len(left)} processes the run left: "
              f"{[p.pid for p in left]}", file=sys.stderr, flush=True)
        processes.stop(left, grace=10)
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)


def run_one(*, hosts: int, pattern: str, workers: int, steady: float, spread: float,
            limit: float, etcd_timeout: float = 10.0, via: str = "etcd",
            channel: str = "host", share_parsing: bool = True, share_judged: bool = True,
            max_rss_mib: float = 0.0, restart: bool = True, restart_anyway: bool = False,
            backend: str = "vxlan",
            profile: str = "", log_level: str = "ERROR", keep_logs: str = "",
            progress: Callable[[dict[str, Any]], None] = lambda _: None
            ) -> dict[str, Any]:
    """One run (a fresh etcd cluster, fresh workers), everything stopped at the end."""
    base = Path(tempfile.mkdtemp(prefix=f"leaseagent-cluster-{pattern}-{via}-{hosts}-",
                                 dir="/dev/shm" if os.path.isdir("/dev/shm") else None))
    print(f"run directory {base}", file=sys.stderr, flush=True)
    reaper = Reaper(base)
    run = Run(hosts, pattern, workers, base, steady, spread, limit, etcd_timeout, via=via,
              channel=channel, share_parsing=share_parsing, share_judged=share_judged,
              max_rss_mib=max_rss_mib,
              restart=restart, restart_anyway=restart_anyway, backend=backend,
              profile=profile, log_level=log_level,
              keep_logs=keep_logs, reaper=reaper,
              progress=progress)
    try:
        return run.execute()
    finally:
        try:
            run.close()
            shutil.rmtree(base, ignore_errors=True)
        finally:
            reaper.close()


# -- figures ----------------------------------------------------------------------------


def per_host(result: dict[str, Any], phase: str) -> dict[str, float]:
    """A phase's etcd cost divided by the hosts. etcd's CPU is counted above its idle
    rate (the steady state's, else the one before the start: raft heartbeats and the
    like, ~4 % of a core here, which a short phase would otherwise hide the trend in)."""
    e = result[phase]["etcd"]
    h = result["hosts"]
    idle = result.get("steady", result["etcd_before"])["etcd"] if "steady" in result \
        else result["etcd_before"]
    idle_rate = idle["cpu_seconds"] / idle["seconds"]
    return {
        "unary_requests": sum(e["unary_requests"].values()) / h,
        "ttl_requests": e["unary_requests"].get("LeaseTimeToLive", 0) / h,
        "range_requests": e["unary_requests"].get("Range", 0) / h,
        "client_bytes": (e["client_bytes_received"] + e["client_bytes_sent"]) / h,
        "watch_events": e["watch_events_sent"] / h,
        "cpu_ms": max(0.0, e["cpu_seconds"] - idle_rate * e["seconds"]) / h * 1000,
    }


def summary_lines(results: list[dict[str, Any]]) -> list[str]:
    lines = []
    for r in results:
        cold = r["cold"]
        c = cold["converged"]
        head = f"H={r['hosts']} {r['pattern']} via {r.get('via', 'etcd')}:"
        if c["reached"] < c["hosts"]:
            lines.append(f"{head} cold start: only {c['reached']}/{c['hosts']} hosts converged "
                         f"in the limit (last at {c.get('last_of_reached_s', 0):.1f} s; each sees "
                         f"{c.get('peers_seen_mean_share', 0):.0%} of the others on average); "
                         f"{sum(cold['etcd']['unary_requests'].values()):.0f} unary requests, "
                         f"errors {cold['errors']}")
            lines += unconverged_lines(head + " cold:", cold.get("unconverged", []))
        else:
            lines.append(
                f"{head} cold start all converged {c['all_s']:.1f} s "
                f"(distinct subnets {cold['distinct_subnets']}/{r['hosts']}), per host "
                f"{_fmt(per_host(r, 'cold'))}, etcd CPU {cold['etcd']['cpu_seconds']:.1f} s, "
                f"RSS {cold['etcd']['rss_mib']:.0f} MiB (3 members)")
        if "steady" not in r:
            continue
        st = r["steady"]["etcd"]
        lines.append(f"{head} steady {st['seconds']:.0f} s: unary {sum(st['unary_requests'].values()):.0f}, "
                     f"watch msgs in {sum(st['stream_msgs_received'].values()):.0f}, "
                     f"etcd CPU {st['cpu_percent_of_a_core']:.1f} % of a core")
        rs = r["restart"]
        lines.append(
            f"{head} restart all converged {rs['converged'].get('all_s', float('nan')):.1f} s, "
            f"settled {rs['settled'].get('all_s', float('nan')):.1f} s "
            f"({rs['settled']['reached']}/{r['hosts']}), per host {_fmt(per_host(r, 'restart'))}, "
            f"etcd CPU {rs['etcd']['cpu_seconds']:.1f} s")
        lines += unconverged_lines(head + " restart:", rs.get("unconverged", []))
    return [*lines, *cost_lines(results)]


def unconverged_lines(head: str, hosts: list[dict[str, Any]]) -> list[str]:
    """A line per host not converged (`Run.explain`): what it lacks, at which revision,
    whether its book has it, its watch streams (start revision..seen, events, when the
    last came, end) and its lease check's last reads."""
    lines = []
    for u in hosts:
        lacks = ", ".join(f"{m['key']}@{m['mod_revision']} (book {m['book']}, streams "
                          f"{m['covered_by']})" for m in u["missing"])
        streams = "; ".join(f"{t['stream']}..{t['seen']} {t['events']} ev (last at "
                            f"{t.get('last_at')}) {t['end']}"
                            if "stream" in t else f"list@{t['list']}" if "list" in t else "boot"
                            for t in u["trace"])
        lines.append(f"{head} {u['host']} ({u['own']}) has {u['peers']} peers, lacks "
                     f"{u['missing_count']}: {lacks}; extra {u['extra']}; relists "
                     f"{u['relists']}; held {u['held']}; error {u['error']}; trace: {streams}; "
                     f"synced {u.get('synced')}, lease-check read errors "
                     f"{u.get('check_errors')}, last reads {u.get('checks')}")
    return lines


def cost_lines(results: list[dict[str, Any]]) -> list[str]:
    """Per phase: etcd's and the proxy's CPU, the watch deliveries, the harness's own cost."""
    lines = []
    for r in results:
        head = f"H={r['hosts']} {r['pattern']} via {r.get('via', 'etcd')}:"
        for name in ("cold", "restart"):
            if name not in r:
                continue
            ph = r[name]
            e = ph["etcd"]
            text = (f"{head} {name}: etcd CPU {e['cpu_seconds']:.1f} s, watch events sent by "
                    f"the members {e['watch_events_sent']:,.0f}, received by the agents "
                    f"{ph.get('events_received', 0):,.0f}")
            if "proxy" in ph:
                px = ph["proxy"]
                text += f"; proxy CPU {px['cpu_seconds']:.1f} s, RSS {px['rss_mib']:.0f} MiB"
            if "agents_rss_mib" in ph:
                text += (f"; agents CPU {ph['agents_cpu_seconds']:.0f} s, "
                         f"RSS {ph['agents_rss_mib']:,.0f} MiB")
            if ph.get("relists_total"):
                text += f"; re-listings so far {ph['relists_total']}"
            if ph.get("out_of_memory"):
                text += " (STOPPED: the workers' RSS went over --max-rss-gib)"
            lines.append(text)
    return lines


def fit(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least squares a + b*H through (H, per-host value) points (two at least)."""
    n = len(points)
    mh = sum(h for h, _ in points) / n
    mv = sum(v for _, v in points) / n
    b = sum((h - mh) * (v - mv) for h, v in points) / sum((h - mh) ** 2 for h, _ in points)
    return mv - b * mh, b


EXTRAPOLATED = ("unary_requests", "ttl_requests", "watch_events", "client_bytes", "cpu_ms")


def cpu_costs(results: list[dict[str, Any]]) -> tuple[float, float]:
    """etcd CPU (ms, above idle, the members together) per watch event sent and per unary
    request: least squares without intercept over every phase that completed, both
    patterns (flannel's phases are mostly TimeToLives, ours mostly watch events)."""
    rows = [(p["watch_events"], p["unary_requests"], p["cpu_ms"])
            for r in results if r.get("via", "etcd") == "etcd" for phase in ("cold", "restart")
            if phase in r and r[phase]["converged"]["reached"] == r["hosts"]
            for p in (per_host(r, phase),)]
    see = sum(e * e for e, _, _ in rows)
    suu = sum(u * u for _, u, _ in rows)
    seu = sum(e * u for e, u, _ in rows)
    sec = sum(e * c for e, _, c in rows)
    suc = sum(u * c for _, u, c in rows)
    det = see * suu - seu * seu
    if not rows or det == 0:
        return 0.0, 0.0
    return (sec * suu - suc * seu) / det, (suc * see - sec * seu) / det


def extrapolate(results: list[dict[str, Any]], sizes: tuple[int, ...] = (5_000, 10_000)
                ) -> dict[str, Any]:
    """Per pattern and phase, each per-host count fitted as a + b*H over the H that
    completed the phase (counts that grow with the cluster make b > 0, a total of
    O(H^2)), and predicted per host and in total at `sizes`; etcd's CPU from those
    counts at the fitted cost per event and per request (`cpu_costs`); etcd's RSS per
    host (all three members) as the slope of their RSS after the cold start over H."""
    per_event, per_request = cpu_costs(results)
    out: dict[str, Any] = {"etcd_cpu_ms_per_watch_event": per_event,
                           "etcd_cpu_ms_per_unary_request": per_request}
    for pattern in PATTERNS:
        mine = [r for r in results if r["pattern"] == pattern and r.get("via", "etcd") == "etcd"]
        for phase in ("cold", "restart"):
            done = [r for r in mine if phase in r
                    and r[phase]["converged"]["reached"] == r["hosts"]]
            if len(done) < 2:
                continue
            row: dict[str, Any] = {"measured_at": sorted({r["hosts"] for r in done})}
            for what in EXTRAPOLATED:
                a, b = fit([(r["hosts"], per_host(r, phase)[what]) for r in done])
                row[what] = {"per_host_fit": [a, b], **{
                    str(h): {"per_host": a + b * h, "total": (a + b * h) * h} for h in sizes}}
            for h in map(str, sizes):
                cpu = (per_event * row["watch_events"][h]["per_host"]
                       + per_request * row["unary_requests"][h]["per_host"])
                row["cpu_ms"][h] = {"per_host": cpu, "total": cpu * int(h)}
            out[f"{pattern} {phase}"] = row
        colds = [r for r in mine if r["cold"]["converged"]["reached"] == r["hosts"]]
        if len({r["hosts"] for r in colds}) >= 2:  # the marginal cost: the slope over H
            _, slope = fit([(r["hosts"], r["cold"]["etcd"]["rss_mib"]) for r in colds])
            out[f"{pattern} etcd_rss_mib_per_host"] = slope
    return out


def extrapolation_lines(ex: dict[str, Any], sizes: tuple[int, ...] = (5_000, 10_000)
                        ) -> list[str]:
    lines = []
    for name, row in ex.items():
        if name.startswith("etcd_cpu"):
            lines.append(f"{name}: {row:.4f}")
            continue
        if not isinstance(row, dict):
            lines.append(f"{name}: {row * 1024:.1f} KiB (3 members together)")
            continue
        for h in sizes:
            lines.append(f"{name} at H={h:,} (fit over H={row['measured_at']}): " + ", ".join(
                f"{what} {row[what][str(h)]['per_host']:,.1f}/host = "
                f"{row[what][str(h)]['total']:,.3g} total" for what in EXTRAPOLATED))
    return lines


def _fmt(d: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:,.1f}" for k, v in d.items())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.cluster", description=__doc__.split("\n")[0])
    p.add_argument("--hosts", default="250,500,1000", help="H values, comma-separated")
    p.add_argument("--patterns", default=",".join(PATTERNS))
    p.add_argument("--workers", type=int, default=4, help="agent processes")
    p.add_argument("--steady", type=float, default=30.0, help="steady-state seconds")
    p.add_argument("--restart-spread", type=float, default=10.0,
                   help="each agent restarts after a random pause in [0, this] s")
    p.add_argument("--limit", type=float, default=150.0,
                   help="longest wait for a phase (s); a run that does not converge stops")
    p.add_argument("--etcd-timeout", type=float, default=10.0, help="each agent's --etcd-timeout")
    p.add_argument("--via", default="etcd",
                   help="comma-separated: etcd (agents talk to the 3 members), proxy (to one "
                        "`etcd grpc-proxy start` in front of them)")
    p.add_argument("--channel", choices=("host", "worker"), default="host",
                   help="one gRPC channel per host, as a real fleet (default), or one per "
                        "worker process, shared by its hosts (one HTTP/2 connection per "
                        "member: its flow-control window too, see docs/benchmarks.md)")
    p.add_argument("--no-share-parsing", dest="share_parsing", action="store_false",
                   help="each host parses its own copy of every key and value")
    p.add_argument("--no-share-judged", dest="share_judged", action="store_false",
                   help="each host keeps its own copy of every judged result (Peer, the "
                        "book's entry) instead of the worker's one equal copy; judging "
                        "runs per host either way")
    p.add_argument("--backend", choices=BACKENDS, default="vxlan",
                   help="vxlan: the real backend on a fake kernel per host (planning and "
                        "reconciling run); alloc: a lease and subnet.env only")
    p.add_argument("--cold-only", action="store_true",
                   help="the cold start only (no steady state, no restart)")
    p.add_argument("--restart-anyway", action="store_true",
                   help="go on to the restart when some hosts did not converge cold (they are "
                        "explained first; the restart starts every agent afresh)")
    p.add_argument("--max-rss-gib", type=float, default=16.0,
                   help="the workers' RSS together; a phase stops (and the run) above it")
    p.add_argument("--profile", type=Path,
                   help="a directory: each worker's cProfile stats (w<first host>.prof)")
    p.add_argument("--log-level", default="ERROR", type=str.upper,
                   choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                   help="the agents' log level in the workers (WARNING: every etcd outage "
                        "an agent finds, with the error)")
    p.add_argument("--keep-logs", type=Path,
                   help="a directory: the workers' logs and the proxy's copied there at "
                        "the end of each run (the run directory is removed)")
    p.add_argument("--json", type=Path, default=Path("bench-cluster.json"))
    p.add_argument("--report", type=Path, nargs="+",
                   help="print the figures of the JSON files this wrote, together; no run")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--reaper", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.report:
        results = []
        for path in args.report:
            got = json.loads(path.read_text())
            results += got["runs"] if isinstance(got, dict) else got
        results.sort(key=lambda r: (r["hosts"], PATTERNS.index(r["pattern"]),
                                    VIAS.index(r.get("via", "etcd"))))
        for line in summary_lines(results):
            print(line)
        for line in extrapolation_lines(extrapolate(results)):
            print(line)
        return 0
    if args.worker:
        worker_main(args.worker)
        return 0
    if args.reaper:
        reaper_main()
        return 0
    limit = raise_fd_limit()
    # SIGTERM (or SIGINT, which a shell's background job ignores) ends the run through its
    # `finally`: workers, the proxy and etcd stopped by PID.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    results = []
    for hosts in (int(h) for h in args.hosts.split(",")):
        for pattern in args.patterns.split(","):
            for via in args.via.split(","):
                print(f"H={hosts} {pattern} via {via}: running (fd limit {limit})",
                      file=sys.stderr, flush=True)
                def save(partial: dict[str, Any], done: list[dict[str, Any]] = results) -> None:
                    """A run's phases so far, kept beside the finished runs (a run stopped
                    in its restart keeps its cold start)."""
                    args.json.write_text(json.dumps([*done, partial], indent=1))

                results.append(run_one(
                    hosts=hosts, pattern=pattern, workers=args.workers, steady=args.steady,
                    spread=args.restart_spread, limit=args.limit,
                    etcd_timeout=args.etcd_timeout, via=via, channel=args.channel,
                    share_parsing=args.share_parsing, share_judged=args.share_judged,
                    max_rss_mib=args.max_rss_gib * 1024,
                    restart=not args.cold_only, restart_anyway=args.restart_anyway,
                    backend=args.backend,
                    profile=str(args.profile.resolve()) if args.profile else "",
                    log_level=args.log_level,
                    keep_logs=str(args.keep_logs.resolve()) if args.keep_logs else "",
                    progress=save))
                args.json.write_text(json.dumps(results, indent=1))
                for line in summary_lines(results[-1:]):
                    print(line, flush=True)
    report(results, args.json)
    return 0


def report(results: list[dict[str, Any]], path: Path) -> None:
    """The extrapolation, printed and kept in the JSON beside the runs."""
    ex = extrapolate(results)
    for line in extrapolation_lines(ex):
        print(line, flush=True)
    path.write_text(json.dumps({"runs": results, "extrapolation": ex}, indent=1))


if __name__ == "__main__":
    sys.exit(main())
