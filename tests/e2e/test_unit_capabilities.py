"""The unit's capabilities are exactly what the agent's tools need: each tool run as the
agent runs it, in a network namespace made here, by a process that has only the
capabilities systemd/leaseagent.service gives (`setpriv`: bounding, inheritable and
ambient sets, as AmbientCapabilities= with CapabilityBoundingSet= leaves a root
service).

With the unit's set, the whole ruleset (masquerade, FORWARD, the VXLAN peer filter
with its ipset) is written and read back by iptables and by nftables, both families,
and wireguard-go makes its TUN device. Each capability of the set is needed: without
CAP_NET_RAW iptables-restore fails ("Can't open socket to ipset", the set match asks
the kernel for the set on a raw socket), without CAP_NET_ADMIN nothing is written.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from leaseagent.lab import netns

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)"),
              pytest.mark.skipif(shutil.which("setpriv") is None, reason="setpriv not installed")]

UNIT = Path(__file__).parents[2] / "systemd" / "leaseagent.service"

# The agent's own firewall code, its keeper and the pure ruleset, run in the caller's
# namespace; one line per tool and family, exit 1 if any is not in place.
APPLY = """
import asyncio, sys
from ipaddress import ip_address, ip_network
from leaseagent.core.rules import TrafficSettings, ruleset
from leaseagent.dataplane.firewall import RulesKeeper, firewall

async def main(tool):
    bad = 0
    for family, net, own, peer in ((4, "10.5.0.0/16", "10.5.3.0/24", "10.99.0.2"),
                                   (6, "fd00:5::/48", "fd00:5:3::/64", "fd99::2")):
        wanted = ruleset(TrafficSettings(ip_masq=True, nftables=tool == "nftables"),
                         network=ip_network(net), own_subnet=ip_network(own),
                         vxlan_ports=(8472,), peers=frozenset({ip_address(peer)}))
        keeper = RulesKeeper(firewall(nftables=tool == "nftables", family=family))
        await keeper.sync(wanted)
        left = await keeper.sync() if keeper.status.in_sync else None
        ok = keeper.status.in_sync and not left
        print(f"{tool} IPv{family}: {'ok' if ok else keeper.status.last_error or left}")
        bad |= not ok
    return bad

sys.exit(asyncio.run(main(sys.argv[1])))
"""


def unit_capabilities() -> list[str]:
    """CapabilityBoundingSet= of the unit (and AmbientCapabilities=, which must match)."""
    found: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        key, _, value = line.partition("=")
        if key in ("CapabilityBoundingSet", "AmbientCapabilities"):
            found[key] = value.split()
    assert found["CapabilityBoundingSet"] == found["AmbientCapabilities"], found
    return found["CapabilityBoundingSet"]


def only(caps: list[str]) -> list[str]:
    """setpriv's prefix: root, but with no capability other than `caps`."""
    names = ",".join(["-all", *("+" + c.removeprefix("CAP_").lower() for c in caps)])
    return ["setpriv", f"--bounding-set={names}", f"--inh-caps={names}",
            f"--ambient-caps={names}", "--"]


@pytest.fixture
def host_ns() -> Iterator[str]:
    made = netns.Namespaces()
    try:
        ns = made.add(f"cap{secrets.token_hex(3)}")
        netns.link_up(ns, "lo")
        yield ns
    finally:
        made.close()


def apply_rules(ns: str, caps: list[str], tool: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", ns, *only(caps), sys.executable, "-c", APPLY,
                           tool], capture_output=True, text=True, timeout=60, check=False)


def test_the_unit_grants_net_admin_and_net_raw_only() -> None:
    assert sorted(unit_capabilities()) == ["CAP_NET_ADMIN", "CAP_NET_RAW"]


@pytest.mark.parametrize("tool", ["iptables", "nftables"])
def test_the_rules_are_written_with_the_units_capabilities(host_ns: str, tool: str) -> None:
    result = apply_rules(host_ns, unit_capabilities(), tool)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.split("\n")[:2] == [f"{tool} IPv4: ok", f"{tool} IPv6: ok"]


def test_iptables_needs_net_raw_for_the_ipset_match(host_ns: str) -> None:
    result = apply_rules(host_ns, [c for c in unit_capabilities() if c != "CAP_NET_RAW"],
                         "iptables")
    assert result.returncode == 1
    assert "iptables-restore --noflush: " in result.stdout
    assert "Can't open socket to ipset" in result.stdout, result.stdout


