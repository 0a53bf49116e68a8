"""End to end, the wireguard backend on wireguard-go (this kernel has no WireGuard
module): real namespaces, etcd, agents and wireguard-go, each lab host with its own
/run/wireguard (leaseagent.lab.agents).

What a user sees: containers on 3 hosts reach each other and the underlay carries
only WireGuard's UDP between the hosts (a capture, read packet by packet); an agent
killed and restarted keeps its key and loses no ping; a peer removed by hand is back
within 1 s, a deleted device within 2 s; a host gone from etcd is gone from every
device, also from one whose agent was down meanwhile; a key rotation reaches every
peer (the ping loss is measured); doctor shows a PSK that is not the config's; a
vxlan lease is refused with one line per host. A dual-stack lab reaches over both
families through flannel-wg and flannel-wg-v6.
"""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import time
from collections.abc import Callable, Iterator
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest
from labdoctor import doctor_flags
from polling import wait_for as _wait_for

from leaseagent.lab import CONTAINER_NETWORK, UNDERLAY, Host, Lab, parse_ping_summary, run, tool
from leaseagent.lab.probes import REPLY_WAIT

pytestmark = pytest.mark.root

WG_PORT = 51820
HOLD = 1  # --peer-hold-time: a vanished host leaves its peers' devices 1 s after its lease


def _lab(tag: str, *, hosts: int, ipv6: bool = False) -> Iterator[Lab]:
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces)")
    lab = Lab(f"wg{tag}{os.getpid() % 100000}", backend="wireguard", ipv6=ipv6,
              agent_args=["--peer-hold-time", str(HOLD)])
    try:
        lab.up(hosts, 1)
        assert lab.wait_reachable_all(timeout=10)[4].all_ok
        yield lab
    finally:
        warnings = lab.down()
        assert not warnings, warnings


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    """3 hosts x 1 container; each test leaves the 3 healthy hosts it found."""
    yield from _lab("", hosts=3)


def wg(lab: Lab, host: Host, *args: str) -> str:
    out = lab.host_run(host, ["wg", *args])
    assert out.returncode == 0, out.stderr
    return out.stdout


def peer_keys(lab: Lab, host: Host, device: str = "flannel-wg") -> set[str]:
    return set(wg(lab, host, "show", device, "peers").split())


def public_key(lab: Lab, host: Host) -> str:
    value = lab.lease_value(host)
    assert value is not None
    return str(value["BackendData"]["PublicKey"])  # type: ignore[index]


def doctor(lab: Lab, host: Host) -> subprocess.CompletedProcess[str]:
    """`leasectl doctor` on the host, with its agent's flags and its /run/wireguard."""
    return lab.host_run(host, [tool("leasectl"), "doctor", *doctor_flags(lab, host)], timeout=60)


def wait_for(what: str, check: Callable[[], bool], timeout: float) -> float:
    """Seconds until `check()` is true; AssertionError naming `what` after `timeout`."""
    return _wait_for(check, timeout=timeout, what=what, every=0.01)


# -- a capture of the underlay -------------------------------------------------------


def read_pcap(path: Path) -> list[bytes]:
    """The frames of a classic pcap file (tcpdump -w, Ethernet)."""
    data = path.read_bytes()
    magic = struct.unpack_from("<I", data)[0]
    order = "<" if magic in (0xA1B2C3D4, 0xA1B23C4D) else ">"
    assert struct.unpack_from(order + "I", data, 20)[0] == 1, "not Ethernet"
    frames, offset = [], 24
    while offset + 16 <= len(data):
        caplen = struct.unpack_from(order + "I", data, offset + 8)[0]
        frames.append(data[offset + 16:offset + 16 + caplen])
        offset += 16 + caplen
    return frames


