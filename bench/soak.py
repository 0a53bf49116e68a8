"""The no-leak soak: `sudo .venv/bin/python -m bench.soak` (see docs/benchmarks.md,
"Soak (no leak)").

One real agent (vxlan) in the bench's world (bench/env.py: its namespace, its
etcd), started into --peers leases as the main bench starts it; then a churn
of --events lease events at a steady --rate with at most --concurrency in
flight: a peer added (a fresh subnet), changed (a new VtepMAC and, every
other change, a new PublicIP) or removed, the number of peers kept near
--peers. The agent's periodic full resyncs happen on their own (every
--resync s). --etcd-restarts times, spread over the churn, etcd is stopped by
PID and started again on the same data dir and ports; the next event is a
peer added, timed until its route is in the kernel: the agent reconnected.

Every --sample-interval s: the agent's RSS (/proc/PID/status VmRSS), open
fds (/proc/PID/fd), threads, and its asyncio tasks (the
`leaseagent_asyncio_tasks` gauge on its metrics port). The figures: the
slope of RSS over the churn after --warmup-events (least squares, MiB per
10,000 events and per hour) against the samples' own noise (the residuals'
standard deviation and spread), and fds, tasks and threads at the baseline
(after the join and a resync, before the churn) against the end (after the
churn settled: the kernel matches etcd and a resync has passed). Last, the
kernel's routes, neighbours and FDB entries are compared with what the final
etcd peer set implies (3 objects a peer, each with the lease's VtepMAC and
PublicIP).

Prints a table and writes JSON (--json), as `python -m bench` does. Needs root.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import os
import random
import shutil
import statistics
import sys
import time
from collections import deque
from collections.abc import Awaitable
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

from bench.__main__ import _fmt, machine
from bench.env import (
    IPV4,
    UNDERLAY,
    Proc,
    World,
    as_bench_process,
    free_port,
    in_world,
    kernel_listing,
    kernel_objects,
    own_index,
    peer_ip,
    peer_mac,
    peer_subnet,
    proc_sample,
    render_table,
    sh,
)
from bench.scenarios import (
    ReadyListener,
    agent_metrics,
    put_network_config,
    put_peers,
)
from leaseagent.core.leases import decode_lease_value
from leaseagent.retrying import retrying
from leaseagent.store.etcd import EtcdSettings, EtcdStore

TASKS = "leaseagent_asyncio_tasks"
RECONCILES = "leaseagent_reconcile_duration_seconds_count"
RELISTS = "leaseagent_watch_relists_total"
WATCHED = "leaseagent_watch_events_total"
ADDED, CHANGED, REMOVED = "added", "changed", "removed"
# Peer numbers the churn may use: peer_subnet(i) in the /9 (i < 32,768) and
# churn_value's upper-half PublicIP in the underlay's /16.
MAX_POOL = 32_500
# What the churn is measured on (--subject), to tell which part of the agent makes a
# growth: the agent as it runs (vxlan, default traffic rules); without its traffic
# rules; with the `alloc` backend (no data plane: the store, the lease book, leasing,
# the view check, metrics); the bare watch of bench/soakwatch.py (no agent at all).
SUBJECTS = {"agent": (), "no-rules": ("--no-vxlan-peer-filter", "--no-iptables-forward-rules"),
            "alloc": (), "watch": ()}
KERNEL_SUBJECTS = ("agent", "no-rules")  # those that program the kernel


@dataclass(frozen=True)
class Sizes:
    peers: int = 5000
    events: int = 100_000
    pool: int = 30_000  # peer numbers the churn cycles through (see Churn)
    rate: float = 100.0  # events per second
    concurrency: int = 8  # requests in flight at most
    etcd_restarts: int = 3
    etcd_down: float = 2.0  # seconds etcd stays stopped
    resync: float = 30.0  # the agent's --resync-interval
    sample_interval: float = 5.0
    warmup_events: int = 10_000
    settle: float = 60.0  # seconds the end may take to come back to the baseline
    timeout: float = 120.0  # seconds the join, the agent's return or the kernel may take
    max_seconds: float = 0.0  # the churn ends here if its events are not done (0: never)
    seed: int = 1
    subject: str = "agent"  # what the churn is measured on: one of SUBJECTS


# -- the churn's leases ------------------------------------------------------------------


def churn_value(i: int, generation: int) -> bytes:
    """Peer i's lease value at its `generation`-th change (0: as the join put it, the
    bench's lease_value): a new VtepMAC at each change, the PublicIP moved to the upper
    half of the underlay at every odd one."""
    ip = peer_ip(i) if generation % 2 == 0 else IPv4Address(int(peer_ip(i)) + 32768)
    assert ip in UNDERLAY and i <= MAX_POOL
    return json.dumps({"PublicIP": str(ip), "BackendType": "vxlan",
                       "BackendData": {"VNI": 1, "VtepMAC": peer_mac(i + (generation << 16))}}
                      ).encode()


class Churn:
    """Which event comes next: a random peer of those present (changed or removed), or
    the number that has been absent longest (added), never one with a request in
    flight; additions and removals balanced so that the number present stays within
    `slack` of `target`. Numbers run 1..pool, skipping `skip` (the agent's own
    subnet). Taking the longest-absent number means every subnet of the pool is used
    before any comes back, so state the agent kept per departed subnet would grow
    with the churn instead of filling up at a few thousand."""

    def __init__(self, *, present: int, pool: int, skip: int | None, seed: int,
                 slack: int = 50) -> None:
        numbers = [i for i in range(1, pool + 1) if i != skip]
        self.target = present
        self.slack = slack
        self.present = numbers[:present]
        self.absent = deque(numbers[present:])
        self.generation: dict[int, int] = {}
        self.rng = random.Random(seed)
        self.busy: set[int] = set()

    def _present(self, *, take: bool) -> int:
        for _ in range(64):
            k = self.rng.randrange(len(self.present))
            i = self.present[k]
            if i in self.busy:
                continue
            if take:
                self.present[k] = self.present[-1]
                self.present.pop()
            return i
        raise RuntimeError("every candidate peer is busy: --concurrency too high")

    def _absent(self) -> int:
        for _ in range(64):
            i = self.absent.popleft()
            if i not in self.busy:
                return i
            self.absent.append(i)
        raise RuntimeError("every candidate peer is busy: --concurrency too high")

    def next(self, kind: str | None = None) -> tuple[str, int]:
        if kind is None:
            kind = self.rng.choice((ADDED, CHANGED, REMOVED))
            if len(self.present) >= self.target + self.slack and kind == ADDED:
                kind = REMOVED
            elif len(self.present) <= self.target - self.slack and kind == REMOVED:
                kind = ADDED
        if kind == ADDED:
            i = self._absent()
            self.present.append(i)
            self.generation[i] = self.generation.get(i, -1) + 1  # a new lease: a new MAC
        elif kind == REMOVED:
            i = self._present(take=True)
            self.absent.append(i)
        else:
            i = self._present(take=False)
            self.generation[i] = self.generation.get(i, 0) + 1
        return kind, i


# -- the run -----------------------------------------------------------------------------


@dataclass
class Soak:
    world: World
    store: EtcdStore
    sizes: Sizes
    agent: Proc | None = None
    port: int = 0
    samples: list[dict[str, Any]] = field(default_factory=list)
    done: int = 0  # churn events applied
    phase: str = "join"
    scrape_failures: int = 0
    watched_before: float | None = None  # the agent's watch events when the churn began
    began: float = field(default_factory=time.perf_counter)

    async def _metric(self, name: str) -> float | None:
        """The agent's metric `name`, all its series added; None when the scrape failed
        (an agent busy with the churn on a starved machine may not answer within its
        timeout): the failures are counted, and nothing else is lost."""
        return (await self._metrics(name))[name]

    async def _metrics(self, *names: str) -> dict[str, float | None]:
        try:
            return await asyncio.to_thread(agent_metrics, self.port, names, summed=True)
        except OSError as exc:
            self.scrape_failures += 1
            print(f"  soak: scrape failed at {self.done:,} events: {exc}", file=sys.stderr)
            return dict.fromkeys(names)

    @property
    def programs(self) -> bool:
        """Whether the subject programs the kernel (and makes full resyncs)."""
        return self.sizes.subject in KERNEL_SUBJECTS

    async def resync_passed(self) -> None:
        """Until the agent's next full resync pass has ended (scenarios.after_resync, with
        failed scrapes tried again); a subject without a data plane: one --resync."""
        if not self.programs:
            await asyncio.sleep(min(self.sizes.resync, 5.0))
            return
        deadline = time.perf_counter() + self.sizes.timeout + self.sizes.resync
        before = None
        while True:
            now = await self._metric(RECONCILES)
            if before is None:
                before = now
            elif now is not None and now > before:
                return
            if time.perf_counter() > deadline:
                raise RuntimeError(f"no full resync within {self.sizes.timeout + self.sizes.resync}s")
            await asyncio.sleep(0.2)

    async def sample(self, *, need_tasks: bool = False) -> dict[str, Any]:
        assert self.agent is not None
        if not self.agent.alive():
            raise RuntimeError(f"the agent died; see {self.agent.log}")
        p = proc_sample(self.agent.pid)
        done = self.done
        got = await self._metrics(TASKS, WATCHED)
        while got[TASKS] is None and need_tasks:
            await asyncio.sleep(1.0)
            got = await self._metrics(TASKS, WATCHED)
        tasks, watched = got[TASKS], got[WATCHED]
        # The backlog: churn events etcd has taken that the agent's watch has not yet
        # received (a relist after an etcd restart receives its changes as a listing,
        # not as events: the figure is then high until the next restart's is).
        backlog = (None if watched is None or self.watched_before is None
                   else done - (watched - self.watched_before))
        s = {"t": time.perf_counter() - self.began, "phase": self.phase, "events": done,
             "rss_mib": p["rss"] / 2**20, "rss_anon_mib": p["rss_anon"] / 2**20,
             "fds": int(p["fds"]), "threads": int(p["threads"]),
             "tasks": None if tasks is None else int(tasks), "cpu_s": p["cpu"],
             "watch_events": watched, "backlog": backlog}
        self.samples.append(s)
        return s

    async def sampling(self, *, report_every: float = 60.0) -> None:
        reported = time.perf_counter()
        while True:
            s = await self.sample()
            if time.perf_counter() - reported >= report_every:
                reported = time.perf_counter()
                print(f"  soak: {s['events']:,} events, RSS {s['rss_mib']:.1f} MiB, "
                      f"{s['fds']} fds, {s['tasks']} tasks, {s['threads']} threads",
                      file=sys.stderr)
            await asyncio.sleep(self.sizes.sample_interval)

    async def start_agent(self) -> dict[str, Any]:
        n = self.sizes.peers
        subject = self.sizes.subject
        if subject == "alloc":
            await self.store.put(IPV4.layout.config_key, json.dumps(
                IPV4.network_config() | {"Backend": {"Type": "alloc"}}).encode())
        else:
            await put_network_config(self.store)
        await put_peers(self.store, 1, n)
        ready = ReadyListener(self.world.dir / "soak-notify.sock")
        self.port = free_port()
        env = {"NOTIFY_SOCKET": str(ready.path)}
        if subject == "watch":
            self.agent = Proc([sys.executable, "-m", "bench.soakwatch", self.world.endpoint,
                               IPV4.layout.subnets_prefix, str(self.port)],
                              self.world.dir / "soakwatch.log", env={**os.environ, **env})
            self.world.procs.append(self.agent)
        else:
            self.agent = self.world.agent(extra_env=env, metrics_port=self.port,
                                          resync=self.sizes.resync,
                                          extra_args=SUBJECTS[subject])
        started = time.perf_counter()
        self.agent.start()
        try:
            await asyncio.wait_for(ready.ready, self.sizes.timeout)
        finally:
            ready.close()
        joined = time.perf_counter() - started
        counted = kernel_objects(IPV4) if self.programs else {}
        if counted and any(counted[k] != n for k in IPV4.kinds):
            raise RuntimeError(f"after READY the kernel holds {counted}, expected {n} of each")
        return {"peers": n, "start_to_ready_s": joined}

    async def apply(self, kind: str, i: int, generation: int) -> None:
        key = IPV4.key(i)
        async for attempt in retrying(cap=1.0):
            with attempt:
                if kind == REMOVED:
                    await self.store.delete(key)
                else:
                    await self.store.put(key, churn_value(i, generation))

    async def restart_etcd(self, churn: Churn) -> dict[str, Any]:
        """Stop etcd by PID, start it again on its data dir and ports; then a peer added
        and timed until its route is in the kernel."""
        etcd = self.world.etcd
        assert etcd is not None
        relists = await self._metric(RELISTS)
        t0 = time.perf_counter()
        await asyncio.to_thread(etcd.stop_member, 0)
        await asyncio.sleep(self.sizes.etcd_down)
        await asyncio.to_thread(etcd.start_member, 0)
        await asyncio.to_thread(etcd.wait_healthy, timeout=self.sizes.timeout)
        healthy = time.perf_counter()
        kind, i = churn.next(ADDED)
        await self.apply(kind, i, churn.generation[i])
        self.done += 1
        subnet = peer_subnet(i)
        while self.programs and not sh("ip", "-4", "route", "show", str(subnet), "proto",
                                       "76").strip():
            if time.perf_counter() - healthy > self.sizes.timeout:
                raise RuntimeError(f"the agent did not program {subnet} within "
                                   f"{self.sizes.timeout}s of etcd's restart")
            await asyncio.sleep(0.05)
        back = time.perf_counter()
        after = await self._metric(RELISTS)
        return {"at_event": self.done, "stopped_to_healthy_s": healthy - t0,
                "healthy_to_peer_in_kernel_s": back - healthy,
                "relists": None if relists is None or after is None else after - relists}

    async def churn(self, churn: Churn) -> dict[str, Any]:
        sizes = self.sizes
        restarts_at = {sizes.events * (k + 1) // (sizes.etcd_restarts + 1)
                       for k in range(sizes.etcd_restarts)}
        inflight: dict[asyncio.Task[None], int] = {}
        restarts: list[dict[str, Any]] = []
        kinds = {ADDED: 0, CHANGED: 0, REMOVED: 0}
        loop = asyncio.get_running_loop()

        failures: list[BaseException] = []

        def finished(task: asyncio.Task[None]) -> None:
            churn.busy.discard(inflight.pop(task))
            if task.cancelled():
                return
            if (exc := task.exception()) is not None:
                failures.append(exc)
            else:
                self.done += 1

        async def drain() -> None:
            if inflight:
                await asyncio.wait(inflight)
            if failures:
                raise RuntimeError(f"{len(failures)} churn requests failed") from failures[0]

        started = base = loop.time()
        base_k = 0
        k = 0
        waiting = 0.0  # time spent beyond the schedule waiting for a free slot
        while k < sizes.events:
            if sizes.max_seconds and loop.time() - started > sizes.max_seconds:
                break
            if k in restarts_at:
                await drain()
                restarts.append(await self.restart_etcd(churn))
                kinds[ADDED] += 1
                k += 1
                base, base_k = loop.time(), k
                continue
            delay = base + (k - base_k) / sizes.rate - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            t = loop.time()
            while len(inflight) >= sizes.concurrency:
                await asyncio.wait(inflight, return_when=asyncio.FIRST_COMPLETED)
            if failures:
                await drain()
            waiting += loop.time() - t
            kind, i = churn.next()
            kinds[kind] += 1
            churn.busy.add(i)
            task = asyncio.ensure_future(self.apply(kind, i, churn.generation.get(i, 0)))
            inflight[task] = i
            task.add_done_callback(finished)
            k += 1
        await drain()
        seconds = loop.time() - started
        return {"events": self.done, "kinds": kinds, "seconds": seconds,
                "rate": self.done / seconds, "waiting_for_a_slot_s": waiting,
                "etcd_restarts": restarts, "peers_at_end": len(churn.present)}

    async def kernel_matches(self) -> dict[str, Any]:
        """The kernel's routes, neighbours and FDB entries against those the final etcd
        peer set implies (every lease but the agent's own)."""
        own = own_index(self.world, IPV4)
        own_key = IPV4.key(own) if own is not None else None
        listing = await self.store.list_prefix(IPV4.layout.subnets_prefix)
        want: dict[str, set[tuple[str, ...]]] = {"route": set(), "neighbour": set(), "fdb": set()}
        for kv in listing.items:
            if kv.key == own_key:
                continue
            subnet = IPV4.layout.parse_lease_key(kv.key).ipv4
            value = decode_lease_value(kv.value)
            mac = value.vtep_mac
            assert mac is not None
            want["route"].add((str(subnet),))
            want["neighbour"].add((str(subnet.network_address), mac))
            want["fdb"].add((mac, str(value.public_ip)))
        have = kernel_sets()
        return {"peers": len(listing.items) - (own_key is not None),
                "objects": {k: len(v) for k, v in have.items()},
                "missing": {k: len(want[k] - have[k]) for k in want},
                "extra": {k: len(have[k] - want[k]) for k in want},
                "equal": want == have}

    async def settle(self, baseline: dict[str, Any]) -> dict[str, Any]:
        """After the churn: until the kernel matches etcd, then a full resync, then until
        fds and tasks are back at the baseline (or `settle` s have passed)."""
        self.phase = "settle"
        t0 = time.perf_counter()
        while self.programs and not (match := await self.kernel_matches())["equal"]:
            if time.perf_counter() - t0 > self.sizes.timeout:
                break
            await asyncio.sleep(0.5)
        matched = time.perf_counter() - t0
        assert self.agent is not None
        await self.resync_passed()
        deadline = time.perf_counter() + self.sizes.settle
        while True:
            end = await self.sample()
            back = {k: end[k] is not None and end[k] <= baseline[k] for k in ("fds", "tasks")}
            if all(back.values()) or time.perf_counter() > deadline:
                break
            await asyncio.sleep(min(1.0, self.sizes.sample_interval))
        kernel = (None if not self.programs
                  else await self.kernel_matches() if match["equal"] else match)
        return {"kernel_matched_after_s": matched, "end": end, "returned": back,
                "kernel": kernel}


def kernel_sets() -> dict[str, set[tuple[str, ...]]]:
    """iproute2's listing of the agent's objects as (subnet), (gateway, MAC), (MAC, dst)."""
    lines = kernel_listing(IPV4)

    def after(words: list[str], word: str) -> str:
        return words[words.index(word) + 1] if word in words else "?"

    out: dict[str, set[tuple[str, ...]]] = {}
    out["route"] = {(line.split()[0],) for line in lines["route"]}
    out["neighbour"] = {(w[0], after(w, "lladdr")) for w in map(str.split, lines["neighbour"])}
    out["fdb"] = {(w[0], after(w, "dst")) for w in map(str.split, lines["fdb"])}
    return out


# -- the figures ---------------------------------------------------------------------------


def t_quantile(df: float, p: float = 0.975) -> float:
    """Student's t quantile (Cornish-Fisher expansion around the normal one: within 1 %
    of the table from 3 degrees of freedom on)."""
    z = statistics.NormalDist().inv_cdf(p)
    if df <= 0:
        return float("nan")
    return (z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)
            + (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / (384 * df ** 3))


def fit(xs: list[float], ys: list[float]) -> dict[str, float]:
    """Least squares y = a + b x: the slope b, its standard error and 95 % confidence
    interval, and the residuals' standard deviation and spread (max - min): the noise a
    slope is judged against.

    RSS samples are not independent (memory held a while is held in the next sample
    too): the residuals' lag-1 autocorrelation r widens the standard error by
    sqrt((1 + r) / (1 - r)) and shrinks the samples to an effective n (1 - r) / (1 + r),
    whose degrees of freedom give the t quantile (the usual AR(1) correction)."""
    slope, intercept = statistics.linear_regression(xs, ys)
    residuals = [y - (intercept + slope * x) for x, y in zip(xs, ys, strict=True)]
    n = len(xs)
    sd = math.sqrt(sum(r * r for r in residuals) / (n - 2)) if n > 2 else float("nan")
    sxx = sum((x - statistics.fmean(xs)) ** 2 for x in xs)
    se = sd / math.sqrt(sxx) if sxx else float("nan")
    ss = sum(r * r for r in residuals)
    r1 = (sum(a * b for a, b in itertools.pairwise(residuals)) / ss
          if ss and n > 3 else 0.0)
    r1 = min(max(r1, 0.0), 0.99)  # a negative one would narrow the interval: not taken
    widen = math.sqrt((1 + r1) / (1 - r1))
    effective = n * (1 - r1) / (1 + r1)
    half = t_quantile(effective - 2) * se * widen
    return {"slope": slope, "intercept": intercept, "slope_se": se,
            "slope_ci95": half, "residual_lag1_autocorrelation": r1,
            "effective_samples": effective, "residual_sd": sd,
            "residual_spread": max(residuals) - min(residuals), "samples": n}


def rss_trend(samples: list[dict[str, Any]], warmup: int) -> dict[str, Any]:
    """RSS over the churn after `warmup` events: its slope per 10,000 events and per
    hour, and whether the growth it predicts over the window stays within twice the
    residuals' standard deviation ("flat within noise")."""
    window = [s for s in samples if s["phase"] == "churn" and s["events"] >= warmup]
    if len(window) < 3:
        return {"samples": len(window), "flat": None}
    rss = [s["rss_mib"] for s in window]
    backlog = [s["backlog"] for s in window if s.get("backlog") is not None]
    by_events = fit([s["events"] / 10_000 for s in window], rss)
    by_time = fit([s["t"] / 3600 for s in window], rss)
    span = (window[-1]["events"] - window[0]["events"]) / 10_000
    growth = by_events["slope"] * span
    noise = by_events["residual_sd"]
    quarter = max(1, len(window) // 4)
    # A leak keeps its slope; memory climbing to a plateau (a new peak the allocator
    # keeps) does not: the slope of each half of the window, apart.
    middle = (window[0]["events"] + window[-1]["events"]) / 2
    halves = [[s for s in window if s["events"] < middle], [s for s in window
                                                            if s["events"] >= middle]]
    half_slopes = [fit([s["events"] / 10_000 for s in h], [s["rss_mib"] for s in h])["slope"]
                   if len(h) >= 3 else None for h in halves]
    return {
        "samples": len(window), "from_events": window[0]["events"],
        "to_events": window[-1]["events"], "hours": (window[-1]["t"] - window[0]["t"]) / 3600,
        "mib_per_10k_events": by_events["slope"], "mib_per_10k_events_se": by_events["slope_se"],
        "mib_per_10k_events_ci95": by_events["slope_ci95"],
        "effective_samples": by_events["effective_samples"],
        "residual_lag1_autocorrelation": by_events["residual_lag1_autocorrelation"],
        "mib_per_hour": by_time["slope"], "mib_per_hour_se": by_time["slope_se"],
        "growth_over_window_mib": growth, "residual_sd_mib": noise,
        "residual_spread_mib": by_events["residual_spread"],
        "rss_min_mib": min(rss), "rss_max_mib": max(rss),
        "first_half_mib_per_10k_events": half_slopes[0],
        "second_half_mib_per_10k_events": half_slopes[1],
        "first_quarter_mean_mib": statistics.fmean(rss[:quarter]),
        "last_quarter_mean_mib": statistics.fmean(rss[-quarter:]),
        # The smallest slope this window could tell from its noise.
        "detectable_mib_per_10k_events": 2 * noise / span if span else None,
        "flat": abs(growth) <= 2 * noise,
        # Whether the agent kept up: its CPU over the window (of one core) and the churn
        # events it had not received yet, at the samples (a backlog is a peak of live
        # objects pymalloc keeps its arenas for).
        "agent_cpu_share": ((window[-1]["cpu_s"] - window[0]["cpu_s"])
                            / (window[-1]["t"] - window[0]["t"])
                            if window[-1]["t"] > window[0]["t"] else None),
        "backlog_median": statistics.median(backlog) if backlog else None,
        "backlog_max": max(backlog) if backlog else None,
    }


async def run(args: argparse.Namespace, world: World) -> dict[str, Any]:
    sizes = Sizes(peers=args.peers, events=args.events, pool=args.pool, rate=args.rate,
                  concurrency=args.concurrency, etcd_restarts=args.etcd_restarts,
                  etcd_down=args.etcd_down, resync=args.resync,
                  sample_interval=args.sample_interval,
                  warmup_events=args.warmup_events if args.warmup_events >= 0
                  else args.events // 10,
                  settle=args.settle, timeout=args.timeout, seed=args.seed,
                  max_seconds=args.max_seconds, subject=args.subject)
    results: dict[str, Any] = {"machine": machine(), "parameters": vars(args).copy(),
                               "sizes": vars(sizes).copy(),
                               "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    world.start_etcd()
    store = await EtcdStore.connect(EtcdSettings(endpoints=world.endpoint, timeout=30))
    soak = Soak(world, store, sizes)
    sampler: asyncio.Task[None] | None = None
    try:
        results["join"] = await soak.start_agent()
        print(f"  soak: agent ready with {sizes.peers} peers in "
              f"{results['join']['start_to_ready_s']:.2f}s", file=sys.stderr)
        assert soak.agent is not None
        await soak.resync_passed()
        soak.phase = "baseline"
        baseline = await soak.sample(need_tasks=True)
        reconciles = await soak._metric(RECONCILES)
        soak.watched_before = baseline["watch_events"]
        soak.phase = "churn"
        sampler = asyncio.ensure_future(_guarded(soak.sampling()))
        churn = Churn(present=sizes.peers, pool=sizes.pool,
                      skip=own_index(world, IPV4), seed=sizes.seed)
        results["churn"] = await soak.churn(churn)
        if sampler.done():
            sampler.result()  # it failed: the agent died, or its /proc could not be read
        resyncs = await soak._metric(RECONCILES)
        results["churn"]["full_resyncs"] = (None if resyncs is None or reconciles is None
                                            else resyncs - reconciles)
        print(f"  soak: {results['churn']['events']} events in "
              f"{results['churn']['seconds']:.0f}s", file=sys.stderr)
        sampler.cancel()
        await asyncio.gather(sampler, return_exceptions=True)
        sampler = None
        settled = await soak.settle(baseline)
        results["baseline"] = baseline
        results |= settled
        results["rss"] = rss_trend(soak.samples, sizes.warmup_events)
        results["scrape_failures"] = soak.scrape_failures
        results["samples"] = soak.samples
    except BaseException:
        if soak.agent is not None and soak.agent.log.exists():
            tail = soak.agent.log.read_text().splitlines()[-20:]
            print("soak: the agent's log ends with:\n  " + "\n  ".join(tail), file=sys.stderr)
        raise
    finally:
        if sampler is not None:
            sampler.cancel()
            await asyncio.gather(sampler, return_exceptions=True)
        await store.close()
        if args.agent_log is not None and soak.agent is not None and soak.agent.log.exists():
            shutil.copyfile(soak.agent.log, args.agent_log)
    return results


async def _guarded(coro: Awaitable[None]) -> None:
    """The sampler: a failure (the agent died) is printed at once, not at the end."""
    try:
        await coro
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        print(f"soak: sampling failed: {exc}", file=sys.stderr)
        raise


def table(results: dict[str, Any]) -> str:
    b, e, r, c = results["baseline"], results["end"], results["rss"], results["churn"]
    k = results["kernel"]
    rows: list[tuple[str, str, str, str]] = []
    flat = {True: "flat within noise", False: "GROWS", None: "-"}[r.get("flat")]
    if r.get("samples", 0) >= 3:
        rows.append((f"RSS slope after {r['from_events']:,} events ({r['samples']} samples)",
                     f"{r['mib_per_10k_events']:+.4f} +- {r['mib_per_10k_events_ci95']:.4f}"
                     " MiB / 10k events (95 % CI)",
                     f"1 se {r['mib_per_10k_events_se']:.4f}; residuals' lag-1 autocorrelation "
                     f"{r['residual_lag1_autocorrelation']:.2f}, effective samples "
                     f"{r['effective_samples']:.0f}", flat))
        rows.append(("RSS slope per hour", f"{r['mib_per_hour']:+.2f} MiB/h",
                     f"+-{r['mib_per_hour_se']:.2f} (1 se)", f"over {r['hours'] * 60:.1f} min"))
        rows.append(("RSS growth the fit predicts over the window",
                     _fmt(r["growth_over_window_mib"], " MiB"),
                     f"noise: residual sd {_fmt(r['residual_sd_mib'], ' MiB')}, "
                     f"spread {_fmt(r['residual_spread_mib'], ' MiB')}",
                     f"detectable {_fmt(r['detectable_mib_per_10k_events'])} MiB/10k"))
        rows.append(("RSS slope, first / second half of the window",
                     f"{_fmt(r['first_half_mib_per_10k_events'])} / "
                     f"{_fmt(r['second_half_mib_per_10k_events'])} MiB / 10k events",
                     "a leak keeps its slope", "-"))
        rows.append(("agent kept up? CPU of a core; backlog median / max",
                     f"{_fmt(r['agent_cpu_share'])}; {_fmt(r['backlog_median'])} / "
                     f"{_fmt(r['backlog_max'])} events",
                     "backlog: churn events not yet received by its watch", "-"))
        rows.append(("RSS in the window: min / max",
                     f"{_fmt(r['rss_min_mib'])} / {_fmt(r['rss_max_mib'], ' MiB')}",
                     f"quarters {_fmt(r['first_quarter_mean_mib'])} -> "
                     f"{_fmt(r['last_quarter_mean_mib'])}", "-"))
    rows.append(("RSS baseline -> end", f"{_fmt(b['rss_mib'])} -> {_fmt(e['rss_mib'], ' MiB')}",
                 "-", "-"))
    for name in ("fds", "tasks", "threads"):
        back = results["returned"].get(name)
        rows.append((f"{name}: baseline -> end", f"{b[name]} -> {e[name]}", "-",
                     "-" if back is None else "back at baseline" if back else "NOT back"))
    events = ", ".join(f"{v:,} {kind}" for kind, v in c["kinds"].items())
    rows.append(("churn", f"{c['events']:,} events in {c['seconds']:.0f} s",
                 f"{_fmt(c['rate'], '/s')} (restarts included); {events}",
                 f"{_fmt(c['full_resyncs'])} full resyncs"))
    for x in c["etcd_restarts"]:
        rows.append((f"etcd restart at event {x['at_event']:,}",
                     f"agent back in {_fmt(x['healthy_to_peer_in_kernel_s'], ' s')}",
                     f"etcd down->healthy {_fmt(x['stopped_to_healthy_s'], ' s')}",
                     f"{_fmt(x['relists'])} relists"))
    kinds = ("route", "neighbour", "fdb")
    if k is None:
        subject = results["sizes"]["subject"]
        rows.append(("kernel vs final etcd set", "-", f"not checked: --subject {subject}", "-"))
        return render_table(("figure", "value", "beside", ""), rows, results["machine"])
    rows.append((f"kernel vs final etcd set ({k['peers']} peers): {'/'.join(kinds)}",
                 "/".join(str(k["objects"][x]) for x in kinds),
                 "missing " + "/".join(str(k["missing"][x]) for x in kinds)
                 + ", extra " + "/".join(str(k["extra"][x]) for x in kinds),
                 "equal" if k["equal"] and all(k["objects"][x] == k["peers"] for x in kinds)
                 else "DIFFERENT"))
    return render_table(("figure", "value", "beside", ""), rows, results["machine"])


def parse(argv: list[str]) -> argparse.Namespace:
    d = Sizes()
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[1])
    p.add_argument("--peers", type=int, default=d.peers, help="peers put before the churn")
    p.add_argument("--events", type=int, default=d.events, help="churn events in all")
    p.add_argument("--pool", type=int, default=d.pool,
                   help=f"peer numbers the churn cycles through (at most {MAX_POOL:,})")
    p.add_argument("--rate", type=float, default=d.rate, help="churn events per second")
    p.add_argument("--concurrency", type=int, default=d.concurrency,
                   help="etcd requests in flight at most")
    p.add_argument("--etcd-restarts", type=int, default=d.etcd_restarts,
                   help="etcd restarts spread over the churn")
    p.add_argument("--etcd-down", type=float, default=d.etcd_down,
                   help="seconds etcd stays stopped at each restart")
    p.add_argument("--resync", type=float, default=d.resync,
                   help="the agent's --resync-interval (full data-plane resyncs)")
    p.add_argument("--sample-interval", type=float, default=d.sample_interval,
                   help="seconds between samples of RSS, fds, threads, tasks")
    p.add_argument("--warmup-events", type=int, default=-1,
                   help="churn events before the RSS slope is fitted (default: a tenth)")
    p.add_argument("--settle", type=float, default=d.settle,
                   help="seconds the end may take to come back to the baseline counts")
    p.add_argument("--timeout", type=float, default=d.timeout,
                   help="seconds the join, the agent's return after a restart or the "
                        "kernel's convergence may take")
    p.add_argument("--max-seconds", type=float, default=d.max_seconds,
                   help="end the churn after this many seconds even if fewer than --events "
                        "were made (0: no limit); the figures say how many were")
    p.add_argument("--seed", type=int, default=d.seed, help="the churn's random seed")
    p.add_argument("--json", type=Path, default=Path("soak-results.json"), help="output file")
    p.add_argument("--subject", choices=SUBJECTS, default=d.subject,
                   help="what the churn is measured on: the agent (vxlan), the agent without "
                        "traffic rules (no-rules), with the alloc backend (no data plane), or "
                        "a bare watch of the prefix (bench/soakwatch.py)")
    p.add_argument("--agent-log", type=Path, help="keep a copy of the agent's log here")
    args = p.parse_args(argv)
    if not args.peers + 100 <= args.pool <= MAX_POOL:
        p.error(f"--pool must be between --peers + 100 and {MAX_POOL}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    if not as_bench_process("soak"):
        return 2
    results = in_world("soak", lambda world: run(args, world))
    args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(table(results))
    print(f"\nJSON: {args.json}")
    return 0 if results["kernel"] is None or results["kernel"]["equal"] else 1


if __name__ == "__main__":
    sys.exit(main())
