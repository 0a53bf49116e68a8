"""The IPv6 traffic rules on a real kernel, with nftables (`table ip6 leaseagent`) and with
ip6tables (chains LEASEAGENT-*, ipset leaseagent-vxlan-peers6 of family inet6): written,
read back and compared clean; each kind of tampering found and put right by
`RulesKeeper.sync(repair=True)`; the IPv6 peer filter dropping VXLAN from a non-peer and
letting a peer's through; IPv4 and IPv6 keepers in one namespace leaving each other
alone; `leasectl cleanup` removing both families with both tools.

Everything happens in namespaces this module creates and always deletes (the `ns`
fixture); the root namespace's firewall is never read or written.
"""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import shutil
import sys
import time
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from pathlib import Path

import pytest

from leaseagent.core.rules import ObservedRules, Ruleset, TrafficSettings, compare, ruleset
from leaseagent.dataplane.firewall import Firewall, RulesKeeper, firewall
from leaseagent.errors import ConfigError
from leaseagent.lab import netns

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(os.geteuid() != 0,
                                 reason="needs root (network namespaces, nftables, ip6tables)")]

MODES = ["nftables", "iptables"]
NET6, POD6 = IPv6Network("fd10::/48"), IPv6Network("fd10:0:0:22::/64")
NET4, POD4 = IPv4Network("10.5.0.0/16"), IPv4Network("10.5.34.0/24")
PEER6 = IPv6Address("fd99::2")  # the sender's admitted address in the traffic test
STRANGER6 = IPv6Address("fd99::3")  # its other address, no peer's
PEERS6 = frozenset({PEER6, IPv6Address("2001:db8::8")})
PEERS4 = frozenset({IPv4Address("10.250.0.7"), IPv4Address("10.250.0.8")})
PORT = 8472


def wanted(family: int, peers: frozenset[IPv4Address] | frozenset[IPv6Address] | None = None,
           ) -> Ruleset:
    """All of one family's rules: masquerade, forward, the peer filter."""
    net, pod, default = (NET6, POD6, PEERS6) if family == 6 else (NET4, POD4, PEERS4)
    return ruleset(TrafficSettings(ip_masq=True), network=net, own_subnet=pod, vxlan_ports=(PORT,),
                   peers=default if peers is None else peers)


@pytest.fixture
def ns() -> Iterator[str]:
    """A namespace of this test's own, deleted afterwards whatever happened (its
    tables, chains and ipsets go with it)."""
    spaces = netns.Namespaces()
    try:
        yield spaces.add(f"lafw6-{os.getpid() % 100000}-{secrets.token_hex(3)}")
    finally:
        assert not spaces.close()


def fw_in(ns: str, mode: str, family: int) -> Firewall:
    try:
        return firewall(nftables=mode == "nftables", family=family, netns=ns)
    except ConfigError as exc:
        pytest.skip(str(exc))


async def sh(ns: str, *argv: str, check: bool = True) -> str:
    """`argv` inside `ns`, without blocking the loop (keepers may be running)."""
    proc = await asyncio.create_subprocess_exec(
        *netns.exec_argv(ns, argv), stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(argv)}: {err.decode().strip()}")
    return out.decode()


async def in_sync(fw: Firewall, want: Ruleset) -> bool:
    return compare(want, await fw.observe()) == []


# ------------------------------------------------------------------ written and read back


@pytest.mark.parametrize("mode", MODES)
async def test_the_ipv6_rules_are_written_as_designed_and_compare_clean(ns: str, mode: str) -> None:
    fw = fw_in(ns, mode, 6)
    keeper = RulesKeeper(fw)
    first = await keeper.sync(wanted(6))
    assert {d.kind for d in first} == {"missing", "unhooked", "peers"}  # nothing was there
    assert await keeper.sync(wanted(6)) == []
    assert keeper.status.in_sync and keeper.status.repairs == {}
    if mode == "nftables":
        text = await sh(ns, "nft", "list", "table", "ip6", "leaseagent")
        assert "type ipv6_addr" in text
        assert re.search(r"elements = \{ 2001:db8::8,\s+fd99::2 \}", text)
        assert "ip6 saddr fd10::/48 ip6 daddr != ff00::/8 masquerade fully-random" in text
        assert "udp dport 8472 ip6 saddr != @vxlan_peers counter" in text
        assert await sh(ns, "nft", "list", "table", "ip", "leaseagent", check=False) == ""
    else:
        nat = await sh(ns, "ip6tables-save", "-t", "nat")
        jump = [line for line in nat.splitlines() if line.startswith("-A POSTROUTING")]
        assert jump == ['-A POSTROUTING -m comment --comment "leaseagent:jump:postrouting" '
                        "-j LEASEAGENT-POSTROUTING"]
        assert re.search(r"-A LEASEAGENT-POSTROUTING -s fd10::/48 ! -d ff00::/8 .*"
                         r"-j MASQUERADE --random-fully", nat)
        filt = await sh(ns, "ip6tables-save", "-t", "filter")
        assert "--match-set leaseagent-vxlan-peers6 src -j DROP" in filt
        header = await sh(ns, "ipset", "list", "-t", "leaseagent-vxlan-peers6")
        assert "family inet6" in header and "Number of entries: 2" in header
        assert "LEASEAGENT" not in await sh(ns, "iptables-save")  # IPv4's tables untouched
        assert await sh(ns, "ipset", "list", "-n") == "leaseagent-vxlan-peers6\n"