def ipv4_packets(frames: list[bytes]) -> list[tuple[IPv4Address, IPv4Address, int, bytes]]:
    """(source, destination, protocol, payload) of each IPv4 packet."""
    out = []
    for frame in frames:
        if len(frame) < 34 or frame[12:14] != b"\x08\x00":
            continue
        ip = frame[14:]
        header = (ip[0] & 0x0F) * 4
        out.append((IPv4Address(ip[12:16]), IPv4Address(ip[16:20]), ip[9], ip[header:]))
    return out


def test_containers_reach_each_other_and_the_underlay_carries_only_wireguard(
        lab: Lab, tmp_path: Path) -> None:
    pcap = tmp_path / "underlay.pcap"
    capture = subprocess.Popen(
        ["ip", "netns", "exec", lab.ul_ns, "tcpdump", "-i", "ul0", "-U", "-n", "-s", "200",
         "-w", str(pcap)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        time.sleep(0.5)  # tcpdump is listening before the first ping
        reach = lab.reachability(wait=1)
        for c, h in lab.pairs():  # a few more, to see many packets
            lab.ping(c.ns, h.containers[0].ip, count=3, wait=1)
    finally:
        time.sleep(0.2)
        capture.send_signal(signal.SIGINT)
        capture.wait(10)
    assert reach.all_ok, "\n" + reach.format()
    hosts = {h.public_ip for h in lab.hosts.values()}
    between_hosts = [p for p in ipv4_packets(read_pcap(pcap)) if p[0] in hosts and p[1] in hosts]
    udp = [p for p in between_hosts if p[2] == 17]
    # Each pair of pings is a request and a reply, both ways: WireGuard data messages
    # (type 4) carried in UDP from and to port 51820, at least one per ping.
    data = [p for p in udp if struct.unpack_from("!HH", p[3]) == (WG_PORT, WG_PORT)
            and p[3][8] == 4]
    assert len(data) >= 2 * 3 * 4, f"{len(data)} WireGuard data messages"
    others = [p for p in between_hosts if p not in udp or struct.unpack_from("!HH", p[3])
              != (WG_PORT, WG_PORT)]
    assert others == [], f"{len(others)} packets between hosts that are not WireGuard's"
    # No container address anywhere on the underlay: no plaintext ICMP between them.
    inner = [p for p in ipv4_packets(read_pcap(pcap))
             if p[0] in CONTAINER_NETWORK or p[1] in CONTAINER_NETWORK]
    assert inner == [], f"{len(inner)} packets with a container address on the underlay"
    icmp = [p for p in ipv4_packets(read_pcap(pcap)) if p[2] == 1]
    assert all(p[0] in UNDERLAY and p[1] in UNDERLAY for p in icmp)
    for host in lab.hosts.values():
        assert host.mtu == 1440  # underlay 1500 - WireGuard's 60 over IPv4


def test_doctor_is_quiet_and_shows_the_public_key(lab: Lab) -> None:
    for host in lab.hosts.values():
        out = doctor(lab, host)
        assert out.returncode == 0, out.stdout + out.stderr
        assert f"(wireguard-go, public key {public_key(lab, host)})" in out.stdout
    listing = lab.leasectl("list", "-o", "wide")
    assert all(public_key(lab, h) in listing.stdout for h in lab.hosts.values())


def test_an_agent_killed_and_restarted_keeps_its_key_and_loses_no_ping(lab: Lab) -> None:
    h1, h2 = lab.hosts[1], lab.hosts[2]
    key, pid = public_key(lab, h1), lab.host_run(h1, ["pgrep", "-x", "wireguard-go"]).stdout
    pings = lab.ping_run(h2.containers[0].ns, h1.containers[0].ip, interval=0.02)
    try:
        time.sleep(0.5)
        lab.stop_agent(h1, sig=signal.SIGKILL)
        lab.start_agent(h1)
        lab.wait_ready(h1)
        time.sleep(REPLY_WAIT + 0.5)  # every ping sent during the restart is settled
        assert pings.running(), "the ping stopped by itself"
    finally:
        sent, lost, out = pings.stop()
    assert sent > 0 and lost == [], out
    assert public_key(lab, h1) == key
    assert key in peer_keys(lab, h2)
    # The device is the one from before: the same wireguard-go kept it.
    assert set(lab.host_run(h1, ["pgrep", "-x", "wireguard-go"]).stdout.split()) & set(pid.split())


def test_a_peer_removed_by_hand_is_back_within_1s(lab: Lab) -> None:
    h1, h2 = lab.hosts[1], lab.hosts[2]
    key = public_key(lab, h2)
    before = lab.metrics(h1).get('leaseagent_dataplane_drift_repairs_total{kind="peer"}', 0)
    wg(lab, h1, "set", "flannel-wg", "peer", key, "remove")
    took = wait_for("the removed peer back", lambda: key in peer_keys(lab, h1), 1.0)
    print(f"peer removed by hand back after {took * 1000:.0f} ms")
    assert lab.metrics(h1)['leaseagent_dataplane_drift_repairs_total{kind="peer"}'] == before + 1
    assert lab.wait_reachable(timeout=5).all_ok


def test_a_deleted_device_is_made_anew_within_2s(lab: Lab) -> None:
    h1 = lab.hosts[1]
    assert lab.host_run(h1, ["ip", "link", "del", "flannel-wg"]).returncode == 0
    took = wait_for("all pairs reachable", lambda: lab.reachability(wait=0.2).all_ok, 2.0)
    print(f"device deleted by hand: all pairs reachable again after {took:.2f}s")
    assert len(peer_keys(lab, h1)) == 2


def test_a_host_gone_from_etcd_is_gone_from_every_device(lab: Lab) -> None:
    h4 = lab.add_host(containers=1)
    h1 = lab.hosts[1]
    try:
        assert lab.wait_reachable(timeout=5).all_ok
        key = public_key(lab, h4)
        assert all(key in peer_keys(lab, h) for h in lab.hosts.values() if h is not h4)
        lab.stop_agent(h1)  # down while h4 goes: its agent finds out at start
        lab.remove_host(h4)
        lab.delete_lease(h4)
        others = [lab.hosts[2], lab.hosts[3]]
        took = wait_for("h4's peer gone from h2 and h3",
                        lambda: all(key not in peer_keys(lab, h) for h in others), HOLD + 2)
        print(f"a deleted lease's peer gone from the running hosts after {took:.2f}s")
        assert key in peer_keys(lab, h1)  # h1's agent is down: nothing touched it
    finally:
        if not lab.agent_alive(h1):
            lab.start_agent(h1)
        lab.wait_ready(h1)
    assert key not in peer_keys(lab, h1)  # removed by the full sync at start
    assert lab.wait_reachable(timeout=5).all_ok


def test_a_key_rotation_reaches_every_peer(lab: Lab) -> None:
    h1, h2, h3 = lab.hosts[1], lab.hosts[2], lab.hosts[3]
    old = public_key(lab, h1)
    count, interval = 150, 0.02
    pings = [lab.ping_background(h2.containers[0].ns, h1.containers[0].ip, count=count,
                                 interval=interval),
             lab.ping_background(h1.containers[0].ns, h3.containers[0].ip, count=count,
                                 interval=interval)]
    time.sleep(0.5)
    # The documented rotation (README, "WireGuard"): stop, remove the key, start.
    lab.stop_agent(h1)
    (h1.dir / "state" / "wireguard-key").unlink()
    lab.start_agent(h1)
    lab.wait_ready(h1)
    new = public_key(lab, h1)
    assert new != old
    wait_for("the new key on every peer", lambda: all(
        new in peer_keys(lab, h) and old not in peer_keys(lab, h) for h in (h2, h3)), 2.0)
    received = [parse_ping_summary(p.communicate(timeout=30)[0]) for p in pings]
    lost = [s - r for s, r in received]
    print(f"key rotation: {lost[0]} of {count} pings lost towards the rotating host, "
          f"{lost[1]} of {count} from it (one every {interval * 1000:.0f} ms)")
    # Usually none (docs/benchmarks.md has the figures of many rotations); the bound
    # is WireGuard's own: a handshake is retried after 5 s (plus up to 1/3 s of jitter).
    # Two retries: one CI run lost 99 of 150 pings towards h1 and was not through
    # within one (6 s); every run here since lost none.
    reach = lab.wait_reachable(timeout=12)
    assert reach.all_ok, reach.format()
    assert "now has public key " + new in h1.log_file.read_text()


def test_a_psk_that_is_not_the_configs_shows_in_doctor(lab: Lab, tmp_path: Path) -> None:
    h1, h2 = lab.hosts[1], lab.hosts[2]
    lab.stop_agent(h1)  # SIGTERM keeps the device: doctor sees it as it is
    try:
        wrong = tmp_path / "psk"
        wrong.write_text(subprocess.run(["wg", "genpsk"], capture_output=True, text=True,
                                        check=True).stdout)
        wg(lab, h1, "set", "flannel-wg", "peer", public_key(lab, h2), "preshared-key",
           str(wrong))
        out = doctor(lab, h1)
        assert out.returncode == 1, out.stdout
        assert f"wrong peer {public_key(lab, h2)} dev flannel-wg (preshared key psk:" in out.stdout
        assert "is not the network config's PSK" in out.stdout
        assert wrong.read_text().strip() not in out.stdout
    finally:
        lab.start_agent(h1)
        lab.wait_ready(h1)
    wait_for("doctor quiet again", lambda: doctor(lab, h1).returncode == 0, 5)


def test_a_vxlan_lease_is_refused_with_one_line_per_host(lab: Lab) -> None:
    key = lab.keys.lease_key(IPv4Network("10.244.0.0/24"))
    value = {"PublicIP": "10.250.0.99", "PublicIPv6": None, "BackendType": "vxlan",
             "BackendData": {"VNI": 1, "VtepMAC": "0a:00:00:00:00:99"}}
    lab.etcdctl("put", key, json.dumps(value))
    try:
        line = ("10.244.0.0/24 (10.250.0.99) runs the vxlan backend, which this host's wireguard "
                "backend does not serve")
        for host in lab.hosts.values():
            wait_for(f"{host.name} says so", lambda h=host: line in h.log_file.read_text(), 3)
            assert lab.metrics(host)["leaseagent_dataplane_foreign_peers"] == 1
        lab.etcdctl("put", key, json.dumps(value))  # again: no second line
        time.sleep(0.3)
        for host in lab.hosts.values():
            assert host.log_file.read_text().count(line) == 1
            assert lab.agent_alive(host)
    finally:
        lab.etcdctl("del", key)
    for host in lab.hosts.values():
        wait_for("counted no more",
                 lambda h=host: lab.metrics(h).get("leaseagent_dataplane_foreign_peers") == 0, 3)


def _config_change(lab: Lab, backend: dict[str, object], what: str,
                   converged: Callable[[], bool]) -> int:
    """Write the config in force with `backend` merged in while every container pings the
    next host's every 20 ms (for at most 4 s: the pings stop 0.3 s after it converged);
    the pings lost (printed with how long it took)."""
    hosts = list(lab.hosts.values())
    config = json.loads(lab.etcdctl("get", lab.keys.config_key, "--print-value-only"))
    config["Backend"] = {**config["Backend"], **backend}
    procs = [lab.ping_background(h.containers[0], hosts[(i + 1) % len(hosts)].containers[0].ip,
                                 count=200, interval=0.02) for i, h in enumerate(hosts)]
    try:
        time.sleep(0.3)
        lab.etcdctl("put", lab.keys.config_key, json.dumps(config))
        revision = int(json.loads(lab.etcdctl("get", lab.keys.config_key, "-w", "json")
                                  )["kvs"][0]["mod_revision"])
        took = wait_for(what, lambda: all(
            lab.metrics(h).get("leaseagent_network_config_revision") == revision
            for h in hosts) and converged(), 10)
        time.sleep(0.3)
    finally:
        for p in procs:  # SIGINT: ping stops and prints its summary
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        outcomes = [parse_ping_summary(p.communicate(timeout=60)[0]) for p in procs]
    lost = sum(sent - got for sent, got in outcomes)
    each = ", ".join(f"{h.name}->{hosts[(i + 1) % len(hosts)].name} {sent - got}/{sent}"
                     for i, (h, (sent, got)) in enumerate(zip(hosts, outcomes, strict=True)))
    print(f"\nconfig change {what}: converged in {took:.2f} s, {lost} of "
          f"{sum(sent for sent, _ in outcomes)} pings lost ({each})")
    return lost


def test_listen_port_and_mode_changes_while_pinging(lab: Lab) -> None:
    """Backend.ListenPort and Mode changed in running agents: each device takes the new
    port, each lease publishes it, every pair reaches again; the pings lost printed."""
    hosts = list(lab.hosts.values())

    def port_is(port: int) -> Callable[[], bool]:
        return lambda: all(wg(lab, h, "show", "flannel-wg", "listen-port").strip() == str(port)
                           and lab.lease_value(h)["BackendData"]["Port"] == port  # type: ignore[index]
                           for h in hosts) and lab.reachability(wait=0.2).all_ok

    lost = [_config_change(lab, {"ListenPort": 51830}, "ListenPort 51820 -> 51830",
                           port_is(51830)),
            _config_change(lab, {"ListenPort": 51820}, "ListenPort 51830 -> 51820",
                           port_is(51820)),
            _config_change(lab, {"Mode": "auto"}, "Mode separate -> auto", port_is(51820)),
            _config_change(lab, {"Mode": "separate"}, "Mode auto -> separate",
                           port_is(51820))]
    print(f"wireguard config change pings lost: {lost}")
    # The old port was redirected to the new one (a peer still sending there loses
    # nothing), and the redirect is gone --peer-hold-time after.
    for host in hosts:
        log = host.log_file.read_text()
        assert "IPv4 UDP 51820 -> 51830 redirected" in log
        assert "IPv4 UDP 51830 -> 51820 redirected" in log
    wait_for("the redirects removed", lambda: all(
        lab.host_run(h, ["nft", "list", "table", "inet", "leaseagent-ports"]).returncode != 0
        for h in hosts), HOLD + 5)


def test_dual_stack_reaches_over_both_families() -> None:
    for lab6 in _lab("6", hosts=2, ipv6=True):
        reach = lab6.wait_reachable_all(timeout=10)
        assert all(r.all_ok for r in reach.values()), {f: r.format() for f, r in reach.items()}
        for host in lab6.hosts.values():
            assert host.mtu == 1420  # the smaller: flannel-wg-v6, 1500 - 80
            other = next(h for h in lab6.hosts.values() if h is not host)
            assert public_key(lab6, other) in peer_keys(lab6, host, "flannel-wg-v6")
            shown = wg(lab6, host, "show", "flannel-wg-v6", "endpoints")
            assert f"[{other.public_ipv6}]:51821" in shown
            assert doctor(lab6, host).returncode == 0


def test_real_docker_containers_reach_over_wireguard() -> None:
    from leaseagent.lab.docker import unavailable

    if why := unavailable():
        pytest.skip(f"dockerd cannot run here: {why}")
    lab = Lab(f"wgd{os.getpid() % 100000}", backend="wireguard", docker=True)
    try:
        lab.up(2, 1)
        reach = lab.wait_reachable(timeout=15)
        assert reach.all_ok, reach.format()
        for host in lab.hosts.values():
            mtu = run(host.containers[0].exec_argv(["cat", "/sys/class/net/eth0/mtu"]))
            assert mtu.strip() == "1440"  # dockerd --mtu=$FLANNEL_MTU, WireGuard's over IPv4
    finally:
        warnings = lab.down()
        assert not warnings, warnings
