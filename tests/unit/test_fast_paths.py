"""The fast paths for reading thousands of leases give exactly ipaddress's answers.

Key names, PublicIPs, the unusable-address ranges and the network check are read
with integer arithmetic where the text is in its usual form (docs/benchmarks.md,
"Join"); these properties hold them to what ipaddress itself says, errors included.
"""

from __future__ import annotations

import json
from ipaddress import IPv4Address, IPv4Network

from hypothesis import given
from hypothesis import strategies as st

from leaseagent.core.leases import decode_lease_value, parse_key_name, unusable_ip_reason
from leaseagent.core.network import ipv4_address, parse_network_config
from leaseagent.errors import InvalidLease

OCTET_TEXT = st.one_of(st.integers(0, 300).map(str), st.integers(0, 99).map(lambda n: f"0{n}"),
                       st.sampled_from(["", "00", "1e1", " 1", "+1"]))
DOTTED = st.lists(OCTET_TEXT, min_size=3, max_size=5).map(".".join)


def _outcome(f, *args):  # type: ignore[no-untyped-def]
    try:
        return ("ok", f(*args))
    except ValueError as exc:
        return ("error", str(exc))


@given(DOTTED)
def test_ipv4_address_reads_text_as_ipaddress_does(text: str) -> None:
    assert _outcome(ipv4_address, text) == _outcome(IPv4Address, text)


def _slow_key(name: str) -> object:
    v4, _, length = name.partition("-")
    return IPv4Network(f"{v4}/{int(length)}")


@given(DOTTED, st.one_of(st.integers(0, 40).map(str), st.sampled_from(["024", "0", "0024"])))
def test_ipv4_key_names_read_as_ipaddress_reads_them(address: str, length: str) -> None:
    name = f"{address}-{length}"
    fast = _outcome(lambda n: parse_key_name(n).ipv4, name)
    if length.isdigit():
        slow = _outcome(_slow_key, name)
        assert fast[0] == slow[0]
        if fast[0] == "ok":
            assert fast == slow
    else:
        assert fast[0] == "error"


def _by_properties(ip: IPv4Address) -> str | None:
    for reason, bad in (("unspecified", ip.is_unspecified), ("loopback", ip.is_loopback),
                        ("multicast", ip.is_multicast),
                        ("broadcast", ip == IPv4Address("255.255.255.255")),
                        ("reserved", ip.is_reserved), ("link-local", ip.is_link_local)):
        if bad:
            return reason
    return None


EDGES = [0, 1, 0x7EFFFFFF, 0x7F000000, 0x7FFFFFFF, 0x80000000, 0xA9FDFFFF, 0xA9FE0000,
         0xA9FEFFFF, 0xA9FF0000, 0xDFFFFFFF, 0xE0000000, 0xEFFFFFFF, 0xF0000000, 0xFFFFFFFE,
         0xFFFFFFFF]


@given(st.one_of(st.sampled_from(EDGES), st.integers(0, 2**32 - 1)))
def test_unusable_ipv4_ranges_are_ipaddress_properties(number: int) -> None:
    ip = IPv4Address(number)
    assert unusable_ip_reason(ip) == _by_properties(ip)


NETWORK = parse_network_config(b'{"Network": "10.64.0.0/10", "SubnetLen": 24}')


@given(st.integers(0, 2**32 - 1), st.integers(8, 30))
def test_the_network_check_is_subnet_of(number: int, length: int) -> None:
    subnet = IPv4Network((number >> (32 - length) << (32 - length), length))
    outside = not subnet.subnet_of(NETWORK.network)
    why = NETWORK.check_subnet(subnet)
    if length != 24:
        assert why == f"subnet {subnet} is not a /24"
    else:
        assert (why is not None) == outside


@given(st.binary(max_size=40), st.sampled_from([b'{"', b'{"PublicIP":"10.0.0.1"', b"\xef\xbb\xbf{",
                                                b"{\x00", b'"{']))
def test_a_lease_value_is_decoded_as_json_reads_bytes(tail: bytes, head: bytes) -> None:
    """decode_lease_value reads a value opening with `{"` as UTF-8 itself (json's
    encoding detection skipped): it refuses as not JSON exactly what json.loads of the
    bytes refuses (a UTF-8 BOM, UTF-16, invalid UTF-8, surrogates)."""
    raw = head + tail
    try:
        json.loads(raw)
        by_json = "read"
    except (ValueError, UnicodeDecodeError, RecursionError):
        by_json = "malformed_json"
    try:
        decode_lease_value(raw)
        decoded = "read"
    except InvalidLease as exc:
        # "not a JSON object" is read JSON refused by the lease rules
        decoded = "malformed_json" if exc.detail == "value is not valid JSON" else "read"
    assert decoded == by_json