# ------------------------------------------------------------------ tampering repaired


async def _nft_rule_handle(ns: str, chain: str) -> str:
    text = await sh(ns, "nft", "-a", "list", "chain", "ip6", "leaseagent", chain)
    return re.findall(r"# handle (\d+)", text)[-1]


TAMPERING: dict[str, list[tuple[str, list[str], set[str]]]] = {
    # name, command (`HANDLE` replaced by a rule's handle in forward), kinds found
    "nftables": [
        ("flush our chain", ["nft", "flush", "chain", "ip6", "leaseagent", "postrouting"],
         {"missing"}),
        ("delete a rule", ["nft", "delete", "rule", "ip6", "leaseagent", "forward", "handle",
                           "HANDLE"], {"missing"}),
        ("insert a rule", ["nft", "insert", "rule", "ip6", "leaseagent", "input", "drop"],
         {"extra"}),
        ("delete a peer", ["nft", "delete", "element", "ip6", "leaseagent", "vxlan_peers",
                           "{ fd99::2 }"], {"peers"}),
        ("flush the ruleset", ["nft", "flush", "ruleset"], {"missing", "unhooked", "peers"}),
    ],
    "iptables": [
        ("flush our chain", ["ip6tables", "-t", "nat", "-F", "LEASEAGENT-POSTROUTING"],
         {"missing"}),
        ("delete a rule", ["ip6tables", "-D", "LEASEAGENT-FORWARD", "1"], {"missing"}),
        ("unhook a chain", ["ip6tables", "-D", "INPUT", "1"], {"unhooked"}),
        ("delete a peer", ["ipset", "del", "leaseagent-vxlan-peers6", "fd99::2"], {"peers"}),
        ("flush the nat table", ["ip6tables", "-t", "nat", "-F"], {"missing", "unhooked"}),
    ],
}


@pytest.mark.parametrize("mode", MODES)
async def test_each_tampering_is_found_and_repaired(ns: str, mode: str) -> None:
    fw = fw_in(ns, mode, 6)
    keeper = RulesKeeper(fw)
    await keeper.sync(wanted(6))
    for name, argv, kinds in TAMPERING[mode]:
        if "HANDLE" in argv:
            handle = await _nft_rule_handle(ns, "forward")
            argv = [handle if a == "HANDLE" else a for a in argv]
        await sh(ns, *argv)
        assert not await in_sync(fw, wanted(6)), name
        found = await keeper.sync(repair=True)
        assert {d.kind for d in found} == kinds, (name, found)
        assert await in_sync(fw, wanted(6)), name
    assert sum(keeper.status.repairs.values()) >= len(TAMPERING[mode])


# ------------------------------------------------------------------ the peer filter


@pytest.fixture
def pair(ns: str) -> Iterator[tuple[str, str]]:
    """`ns` (the host, fd99::1) and a sender namespace (fd99::2 and fd99::3) on one veth."""
    spaces = netns.Namespaces()
    try:
        sender = spaces.add(f"{ns}s")
        netns.veth(ns, "eth0", "eth0", peer_ns=sender)
        for space, addresses in ((ns, ["fd99::1"]), (sender, [str(PEER6), str(STRANGER6)])):
            for address in addresses:
                netns.run_in(space, ["ip", "addr", "add", f"{address}/64", "dev", "eth0",
                                     "nodad"])
            netns.link_up(space, "eth0")
        yield ns, sender
    finally:
        assert not spaces.close()


SEND = """
import socket, sys
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.bind((sys.argv[1], 0))
for _ in range(int(sys.argv[2])):
    s.sendto(b"vxlan?", ("fd99::1", 8472))
"""


async def _send(sender: str, source: IPv6Address, count: int) -> None:
    await sh(sender, sys.executable, "-c", SEND, str(source), str(count))
    await asyncio.sleep(0.05)  # received and counted


@pytest.mark.parametrize("mode", MODES)
async def test_the_ipv6_peer_filter_drops_vxlan_from_a_non_peer_only(
        pair: tuple[str, str], mode: str) -> None:
    host, sender = pair
    fw = fw_in(host, mode, 6)
    keeper = RulesKeeper(fw)
    await keeper.sync(wanted(6))
    await _send(sender, PEER6, 3)  # the first also resolves the neighbour
    assert await fw.dropped() == 0
    await _send(sender, STRANGER6, 5)
    assert await fw.dropped() == 5
    await keeper.update_peers({STRANGER6}, set())  # it joins: admitted at once
    await _send(sender, STRANGER6, 4)
    assert await fw.dropped() == 5
    await keeper.sync(repair=True)
    assert keeper.status.dropped == 5 and keeper.status.repairs == {}


