"""Desired kernel objects from peers, and the diff against the kernel (pure)."""

from __future__ import annotations

from dataclasses import replace
from ipaddress import IPv4Address, IPv4Interface, IPv4Network, IPv6Address, IPv6Interface, IPv6Network

import pytest
from planning import plan_host_gw, plan_vxlan

from leaseagent.core.leases import Peer
from leaseagent.core.plan import (
    ADD_ADDRESS,
    REMOVE_ADDRESS,
    DeviceSpec,
    DeviceState,
    Fdb,
    Neighbour,
    Route,
    VxlanAttrs,
    compare_device,
    diff,
    flatten,
    peer_keys,
    serves,
)
from leaseagent.core.profiles.base import NoLeaseData
from leaseagent.core.profiles.vxlan import VxlanLeaseData, vxlan_options
from leaseagent.errors import NetworkConfigError

VX = 10  # vxlan device index
VX6 = 11  # the IPv6 vxlan device's index
UL = 2  # underlay index
OWN = IPv4Network("10.5.1.0/24")


def vx_peer(n: int, mac: str | None = None, ip: str | None = None) -> Peer:
    return Peer(
        subnet=IPv4Network(f"10.5.{n}.0/24"),
        public_ip=IPv4Address(ip or f"192.168.0.{n}"),
        backend_type="vxlan",
        data=VxlanLeaseData(mac or f"02:00:00:00:00:{n:02x}"),
    )


def gw_peer(n: int) -> Peer:
    return Peer(IPv4Network(f"10.5.{n}.0/24"), IPv4Address(f"192.168.0.{n}"), "host-gw",
                NoLeaseData())


def dual(peer: Peer, n: int) -> Peer:
    """`peer` with an IPv6 part: fd00:5:<n>::/64, PublicIPv6 fd00:250::<n>, and for
    vxlan its IPv6 device's VtepMAC."""
    data6 = VxlanLeaseData(f"02:00:00:00:06:{n:02x}") if peer.backend_type == "vxlan" \
        else NoLeaseData()
    return replace(peer, ipv6_subnet=IPv6Network(f"fd00:5:{n:x}::/64"),
                   public_ipv6=IPv6Address(f"fd00:250::{n:x}"), data6=data6)


def by_subnet(*peers: Peer) -> dict[IPv4Network, Peer]:
    return {p.subnet: p for p in peers}


def test_vxlan_peer_gets_neighbour_fdb_and_onlink_route() -> None:
    plan = plan_vxlan(OWN, by_subnet(vx_peer(2)), vxlan_index=VX, underlay_index=UL)
    assert plan[IPv4Network("10.5.2.0/24")] == {
        Neighbour(VX, IPv4Address("10.5.2.0"), "02:00:00:00:00:02"),
        Fdb(VX, "02:00:00:00:00:02", IPv4Address("192.168.0.2")),
        Route(IPv4Network("10.5.2.0/24"), IPv4Address("10.5.2.0"), VX, onlink=True),
    }


def test_own_subnet_and_foreign_backends_are_not_planned() -> None:
    peers = by_subnet(vx_peer(1), gw_peer(3), Peer(IPv4Network("10.5.4.0/24"),
                                                    IPv4Address("192.168.0.4"), "vxlan",
                                                    NoLeaseData()))
    plan = plan_vxlan(OWN, peers, vxlan_index=VX, underlay_index=UL)
    assert OWN not in plan
    assert flatten(plan) == frozenset()


def test_what_serves_a_peer_is_told_whichever_backend_made_it() -> None:
    peer, other = vx_peer(2), vx_peer(3)
    keys = peer_keys(peer)
    vxlan = plan_vxlan(OWN, by_subnet(peer, other), vxlan_index=VX, underlay_index=UL)
    host_gw = plan_host_gw(OWN, by_subnet(gw_peer(2), gw_peer(3)), underlay_index=UL)
    assert vxlan[peer.subnet] and all(serves(o, keys) for o in vxlan[peer.subnet])
    assert host_gw[peer.subnet] and all(serves(o, keys) for o in host_gw[peer.subnet])
    assert not any(serves(o, keys) for o in vxlan[other.subnet] | host_gw[other.subnet])


