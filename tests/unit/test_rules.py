"""Traffic rules as data (leaseagent.core.rules): flannel's masquerade in its iptables form,
forward accept, the VXLAN peer filter, and the comparison that finds drift; for IPv4 and,
the same rules with the other family's names and numbers, for IPv6."""

from __future__ import annotations

import random
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

import pytest

from leaseagent.core.leases import Peer, PeerChanges
from leaseagent.core.network import Address, Network
from leaseagent.core.plan import DeviceSpec, VxlanAttrs
from leaseagent.core.profiles.base import NoLeaseData
from leaseagent.core.profiles.vxlan import VxlanLeaseData
from leaseagent.core.rules import (
    EXTRA,
    MISSING,
    PEERS,
    REORDERED,
    UNHOOKED,
    ObservedRules,
    PeerAdmission,
    Ruleset,
    TrafficSettings,
    admitted,
    compare,
    is_peer_filter,
    peer_addresses,
    receive_ports,
    ruleset,
)
from leaseagent.dataplane import firewall as firewall_module
from leaseagent.dataplane.firewall import IptablesFirewall, NftFirewall, firewall
from leaseagent.errors import ConfigError

NET = IPv4Network("10.5.0.0/16")
POD = IPv4Network("10.5.34.0/24")
PEERS_IPS = [IPv4Address("10.250.0.12"), IPv4Address("10.250.0.13")]
NET6 = IPv6Network("fd10::/48")
POD6 = IPv6Network("fd10:0:0:22::/64")
PEERS6 = [IPv6Address("fd00:99::12"), IPv6Address("2001:db8::13")]
SAMPLES: dict[int, tuple[Network, Network, list[Address]]] = {
    4: (NET, POD, [*PEERS_IPS]), 6: (NET6, POD6, [*PEERS6])}


def full(family: int = 4, **kw: bool) -> Ruleset:
    """Every rule of `family`, for the sample network, subnet and peers."""
    net, pod, peers = SAMPLES[family]
    return ruleset(TrafficSettings(ip_masq=True, **kw), network=net, own_subnet=pod,
                   vxlan_ports=(8472,), peers=peers)


def test_masquerade_is_flannels_in_its_iptables_form_and_order() -> None:
    rules = full().chain("postrouting")
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
    plain = full(random_fully=False).chain("postrouting")
    assert plain[4].iptables.endswith("-j MASQUERADE") and plain[4].nft.endswith("masquerade")


def test_forward_and_peer_filter_and_what_each_setting_leaves_out() -> None:
    everything = full()
    assert everything.chains == ["postrouting", "forward", "input"]
    assert [r.nft for r in everything.chain("input")] == [
        "udp dport 8472 ip saddr != @vxlan_peers counter drop"]
    assert everything.peers == frozenset(PEERS_IPS)
    none = ruleset(TrafficSettings(forward=False, peer_filter=False), network=NET, own_subnet=POD,
                   vxlan_ports=(8472,))
    assert none.rules == () and none.peer_ports == ()
    hostgw = ruleset(TrafficSettings(), network=NET, own_subnet=POD, vxlan_ports=())
    assert hostgw.chains == ["forward"] and hostgw.peer_ports == ()


def test_a_peer_filter_rule_per_port_a_device_receives_on() -> None:
    """A rebuild's kept device (a Port change's flaside.<VNI>) receives on its old port
    beside the new device: both ports guarded, a rule each in port order, one set; the
    single-port rule is unchanged (its tag: test_ipv4_tags_are_those_...)."""
    both = ruleset(TrafficSettings(), network=NET, own_subnet=POD, vxlan_ports=(8472, 4789, 8472),
                   peers=PEERS_IPS)
    assert both.peer_ports == (4789, 8472) and both.peers == frozenset(PEERS_IPS)
    assert [r.nft for r in both.chain("input")] == [
        "udp dport 4789 ip saddr != @vxlan_peers counter drop",
        "udp dport 8472 ip saddr != @vxlan_peers counter drop"]
    assert [r.iptables for r in both.chain("input")] == [
        "-p udp -m udp --dport 4789 -m set ! --match-set leaseagent-vxlan-peers src -j DROP",
        "-p udp -m udp --dport 8472 -m set ! --match-set leaseagent-vxlan-peers src -j DROP"]
    tags = [r.tag for r in both.chain("input")]
    assert all(map(is_peer_filter, tags)) and len(set(tags)) == 2
    assert tags[1] == full().chain("input")[0].tag
    # The kept device removed: its port's rule is no longer wanted (an extra one, found).
    one = ruleset(TrafficSettings(), network=NET, own_subnet=POD, vxlan_ports=(8472,),
                  peers=PEERS_IPS)
    assert [d.text for d in compare(one, observed_as_written(both))] == [
        f"extra rule in input: {tags[0]}"]
    assert compare(both, observed_as_written(one))[0].text.startswith(
        "missing rule vxlan-peers in input: -p udp -m udp --dport 4789 ")