@pytest.mark.parametrize("tool", ["iptables", "nftables"])
def test_nothing_is_written_without_net_admin(host_ns: str, tool: str) -> None:
    result = apply_rules(host_ns, [c for c in unit_capabilities() if c != "CAP_NET_ADMIN"], tool)
    assert result.returncode == 1, result.stdout
    assert ": ok" not in result.stdout, result.stdout


@pytest.mark.skipif(shutil.which("wireguard-go") is None, reason="wireguard-go not installed")
def test_wireguard_go_makes_its_device_with_the_units_capabilities(host_ns: str) -> None:
    name = f"wgcap{secrets.token_hex(2)}"
    proc = subprocess.Popen(["ip", "netns", "exec", host_ns, *only(unit_capabilities()),
                             "wireguard-go", "-f", name],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "WG_PROCESS_FOREGROUND": "1"})
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            shown = subprocess.run(["ip", "-n", host_ns, "link", "show", name],
                                   capture_output=True, text=True, check=False)
            if shown.returncode == 0:
                break
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            time.sleep(0.05)
        assert shown.returncode == 0, "wireguard-go made no device within 10 s"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        Path(f"/var/run/wireguard/{name}.sock").unlink(missing_ok=True)


def unit_setting(key: str) -> str:
    values = [line.partition("=")[2] for line in UNIT.read_text().splitlines()
              if line.partition("=")[0] == key]
    assert len(values) == 1, (key, values)
    return values[0]


def allowed_syscalls(filter_set: str) -> set[str]:
    """The system calls systemd's SystemCallFilter= set lets through (its groups expanded,
    as systemd-analyze lists them)."""
    listing = subprocess.run(["systemd-analyze", "syscall-filter"], capture_output=True,
                             text=True, check=True).stdout
    groups: dict[str, list[str]] = {}
    current = None
    for line in listing.splitlines():
        if line.startswith("@"):
            current = line.strip()
            groups[current] = []
        elif line.strip() and not line.strip().startswith("#") and current is not None:
            groups[current].append(line.strip())

    def expand(name: str) -> set[str]:
        return set().union(*(expand(i) if i.startswith("@") else {i} for i in groups[name]))

    return expand(filter_set)


def traced_calls(trace: Path) -> tuple[set[str], set[str]]:
    """(system calls, socket address families) in an `strace -f` output file."""
    calls: set[str] = set()
    families: set[str] = set()
    for line in trace.read_text().splitlines():
        words = line.split(None, 1)
        if len(words) < 2 or not words[0].isdigit():
            continue
        name, paren, rest = words[1].partition("(")
        if paren and name.replace("_", "").isalnum():
            calls.add(name)
            if name == "socket":
                families.add(rest.split(",", 1)[0])
    return calls, families


@pytest.mark.skipif(shutil.which("strace") is None or shutil.which("systemd-analyze") is None,
                    reason="needs strace and systemd-analyze")
def test_the_tools_stay_inside_the_units_syscall_filter_and_address_families(
        host_ns: str, tmp_path: Path) -> None:
    """Every system call and socket family the agent's firewall code and the iptables,
    ipset and nft it runs use is one the unit's SystemCallFilter= and
    RestrictAddressFamilies= allow, and none maps memory writable and executable
    (MemoryDenyWriteExecute=): the sandbox does not break them."""
    traces = []
    for tool in ("iptables", "nftables"):
        trace = tmp_path / f"{tool}.trace"
        result = subprocess.run(
            ["ip", "netns", "exec", host_ns, "strace", "-f", "-qq", "-o", str(trace),
             *only(unit_capabilities()), sys.executable, "-c", APPLY, tool],
            capture_output=True, text=True, timeout=120, check=False)
        assert result.returncode == 0, result.stdout + result.stderr
        traces.append(trace)
    calls: set[str] = set()
    families: set[str] = set()
    for trace in traces:
        more_calls, more_families = traced_calls(trace)
        calls |= more_calls
        families |= more_families
    assert "setns" not in calls and "mount" not in calls  # the trace began inside the namespace
    assert calls - allowed_syscalls(unit_setting("SystemCallFilter")) == set()
    assert families <= set(unit_setting("RestrictAddressFamilies").split()), families
    assert {"AF_INET", "AF_NETLINK"} <= families  # the set match's raw socket, netlink
    # MemoryDenyWriteExecute=yes: no mapping is ever writable and executable at once.
    assert unit_setting("MemoryDenyWriteExecute") == "yes"
    for trace in traces:
        both = [line for line in trace.read_text().splitlines()
                if line.split(None, 1)[-1].startswith(("mmap(", "mprotect(", "pkey_mprotect("))
                and "PROT_WRITE" in line and "PROT_EXEC" in line]
        assert not both, both[:3]