def test_direct_routing_uses_plain_route_only_for_directly_connected_peers() -> None:
    near, far = vx_peer(2), vx_peer(3, ip="172.16.0.3")
    lan = IPv4Network("192.168.0.0/24")
    plan = plan_vxlan(
        OWN, by_subnet(near, far), vxlan_index=VX, underlay_index=UL,
        direct_routing=True, is_direct=lambda ip: ip in lan,
    )
    assert plan[near.subnet] == {Route(near.subnet, near.public_ip, UL)}
    assert len(plan[far.subnet]) == 3


def test_direct_routing_off_ignores_the_predicate() -> None:
    plan = plan_vxlan(OWN, by_subnet(vx_peer(2)), vxlan_index=VX, underlay_index=UL,
                      is_direct=lambda ip: True)
    assert len(plan[IPv4Network("10.5.2.0/24")]) == 3


def test_host_gw_plans_one_route_per_host_gw_peer() -> None:
    plan = plan_host_gw(OWN, by_subnet(gw_peer(2), vx_peer(3), gw_peer(1)), underlay_index=UL)
    assert flatten(plan) == {
        Route(IPv4Network("10.5.2.0/24"), IPv4Address("192.168.0.2"), UL)
    }


def test_diff_adds_missing_and_removes_stale_in_dependency_order() -> None:
    desired = flatten(plan_vxlan(OWN, by_subnet(vx_peer(2)), vxlan_index=VX, underlay_index=UL))
    stale = flatten(plan_vxlan(OWN, by_subnet(vx_peer(9)), vxlan_index=VX, underlay_index=UL))
    to_add, to_remove = diff(desired, stale)
    assert [o.kind for o in to_add] == ["neighbour", "fdb", "route"]
    assert [o.kind for o in to_remove] == ["route", "neighbour", "fdb"]
    assert set(to_add) == desired and set(to_remove) == stale


def test_diff_of_equal_sets_is_empty() -> None:
    desired = flatten(plan_vxlan(OWN, by_subnet(vx_peer(2), vx_peer(3)),
                                 vxlan_index=VX, underlay_index=UL))
    assert diff(desired, set(desired)) == ((), ())


def test_route_with_same_dst_but_other_gateway_is_a_replace() -> None:
    dst = IPv4Network("10.5.2.0/24")
    want = Route(dst, IPv4Address("10.5.2.0"), VX, onlink=True)
    have = Route(dst, IPv4Address("192.168.0.2"), UL)
    assert diff({want}, {have}) == ((want,), ())


def test_route_with_other_metric_is_removed() -> None:
    dst = IPv4Network("10.5.2.0/24")
    want = Route(dst, IPv4Address("10.5.2.0"), VX, onlink=True)
    extra = Route(dst, IPv4Address("10.5.2.0"), VX, onlink=True, metric=5)
    assert diff({want}, {want, extra}) == ((), (extra,))


def test_neighbour_with_new_mac_is_a_replace() -> None:
    want = Neighbour(VX, IPv4Address("10.5.2.0"), "02:00:00:00:00:aa")
    have = Neighbour(VX, IPv4Address("10.5.2.0"), "02:00:00:00:00:bb")
    assert diff({want}, {have}) == ((want,), ())


def test_fdb_with_new_remote_is_replaced_in_place() -> None:
    """A unicast MAC has one remote in the kernel: the new one replaces the old, which
    must not be removed after (that would take the MAC's only entry)."""
    want = Fdb(VX, "02:00:00:00:00:aa", IPv4Address("192.168.0.7"))
    have = Fdb(VX, "02:00:00:00:00:aa", IPv4Address("192.168.0.2"))
    assert diff({want}, {have}) == ((want,), ())


