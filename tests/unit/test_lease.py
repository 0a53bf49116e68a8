"""Lease values: flannel's JSON, hostile input, and the checks before a peer is programmed."""

from __future__ import annotations

import json
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from leaseagent.core.leases import (
    MAX_VALUE_BYTES,
    REASONS,
    KeyLayout,
    LeaseValue,
    Peer,
    decode_lease_value,
    unusable_ip_reason,
    validate_peer,
)
from leaseagent.core.network import parse_network_config
from leaseagent.core.profiles.base import NoLeaseData
from leaseagent.core.profiles.vxlan import VxlanLeaseData
from leaseagent.errors import InvalidLease

NETWORK = parse_network_config(b'{"Network": "10.5.0.0/16"}')
OWN_IP = IPv4Address("192.168.64.2")
SUBNET = IPv4Network("10.5.34.0/24")
MAC = "c6:d2:32:6f:8f:44"
DUAL = parse_network_config(b'{"Network": "10.5.0.0/16", "EnableIPv6": true, '
                            b'"IPv6Network": "fd00:5::/48"}')
SUBNET6 = IPv6Network("fd00:5:0:22::/64")


def vxlan_value(public_ip: str = "192.168.64.3", **backend_data: Any) -> LeaseValue:
    data = {"VNI": 1, "VtepMAC": MAC}
    data.update(backend_data)
    return LeaseValue(public_ip=IPv4Address(public_ip), backend_type="vxlan", backend_data=data)


def reason_of(raw: bytes) -> str:
    with pytest.raises(InvalidLease) as err:
        decode_lease_value(raw)
    return err.value.reason


def validation_reason(subnet: IPv4Network, value: LeaseValue) -> str:
    with pytest.raises(InvalidLease) as err:
        validate_peer(subnet, value, network=NETWORK, own_public_ip=OWN_IP)
    return err.value.reason


# --- encode / decode -----------------------------------------------------------


def test_encode_uses_flannels_field_names_and_order() -> None:
    value = LeaseValue(
        public_ip=IPv4Address("192.168.64.3"),
        backend_type="vxlan",
        backend_data={"VNI": 1, "VtepMAC": MAC},
        node_id="node-a",
    )
    doc = json.loads(value.encode())
    assert list(doc) == ["PublicIP", "PublicIPv6", "BackendType", "BackendData", "NodeID"]
    assert doc == {
        "PublicIP": "192.168.64.3",
        "PublicIPv6": None,
        "BackendType": "vxlan",
        "BackendData": {"VNI": 1, "VtepMAC": MAC},
        "NodeID": "node-a",
    }


def test_encode_omits_empty_backend_data_and_missing_node_id() -> None:
    value = LeaseValue(public_ip=IPv4Address("192.168.64.3"), backend_type="host-gw")
    assert json.loads(value.encode()) == {
        "PublicIP": "192.168.64.3",
        "PublicIPv6": None,
        "BackendType": "host-gw",
    }


def test_decode_reads_a_value_written_by_flanneld() -> None:
    raw = (
        b'{"PublicIP":"192.168.64.3","PublicIPv6":null,"BackendType":"vxlan",'
        b'"BackendData":{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:44"},"Unknown":[1]}'
    )
    value = decode_lease_value(raw)
    assert value.public_ip == IPv4Address("192.168.64.3")
    assert value.backend_type == "vxlan"
    assert value.vtep_mac == MAC
    assert value.node_id is None


def test_encode_then_decode_is_identity() -> None:
    value = LeaseValue(
        public_ip=IPv4Address("10.0.0.9"),
        backend_type="vxlan",
        backend_data={"VNI": 7, "VtepMAC": MAC},
        node_id="n1",
    )
    assert decode_lease_value(value.encode()) == value


@pytest.mark.parametrize("raw", [b"", b"{", b"not json", b"\xff\xfe\x00", b'{"PublicIP": "1.2.3.4"'])
def test_invalid_json_is_malformed_json(raw: bytes) -> None:
    assert reason_of(raw) == "malformed_json"


@pytest.mark.parametrize("raw", [b"[]", b"null", b"42", b'"192.168.64.3"', b"true"])
def test_json_that_is_not_an_object_is_malformed_json(raw: bytes) -> None:
    assert reason_of(raw) == "malformed_json"


@pytest.mark.parametrize("raw", [b"[" * 60000, b'{"a":' * 12000])
def test_deeply_nested_json_under_the_size_limit_is_malformed_json(raw: bytes) -> None:
    assert len(raw) <= MAX_VALUE_BYTES
    assert reason_of(raw) == "malformed_json"


