"""Raw rtnetlink: batched requests, table dumps, event reading; and the few link,
address and route look-up requests (`link_request`, `address_request`,
`route_get_request`), so that the agent needs no netlink library.

pyroute2 builds and parses every message through a generic, attribute-by-
attribute object model and waits for each request's reply: over ten times
the CPU of packing with `struct` for the messages below, encoding or
decoding (bench/netlink_codec.py; docs/benchmarks.md, "Netlink codec"),
and a round trip per object. The three message
types the data plane sends in bulk (routes, neighbours and vxlan FDB
entries, each with an IPv4 or an IPv6 address) are small and fixed, so they
are packed here with `struct`. The family is the only difference: an
rtmsg/ndmsg's family byte (AF_INET or AF_INET6; AF_BRIDGE for FDB entries,
whatever the remote's family) and 4- or 16-byte RTA_DST/RTA_GATEWAY/NDA_DST.

- `RtnlSocket.batch(requests)`: many requests per `send()` (one skb; the
  kernel runs them in order, each under RTNL, synchronously inside the send).
  No request asks for an ack: the kernel answers only refusals (an
  NLMSG_ERROR each, matched to its request by sequence number), and a last
  NLMSG_NOOP in the send asks for one ack, which comes after every answer
  before it: a join of 15,000 objects reads a few datagrams instead of
  15,000 acks, and the kernel makes no ack skb per object. A refused request
  does not stop the ones after it. Chunks are sized from the socket's
  receive buffer (an answer skb costs ~1 KiB of it) so answers are never
  dropped, even if every request is refused; if the kernel still reports
  ENOBUFS the unanswered requests of that send are failures (the next resync
  retries them), never silent successes.
- `RtnlSocket.scan(...)`: one dump request, each message handed over as its
  datagram arrives, to be filtered on fixed offsets (family, table, protocol,
  ifindex) before any attribute is parsed, and read into an identity
  (`route_identity`, `neighbour_identity`: the tuple core.plan gives the object)
  rather than an object: a full sync compares 15,000 dumped entries with its
  plan without making 15,000 objects or keeping the dump (`dump` keeps it).
  An AF_UNSPEC dump holds both families and works on a kernel without IPv6,
  where an AF_INET6 one would be refused.
- `RtnlSocket.read_events(ignore=...)`: multicast messages whose sender port
  id is ours are dropped from the header alone, so the echoes of a big batch
  cost almost nothing (and, asked, neighbour and FDB additions told with port
  id 0: the FDB's echoes carry no port id).

Sockets are opened inside a named network namespace (`netns`, a name under
/run/netns or a path) from a short-lived thread that `setns()`s itself; the
socket stays in that namespace, the agent's threads never change theirs.
Errors are plain `OSError`; leaseagent.dataplane.netlink translates them.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import os
import socket
import struct
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from ipaddress import (
    IPv4Address,
    IPv4Interface,
    IPv4Network,
    IPv6Address,
    IPv6Interface,
    IPv6Network,
    ip_address,
)
from typing import Any, NamedTuple

from leaseagent.core.network import Address, Network
from leaseagent.core.plan import (
    MAIN_TABLE,
    Fdb,
    HostRoute,
    Ident,
    KernelObject,
    Neighbour,
    Route,
    VxlanAttrs,
    fdb_ident,
    neighbour_ident,
    route_ident,
)
from leaseagent.core.profiles import vxlan as vxlan_profile

NETLINK_ROUTE = 0
NLMSG_NOOP, NLMSG_ERROR, NLMSG_DONE, NLMSG_OVERRUN = 1, 2, 3, 4
NLM_F_REQUEST, NLM_F_MULTI, NLM_F_ACK = 0x1, 0x2, 0x4
NLM_F_DUMP_INTR = 0x10
NLM_F_DUMP = 0x300
NLM_F_REPLACE, NLM_F_EXCL, NLM_F_CREATE, NLM_F_APPEND = 0x100, 0x200, 0x400, 0x800
RTM_NEWLINK, RTM_DELLINK, RTM_GETLINK = 16, 17, 18
RTM_NEWADDR, RTM_DELADDR, RTM_GETADDR = 20, 21, 22
RTM_NEWROUTE, RTM_DELROUTE, RTM_GETROUTE = 24, 25, 26
RTM_NEWNEIGH, RTM_DELNEIGH, RTM_GETNEIGH = 28, 29, 30
# RTMGRP_NEIGH carries neighbours of every family and FDB entries alike.
RTMGRP_LINK, RTMGRP_NEIGH, RTMGRP_IPV4_ROUTE, RTMGRP_IPV6_ROUTE = 0x1, 0x4, 0x40, 0x400
AF_BRIDGE = 7
RTA_DST, RTA_OIF, RTA_GATEWAY, RTA_PRIORITY, RTA_PREFSRC, RTA_MULTIPATH, RTA_TABLE = (
    1, 4, 5, 6, 7, 9, 15)
NDA_DST, NDA_LLADDR = 1, 2
IFLA_ADDRESS, IFLA_IFNAME, IFLA_MTU, IFLA_LINKINFO = 1, 3, 4, 18
IFLA_INFO_KIND, IFLA_INFO_DATA = 1, 2
IFLA_VXLAN_ID, IFLA_VXLAN_LINK, IFLA_VXLAN_LOCAL = 1, 3, 4
IFLA_VXLAN_PORT, IFLA_VXLAN_LOCAL6 = 15, 17  # the flags' numbers: the vxlan profile's DEVICE_FLAGS
IFA_ADDRESS, IFA_LOCAL, IFA_FLAGS = 1, 2, 8
RTN_UNICAST = 1
RT_SCOPE_UNIVERSE, RT_SCOPE_NOWHERE = 0, 255
RTNH_F_ONLINK = 4
NUD_NOARP, NUD_PERMANENT = 0x40, 0x80
NTF_SELF = 0x02
IFF_UP = 0x1
SOL_NETLINK = 270
SO_RCVBUFFORCE = 33
SO_ATTACH_FILTER = 26
CLONE_NEWNET = 0x40000000

_HDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_RTMSG = struct.Struct("=BBBBBBBBI")  # family dst_len src_len tos table proto scope type flags
_NDMSG = struct.Struct("=BxxxiHBB")  # family ifindex state flags type
_IFINFO = struct.Struct("=BxHiII")  # family type index flags change
_IFADDR = struct.Struct("=BBBBi")  # family prefixlen flags scope index
_RTNEXTHOP = struct.Struct("=HBBi")  # len flags hops ifindex
_BE16 = struct.Struct("!H")
_ERR = struct.Struct("=i")
_ATTR = struct.Struct("=HH")  # nlattr: len, type
NLA_F_NESTED = 0x8000
NLA_TYPE_MASK = 0x3FFF  # the type without NLA_F_NESTED and NLA_F_NET_BYTEORDER
_U32 = struct.Struct("=I")
_ZERO_MAC = b"\0" * 6
ACK_TRUESIZE = 1024  # receive-buffer bytes one queued ack costs (skb truesize, rounded up)
MAX_CHUNK = 2048
# One datagram: the kernel sends a dump's messages in skbs of at most 32 KiB (netlink_dump
# grows them up to that for a large reader) and every other message alone; iproute2
# reads into 32 KiB. bytearray(n) writes n zeros, so a larger buffer is resident memory
# for nothing.
_RECV_SIZE = 64 * 1024


def attribute(kind: int, payload: bytes) -> bytes:
    """One netlink attribute, rtnetlink's or generic netlink's alike: length, type,
    payload, zeros to a 4-byte boundary."""
    n = 4 + len(payload)
    return _ATTR.pack(n, kind) + payload + b"\0" * (-n & 3)


def nest(kind: int, members: bytes) -> bytes:
    """An attribute holding attributes (NLA_F_NESTED set, as the kernel's nla_nest_start)."""
    return attribute(kind | NLA_F_NESTED, members)


def _mac_bytes(mac: str) -> bytes:
    return bytes.fromhex(mac.replace(":", ""))


def _mac_str(raw: bytes) -> str:
    return raw.hex(":")


def family_of(address: Address | Network) -> int:
    """AF_INET or AF_INET6, the family byte of a message about `address`."""
    return socket.AF_INET if address.version == 4 else socket.AF_INET6


_NETWORKS: dict[int, type[IPv4Network] | type[IPv6Network]] = {
    socket.AF_INET: IPv4Network, socket.AF_INET6: IPv6Network}


def _address(raw: bytes) -> Address | None:
    """A 4- or 16-byte address attribute; None for any other length."""
    if len(raw) == 4:
        return IPv4Address(raw)
    if len(raw) == 16:
        return IPv6Address(raw)
    return None


# -- encoding -------------------------------------------------------------------


# The IPv4 shapes a join or a mass removal sends by the thousand, each packed by one
# struct call from the object's identity (core.plan: ints, no ipaddress object touched);
# the same bytes as the general encoding below (tests/unit/test_rtnl.py). Addresses
# are in network order: htonl'd, then packed native.
_ROUTE4_VIA = struct.Struct("=BBBBBBBBI" "HHI" "HHI" "HHI")  # rtmsg, DST, GATEWAY, OIF
_NEIGH4 = struct.Struct("=BxxxiHBB" "HHI")  # ndmsg, DST
_NEIGH4_MAC = struct.Struct("=BxxxiHBB" "HHI" "HH6sxx")  # ndmsg, DST, LLADDR
_FDB4 = struct.Struct("=BxxxiHBB" "HH6sxx" "HHI")  # ndmsg, LLADDR, DST
_htonl = socket.htonl
# REPLACE: a unicast MAC has one remote, which a peer's new PublicIP replaces
# (APPEND would answer 0 and keep the old one: netlink.py's quirks).
_FDB_ADD_FLAGS = NLM_F_CREATE | NLM_F_REPLACE


def _encode_ipv4(ident: tuple[Any, ...], remove: bool, protocol: int
                 ) -> tuple[int, int, bytes] | None:
    """`encode_object` for the common IPv4 shapes, from the identity; None for others."""
    kind = ident[0]
    if ident[1] != 4:
        return None
    if kind == 0:  # (0, 4, dst, prefixlen, gateway, ifindex, onlink, metric, scope)
        _k, _v, dst, prefixlen, gateway, ifindex, onlink, metric, scope = ident
        if gateway < 0 or not ifindex or metric:
            return None
        body = _ROUTE4_VIA.pack(
            socket.AF_INET, prefixlen, 0, 0, MAIN_TABLE, protocol,
            RT_SCOPE_NOWHERE if remove else scope, RTN_UNICAST,
            RTNH_F_ONLINK if onlink else 0,
            8, RTA_DST, _htonl(dst), 8, RTA_GATEWAY, _htonl(gateway), 8, RTA_OIF, ifindex)
        if remove:
            return RTM_DELROUTE, 0, body
        return RTM_NEWROUTE, NLM_F_REPLACE | NLM_F_CREATE, body
    if kind == 1:  # (1, 4, ifindex, dst, lladdr)
        if remove:
            return RTM_DELNEIGH, 0, _NEIGH4.pack(socket.AF_INET, ident[2], NUD_PERMANENT, 0, 0,
                                                 8, NDA_DST, _htonl(ident[3]))
        return RTM_NEWNEIGH, NLM_F_REPLACE | NLM_F_CREATE, _NEIGH4_MAC.pack(
            socket.AF_INET, ident[2], NUD_PERMANENT, 0, 0, 8, NDA_DST, _htonl(ident[3]),
            10, NDA_LLADDR, _mac_bytes(ident[4]))
    if kind != 2:
        return None
    # (2, 4, ifindex, lladdr, dst)
    body = _FDB4.pack(AF_BRIDGE, ident[2], NUD_PERMANENT | NUD_NOARP, NTF_SELF, 0,
                      10, NDA_LLADDR, _mac_bytes(ident[3]), 8, NDA_DST, _htonl(ident[4]))
    if remove:
        return RTM_DELNEIGH, 0, body
    return RTM_NEWNEIGH, _FDB_ADD_FLAGS, body


def encode_object(obj: KernelObject, *, remove: bool, protocol: int) -> tuple[int, int, bytes]:
    """(message type, flags, body without the nlmsghdr) for replacing/removing `obj`."""
    ident = getattr(obj, "_ident", None)  # a Route, Neighbour or Fdb has one
    if ident is not None:
        fast = _encode_ipv4(ident, remove, protocol)
        if fast is not None:
            return fast
    if isinstance(obj, Route):
        body = _RTMSG.pack(
            family_of(obj.dst), obj.dst.prefixlen, 0, 0, MAIN_TABLE, protocol,
            RT_SCOPE_NOWHERE if remove else obj.scope, RTN_UNICAST,
            RTNH_F_ONLINK if obj.onlink else 0,
        )
        body += attribute(RTA_DST, obj.dst.network_address.packed)
        if obj.gateway is not None:
            body += attribute(RTA_GATEWAY, obj.gateway.packed)
        if obj.ifindex:
            body += attribute(RTA_OIF, _U32.pack(obj.ifindex))
        if obj.metric:
            body += attribute(RTA_PRIORITY, _U32.pack(obj.metric))
        if remove:
            return RTM_DELROUTE, 0, body
        return RTM_NEWROUTE, NLM_F_REPLACE | NLM_F_CREATE, body
    if isinstance(obj, Neighbour):
        body = _NDMSG.pack(family_of(obj.dst), obj.ifindex, NUD_PERMANENT, 0, 0)
        body += attribute(NDA_DST, obj.dst.packed)
        if remove:
            return RTM_DELNEIGH, 0, body
        body += attribute(NDA_LLADDR, _mac_bytes(obj.lladdr))
        return RTM_NEWNEIGH, NLM_F_REPLACE | NLM_F_CREATE, body
    if not isinstance(obj, Fdb):
        raise TypeError(f"not an rtnetlink object: {obj!r}")
    body = _NDMSG.pack(AF_BRIDGE, obj.ifindex, NUD_PERMANENT | NUD_NOARP, NTF_SELF, 0)
    body += attribute(NDA_LLADDR, _mac_bytes(obj.lladdr)) + attribute(NDA_DST, obj.dst.packed)
    if remove:
        return RTM_DELNEIGH, 0, body
    return RTM_NEWNEIGH, _FDB_ADD_FLAGS, body


# -- decoding -------------------------------------------------------------------


def attributes(data: bytes | memoryview, start: int = 0, end: int | None = None
               ) -> list[tuple[int, bytes]]:
    """Every attribute from `start` to `end` (the data's end: None) in order, as (type
    without its flags, payload); repeated types are kept (the members of a generic
    netlink nest are often all of type 0). A malformed length ends the list."""
    # Slices of bytes are bytes: a memoryview is copied once, not once per attribute.
    raw = data if isinstance(data, bytes) else bytes(data)
    end = len(raw) if end is None else end
    out = []
    while start + 4 <= end:
        n, kind = _ATTR.unpack_from(raw, start)
        if n < 4:
            break
        out.append((kind & NLA_TYPE_MASK, raw[start + 4:start + n]))
        start += (n + 3) & ~3
    return out


def _attrs(data: bytes | memoryview, start: int, end: int) -> dict[int, bytes]:
    """`attributes` by type (an rtnetlink message carries each type once), without the
    list: this reads every entry of a table dump."""
    out: dict[int, bytes] = {}
    while start + 4 <= end:
        n, kind = _ATTR.unpack_from(data, start)
        if n < 4:
            break
        out[kind & NLA_TYPE_MASK] = bytes(data[start + 4:start + n])
        start += (n + 3) & ~3
    return out


def messages(data: bytes | memoryview) -> Iterator[tuple[int, int, int, int, int, int]]:
    """(type, flags, seq, pid, offset of body, end) of each message in a datagram."""
    offset, size = 0, len(data)
    while offset + 16 <= size:
        length, kind, flags, seq, pid = _HDR.unpack_from(data, offset)
        if length < 16:
            break
        yield kind, flags, seq, pid, offset + 16, offset + length
        offset += (length + 3) & ~3


def _route_parts(data: bytes | memoryview, start: int, end: int
                 ) -> tuple[int, int, int, int, int, int, int, dict[int, bytes]]:
    """(family, dst_len, table, protocol, scope, type, flags, attributes) of an rtmsg."""
    family, dst_len, _, _, table, proto, scope, rtype, flags = _RTMSG.unpack_from(data, start)
    attrs = _attrs(data, start + _RTMSG.size, end)
    if RTA_TABLE in attrs:
        table = _U32.unpack(attrs[RTA_TABLE])[0]
    return family, dst_len, table, proto, scope, rtype, flags, attrs


def _u32(raw: bytes | None) -> int:
    return _U32.unpack(raw)[0] if raw else 0


def decode_route(data: bytes | memoryview, start: int, end: int) -> tuple[Route | None, int, int]:
    """(route or None if not IPv4 or IPv6 unicast, protocol, table)."""
    family, dst_len, table, proto, scope, rtype, flags, attrs = _route_parts(data, start, end)
    network = _NETWORKS.get(family)
    if network is None or rtype != RTN_UNICAST:
        return None, proto, table
    dst = attrs.get(RTA_DST)
    gateway = attrs.get(RTA_GATEWAY)
    route = Route(
        dst=network((int.from_bytes(dst) if dst else 0, dst_len)),
        gateway=_address(gateway) if gateway else None,
        ifindex=_u32(attrs.get(RTA_OIF)),
        onlink=bool(flags & RTNH_F_ONLINK),
        metric=_u32(attrs.get(RTA_PRIORITY)),
        scope=scope,
    )
    return route, proto, table


RTN_LOCAL = 2
LOCAL_TABLE = 255
RT_SCOPE_LINK = 253


def host_route(data: bytes | memoryview, start: int, end: int) -> HostRoute | None:
    """A route of the main table (unicast) or an address of this host (the local
    table's RTN_LOCAL entries: one per address), as a HostRoute; None for anything
    else (broadcast, multicast, other tables, unreachable routes)."""
    family, dst_len, table, _, scope, rtype, _, attrs = _route_parts(data, start, end)
    network = _NETWORKS.get(family)
    if network is None:
        return None
    local = table == LOCAL_TABLE and rtype == RTN_LOCAL
    if not local and (table != MAIN_TABLE or rtype != RTN_UNICAST):
        return None
    dst = attrs.get(RTA_DST)
    try:
        prefix = network((int.from_bytes(dst) if dst else 0, dst_len))
    except ValueError:
        return None
    gateway = attrs.get(RTA_GATEWAY)
    return HostRoute(prefix, connected=not local and scope == RT_SCOPE_LINK
                     and RTA_GATEWAY not in attrs, address=local,
                     ifindex=_u32(attrs.get(RTA_OIF)),
                     gateway=ip_address(bytes(gateway)) if gateway and len(gateway) in (4, 16)
                     else None)


def route_identity(data: bytes | memoryview, start: int, end: int) -> tuple[Ident | None, int]:
    """(the identity `decode_route` would give the route, or None if it is not IPv4 or
    IPv6 unicast; table), with no object made: a dump is compared with a plan so."""
    family, dst_len, table, _, scope, rtype, flags, attrs = _route_parts(data, start, end)
    if family not in _NETWORKS or rtype != RTN_UNICAST:
        return None, table
    dst = attrs.get(RTA_DST)
    gateway = attrs.get(RTA_GATEWAY)
    ident = route_ident(
        4 if family == socket.AF_INET else 6, int.from_bytes(dst) if dst else 0, dst_len,
        int.from_bytes(gateway) if gateway and len(gateway) in (4, 16) else -1,
        _u32(attrs.get(RTA_OIF)), bool(flags & RTNH_F_ONLINK), _u32(attrs.get(RTA_PRIORITY)),
        scope)
    return ident, table


class RawNeighbour(NamedTuple):
    """A neighbour or FDB message's fields (a tuple: a mass removal's echoes decode
    thousands)."""

    family: int
    ifindex: int
    state: int
    flags: int
    dst: Address | None  # None: no destination address
    lladdr: str


def _dst_and_lladdr(data: bytes | memoryview, start: int, end: int
                    ) -> tuple[bytes | None, bytes | None]:
    """A neighbour message's NDA_DST and NDA_LLADDR (None: absent), its other attributes
    skipped uncopied (a mass removal's echoes are thousands)."""
    dst = lladdr = None
    while start + 4 <= end:
        n, kind = _ATTR.unpack_from(data, start)
        if n < 4:
            break
        kind &= NLA_TYPE_MASK
        if kind == NDA_DST:
            dst = bytes(data[start + 4:start + n])
        elif kind == NDA_LLADDR:
            lladdr = bytes(data[start + 4:start + n])
        start += (n + 3) & ~3
    return dst, lladdr


def decode_neighbour(data: bytes | memoryview, start: int, end: int) -> RawNeighbour:
    family, ifindex, state, flags, _ = _NDMSG.unpack_from(data, start)
    dst, lladdr = _dst_and_lladdr(data, start + _NDMSG.size, end)
    return RawNeighbour(
        family, ifindex, state, flags,
        _address(dst) if dst is not None else None,
        _mac_str(lladdr) if lladdr and lladdr != _ZERO_MAC else "",
    )


def neighbour_identity(data: bytes | memoryview, start: int, end: int
                       ) -> tuple[RawNeighbour, Ident | None]:
    """The neighbour or FDB entry's header fields (`dst` left None) and the identity
    `core.plan` gives it (None without a 4- or 16-byte destination or an address):
    a Neighbour's for an IPv4/IPv6 entry, an Fdb's for AF_BRIDGE."""
    family, ifindex, state, flags, _ = _NDMSG.unpack_from(data, start)
    dst, lladdr = _dst_and_lladdr(data, start + _NDMSG.size, end)
    mac = _mac_str(lladdr) if lladdr and lladdr != _ZERO_MAC else ""
    raw = RawNeighbour(family, ifindex, state, flags, None, mac)
    if dst is None or len(dst) not in (4, 16) or not mac:
        return raw, None
    version = 4 if len(dst) == 4 else 6
    if family == AF_BRIDGE:
        return raw, fdb_ident(version, ifindex, mac, int.from_bytes(dst))
    return raw, neighbour_ident(version, ifindex, int.from_bytes(dst), mac)


def decode_link(data: bytes | memoryview, start: int, end: int) -> tuple[int, int, str | None]:
    """(index, flags, ifname) of an ifinfomsg."""
    _, _, index, flags, _ = _IFINFO.unpack_from(data, start)
    name = _attrs(data, start + _IFINFO.size, end).get(IFLA_IFNAME)
    return index, flags, name.rstrip(b"\0").decode(errors="replace") if name else None


# -- links and addresses: few, rare requests ------------------------------------


def link_request(*, index: int = 0, name: str | None = None, up: bool | None = None,
                 mtu: int | None = None, mac: str | None = None, kind: str | None = None,
                 data: bytes = b"") -> bytes:
    """The body of an RTM_NEWLINK (create or set), RTM_DELLINK or RTM_GETLINK: the link
    `index` or `name`; IFF_UP set or cleared only when `up` is given; `kind` and its
    IFLA_INFO_DATA (`vxlan_data`) for a new device."""
    body = _IFINFO.pack(socket.AF_UNSPEC, 0, index, IFF_UP if up else 0,
                        0 if up is None else IFF_UP)
    if name is not None:
        body += attribute(IFLA_IFNAME, name.encode() + b"\0")
    if mtu is not None:
        body += attribute(IFLA_MTU, _U32.pack(mtu))
    if mac is not None:
        body += attribute(IFLA_ADDRESS, _mac_bytes(mac))
    if kind is not None:
        info = attribute(IFLA_INFO_KIND, kind.encode())
        if data:
            info += nest(IFLA_INFO_DATA, data)
        body += nest(IFLA_LINKINFO, info)
    return body


def vxlan_data(vxlan: VxlanAttrs) -> bytes:
    """IFLA_INFO_DATA of a vxlan device: its VNI, UDP port, local VTEP (IPv4 or IPv6),
    underlay link (0: none), then its flags as the vxlan profile's DEVICE_FLAGS encode
    them (a u8 0/1, or a flag attribute there only when on)."""
    assert vxlan.local is not None
    out = (attribute(IFLA_VXLAN_ID, _U32.pack(vxlan.vni))
           + attribute(IFLA_VXLAN_PORT, _BE16.pack(vxlan.port))
           + attribute(IFLA_VXLAN_LOCAL if vxlan.local.version == 4 else IFLA_VXLAN_LOCAL6,
                       vxlan.local.packed))
    if vxlan.link:
        out += attribute(IFLA_VXLAN_LINK, _U32.pack(vxlan.link))
    for flag in vxlan_profile.DEVICE_FLAGS:
        if not flag.presence:
            out += attribute(flag.ifla, bytes([flag.shown in vxlan.flags]))
        elif flag.shown in vxlan.flags:
            out += attribute(flag.ifla, b"")
    return out


@dataclass(frozen=True)
class LinkMessage:
    """What the data plane reads of an RTM_NEWLINK."""

    index: int
    flags: int  # IFF_*
    name: str | None
    mtu: int
    address: str | None  # the link-layer address, as "aa:bb:..."; None if it has none
    kind: str | None  # IFLA_INFO_KIND: "vxlan", "wireguard", ...; None for a plain device
    vxlan: VxlanAttrs | None


def _text(raw: bytes) -> str:
    return raw.rstrip(b"\0").decode(errors="replace")


def _vxlan_attrs(data: bytes) -> VxlanAttrs:
    a = _attrs(data, 0, len(data))
    local = a.get(IFLA_VXLAN_LOCAL) or a.get(IFLA_VXLAN_LOCAL6)
    port = a.get(IFLA_VXLAN_PORT)
    flags = frozenset(flag.shown for flag in vxlan_profile.DEVICE_FLAGS
                      if (flag.ifla in a if flag.presence
                          else (value := a.get(flag.ifla)) and value[0]))
    return VxlanAttrs(vni=_u32(a.get(IFLA_VXLAN_ID)),
                      port=_BE16.unpack(port)[0] if port else 0,
                      local=_address(local) if local else None,
                      link=_u32(a.get(IFLA_VXLAN_LINK)),
                      flags=flags)


def decode_link_message(data: bytes | memoryview, start: int, end: int) -> LinkMessage:
    _, _, index, flags, _ = _IFINFO.unpack_from(data, start)
    a = _attrs(data, start + _IFINFO.size, end)
    name, mtu, address = a.get(IFLA_IFNAME), a.get(IFLA_MTU), a.get(IFLA_ADDRESS)
    kind, vxlan = None, None
    if (linkinfo := a.get(IFLA_LINKINFO)) is not None:
        info = _attrs(linkinfo, 0, len(linkinfo))
        kind = _text(info[IFLA_INFO_KIND]) if IFLA_INFO_KIND in info else None
        if kind == vxlan_profile.DEVICE_KIND:
            vxlan = _vxlan_attrs(info.get(IFLA_INFO_DATA, b""))
    return LinkMessage(index, flags, _text(name) if name else None, _u32(mtu),
                       _mac_str(address) if address is not None else None, kind, vxlan)


def address_request(index: int, address: IPv4Interface | IPv6Interface, *,
                    flags: int = 0) -> bytes:
    """The body of an RTM_NEWADDR or RTM_DELADDR of `address` on link `index` (IFA_F_*
    `flags`); an IPv4 one with IFA_LOCAL too, as `ip address` sends it."""
    ip = address.ip
    body = _IFADDR.pack(family_of(ip), address.network.prefixlen, flags & 0xFF, 0, index)
    if ip.version == 4:
        body += attribute(IFA_LOCAL, ip.packed)
    body += attribute(IFA_ADDRESS, ip.packed)
    if flags:
        body += attribute(IFA_FLAGS, _U32.pack(flags))
    return body


def address_dump_request(family: int) -> bytes:
    return _IFADDR.pack(family, 0, 0, 0, 0)


def decode_address(data: bytes | memoryview, start: int, end: int
                   ) -> tuple[int, int, int, int, Address | None]:
    """(index, prefix length, scope, IFA_F_* flags, address) of an ifaddrmsg: the flags
    from IFA_FLAGS (all 32 bits) when present, else the header's 8; the address is
    IFA_ADDRESS (a point-to-point link's peer), else IFA_LOCAL."""
    _, prefixlen, flags, scope, index = _IFADDR.unpack_from(data, start)
    a = _attrs(data, start + _IFADDR.size, end)
    if IFA_FLAGS in a:
        flags = _u32(a[IFA_FLAGS])
    raw = a.get(IFA_ADDRESS) or a.get(IFA_LOCAL)
    return index, prefixlen, scope, flags, _address(raw) if raw else None


def route_get_request(destination: Address) -> bytes:
    """The body of an RTM_GETROUTE for one destination (`ip route get`)."""
    return (_RTMSG.pack(family_of(destination), destination.max_prefixlen, 0, 0, 0, 0, 0, 0, 0)
            + attribute(RTA_DST, destination.packed))


def route_output(data: bytes | memoryview, start: int, end: int
                 ) -> tuple[int, int, int, Address | None]:
    """(table, destination prefix length, output ifindex, preferred source) of an rtmsg;
    the ifindex of a multipath route's first hop that has one."""
    _, dst_len, table, _, _, _, _, attrs = _route_parts(data, start, end)
    oif = _u32(attrs.get(RTA_OIF))
    hops = attrs.get(RTA_MULTIPATH, b"")
    at = 0
    while not oif and at + _RTNEXTHOP.size <= len(hops):
        size, _, _, oif = _RTNEXTHOP.unpack_from(hops, at)
        if size < _RTNEXTHOP.size:
            break
        at += (size + 3) & ~3
    src = attrs.get(RTA_PREFSRC)
    return table, dst_len, oif, _address(src) if src else None


# -- the event filter -------------------------------------------------------------

# Classic BPF (linux/filter.h): a socket filter runs on each broadcast before it is
# queued, on the skb from its nlmsghdr on (a broadcast is one message per skb).
_BPF_LD_W_ABS, _BPF_LD_H_ABS, _BPF_JEQ_K, _BPF_RET_K = 0x20, 0x28, 0x15, 0x06
_BPF_INSN = struct.Struct("=HBBI")  # struct sock_filter: code, jt, jf, k
_NLMSG_TYPE_AT, _NLMSG_PID_AT = 4, 12  # offsets in the nlmsghdr (_HDR)


def _as_loaded(value: int, size: int) -> int:
    """What a BPF load reads of `value` stored in host order (it reads big-endian)."""
    return int.from_bytes(value.to_bytes(size, sys.byteorder), "big")


def event_filter(ignore: frozenset[int], *, unsent_additions: bool = True
                 ) -> list[tuple[int, int, int, int]]:
    """The socket filter that drops in the kernel what `read_events` drops: messages
    sent for a port in `ignore`, and unless `unsent_additions` neighbour and FDB
    additions told with port id 0. (code, jt, jf, k) each; the last two return
    "drop" (0) and "keep" (all of it)."""
    body: list[tuple[int, int, int, int]] = [(_BPF_LD_W_ABS, 0, 0, _NLMSG_PID_AT)]
    checks = sorted(ignore)
    tail = 0 if unsent_additions else 3  # the RTM_NEWNEIGH test after the port ids
    for i, port in enumerate(checks):
        # Equal: to "drop"; else the next test.
        to_drop = (len(checks) - 1 - i) + tail + 1
        body.append((_BPF_JEQ_K, to_drop, 0, _as_loaded(port, 4)))
    if not unsent_additions:
        # Port id 0 and RTM_NEWNEIGH: drop; anything else: keep.
        body.append((_BPF_JEQ_K, 0, 2, 0))
        body.append((_BPF_LD_H_ABS, 0, 0, _NLMSG_TYPE_AT))
        body.append((_BPF_JEQ_K, 1, 0, _as_loaded(RTM_NEWNEIGH, 2)))
    return [*body, (_BPF_RET_K, 0, 0, 0xFFFFFFFF), (_BPF_RET_K, 0, 0, 0)]


def _attach_filter(sock: socket.socket, program: list[tuple[int, int, int, int]]) -> None:
    code = b"".join(_BPF_INSN.pack(*insn) for insn in program)
    buf = ctypes.create_string_buffer(code, len(code))
    fprog = struct.pack("@HP", len(program), ctypes.addressof(buf))  # struct sock_fprog
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)  # the kernel copies it