def test_peer_change_of_mac_and_ip_replaces_neighbour_and_swaps_fdb() -> None:
    old = flatten(plan_vxlan(OWN, by_subnet(vx_peer(2)), vxlan_index=VX, underlay_index=UL))
    moved = vx_peer(2, mac="02:00:00:00:00:ff", ip="192.168.0.99")
    new = flatten(plan_vxlan(OWN, by_subnet(moved), vxlan_index=VX, underlay_index=UL))
    to_add, to_remove = diff(new, old)
    assert {o.kind for o in to_add} == {"neighbour", "fdb"}
    assert [o.kind for o in to_remove] == ["fdb"]


def test_vxlan_options_defaults_and_mtu() -> None:
    opts = vxlan_options({"Type": "vxlan"})
    assert (opts.vni, opts.port, opts.direct_routing, opts.device_name) == (
        1, 8472, False, "flannel.1")
    assert opts.mtu_for(1500) == 1450
    custom = vxlan_options({"VNI": 42, "Port": 4789, "MTU": 1400, "DirectRouting": True})
    # flannel's MTU is the path's: the device gets 50 less, whatever the underlay's.
    assert (custom.device_name, custom.port, custom.mtu_for(9000), custom.direct_routing) == (
        "flannel.42", 4789, 1350, True)


@pytest.mark.parametrize("backend", [
    {"VNI": "1"}, {"VNI": 1 << 24}, {"Port": -1}, {"DirectRouting": "yes"}, {"MTU": 20},
])
def test_vxlan_options_refuse_bad_values_naming_the_field(backend: dict[str, object]) -> None:
    with pytest.raises(NetworkConfigError, match=f"Backend.{next(iter(backend))}"):
        vxlan_options(backend)


# ------------------------------------------------------------------ dual-stack


def test_dual_stack_vxlan_peer_gets_both_families_on_their_devices() -> None:
    peer = dual(vx_peer(2), 2)
    plan = plan_vxlan(OWN, by_subnet(peer), vxlan_index=VX, underlay_index=UL, vxlan6_index=VX6)
    base6 = IPv6Address("fd00:5:2::")
    assert plan[peer.subnet] == {
        Neighbour(VX, IPv4Address("10.5.2.0"), "02:00:00:00:00:02"),
        Fdb(VX, "02:00:00:00:00:02", IPv4Address("192.168.0.2")),
        Route(IPv4Network("10.5.2.0/24"), IPv4Address("10.5.2.0"), VX, onlink=True),
        Neighbour(VX6, base6, "02:00:00:00:06:02"),
        Fdb(VX6, "02:00:00:00:06:02", IPv6Address("fd00:250::2")),
        Route(IPv6Network("fd00:5:2::/64"), base6, VX6, onlink=True),
    }
    to_add, _ = diff(plan[peer.subnet], ())
    assert [o.kind for o in to_add] == ["neighbour"] * 2 + ["fdb"] * 2 + ["route"] * 2


def test_ipv6_objects_need_both_an_ipv6_device_and_a_dual_stack_peer() -> None:
    without_device = plan_vxlan(OWN, by_subnet(dual(vx_peer(2), 2)), vxlan_index=VX,
                                underlay_index=UL)
    ipv4_only_peer = plan_vxlan(OWN, by_subnet(vx_peer(3)), vxlan_index=VX, underlay_index=UL,
                                vxlan6_index=VX6)
    for plan in (without_device, ipv4_only_peer):
        [objects] = plan.values()
        assert len(objects) == 3 and all(o.dst.version == 4 for o in objects)


