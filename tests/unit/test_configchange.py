"""The class of a network config change, per field; what it does to a lease; the README table."""

from __future__ import annotations

import json
import re
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path
from typing import Any

import pytest

from leaseagent.core.configchange import (
    FIELDS,
    IN_PLACE,
    NONE,
    REBUILD,
    RELEASE,
    classify,
    fields_table,
    flannel_mtu_changes,
    lease_impact,
)
from leaseagent.core.network import NetworkConfig, parse_network_config
from leaseagent.core.profiles import BACKEND_TYPES

BASE: dict[str, Any] = {"Network": "10.5.0.0/16", "Backend": {"Type": "vxlan"}}
DUAL: dict[str, Any] = {**BASE, "EnableIPv6": True, "IPv6Network": "fd00:5::/48"}


def config(doc: dict[str, Any]) -> NetworkConfig:
    return parse_network_config(json.dumps(doc))


def with_backend(**options: object) -> dict[str, Any]:
    return {**BASE, "Backend": {"Type": "vxlan", **options}}


WG: dict[str, Any] = {**BASE, "Backend": {"Type": "wireguard"}}


def with_wireguard(**options: object) -> dict[str, Any]:
    return {**BASE, "Backend": {"Type": "wireguard", **options}}


# (field, old, new, class): every field of FIELDS and every registered option appears.
CASES = [
    ("Network", BASE, {**BASE, "Network": "10.5.0.0/17"}, RELEASE),
    ("SubnetLen", BASE, {**BASE, "SubnetLen": 25}, RELEASE),
    ("SubnetMin", BASE, {**BASE, "SubnetMin": "10.5.9.0"}, RELEASE),
    ("SubnetMax", BASE, {**BASE, "SubnetMax": "10.5.90.0"}, RELEASE),
    ("EnableIPv6", BASE, DUAL, RELEASE),
    ("EnableIPv6", DUAL, BASE, RELEASE),
    ("IPv6Network", DUAL, {**DUAL, "IPv6Network": "fd00:6::/48"}, RELEASE),
    ("IPv6SubnetLen", DUAL, {**DUAL, "IPv6SubnetLen": 80}, RELEASE),
    ("IPv6SubnetMin", DUAL, {**DUAL, "IPv6SubnetMin": "fd00:5:0:9::"}, RELEASE),
    ("IPv6SubnetMax", DUAL, {**DUAL, "IPv6SubnetMax": "fd00:5:0:90::"}, RELEASE),
    ("EnableNFTables", BASE, {**BASE, "EnableNFTables": True}, IN_PLACE),
    ("Backend.Type", BASE, {**BASE, "Backend": {"Type": "host-gw"}}, REBUILD),
    ("Backend.Type", {**BASE, "Backend": {"Type": "alloc"}}, BASE, REBUILD),
    ("Backend.MTU", BASE, with_backend(MTU=1400), IN_PLACE),
    ("Backend.Port", BASE, with_backend(Port=4789), REBUILD),
    ("Backend.DirectRouting", BASE, with_backend(DirectRouting=True), IN_PLACE),
    ("Backend.VNI", BASE, with_backend(VNI=2), REBUILD),
    ("Backend.GBP", BASE, with_backend(GBP=True), IN_PLACE),
    ("Backend.Learning", BASE, with_backend(Learning=True), IN_PLACE),
    ("Backend.PSK", WG, with_wireguard(PSK="A" * 43 + "="), IN_PLACE),
    ("Backend.PersistentKeepaliveInterval", WG, with_wireguard(PersistentKeepaliveInterval=25),
     IN_PLACE),
    ("Backend.MTU", WG, with_wireguard(MTU=1400), IN_PLACE),
    ("Backend.ListenPort", WG, with_wireguard(ListenPort=5000), IN_PLACE),
    ("Backend.ListenPortV6", WG, with_wireguard(ListenPortV6=5001), IN_PLACE),
    ("Backend.Mode", WG, with_wireguard(Mode="auto"), IN_PLACE),
]