def test_the_ports_guarded_are_those_of_vxlan_devices() -> None:
    def vxlan(name: str, port: int) -> DeviceSpec:
        return DeviceSpec(name, "vxlan", 1450, VxlanAttrs(1, port, None, 0))

    devices = [vxlan("flannel.1", 4789), vxlan("flannel-v6.1", 4789), vxlan("flaside.1", 8472),
               DeviceSpec("wg0", "wireguard", 1420)]
    assert receive_ports(devices) == (4789, 8472)
    assert receive_ports([]) == ()


def test_a_rule_tag_changes_with_its_text() -> None:
    one = full().chain("postrouting")[1]
    other = ruleset(TrafficSettings(ip_masq=True), network=NET, own_subnet=IPv4Network("10.5.9.0/24"),
                    vxlan_ports=(8472,)).chain("postrouting")[1]
    assert one.name == other.name and one.tag != other.tag


def observed_as_written(wanted: Ruleset) -> ObservedRules:
    tags = wanted.tags()
    return ObservedRules(chains={c: list(t) for c, t in tags.items()},
                         hooked=dict.fromkeys(tags, True),
                         peers=frozenset(map(str, wanted.peers)))


def test_compare_finds_nothing_when_the_firewall_holds_what_is_wanted() -> None:
    wanted = full()
    assert compare(wanted, observed_as_written(wanted)) == []


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
        found = compare(wanted, ObservedRules(chains=chains, hooked=seen.hooked,
                                              peers=seen.peers))
        assert kind in {d.kind for d in found}, (kind, found)
    unhooked = compare(wanted, ObservedRules(chains=seen.chains,
                                             hooked={**seen.hooked, "forward": False},
                                             peers=seen.peers))
    assert [d.kind for d in unhooked] == [UNHOOKED]
    stray_peer = compare(wanted, ObservedRules(chains=seen.chains, hooked=seen.hooked,
                                               peers=frozenset({"10.250.0.66"})))
    assert [d.kind for d in stray_peer] == [PEERS] and "10.250.0.66" in stray_peer[0].detail
    gone = compare(wanted, ObservedRules())
    assert {d.kind for d in gone} == {UNHOOKED, MISSING, PEERS}


def test_the_nft_table_is_one_block_with_the_set_its_chains_and_tagged_rules() -> None:
    text = NftFirewall().render(full())
    assert text.startswith("table ip leaseagent {\n\tset vxlan_peers {\n\t\ttype ipv4_addr\n"
                           "\t\telements = { 10.250.0.12, 10.250.0.13 }\n")
    assert "\tchain postrouting {\n\t\ttype nat hook postrouting priority srcnat; policy accept;" in text
    assert text.count('comment "leaseagent:') == 9


def _peer(n: int, ip: int, backend: str = "vxlan", ip6: int | None = None) -> Peer:
    """A peer; with `ip6`, dual-stack (its IPv6 subnet, PublicIPv6 and data6)."""
    data = VxlanLeaseData("0a:00:00:00:00:01") if backend == "vxlan" else NoLeaseData()
    if ip6 is None:
        return Peer(IPv4Network(f"10.5.{n}.0/24"), IPv4Address(f"10.250.0.{ip}"), backend, data)
    return Peer(IPv4Network(f"10.5.{n}.0/24"), IPv4Address(f"10.250.0.{ip}"), backend, data,
                ipv6_subnet=IPv6Network(f"fd10:0:0:{n:x}::/64"),
                public_ipv6=IPv6Address(f"fd00:99::{ip6:x}"), data6=data)


