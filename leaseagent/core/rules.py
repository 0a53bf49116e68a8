"""Traffic rules: masquerade, FORWARD accept and the VXLAN peer filter, as pure data.

Pure: no I/O. `ruleset()` computes every rule the agent wants from the
network config, this host's subnet and its settings; the firewall adapters
(leaseagent.dataplane.firewall) write it with nftables or iptables and read
back what is there; `compare()` says what differs, for the agent's repair
and for `leasectl doctor` alike.

The rules (docs/architecture.md, "Traffic rules"; NET is the cluster network,
POD this host's subnet):

    chain       rule                                         why
    postrouting mark 0x4000/0x4000 -> return                 marked by kube-proxy: never NAT twice
    postrouting POD -> NET return                            container to container: keep the source
    postrouting NET -> POD return                            into this host's containers: keep it
    postrouting !NET -> POD return                           to a container from outside: keep it
    postrouting NET -> !224.0.0.0/4 masquerade               container to the world (not multicast)
    postrouting !NET -> NET masquerade                       the host itself into the overlay
    forward     from NET accept; to NET accept               a FORWARD policy of DROP (Docker's)
                                                             must not cut the overlay
    input       UDP to a VXLAN port, not from a peer: drop   only current peers may inject frames
                (one rule per port a device of ours receives on)

The masquerade rules are flannel's (pkg/trafficmngr/iptables), in its
iptables form where its two implementations differ: the mark is matched
under a mask (`mark & 0x4000 == 0x4000`, its nftables form compares the
whole mark), and the fourth rule is `! -s NET -d POD` (its nftables form
says `saddr != POD daddr NET`). `--random-fully` (nftables: `fully-random`)
unless disabled.

Identity: every rule carries a comment `leaseagent:<name>:<hash of its
text>`. Reading the chains back yields the comments in order, so a missing,
extra (anything without our comment), reordered or changed rule is found
without parsing either tool's output format. The peer filter's addresses are
a set (nftables) or an ipset (iptables), updated element by element.

Dual-stack: the same rules for the IPv6 network, one ruleset per family
(`ruleset()` takes the family from the network it is given). A `Family` holds
all that differs: the nftables family (`table ip6 leaseagent`, `ip6 saddr`),
the set type, the iptables program (ip6tables), the ipset, the multicast
range (ff00::/8, as flannel's masqIP6Rules). IPv4's are the names of the
agent before dual-stack, byte for byte: existing hosts' rules stay ours.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Network, IPv6Network
from typing import Protocol

from leaseagent.core.leases import Peer, PeerChanges
from leaseagent.core.network import Address, Network
from leaseagent.core.plan import VxlanAttrs

TABLE = "leaseagent"  # nftables: table ip leaseagent, table ip6 leaseagent
PEER_SET = "vxlan_peers"  # nftables set name (in each family's table)
MARK = 0x4000  # kube-proxy's masquerade mark, which flannel's first rule returns on


@dataclass(frozen=True)
class Family:
    """All that differs between the IPv4 rules and the IPv6 ones; the rules, the adapters
    and the keeper are otherwise one code for both."""

    version: int  # 4 | 6
    nft: str  # the nftables family, which is also the address match's word (ip saddr)
    address_type: str  # the nftables set's type
    iptables: str  # the program family: its -save and -restore hold this family's tables
    ipset: str  # the peer set's ipset name
    ipset_family: str  # ipset's family option
    multicast: Network  # never masqueraded (flannel: 224.0.0.0/4, ff00::/8)
    salt: str  # mixed into each rule's tag: no IPv6 rule shares a tag with an IPv4 one
    shown: str  # put before "traffic rules" in messages


# IPv4's names, salt and messages are those from before dual-stack: existing hosts.
IPV4 = Family(4, "ip", "ipv4_addr", "iptables", "leaseagent-vxlan-peers", "inet",
              IPv4Network("224.0.0.0/4"), salt="", shown="")
IPV6 = Family(6, "ip6", "ipv6_addr", "ip6tables", "leaseagent-vxlan-peers6", "inet6",
              IPv6Network("ff00::/8"), salt="ipv6|", shown="IPv6 ")
FAMILIES = {4: IPV4, 6: IPV6}
IPSET = IPV4.ipset  # the IPv4 peer set's ipset, under its name from before dual-stack

# Our chains: name -> (nftables hook, type, priority), iptables table, iptables chain
# jumped to from the built-in one.
CHAINS: dict[str, tuple[str, str, str, str, str]] = {
    "postrouting": ("postrouting", "nat", "srcnat", "nat", "POSTROUTING"),
    "forward": ("forward", "filter", "filter", "filter", "FORWARD"),
    "input": ("input", "filter", "filter", "filter", "INPUT"),
}


def iptables_chain(chain: str) -> str:
    """Our iptables chain for `chain`: LEASEAGENT-POSTROUTING, ..."""
    return f"LEASEAGENT-{chain.upper()}"


# Jumps that stay ahead of ours in a built-in chain (iptables). Docker's DOCKER-USER is
# "the place for a host's own rules" (Docker's docs): Docker keeps its jump first in
# FORWARD, and an operator's DROP there must see container traffic before our ACCEPT
# does. With nftables no order is needed: our forward chain is a base chain of its own,
# and a drop in any base chain of the hook (iptables-nft's FORWARD among them) is final.
AHEAD_OF_OURS: dict[str, tuple[str, ...]] = {"FORWARD": ("DOCKER-USER",)}


def jump_index(builtin: str, targets: list[str | None]) -> int:
    """Where our jump belongs (0-based) in the built-in chain `builtin` whose other rules
    jump to `targets` in order (None: a rule that is no jump): right after the last jump
    that stays ahead of ours, else first."""
    ahead = AHEAD_OF_OURS.get(builtin, ())
    return max((i + 1 for i, target in enumerate(targets) if target in ahead), default=0)


@dataclass(frozen=True)
class TrafficSettings:
    """What the operator asked for (flags) and what the network config says."""

    ip_masq: bool = False
    random_fully: bool = True
    forward: bool = True
    peer_filter: bool = True
    nftables: bool = False


@dataclass(frozen=True)
class Rule:
    chain: str  # postrouting | forward | input
    name: str
    nft: str  # the rule in nft syntax, without its comment
    iptables: str  # the rule spec in iptables syntax, without -A CHAIN and the comment
    why: str
    family: Family = IPV4

    @property
    def tag(self) -> str:
        text = f"{self.family.salt}{self.nft}|{self.iptables}"
        return f"leaseagent:{self.name}:{hashlib.sha256(text.encode()).hexdigest()[:10]}"


@dataclass(frozen=True)
class Ruleset:
    """Everything wanted for one family, in order per chain. `peer_ports`: the VXLAN
    ports the peer filter guards (none: no filter); `peers`: who may send to them."""

    rules: tuple[Rule, ...] = ()
    peer_ports: tuple[int, ...] = ()
    peers: frozenset[Address] = frozenset()
    family: Family = IPV4

    def chain(self, name: str) -> list[Rule]:
        return [r for r in self.rules if r.chain == name]

    @property
    def chains(self) -> list[str]:
        """The chains that hold at least one rule, in CHAINS order."""
        return [c for c in CHAINS if self.chain(c)]

    def tags(self) -> dict[str, list[str]]:
        return {c: [r.tag for r in self.chain(c)] for c in self.chains}

    @property
    def peer_texts(self) -> frozenset[str]:
        """The peers as text, as firewalls list them (made when compared, not kept: 5,000
        peers' text is ~0.5 MiB that would stay between checks)."""
        return frozenset(map(str, self.peers))


def masquerade_rules(net: Network, pod: Network, *, random_fully: bool) -> list[Rule]:
    f = FAMILIES[net.version]
    ip, multicast = f.nft, f.multicast
    nft_masq = "masquerade fully-random" if random_fully else "masquerade"
    ipt_masq = "-j MASQUERADE --random-fully" if random_fully else "-j MASQUERADE"
    return [
        Rule("postrouting", "masq-mark", f"meta mark & {MARK:#010x} == {MARK:#010x} return",
             f"-m mark --mark {MARK:#x}/{MARK:#x} -j RETURN",
             "marked by kube-proxy (0x4000): it masquerades it, never twice", f),
        Rule("postrouting", "masq-pod-net", f"{ip} saddr {pod} {ip} daddr {net} return",
             f"-s {pod} -d {net} -j RETURN",
             "from this host's containers to the cluster: the source stays", f),
        Rule("postrouting", "masq-net-pod", f"{ip} saddr {net} {ip} daddr {pod} return",
             f"-s {net} -d {pod} -j RETURN",
             "from the cluster to this host's containers: the source stays", f),
        Rule("postrouting", "masq-out-pod", f"{ip} saddr != {net} {ip} daddr {pod} return",
             f"! -s {net} -d {pod} -j RETURN",
             "from outside to this host's containers (a node that owns the address): "
             "the source stays", f),
        Rule("postrouting", "masq-net-out", f"{ip} saddr {net} {ip} daddr != {multicast} {nft_masq}",
             f"-s {net} ! -d {multicast} {ipt_masq}",
             "from the cluster to the world (not multicast): the host's address", f),
        Rule("postrouting", "masq-host-net", f"{ip} saddr != {net} {ip} daddr {net} {nft_masq}",
             f"! -s {net} -d {net} {ipt_masq}",
             "from the host itself into the cluster: an address of the cluster network", f),
    ]


def forward_rules(net: Network) -> list[Rule]:
    f = FAMILIES[net.version]
    return [
        Rule("forward", "fwd-from-net", f"{f.nft} saddr {net} accept", f"-s {net} -j ACCEPT",
             "forwarded from the cluster network: accepted whatever FORWARD's policy", f),
        Rule("forward", "fwd-to-net", f"{f.nft} daddr {net} accept", f"-d {net} -j ACCEPT",
             "forwarded to the cluster network: accepted whatever FORWARD's policy", f),
    ]


PEER_FILTER = "vxlan-peers"  # the peer filter's rule name; its counter is the drop count


def is_peer_filter(tag: str | None) -> bool:
    """Whether a rule's tag (its comment) is the peer filter's."""
    return (tag or "").startswith(f"leaseagent:{PEER_FILTER}:")


def peer_filter_rules(port: int, f: Family = IPV4) -> list[Rule]:
    return [Rule("input", PEER_FILTER,
                 f"udp dport {port} {f.nft} saddr != @{PEER_SET} counter drop",
                 f"-p udp -m udp --dport {port} -m set ! --match-set {f.ipset} src -j DROP",
                 "VXLAN from anyone but a current peer: dropped (VXLAN has no authentication)", f)]


def ruleset(settings: TrafficSettings, *, network: Network, own_subnet: Network | None,
            vxlan_ports: Iterable[int], peers: Iterable[Address] = ()) -> Ruleset:
    """Every rule wanted for the family of `network` (the IPv4 or the IPv6 cluster
    network). Masquerade needs this host's subnet of that family; the peer filter the
    VXLAN ports our devices receive on (`receive_ports`; none: no filter), a rule each
    in port order. ValueError if the addresses mix families: one family's table cannot
    hold the other's."""
    f = FAMILIES[network.version]
    chosen = frozenset(peers)
    strays = [a for a in (own_subnet, *chosen) if a is not None and a.version != f.version]
    if strays:
        raise ValueError(f"IPv{f.version} traffic rules given {strays[0]}")
    rules: list[Rule] = []
    if settings.ip_masq and own_subnet is not None:
        rules += masquerade_rules(network, own_subnet, random_fully=settings.random_fully)
    if settings.forward:
        rules += forward_rules(network)
    ports = tuple(sorted(set(vxlan_ports))) if settings.peer_filter else ()
    for port in ports:
        rules += peer_filter_rules(port, f)
    return Ruleset(tuple(rules), ports, chosen if ports else frozenset(), f)


class _Device(Protocol):
    @property
    def vxlan(self) -> VxlanAttrs | None: ...


def receive_ports(devices: Iterable[_Device]) -> tuple[int, ...]:
    """The UDP ports the peer filter guards: every port one of our vxlan `devices`
    receives on (the agent: its backends' devices; doctor: those and the kernel's links
    of ours). During a rebuild's roll-out that is the new device's and the kept one's
    (a Port change's device put aside, the vxlan device a type change keeps) until the
    kept one is removed."""
    return tuple(sorted({d.vxlan.port for d in devices if d.vxlan is not None}))


# ------------------------------------------------------------------ what is there


@dataclass(frozen=True)
class ObservedRules:
    """What the firewall has of ours: per chain, the comments of its rules in order (None
    for a rule that is not ours); whether each chain is hooked in as it should be (for
    iptables: our jump is the built-in chain's first rule, or the first after Docker's
    DOCKER-USER jump, and the only one); the peer
    set's members (None: no set, or only counted: a shallow read that skips thousands of
    elements gives `peer_count` alone)."""

    chains: Mapping[str, list[str | None]] = field(default_factory=dict)
    # iptables: our jump is in its place (jump_index: first, or right after DOCKER-USER's)
    # and the only one; nftables: the chain is a base chain of the right hook.
    hooked: Mapping[str, bool] = field(default_factory=dict)
    peers: frozenset[str] | None = None  # addresses as text: thousands are read per check
    peer_count: int | None = None  # how many the set holds (None: no set)
    dropped: int = 0  # packets the peer filter dropped (its counter)
    # The adapter's own reading (iptables: the saved tables and the set's members), for
    # the write that may follow at once (Firewall.apply's `seen`): not read twice.
    reading: object = field(default=None, compare=False, repr=False)


# Kinds of difference (a metric label each).
MISSING, EXTRA, REORDERED, UNHOOKED, PEERS = "missing", "extra", "reordered", "unhooked", "peers"
KINDS = (MISSING, EXTRA, REORDERED, UNHOOKED, PEERS)


@dataclass(frozen=True)
class RuleDifference:
    kind: str
    chain: str
    detail: str

    @property
    def text(self) -> str:
        return f"{self.kind} {self.detail}"


def compare(wanted: Ruleset, observed: ObservedRules) -> list[RuleDifference]:
    """How the firewall differs from `wanted` (empty: in sync)."""
    out: list[RuleDifference] = []
    by_tag = {r.tag: r for r in wanted.rules}
    for chain in CHAINS:
        want = [r.tag for r in wanted.chain(chain)]
        have = list(observed.chains.get(chain, []))
        if not want and not have:
            continue
        if want and not observed.hooked.get(chain, False):
            out.append(RuleDifference(UNHOOKED, chain, f"chain {chain} is not hooked in (first, "
                                      "or right after DOCKER-USER)"))
        for tag in want:
            if tag not in have:
                out.append(RuleDifference(MISSING, chain, f"rule {by_tag[tag].name} in {chain}: "
                                          f"{by_tag[tag].iptables}"))
        for seen in have:
            if seen not in want:
                out.append(RuleDifference(EXTRA, chain, f"rule in {chain}: "
                                          f"{seen or 'not ours (no comment of ours)'}"))
        ours = [t for t in have if t in want]
        if ours != [t for t in want if t in have]:
            out.append(RuleDifference(REORDERED, chain, f"rules of {chain} out of order"))
    if wanted.peer_ports:
        want_peers = wanted.peer_texts
        have_peers = observed.peers or frozenset()
        if observed.peers is None and observed.peer_count is None:
            out.append(RuleDifference(PEERS, "input", "the peer set is missing"))
        elif observed.peers is None:
            if observed.peer_count != len(want_peers):
                out.append(RuleDifference(PEERS, "input", f"peer set: {observed.peer_count} "
                                          f"members, {len(want_peers)} wanted"))
        elif have_peers != want_peers:
            missing = sorted(want_peers - have_peers)
            extra = sorted(have_peers - want_peers)
            out.append(RuleDifference(PEERS, "input", f"peer set: {len(missing)} missing "
                                      f"({', '.join(map(str, missing[:5]))}), {len(extra)} extra "
                                      f"({', '.join(map(str, extra[:5]))})"))
    return out


def admitted(peer: Peer, family: int = 4) -> Address | None:
    """The address the peer filter of `family` admits for `peer`: its PublicIP, or its
    PublicIPv6 (VXLAN over the IPv6 underlay; None for a peer with no IPv6 part). Any
    backend type's: a peer in the middle of a rebuild's roll-out (its lease already says
    host-gw, say) still sends VXLAN through the device it keeps until this host has
    switched too (docs/architecture.md, "Config changes"); what the filter keeps out is
    whoever holds no lease."""
    return peer.public_ip if family == 4 else peer.public_ipv6


def peer_addresses(peers: Iterable[Peer], family: int = 4) -> frozenset[Address]:
    """Every address the peer filter of `family` admits for `peers`."""
    return frozenset(ip for p in peers if (ip := admitted(p, family)) is not None)


class PeerAdmission:
    """One family's peer filter addresses, kept per change in time proportional to the
    change, not to the number of peers (thousands of leases expiring together are
    thousands of events). Two peers with one PublicIP keep it admitted until both are
    gone. A peer is known by its (IPv4) subnet in both families, as the watcher knows it."""

    def __init__(self, family: int = 4) -> None:
        self.family = FAMILIES[family].version
        self._of: dict[IPv4Network, Address] = {}
        self._uses: dict[Address, int] = {}

    def reset(self, peers: Iterable[Peer]) -> frozenset[Address]:
        """Start again from the whole peer set; the addresses admitted."""
        self._of = {p.subnet: ip for p in peers if (ip := admitted(p, self.family)) is not None}
        self._uses = dict(Counter(self._of.values()))
        return self.addresses()

    def apply(self, changes: PeerChanges) -> tuple[set[Address], set[Address]]:
        """Take in one batch of changes; the addresses newly admitted, and those no
        peer uses any more. (An address is hashed in Python, so each is looked up as
        few times as it can be: a mass expiry drops thousands.)"""
        admit: set[Address] = set()
        retire: set[Address] = set()
        of, uses = self._of, self._uses

        def drop(subnet: IPv4Network) -> None:
            ip = of.pop(subnet, None)
            if ip is not None:
                n = uses[ip] - 1
                if n > 0:
                    uses[ip] = n
                else:
                    del uses[ip]
                    retire.add(ip)

        for p in changes.removed:
            drop(p.subnet)
        for p in [*changes.changed, *changes.added]:
            drop(p.subnet)
            ip = admitted(p, self.family)
            if ip is not None:
                of[p.subnet] = ip
                n = uses.get(ip, 0)
                if n == 0:
                    admit.add(ip)
                uses[ip] = n + 1
        return admit - retire, retire - admit

    def addresses(self) -> frozenset[Address]:
        return frozenset(self._uses)
