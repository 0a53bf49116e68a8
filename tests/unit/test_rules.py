"""Traffic rules as data (leaseagent.core.rules): flannel's masquerade in its iptables form,
forward accept, the VXLAN peer filter, and the comparison that finds drift."""

from __future__ import annotations

import random
from ipaddress import IPv4Address, IPv4Network

from leaseagent.core.backends import NoLeaseData, VxlanLeaseData
from leaseagent.core.leases import Peer, PeerChanges
from leaseagent.core.rules import (
    EXTRA,
    MISSING,
    PEERS,
    REORDERED,
    UNHOOKED,
    ObservedRules,
    PeerAdmission,
    TrafficSettings,
    compare,
    peer_addresses,
    ruleset,
)
from leaseagent.dataplane.firewall import NftFirewall

NET = IPv4Network("10.5.0.0/16")
POD = IPv4Network("10.5.34.0/24")
PEERS_IPS = [IPv4Address("10.250.0.12"), IPv4Address("10.250.0.13")]


def full(**kw: bool) -> object:
    return ruleset(TrafficSettings(ip_masq=True, **kw), network=NET, own_subnet=POD,
                   vxlan_port=8472, peers=PEERS_IPS)


def test_masquerade_is_flannels_in_its_iptables_form_and_order() -> None:
    rules = full().chain("postrouting")  # type: ignore[attr-defined]
    assert [r.iptables for r in rules] == [
        "-m mark --mark 0x4000/0x4000 -j RETURN",
        "-s 10.5.34.0/24 -d 10.5.0.0/16 -j RETURN",
        "-s 10.5.0.0/16 -d 10.5.34.0/24 -j RETURN",
        "! -s 10.5.0.0/16 -d 10.5.34.0/24 -j RETURN",
        "-s 10.5.0.0/16 ! -d 224.0.0.0/4 -j MASQUERADE --random-fully",
        "! -s 10.5.0.0/16 -d 10.5.0.0/16 -j MASQUERADE --random-fully",
    ]
    # The nftables form says the same (the mark under a mask, the fourth rule as iptables').
    assert rules[0].nft == "meta mark & 0x00004000 == 0x00004000 return"
    assert rules[3].nft == "ip saddr != 10.5.0.0/16 ip daddr 10.5.34.0/24 return"
    plain = full(random_fully=False).chain("postrouting")  # type: ignore[attr-defined]
    assert plain[4].iptables.endswith("-j MASQUERADE") and plain[4].nft.endswith("masquerade")


def test_forward_and_peer_filter_and_what_each_setting_leaves_out() -> None:
    everything = full()
    assert everything.chains == ["postrouting", "forward", "input"]  # type: ignore[attr-defined]
    assert [r.nft for r in everything.chain("input")] == [  # type: ignore[attr-defined]
        "udp dport 8472 ip saddr != @vxlan_peers counter drop"]
    assert everything.peers == frozenset(PEERS_IPS)  # type: ignore[attr-defined]
    none = ruleset(TrafficSettings(forward=False, peer_filter=False), network=NET, own_subnet=POD,
                   vxlan_port=8472)
    assert none.rules == () and none.peer_port is None
    hostgw = ruleset(TrafficSettings(), network=NET, own_subnet=POD, vxlan_port=None)
    assert hostgw.chains == ["forward"] and hostgw.peer_port is None


def test_a_rule_tag_changes_with_its_text() -> None:
    one = full().chain("postrouting")[1]  # type: ignore[attr-defined]
    other = ruleset(TrafficSettings(ip_masq=True), network=NET, own_subnet=IPv4Network("10.5.9.0/24"),
                    vxlan_port=8472).chain("postrouting")[1]
    assert one.name == other.name and one.tag != other.tag


def observed_as_written(wanted: object) -> ObservedRules:
    tags = wanted.tags()  # type: ignore[attr-defined]
    return ObservedRules(chains={c: list(t) for c, t in tags.items()},
                         hooked=dict.fromkeys(tags, True),
                         peers=frozenset(map(str, wanted.peers)))  # type: ignore[attr-defined]