@pytest.mark.parametrize("family", [4, 6])
def test_peer_admission_follows_changes_like_a_recount_of_all_peers(family: int) -> None:
    """Random batches of adds, moves to another PublicIP (or PublicIPv6), backend
    changes, peers losing or gaining their IPv6 part, and removals (addresses shared on
    purpose): after each batch the admitted set is what counting every peer again
    gives, and what was admitted/retired is exactly the difference."""
    rng = random.Random(12 + family)
    admission = PeerAdmission(family)
    peers: dict[int, Peer] = {}
    assert admission.reset([]) == frozenset()
    for _ in range(400):
        before = peer_addresses(peers.values(), family)
        changes = PeerChanges()
        for n in rng.sample(range(40), rng.randint(1, 6)):
            backend = rng.choice(["vxlan", "vxlan", "host-gw"])
            ip6 = rng.choice([None, *range(1, 8)])
            if n in peers and rng.random() < 0.4:
                changes.removed.append(peers.pop(n))
            elif n in peers:
                peers[n] = _peer(n, rng.randint(1, 8), backend, ip6)
                changes.changed.append(peers[n])
            else:
                peers[n] = _peer(n, rng.randint(1, 8), backend, ip6)
                changes.added.append(peers[n])
        admit, retire = admission.apply(changes)
        after = peer_addresses(peers.values(), family)
        assert {ip.version for ip in after} <= {family}
        assert admission.addresses() == after
        assert admit == after - before
        assert retire == before - after
    assert admission.reset(peers.values()) == peer_addresses(peers.values(), family)


def test_each_family_admits_its_own_public_address_of_a_peer() -> None:
    dual, v4_only, hostgw = _peer(1, 1, ip6=1), _peer(2, 2), _peer(3, 3, "host-gw", ip6=3)
    assert admitted(dual) == admitted(dual, 4) == IPv4Address("10.250.0.1")
    assert admitted(dual, 6) == IPv6Address("fd00:99::1")
    assert admitted(v4_only, 6) is None  # sends no VXLAN over IPv6
    # A peer rolling out another backend type still sends VXLAN from its kept device.
    assert admitted(hostgw, 4) == IPv4Address("10.250.0.3")
    assert admitted(hostgw, 6) == IPv6Address("fd00:99::3")


# ------------------------------------------------------------------ IPv6

def test_ipv6_masquerade_is_flannels_masqip6rules_in_its_order() -> None:
    rules = full(6).chain("postrouting")
    assert [r.iptables for r in rules] == [
        "-m mark --mark 0x4000/0x4000 -j RETURN",
        "-s fd10:0:0:22::/64 -d fd10::/48 -j RETURN",
        "-s fd10::/48 -d fd10:0:0:22::/64 -j RETURN",
        "! -s fd10::/48 -d fd10:0:0:22::/64 -j RETURN",
        "-s fd10::/48 ! -d ff00::/8 -j MASQUERADE --random-fully",
        "! -s fd10::/48 -d fd10::/48 -j MASQUERADE --random-fully",
    ]
    # The same choices as for IPv4 where flannel's nftables form differs: the mark under
    # its mask, the fourth rule as iptables'.
    assert [r.nft for r in rules] == [
        "meta mark & 0x00004000 == 0x00004000 return",
        "ip6 saddr fd10:0:0:22::/64 ip6 daddr fd10::/48 return",
        "ip6 saddr fd10::/48 ip6 daddr fd10:0:0:22::/64 return",
        "ip6 saddr != fd10::/48 ip6 daddr fd10:0:0:22::/64 return",
        "ip6 saddr fd10::/48 ip6 daddr != ff00::/8 masquerade fully-random",
        "ip6 saddr != fd10::/48 ip6 daddr fd10::/48 masquerade fully-random",
    ]
    plain = full(6, random_fully=False).chain("postrouting")
    assert plain[4].iptables.endswith("-j MASQUERADE") and plain[4].nft.endswith("masquerade")


def test_ipv6_forward_and_peer_filter_use_the_ipv6_set() -> None:
    wanted = full(6)
    assert wanted.chains == ["postrouting", "forward", "input"]
    assert [r.nft for r in wanted.chain("forward")] == ["ip6 saddr fd10::/48 accept",
                                                        "ip6 daddr fd10::/48 accept"]
    assert [r.nft for r in wanted.chain("input")] == [
        "udp dport 8472 ip6 saddr != @vxlan_peers counter drop"]
    assert [r.iptables for r in wanted.chain("input")] == [
        "-p udp -m udp --dport 8472 -m set ! --match-set leaseagent-vxlan-peers6 src -j DROP"]
    assert wanted.peers == frozenset(PEERS6) and wanted.family.version == 6