@pytest.mark.parametrize(("name", "old", "new", "kind"), CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_each_field_has_its_class(name: str, old: dict[str, Any], new: dict[str, Any],
                                  kind: str) -> None:
    change = classify(config(old), config(new))
    assert change.kind == kind
    assert name in [f.name for f in change.fields]
    # And back again: the same class.
    assert classify(config(new), config(old)).kind == kind


def test_every_field_and_option_is_covered_by_a_case() -> None:
    covered = {c[0] for c in CASES}
    fields = {f.name for f in FIELDS if f.kind != NONE}
    options = {f"Backend.{key}" for kind in BACKEND_TYPES.values() for key in kind.option_keys}
    assert fields | options <= covered, (
        f"add a case to CASES for each of {sorted((fields | options) - covered)}")


def test_a_change_has_the_class_of_its_most_disruptive_field() -> None:
    mtu_and_network = {**with_backend(MTU=1400), "Network": "10.5.0.0/17"}
    assert classify(config(BASE), config(mtu_and_network)).kind == RELEASE
    all_three = {**mtu_and_network, "Backend": {"Type": "host-gw"}}
    assert classify(config(BASE), config(all_three)).kind == REBUILD


@pytest.mark.parametrize("same", [
    {**BASE, "SubnetLen": 24},  # the default, written out
    {**BASE, "SubnetMin": "10.5.1.0", "SubnetMax": "10.5.255.0"},
    with_backend(VNI=1, Port=8472),  # flannel's defaults
    with_backend(VNI=None, Port=0),  # null: the default; Port 0: the kernel's 8472
    with_backend(vni=1, mtu=None, directrouting=False),  # Go matches keys ignoring case
    with_backend(Flavour=True),  # a key flannel's struct does not have: ignored, as by Go
    {**BASE, "EnableIPv4": True},
    {**BASE, "IPv6Network": "fd00:9::/48"},  # without EnableIPv6: only checked for form
])
def test_what_the_agents_read_the_same_is_no_change(same: dict[str, Any]) -> None:
    change = classify(config(BASE), config(same))
    assert change.kind == NONE and not change
    assert change.summary == "no change"


def test_the_summary_names_each_field_with_both_values() -> None:
    change = classify(config(BASE), config({**with_backend(MTU=1400), "Network": "10.5.0.0/17"}))
    assert change.summary == ("re-lease: Network 10.5.0.0/16 -> 10.5.0.0/17; "
                              "SubnetMax 10.5.255.0 -> 10.5.127.0; Backend.MTU unset -> 1400")


def test_an_option_the_registry_does_not_name_is_a_rebuild(monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    vxlan = BACKEND_TYPES["vxlan"]
    monkeypatch.setitem(BACKEND_TYPES, "vxlan", type(vxlan)(
        vxlan.name, vxlan.parse_options, vxlan.parse_lease_data,
        option_keys={"MTU": "vni"}))  # MTU is read, but not said to set an attribute
    change = classify(config(BASE), config(with_backend(MTU=1400)))
    assert change.kind == REBUILD
    assert [f.name for f in change.fields] == ["Backend"]


# ------------------------------------------------------------------ per lease

S5 = IPv4Network("10.5.5.0/24")
S200 = IPv4Network("10.5.200.0/24")
S6 = IPv6Network("fd00:5:0:5::/64")


def test_shrinking_moves_only_a_subnet_outside_the_new_network() -> None:
    old, new = config(BASE), config({**BASE, "Network": "10.5.0.0/17"})
    inside = lease_impact(old, new, S5, None)
    assert inside.moves is None and not inside.rekeys and not inside.restart_docker
    outside = lease_impact(old, new, S200, None)
    assert outside.moves == "subnet 10.5.200.0/24 is outside the network 10.5.0.0/17"
    assert outside.docker == ("FLANNEL_SUBNET",)


def test_growing_moves_nobody() -> None:
    old, new = config({**BASE, "Network": "10.5.0.0/17"}), config(BASE)
    assert lease_impact(old, new, S5, None) == lease_impact(old, new, S5, None)
    assert not lease_impact(old, new, S5, None).restart_docker
    assert lease_impact(old, new, S5, None).moves is None


def test_a_subnet_outside_a_narrowed_range_but_inside_the_network_is_kept() -> None:
    old, new = config(BASE), config({**BASE, "SubnetMin": "10.5.100.0"})
    assert lease_impact(old, new, S5, None).moves is None


def test_turning_ipv6_on_or_off_rekeys_every_host_and_restarts_docker() -> None:
    on = lease_impact(config(BASE), config(DUAL), S5, None)
    assert on.moves is None and on.rekeys
    # FLANNEL_MTU: the IPv6 device's -70 is the smaller now.
    assert on.docker == ("FLANNEL_IPV6_SUBNET", "FLANNEL_MTU")
    off = lease_impact(config(DUAL), config(BASE), S5, S6)
    assert off.rekeys and "FLANNEL_IPV6_SUBNET" in off.docker


def test_an_ipv6_part_that_still_fits_is_kept() -> None:
    old = config(DUAL)
    new = config({**DUAL, "IPv6SubnetMax": "fd00:5:0:90::"})
    assert not lease_impact(old, new, S5, S6).rekeys
    moved = config({**DUAL, "IPv6Network": "fd00:6::/48"})
    assert lease_impact(old, moved, S5, S6).rekeys


@pytest.mark.parametrize(("new", "changes"), [
    (with_backend(MTU=1400), True),
    (with_backend(DirectRouting=True), False),
    (with_backend(Port=4789), False),
    ({**BASE, "Backend": {"Type": "host-gw"}}, True),  # 1450 -> the underlay's
    ({**BASE, "Backend": {"Type": "alloc"}}, True),
    ({**BASE, "Network": "10.5.0.0/17"}, False),
])
def test_flannel_mtu_changes_by_the_backend_types_rule(new: dict[str, Any], changes: bool
                                                       ) -> None:
    assert flannel_mtu_changes(config(BASE), config(new)) is changes


def test_host_gw_to_alloc_keeps_the_underlay_mtu() -> None:
    gw, alloc = config({**BASE, "Backend": {"Type": "host-gw"}}), config(
        {**BASE, "Backend": {"Type": "alloc"}})
    assert flannel_mtu_changes(gw, alloc) is False


# ------------------------------------------------------------------ the README


def test_the_readme_table_is_the_classification() -> None:
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    found = re.search(r"<!-- config-fields:begin -->\n(.*?)<!-- config-fields:end -->", readme,
                      re.S)
    assert found, "README.md has no config-fields table"
    assert found[1] == fields_table(), (
        "README.md's table of config fields differs from leaseagent.core.configchange; "
        "replace it with the output of: .venv/bin/python -c 'from leaseagent.core."
        "configchange import fields_table; print(fields_table(), end=\"\")'")
