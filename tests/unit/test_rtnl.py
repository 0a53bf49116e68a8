"""The raw rtnetlink codec, both families, without a kernel (no root).

Two kinds of check: what we encode decodes back to the same object, and
messages built here byte by byte from the kernel's structs (nlmsghdr,
rtmsg, ndmsg, rtattr; include/uapi/linux/rtnetlink.h, neighbour.h) are
what we send and are read as the kernel means them.
"""

from __future__ import annotations

import socket
import struct
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

import pytest

from leaseagent.core.plan import IPV6_DEFAULT_METRIC, MAIN_TABLE, Fdb, KernelObject, Neighbour, Route
from leaseagent.dataplane import rtnl
from leaseagent.dataplane.netlink import event_from_message

PROTO = 76
MAC = "02:00:00:00:00:02"
MAC_BYTES = bytes([2, 0, 0, 0, 0, 2])
V6_NET = IPv6Network("fd00:5:2::/64")
V6_BASE = IPv6Address("fd00:5:2::")
V6_PUBLIC = IPv6Address("fd00:250::2")


def attr(kind: int, payload: bytes) -> bytes:
    """struct rtattr { unsigned short rta_len; unsigned short rta_type; } + payload,
    padded to 4 bytes (RTA_ALIGN)."""
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + b"\0" * (-length % 4)


def rtmsg(family: int, dst_len: int, table: int, protocol: int, scope: int, rtype: int,
          flags: int) -> bytes:
    """struct rtmsg: family, dst_len, src_len, tos, table, protocol, scope, type (u8 each),
    flags (u32)."""
    return bytes([family, dst_len, 0, 0, table, protocol, scope, rtype]) + struct.pack("=I", flags)


def ndmsg(family: int, ifindex: int, state: int, flags: int) -> bytes:
    """struct ndmsg: family (u8), pad (u8, u16), ifindex (s32), state (u16), flags (u8),
    type (u8)."""
    return bytes([family, 0, 0, 0]) + struct.pack("=iH", ifindex, state) + bytes([flags, 0])


def decode(obj_kind: type[KernelObject], body: bytes) -> KernelObject | None:
    """What our decoder reads from `body` as the object type the data plane models."""
    if obj_kind is Route:
        route, _, _ = rtnl.decode_route(body, 0, len(body))
        return route
    n = rtnl.decode_neighbour(body, 0, len(body))
    assert n.dst is not None
    if obj_kind is Fdb:
        return Fdb(n.ifindex, n.lladdr, n.dst)
    return Neighbour(n.ifindex, n.dst, n.lladdr)


OBJECTS: list[KernelObject] = [
    Route(IPv4Network("10.5.2.0/24"), IPv4Address("10.5.2.0"), 7, onlink=True),
    Route(IPv4Network("10.5.3.0/24"), IPv4Address("10.99.0.3"), 2, metric=5),
    Route(V6_NET, V6_BASE, 8, onlink=True),
    Route(IPv6Network("fd00:5:3::/64"), IPv6Address("fd00:250::3"), 2),
    Route(IPv6Network("fd00:5:4::/64"), None, 2, metric=300),
    Neighbour(7, IPv4Address("10.5.2.0"), MAC),
    Neighbour(8, V6_BASE, MAC),
    Fdb(7, MAC, IPv4Address("10.99.0.2")),
    Fdb(8, MAC, V6_PUBLIC),
]


@pytest.mark.parametrize("obj", OBJECTS, ids=repr)
def test_what_we_encode_decodes_to_the_same_object(obj: KernelObject) -> None:
    kind, flags, body = rtnl.encode_object(obj, remove=False, protocol=PROTO)
    assert kind == (rtnl.RTM_NEWROUTE if isinstance(obj, Route) else rtnl.RTM_NEWNEIGH)
    assert flags & rtnl.NLM_F_CREATE
    assert decode(type(obj), body) == obj