def test_ipv4_tags_are_those_of_before_dual_stack_and_no_ipv6_tag_equals_one() -> None:
    """Existing hosts hold rules with these comments: they must stay ours."""
    v4 = full()
    assert [r.tag for r in v4.rules] == [
        "leaseagent:masq-mark:4b9fda6ece", "leaseagent:masq-pod-net:273ea0dd8b",
        "leaseagent:masq-net-pod:c4e730c1ef", "leaseagent:masq-out-pod:2b43c06b60",
        "leaseagent:masq-net-out:41086c7138", "leaseagent:masq-host-net:2a8028383f",
        "leaseagent:fwd-from-net:25c06d69a5", "leaseagent:fwd-to-net:48e1f1dbce",
        "leaseagent:vxlan-peers:4f70213c21"]
    v6 = full(6)
    assert [r.name for r in v6.rules] == [r.name for r in v4.rules]
    # The mark rule's text is the same in both families; its tag is not.
    assert v6.rules[0].nft == v4.rules[0].nft
    assert not {r.tag for r in v6.rules} & {r.tag for r in v4.rules}


def test_compare_finds_ipv6_drift_and_an_ipv4_firewalls_rules_are_not_ipv6s() -> None:
    wanted = full(6)
    seen = observed_as_written(wanted)
    assert compare(wanted, seen) == []
    post = list(seen.chains["postrouting"])
    dropped = compare(wanted, ObservedRules(chains={**seen.chains, "postrouting": post[1:]},
                                            hooked=seen.hooked, peers=seen.peers))
    assert [d.kind for d in dropped] == [MISSING] and "masq-mark" in dropped[0].detail
    swapped = compare(wanted, ObservedRules(chains=seen.chains, hooked=seen.hooked,
                                            peers=frozenset({"fd00:99::12", "fd00:99::66"})))
    assert [d.kind for d in swapped] == [PEERS] and "fd00:99::66" in swapped[0].detail
    # What the IPv4 table holds, read as if it were the IPv6 one: nothing matches.
    v4_seen = observed_as_written(full())
    assert {d.kind for d in compare(wanted, v4_seen)} == {MISSING, EXTRA, PEERS}


def test_a_ruleset_refuses_addresses_of_the_other_family() -> None:
    with pytest.raises(ValueError, match=r"IPv6 traffic rules given 10\.250\.0\.1[23]"):
        ruleset(TrafficSettings(), network=NET6, own_subnet=None, vxlan_ports=(8472,),
                peers=PEERS_IPS)
    with pytest.raises(ValueError, match="IPv4 traffic rules given fd10:0:0:22::/64"):
        ruleset(TrafficSettings(ip_masq=True), network=NET, own_subnet=POD6, vxlan_ports=())


def test_the_ipv6_nft_table_is_table_ip6_with_an_ipv6_address_set() -> None:
    text = NftFirewall(family=6).render(full(6))
    assert text.startswith("table ip6 leaseagent {\n\tset vxlan_peers {\n\t\ttype ipv6_addr\n"
                           "\t\telements = { 2001:db8::13, fd00:99::12 }\n")
    assert text.count('comment "leaseagent:') == 9
    assert NftFirewall().render(full()).startswith("table ip leaseagent {")


async def test_an_adapter_refuses_the_other_familys_ruleset_before_running_anything() -> None:
    for fw in (NftFirewall(family=6), IptablesFirewall(family=6)):
        with pytest.raises(ValueError, match="IPv4 ruleset given to the IPv6"):
            await fw.apply(full())
    with pytest.raises(ValueError, match="IPv6 ruleset given to the IPv4"):
        await IptablesFirewall().apply(full(6))


def test_the_factory_names_the_missing_ipv6_program(monkeypatch: pytest.MonkeyPatch) -> None:
    def which(program: str, path: str | None = None) -> str | None:
        return None if program.startswith("ip6tables") else f"/usr/sbin/{program}"

    monkeypatch.setattr(firewall_module.shutil, "which", which)
    assert isinstance(firewall(nftables=False), IptablesFirewall)  # IPv4 needs none of them
    with pytest.raises(ConfigError, match=r"IPv6 traffic rules need ip6tables-restore "
                                          r"\(apt-get install --no-install-recommends iptables\)"):
        firewall(nftables=False, family=6)
    fw = firewall(nftables=True, family=6)
    assert isinstance(fw, NftFirewall) and fw.table == "ip6 leaseagent"


def test_our_forward_jump_goes_right_after_docker_users() -> None:
    from leaseagent.core.rules import jump_index
    assert jump_index("FORWARD", []) == 0
    assert jump_index("FORWARD", ["DOCKER-USER", "DOCKER-FORWARD", None]) == 1
    assert jump_index("FORWARD", [None, "DOCKER-USER", "DOCKER-ISOLATION-STAGE-1"]) == 2
    assert jump_index("POSTROUTING", ["DOCKER-USER"]) == 0  # only FORWARD has it
