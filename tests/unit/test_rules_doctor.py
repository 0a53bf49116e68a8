"""`leasectl doctor`'s rule check (leaseagent.cli.doctor._check_rules) with a dual-stack
network config: both families checked, an IPv6 problem says it is one, a family whose
firewall cannot be read does not hide the other. The firewall factory is replaced by
one that serves what each family's firewall is made to hold; nothing is run."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from pathlib import Path

import pytest

from leaseagent.cli.doctor import DoctorSettings, _check_rules
from leaseagent.core.leases import Peer
from leaseagent.core.network import NetworkConfig, parse_network_config
from leaseagent.core.profiles.vxlan import VxlanLeaseData
from leaseagent.core.rules import ObservedRules, Ruleset, TrafficSettings, ruleset
from leaseagent.dataplane import firewall as firewall_module
from leaseagent.errors import ConfigError

POD = IPv4Network("10.5.34.0/24")
POD6 = IPv6Network("fd10:0:0:22::/64")
MAC = VxlanLeaseData("0a:00:00:00:00:01")
PEER = Peer(IPv4Network("10.5.7.0/24"), IPv4Address("10.250.0.7"), "vxlan", MAC,
            ipv6_subnet=IPv6Network("fd10:0:0:7::/64"), public_ipv6=IPv6Address("fd00:99::7"),
            data6=MAC)
SETTINGS = DoctorSettings(iface=None, public_ip=None, subnet_file=Path("/nonexistent"),
                          state_dir=Path("/nonexistent"), route_protocol=76,
                          traffic=TrafficSettings(ip_masq=True))


def config(*, ipv6: bool) -> NetworkConfig:
    doc: dict[str, object] = {"Network": "10.5.0.0/16", "Backend": {"Type": "vxlan"}}
    if ipv6:
        doc |= {"EnableIPv6": True, "IPv6Network": "fd10::/48"}
    return parse_network_config(json.dumps(doc))


def held(family: int) -> Ruleset:
    """What the agent writes for `family` with this lease and this peer."""
    network = config(ipv6=True)
    net = network.network if family == 4 else network.ipv6.network  # type: ignore[union-attr]
    peer_ip = PEER.public_ip if family == 4 else PEER.public_ipv6
    return ruleset(TrafficSettings(ip_masq=True), network=net, own_subnet=POD if family == 4 else POD6,
                   vxlan_ports=(8472,), peers=[peer_ip])  # type: ignore[list-item]


def as_written(wanted: Ruleset) -> ObservedRules:
    tags = wanted.tags()
    return ObservedRules(chains={c: list(t) for c, t in tags.items()},
                         hooked=dict.fromkeys(tags, True), peers=wanted.peer_texts)


@dataclass
class Held:
    observed: ObservedRules

    async def observe(self, *, deep: bool = True) -> ObservedRules:
        return self.observed


def serve(monkeypatch: pytest.MonkeyPatch, by_family: dict[int, Callable[[], Held]]) -> list[int]:
    """Make firewall(...) give each family's Held; the families asked for, in order."""
    asked: list[int] = []

    def factory(*, nftables: bool, family: int = 4, netns: str | None = None) -> Held:
        asked.append(family)
        return by_family[family]()

    monkeypatch.setattr(firewall_module, "firewall", factory)
    return asked


async def test_both_families_in_place_no_problem(monkeypatch: pytest.MonkeyPatch) -> None:
    asked = serve(monkeypatch, {4: lambda: Held(as_written(held(4))),
                                6: lambda: Held(as_written(held(6)))})
    found = await _check_rules(SETTINGS, config(ipv6=True), POD, {PEER.subnet: PEER},
                               own_ipv6_subnet=POD6, ports=(8472,))
    assert found == [] and asked == [4, 6]


async def test_a_missing_ipv6_rule_is_named_as_ipv6(monkeypatch: pytest.MonkeyPatch) -> None:
    v6 = as_written(held(6))
    chains = {**v6.chains, "postrouting": list(v6.chains["postrouting"])[1:]}
    serve(monkeypatch, {4: lambda: Held(as_written(held(4))),
                        6: lambda: Held(ObservedRules(chains=chains, hooked=v6.hooked,
                                                      peers=v6.peers))})
    found = await _check_rules(SETTINGS, config(ipv6=True), POD, {PEER.subnet: PEER},
                               own_ipv6_subnet=POD6, ports=(8472,))
    assert [(p.kind, p.object) for p in found] == [("rule", "IPv6 postrouting")]
    assert found[0].text.startswith("IPv6 rule missing rule masq-mark in postrouting: ")


async def test_ipv4_only_config_checks_ipv4_only(monkeypatch: pytest.MonkeyPatch) -> None:
    asked = serve(monkeypatch, {4: lambda: Held(as_written(held(4)))})
    assert await _check_rules(SETTINGS, config(ipv6=False), POD, {PEER.subnet: PEER},
                              ports=(8472,)) == []
    assert asked == [4]


async def test_an_unreadable_ipv6_firewall_leaves_the_ipv4_check(
        monkeypatch: pytest.MonkeyPatch) -> None:
    def missing() -> Held:
        raise ConfigError("IPv6 traffic rules need ip6tables-restore (apt-get install ...)")

    serve(monkeypatch, {4: lambda: Held(ObservedRules()), 6: missing})
    found = await _check_rules(SETTINGS, config(ipv6=True), POD, {PEER.subnet: PEER},
                               own_ipv6_subnet=POD6, ports=(8472,))
    assert found[-1].object == "IPv6 firewall"
    assert found[-1].text.startswith("IPv6 rule check impossible: IPv6 traffic rules need "
                                     "ip6tables-restore")
    assert {p.object for p in found[:-1]} == {"postrouting", "forward", "input"}  # IPv4's