def test_ipv6_direct_routing_goes_by_the_peers_public_ipv6() -> None:
    near = dual(vx_peer(2), 2)
    lan6 = IPv6Network("fd00:250::/64")
    plan = plan_vxlan(OWN, by_subnet(near), vxlan_index=VX, underlay_index=UL, vxlan6_index=VX6,
                      direct_routing=True, is_direct=lambda ip: ip in lan6)
    v6 = {o for o in plan[near.subnet] if o.dst.version == 6}
    assert v6 == {Route(IPv6Network("fd00:5:2::/64"), IPv6Address("fd00:250::2"), UL)}
    assert len(plan[near.subnet] - v6) == 3  # its PublicIP is not on the LAN: encapsulated


def test_host_gw_dual_stack_routes_via_the_public_addresses() -> None:
    peer = dual(gw_peer(2), 2)
    assert flatten(plan_host_gw(OWN, by_subnet(peer), underlay_index=UL, ipv6=True)) == {
        Route(IPv4Network("10.5.2.0/24"), IPv4Address("192.168.0.2"), UL),
        Route(IPv6Network("fd00:5:2::/64"), IPv6Address("fd00:250::2"), UL),
    }
    assert len(flatten(plan_host_gw(OWN, by_subnet(peer), underlay_index=UL))) == 1


def test_vxlan_mtu_over_ipv6_is_70_less_and_backend_mtu_is_the_path_of_both() -> None:
    opts = vxlan_options({"Type": "vxlan"})
    assert (opts.mtu_for(1500), opts.mtu_for(1500, ipv6=True), opts.device_name6) == (
        1450, 1430, "flannel-v6.1")
    fixed = vxlan_options({"MTU": 1400})
    assert (fixed.mtu_for(9000), fixed.mtu_for(9000, ipv6=True)) == (1350, 1330)


def test_a_device_address_is_judged_against_its_own_family_only() -> None:
    """The IPv6 device keeps an IPv4 address someone gave it, and the IPv4 device an
    IPv6 one (flannel's Ensure*AddressOnLink each look at one family)."""
    want = IPv6Interface("fd00:5:1::/128")
    attrs = VxlanAttrs(1, 8472, IPv6Address("fd00:250::1"), 2)
    spec = DeviceSpec("flannel-v6.1", "vxlan", 1430, attrs, address=want)
    other = IPv6Interface("fd00:5:9::/128")
    state = DeviceState("flannel-v6.1", 11, "vxlan", True, None, 1430,
                        (IPv4Interface("10.1.1.1/32"), other), attrs)
    assert [(d.fix, d.have, d.want) for d in compare_device(spec, state)] == [
        (ADD_ADDRESS, None, want), (REMOVE_ADDRESS, other, None)]


def test_kernel_objects_hold_what_they_were_given_and_stay_frozen() -> None:
    """Each object's `__init__` sets its fields through its slots' own setters (core.plan
    `_setters`): the fields are what was given (an IPv6 route's metric as the kernel keeps
    it), the identity and hash follow them, and nothing can be set afterwards."""
    from dataclasses import FrozenInstanceError

    net, gw = IPv6Network("fd00:5:0:2::/64"), IPv6Address("fd00:5:0:2::")
    route = Route(net, gw, 7, onlink=True)
    assert (route.dst, route.gateway, route.ifindex, route.onlink, route.metric,
            route.scope) == (net, gw, 7, True, 1024, 0)
    neighbour = Neighbour(7, IPv4Address("10.5.2.0"), "02:00:00:00:00:02")
    fdb = Fdb(7, "02:00:00:00:00:02", IPv4Address("10.99.0.2"))
    assert (neighbour.ifindex, neighbour.dst, neighbour.lladdr) == (
        7, IPv4Address("10.5.2.0"), "02:00:00:00:00:02")
    assert (fdb.ifindex, fdb.lladdr, fdb.dst) == (7, "02:00:00:00:00:02",
                                                  IPv4Address("10.99.0.2"))
    for obj in (route, neighbour, fdb):
        assert hash(obj) == hash(obj._ident)
        with pytest.raises(FrozenInstanceError):
            obj.ifindex = 8  # type: ignore[misc]
    assert route == Route(net, gw, 7, onlink=True, metric=1024)
