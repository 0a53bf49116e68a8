"""The network config read as flanneld reads it: Go's encoding/json into flannel's structs.

Each case names what flanneld does with the same bytes (pkg/subnet/config.go,
pkg/backend/vxlan/vxlan.go and device.go, pkg/backend/wireguard/wireguard.go,
pkg/ip's decoders) and checks that leaseagent reads it the same, or refuses it
in one line where flanneld would stop (or, marked, where flanneld's reading is a
bug: docs/flannel.md).
"""

from __future__ import annotations

import json
from ipaddress import IPv4Address, IPv4Network, IPv6Address
from typing import Any

import pytest

from leaseagent.core import gojson
from leaseagent.core.configchange import FIELDS
from leaseagent.core.network import CONFIG_FIELDS, NetworkConfig, parse_network_config
from leaseagent.core.profiles import BACKEND_TYPES
from leaseagent.core.profiles.vxlan import VxlanOptions
from leaseagent.core.profiles.wireguard import WireguardOptions
from leaseagent.errors import NetworkConfigError

BASE = {"Network": "10.5.0.0/16"}


def read(doc: dict[str, Any] | str) -> NetworkConfig:
    return parse_network_config(doc if isinstance(doc, str) else json.dumps(doc))


def refused(doc: dict[str, Any] | str) -> str:
    with pytest.raises(NetworkConfigError) as err:
        read(doc)
    text = str(err.value)
    assert "\n" not in text
    return text


# ------------------------------------------------------------------ Go's key matching


@pytest.mark.parametrize("key", ["SubnetLen", "subnetlen", "SUBNETLEN", "subnetLen"])
def test_a_key_names_its_field_ignoring_case(key: str) -> None:
    assert read({**BASE, key: 20}).subnet_len == 20


def test_go_folds_the_kelvin_sign_and_long_s_like_k_and_s() -> None:
    # Go's field matching folds per rune: U+212A KELVIN SIGN is "K", U+017F LONG S is "s".
    assert read('{"Network": "10.5.0.0/16", "\u017fubnetLen": 20}').subnet_len == 20
    net = read('{"Network": "10.5.0.0/16", "Backend": {"Type": "wireguard", '
               '"Persistent\u212aeepaliveInterval": 25}}')
    assert isinstance(net.options, WireguardOptions) and net.options.keepalive == 25


def test_the_last_of_two_spellings_of_a_key_wins() -> None:
    raw = '{"Network": "10.5.0.0/16", "SubnetLen": 20, "subnetlen": 22}'
    assert read(raw).subnet_len == 22
    raw = '{"Network": "10.5.0.0/16", "Backend": {"Type": "vxlan", "vni": 7, "VNI": 3}}'
    options = read(raw).options
    assert isinstance(options, VxlanOptions) and options.vni == 3


def test_keys_flannel_does_not_have_are_ignored_as_go_ignores_them() -> None:
    assert read({**BASE, "Flavour": "x", "BackendType": "host-gw"}).backend_type == "vxlan"


def test_backend_keys_and_type_value_ignore_case() -> None:
    net = read({**BASE, "backend": {"type": "VxLaN", "vni": 4, "directrouting": True,
                                    "mtu": 1400}})
    assert isinstance(net.options, VxlanOptions)
    assert (net.backend_type, net.options.vni, net.options.direct_routing,
            net.options.mtu) == ("vxlan", 4, True, 1400)


def test_every_top_level_field_is_one_flannel_has_and_configchange_classifies() -> None:
    assert {f.name for f in FIELDS} - {"Backend.Type"} == set(CONFIG_FIELDS) - {"Backend"}


# ------------------------------------------------------------------ null, zero, ""


@pytest.mark.parametrize("field", ["EnableIPv6", "EnableNFTables", "SubnetLen"])
def test_null_leaves_a_plain_field_at_its_default(field: str) -> None:
    assert read({**BASE, field: None}) == read(BASE)


