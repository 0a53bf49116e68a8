"""The WireGuard figures: a 1,000-peer join, throughput beside vxlan, rotations, repairs.

- join: `--wireguard-peers` wireguard leases (distinct PublicIPs and keys) under a
  fresh prefix; a real agent started in the bench's host namespace (with a
  /run/wireguard of its own: leaseagent.lab.agents) until its wireguard-go
  device holds every peer (read through the control socket every 20 ms) and
  READY; beside `wg setconf` writing the same peers to a fresh wireguard-go
  device in the reference namespace. Then the agent idles with them
  (`--wireguard-idle` s): its CPU is mostly the drift poll (every 0.5 s, all
  peers read).
- lab: two namespace hosts of the lab (leaseagent.lab), one container each, on
  vxlan and then on wireguard (wireguard-go), in one run: a bounded iperf3 run
  (`--throughput-seconds`, TCP, container to container) each, beside the
  underlay itself (host to host, no tunnel); then, on wireguard, key rotations
  under pings both ways (`--rotations`; the README's procedure: stop, remove the
  key, start) and peers removed by hand (`--removals`), each timed until back.

Everything stays in the bench's and the labs' namespaces; every wireguard-go is
stopped (its device deleted, then by PID) and the labs are taken down, also on
failure.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from typing import Any

from bench.env import (
    NETWORK,
    Stack,
    World,
    free_port,
    peer_ip,
    peer_subnet,
    proc_sample,
    sh,
)
from bench.scenarios import ReadyListener, _bounded
from leaseagent.core.leases import KeyLayout, LeaseValue
from leaseagent.dataplane.wguapi import WireguardGo, wireguard_go_processes
from leaseagent.lab import Lab, parse_ping_summary
from leaseagent.lab.agents import own_wireguard_dir_argv
from leaseagent.store.etcd import EtcdStore

PREFIX = "/bench-wireguard/network"
STACK = Stack(label="wireguard ", prefix=PREFIX, dual=False, agent_name="agent-wg")
DEVICE = "flannel-wg"


def peer_key(i: int) -> str:
    """The i-th peer's public key: 32 bytes (any 32 bytes are a key to configure)."""
    return base64.b64encode(hashlib.sha256(f"bench peer {i}".encode()).digest()).decode()


def lease(i: int) -> bytes:
    return LeaseValue(public_ip=peer_ip(i), backend_type="wireguard",
                      backend_data={"PublicKey": peer_key(i), "Port": 51820}).encode()


def config() -> dict[str, Any]:
    return {"Network": str(NETWORK), "SubnetLen": 24, "Backend": {"Type": "wireguard"}}


# -- the join ---------------------------------------------------------------------------


async def join(world: World, store: EtcdStore, n: int, *, limit: float, idle: float
               ) -> dict[str, Any]:
    """The agent starting into n wireguard peers, beside `wg setconf` of the same peers."""
    for dev in ("flannel.1", "flannel-v6.1"):  # the vxlan agents' (and their routes)
        sh("ip", "link", "del", dev, check=False)
    layout = KeyLayout(PREFIX)
    await store.put(layout.config_key, json.dumps(config()).encode())
    await _bounded(store.put(layout.lease_key(peer_subnet(i)), lease(i)) for i in range(1, n + 1))
    reference = reference_setconf(world, n)
    own_dir = world.dir / "wireguard-host"
    control = WireguardGo(socket_dir=own_dir)
    ready = ReadyListener(world.dir / "wg-notify.sock")
    agent = world.agent(extra_env={"NOTIFY_SOCKET": str(ready.path)},
                        metrics_port=free_port(), stack=STACK)
    agent.argv = own_wireguard_dir_argv(own_dir, agent.argv)
    started = time.perf_counter()
    agent.start()
    try:
        device_at = first_at = None
        deadline = started + limit
        while True:
            config_now = await control.read(DEVICE)
            now = time.perf_counter()
            if config_now is not None and device_at is None:
                device_at = now
            peers = len(config_now.peers) if config_now is not None else 0
            if peers and first_at is None:
                first_at = now
            if peers >= n:
                break
            if now > deadline or not agent.alive():
                raise RuntimeError(f"the wireguard agent has {peers} of {n} peers after "
                                   f"{now - started:.1f}s; see {agent.log}")
            await asyncio.sleep(0.02)
        in_place = now
        ready_at = await asyncio.wait_for(asyncio.shield(ready.ready), limit)
        cpu0 = proc_sample(agent.pid)["cpu"]
        await asyncio.sleep(idle)
        cpu1 = proc_sample(agent.pid)
        result = {
            "peers": n,
            "start_to_peers_s": in_place - started,
            "start_to_ready_s": ready_at - started,
            "start_to_device_s": (device_at or in_place) - started,
            "device_to_peers_s": in_place - (device_at or started),
            "reference": reference,
            "ratio_device_to_peers_vs_setconf": (in_place - (device_at or started))
            / reference["seconds"],
            "idle_seconds": idle,
            "idle_cpu_percent": (cpu1["cpu"] - cpu0) / idle * 100,
            "rss_mib": cpu1["rss"] / 2**20,
        }
    finally:
        ready.close()
        agent.stop()
        stop_wireguard_go(None, world.host_ns)
        stop_wireguard_go(world.ref_ns, world.ref_ns)
    return result


