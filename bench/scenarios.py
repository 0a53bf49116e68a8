"""The measurements, each taken side by side with its reference in one run.

Every function returns a plain dict (JSON-ready). Timings use
time.perf_counter(); kernel arrival times come from the KernelProbe's
rtnetlink broadcasts, so they are when the kernel had the object, not when
the agent thought it was done. Join, events and shrink take a `Stack`: the
IPv4 run (3 objects a peer) or the dual-stack one (6: both families' neighbour,
FDB entry and route).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import replace
from functools import partial
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from pathlib import Path
from typing import Any

from bench.env import (
    HOST_IP,
    HOST_IP6,
    IPV4,
    NETWORK,
    ROUTE_PROTOCOL,
    UNDERLAY,
    KernelProbe,
    Proc,
    Stack,
    World,
    children_cpu_seconds,
    cpu_seconds,
    free_port,
    ipv4_sized,
    kernel_listing,
    kernel_objects,
    own_index,
    peer_ip,
    peer_ip6,
    peer_mac,
    peer_subnet,
    peer_subnet6,
    proc_sample,
    sh,
)
from leaseagent.agent.leasing import CANDIDATES_PER_TXN, Leasing
from leaseagent.core.allocation import candidates, free_subnets
from leaseagent.core.leases import KeyLayout, LeaseValue
from leaseagent.core.network import NetworkConfig, network_config_from_dict
from leaseagent.metrics import Metrics
from leaseagent.store.base import EventType
from leaseagent.store.etcd import EtcdSettings, EtcdStore

# -- etcd contents ---------------------------------------------------------------


async def put_network_config(store: EtcdStore, stack: Stack = IPV4) -> None:
    await store.put(stack.layout.config_key, json.dumps(stack.network_config()).encode())


async def _bounded(coros: Iterator[Any], width: int = 200) -> None:
    pending: set[asyncio.Future[Any]] = set()
    for coro in coros:
        pending.add(asyncio.ensure_future(coro))
        if len(pending) >= width:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for d in done:
                d.result()
    if pending:
        for d in await asyncio.gather(*pending):
            del d


async def put_peers(store: EtcdStore, first: int, last: int, stack: Stack = IPV4) -> None:
    await _bounded(store.put(stack.key(i), stack.value(i)) for i in range(first, last + 1))


async def delete_peers(store: EtcdStore, first: int, last: int, stack: Stack = IPV4) -> None:
    await _bounded(store.delete(stack.key(i)) for i in range(first, last + 1))


# -- 1. join at scale --------------------------------------------------------------


async def run_reference(commands: Sequence[Sequence[str]], ns: str,
                        done: Callable[[dict[str, int]], bool], *, limit: float,
                        present: Iterable[tuple[str, object]] = ()
                        ) -> tuple[float, float, float]:
    """Run iproute2's `commands` in the reference namespace `ns`, timed as the agent is:
    from the first command's start until a probe in `ns` (KernelProbe, `present`: what
    the namespace holds already) stamps the notification that meets `done`. The agent's
    end is that stamp too: a probe that lags behind a burst (its reader waiting for a
    core) delays both alike, and the kernel tells a listener in both namespaces. Also
    the commands' CPU (kernel time included) and their own wall time, until the last
    one exited. (seconds, CPU seconds, the commands' seconds)"""
    probe = KernelProbe(netns=ns)
    probe.holding(present)
    probe.start()
    try:
        met = probe.wait_counts(done)
        started, cpu = time.perf_counter(), children_cpu_seconds()
        for argv in commands:
            sh(*argv)  # the loop waits; the probe's reader stamps meanwhile
        exited, cpu = time.perf_counter(), children_cpu_seconds() - cpu
        at = await asyncio.wait_for(met, limit)
    finally:
        await probe.stop()
    return at - started, cpu, exited - started


async def reference_batch(world: World, n: int, *, own: int, stack: Stack = IPV4,
                          limit: float = 60.0) -> dict[str, Any]:
    """iproute2 programming the same objects as the agent (3n, dual-stack 6n) into a
    fresh reference namespace with the same vxlan device(s), timed by `run_reference`;
    `own` is the number of the subnet the devices get their address from. The objects
    are counted after."""
    ns = world.reference_ns(stack)
    # Per family: suffix, device, local address, MTU overhead, a peer's subnet,
    # VtepMAC, PublicIP and the route's metric (an IPv6 route's is 1024 always).
    families: list[tuple[str, str, IPv4Address | IPv6Address, int,
                         Callable[[int], IPv4Network | IPv6Network], Callable[[int], str],
                         Callable[[int], IPv4Address | IPv6Address], str]] = [
        ("", "flannel.1", HOST_IP, 50, peer_subnet, peer_mac, peer_ip, "")]
    if stack.dual:
        families.append(("6", "flannel-v6.1", HOST_IP6, 70, peer_subnet6,
                         partial(peer_mac, ipv6=True), peer_ip6, " metric 1024"))
    batches: dict[str, list[str]] = {"neigh": [], "neigh6": [], "fdb": [], "route": [],
                                     "route6": []}
    for six, dev, local, overhead, subnet_of, mac_of, ip_of, metric in families:
        own_subnet = subnet_of(own)
        sh("ip", "-n", ns, "link", "add", dev, "mtu", str(1500 - overhead), "type", "vxlan",
           "id", "1", "local", str(local), "dev", "eth0", "dstport", "8472", "nolearning")
        sh("ip", "-n", ns, "addr", "add",
           f"{own_subnet.network_address}/{own_subnet.max_prefixlen}", "dev", dev,
           *(["nodad"] if six else []))
        sh("ip", "-n", ns, "link", "set", dev, "up")
        for i in range(1, n + 1):
            sub, mac = subnet_of(i), mac_of(i)
            gw = sub.network_address
            batches["neigh" + six].append(
                f"neigh replace {gw} lladdr {mac} dev {dev} nud permanent\n")
            batches["fdb"].append(f"fdb append {mac} dev {dev} dst {ip_of(i)} self permanent\n")
            batches["route" + six].append(
                f"route replace {sub} via {gw} dev {dev} onlink proto 76{metric}\n")
    commands = []
    for name, lines in batches.items():
        if not lines:
            continue
        path = world.dir / f"ref-{stack.agent_name}-{name}.batch"
        path.write_text("".join(lines))
        program = ["bridge"] if name == "fdb" else ["ip", "-6"] if name.endswith("6") else ["ip"]
        commands.append([program[0], "-n", ns, *program[1:], "-batch", str(path)])
    elapsed, cpu, exited = await run_reference(commands, ns, stack.at_least(n), limit=limit)
    counted = kernel_objects(stack, ns)
    if any(counted[k] != n for k in stack.kinds):
        raise RuntimeError(f"reference: {counted} after ip -batch, expected {n} of each")
    objects = stack.per_peer * n
    return {"objects": sum(counted.values()), "kernel_objects": counted, "seconds": elapsed,
            "commands_s": exited,
            "cpu_s": cpu, "rate": objects / elapsed, "commands": len(commands), "namespace": ns}


def differences(stack: Stack, ns: str) -> dict[str, int]:
    """Per kind, how many of iproute2's lines differ between this namespace and `ns`
    (in one and not the other): 0 when the agent made exactly the reference's objects."""
    ours, theirs = kernel_listing(stack), kernel_listing(stack, ns)
    return {k: len(set(ours[k]) ^ set(theirs[k])) for k in stack.kinds}


class ReadyListener:
    """A NOTIFY_SOCKET for the agent: timestamps READY=1."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
        self._sock.bind(str(path))
        self.ready: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().add_reader(self._sock.fileno(), self._read)

    def _read(self) -> None:
        try:
            data = self._sock.recv(4096)
        except BlockingIOError:
            return
        if b"READY=1" in data and not self.ready.done():
            self.ready.set_result(time.perf_counter())

    def close(self) -> None:
        asyncio.get_running_loop().remove_reader(self._sock.fileno())
        self._sock.close()


def agent_metric(port: int, name: str, *, summed: bool = False) -> float | None:
    """The agent's metric `name` (its first series; with `summed`, all its series added:
    a labelled counter's total)."""
    return agent_metrics(port, (name,), summed=summed)[name]


def agent_metrics(port: int, names: Sequence[str], *, summed: bool = False
                  ) -> dict[str, float | None]:
    """Several of the agent's metrics from one scrape (as agent_metric; None: absent)."""
    out: dict[str, float | None] = dict.fromkeys(names)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        for line in r.read().decode().splitlines():
            name = line.split("{", 1)[0].split(" ", 1)[0]
            if name in out and (summed or out[name] is None):
                out[name] = (out[name] or 0.0) + float(line.rsplit(" ", 1)[1])
    return out


async def join(world: World, probe: KernelProbe, n: int, *, limit: float, stack: Stack = IPV4,
               resync: float = 30.0, extra_args: Sequence[str] = ()
               ) -> tuple[dict[str, Any], Proc, int, dict[str, float]]:
    """Start the agent of `stack` into n peers; time objects in place and READY."""
    reference = await reference_batch(world, n, own=n + 1, stack=stack, limit=limit)
    ready = ReadyListener(world.dir / f"{stack.agent_name}-notify.sock")
    metrics_port = free_port()
    agent = world.agent(extra_env={"NOTIFY_SOCKET": str(ready.path)}, metrics_port=metrics_port,
                        stack=stack, resync=resync, extra_args=extra_args)
    before = world.etcd_metrics()
    all_in = probe.wait_counts(stack.at_least(n))
    started = time.perf_counter()
    agent.start()
    cpu_at_device: dict[str, float] = {}

    def device_made(name: str) -> None:
        if name in stack.devices:
            cpu_at_device.setdefault(name, cpu_seconds(agent.pid))

    probe.on_device = device_made
    probe.track_cpu(partial(cpu_seconds, agent.pid))
    try:
        in_place = await asyncio.wait_for(asyncio.shield(all_in), limit)
        cpu_in_place = probe.cpu_at_burst_end()
        ready_at = await asyncio.wait_for(asyncio.shield(ready.ready), limit)
    except TimeoutError:
        kernel = kernel_objects(stack)
        tail = "".join(agent.log.read_text().splitlines(keepends=True)[-15:])
        raise RuntimeError(f"agent did not program {n} peers within {limit}s "
                           f"(probe saw {probe.counts}, kernel has {kernel}); agent log:\n"
                           f"{tail}") from None
    finally:
        ready.close()
        probe.on_device = None
        probe.track_cpu(None)
    after_ready = world.etcd_metrics()
    rss = proc_sample(agent.pid)["rss"]
    assert probe.first_at is not None
    programming = in_place - probe.first_at
    # From the first vxlan device's creation: the listing, its judging, planning and
    # the traffic rules count too (the agent makes its device before its lease).
    device_at, first_device = min((probe.device_at[d], d) for d in stack.devices
                                  if d in probe.device_at)
    from_device = in_place - device_at
    objects = stack.per_peer * n
    result = {
        "peers": n,
        "objects": objects,
        "kernel_objects": kernel_objects(stack),  # iproute2's count, after the timing
        # Lines of iproute2's listings that differ from the reference namespace's.
        "differences_from_reference": differences(stack, reference["namespace"]),
        "start_to_objects_s": in_place - started,
        "start_to_ready_s": ready_at - started,
        "start_to_first_object_s": probe.first_at - started,
        "programming_s": programming,
        # A small join may arrive in one read of the probe (first == last): no rate.
        "agent_rate": objects / programming if programming > 0 else float("nan"),
        "reference": reference,
        "rate_ratio": (objects / programming / reference["rate"] if programming > 0
                       else float("nan")),
        "start_to_objects_vs_reference": (in_place - started) / reference["seconds"],
        "start_to_device_s": device_at - started,
        "device_to_objects_s": from_device,
        "device_to_first_object_s": probe.first_at - device_at,
        # The rate counted from the device's creation, as a share of the reference's.
        "device_rate_ratio": reference["seconds"] / from_device,
        # The agent's CPU (user and kernel) from the device's creation (as the probe saw
        # it) to all objects, and the reference's as a share of it.
        "device_to_objects_cpu_s": (cpu_in_place - cpu_at_device[first_device]
                                    if first_device in cpu_at_device else None),
        "rss_at_ready_mib": rss / 2**20,
    }
    start_cost = _etcd_delta(before, after_ready)
    return result, agent, metrics_port, start_cost


RECONCILES = "leaseagent_reconcile_duration_seconds_count"


async def after_resync(agent: Proc, metrics_port: int, *, limit: float) -> dict[str, float]:
    """Wait for the agent's next full resync pass to end; its memory then (what a pass's
    table dumps and plans leave behind: the peak glibc keeps counts)."""
    before = agent_metric(metrics_port, RECONCILES) or 0.0
    deadline = time.perf_counter() + limit
    while (agent_metric(metrics_port, RECONCILES) or 0.0) <= before:
        if time.perf_counter() > deadline:
            raise RuntimeError(f"no full resync within {limit}s")
        await asyncio.sleep(0.2)
    await asyncio.sleep(0.2)
    return proc_sample(agent.pid)


async def join_sizes(world: World, store: EtcdStore, sizes: Sequence[int], *, limit: float,
                     resync: float = 3.0) -> dict[int, dict[str, Any]]:
    """The IPv4 join again with each of `sizes` peers (ascending, below the main run's),
    each beside its own reference: from the device's creation to all objects, and the
    agent's memory after the join and after its first periodic full resync (every
    `resync` s here). Each size has its own agent (its lease released when it stops,
    so the next agent starts as the first did), probe and reference namespace; its
    device is deleted after (and every object on it). The leases stay for the next."""
    out: dict[int, dict[str, Any]] = {}
    have = 0
    for n in sizes:
        await put_peers(store, have + 1, n)
        have = n
        probe = KernelProbe()
        probe.start()
        agent: Proc | None = None
        try:
            result, agent, port, _ = await join(world, probe, n, limit=limit,
                                                stack=ipv4_sized(n), resync=resync,
                                                extra_args=["--release-on-exit"])
            await asyncio.sleep(0.5)
            joined = proc_sample(agent.pid)
            resynced = await after_resync(agent, port, limit=limit)
            result |= {"rss_after_join_mib": joined["rss"] / 2**20,
                       "rss_anon_after_join_mib": joined["rss_anon"] / 2**20,
                       "rss_after_resync_mib": resynced["rss"] / 2**20,
                       "rss_anon_after_resync_mib": resynced["rss_anon"] / 2**20,
                       "resync_interval_s": resync}
            out[n] = result
            print(f"  join {n}: {result['device_to_objects_s']:.3f}s from device to all "
                  f"objects (ip -batch {result['reference']['seconds']:.3f}s), RSS "
                  f"{result['rss_after_join_mib']:.1f} / {result['rss_after_resync_mib']:.1f}"
                  f" MiB", file=sys.stderr)
        finally:
            if agent is not None:
                agent.stop()
            await probe.stop()
            sh("ip", "link", "del", "flannel.1", check=False)
    return out


def _etcd_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: after.get(k, 0.0) - before.get(k, 0.0) for k in set(before) | set(after)
            if after.get(k, 0.0) != before.get(k, 0.0)}