def test_null_enable_ipv4_stays_true() -> None:
    assert read({**BASE, "EnableIPv4": None}).network == IPv4Network("10.5.0.0/16")


@pytest.mark.parametrize("field", ["Network", "SubnetMin", "SubnetMax"])
def test_null_is_refused_for_flannels_own_ipv4_decoders(field: str) -> None:
    # ip.IP4Net and ip.IP4 are handed "null" and fail to parse it.
    assert refused({**BASE, field: None}).startswith(f"{field}=null")


@pytest.mark.parametrize("field", ["SubnetMin", "SubnetMax"])
def test_empty_string_address_is_refused(field: str) -> None:
    # net.ParseIP("") is nil: "invalid IP address format".
    assert refused({**BASE, field: ""}).startswith(f'{field}="": is not an IPv4 address')


@pytest.mark.parametrize("field", ["SubnetMin", "SubnetMax"])
def test_the_zero_address_means_the_default(field: str) -> None:
    assert read({**BASE, field: "0.0.0.0"}) == read(BASE)


def test_ipv6_bounds_null_or_zero_mean_the_default_and_empty_is_refused() -> None:
    dual = {**BASE, "EnableIPv6": True, "IPv6Network": "fd00:5::/48"}
    assert read({**dual, "IPv6SubnetMin": None, "IPv6SubnetMax": "::"}) == read(dual)
    assert refused({**dual, "IPv6SubnetMin": ""}).startswith('IPv6SubnetMin=""')


def test_an_ipv4_mapped_address_is_an_ipv4_address_as_go_parses_it() -> None:
    assert read({**BASE, "SubnetMin": "::ffff:10.5.9.0"}).subnet_min == IPv4Address("10.5.9.0")


# ------------------------------------------------------------------ types


@pytest.mark.parametrize(("doc", "start"), [
    ({**BASE, "SubnetLen": "24"}, 'SubnetLen="24": must be a whole JSON number'),
    ({**BASE, "SubnetLen": 24.0}, "SubnetLen=24.0: must be a whole JSON number"),
    ({**BASE, "EnableIPv6": "true"}, 'EnableIPv6="true": must be true or false'),
    ({**BASE, "EnableNFTables": 1}, "EnableNFTables=1: must be true or false"),
    ({**BASE, "Network": 10}, "Network=10: must be a string"),
    ({**BASE, "Backend": {"Type": "vxlan", "VNI": "1"}}, 'Backend.VNI="1": must be a whole'),
    ({**BASE, "Backend": {"Type": "vxlan", "Port": 8472.0}}, "Backend.Port=8472.0"),
    ({**BASE, "Backend": {"Type": "vxlan", "MTU": "1400"}}, 'Backend.MTU="1400"'),
    ({**BASE, "Backend": {"Type": "vxlan", "GBP": "true"}}, 'Backend.GBP="true"'),
    ({**BASE, "Backend": {"Type": "vxlan", "Learning": 1}}, "Backend.Learning=1"),
    ({**BASE, "Backend": {"Type": "vxlan", "DirectRouting": "false"}}, "Backend.DirectRouting"),
    ({**BASE, "Backend": {"Type": "wireguard", "ListenPort": "51820"}}, "Backend.ListenPort="),
    ({**BASE, "Backend": {"Type": "wireguard", "PSK": 1}}, "Backend.PSK=1: must be a string"),
    ({**BASE, "Backend": {"Type": "wireguard", "Mode": 1}}, "Backend.Mode=1: must be a string"),
    ({**BASE, "Backend": {"Type": 1}}, "Backend.Type=1"),
    ({**BASE, "Backend": "vxlan"}, 'Backend="vxlan": must be a JSON object'),
])
def test_a_value_of_the_wrong_json_type_is_refused_as_go_refuses_it(doc: dict[str, Any],
                                                                    start: str) -> None:
    assert refused(doc).startswith(start)


# ------------------------------------------------------------------ vxlan's meaning


