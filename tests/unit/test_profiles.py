"""The backend profiles (leaseagent.core.profiles): what each says, and that the rest
of the package asks them instead of comparing a backend's name."""

from __future__ import annotations

import ast
import json
from dataclasses import fields, replace
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from leaseagent.core.network import parse_network_config
from leaseagent.core.plan import RECREATE, DeviceSpec, DeviceState, VxlanAttrs, compare_device
from leaseagent.core.profiles import BACKEND_TYPES, alloc, hostgw, vxlan, wireguard
from leaseagent.core.profiles.vxlan import DEVICE_FLAGS, VxlanOptions, device_flags, vxlan_options

PACKAGE = Path(__file__).resolve().parents[2] / "leaseagent"
# Where a backend's name may be written: the profiles, and the lab, which drives agents
# from outside and picks the backend of a lab by name.
NAMES_BELONG = (PACKAGE / "core" / "profiles", PACKAGE / "lab")


def test_the_registry_names_each_profile_by_its_own_name() -> None:
    assert {name: p.name for name, p in BACKEND_TYPES.items()} == {
        n: n for n in (vxlan.NAME, hostgw.NAME, wireguard.NAME, alloc.NAME)}


def _name_comparisons(tree: ast.AST, names: frozenset[str]) -> list[int]:
    """Lines comparing something with a backend's name (`==`, `!=`, `in (...)`), or using
    one as a dict literal's key."""
    def named(node: ast.AST | None) -> bool:
        if isinstance(node, ast.Constant):
            return node.value in names
        if isinstance(node, ast.Tuple | ast.List | ast.Set):
            return any(named(e) for e in node.elts)
        return False

    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare) and any(named(n) for n in (node.left, *node.comparators)):
            found.append(node.lineno)
        elif isinstance(node, ast.Dict) and any(named(k) for k in node.keys):
            found.append(node.lineno)
    return found


def test_no_module_outside_the_profiles_branches_on_a_backends_name() -> None:
    names = frozenset(BACKEND_TYPES)
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if any(path.is_relative_to(d) for d in NAMES_BELONG):
            continue
        found += [f"{path.relative_to(PACKAGE.parent)}:{line}"
                  for line in _name_comparisons(ast.parse(path.read_text()), names)]
    assert found == []


def test_the_name_check_sees_a_branch() -> None:
    tree = ast.parse('if network.backend_type == "alloc": pass\n'
                     'x = kind in ("vxlan", "tun")\n'
                     'y = {"host-gw": 1}\n'
                     'z = kind == "bridge"\n')
    assert _name_comparisons(tree, frozenset(BACKEND_TYPES)) == [1, 2, 3]


@pytest.mark.parametrize(("kind", "name", "owner"), [
    ("vxlan", "flannel.1", vxlan.NAME),
    ("vxlan", "flannel-v6.4096", vxlan.NAME),
    ("vxlan", "flaside.1", vxlan.NAME),
    ("vxlan", "flaside6.4096", vxlan.NAME),
    ("vxlan", "flannel.x", None),
    ("vxlan", "flaside.x", None),
    ("vxlan", "vxlan0", None),
    ("bridge", "flannel.1", None),
    ("wireguard", "flannel-wg", wireguard.NAME),
    ("tun", "flannel-wg-v6", wireguard.NAME),
    ("tun", "tun0", None),
    (None, "flannel-wg", None),
])
def test_cleanup_removes_a_link_exactly_when_a_profile_owns_it(kind: str | None, name: str,
                                                               owner: str | None) -> None:
    owners = [p.name for p in BACKEND_TYPES.values() if p.owns_link(kind, name)]
    assert owners == ([owner] if owner else [])


def test_only_alloc_has_no_data_path() -> None:
    assert [p.name for p in BACKEND_TYPES.values() if not p.data_path] == [alloc.NAME]


@pytest.mark.parametrize(("backend", "ipv6", "notes"), [
    ({"Type": "vxlan"}, False, {"flannel.1": "underlay MTU 1500 - 50"}),
    ({"Type": "vxlan", "VNI": 3, "MTU": 1400}, True,
     {"flannel.3": "Backend.MTU", "flannel-v6.3": "Backend.MTU"}),
    ({"Type": "wireguard"}, True,
     {"flannel-wg": "underlay MTU 1500 - 60", "flannel-wg-v6": "underlay MTU 1500 - 80"}),
    ({"Type": "wireguard", "MTU": 1400}, False, {"flannel-wg": "Backend.MTU 1400 - 60"}),
    ({"Type": "host-gw"}, True, {}),
    ({"Type": "alloc"}, False, {}),
])
def test_mtu_notes_say_where_each_device_mtu_comes_from(backend: dict[str, object], ipv6: bool,
                                                        notes: dict[str, str]) -> None:
    network = parse_network_config(json.dumps({"Network": "10.5.0.0/16", "Backend": backend}))
    assert network.profile.mtu_notes(network.options, 1500, ipv6) == notes


# ------------------------------------------------------------------ vxlan's device flags


def test_every_device_flag_is_an_option_set_by_its_key_and_applied_in_place() -> None:
    """A DeviceFlag is the whole of a new device option's wiring outside its parser line:
    an options field, a Backend key, a device made again in place."""
    profile = vxlan.PROFILE
    attributes = {f.name for f in fields(VxlanOptions)}
    by_attribute = {attr: key for key, attr in profile.option_keys.items()}
    for flag in DEVICE_FLAGS:
        assert flag.attribute in attributes
        assert by_attribute[flag.attribute] in profile.in_place
    assert len({f.shown for f in DEVICE_FLAGS}) == len(DEVICE_FLAGS)
    assert len({f.ifla for f in DEVICE_FLAGS}) == len(DEVICE_FLAGS)


@pytest.mark.parametrize("key", ["GBP", "Learning"])
def test_a_device_flag_goes_from_the_config_to_the_device_spec_and_its_comparison(key: str
                                                                                   ) -> None:
    wanted = device_flags(vxlan_options({key: True}))
    assert len(wanted) == 1
    [shown] = wanted
    local = IPv4Address("10.250.0.11")
    spec = DeviceSpec("flannel.1", "vxlan", 1450,
                      vxlan=VxlanAttrs(1, 8472, local, 2, flags=wanted))
    plain = DeviceState("flannel.1", 5, "vxlan", True, "02:00:00:00:00:01", 1450,
                        vxlan=VxlanAttrs(1, 8472, local, 2, flags=device_flags(vxlan_options({}))))
    [difference] = compare_device(spec, plain)
    assert (difference.what, difference.have, difference.want, difference.fix) == (
        shown, False, True, RECREATE)
    # And the other way round: a device with the flag on that the config has off.
    [difference] = compare_device(replace(spec, vxlan=plain.vxlan), replace(
        plain, vxlan=spec.vxlan))
    assert (difference.what, difference.have, difference.want) == (shown, True, False)
    assert device_flags(vxlan_options({})) == frozenset()