# -- 2. event latency ---------------------------------------------------------------


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


async def events(store: EtcdStore, probe: KernelProbe, *, count: int, first: int,
                 present: int, limit: float = 5.0, stack: Stack = IPV4,
                 skip: int | None = None) -> dict[str, Any]:
    """`count` events (put, delete, put, ...) of fresh peers numbered from `first`
    (but not `skip`, the agent's own subnet); agent latency = put sent -> last of its
    3 (dual-stack: 6) objects in (or out of) the kernel; reference = put sent -> the
    same event reaching a bare etcd watcher here."""
    numbers = [i for i in itertools.islice(itertools.count(first), count // 2 + 3) if i != skip]
    subnets = stack.layout.subnets_prefix
    listing = await store.list_prefix(subnets)
    seen: dict[tuple[str, EventType], float] = {}
    arrived = asyncio.Event()

    async def watch() -> None:
        async for batch in store.watch(subnets, start_revision=listing.revision + 1):
            now = time.perf_counter()
            for ev in batch:
                seen[(ev.key, ev.type)] = now
            arrived.set()

    watcher = asyncio.create_task(watch())
    agent_ms: list[float] = []
    ref_ms: list[float] = []
    by_type: dict[EventType, list[float]] = {EventType.PUT: [], EventType.DELETE: []}
    failures = 0
    try:
        # Two unrecorded warm-up events first: the reference watch stream's
        # first event would otherwise carry its set-up.
        for j in range(count + 2):
            i = numbers[j // 2]
            deleted = j % 2 == 1
            key = stack.key(i)
            futs = [probe.wait_object(kind, deleted, ident) for kind, ident in stack.objects(i)]
            etype = EventType.DELETE if deleted else EventType.PUT
            t0 = time.perf_counter()
            if deleted:
                await store.delete(key)
            else:
                await store.put(key, stack.value(i))
            try:
                done = await asyncio.wait_for(asyncio.gather(*futs), limit)
            except TimeoutError:
                failures += j >= 2
                continue
            if j >= 2:
                agent_ms.append((max(done) - t0) * 1000)
                by_type[etype].append(agent_ms[-1])
            deadline = time.perf_counter() + limit
            while (key, etype) not in seen and time.perf_counter() < deadline:
                arrived.clear()
                try:
                    await asyncio.wait_for(arrived.wait(), 1.0)
                except TimeoutError:
                    pass
            if (key, etype) in seen and j >= 2:
                ref_ms.append((seen[(key, etype)] - t0) * 1000)
    finally:
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
    p50, p99 = _percentile(agent_ms, 50), _percentile(agent_ms, 99)
    r50, r99 = _percentile(ref_ms, 50), _percentile(ref_ms, 99)
    return {
        "peers_present": present, "events": count, "timeouts": failures,
        "p50_ms": p50, "p99_ms": p99, "max_ms": max(agent_ms, default=float("nan")),
        # Puts (a peer admitted to the traffic rules, then its objects) and deletes apart.
        **{f"{t.value.lower()}_{q}_ms": _percentile(v, int(q[1:]))
           for t, v in by_type.items() for q in ("p50", "p99")},
        "reference_p50_ms": r50, "reference_p99_ms": r99,
        "p50_ratio": p50 / r50 if r50 else float("nan"),
        "p99_ratio": p99 / r99 if r99 else float("nan"),
    }


async def _last_deletion(store: EtcdStore, keys: set[str], prefix: str, revision: int) -> float:
    """When a bare watch of `prefix` from `revision` has seen every key of `keys` deleted."""
    left = set(keys)
    async for batch in store.watch(prefix, start_revision=revision):
        now = time.perf_counter()
        left.difference_update(ev.key for ev in batch if ev.type is EventType.DELETE)
        if not left:
            return now
    raise RuntimeError("the watch ended")


async def reference_delete(stack: Stack, ns: str, first: int, last: int, *,
                           limit: float = 60.0) -> dict[str, Any]:
    """iproute2 removing peers first..last's objects from the reference namespace `ns`
    (programmed by `reference_batch`), as the agent removes them: routes, then
    neighbours, then FDB entries, each kind one batch; timed by `run_reference`."""
    commands = _delete_batches(stack, ns, first, last)
    try:
        elapsed, cpu, exited = await run_reference(
            [argv for argv, _ in commands], ns, stack.at_most(0), limit=limit,
            present=[o for i in range(first, last + 1) for o in stack.objects(i)])
    finally:
        for _, path in commands:
            path.unlink()
    left = kernel_objects(stack, ns)
    if any(left[k] != first - 1 for k in stack.kinds):
        raise RuntimeError(f"reference: {left} left after ip -batch del, expected {first - 1}")
    objects = stack.per_peer * (last - first + 1)
    return {"objects": objects, "seconds": elapsed, "commands_s": exited, "cpu_s": cpu,
            "rate": objects / elapsed}


def _delete_batches(stack: Stack, ns: str, first: int, last: int
                    ) -> list[tuple[list[str], Path]]:
    """`reference_delete`'s commands, each with its batch file (written here)."""
    families: list[tuple[str, str, Callable[[int], IPv4Network | IPv6Network],
                         Callable[[int], str], Callable[[int], IPv4Address | IPv6Address]]] = [
        ("", "flannel.1", peer_subnet, peer_mac, peer_ip)]
    if stack.dual:
        families.append(("6", "flannel-v6.1", peer_subnet6, partial(peer_mac, ipv6=True),
                         peer_ip6))
    lines: dict[str, list[str]] = {"route": [], "route6": [], "neigh": [], "neigh6": [],
                                   "fdb": []}
    for six, dev, subnet_of, mac_of, ip_of in families:
        for i in range(first, last + 1):
            sub = subnet_of(i)
            lines["route" + six].append(f"route del {sub} proto {ROUTE_PROTOCOL}\n")
            lines["neigh" + six].append(f"neigh del {sub.network_address} dev {dev}\n")
            lines["fdb"].append(f"fdb del {mac_of(i)} dev {dev} dst {ip_of(i)} self\n")
    commands: list[tuple[list[str], Path]] = []
    for name, batch in lines.items():
        if batch:
            path = Path(tempfile.mkstemp(prefix=f"ref-del-{name}-", suffix=".batch")[1])
            path.write_text("".join(batch))
            program = ["bridge"] if name == "fdb" else ["ip", "-6"] if name.endswith("6") \
                else ["ip"]
            commands.append(([program[0], "-n", ns, *program[1:], "-batch", str(path)], path))
    return commands


async def shrink(store: EtcdStore, probe: KernelProbe, *, to: int, n: int, limit: float,
                 stack: Stack = IPV4, reference_ns: str | None = None) -> dict[str, Any]:
    """Delete peers to+1..n at once; time until the kernel holds exactly `to` peers again.
    Beside it: when a bare etcd watch saw the last of the deletions (the agent cannot be
    done before), and (with `reference_ns`) iproute2 removing the same objects."""
    prefix = stack.layout.subnets_prefix
    revision = (await store.list_prefix(prefix)).revision + 1
    keys = {stack.key(i) for i in range(to + 1, n + 1)}
    seen = asyncio.ensure_future(_last_deletion(store, keys, prefix, revision))
    gone = probe.wait_counts(stack.at_most(to))
    started = time.perf_counter()
    try:
        await delete_peers(store, to + 1, n, stack)
        sent = time.perf_counter()
        done = await asyncio.wait_for(gone, limit)
        last_event = await asyncio.wait_for(seen, limit)
    finally:
        seen.cancel()
        await asyncio.gather(seen, return_exceptions=True)
    objects = stack.per_peer * (n - to)
    out: dict[str, Any] = {
        "removed_peers": n - to, "objects": objects, "delete_requests_s": sent - started,
        "until_kernel_clean_s": done - started,
        # When a bare watch had every deletion, and how long the kernel took after that.
        "watch_last_deletion_s": last_event - started,
        "after_last_deletion_s": done - last_event,
    }
    if reference_ns is not None:
        ref = await reference_delete(stack, reference_ns, to + 1, n, limit=limit)
        out["reference"] = ref
        # The agent's pace from the first deletion it could see, as a share of iproute2's.
        out["rate_ratio"] = ref["seconds"] / (done - started)
    return out


async def event_runs(world: World, store: EtcdStore, probe: KernelProbe, *, n: int, small: int,
                     count: int, limit: float, stack: Stack = IPV4,
                     reference_ns: str | None = None) -> dict[str, Any]:
    """With the agent holding n peers: `count` events; then all but `small` peers
    deleted at once (timed, beside iproute2 removing the same objects from
    `reference_ns`); then `count` events again. Event peers are numbered from
    n + 10, past the join's, and skip the agent's own subnet."""
    skip = own_index(world, stack)
    first = n + 10
    large = await events(store, probe, count=count, first=first, present=n, stack=stack,
                         skip=skip)
    shrunk = await shrink(store, probe, to=small, n=n, limit=limit, stack=stack,
                          reference_ns=reference_ns)
    small_events = await events(store, probe, count=count, first=first + count, present=small,
                                stack=stack, skip=skip)
    return {"events_large": large, "shrink": shrunk, "events_small": small_events}


# -- 3. allocation under contention ----------------------------------------------------


def flannel_candidates(network: NetworkConfig, taken: Collection[IPv4Network],
                       rng: random.Random) -> Iterator[IPv4Network]:
    """flannel's policy: a random one of the first 100 free subnets (in address order)."""
    free = free_subnets(network, taken)[:100]
    rng.shuffle(free)
    return iter(free)


async def allocation(world: World, *, agents: int, strategy: str, round_no: int
                     ) -> dict[str, Any]:
    network = network_config_from_dict({"Network": "10.10.0.0/16", "SubnetLen": 24})
    choose = candidates if strategy == "leaseagent" else flannel_candidates
    prefix = f"/bench-alloc/{strategy}{round_no}"
    metrics = Metrics()
    settings = EtcdSettings(endpoints=world.endpoint, timeout=30)
    stores = await asyncio.gather(*(EtcdStore.connect(settings) for _ in range(agents)))
    ranges = 0

    def observe(op: str, _seconds: float) -> None:
        nonlocal ranges
        if op in ("list", "range", "list_prefix"):
            ranges += 1

    for s in stores:
        s.observer = observe
    leasings = [
        Leasing(store, layout=KeyLayout(prefix), network=network, ttl=300, metrics=metrics,
                rng=random.Random(round_no * 100_003 + k), choose=choose,
                # flannel sends one create per candidate.
                candidates_per_txn=CANDIDATES_PER_TXN if strategy == "leaseagent" else 1,
                value=LeaseValue(public_ip=IPv4Address(int(HOST_IP) + 1000 + k),
                                 backend_type="vxlan",
                                 backend_data={"VNI": 1, "VtepMAC": peer_mac(50_000 + k)},
                                 node_id=f"alloc-{k}"))
        for k, store in enumerate(stores)
    ]
    try:
        started = time.perf_counter()
        owns = await asyncio.gather(*(lg.acquire() for lg in leasings))
        elapsed = time.perf_counter() - started
    finally:
        await asyncio.gather(*(s.close() for s in stores), return_exceptions=True)
    subnets = {o.subnet for o in owns}
    if len(subnets) != agents:
        raise RuntimeError(f"{strategy}: {agents} agents hold only {len(subnets)} subnets")
    txns = sum(lg.transactions for lg in leasings)
    return {"strategy": strategy, "agents": agents, "capacity": network.capacity,
            "seconds": elapsed, "transactions": txns, "txn_per_acquisition": txns / agents,
            "lists": ranges}


# -- 4. footprint and 5. etcd cost at steady state ----------------------------------------


async def footprint(world: World, agent: Proc, metrics_port: int, *, idle: float
                    ) -> tuple[dict[str, Any], dict[str, float]]:
    await asyncio.sleep(1.0)
    reconciles = "leaseagent_reconcile_duration_seconds"
    r0 = (agent_metric(metrics_port, reconciles + "_sum") or 0.0,
          agent_metric(metrics_port, reconciles + "_count") or 0.0)
    s0, m0 = proc_sample(agent.pid), world.etcd_metrics()
    await asyncio.sleep(idle)
    s1, m1 = proc_sample(agent.pid), world.etcd_metrics()
    r1 = (agent_metric(metrics_port, reconciles + "_sum") or 0.0,
          agent_metric(metrics_port, reconciles + "_count") or 0.0)
    switches = (s1["voluntary"] + s1["involuntary"]) - (s0["voluntary"] + s0["involuntary"])
    resync_count = r1[1] - r0[1]
    resync_sum = r1[0] - r0[0]
    baseline = python_baseline_rss(world)
    return {
        "rss_mib": s1["rss"] / 2**20,
        # At the start of the window (the join done 1 s before) and at its end, after the
        # window's periodic resync (None if none fell in it).
        "rss_after_join_mib": s0["rss"] / 2**20,
        "rss_anon_after_join_mib": s0["rss_anon"] / 2**20,
        "rss_after_resync_mib": s1["rss"] / 2**20 if resync_count else None,
        "rss_anon_after_resync_mib": s1["rss_anon"] / 2**20 if resync_count else None,
        "rss_file_mib": s1["rss_file"] / 2**20,
        "fds": s1["fds"],
        "threads": s1["threads"],
        "idle_seconds": idle,
        "cpu_percent": (s1["cpu"] - s0["cpu"]) / idle * 100,
        "wakeups_per_s": switches / idle,
        "voluntary_per_s": (s1["voluntary"] - s0["voluntary"]) / idle,
        "periodic_reconciles_in_window": resync_count,
        "mean_full_reconcile_s": resync_sum / resync_count if resync_count else None,
        "python_baseline_rss_mib": baseline / 2**20,
        "flannel_request_mib": 50.0,
    }, _etcd_delta(m0, m1)


def python_baseline_rss(world: World) -> float:
    """RSS of an interpreter that only imported the agent's modules (the floor)."""
    code = ("import leaseagent.agent.main, leaseagent.agent.daemon, leaseagent.store.etcd, "
            "leaseagent.dataplane.vxlan, time; print('ok', flush=True); time.sleep(30)")
    import sys

    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)
    try:
        assert proc.stdout is not None
        proc.stdout.readline()
        return proc_sample(proc.pid)["rss"]
    finally:
        proc.kill()
        proc.wait()


def summarize_etcd(start: dict[str, float], idle: dict[str, float], idle_s: float
                   ) -> dict[str, Any]:
    def handled(d: dict[str, float], method: str) -> float:
        return d.get(f"grpc_server_handled_total:{method}", 0.0)

    def started(d: dict[str, float], method: str) -> float:
        return d.get(f"grpc_server_started_total:{method}", 0.0)

    unary = ("Range", "Txn", "Put", "DeleteRange", "LeaseGrant", "LeaseRevoke",
             "LeaseTimeToLive")
    at_start = {m: handled(start, m) for m in unary if handled(start, m)}
    at_start["Watch streams opened"] = started(start, "Watch")
    at_start["LeaseKeepAlive streams opened"] = started(start, "LeaseKeepAlive")
    per_hour = {m: handled(idle, m) * 3600 / idle_s for m in unary if handled(idle, m)}
    per_hour["Watch streams opened"] = started(idle, "Watch") * 3600 / idle_s
    return {
        "requests_at_start": at_start,
        "unary_requests_at_start": sum(handled(start, m) for m in unary),
        "range_requests_at_start": handled(start, "Range"),
        "watch_streams": start.get("etcd_debugging_mvcc_watch_stream_total", 0.0),
        "watchers": start.get("etcd_debugging_mvcc_watcher_total", 0.0),
        "unary_requests_per_hour_idle": sum(handled(idle, m) for m in unary) * 3600 / idle_s,
        "requests_per_hour_idle": per_hour,
    }


async def traffic_rules(n: int, *, checks: int = 20) -> dict[str, Any]:
    """The traffic rules with `n` peers in the VXLAN peer filter, per firewall: writing
    them all; one check as the keeper makes it between changes (read back + compare;
    iptables counts the peer set then, every member only every DEEP_CHECK_SECONDS), and
    one full check, each beside the bare tools it runs (the reference); one peer added;
    the share of a core the checks take at their intervals. Runs in the bench's
    namespace after the agent has stopped; removes what it wrote."""
    from leaseagent.core.rules import IPSET, TABLE, TrafficSettings, compare, ruleset
    from leaseagent.dataplane.firewall import (
        DEEP_CHECK_SECONDS,
        IptablesFirewall,
        NftFirewall,
        check_interval,
    )

    async def tools(argvs: list[list[str]]) -> float:
        t = time.perf_counter()
        for argv in argvs:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            await proc.communicate()
            assert proc.returncode == 0, argv
        return time.perf_counter() - t

    peers = [IPv4Address(int(UNDERLAY.network_address) + 2 + i) for i in range(n)]
    out: dict[str, Any] = {"peers": n}
    for fw in (IptablesFirewall(), NftFirewall()):
        wanted = ruleset(TrafficSettings(ip_masq=True, nftables=fw.name == "nftables"),
                         network=NETWORK, own_subnet=peer_subnet(1), vxlan_ports=(8472,), peers=peers)
        t = time.perf_counter()
        await fw.apply(wanted)
        applied = time.perf_counter() - t
        if fw.name == "iptables":
            chains = [["iptables-save", "-c", "-t", "nat"], ["iptables-save", "-c", "-t", "filter"]]
            shallow_tools = [*chains, ["ipset", "list", "-t", IPSET]]
            deep_tools = [*chains, ["ipset", "list", "-o", "save", IPSET]]
        else:
            shallow_tools = deep_tools = [["nft", "-j", "list", "table", "ip", TABLE]]
        figures: dict[str, list[float]] = {k: [] for k in ("check", "tools", "deep", "deep_tools")}
        for _ in range(checks):
            for deep, ours, ref, argvs in ((False, "check", "tools", shallow_tools),
                                           (True, "deep", "deep_tools", deep_tools)):
                t = time.perf_counter()
                assert compare(wanted, await fw.observe(deep=deep)) == []
                figures[ours].append(time.perf_counter() - t)
                figures[ref].append(await tools(argvs))
        t = time.perf_counter()
        await fw.set_peers([IPv4Address(int(peers[-1]) + 1)], [])
        one = time.perf_counter() - t
        await fw.remove()
        ms = {k: _percentile(v, 50) * 1000 for k, v in figures.items()}
        interval = check_interval(fw)
        deep_interval = max(interval, DEEP_CHECK_SECONDS)
        share = (ms["check"] / interval if fw.name == "iptables" else 0.0) \
            + ms["deep"] / deep_interval
        out[fw.name] = {"apply_ms": applied * 1000, "check_ms": ms["check"],
                        "tools_ms": ms["tools"], "check_ratio": ms["check"] / ms["tools"],
                        "deep_check_ms": ms["deep"], "deep_tools_ms": ms["deep_tools"],
                        "deep_check_ratio": ms["deep"] / ms["deep_tools"],
                        "one_peer_ms": one * 1000, "interval_s": interval,
                        "deep_interval_s": deep_interval,
                        "core_percent": share / 1000 * 100}
    return out


# -- join and mass removal at small sizes, repeated ------------------------------------


async def _put_leased(store: EtcdStore, first: int, last: int, stack: Stack) -> int:
    """Peers first..last's leases, all attached to one etcd lease (returned): revoking it
    deletes them all in one revision, as a mass expiry does."""
    lease, _ttl = await store.grant(3600)
    await _bounded(store.create(stack.key(i), stack.value(i), lease=lease)
                   for i in range(first, last + 1))
    return lease


async def removal(store: EtcdStore, probe: KernelProbe, lease: int, *, n: int, limit: float,
                  stack: Stack, reference_ns: str, pid: int) -> dict[str, Any]:
    """Every peer's lease expires at once (their shared etcd lease revoked: n deletions
    in one revision); time from the revoke sent until the kernel holds none of their
    objects, beside when a bare watch had the last
    deletion and iproute2 deleting the same objects (`reference_delete`). Also the
    agent's (`pid`) CPU from the revoke to the kernel clean, and iproute2's."""
    prefix = stack.layout.subnets_prefix
    revision = (await store.list_prefix(prefix)).revision + 1
    keys = {stack.key(i) for i in range(1, n + 1)}
    seen = asyncio.ensure_future(_last_deletion(store, keys, prefix, revision))
    gone = probe.wait_counts(stack.at_most(0))
    cpu = cpu_seconds(pid)
    probe.track_cpu(partial(cpu_seconds, pid))
    started = time.perf_counter()
    try:
        await store.revoke(lease)
        in_etcd = time.perf_counter()
        done = await asyncio.wait_for(gone, limit)
        cpu = probe.cpu_at_burst_end() - cpu  # of the burst that cleaned the kernel
        last_event = await asyncio.wait_for(seen, limit)
    finally:
        probe.track_cpu(None)
        seen.cancel()
        await asyncio.gather(seen, return_exceptions=True)
    ref = await reference_delete(stack, reference_ns, 1, n, limit=limit)
    agent = done - started
    return {
        "removed_peers": n, "objects": stack.per_peer * n,
        "revoke_s": in_etcd - started,
        # The figure: from the revoke sent (etcd deletes every key in one revision
        # before it replies) to the kernel clean. Its reply is no start: a small
        # removal can be clean in the kernel before this process has read it.
        "seconds": agent,
        "after_reply_s": done - in_etcd,
        "watch_last_deletion_s": last_event - started,
        "after_watch_s": done - last_event,
        "reference": ref,
        "ratio": ref["seconds"] / agent,
        "cpu_s": cpu,
        "cpu_ratio": ref["cpu_s"] / cpu if cpu > 0 else float("nan"),
    }


async def pace(world: World, store: EtcdStore, sizes: Sequence[int], *, repeats: int,
               limit: float) -> dict[int, dict[str, Any]]:
    """Join and mass removal with each of `sizes` peers, `repeats` times each, every time
    beside its own `ip -batch` + `bridge -batch` reference in a fresh namespace:
    join = the vxlan device's creation -> the last of the 3n objects in the kernel;
    removal = `removal`. Each run has its own agent (lease released when it stops),
    probe and reference namespace; the leases are put again for each run. Medians and
    spreads of the ratios per size."""
    out: dict[int, dict[str, Any]] = {}
    for n in sizes:
        runs: list[dict[str, Any]] = []
        for r in range(repeats):
            stack = replace(IPV4, agent_name=f"agent-p{n}-{r}", reference=f"p{n}x{r}")
            lease = await _put_leased(store, 1, n, stack)
            probe = KernelProbe()
            probe.start()
            agent: Proc | None = None
            try:
                joined, agent, _port, _ = await join(
                    world, probe, n, limit=limit, stack=stack, resync=600.0,
                    extra_args=["--release-on-exit"])
                removed = await removal(store, probe, lease, n=n, limit=limit, stack=stack,
                                        reference_ns=joined["reference"]["namespace"],
                                        pid=agent.pid)
                if not agent.alive():
                    raise RuntimeError(f"the agent died; see {agent.log}")
            finally:
                if agent is not None:
                    agent.stop()
                await probe.stop()
                sh("ip", "link", "del", "flannel.1", check=False)
            run = {"join_s": joined["device_to_objects_s"],
                   # From the agent's start (its process spawned): the lease, the
                   # listing and its judging count too (the device is made after them).
                   "start_s": joined["start_to_objects_s"],
                   "start_ratio": joined["reference"]["seconds"] / joined["start_to_objects_s"],
                   "join_reference_s": joined["reference"]["seconds"],
                   "join_ratio": joined["device_rate_ratio"],
                   "join_cpu_s": joined["device_to_objects_cpu_s"],
                   "join_reference_cpu_s": joined["reference"]["cpu_s"],
                   "join_cpu_ratio": (joined["reference"]["cpu_s"]
                                      / joined["device_to_objects_cpu_s"]
                                      if joined["device_to_objects_cpu_s"] else float("nan")),
                   "differences_from_reference": joined["differences_from_reference"],
                   "removal": removed}
            runs.append(run)
            print(f"  pace {n} #{r + 1}: join {run['join_s']:.3f}s vs ip -batch "
                  f"{run['join_reference_s']:.3f}s ({run['join_ratio']:.2f}; from the agent's "
                  f"start {run['start_s']:.3f}s); removal "
                  f"{removed['seconds']:.3f}s vs {removed['reference']['seconds']:.3f}s "
                  f"({removed['ratio']:.2f}; bare watch "
                  f"{removed['watch_last_deletion_s']:.3f}s)", file=sys.stderr)
        out[n] = {"peers": n, "runs": runs,
                  **_spread("join", [x["join_ratio"] for x in runs]),
                  **_spread("removal", [x["removal"]["ratio"] for x in runs]),
                  **_spread("join_cpu", [x["join_cpu_ratio"] for x in runs]),
                  **_spread("removal_cpu", [x["removal"]["cpu_ratio"] for x in runs]),
                  **_spread("start", [x["start_ratio"] for x in runs]),
                  "join_s": statistics.median(x["join_s"] for x in runs),
                  "start_s": statistics.median(x["start_s"] for x in runs),
                  "join_reference_s": statistics.median(x["join_reference_s"] for x in runs),
                  "removal_s": statistics.median(x["removal"]["seconds"] for x in runs),
                  "removal_reference_s": statistics.median(
                      x["removal"]["reference"]["seconds"] for x in runs),
                  "join_cpu_s": statistics.median(x["join_cpu_s"] or math.nan for x in runs),
                  "join_reference_cpu_s": statistics.median(
                      x["join_reference_cpu_s"] for x in runs),
                  "removal_cpu_s": statistics.median(x["removal"]["cpu_s"] for x in runs),
                  "removal_reference_cpu_s": statistics.median(
                      x["removal"]["reference"]["cpu_s"] for x in runs)}
    return out


def _spread(name: str, ratios: list[float]) -> dict[str, float]:
    return {f"{name}_ratio": statistics.median(ratios), f"{name}_ratio_min": min(ratios),
            f"{name}_ratio_max": max(ratios)}