@pytest.mark.parametrize("obj", OBJECTS, ids=repr)
def test_removal_names_the_object_in_its_family(obj: KernelObject) -> None:
    kind, flags, body = rtnl.encode_object(obj, remove=True, protocol=PROTO)
    assert flags == 0
    if isinstance(obj, Route):
        assert kind == rtnl.RTM_DELROUTE
        assert body[0] == (socket.AF_INET6 if obj.dst.version == 6 else socket.AF_INET)
        assert body[6] == rtnl.RT_SCOPE_NOWHERE
    else:
        assert kind == rtnl.RTM_DELNEIGH
        family = rtnl.AF_BRIDGE if isinstance(obj, Fdb) else rtnl.family_of(obj.dst)
        assert body[0] == family
        assert rtnl.decode_neighbour(body, 0, len(body)).dst == obj.dst


@pytest.mark.parametrize("remove", [False, True])
@pytest.mark.parametrize("obj", [*OBJECTS, Route(IPv4Network("10.5.9.0/24"), None, 2),
                                 Route(IPv4Network("10.5.8.0/24"), IPv4Address("10.99.0.8"), 0)],
                         ids=repr)
def test_the_ipv4_fast_path_packs_the_same_bytes_as_the_general_encoding(
        obj: KernelObject, remove: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    shaped = obj._ident[1] == 4 and not (isinstance(obj, Route) and (
        obj.gateway is None or obj.metric or not obj.ifindex))
    assert (rtnl._encode_ipv4(obj._ident, remove, PROTO) is not None) == shaped
    fast = rtnl.encode_object(obj, remove=remove, protocol=PROTO)
    monkeypatch.setattr(rtnl, "_encode_ipv4", lambda *_: None)
    assert fast == rtnl.encode_object(obj, remove=remove, protocol=PROTO)


def test_an_ipv6_route_is_the_kernels_struct_byte_for_byte() -> None:
    """`ip -6 route replace fd00:5:2::/64 via fd00:5:2:: dev <8> onlink proto 76`."""
    route = Route(V6_NET, V6_BASE, 8, onlink=True)
    by_hand = (
        rtmsg(socket.AF_INET6, 64, MAIN_TABLE, PROTO, rtnl.RT_SCOPE_UNIVERSE, rtnl.RTN_UNICAST,
              rtnl.RTNH_F_ONLINK)
        + attr(rtnl.RTA_DST, V6_BASE.packed)
        + attr(rtnl.RTA_GATEWAY, V6_BASE.packed)
        + attr(rtnl.RTA_OIF, struct.pack("=I", 8))
        + attr(rtnl.RTA_PRIORITY, struct.pack("=I", 1024))
    )
    assert len(by_hand) == 12 + 20 + 20 + 8 + 8
    assert rtnl.encode_object(route, remove=False, protocol=PROTO) == (
        rtnl.RTM_NEWROUTE, rtnl.NLM_F_REPLACE | rtnl.NLM_F_CREATE, by_hand)


def test_an_ipv6_route_as_a_dump_brings_it_is_read_as_planned() -> None:
    """A dump adds attributes we never send (RTA_TABLE, RTA_PREF, RTA_CACHEINFO) and
    a metric of 1024 for a route added without one; the nlmsghdr comes first."""
    body = (
        rtmsg(socket.AF_INET6, 64, MAIN_TABLE, PROTO, rtnl.RT_SCOPE_UNIVERSE, rtnl.RTN_UNICAST,
              rtnl.RTNH_F_ONLINK)
        + attr(rtnl.RTA_TABLE, struct.pack("=I", MAIN_TABLE))
        + attr(rtnl.RTA_DST, V6_BASE.packed)
        + attr(rtnl.RTA_PRIORITY, struct.pack("=I", IPV6_DEFAULT_METRIC))
        + attr(20, b"\0")  # RTA_PREF, one byte: padded
        + attr(rtnl.RTA_GATEWAY, V6_BASE.packed)
        + attr(rtnl.RTA_OIF, struct.pack("=I", 8))
        + attr(12, b"\0" * 32)  # RTA_CACHEINFO
    )
    datagram = struct.pack("=IHHII", 16 + len(body), rtnl.RTM_NEWROUTE, rtnl.NLM_F_MULTI, 9,
                           0) + body
    [(kind, _flags, seq, _pid, start, end)] = list(rtnl.messages(datagram))
    assert (kind, seq) == (rtnl.RTM_NEWROUTE, 9)
    route, protocol, table = rtnl.decode_route(datagram, start, end)
    assert (protocol, table) == (PROTO, MAIN_TABLE)
    # Planned without a metric: the kernel's 1024 is what Route means.
    assert route == Route(V6_NET, V6_BASE, 8, onlink=True)


def test_an_ipv6_neighbour_is_the_kernels_struct_byte_for_byte() -> None:
    """`ip -6 neigh replace fd00:5:2:: lladdr 02:00:00:00:00:02 dev <8> nud permanent`."""
    by_hand = (
        ndmsg(socket.AF_INET6, 8, rtnl.NUD_PERMANENT, 0)
        + attr(rtnl.NDA_DST, V6_BASE.packed)
        + attr(rtnl.NDA_LLADDR, MAC_BYTES)
    )
    assert len(by_hand) == 12 + 20 + 12  # a 6-byte lladdr is padded to 8
    neighbour = Neighbour(8, V6_BASE, MAC)
    assert rtnl.encode_object(neighbour, remove=False, protocol=PROTO) == (
        rtnl.RTM_NEWNEIGH, rtnl.NLM_F_REPLACE | rtnl.NLM_F_CREATE, by_hand)
    raw = rtnl.decode_neighbour(by_hand, 0, len(by_hand))
    assert (raw.family, raw.ifindex, raw.state, raw.dst, raw.lladdr) == (
        socket.AF_INET6, 8, rtnl.NUD_PERMANENT, V6_BASE, MAC)
    assert rtnl.neighbour_ifindex(by_hand) == 8


def test_an_fdb_entry_to_an_ipv6_remote_is_the_kernels_struct_byte_for_byte() -> None:
    """`bridge fdb replace 02:00:00:00:00:02 dev <8> dst fd00:250::2 self permanent`."""
    by_hand = (
        ndmsg(rtnl.AF_BRIDGE, 8, rtnl.NUD_PERMANENT | rtnl.NUD_NOARP, rtnl.NTF_SELF)
        + attr(rtnl.NDA_LLADDR, MAC_BYTES)
        + attr(rtnl.NDA_DST, V6_PUBLIC.packed)
    )
    assert rtnl.encode_object(Fdb(8, MAC, V6_PUBLIC), remove=False, protocol=PROTO) == (
        rtnl.RTM_NEWNEIGH, rtnl.NLM_F_CREATE | rtnl.NLM_F_REPLACE, by_hand)
    assert decode(Fdb, by_hand) == Fdb(8, MAC, V6_PUBLIC)


def test_routes_of_other_families_and_types_are_not_read() -> None:
    for family, rtype in ((128, rtnl.RTN_UNICAST), (socket.AF_INET6, 2)):  # ipmr; RTN_LOCAL
        body = rtmsg(family, 128, MAIN_TABLE, PROTO, 0, rtype, 0) + attr(rtnl.RTA_DST,
                                                                          V6_BASE.packed)
        assert rtnl.decode_route(body, 0, len(body))[0] is None


def test_ipv4_and_ipv6_objects_of_one_integer_never_collide() -> None:
    """10.0.0.1 and ::a00:1 are one integer; the family keeps them apart."""
    v4, v6 = IPv4Address("10.0.0.1"), IPv6Address("::a00:1")
    assert Neighbour(7, v4, MAC) != Neighbour(7, v6, MAC)
    assert Fdb(7, MAC, v4) != Fdb(7, MAC, v6)
    assert Route(IPv4Network("0.0.0.0/0"), v4, 7, metric=1024) != Route(
        IPv6Network("::/0"), v6, 7)
    assert len({Neighbour(7, v4, MAC), Neighbour(7, v6, MAC)}) == 2


def test_an_ipv6_route_without_a_metric_is_the_kernels_1024() -> None:
    assert Route(V6_NET, V6_BASE, 8).metric == IPV6_DEFAULT_METRIC
    assert Route(V6_NET, V6_BASE, 8) == Route(V6_NET, V6_BASE, 8, metric=1024)
    assert Route(IPv4Network("10.5.2.0/24"), None, 8).metric == 0


def test_events_of_ipv6_routes_and_neighbours_carry_the_object() -> None:
    route = Route(V6_NET, V6_BASE, 8, onlink=True)
    _, _, body = rtnl.encode_object(route, remove=False, protocol=PROTO)
    event = event_from_message(rtnl.RTM_DELROUTE, 0, body)
    assert (event.kind, event.deleted, event.protocol, event.table, event.obj) == (
        "route", True, PROTO, MAIN_TABLE, route)
    neighbour = Neighbour(8, V6_BASE, MAC)
    _, _, body = rtnl.encode_object(neighbour, remove=False, protocol=PROTO)
    event = event_from_message(rtnl.RTM_NEWNEIGH, 42, body)
    assert (event.kind, event.ifindex, event.sender, event.obj) == ("neighbour", 8, 42, neighbour)
    _, _, body = rtnl.encode_object(Fdb(8, MAC, V6_PUBLIC), remove=False, protocol=PROTO)
    event = event_from_message(rtnl.RTM_DELNEIGH, 0, body)
    assert (event.kind, event.obj) == ("fdb", Fdb(8, MAC, V6_PUBLIC))


def test_attributes_are_padded_read_in_order_and_a_nest_is_flagged() -> None:
    """The one attribute codec of rtnetlink and generic netlink (wgnetlink uses it)."""
    one = rtnl.attribute(1, b"abc")  # 4 + 3 bytes, padded to 8
    assert one == struct.pack("=HH", 7, 1) + b"abc\0"
    members = rtnl.attribute(0, b"x") + rtnl.attribute(0, b"yz")  # repeated type 0
    nested = rtnl.nest(9, members)
    assert struct.unpack_from("=HH", nested) == (4 + len(members), 9 | 0x8000)
    data = one + nested + rtnl.attribute(2, b"")
    assert rtnl.attributes(data) == [(1, b"abc"), (9, members), (2, b"")]  # flag stripped
    assert rtnl.attributes(members) == [(0, b"x"), (0, b"yz")]  # order and repeats kept
    assert rtnl.attributes(data, len(one), len(one) + len(nested)) == [(9, members)]
    assert rtnl.attributes(one + struct.pack("=HH", 2, 5) + b"junk") == [(1, b"abc")]


# -- links, addresses, route look-ups (include/uapi/linux/if_link.h, if_addr.h) ------------


def ifinfomsg(index: int, flags: int, change: int) -> bytes:
    """struct ifinfomsg: family (u8), pad (u8), type (u16), index (s32), flags, change (u32)."""
    return struct.pack("=BxHiII", socket.AF_UNSPEC, 0, index, flags, change)


def ifaddrmsg(family: int, prefixlen: int, flags: int, scope: int, index: int) -> bytes:
    """struct ifaddrmsg: family, prefixlen, flags, scope (u8 each), index (u32)."""
    return struct.pack("=BBBBI", family, prefixlen, flags, scope, index)


def test_a_vxlan_device_request_is_the_kernels_struct_byte_for_byte() -> None:
    from leaseagent.core.plan import VxlanAttrs

    vxlan = VxlanAttrs(vni=1, port=8472, local=IPv4Address("10.99.0.1"), link=2,
                       flags=frozenset({"GBP"}))
    body = rtnl.link_request(name="flannel.1", mtu=1450, mac=MAC, kind="vxlan",
                             data=rtnl.vxlan_data(vxlan))
    data = (attr(1, struct.pack("=I", 1)) + attr(15, struct.pack("!H", 8472))
            + attr(4, IPv4Address("10.99.0.1").packed) + attr(3, struct.pack("=I", 2))
            + attr(7, b"\0") + attr(23, b""))
    linkinfo = attr(1, b"vxlan") + attr(2 | 0x8000, data)
    assert body == (ifinfomsg(0, 0, 0) + attr(3, b"flannel.1\0") + attr(4, struct.pack("=I", 1450))
                    + attr(1, MAC_BYTES) + attr(18 | 0x8000, linkinfo))
    # The kernel answers with the same attributes (and more): read back as sent.
    m = rtnl.decode_link_message(ifinfomsg(7, 0x1, 0) + body[16:], 0, len(body))
    assert (m.index, m.name, m.mtu, m.address, m.kind, m.vxlan) == (
        7, "flannel.1", 1450, MAC, "vxlan", vxlan)
    v6 = VxlanAttrs(vni=2, port=4789, local=V6_PUBLIC, link=0,
                    flags=frozenset({"learning"}))
    m = rtnl.decode_link_message(rtnl.link_request(kind="vxlan", data=rtnl.vxlan_data(v6)), 0,
                                 len(rtnl.link_request(kind="vxlan", data=rtnl.vxlan_data(v6))))
    assert m.vxlan == v6 and m.name is None and m.address is None


def test_setting_a_link_up_or_down_changes_only_iff_up() -> None:
    assert rtnl.link_request(index=3, up=True) == ifinfomsg(3, 0x1, 0x1)
    assert rtnl.link_request(index=3, up=False) == ifinfomsg(3, 0, 0x1)
    assert rtnl.link_request(index=3, mtu=1400) == ifinfomsg(3, 0, 0) + attr(
        4, struct.pack("=I", 1400))


def test_address_requests_as_ip_address_sends_them() -> None:
    from ipaddress import IPv4Interface, IPv6Interface

    v4 = IPv4Interface("10.5.2.0/32")
    assert rtnl.address_request(4, v4) == (ifaddrmsg(socket.AF_INET, 32, 0, 0, 4)
                                           + attr(2, v4.ip.packed) + attr(1, v4.ip.packed))
    v6 = IPv6Interface("fd00:5:2::/128")
    assert rtnl.address_request(4, v6, flags=0x02) == (
        ifaddrmsg(socket.AF_INET6, 128, 0x02, 0, 4) + attr(1, v6.ip.packed)
        + attr(8, struct.pack("=I", 0x02)))
    # IFA_FLAGS, when the kernel sends it, holds the flags beyond the header's 8 bits.
    dumped = ifaddrmsg(socket.AF_INET6, 64, 0, 253, 9) + attr(1, V6_BASE.packed) + attr(
        8, struct.pack("=I", 0x280))
    assert rtnl.decode_address(dumped, 0, len(dumped)) == (9, 64, 253, 0x280, V6_BASE)


def test_a_route_look_up_reads_the_output_link_and_source_or_the_first_hop() -> None:
    dst = IPv4Address("10.99.0.7")
    assert rtnl.route_get_request(dst) == rtmsg(socket.AF_INET, 32, 0, 0, 0, 0, 0) + attr(
        1, dst.packed)
    answer = (rtmsg(socket.AF_INET, 32, MAIN_TABLE, 2, 0, 1, 0) + attr(1, dst.packed)
              + attr(4, struct.pack("=I", 2)) + attr(7, IPv4Address("10.99.0.1").packed))
    assert rtnl.route_output(answer, 0, len(answer)) == (
        MAIN_TABLE, 32, 2, IPv4Address("10.99.0.1"))
    hops = struct.pack("=HBBi", 8, 0, 0, 0) + struct.pack("=HBBi", 16, 0, 0, 5) + attr(
        5, IPv4Address("10.99.0.254").packed)
    default = rtmsg(socket.AF_INET, 0, MAIN_TABLE, 3, 0, 1, 0) + attr(9, hops)
    assert rtnl.route_output(default, 0, len(default)) == (MAIN_TABLE, 0, 5, None)