def reference_setconf(world: World, n: int) -> dict[str, Any]:
    """`wg setconf` of the same n peers onto a fresh wireguard-go device (the same
    program the agent drives), in the reference namespace with its own socket dir."""
    own = world.dir / "wireguard-ref"
    conf = world.dir / "wg-ref.conf"
    lines = ["[Interface]", "ListenPort = 51820",
             f"PrivateKey = {base64.b64encode(hashlib.sha256(b'ref').digest()).decode()}"]
    for i in range(1, n + 1):
        lines += ["[Peer]", f"PublicKey = {peer_key(i)}", f"Endpoint = {peer_ip(i)}:51820",
                  f"AllowedIPs = {peer_subnet(i)}"]
    conf.write_text("\n".join(lines) + "\n")
    ns = ["ip", "netns", "exec", world.ref_ns]
    sh(*ns, *own_wireguard_dir_argv(own, [shutil.which("wireguard-go") or "wireguard-go",
                                           DEVICE]))
    started = time.perf_counter()
    sh(*ns, *own_wireguard_dir_argv(own, ["wg", "setconf", DEVICE, str(conf)]))
    elapsed = time.perf_counter() - started
    shown = sh(*ns, *own_wireguard_dir_argv(own, ["wg", "show", DEVICE, "peers"])).split()
    if len(shown) != n:
        raise RuntimeError(f"reference: {len(shown)} peers after wg setconf, expected {n}")
    return {"seconds": elapsed, "peers": n, "tool": "wg setconf"}


def stop_wireguard_go(netns: str | None, link_ns: str) -> None:
    """Delete the device (wireguard-go then exits); stop what is left by PID."""
    sh("ip", "-n", link_ns, "link", "del", DEVICE, check=False)
    deadline = time.monotonic() + 5
    while (left := wireguard_go_processes(DEVICE, netns)) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid, _start in left:
        os.kill(pid, signal.SIGKILL)


# -- the lab: throughput, rotations, repairs ---------------------------------------------


def lab_figures(*, seconds: float, rotations: int, removals: int) -> dict[str, Any]:
    """Two lab hosts on vxlan, then on wireguard: iperf3 each (and the underlay), then
    rotations and hand removals on wireguard."""
    out: dict[str, Any] = {"throughput": {}}
    tag = os.getpid() % 10000
    for backend in ("vxlan", "wireguard"):
        with Lab(f"bt{backend[0]}{tag}", backend=backend) as lab:
            lab.up(2, 1)
            if not lab.wait_reachable(timeout=15).all_ok:
                raise RuntimeError(f"{backend} lab: containers do not reach each other")
            h1, h2 = lab.hosts[1], lab.hosts[2]
            if backend == "vxlan":
                out["throughput"]["underlay"] = iperf3(h2.ns, h1.ns, str(h2.public_ip), seconds)
            out["throughput"][backend] = iperf3(h2.containers[0].ns, h1.containers[0].ns,
                                                str(h2.containers[0].ip), seconds)
            out["throughput"][backend]["mtu"] = h1.mtu
            if backend == "wireguard":
                out["rotations"] = [rotate(lab) for _ in range(rotations)]
                out["removals_ms"] = [remove_by_hand(lab) for _ in range(removals)]
    t = out["throughput"]
    t["wireguard_vs_vxlan"] = t["wireguard"]["bits_per_second"] / t["vxlan"]["bits_per_second"]
    return out