def test_value_over_64_kib_is_too_large_even_if_valid_json() -> None:
    padding = "x" * MAX_VALUE_BYTES
    raw = json.dumps({"PublicIP": "192.168.64.3", "BackendType": "vxlan", "Pad": padding}).encode()
    assert len(raw) > 64 * 1024
    assert reason_of(raw) == "too_large"


@pytest.mark.parametrize(
    ("doc", "reason"),
    [
        ({"BackendType": "vxlan"}, "bad_public_ip"),
        ({"PublicIP": 3232252931, "BackendType": "vxlan"}, "bad_public_ip"),
        ({"PublicIP": "192.168.64.300", "BackendType": "vxlan"}, "bad_public_ip"),
        ({"PublicIP": "fd00::1", "BackendType": "vxlan"}, "bad_public_ip"),
        ({"PublicIP": "192.168.64.3", "BackendType": 1}, "unknown_backend"),
        ({"PublicIP": "192.168.64.3", "BackendType": "vxlan", "BackendData": [1]}, "bad_backend_data"),
        ({"PublicIP": "192.168.64.3", "BackendType": "vxlan", "BackendData": "x"}, "bad_backend_data"),
        ({"PublicIP": "192.168.64.3", "BackendType": "vxlan", "NodeID": 5}, "bad_node_id"),
    ],
)
def test_wrong_types_raise_invalid_lease_with_the_right_reason(doc: dict[str, Any], reason: str) -> None:
    assert reason_of(json.dumps(doc).encode()) == reason


# --- validate_peer -------------------------------------------------------------


def test_a_good_vxlan_peer_is_accepted_with_a_lowercased_mac() -> None:
    peer = validate_peer(
        SUBNET, vxlan_value(VtepMAC=MAC.upper()), network=NETWORK, own_public_ip=OWN_IP
    )
    assert peer == Peer(
        subnet=SUBNET, public_ip=IPv4Address("192.168.64.3"), backend_type="vxlan",
        data=VxlanLeaseData(MAC, 1),
    )


@pytest.mark.parametrize(("vni", "read"), [(2, 2), (0, 0), (None, None), (True, None),
                                            ("2", None), (2.0, None)])
def test_the_vni_a_vxlan_lease_names_is_read_and_anything_else_names_none(
        vni: object, read: int | None) -> None:
    """A peer's VNI decides whether this host's backend serves it (profiles.base
    .runs_other); absent, null or not an integer it names none (any VNI)."""
    peer = validate_peer(SUBNET, vxlan_value(VNI=vni), network=NETWORK, own_public_ip=OWN_IP)
    assert peer.data == VxlanLeaseData(MAC, read)


def test_a_host_gw_peer_needs_no_mac() -> None:
    value = LeaseValue(public_ip=IPv4Address("192.168.64.3"), backend_type="host-gw")
    peer = validate_peer(SUBNET, value, network=NETWORK, own_public_ip=None)
    assert peer.data == NoLeaseData()
    assert peer.backend_type == "host-gw"


@pytest.mark.parametrize(
    "ip", ["0.0.0.0", "127.0.0.1", "127.255.0.9", "224.0.0.1", "239.1.2.3", "255.255.255.255",
           "169.254.1.1", "240.0.0.1"]
)
def test_unusable_public_ip_is_refused(ip: str) -> None:
    assert validation_reason(SUBNET, vxlan_value(ip)) == "bad_public_ip"


def test_own_public_ip_is_refused() -> None:
    assert validation_reason(SUBNET, vxlan_value(str(OWN_IP))) == "public_ip_is_ours"


@pytest.mark.parametrize("backend", ["udp", "ipip", "", "VXLAN", "ipsec"])
def test_unknown_backend_is_refused(backend: str) -> None:
    value = LeaseValue(public_ip=IPv4Address("192.168.64.3"), backend_type=backend,
                       backend_data={"VtepMAC": MAC})
    assert validation_reason(SUBNET, value) == "unknown_backend"