# ------------------------------------------------------------------ both families at once


async def _tamper(ns: str, mode: str, family: int) -> None:
    """Take away all of one family's rules the way an operator might."""
    if mode == "nftables":
        await sh(ns, "nft", "delete", "table", "ip6" if family == 6 else "ip", "leaseagent")
    else:
        await sh(ns, "ip6tables" if family == 6 else "iptables", "-t", "nat", "-F")


@pytest.mark.parametrize("mode", MODES)
async def test_ipv4_and_ipv6_keepers_in_one_namespace_leave_each_other_alone(
        ns: str, mode: str) -> None:
    fws = {family: fw_in(ns, mode, family) for family in (4, 6)}
    keepers = {family: RulesKeeper(fw) for family, fw in fws.items()}
    for family, keeper in keepers.items():
        await keeper.sync(wanted(family))
    for broken, other in ((6, 4), (4, 6)):
        await _tamper(ns, mode, broken)
        assert await keepers[other].sync(repair=True) == []
        assert await keepers[broken].sync(repair=True) != []
        assert await in_sync(fws[broken], wanted(broken))
    # Peers of one family change: the other's set stays as it is.
    await keepers[6].update_peers({IPv6Address("fd99::77")}, set())
    assert await in_sync(fws[6], wanted(6, PEERS6 | {IPv6Address("fd99::77")}))
    assert await in_sync(fws[4], wanted(4))
    # One family's rules removed (the other stays).
    await fws[6].remove()
    assert await fws[6].observe() == ObservedRules()
    assert await in_sync(fws[4], wanted(4))
    assert [k.status.repairs["missing"] for k in keepers.values()] == [1, 1]  # its own only


async def test_nft_events_of_one_familys_table_wake_only_its_keeper(ns: str) -> None:
    """Both keepers running: the IPv6 keeper's own writes and someone deleting the IPv6
    table start no check of the IPv4 rules; the IPv6 table is back within a second."""
    fws = {family: fw_in(ns, "nftables", family) for family in (4, 6)}
    keepers = {family: RulesKeeper(fw) for family, fw in fws.items()}
    for family, keeper in keepers.items():
        await keeper.sync(wanted(family))
    checks = {4: 0, 6: 0}

    def count_checks(fw: Firewall) -> None:
        observe = fw.observe

        async def counted(*, deep: bool = True) -> ObservedRules:
            checks[fw.family.version] += 1
            return await observe(deep=deep)

        fw.observe = counted  # type: ignore[method-assign]

    for fw in fws.values():
        count_checks(fw)
    tasks = [asyncio.create_task(k.run()) for k in keepers.values()]
    try:
        await asyncio.sleep(0.3)  # both monitors started
        for i in range(5):
            await keepers[6].update_peers({IPv6Address(f"fd99::1:{i}")}, set())
        await asyncio.sleep(0.3)
        assert checks == {4: 0, 6: 0}  # our own writes: no check at all
        await sh(ns, "nft", "delete", "table", "ip6", "leaseagent")
        started = time.monotonic()
        while not await in_sync(fws[6], keepers[6].wanted):  # type: ignore[arg-type]
            assert time.monotonic() - started < 1.0, "the IPv6 table was not put back"
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.3)
        assert checks[4] == 0 and checks[6] >= 1
        assert keepers[6].status.repairs["missing"] == 1 and keepers[4].status.repairs == {}
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


# ------------------------------------------------------------------ cleanup


def test_leasectl_cleanup_removes_both_families_with_both_tools(ns: str) -> None:
    for tool in ("nft", "ip6tables-restore", "iptables-restore", "ipset"):
        if shutil.which(tool, path="/usr/sbin:/usr/bin:/sbin:/bin") is None:
            pytest.skip(f"{tool} is not installed")
    fws = [fw_in(ns, mode, family) for mode in MODES for family in (4, 6)]

    async def apply_all() -> None:
        for fw in fws:
            await fw.apply(wanted(fw.family.version))

    asyncio.run(apply_all())
    leasectl = Path(sys.executable).parent / "leasectl"
    out = netns.run_in(ns, [str(leasectl), "cleanup"])
    assert sorted(line.split(" (")[0] for line in out.splitlines()) == [
        "removed the IPv6 iptables rules", "removed the IPv6 nftables rules",
        "removed the iptables rules", "removed the nftables rules"]

    async def observe_all() -> list[ObservedRules]:
        return [await fw.observe() for fw in fws]

    assert asyncio.run(observe_all()) == [ObservedRules()] * 4
    assert netns.run_in(ns, ["ipset", "list", "-n"]) == ""
