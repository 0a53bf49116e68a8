"""Lease key names and the key layout, against flannel's own expression."""

from __future__ import annotations

import re
from ipaddress import IPv4Network, IPv6Network

import pytest
from hypothesis import given
from hypothesis import strategies as st

from leaseagent.core.leases import KeyLayout, SubnetKey, key_name, parse_key_name

# flannel's pkg/subnet/subnet.go, subnetRegex (Go's RE2 reads it as Python's re does).
FLANNEL_KEY = re.compile(r"(\d+\.\d+.\d+.\d+)-(\d+)(?:&([a-f\d:]+)-(\d+))?$")


def test_layout_names_every_key() -> None:
    layout = KeyLayout("/coreos.com/network")
    assert layout.config_key == "/coreos.com/network/config"
    assert layout.subnets_prefix == "/coreos.com/network/subnets/"
    assert layout.lease_key(IPv4Network("10.5.34.0/24")) == "/coreos.com/network/subnets/10.5.34.0-24"
    assert (layout.lease_key(IPv4Network("10.5.34.0/24"), IPv6Network("fd00:5:34::/64"))
            == "/coreos.com/network/subnets/10.5.34.0-24&fd00:5:34::-64")
    assert layout.name_of(layout.lease_key(IPv4Network("10.5.1.0/24"))) == "10.5.1.0-24"


def test_key_names_round_trip() -> None:
    assert key_name(IPv4Network("10.5.34.0/24")) == "10.5.34.0-24"
    assert parse_key_name("10.5.34.0-24") == SubnetKey(IPv4Network("10.5.34.0/24"))
    assert parse_key_name("10.5.34.0-24&fd00:5:34::-64") == SubnetKey(
        IPv4Network("10.5.34.0/24"), IPv6Network("fd00:5:34::/64"))
    assert parse_key_name("10.5.34.0-024").ipv4 == IPv4Network("10.5.34.0/24")  # as ParseUint


@pytest.mark.parametrize(
    "name",
    ["10.5.34.1-24", "10.5.34.0-33", "10.5.34.0", "10.5.34.0-", "-24", "10.5.34.0-2x",
     "10.5.34.0/24", "fd00:5:34::-64", "", "garbage", "10.5.34.0--24", "x10.5.34.0-24",
     "10.5.34.0-24&FD00::-64", "10.5.34.0-24&fd00::1-64", "10.5.34.0-24&fd00::-129"],
)
def test_misaligned_or_garbage_key_names_raise_value_error(name: str) -> None:
    with pytest.raises(ValueError) as err:
        parse_key_name(name)
    assert repr(name) in str(err.value)


@given(v4=st.ip_addresses(v=4), v4_len=st.integers(8, 30), v6=st.ip_addresses(v=6) | st.none(),
       v6_len=st.integers(16, 126))
def test_our_names_are_flannels_and_read_back(v4, v4_len, v6, v6_len) -> None:  # type: ignore[no-untyped-def]
    ipv4 = IPv4Network((int(v4), v4_len), strict=False)
    ipv6 = IPv6Network((int(v6), v6_len), strict=False) if v6 is not None else None
    name = key_name(ipv4, ipv6)
    match = FLANNEL_KEY.search(name)
    assert match is not None and match.start() == 0
    assert match.group(1) == str(ipv4.network_address) and int(match.group(2)) == v4_len
    if ipv6 is not None:
        assert match.group(3) == str(ipv6.network_address) and int(match.group(4)) == v6_len
    assert parse_key_name(name) == SubnetKey(ipv4, ipv6)


@given(v4=st.ip_addresses(v=4), v4_len=st.integers(0, 32), plain=st.booleans())
def test_a_parsed_subnet_is_an_ipv4network_to_every_use(v4, v4_len, plain) -> None:  # type: ignore[no-untyped-def]
    """The key's subnet (core.network.HashedIPv4Network, its hash computed once) is equal
    to, hashed as, shown as and ordered as ipaddress's IPv4Network of the same text, so
    dicts keyed by either find the other. `plain`: the dotted-quad fast path or the
    general one (a leading zero in the length)."""
    ipv4 = IPv4Network((int(v4), v4_len), strict=False)
    name = f"{ipv4.network_address}-{'' if plain else '0'}{v4_len}"
    parsed = parse_key_name(name).ipv4
    assert isinstance(parsed, IPv4Network)
    assert parsed == ipv4 and ipv4 == parsed and hash(parsed) == hash(ipv4)
    assert {ipv4: 1}[parsed] == 1 and {parsed: 1}[ipv4] == 1
    assert repr(parsed) == repr(ipv4) and str(parsed) == str(ipv4)
    assert not parsed < ipv4 and not ipv4 < parsed
    if v4_len:
        assert parsed.supernet() == ipv4.supernet()
