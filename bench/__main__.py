"""The benchmark suite: `sudo .venv/bin/python -m bench` (or `bash bench/run.sh`).

Prints a table and writes JSON (--json). Each timing is taken next to its
reference in the same run and reported as a ratio; absolute times are noted
for the record only (machines are noisy). See docs/benchmarks.md.

    pace        first, at each of --pace-sizes (500, 1,000, 2,000, 5,000), --pace-repeats
                times (3): the join from the vxlan device's creation to the last of
                the 3n objects in the kernel, vs `ip -batch` + `bridge -batch`
                programming them into a fresh namespace (and from the agent's start:
                the device is made after the lease and its listing's judging); then
                every peer's lease expiring at once (one shared etcd lease revoked) from the revoke
                request to the kernel clean, vs `ip -batch` + `bridge -batch` deleting
                them there; median ratio and spread (--pace-only: just this part)
    join        the agent starting into N peers (leases in etcd, vxlan) until all
                3N kernel objects are in place / READY, vs `ip -batch` + `bridge
                -batch` programming the same objects into a fresh namespace; counted
                from the first object and from the vxlan device's creation; first at
                --join-sizes (1,000 and 2,000), each beside its own reference, with the
                agent's RSS after the join and after a periodic resync (bytes per added
                peer from the smallest to N)
    events      a lease put/deleted until its entries are in/out of the kernel,
                p50/p99 with N and with --small-peers peers, vs the same event
                reaching a bare etcd watcher; between the two, all but --small-peers
                deleted at once, until the kernel is clean, vs a bare watch seeing the
                last deletion and `ip -batch` removing the same objects
    allocation  --agents in-process Leasing instances acquiring at once from a
                /16 of /24s: time and txns per acquisition, vs flannel's policy
    footprint   RSS, CPU and wake-ups of the agent holding N peers, idle
    etcd        requests at start and per hour idle, watch streams (etcd /metrics)
    rules       the traffic rules with N peers in the VXLAN peer filter: writing them,
                one drift check vs the bare iptables-save/ipset/nft calls it makes
    dual-stack  join and events again, last, with --dual-peers dual-stack peers (6
                kernel objects each: both families' neighbour, FDB entry, route)
                under a fresh prefix, a fresh agent and probe; the reference
                programs the same 6N objects with ip -batch / ip -6 -batch /
                bridge -batch into a fresh namespace
    wireguard   (bench/wireguard.py) the agent starting into --wireguard-peers
                wireguard peers (wireguard-go) vs `wg setconf` of the same peers, and
                its idle CPU with them; then two lab hosts on vxlan and on wireguard:
                iperf3 container to container (and the underlay alone), key rotations
                under pings, peers removed by hand until back

Needs root (namespaces), etcd and iproute2 (and wireguard-go, wg, iperf3 for
the wireguard part). Everything it makes (two
namespaces, etcd, the agent, files under /dev/shm) is removed at exit, also
on failure or SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

from bench import scenarios, wireguard
from bench.env import DUAL, KernelProbe, Proc, World, as_bench_process, in_world, render_table, sh
from leaseagent.store.etcd import EtcdSettings, EtcdStore

TARGETS = {
    "join_rate_ratio": 0.5,
    "join_device_ratio": 0.8,  # pace: device -> all objects, as a share of ip -batch's speed
    "removal_ratio": 1.0,  # pace: mass removal, as a share of ip -batch del's speed
    "event_p99_ms": 20.0,
    "txn_per_acquisition": 1.3,
    "rss_mib": 60.0,
    "idle_cpu_percent": 1.0,
}


def machine() -> dict[str, Any]:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem = int(line.split()[1]) * 1024
    return {"nproc": os.cpu_count(), "cpu": model, "kernel": platform.release(),
            "memory_gib": round(mem / 2**30, 1), "python": platform.python_version()}


async def run(args: argparse.Namespace, world: World) -> dict[str, Any]:
    began = time.perf_counter()
    results: dict[str, Any] = {"machine": machine(), "parameters": vars(args).copy(),
                               "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                               "host_namespace": world.host_ns}
    world.start_etcd()
    store = await EtcdStore.connect(EtcdSettings(endpoints=world.endpoint, timeout=30))
    probe: KernelProbe | None = None
    agent = None
    try:
        n = args.peers
        await scenarios.put_network_config(store)
        if args.pace_sizes:
            results["pace"] = await scenarios.pace(world, store, args.pace_sizes,
                                                   repeats=args.pace_repeats, limit=args.timeout)
            if args.pace_only:
                results["seconds"] = time.perf_counter() - began
                return results
        # Smaller joins first, each beside its reference, on the first of the leases.
        sizes = sorted(k for k in args.join_sizes if 0 < k < n)
        results["join_sizes"] = await scenarios.join_sizes(world, store, sizes,
                                                           limit=args.timeout)
        t = time.perf_counter()
        await scenarios.put_peers(store, max(sizes, default=0) + 1, n)
        print(f"  {n} leases put in {time.perf_counter() - t:.1f}s", file=sys.stderr)

        probe = KernelProbe()  # after the smaller joins: it counts from zero
        probe.start()
        join, agent, metrics_port, start_cost = await scenarios.join(
            world, probe, n, limit=args.timeout)
        results["join"] = join
        print(f"  join: {join['start_to_objects_s']:.2f}s to all objects, "
              f"{join['device_to_objects_s']:.3f}s from the device", file=sys.stderr)

        results["footprint"], idle_cost = await scenarios.footprint(
            world, agent, metrics_port, idle=args.idle)
        results["etcd"] = scenarios.summarize_etcd(start_cost, idle_cost, args.idle)
        results["per_peer_bytes"] = per_peer_bytes(results)

        results |= await scenarios.event_runs(
            world, store, probe, n=n, small=min(args.small_peers, n), count=args.events,
            limit=args.timeout, reference_ns=join["reference"]["namespace"])
        _report_events(results)
        if not agent.alive():
            raise RuntimeError(f"the agent died; see {agent.log}")
        agent.stop()
        await probe.stop()
        results["rules"] = await scenarios.traffic_rules(n)
        print("  traffic rules done", file=sys.stderr)

        rounds: dict[str, list[dict[str, Any]]] = {"leaseagent": [], "flannel": []}
        for r in range(args.alloc_rounds):
            order = ("leaseagent", "flannel") if r % 2 == 0 else ("flannel", "leaseagent")
            for strategy in order:
                rounds[strategy].append(await scenarios.allocation(
                    world, agents=args.agents, strategy=strategy, round_no=r))
        results["allocation"] = {
            s: {
                "rounds": rs,
                "seconds": sum(x["seconds"] for x in rs) / len(rs),
                "txn_per_acquisition": sum(x["txn_per_acquisition"] for x in rs) / len(rs),
            }
            for s, rs in rounds.items()
        }
        print("  allocation done", file=sys.stderr)
        agent = None
        if args.dual_peers > 0:
            results["dual_stack"] = await dual_stack(args, world, store)
        if args.wireguard_peers > 0 or args.throughput_seconds > 0:
            results["wireguard"] = await wireguard.run(
                world, store, peers=args.wireguard_peers, idle=args.wireguard_idle,
                seconds=args.throughput_seconds, rotations=args.rotations,
                removals=args.removals, limit=args.timeout)
    except BaseException:
        _log_tail(agent)
        raise
    finally:
        if probe is not None:
            await probe.stop()
        await store.close()
    results["seconds"] = time.perf_counter() - began
    return results


async def dual_stack(args: argparse.Namespace, world: World, store: EtcdStore
                     ) -> dict[str, Any]:
    """Join and events with dual-stack peers: the same host namespace (the IPv4
    agent has stopped; its flannel.1 is deleted, with every object on it, so this
    agent starts as that one did), a fresh prefix, agent and probe."""
    n = args.dual_peers
    began = time.perf_counter()
    sh("ip", "link", "del", "flannel.1", check=False)
    await scenarios.put_network_config(store, DUAL)
    t = time.perf_counter()
    await scenarios.put_peers(store, 1, n, DUAL)
    print(f"  {n} dual-stack leases put in {time.perf_counter() - t:.1f}s", file=sys.stderr)
    probe = KernelProbe()  # after the delete: it counts from zero
    probe.start()
    agent = None
    try:
        join, agent, _port, _cost = await scenarios.join(
            world, probe, n, limit=args.timeout, stack=DUAL)
        print(f"  dual-stack join: {join['start_to_objects_s']:.2f}s to all objects",
              file=sys.stderr)
        out: dict[str, Any] = {"join": join}
        out |= await scenarios.event_runs(
            world, store, probe, n=n, small=min(args.dual_small_peers, n),
            count=args.dual_events, limit=args.timeout, stack=DUAL,
            reference_ns=join["reference"]["namespace"])
        _report_events(out, DUAL.label)
        if not agent.alive():
            raise RuntimeError(f"the dual-stack agent died; see {agent.log}")
        agent.stop()
    except BaseException:
        _log_tail(agent)
        raise
    finally:
        await probe.stop()
    out["seconds"] = time.perf_counter() - began  # the part's share of the bench's time
    return out


def per_peer_bytes(results: dict[str, Any]) -> dict[str, Any] | None:
    """What each peer added to the agent's RSS, from the smallest extra join to the main
    one: after the join, and after a periodic resync."""
    sizes = results["join_sizes"]
    if not sizes:
        return None
    small = min(sizes)
    f, s = results["footprint"], sizes[small]
    added = results["join"]["peers"] - small
    out: dict[str, Any] = {"from_peers": small, "to_peers": results["join"]["peers"]}
    for when in ("after_join", "after_resync"):
        big = f[f"rss_{when}_mib"]
        out[when] = (big - s[f"rss_{when}_mib"]) * 2**20 / added if big is not None else None
    return out


def _log_tail(agent: Proc | None) -> None:
    if agent is not None and agent.log.exists():
        tail = agent.log.read_text().splitlines()[-20:]
        print(f"bench: {agent.log.name} ends with:\n  " + "\n  ".join(tail), file=sys.stderr)


def _report_events(part: dict[str, Any], label: str = "") -> None:
    for key in ("events_large", "events_small"):
        e = part[key]
        print(f"  {label}events with {e['peers_present']} peers: p50 {e['p50_ms']:.2f} ms, "
              f"p99 {e['p99_ms']:.2f} ms, {e['timeouts']} of {e['events']} timed out",
              file=sys.stderr)


def _fmt(v: Any, unit: str = "") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        text = f"{v:.3g}" if abs(v) < 100 else f"{v:,.0f}"
    else:
        text = str(v)
    return f"{text}{unit}"


Row = tuple[str, str, str, str, str, str]


def _stack_rows(part: dict[str, Any], label: str = "") -> list[Row]:
    """Join, event and shrink rows of one run (IPv4, or dual-stack: `label`)."""
    rows: list[Row] = []
    j = part["join"]
    ref = j["reference"]
    ok = j["rate_ratio"] >= TARGETS["join_rate_ratio"]
    rows.append((f"{label}join {j['peers']} peers: programming rate",
                 _fmt(j["agent_rate"], "/s"), f"ip -batch {_fmt(ref['rate'], '/s')}",
                 _fmt(j["rate_ratio"]), ">= 0.5", "met" if ok else "NOT met"))
    rows.append((f"{label}join: start -> all {j['objects']} objects",
                 _fmt(j["start_to_objects_s"], " s"), f"ip -batch {_fmt(ref['seconds'], ' s')}",
                 _fmt(j["start_to_objects_vs_reference"]), "-", "-"))
    rows.append((f"{label}join: start -> READY", _fmt(j["start_to_ready_s"], " s"),
                 "-", "-", "-", "-"))
    rows.append(_device_row(j, label))
    for key in ("events_large", "events_small"):
        e = part[key]
        for q in ("p50", "p99"):
            value = e[f"{q}_ms"]
            target = "<= 20 ms" if q == "p99" else "-"
            met = "-"
            if q == "p99":
                met = "met" if value <= TARGETS["event_p99_ms"] and not e["timeouts"] else "NOT met"
            rows.append((f"{label}event {q}, {e['peers_present']} peers ({e['events']} ev)",
                         _fmt(value, " ms"), f"etcd watch {_fmt(e[f'reference_{q}_ms'], ' ms')}",
                         _fmt(e[f"{q}_ratio"]), target, met))
    s = part["shrink"]
    ref = s.get("reference")
    rows.append((f"{label}remove {s['removed_peers']} peers at once: until the kernel is clean",
                 _fmt(s["until_kernel_clean_s"], " s"),
                 f"ip -batch del {_fmt(ref['seconds'], ' s')}" if ref else "-",
                 _fmt(s.get("rate_ratio")), "-", "-"))
    rows.append((f"{label}  ... after a bare etcd watch had the last deletion",
                 _fmt(s["after_last_deletion_s"], " s"),
                 f"that watch: {_fmt(s['watch_last_deletion_s'], ' s')}", "-", "-", "-"))
    return rows


def _device_row(j: dict[str, Any], label: str = "") -> Row:
    target = TARGETS["join_device_ratio"]
    ok = j["device_rate_ratio"] >= target
    return (f"{label}join {j['peers']} peers: device -> all {j['objects']} objects",
            _fmt(j["device_to_objects_s"], " s"),
            f"ip -batch {_fmt(j['reference']['seconds'], ' s')}", _fmt(j["device_rate_ratio"]),
            f">= {target}", "met" if ok else "NOT met")


def pace_rows(pace: dict[int, dict[str, Any]]) -> list[Row]:
    """Join and mass removal per size: median ratio (min-max over the runs)."""
    rows: list[Row] = []
    for n, p in sorted(pace.items()):
        runs = len(p["runs"])
        for what, ref, target in (("join", "ip/bridge -batch", "join_device_ratio"),
                                  ("removal", "ip/bridge -batch del", "removal_ratio")):
            ratio = p[f"{what}_ratio"]
            label = ("device -> all objects" if what == "join"
                     else "all leases expire at once: revoke -> kernel clean")
            rows.append((f"{what} {n} peers ({runs} runs): {label}",
                         _fmt(p[f"{what}_s"], " s"), f"{ref} {_fmt(p[f'{what}_reference_s'], ' s')}",
                         f"{_fmt(ratio)} ({_fmt(p[f'{what}_ratio_min'])}-"
                         f"{_fmt(p[f'{what}_ratio_max'])})",
                         f">= {TARGETS[target]}",
                         "met" if ratio >= TARGETS[target] else "NOT met"))
            # The same span's CPU (user + kernel), agent vs iproute2's processes.
            rows.append(("  ... its CPU, agent vs iproute2", _fmt(p[f"{what}_cpu_s"], " s"),
                         f"{ref} {_fmt(p[f'{what}_reference_cpu_s'], ' s')}",
                         f"{_fmt(p[f'{what}_cpu_ratio'])} ({_fmt(p[f'{what}_cpu_ratio_min'])}-"
                         f"{_fmt(p[f'{what}_cpu_ratio_max'])})", "-", "-"))
            if what == "join":
                # From the agent's start: the lease and its listing's judging, which
                # come before the device, count too.
                rows.append(("  ... from the agent's start", _fmt(p["start_s"], " s"),
                             f"{ref} {_fmt(p['join_reference_s'], ' s')}",
                             f"{_fmt(p['start_ratio'])} ({_fmt(p['start_ratio_min'])}-"
                             f"{_fmt(p['start_ratio_max'])})", "-", "-"))
    return rows


def table(results: dict[str, Any]) -> str:
    if "join_sizes" not in results:  # --pace-only
        return render_table(("figure", "value", "reference", "ratio", "target", ""),
                            pace_rows(results.get("pace", {})), results["machine"])
    rows = pace_rows(results.get("pace", {}))
    rows += [_device_row(j) for _, j in sorted(results["join_sizes"].items())]
    rows += _stack_rows(results)
    j = results["join"]
    if "dual_stack" in results:
        rows += _stack_rows(results["dual_stack"], DUAL.label)
    a = results["allocation"]
    ours, flannel = a["leaseagent"], a["flannel"]
    agents = ours["rounds"][0]["agents"]
    rows.append((f"allocation, {agents} agents: txn/acquisition",
                 _fmt(ours["txn_per_acquisition"]),
                 f"flannel {_fmt(flannel['txn_per_acquisition'])}",
                 _fmt(ours["txn_per_acquisition"] / flannel["txn_per_acquisition"]),
                 "<= 1.3",
                 "met" if ours["txn_per_acquisition"] <= TARGETS["txn_per_acquisition"]
                 else "NOT met"))
    rows.append((f"allocation, {agents} agents: total time", _fmt(ours["seconds"], " s"),
                 f"flannel {_fmt(flannel['seconds'], ' s')}",
                 _fmt(ours["seconds"] / flannel["seconds"]), "-", "-"))
    f = results["footprint"]
    for when, value in (("the join", f["rss_after_join_mib"]),
                        ("a periodic resync", f["rss_after_resync_mib"])):
        rows.append((f"RSS with {j['peers']} peers after {when}", _fmt(value, " MiB"),
                     f"bare python+imports {_fmt(f['python_baseline_rss_mib'], ' MiB')}; "
                     "flannel requests 50",
                     _fmt(value / f["flannel_request_mib"] if value else None), "<= 60 MiB",
                     "-" if value is None else "met" if value <= TARGETS["rss_mib"]
                     else "NOT met"))
    for n, sized in sorted(results["join_sizes"].items()):
        rows.append((f"RSS with {n} peers after the join / a resync",
                     f"{_fmt(sized['rss_after_join_mib'])} / "
                     f"{_fmt(sized['rss_after_resync_mib'], ' MiB')}", "-", "-", "-", "-"))
    per = results.get("per_peer_bytes")
    if per:
        rows.append((f"bytes per added peer, {per['from_peers']} -> {per['to_peers']} "
                     "(after join / resync)",
                     f"{_fmt(per['after_join'])} / {_fmt(per['after_resync'])}",
                     "-", "-", "-", "-"))
    rows.append((f"idle CPU ({_fmt(f['idle_seconds'])} s)", _fmt(f["cpu_percent"], " %"), "-",
                 "-", "< 1 %",
                 "met" if f["cpu_percent"] < TARGETS["idle_cpu_percent"] else "NOT met"))
    mean = f["mean_full_reconcile_s"]
    rows.append(("periodic full resync pass (every ~30 s)", _fmt(mean, " s"), "-", "-",
                 "-", _fmt(mean / 30 * 100 if mean else None, " % of a core")))
    rows.append(("idle wake-ups", _fmt(f["wakeups_per_s"], "/s"), "-", "-", "no busy loop",
                 "met" if f["wakeups_per_s"] < 50 else "NOT met"))
    r = results["rules"]
    for name in ("iptables", "nftables"):
        x = r[name]
        every = f"every {_fmt(x['interval_s'], ' s')}"
        if name == "iptables":
            rows.append((f"{name}: one check ({every}), {r['peers']} peers in the filter",
                         _fmt(x["check_ms"], " ms"), f"the bare tools {_fmt(x['tools_ms'], ' ms')}",
                         _fmt(x["check_ratio"]), "-", "-"))
            every = f"every {_fmt(x['deep_interval_s'], ' s')}"
        rows.append((f"{name}: one full check ({every}), {r['peers']} peers",
                     _fmt(x["deep_check_ms"], " ms"),
                     f"the bare tools {_fmt(x['deep_tools_ms'], ' ms')}",
                     _fmt(x["deep_check_ratio"]), "-", _fmt(x["core_percent"], " % of a core")))
        rows.append((f"{name}: write all rules / add one peer", _fmt(x["apply_ms"], " ms"),
                     f"one peer {_fmt(x['one_peer_ms'], ' ms')}", "-", "-", "-"))
    if "wireguard" in results:
        rows += wireguard.rows(results["wireguard"], _fmt)
    e = results["etcd"]
    rows.append(("etcd unary requests at start", _fmt(e["unary_requests_at_start"]),
                 f"{_fmt(e['range_requests_at_start'])} Range", "-", "one list", "-"))
    rows.append(("etcd unary requests per hour idle", _fmt(e["unary_requests_per_hour_idle"]),
                 "-", "-", "-", "-"))
    rows.append(("etcd watch streams / watchers", f"{_fmt(e['watch_streams'])} / "
                 f"{_fmt(e['watchers'])}", "-", "-", "1", "-"))
    return render_table(("figure", "value", "reference", "ratio", "target", ""), rows,
                        results["machine"])


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--peers", type=int, default=5000, help="peers for join/footprint/events")
    p.add_argument("--small-peers", type=int, default=100, help="peers for the second event run")
    p.add_argument("--join-sizes", type=lambda v: [int(x) for x in v.split(",") if x],
                   default=[1000, 2000],
                   help="smaller joins first, each beside its reference, with the agent's "
                        "memory after the join and a resync (comma-separated; '' for none)")
    p.add_argument("--pace-sizes", type=lambda v: [int(x) for x in v.split(",") if x],
                   default=[500, 1000, 2000, 5000],
                   help="join and mass removal at each size, each run beside its ip/bridge "
                        "-batch reference (comma-separated; '' for none)")
    p.add_argument("--pace-repeats", type=int, default=3,
                   help="runs per pace size (the median ratio and its spread)")
    p.add_argument("--pace-only", action="store_true",
                   help="only the pace part (join and mass removal at --pace-sizes)")
    p.add_argument("--events", type=int, default=1000, help="events per event run")
    p.add_argument("--agents", type=int, default=250, help="concurrent allocating agents")
    p.add_argument("--alloc-rounds", type=int, default=3, help="rounds per allocation policy")
    p.add_argument("--idle", type=float, default=40.0,
                   help="seconds of idle measurement (40 covers one periodic resync, every 30 s +-20%%)")
    p.add_argument("--dual-peers", type=int, default=5000,
                   help="dual-stack peers for the dual-stack join/events (0: no dual-stack part)")
    p.add_argument("--dual-small-peers", type=int, default=100,
                   help="dual-stack peers for the second dual-stack event run")
    p.add_argument("--dual-events", type=int, default=1000, help="events per dual-stack event run")
    p.add_argument("--wireguard-peers", type=int, default=1000,
                   help="wireguard peers for the wireguard join (0: none)")
    p.add_argument("--wireguard-idle", type=float, default=10.0,
                   help="seconds the wireguard agent idles with them (its CPU)")
    p.add_argument("--throughput-seconds", type=float, default=5.0,
                   help="iperf3 run per backend between two lab hosts; 0: no lab part "
                        "(throughput, rotations, removals)")
    p.add_argument("--rotations", type=int, default=5, help="key rotations under pings")
    p.add_argument("--removals", type=int, default=5, help="peers removed by hand, timed")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds any phase may take")
    p.add_argument("--json", type=Path, default=Path("bench-results.json"), help="output file")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    if not as_bench_process("bench"):
        return 2
    results = in_world("bench", lambda world: run(args, world))
    args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(table(results))
    print(f"\nJSON: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