def flannel_mtu(doc: dict[str, Any], underlay: int) -> int:
    net = read(doc)
    rule = BACKEND_TYPES[net.backend_type].mtu
    assert rule is not None
    return rule(net.options, underlay, net.ipv6 is not None)


@pytest.mark.parametrize(("mtu", "underlay", "device"), [
    (None, 1500, 1450), (None, 9000, 8950), (1500, 9000, 1450), (1400, 1500, 1350),
])
def test_vxlan_mtu_is_the_path_mtu_and_the_device_gets_50_less(
        mtu: int | None, underlay: int, device: int) -> None:
    """flannel: cfg.MTU defaults to the underlay's; the device and FLANNEL_MTU are
    cfg.MTU - 50 (device.go `MTU: devAttrs.MTU - 50`, vxlan_network.go MTU())."""
    backend: dict[str, Any] = {"Type": "vxlan"} if mtu is None else {"Type": "vxlan", "MTU": mtu}
    doc = {**BASE, "Backend": backend}
    options = read(doc).options
    assert isinstance(options, VxlanOptions)
    assert options.mtu_for(underlay) == device
    assert flannel_mtu(doc, underlay) == device


@pytest.mark.parametrize("mtu", [0, 100, 117])
def test_a_vxlan_mtu_leaving_the_device_below_68_is_refused(mtu: int) -> None:
    # flanneld: MTU 0 gives FLANNEL_MTU=-50 and a device the kernel sizes; refused here.
    assert refused({**BASE, "Backend": {"Type": "vxlan", "MTU": mtu}}).startswith(
        f"Backend.MTU={mtu}: must be at least 118")


def test_vxlan_vni_0_is_vni_0_and_null_is_the_default() -> None:
    zero = read({**BASE, "Backend": {"Type": "vxlan", "VNI": 0}}).options
    null = read({**BASE, "Backend": {"Type": "vxlan", "VNI": None}}).options
    assert isinstance(zero, VxlanOptions) and isinstance(null, VxlanOptions)
    assert (zero.vni, zero.device_name) == (0, "flannel.0")
    assert (null.vni, null.device_name) == (1, "flannel.1")


def test_vxlan_port_0_is_the_kernels_default_8472() -> None:
    options = read({**BASE, "Backend": {"Type": "vxlan", "Port": 0}}).options
    assert isinstance(options, VxlanOptions) and options.port == 8472


def test_vxlan_gbp_and_learning_are_read() -> None:
    options = read({**BASE, "Backend": {"Type": "vxlan", "gbp": True, "Learning": True}}).options
    assert isinstance(options, VxlanOptions) and (options.gbp, options.learning) == (True, True)


def test_wireguard_nulls_are_the_defaults() -> None:
    net = read({**BASE, "Backend": {"Type": "wireguard", "PSK": None, "Mode": None,
                                    "ListenPort": None, "MTU": None}})
    assert net.options == WireguardOptions()


def test_ipv6_network_without_enable_ipv6_is_decoded_and_checked_but_unused() -> None:
    assert read({**BASE, "IPv6Network": "fd00:5::/48"}).ipv6 is None
    assert refused({**BASE, "IPv6Network": "nope"}).startswith('IPv6Network="nope"')
    dual = read({**BASE, "EnableIPv6": True, "IPv6Network": "fd00:5::/48"})
    assert dual.ipv6 is not None and dual.ipv6.subnet_min == IPv6Address("fd00:5:0:1::")


# ------------------------------------------------------------------ the decoder itself


def test_struct_fields_keeps_the_last_and_drops_the_rest() -> None:
    obj = gojson.loads('{"a": 1, "B": 2, "A": 3, "c": null}')
    assert gojson.struct_fields(obj, ["A", "b", "C"]) == {"b": 2, "A": 3, "C": None}


def test_a_network_with_host_bits_is_refused() -> None:
    # flanneld masks them off (net.ParseCIDR); a typo there is refused here instead.
    assert refused({"Network": "10.5.3.7/16"}).startswith('Network="10.5.3.7/16": is not')