# -- the socket -------------------------------------------------------------------


def _libc_setns(fd: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def _netns_path(netns: str) -> str:
    return netns if netns.startswith("/") else f"/run/netns/{netns}"


def new_socket(netns: str | None, protocol: int = NETLINK_ROUTE) -> socket.socket:
    """A raw, non-blocking netlink socket of `protocol` in `netns` (made by a thread that
    enters the namespace and ends), or in this thread's namespace (None)."""
    def make() -> socket.socket:
        return socket.socket(
            socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK,
            protocol,
        )

    if netns is None:
        return make()
    result: list[socket.socket] = []
    errors: list[BaseException] = []

    def in_namespace() -> None:
        try:
            fd = os.open(_netns_path(netns), os.O_RDONLY | os.O_CLOEXEC)
            try:
                _libc_setns(fd)
            finally:
                os.close(fd)
            result.append(make())
        except BaseException as exc:
            errors.append(exc)

    # The thread that entered the namespace ends right after: nothing else
    # ever runs in it.
    thread = threading.Thread(target=in_namespace, name="rtnl-netns")
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return result[0]


class Request(NamedTuple):
    """One request of a batch: message type, flags (NLM_F_REQUEST is added), body without
    the nlmsghdr; `encode_object`'s tuple is one. A tuple: a join makes 15,000, and a
    frozen dataclass's __init__ cost more than encoding them."""

    kind: int
    flags: int
    body: bytes


class RtnlSocket:
    """One raw NETLINK_ROUTE socket, used from the asyncio loop (or, `protocol=`, another
    netlink protocol with the same request/ack/dump rules: the WireGuard genetlink
    family, leaseagent.dataplane.wgnetlink)."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._seq = 0
        self._buf = bytearray(_RECV_SIZE)
        self._filtered: tuple[frozenset[int], bool] | None = None  # read_events' filter
        rcvbuf = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        # A queued ack costs ~ACK_TRUESIZE of the receive buffer; keep half free.
        self.chunk = max(16, min(MAX_CHUNK, rcvbuf // (2 * ACK_TRUESIZE)))

    @classmethod
    def open(cls, netns: str | None = None, *, groups: int = 0,
             rcvbuf: int = 4 * 1024 * 1024, protocol: int = NETLINK_ROUTE) -> RtnlSocket:
        sock = new_socket(netns, protocol)
        try:
            try:
                sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)
            except OSError:  # not CAP_NET_ADMIN: as much as rmem_max allows
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            sock.bind((0, groups))
        except BaseException:
            sock.close()
            raise
        return cls(sock)

    @property
    def port_id(self) -> int:
        return int(self._sock.getsockname()[0])

    def close(self) -> None:
        self._sock.close()

    def _next_seq(self) -> int:
        self._seq = self._seq % 0xFFFFFFF0 + 1
        return self._seq

    async def _recv(self) -> memoryview:
        """The next datagram (waits if none is queued yet)."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                n = self._sock.recv_into(self._buf)
            except BlockingIOError:
                n = await loop.sock_recv_into(self._sock, self._buf)
            if n:
                return memoryview(self._buf)[:n]

    def _recv_nowait(self) -> memoryview | None:
        try:
            n = self._sock.recv_into(self._buf)
        except BlockingIOError:
            return None
        return memoryview(self._buf)[:n]

    # -- requests ------------------------------------------------------------------

    async def batch(self, requests: Sequence[tuple[int, int, bytes]]) -> list[int]:
        """Send every request, in order; per request 0 or a positive errno.

        A request is sent without NLM_F_ACK: the kernel answers only a refusal (an
        NLMSG_ERROR with the request's sequence number). Each send ends with an
        NLMSG_NOOP that asks for an ack, which the kernel gives after every request
        before it was run, so once it is read every refusal has been; a request with
        no answer by then was done. If the kernel reports ENOBUFS (an answer lost),
        every request of that send without an answer gets ENOBUFS: a failure, never a
        silent success.
        """
        results: list[int] = []
        for first in range(0, len(requests), self.chunk):
            chunk = requests[first:first + self.chunk]
            parts = []
            seqs: dict[int, int] = {}
            pack = _HDR.pack
            seq = self._seq
            for i, (kind, flags, body) in enumerate(chunk):
                seq = seq % 0xFFFFFFF0 + 1
                seqs[seq] = i
                parts.append(pack(16 + len(body), kind, flags | NLM_F_REQUEST, seq, 0))
                parts.append(body)
            self._seq = seq
            end = self._next_seq()
            parts.append(_HDR.pack(16, NLMSG_NOOP, NLM_F_REQUEST | NLM_F_ACK, end, 0))
            answers: list[int] = [0] * len(chunk)
            answered = [False] * len(chunk)
            self._sock.send(b"".join(parts))
            lost = ended = False
            while not ended:
                data: memoryview | None
                try:
                    # After an overflow only what is still queued can come.
                    data = self._recv_nowait() if lost else await self._recv()
                except OSError as exc:
                    if exc.errno != errno.ENOBUFS:
                        raise
                    lost = True
                    continue
                if data is None:
                    break
                for kind, _flags, mseq, _pid, start, _end in messages(data):
                    if kind != NLMSG_ERROR:
                        continue
                    if mseq == end:
                        ended = True
                        continue
                    at = seqs.get(mseq)
                    if at is None or answered[at]:
                        continue
                    answers[at] = -_ERR.unpack_from(data, start)[0]
                    answered[at] = True
            if lost:
                answers = [a if done else errno.ENOBUFS for a, done in zip(answers, answered, strict=True)]
            results.extend(answers)
        return results

    def request_message(self, kind: int, body: bytes) -> tuple[int, bytes]:
        """(sequence number, bytes) of a plain request of `kind` (no dump, no ack asked)."""
        seq = self._next_seq()
        return seq, _HDR.pack(16 + len(body), kind, NLM_F_REQUEST, seq, 0) + body

    async def get(self, kind: int, body: bytes) -> bytes:
        """One request answered by one message (not a dump): the answer's body (from after
        the netlink header). OSError with the kernel's errno when it refuses (ENOENT: no
        such object)."""
        seq, message = self.request_message(kind, body)
        self._sock.send(message)
        while True:
            data = await self._recv()
            for mkind, _flags, mseq, _pid, start, end in messages(data):
                if mseq != seq:
                    continue
                if mkind == NLMSG_ERROR:
                    code = -_ERR.unpack_from(data, start)[0] or errno.EPROTO
                    raise OSError(code, os.strerror(code))
                return bytes(data[start:end])

    async def call(self, kind: int, flags: int, body: bytes) -> None:
        """One request (`batch`: the kernel answers a refusal only). OSError with the
        kernel's errno when it refuses."""
        code = (await self.batch([Request(kind, flags, body)]))[0]
        if code:
            raise OSError(code, os.strerror(code))

    async def scan(self, kind: int, body: bytes,
                   visit: Callable[[int, memoryview, int, int], None]) -> None:
        """A dump, each message handed to `visit(type, data, start, end)` (its body is
        data[start:end]) as its datagram arrives: nothing is kept but what `visit`
        keeps, and `data` is the socket's buffer, good only during the call.

        Raises OSError for a refused dump; InterruptedError when the kernel
        flags the dump as inconsistent (a table changed during it): what `visit`
        was told is then not a consistent view, and the caller starts again.
        """
        seq = self._next_seq()
        self._sock.send(_HDR.pack(16 + len(body), kind, NLM_F_REQUEST | NLM_F_DUMP, seq, 0)
                        + body)
        interrupted = False
        while True:
            data = await self._recv()
            for mkind, flags, mseq, _pid, start, end in messages(data):
                if mseq != seq:
                    continue
                if flags & NLM_F_DUMP_INTR:
                    interrupted = True
                if mkind == NLMSG_DONE:
                    if interrupted:
                        raise InterruptedError(errno.EINTR, "dump interrupted by a change")
                    return
                if mkind == NLMSG_ERROR:
                    code = -_ERR.unpack_from(data, start)[0]
                    if code:
                        raise OSError(code, os.strerror(code))
                    continue
                visit(mkind, data, start, end)

    async def dump(self, kind: int, body: bytes) -> list[tuple[int, bytes]]:
        """All messages of a dump as (type, message bytes from the body on); see `scan`."""
        out: list[tuple[int, bytes]] = []
        await self.scan(kind, body, lambda mkind, data, start, end: out.append(
            (mkind, bytes(data[start:end]))))
        return out

    # -- events --------------------------------------------------------------------

    async def read_events(self, ignore: frozenset[int], *, unsent_additions: bool = True
                          ) -> list[tuple[int, int, bytes]]:
        """Queued multicast messages as (type, sender port id, body), at least one.

        Messages sent because of requests of a port in `ignore` are dropped
        unparsed, and so are neighbour and FDB additions told with port id 0 (the
        kernel's own, and every FDB addition, whoever asked) unless `unsent_additions`:
        by a socket filter in the kernel (`event_filter`: a join's or a mass removal's
        thousands of echoes never wake the reader), and here again from the header.
        Raises OSError(ENOBUFS) when the queue overflowed.
        """
        if self._filtered != (ignore, unsent_additions):
            try:
                _attach_filter(self._sock, event_filter(ignore, unsent_additions=unsent_additions))
            except OSError:
                pass  # dropped here instead, as they come
            self._filtered = (ignore, unsent_additions)
        while True:
            out: list[tuple[int, int, bytes]] = []
            data: memoryview | None = await self._recv()
            for left in range(256, 0, -1):  # drain what is queued, bounded
                assert data is not None
                for kind, _flags, _seq, pid, start, end in messages(data):
                    if pid:
                        if pid in ignore:
                            continue
                    elif kind == RTM_NEWNEIGH and not unsent_additions:
                        continue
                    out.append((kind, pid, bytes(data[start:end])))
                if left == 1:
                    break
                data = self._recv_nowait()
                if data is None:
                    break
            if out:
                return out


def route_dump_request(family: int = socket.AF_UNSPEC) -> bytes:
    """A dump of one family's routes (AF_UNSPEC: every family's)."""
    return _RTMSG.pack(family, 0, 0, 0, 0, 0, 0, 0, 0)


def neighbour_dump_request(family: int) -> bytes:
    return _NDMSG.pack(family, 0, 0, 0, 0)


def neighbour_ifindex(data: bytes | memoryview, start: int = 0) -> int:
    return int(_NDMSG.unpack_from(data, start)[1])