def iperf3(server_ns: str, client_ns: str, server_ip: str, seconds: float) -> dict[str, Any]:
    """One bounded TCP run, client to server; iperf3's figures from its JSON."""
    server = subprocess.Popen(["ip", "netns", "exec", server_ns, "iperf3", "-s", "-1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.3)
        raw = sh("ip", "netns", "exec", client_ns, "iperf3", "-c", server_ip, "-t",
                 f"{seconds:g}", "-J")
    finally:
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    end = json.loads(raw)["end"]
    return {"bits_per_second": end["sum_received"]["bits_per_second"],
            "retransmits": end["sum_sent"].get("retransmits"),
            "sender_cpu_percent": end["cpu_utilization_percent"]["host_total"],
            "receiver_cpu_percent": end["cpu_utilization_percent"]["remote_total"],
            "seconds": seconds}


def rotate(lab: Lab) -> dict[str, Any]:
    """One rotation of h1's key under pings both ways (every 20 ms for 3 s)."""
    h1, h2 = lab.hosts[1], lab.hosts[2]
    count, interval = 150, 0.02
    pings = [lab.ping_background(h2.containers[0].ns, h1.containers[0].ip, count=count,
                                 interval=interval),
             lab.ping_background(h1.containers[0].ns, h2.containers[0].ip, count=count,
                                 interval=interval)]
    time.sleep(0.5)
    lab.stop_agent(h1)
    (h1.dir / "state" / "wireguard-key").unlink()
    lab.start_agent(h1)
    lab.wait_ready(h1)
    result: dict[str, Any] = {"pings_each_way": count, "interval_ms": interval * 1000}
    for name, p in zip(("to_rotating_host", "from_rotating_host"), pings, strict=True):
        out = p.communicate(timeout=30)[0]
        sent, received = parse_ping_summary(out)
        rtt = re.search(r"= [\d.]+/[\d.]+/([\d.]+)/", out)
        result[name] = {"lost": sent - received, "max_rtt_ms": float(rtt[1]) if rtt else None}
    time.sleep(1)
    return result


def remove_by_hand(lab: Lab) -> float:
    """`wg set flannel-wg peer <h2> remove` on h1: milliseconds until it is back."""
    h1, h2 = lab.hosts[1], lab.hosts[2]
    value = lab.lease_value(h2)
    assert value is not None
    key = str(value["BackendData"]["PublicKey"])  # type: ignore[index]
    lab.host_run(h1, ["wg", "set", DEVICE, "peer", key, "remove"])
    started = time.perf_counter()
    while key not in lab.host_run(h1, ["wg", "show", DEVICE, "peers"]).stdout:
        if time.perf_counter() - started > 10:
            raise RuntimeError("a peer removed by hand did not come back within 10 s")
        time.sleep(0.005)
    elapsed = (time.perf_counter() - started) * 1000
    time.sleep(0.6)
    return elapsed


# -- the table ----------------------------------------------------------------------------


Row = tuple[str, str, str, str, str, str]


def _gbit(x: dict[str, Any]) -> str:
    return f"{x['bits_per_second'] / 1e9:.2f} Gbit/s"


def rows(part: dict[str, Any], fmt: Any) -> list[Row]:
    out: list[Row] = []
    j = part.get("join")
    if j:
        ref = j["reference"]
        out.append((f"wireguard join {j['peers']} peers: device -> all peers",
                    fmt(j["device_to_peers_s"], " s"), f"wg setconf {fmt(ref['seconds'], ' s')}",
                    fmt(j["ratio_device_to_peers_vs_setconf"]), "-", "-"))
        out.append((f"wireguard join {j['peers']} peers: start -> all peers / READY",
                    f"{fmt(j['start_to_peers_s'])} / {fmt(j['start_to_ready_s'], ' s')}",
                    "-", "-", "-", "-"))
        out.append((f"wireguard idle CPU with {j['peers']} peers ({fmt(j['idle_seconds'])} s)",
                    fmt(j["idle_cpu_percent"], " %"), "-", "-", "-",
                    "the 0.5 s drift poll"))
    lab = part.get("lab")
    if lab:
        t = lab["throughput"]
        out.append(("throughput container -> container, wireguard-go",
                    _gbit(t["wireguard"]), f"vxlan {_gbit(t['vxlan'])}",
                    fmt(t["wireguard_vs_vxlan"]), "-", f"underlay {_gbit(t['underlay'])}"))
        rot = lab.get("rotations") or []
        if rot:
            lost = [r[d]["lost"] for r in rot for d in ("to_rotating_host", "from_rotating_host")]
            worst = max((r[d]["max_rtt_ms"] or 0) for r in rot
                        for d in ("to_rotating_host", "from_rotating_host"))
            out.append((f"key rotation, {len(rot)} times: pings lost (of 150 each way)",
                        f"max {max(lost)}, total {sum(lost)}", f"max RTT {fmt(worst, ' ms')}",
                        "-", "-", "-"))
        rem = lab.get("removals_ms") or []
        if rem:
            out.append((f"peer removed by hand, back after ({len(rem)} times)",
                        f"median {fmt(statistics.median(rem), ' ms')}",
                        f"max {fmt(max(rem), ' ms')}", "-", "< 1 s",
                        "met" if max(rem) < 1000 else "NOT met"))
    return out


async def run(world: World, store: EtcdStore, *, peers: int, idle: float, seconds: float,
              rotations: int, removals: int, limit: float) -> dict[str, Any]:
    out: dict[str, Any] = {}
    began = time.perf_counter()
    if peers > 0:
        out["join"] = await join(world, store, peers, limit=limit, idle=idle)
        print(f"  wireguard join: {out['join']['start_to_peers_s']:.2f}s to all "
              f"{peers} peers", flush=True, file=sys.stderr)
    if seconds > 0:
        out["lab"] = await asyncio.to_thread(lab_figures, seconds=seconds, rotations=rotations,
                                             removals=removals)
    out["seconds"] = time.perf_counter() - began
    return out