@pytest.mark.parametrize(
    "mac",
    [
        None,
        42,
        "",
        "c6:d2:32:6f:8f",  # too short
        "c6:d2:32:6f:8f:44:00",  # too long
        "c6-d2-32-6f-8f-44",
        "c6:d2:32:6f:8f:44\n",  # would reach netlink with the newline
        " c6:d2:32:6f:8f:44",
        "g6:d2:32:6f:8f:44",
        "00:00:00:00:00:00",  # zero
        "01:00:5e:00:00:01",  # multicast bit set
        "ff:ff:ff:ff:ff:ff",  # broadcast (multicast bit)
    ],
)
def test_vxlan_with_bad_zero_or_multicast_vtep_mac_is_refused(mac: object) -> None:
    value = LeaseValue(public_ip=IPv4Address("192.168.64.3"), backend_type="vxlan",
                       backend_data={"VNI": 1, "VtepMAC": mac} if mac is not None else {"VNI": 1})
    assert validation_reason(SUBNET, value) == "bad_vtep_mac"


@pytest.mark.parametrize(
    "subnet", ["10.6.34.0/24", "10.5.34.0/25", "10.5.34.0/23", "192.168.0.0/24", "10.0.0.0/8"]
)
def test_subnet_outside_the_network_or_of_the_wrong_length_is_refused(subnet: str) -> None:
    assert validation_reason(IPv4Network(subnet), vxlan_value()) == "subnet_outside_network"


def test_parse_lease_key() -> None:
    layout = KeyLayout("/coreos.com/network")
    prefix = layout.subnets_prefix
    assert layout.parse_lease_key(prefix + "10.5.34.0-24").ipv4 == SUBNET
    assert layout.parse_lease_key(prefix + "10.5.34.0-24&fd00:5:34::-64").ipv4 == SUBNET
    for key in ("/other/subnets/10.5.34.0-24", prefix + "10.5.34.9-24", prefix + "junk"):
        with pytest.raises(ValueError):
            layout.parse_lease_key(key)


# --- property: nothing but InvalidLease escapes --------------------------------

_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=12,
)
_lease_like = st.fixed_dictionaries(
    {},
    optional={
        "PublicIP": st.one_of(st.ip_addresses(v=4).map(str), st.text(max_size=20), _json_values),
        "BackendType": st.sampled_from(["vxlan", "host-gw", "alloc", "udp"]) | _json_values,
        "BackendData": st.fixed_dictionaries(
            {}, optional={"VtepMAC": st.text(max_size=20) | _json_values, "VNI": _json_values}
        )
        | _json_values,
        "NodeID": _json_values,
        "PublicIPv6": st.one_of(st.ip_addresses(v=6).map(str), st.text(max_size=20),
                                _json_values),
        "BackendV6Data": st.fixed_dictionaries(
            {}, optional={"VtepMAC": st.text(max_size=20) | _json_values, "VNI": _json_values}
        )
        | _json_values,
    },
)
_raw_values = st.one_of(
    st.binary(max_size=200),
    _json_values.map(lambda v: json.dumps(v).encode()),
    _lease_like.map(lambda v: json.dumps(v).encode()),
)


@settings(max_examples=300, deadline=None)
@given(raw=_raw_values, subnet=st.sampled_from([SUBNET, IPv4Network("10.6.0.0/24")]),
       dual=st.booleans(),
       subnet6=st.sampled_from([None, SUBNET6, IPv6Network("fd00:6::/64")]))
def test_decode_and_validate_of_arbitrary_bytes_raise_only_invalid_lease(
    raw: bytes, subnet: IPv4Network, dual: bool, subnet6: IPv6Network | None
) -> None:
    try:
        value = decode_lease_value(raw)
        peer = validate_peer(subnet, value, network=DUAL if dual else NETWORK,
                             own_public_ip=OWN_IP, ipv6_subnet=subnet6)
    except InvalidLease as exc:
        assert exc.reason in REASONS  # every reason is a known metric label
        return
    assert peer.subnet == subnet
    assert peer.public_ip != OWN_IP
    if peer.ipv6_subnet is not None:  # only ever a checked IPv6 part
        assert dual and DUAL.check_ipv6_subnet(peer.ipv6_subnet) is None
        assert peer.public_ipv6 is not None and unusable_ip_reason(peer.public_ipv6) is None


# --- dual-stack ------------------------------------------------------------------

MAC6 = "c6:d2:32:6f:8f:66"
# flannel's LeaseAttrs (pkg/lease/lease.go) in its field order; a dual-stack vxlan host.
FLANNELD_DUAL = (b'{"PublicIP":"192.168.64.3","PublicIPv6":"fd00:250::3","BackendType":"vxlan",'
                 b'"BackendData":{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:44"},'
                 b'"BackendV6Data":{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:66"}}')