def test_compare_finds_nothing_when_the_firewall_holds_what_is_wanted() -> None:
    wanted = full()
    assert compare(wanted, observed_as_written(wanted)) == []  # type: ignore[arg-type]


def test_compare_names_each_kind_of_drift() -> None:
    wanted = full()
    seen = observed_as_written(wanted)
    post = list(seen.chains["postrouting"])
    kinds = {
        MISSING: {**seen.chains, "postrouting": post[1:]},
        EXTRA: {**seen.chains, "forward": [None, *seen.chains["forward"]]},
        REORDERED: {**seen.chains, "postrouting": [post[1], post[0], *post[2:]]},
    }
    for kind, chains in kinds.items():
        found = compare(wanted, ObservedRules(chains=chains, hooked=seen.hooked,  # type: ignore[arg-type]
                                              peers=seen.peers))
        assert kind in {d.kind for d in found}, (kind, found)
    unhooked = compare(wanted, ObservedRules(chains=seen.chains,  # type: ignore[arg-type]
                                             hooked={**seen.hooked, "forward": False},
                                             peers=seen.peers))
    assert [d.kind for d in unhooked] == [UNHOOKED]
    stray_peer = compare(wanted, ObservedRules(chains=seen.chains, hooked=seen.hooked,  # type: ignore[arg-type]
                                               peers=frozenset({"10.250.0.66"})))
    assert [d.kind for d in stray_peer] == [PEERS] and "10.250.0.66" in stray_peer[0].detail
    gone = compare(wanted, ObservedRules())  # type: ignore[arg-type]
    assert {d.kind for d in gone} == {UNHOOKED, MISSING, PEERS}


def test_the_nft_table_is_one_block_with_the_set_its_chains_and_tagged_rules() -> None:
    text = NftFirewall().render(full())  # type: ignore[arg-type]
    assert text.startswith("table ip leaseagent {\n\tset vxlan_peers {\n\t\ttype ipv4_addr\n"
                           "\t\telements = { 10.250.0.12, 10.250.0.13 }\n")
    assert "\tchain postrouting {\n\t\ttype nat hook postrouting priority srcnat; policy accept;" in text
    assert text.count('comment "leaseagent:') == 9


def _peer(n: int, ip: int, backend: str = "vxlan") -> Peer:
    data = VxlanLeaseData("0a:00:00:00:00:01") if backend == "vxlan" else NoLeaseData()
    return Peer(IPv4Network(f"10.5.{n}.0/24"), IPv4Address(f"10.250.0.{ip}"), backend, data)


def test_peer_admission_follows_changes_like_a_recount_of_all_peers() -> None:
    """Random batches of adds, moves to another PublicIP, backend changes and removals
    (PublicIPs shared on purpose): after each batch the admitted set is what counting
    every peer again gives, and what was admitted/retired is exactly the difference."""
    rng = random.Random(12)
    admission = PeerAdmission()
    peers: dict[int, Peer] = {}
    assert admission.reset([]) == frozenset()
    for _ in range(400):
        before = peer_addresses(peers.values())
        changes = PeerChanges()
        for n in rng.sample(range(40), rng.randint(1, 6)):
            backend = rng.choice(["vxlan", "vxlan", "host-gw"])
            if n in peers and rng.random() < 0.4:
                changes.removed.append(peers.pop(n))
            elif n in peers:
                peers[n] = _peer(n, rng.randint(1, 8), backend)
                changes.changed.append(peers[n])
            else:
                peers[n] = _peer(n, rng.randint(1, 8), backend)
                changes.added.append(peers[n])
        admit, retire = admission.apply(changes)
        after = peer_addresses(peers.values())
        assert admission.addresses() == after
        assert admit == after - before
        assert retire == before - after
    assert admission.reset(peers.values()) == peer_addresses(peers.values())
