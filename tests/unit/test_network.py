"""flannel's network-config rules (docs/architecture.md, "Network config")."""

from __future__ import annotations

import json
import re
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any

import pytest

from leaseagent.core.network import (
    parse_network_config,
)
from leaseagent.errors import NetworkConfigError


def config(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


# --- SubnetLen defaults and bounds --------------------------------------------


@pytest.mark.parametrize(
    ("network", "subnet_len"),
    [
        ("10.0.0.0/8", 24),
        ("10.5.0.0/16", 24),
        ("10.5.0.0/22", 24),  # /22 is the smallest network that still gets /24s
        ("10.5.0.0/23", 25),  # smaller: prefix + 2
        ("10.5.0.0/24", 26),
        ("10.5.0.0/28", 30),
    ],
)
def test_subnet_len_defaults_to_24_for_22_and_larger_else_prefix_plus_2(
    network: str, subnet_len: int
) -> None:
    assert parse_network_config(config(Network=network)).subnet_len == subnet_len


@pytest.mark.parametrize("network", ["10.5.0.0/29", "10.5.0.0/30", "10.5.0.0/32"])
def test_network_smaller_than_28_without_subnet_len_is_refused_naming_network(network: str) -> None:
    with pytest.raises(NetworkConfigError) as err:
        parse_network_config(config(Network=network))
    assert "Network" in str(err.value)
    assert network in str(err.value)


def test_network_29_with_explicit_subnet_len_is_still_bounded_by_prefix_plus_2() -> None:
    with pytest.raises(NetworkConfigError, match=r"SubnetLen=30"):
        parse_network_config(config(Network="10.5.0.0/29", SubnetLen=30))


@pytest.mark.parametrize("subnet_len", [31, 32])
def test_subnet_len_above_30_is_refused_naming_field_and_value(subnet_len: int) -> None:
    with pytest.raises(NetworkConfigError) as err:
        parse_network_config(config(Network="10.5.0.0/16", SubnetLen=subnet_len))
    assert f"SubnetLen={subnet_len}" in str(err.value)
    assert "at most 30" in str(err.value)


def test_subnet_len_30_is_accepted() -> None:
    assert parse_network_config(config(Network="10.5.0.0/16", SubnetLen=30)).subnet_len == 30


@pytest.mark.parametrize("subnet_len", [16, 17])
def test_subnet_len_below_prefix_plus_2_is_refused_naming_field_and_value(subnet_len: int) -> None:
    with pytest.raises(NetworkConfigError) as err:
        parse_network_config(config(Network="10.5.0.0/16", SubnetLen=subnet_len))
    assert f"SubnetLen={subnet_len}" in str(err.value)
    assert "18" in str(err.value)  # names the bound


def test_subnet_len_exactly_prefix_plus_2_is_accepted() -> None:
    net = parse_network_config(config(Network="10.5.0.0/16", SubnetLen=18))
    assert net.subnet_len == 18
    assert net.capacity == 3  # four subnets, the first skipped


@pytest.mark.parametrize("bad", ["24", 24.0, True, -1, 2.4e1])
def test_subnet_len_of_the_wrong_type_or_negative_is_refused(bad: object) -> None:
    raw = json.dumps({"Network": "10.5.0.0/16", "SubnetLen": bad}).encode()
    with pytest.raises(NetworkConfigError, match="SubnetLen="):
        parse_network_config(raw)


# --- SubnetMin / SubnetMax -----------------------------------------------------


def test_subnet_min_defaults_to_second_subnet_and_max_to_last() -> None:
    net = parse_network_config(config(Network="10.5.0.0/16"))
    assert net.subnet_min == IPv4Address("10.5.1.0")
    assert net.subnet_max == IPv4Address("10.5.255.0")


def test_min_max_defaults_follow_a_non_default_subnet_len() -> None:
    net = parse_network_config(config(Network="10.5.0.0/24", SubnetLen=28))
    assert net.subnet_min == IPv4Address("10.5.0.16")
    assert net.subnet_max == IPv4Address("10.5.0.240")


def test_explicit_min_and_max_are_kept() -> None:
    net = parse_network_config(
        config(Network="10.5.0.0/16", SubnetMin="10.5.10.0", SubnetMax="10.5.20.0")
    )
    assert (net.subnet_min, net.subnet_max) == (IPv4Address("10.5.10.0"), IPv4Address("10.5.20.0"))
    assert net.capacity == 11


@pytest.mark.parametrize("field", ["SubnetMin", "SubnetMax"])
def test_min_or_max_outside_the_network_is_refused_naming_it(field: str) -> None:
    with pytest.raises(NetworkConfigError) as err:
        parse_network_config(config(Network="10.5.0.0/16", **{field: "10.6.1.0"}))
    assert f'{field}="10.6.1.0"' in str(err.value)
    assert "10.5.0.0/16" in str(err.value)


@pytest.mark.parametrize("field", ["SubnetMin", "SubnetMax"])
def test_min_or_max_off_the_subnet_boundary_is_refused_naming_it(field: str) -> None:
    with pytest.raises(NetworkConfigError) as err:
        parse_network_config(config(Network="10.5.0.0/16", **{field: "10.5.3.7"}))
    assert f'{field}="10.5.3.7"' in str(err.value)
    assert "/24 boundary" in str(err.value)


@pytest.mark.parametrize("field", ["SubnetMin", "SubnetMax"])
def test_min_or_max_that_is_not_an_address_is_refused_naming_it(field: str) -> None:
    with pytest.raises(NetworkConfigError) as err:
        parse_network_config(config(Network="10.5.0.0/16", **{field: "ten.five"}))
    assert f'{field}="ten.five"' in str(err.value)


def test_min_above_max_is_refused() -> None:
    with pytest.raises(NetworkConfigError) as err:
        parse_network_config(
            config(Network="10.5.0.0/16", SubnetMin="10.5.20.0", SubnetMax="10.5.10.0")
        )
    assert 'SubnetMin="10.5.20.0"' in str(err.value)
    assert "10.5.10.0" in str(err.value)


def test_min_equal_to_max_gives_one_subnet() -> None:
    net = parse_network_config(
        config(Network="10.5.0.0/16", SubnetMin="10.5.7.0", SubnetMax="10.5.7.0")
    )
    assert list(net.subnets()) == [IPv4Network("10.5.7.0/24")]


# --- Network, Backend, IPv6 ------------------------------------------------------


@pytest.mark.parametrize("network", ["10.5.0.1/16", "10.5.0.0/33", "fd00::/64", "nonsense"])
def test_bad_network_is_refused_naming_it(network: str) -> None:
    with pytest.raises(NetworkConfigError) as err:
        parse_network_config(config(Network=network))
    assert f'Network="{network}"' in str(err.value)


def test_missing_network_is_refused() -> None:
    with pytest.raises(NetworkConfigError, match="Network is missing"):
        parse_network_config(config(SubnetLen=24))


@pytest.mark.parametrize("raw", [b"", b"{", b"[1, 2]", b'"10.5.0.0/16"', b"\xff\xfe", b"[" * 60000])
def test_config_that_is_not_a_json_object_is_refused(raw: bytes) -> None:
    with pytest.raises(NetworkConfigError):
        parse_network_config(raw)


def test_backend_type_defaults_to_vxlan_only_without_a_backend() -> None:
    """No Backend: vxlan (flannel's docs; its code says udp, docs/flannel.md). A Backend
    without a Type, or null: flanneld stops with "unknown backend type", so do we."""
    assert parse_network_config(config(Network="10.5.0.0/16")).backend_type == "vxlan"
    for backend in ({}, {"VNI": 1}, None, {"Type": None}):
        with pytest.raises(NetworkConfigError, match="Backend"):
            parse_network_config(config(Network="10.5.0.0/16", Backend=backend))


def test_backend_fields_are_kept_under_flannels_names() -> None:
    net = parse_network_config(
        config(Network="10.5.0.0/16", Backend={"type": "VXLAN", "port": 1, "Flavour": 2})
    )
    assert net.backend_type == "vxlan"
    assert net.backend == {"Type": "VXLAN", "Port": 1}  # Flavour: not a field, ignored


@pytest.mark.parametrize("backend", [[], "vxlan", {"Type": 3}, {"Type": ""}])
def test_bad_backend_is_refused_naming_it(backend: object) -> None:
    with pytest.raises(NetworkConfigError, match="Backend"):
        parse_network_config(config(Network="10.5.0.0/16", Backend=backend))


def test_ipv6_defaults_are_flannels() -> None:
    """flannel's CheckNetworkConfig: /64 subnets for a /62 or larger network, else
    prefix + 2; SubnetMin the second subnet, SubnetMax the last."""
    net = parse_network_config(
        config(Network="10.5.0.0/16", IPv6Network="fd00:5::/48", EnableIPv6=True))
    assert net.ipv6 is not None
    assert net.ipv6.network == IPv6Network("fd00:5::/48")
    assert net.ipv6.subnet_len == 64
    assert net.ipv6.subnet_min == IPv6Address("fd00:5:0:1::")
    assert net.ipv6.subnet_max == IPv6Address("fd00:5:0:ffff::")
    assert net.ipv6.capacity == 65535
    small = parse_network_config(
        config(Network="10.5.0.0/16", IPv6Network="fd00:5::/120", EnableIPv6=True)).ipv6
    assert small is not None and small.subnet_len == 122 and small.capacity == 3
    assert parse_network_config(config(Network="10.5.0.0/16")).ipv6 is None


@pytest.mark.parametrize(("fields", "named"), [
    ({"IPv6SubnetLen": 127}, "IPv6SubnetLen=127"),
    ({"IPv6SubnetLen": 49}, "IPv6SubnetLen=49"),
    ({"IPv6Network": "fd00:5::/125"}, 'IPv6Network="fd00:5::/125"'),
    ({"IPv6Network": None}, "IPv6Network=null"),
    ({"IPv6SubnetMin": "fd00:6::"}, 'IPv6SubnetMin="fd00:6::"'),
    ({"IPv6SubnetMax": "fd00:5:0:1::1"}, 'IPv6SubnetMax="fd00:5:0:1::1"'),
    ({"IPv6SubnetMin": "10.5.0.0"}, 'IPv6SubnetMin="10.5.0.0"'),
])
def test_bad_ipv6_fields_are_refused_naming_them(fields: dict[str, object], named: str) -> None:
    base: dict[str, object] = {"Network": "10.5.0.0/16", "IPv6Network": "fd00:5::/48",
                               "EnableIPv6": True}
    with pytest.raises(NetworkConfigError, match=re.escape(named)):
        parse_network_config(config(**{**base, **fields}))


def test_enable_ipv6_without_an_ipv6_network_is_refused() -> None:
    with pytest.raises(NetworkConfigError, match="IPv6Network is missing"):
        parse_network_config(config(Network="10.5.0.0/16", EnableIPv6=True))


def test_enable_ipv6_false_with_an_ipv6_network_is_accepted() -> None:
    net = parse_network_config(
        config(Network="10.5.0.0/16", IPv6Network="fd00:5::/48", EnableIPv6=False)
    )
    assert net.network == IPv4Network("10.5.0.0/16")


def test_malformed_ipv6_network_is_refused_naming_it() -> None:
    with pytest.raises(NetworkConfigError, match=re.escape('IPv6Network="10.5.0.0/16"')):
        parse_network_config(config(Network="10.5.0.0/16", IPv6Network="10.5.0.0/16"))


def test_enable_ipv4_false_is_refused() -> None:
    with pytest.raises(NetworkConfigError, match="EnableIPv4=false"):
        parse_network_config(config(Network="10.5.0.0/16", EnableIPv4=False))


def test_enable_flag_that_is_not_a_boolean_is_refused_naming_it() -> None:
    with pytest.raises(NetworkConfigError, match='EnableIPv6="yes"'):
        parse_network_config(config(Network="10.5.0.0/16", EnableIPv6="yes"))


# --- capacity, subnets, check_subnet -------------------------------------------


def test_capacity_counts_min_to_max_inclusive() -> None:
    assert parse_network_config(config(Network="10.5.0.0/16")).capacity == 255
    assert parse_network_config(config(Network="10.5.0.0/24")).capacity == 3  # /26s
    assert parse_network_config(config(Network="10.0.0.0/8")).capacity == 65535


def test_subnets_lists_every_subnet_of_the_range_in_order() -> None:
    net = parse_network_config(config(Network="10.5.0.0/24"))
    subnets = list(net.subnets())
    assert subnets == [
        IPv4Network("10.5.0.64/26"),
        IPv4Network("10.5.0.128/26"),
        IPv4Network("10.5.0.192/26"),
    ]
    assert len(subnets) == net.capacity
    assert [net.subnet_at(i) for i in range(net.capacity)] == subnets


def test_in_range_and_check_subnet() -> None:
    net = parse_network_config(
        config(Network="10.5.0.0/16", SubnetMin="10.5.10.0", SubnetMax="10.5.20.0")
    )
    assert net.in_range(IPv4Network("10.5.10.0/24"))
    assert not net.in_range(IPv4Network("10.5.9.0/24"))  # in the network, below the range
    assert not net.in_range(IPv4Network("10.5.10.0/25"))
    assert net.check_subnet(IPv4Network("10.5.9.0/24")) is None  # narrowed range still valid
    assert "not a /24" in (net.check_subnet(IPv4Network("10.5.10.0/25")) or "")
    assert "outside the network" in (net.check_subnet(IPv4Network("10.6.1.0/24")) or "")