def test_a_dual_stack_value_is_flanneld_s_bytes_and_reads_back() -> None:
    value = decode_lease_value(FLANNELD_DUAL)
    assert value.public_ipv6 == IPv6Address("fd00:250::3")
    assert value.backend_v6_data == {"VNI": 1, "VtepMAC": MAC6}
    assert value.encode() == FLANNELD_DUAL  # byte for byte: names, order, compact JSON
    peer = validate_peer(SUBNET, value, network=DUAL, own_public_ip=OWN_IP, ipv6_subnet=SUBNET6)
    assert (peer.ipv6_subnet, peer.public_ipv6, peer.data6) == (
        SUBNET6, IPv6Address("fd00:250::3"), VxlanLeaseData(MAC6, 1))


_ipv6 = st.ip_addresses(v=6).filter(lambda ip: unusable_ip_reason(ip) is None)


@given(v4=st.ip_addresses(v=4), v6=_ipv6 | st.none(), mac=st.sampled_from([MAC, MAC6]),
       node=st.none() | st.text(min_size=1, max_size=20))
def test_values_round_trip_with_flannels_field_names(v4, v6, mac, node) -> None:  # type: ignore[no-untyped-def]
    value = LeaseValue(public_ip=v4, backend_type="vxlan", backend_data={"VNI": 1, "VtepMAC": MAC},
                       node_id=node, public_ipv6=v6,
                       backend_v6_data={"VNI": 1, "VtepMAC": mac} if v6 else {})
    doc = json.loads(value.encode())
    flannel = ["PublicIP", "PublicIPv6", "BackendType", "BackendData", "BackendV6Data"]
    assert [k for k in doc if k in flannel] == [k for k in flannel if k in doc]
    assert doc["PublicIPv6"] == (str(v6) if v6 else None)  # Go's *ip.IP6: null when absent
    assert decode_lease_value(value.encode()) == value


def test_an_ipv4_only_lease_is_an_ipv4_peer_in_a_dual_stack_network() -> None:
    peer = validate_peer(SUBNET, vxlan_value(), network=DUAL, own_public_ip=OWN_IP)
    assert peer.ipv6_subnet is None and peer.public_ipv6 is None and peer.data6 is None


def test_the_ipv6_part_is_ignored_without_ipv6_in_the_network() -> None:
    value = decode_lease_value(FLANNELD_DUAL)
    peer = validate_peer(SUBNET, value, network=NETWORK, own_public_ip=OWN_IP,
                         ipv6_subnet=SUBNET6)
    assert peer.ipv6_subnet is None and peer.data6 is None


@pytest.mark.parametrize(("raw", "subnet6", "reason"), [
    (FLANNELD_DUAL, IPv6Network("fd00:6::/64"), "subnet_outside_network"),
    (FLANNELD_DUAL, IPv6Network("fd00:5:0:22::/80"), "subnet_outside_network"),
    (FLANNELD_DUAL.replace(b'"fd00:250::3"', b"null"), SUBNET6, "bad_public_ip"),
    (FLANNELD_DUAL.replace(b'"fd00:250::3"', b'"fe80::3"'), SUBNET6, "bad_public_ip"),
    (FLANNELD_DUAL.replace(b'"fd00:250::3"', b'"::1"'), SUBNET6, "bad_public_ip"),
    (FLANNELD_DUAL.replace(b'"c6:d2:32:6f:8f:66"', b'"ff:ff:ff:ff:ff:ff"'), SUBNET6,
     "bad_vtep_mac"),
    (FLANNELD_DUAL.replace(b',"BackendV6Data":{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:66"}', b""),
     SUBNET6, "bad_vtep_mac"),
])
def test_a_bad_ipv6_part_makes_the_lease_invalid(raw: bytes, subnet6: IPv6Network,
                                                 reason: str) -> None:
    with pytest.raises(InvalidLease) as err:
        validate_peer(SUBNET, decode_lease_value(raw), network=DUAL, own_public_ip=OWN_IP,
                      ipv6_subnet=subnet6)
    assert err.value.reason == reason


@pytest.mark.parametrize("raw", [b'{"PublicIP":"1.2.3.4","PublicIPv6":"1.2.3.4"}',
                                 b'{"PublicIP":"1.2.3.4","PublicIPv6":7}',
                                 b'{"PublicIP":"1.2.3.4","BackendV6Data":[1]}'])
def test_malformed_ipv6_fields_are_refused(raw: bytes) -> None:
    assert reason_of(raw) in ("bad_public_ip", "bad_backend_data")
