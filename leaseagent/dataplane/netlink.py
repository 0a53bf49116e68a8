"""The netlink adapter: every rtnetlink request of the data plane lives here.

Three raw sockets (leaseagent.dataplane.rtnl), opened inside a named network
namespace when `netns=` is given (the agent itself never changes namespace):

- `Netlink`'s link socket: links and addresses, the few, rare requests, one
  at a time, each waiting for its answer.
- `Netlink`'s raw socket: the hot paths. Routes,
  neighbours and FDB entries are replaced/removed in batches (many requests
  per send, acks collected after and matched by sequence number) and dumped
  with a parser that filters on fixed offsets before decoding anything.
- `NetlinkEvents`: a raw socket bound to the link, neighbour (both families
  and the FDB) and IPv4 and IPv6 route groups and used for nothing else.
  Each broadcast carries the netlink port id of the socket whose request
  caused it; `receive(ignore=...)` drops the echoes of our own requests
  (both request sockets' ids, `Netlink.port_ids`) from the header alone, so
  a batch of 15,000 changes costs the watcher almost nothing and is never
  mistaken for drift.

Errors: the kernel's refusals (`OSError` with its errno) are translated here
into `leaseagent.errors.DataPlaneError` (`raise ... from exc`). The kernel objects are the frozen
dataclasses of `leaseagent.core.plan`, IPv4 or IPv6 alike: every call takes
and returns both families (a dual-stack host has two vxlan devices and routes
in both tables).

Quirks of the kernel worth knowing (all checked on Linux 6.x):

- Deleting a missing route answers ESRCH, a missing neighbour/FDB entry
  ENOENT; `apply` treats both as success (the goal was "gone").
- A vxlan device keeps one remote per unicast MAC: RTM_NEWNEIGH with
  NLM_F_REPLACE on AF_BRIDGE replaces it; NLM_F_APPEND adds a remote only to
  the all-zeros or a multicast MAC, and to an existing unicast MAC answers 0
  and changes nothing (checked on Linux 6.18).
- A deleted device takes its routes with it without RTM_DELROUTE
  notifications; only RTM_DELLINK tells.
- An IPv6 route added without a metric gets 1024 (core.plan.Route says so).
- Every device gets an IPv6 link-local address unless IPv6 is off; it is the
  kernel's, and `device_state` leaves it out.
- An IPv6 address goes through duplicate address detection (about a second
  "tentative", unusable as a source) unless added with IFA_F_NODAD. The
  vxlan device's address is unique by lease, so it is added with NODAD.
- FDB notifications carry port id 0 whoever caused them.
- A running device can be renamed since Linux 6.2 (its routes, neighbours,
  FDB entries and, for vxlan, its socket stay); older kernels answer EBUSY,
  and `rename_link` then sets it down, renames it and sets it up again.
- Two vxlan devices of one family may have the same VNI only on different
  UDP ports (EEXIST otherwise), and a vxlan device's port cannot be changed.
- A receive queue overflow (ENOBUFS) loses messages: the event socket is
  then reopened by its user and a full resync finds what was missed.

Performance: `apply` sends its requests in batches (rtnl), not one request
and reply per object (figures: docs/benchmarks.md). A full sync reads
the tables with `scan_*`: each entry is told to the caller by its identity as
its datagram arrives, and only an entry the caller does not know becomes an
object, so comparing 15,000 entries with a plan makes no objects and keeps no
dump (`routes`/`neighbours`/`fdb` return all of them, for doctor and tests).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from enum import Enum
from ipaddress import (
    IPv4Interface,
    IPv6Interface,
    ip_interface,
)
from typing import NamedTuple, TypeVar

from leaseagent.core.network import Address
from leaseagent.core.plan import (
    MAIN_TABLE,
    DeviceState,
    Fdb,
    HostRoute,
    Ident,
    Interface,
    KernelObject,
    Neighbour,
    Route,
    VxlanAttrs,
)
from leaseagent.core.profiles import vxlan as vxlan_profile
from leaseagent.dataplane import rtnl
from leaseagent.dataplane.rtnl import RtnlSocket
from leaseagent.errors import DataPlaneError

log = logging.getLogger("leaseagent.dataplane")

AF_BRIDGE = 7
NUD_PERMANENT = 0x80
NTF_SELF = 0x02
IFF_UP = 0x1
RTN_UNICAST = 1
RT_SCOPE_UNIVERSE = 0
IFA_F_NODAD, IFA_F_DADFAILED, IFA_F_DEPRECATED, IFA_F_TENTATIVE = 0x02, 0x08, 0x20, 0x40
_FAMILIES = (socket.AF_INET, socket.AF_INET6)
_GONE = (errno.ENOENT, errno.ESRCH)
# Broadcasts of others' changes (and of FDB changes, whoever made them) must
# not overflow the event socket; SO_RCVBUFFORCE lifts net.core.rmem_max (root).
_EVENT_RCVBUF = 8 * 1024 * 1024
# The link socket reads one answer or one dump at a time, as it streams.
_LINKS_RCVBUF = 256 * 1024


def _error(what: str, exc: BaseException) -> DataPlaneError:
    return DataPlaneError(f"{what}: {exc}")


class DumpInterrupted(DataPlaneError):
    """A table changed while it was dumped: what was read is not one consistent view."""


# Asked a dumped object's identity (core.plan's `_ident`): whether the reader already
# knows it (so it needs no object made), e.g. a full sync's plan.
Known = Callable[[Ident], bool]


def nothing_known(_ident: Ident) -> bool:
    return False


DUMP_ATTEMPTS = 5
T = TypeVar("T")


async def read_again(read: Callable[[], Awaitable[T]]) -> T:
    """`read()`, again while a table changes under its dumps (DUMP_ATTEMPTS at most)."""
    for _ in range(DUMP_ATTEMPTS - 1):
        try:
            return await read()
        except DumpInterrupted:
            continue
    return await read()


@dataclass(frozen=True)
class Addr:
    """An address of an interface, with what tells whether it can be used."""

    index: int
    interface: Interface
    scope: int  # RT_SCOPE_UNIVERSE (global), RT_SCOPE_LINK (253), ...
    flags: int  # IFA_F_*

    @property
    def usable(self) -> bool:
        """Neither still in duplicate address detection, nor failed it, nor deprecated."""
        return not self.flags & (IFA_F_TENTATIVE | IFA_F_DADFAILED | IFA_F_DEPRECATED)

    @property
    def is_ipv6_link_local(self) -> bool:
        return self.interface.version == 6 and self.interface.ip.is_link_local


@dataclass(frozen=True)
class Link:
    index: int
    name: str
    kind: str | None
    mtu: int
    address: str | None
    up: bool
    vxlan: VxlanAttrs | None = None


class Action(Enum):
    REPLACE = "replace"
    REMOVE = "remove"


@dataclass(frozen=True)
class Failure:
    action: Action
    obj: KernelObject
    error: DataPlaneError


class NetlinkEvent(NamedTuple):
    """One change the kernel broadcast; only the fields the data plane looks at (a
    tuple: a mass removal's echoes are thousands, and a frozen dataclass's __init__
    cost a third of decoding one)."""

    kind: str  # "link" | "route" | "neighbour" | "fdb" | "other"
    deleted: bool
    ifindex: int
    sender: int  # netlink port id of the requesting socket; 0 if the kernel did it
    ifname: str | None = None
    up: bool | None = None
    protocol: int | None = None
    table: int | None = None
    obj: KernelObject | None = None  # the route/neighbour/FDB entry, as core.plan models it
    # A route event as a route or address of the host (rtnl.host_route): whoever made it.
    host_route: HostRoute | None = None


def _link(m: rtnl.LinkMessage) -> Link:
    return Link(index=m.index, name=str(m.name), kind=m.kind, mtu=m.mtu, address=m.address,
                up=bool(m.flags & IFF_UP), vxlan=m.vxlan)


class WholeTables:
    """What a kernel adapter builds from its own readers, the same for the real adapter
    and the fake: whole tables as sets from the `scan_*` readers (each read again while
    the table changes under it), and a device's state from its link and addresses."""

    async def scan_routes(self, known: Known, *, protocol: int,
                          family: int = socket.AF_UNSPEC,
                          others: Callable[[HostRoute], None] | None = None) -> list[Route]:
        raise NotImplementedError

    async def scan_neighbours(self, known: Known, ifindex: int, *,
                              family: int = socket.AF_UNSPEC) -> list[Neighbour]:
        raise NotImplementedError

    async def scan_fdb(self, known: Known, ifindex: int, *, own_mac: str | None = None
                       ) -> list[Fdb]:
        raise NotImplementedError

    async def routes(self, *, protocol: int, family: int = socket.AF_UNSPEC) -> set[Route]:
        """Every route `scan_routes` reads."""
        return set(await read_again(lambda: self.scan_routes(
            nothing_known, protocol=protocol, family=family)))

    async def neighbours(self, ifindex: int, *, family: int = socket.AF_UNSPEC
                         ) -> set[Neighbour]:
        """Every entry `scan_neighbours` reads."""
        return set(await read_again(lambda: self.scan_neighbours(
            nothing_known, ifindex, family=family)))

    async def fdb(self, ifindex: int, *, own_mac: str | None = None) -> set[Fdb]:
        """Every entry `scan_fdb` reads."""
        return set(await read_again(lambda: self.scan_fdb(
            nothing_known, ifindex, own_mac=own_mac)))

    async def link_by_name(self, name: str) -> Link | None:
        raise NotImplementedError

    async def addresses(self, family: int = socket.AF_UNSPEC, *, index: int | None = None
                        ) -> list[Addr]:
        raise NotImplementedError

    async def device_state(self, name: str) -> DeviceState | None:
        """The device `name` with its addresses of both families but IPv6 link-local
        ones (the kernel's own), or None if there is none."""
        link = await self.link_by_name(name)
        if link is None:
            return None
        addresses = tuple(a.interface for a in await self.addresses(index=link.index)
                          if not a.is_ipv6_link_local)
        return DeviceState(name=link.name, index=link.index, kind=link.kind, up=link.up,
                           mac=(link.address or "").lower() or None, mtu=link.mtu,
                           addresses=addresses, vxlan=link.vxlan)


class Netlink(WholeTables):
    """Request sockets of one network namespace (None: the agent's own)."""

    def __init__(self, links: RtnlSocket, raw: RtnlSocket, netns: str | None) -> None:
        self._links = links
        # The rare requests take turns on their own socket (one reply read at a time).
        self._turn = asyncio.Lock()
        self._raw = raw
        self.netns = netns

    @classmethod
    async def open(cls, netns: str | None = None) -> Netlink:
        where = f" in netns {netns}" if netns else ""
        try:
            links = RtnlSocket.open(netns, rcvbuf=_LINKS_RCVBUF)
        except OSError as exc:
            raise _error(f"cannot open an rtnetlink socket{where}", exc) from exc
        try:
            raw = RtnlSocket.open(netns)
        except OSError as exc:
            links.close()
            raise _error(f"cannot open a raw rtnetlink socket{where}", exc) from exc
        return cls(links, raw, netns)

    @property
    def port_ids(self) -> frozenset[int]:
        """The netlink port ids the kernel puts in notifications our requests cause."""
        return frozenset({self._links.port_id, self._raw.port_id})

    def close(self) -> None:
        self._links.close()
        self._raw.close()

    async def events(self) -> NetlinkEvents:
        """A new subscription to this namespace's broadcasts (NetlinkEvents)."""
        return await NetlinkEvents.open(self.netns)

    async def _call(self, kind: int, flags: int, body: bytes) -> None:
        async with self._turn:
            await self._links.call(kind, flags, body)

    async def _get(self, kind: int, body: bytes) -> bytes:
        async with self._turn:
            return await self._links.get(kind, body)

    async def _dump(self, kind: int, body: bytes) -> list[tuple[int, bytes]]:
        """A whole dump of links, addresses or routes; again while it is interrupted by a
        change (DUMP_ATTEMPTS), and the last one taken as it is."""
        async with self._turn:
            for _ in range(DUMP_ATTEMPTS - 1):
                try:
                    return await self._links.dump(kind, body)
                except InterruptedError:
                    continue
            out: list[tuple[int, bytes]] = []
            try:
                await self._links.scan(kind, body, lambda mkind, data, start, end: out.append(
                    (mkind, bytes(data[start:end]))))
            except InterruptedError:
                pass
            return out

    # -- links ---------------------------------------------------------------

    async def links(self) -> list[Link]:
        try:
            msgs = await self._dump(rtnl.RTM_GETLINK, rtnl.link_request())
        except OSError as exc:
            raise _error("cannot list links", exc) from exc
        return [_link(rtnl.decode_link_message(m, 0, len(m))) for _, m in msgs]

    async def link_by_name(self, name: str) -> Link | None:
        return await self._link_get(name, rtnl.link_request(name=name))

    async def link_by_index(self, index: int) -> Link | None:
        return await self._link_get(str(index), rtnl.link_request(index=index))

    async def _link_get(self, label: str, body: bytes) -> Link | None:
        """The link `body` names, or None when there is no such link."""
        try:
            m = await self._get(rtnl.RTM_GETLINK, body)
        except OSError as exc:
            if exc.errno in (errno.ENODEV, errno.ENOENT):
                return None
            raise _error(f"cannot read link {label}", exc) from exc
        return _link(rtnl.decode_link_message(m, 0, len(m)))


    async def create_vxlan(
        self,
        name: str,
        *,
        vni: int,
        port: int,
        local: Address,
        link: int,
        mtu: int,
        mac: str,
        flags: frozenset[str] = frozenset(),
    ) -> Link:
        """A vxlan device whose VTEP is `local`, an IPv4 or an IPv6 address (the
        outer header's family: IFLA_VXLAN_LOCAL or IFLA_VXLAN_LOCAL6)."""
        data = rtnl.vxlan_data(VxlanAttrs(vni=vni, port=port, local=local, link=link,
                                          flags=flags))
        try:
            await self._call(rtnl.RTM_NEWLINK, rtnl.NLM_F_CREATE | rtnl.NLM_F_EXCL,
                             rtnl.link_request(name=name, mtu=mtu, mac=mac, kind=vxlan_profile.DEVICE_KIND,
                                               data=data))
        except OSError as exc:
            raise _error(f"cannot create vxlan device {name} (VNI {vni}, local {local})", exc) \
                from exc
        created = await self.link_by_name(name)
        if created is None:
            raise DataPlaneError(f"vxlan device {name} vanished right after it was created")
        return created

    async def create_link(self, name: str, kind: str) -> None:
        """A link of `kind` with no settings of its own (a WireGuard device); EOPNOTSUPP
        when the kernel has no such kind."""
        try:
            await self._call(rtnl.RTM_NEWLINK, rtnl.NLM_F_CREATE | rtnl.NLM_F_EXCL,
                             rtnl.link_request(name=name, kind=kind))
        except OSError as exc:
            raise _error(f"cannot create {kind} device {name}", exc) from exc

    async def delete_link(self, index: int) -> None:
        try:
            await self._call(rtnl.RTM_DELLINK, 0, rtnl.link_request(index=index))
        except OSError as exc:
            if exc.errno not in (errno.ENODEV, errno.ENOENT):
                raise _error(f"cannot delete link {index}", exc) from exc

    async def rename_link(self, index: int, name: str) -> None:
        """Give link `index` the name `name`, running (Linux 6.2 and later); a kernel
        that refuses to rename a running device (EBUSY) has it set down for the rename,
        a moment without it, and up again."""
        request = rtnl.link_request(index=index, name=name)
        try:
            await self._call(rtnl.RTM_NEWLINK, 0, request)
            return
        except OSError as exc:
            if exc.errno != errno.EBUSY:
                raise _error(f"cannot rename link {index} to {name}", exc) from exc
        log.warning("this kernel renames only a device that is down: link %d is set down to "
                    "be renamed %s", index, name)
        await self.set_link(index, up=False)
        try:
            await self._call(rtnl.RTM_NEWLINK, 0, request)
        except OSError as exc:
            raise _error(f"cannot rename link {index} to {name}", exc) from exc
        finally:
            await self.set_link(index, up=True)

    async def set_link(self, index: int, *, mtu: int | None = None, up: bool | None = None,
                       mac: str | None = None) -> None:
        try:
            await self._call(rtnl.RTM_NEWLINK, 0,
                             rtnl.link_request(index=index, mtu=mtu, mac=mac, up=up))
        except OSError as exc:
            spec = {k: v for k, v in (("mtu", mtu), ("address", mac), ("up", up))
                    if v is not None}
            raise _error(f"cannot set {spec} on link {index}", exc) from exc

    # -- addresses and routes that are not ours -------------------------------

    async def addresses(self, family: int = socket.AF_UNSPEC, *, index: int | None = None
                        ) -> list[Addr]:
        """Every address of `family` (AF_UNSPEC: both), or those of one link."""
        try:
            msgs = await self._dump(rtnl.RTM_GETADDR, rtnl.address_dump_request(family))
        except OSError as exc:
            raise _error("cannot list addresses", exc) from exc
        out = []
        for _, m in msgs:
            if m[0] not in _FAMILIES:
                continue
            at, prefixlen, scope, flags, ip = rtnl.decode_address(m, 0, len(m))
            if ip is None or (index is not None and at != index):
                continue
            out.append(Addr(at, ip_interface((ip, prefixlen)), scope, flags))
        return out

    async def ipv4_addresses(self, index: int | None = None) -> list[tuple[int, IPv4Interface]]:
        """(ifindex, address/prefix) of every IPv4 address, or those of one link."""
        return [(a.index, a.interface) for a in await self.addresses(socket.AF_INET, index=index)
                if isinstance(a.interface, IPv4Interface)]

    async def add_address(self, index: int, address: Interface) -> None:
        """Add (or keep) `address`; an IPv6 one without duplicate address detection
        (see the module docstring)."""
        flags = IFA_F_NODAD if isinstance(address, IPv6Interface) else 0
        try:
            await self._call(rtnl.RTM_NEWADDR, rtnl.NLM_F_CREATE | rtnl.NLM_F_REPLACE,
                             rtnl.address_request(index, address, flags=flags))
        except OSError as exc:
            raise _error(f"cannot add address {address} to link {index}", exc) from exc

    async def delete_address(self, index: int, address: Interface) -> None:
        try:
            await self._call(rtnl.RTM_DELADDR, 0, rtnl.address_request(index, address))
        except OSError as exc:
            if exc.errno not in (errno.EADDRNOTAVAIL, errno.ENOENT, errno.ENODEV):
                raise _error(f"cannot remove address {address} from link {index}", exc) \
                    from exc

    async def default_route_ifindex(self) -> int | None:
        """The output interface of the IPv4 default route in the main table, if any."""
        try:
            msgs = await self._dump(rtnl.RTM_GETROUTE, rtnl.route_dump_request(socket.AF_INET))
        except OSError as exc:
            raise _error("cannot read the routing table", exc) from exc
        for _, m in msgs:
            table, dst_len, oif, _ = rtnl.route_output(m, 0, len(m))
            if dst_len == 0 and table == MAIN_TABLE and oif:
                return oif
        return None

    async def route_to(self, destination: Address) -> tuple[int, Address | None] | None:
        """The output interface and preferred source address the kernel picks for
        `destination` (`ip route get`), or None if it has no route to it."""
        try:
            m = await self._get(rtnl.RTM_GETROUTE, rtnl.route_get_request(destination))
        except OSError as exc:
            if exc.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH):
                return None
            raise _error(f"cannot look up the route to {destination}", exc) from exc
        _, _, oif, src = rtnl.route_output(m, 0, len(m))
        return (oif, src) if oif else None

    # -- the objects we own ----------------------------------------------------

    async def _scan(self, kind: int, body: bytes, what: str,
                    visit: Callable[[int, memoryview, int, int], None]) -> None:
        try:
            await self._raw.scan(kind, body, visit)
        except InterruptedError as exc:
            raise DumpInterrupted(f"cannot dump {what}: a table changed during the dump") \
                from exc
        except OSError as exc:
            raise _error(f"cannot dump {what}", exc) from exc

    async def scan_routes(self, known: Known, *, protocol: int,
                          family: int = socket.AF_UNSPEC,
                          others: Callable[[HostRoute], None] | None = None) -> list[Route]:
        """Unicast routes of the main table carrying `protocol`, of one family or
        (AF_UNSPEC) both, read as a full sync wants them: `known` is asked each one's
        identity (core.plan.route_ident) and only those it does not know are decoded
        and returned. `others` is handed, from the same dump, every other route of the
        main table and every address of this host (rtnl.host_route): what a peer's
        subnet must not take over. DumpInterrupted: read again."""
        wanted = _FAMILIES if family == socket.AF_UNSPEC else (family,)
        unknown: list[Route] = []

        def visit(_kind: int, data: memoryview, start: int, end: int) -> None:
            if data[start + 5] != protocol or data[start] not in wanted:
                if others is not None and data[start] in wanted:
                    host = rtnl.host_route(data, start, end)
                    if host is not None:
                        others(host)
                return
            ident, table = rtnl.route_identity(data, start, end)
            if ident is None or table != MAIN_TABLE or known(ident):
                return
            route = rtnl.decode_route(data, start, end)[0]
            assert route is not None
            unknown.append(route)

        await self._scan(rtnl.RTM_GETROUTE, rtnl.route_dump_request(family), "routes", visit)
        return unknown

    async def scan_neighbours(self, known: Known, ifindex: int, *,
                              family: int = socket.AF_UNSPEC) -> list[Neighbour]:
        """Permanent neighbour entries of one device (others are the kernel's), of one
        family (ARP: AF_INET, NDP: AF_INET6) or (AF_UNSPEC) both; those `known` does not
        know (see `scan_routes`)."""
        return await self._scan_entries(
            known, ifindex, family, f"neighbours of link {ifindex}",
            lambda n: n.family in _FAMILIES and bool(n.state & NUD_PERMANENT),
            lambda n: Neighbour(ifindex, n.dst, n.lladdr))  # type: ignore[arg-type]

    async def scan_fdb(self, known: Known, ifindex: int, *, own_mac: str | None = None
                       ) -> list[Fdb]:
        """Permanent, self, unicast FDB entries of one vxlan device (an IPv4 or an IPv6
        remote, as the device's own family; the all-zeros default entries are not ours);
        those `known` does not know (see `scan_routes`)."""
        return await self._scan_entries(
            known, ifindex, AF_BRIDGE, f"FDB of link {ifindex}",
            lambda n: (n.family == AF_BRIDGE and bool(n.state & NUD_PERMANENT)
                       and bool(n.flags & NTF_SELF) and n.lladdr != own_mac),
            lambda n: Fdb(ifindex, n.lladdr, n.dst))  # type: ignore[arg-type]

    async def _scan_entries(self, known: Known, ifindex: int, family: int, what: str,
                            ours: Callable[[rtnl.RawNeighbour], bool],
                            make: Callable[[rtnl.RawNeighbour], T]) -> list[T]:
        """A neighbour-table dump (`family`; AF_BRIDGE: the FDB) of one device: the
        entries `ours` accepts (judged on their header and MAC) and `known` does not
        know, each decoded and made an object by `make`."""
        unknown: list[T] = []

        def visit(_kind: int, data: memoryview, start: int, end: int) -> None:
            if rtnl.neighbour_ifindex(data, start) != ifindex:
                return
            n, ident = rtnl.neighbour_identity(data, start, end)
            if ident is None or not ours(n) or known(ident):
                return
            unknown.append(make(rtnl.decode_neighbour(data, start, end)))

        await self._scan(rtnl.RTM_GETNEIGH, rtnl.neighbour_dump_request(family), what, visit)
        return unknown

    async def apply(
        self, action: Action, objects: Sequence[KernelObject], *, protocol: int
    ) -> tuple[list[KernelObject], list[Failure]]:
        """Replace or remove each object, in order; return (done, failures).

        All requests go out batched (rtnl.RtnlSocket.batch); the kernel runs
        them in this order. Never raises for one object: a refusal is a
        Failure and the rest go on.
        """
        remove = action is Action.REMOVE
        # Encoded a send's worth at a time: all of a join's requests made at once would
        # raise its peak memory, which the allocator keeps after.
        step = self._raw.chunk
        codes: list[int] = []
        try:
            for first in range(0, len(objects), step):
                codes += await self._raw.batch([
                    rtnl.encode_object(obj, remove=remove, protocol=protocol)
                    for obj in objects[first:first + step]
                ])
        except OSError as exc:
            error = _error(f"{action.value} of {len(objects)} objects", exc)
            return [], [Failure(action, obj, error) for obj in objects]
        return outcomes(action, objects, codes)

    async def move(self, pairs: Sequence[tuple[KernelObject, KernelObject]], *, protocol: int
                   ) -> tuple[list[KernelObject], list[Failure]]:
        step = max(1, self._raw.chunk // 2)  # a pair never split over two sends
        codes: list[int] = []
        try:
            for first in range(0, len(pairs), step):
                codes += await self._raw.batch([
                    rtnl.encode_object(obj, remove=remove, protocol=protocol)
                    for old, new in pairs[first:first + step]
                    for obj, remove in ((old, True), (new, False))])
        except OSError as exc:
            error = _error(f"move of {len(pairs)} objects", exc)
            return [], [Failure(Action.REPLACE, new, error) for _, new in pairs]
        return moved(pairs, codes)


def moved(pairs: Sequence[tuple[KernelObject, KernelObject]], codes: Sequence[int]
          ) -> tuple[list[KernelObject], list[Failure]]:
    """`move`'s result from the kernel's answer to each request (removal, replace, ...)."""
    _, refused = outcomes(Action.REMOVE, [old for old, _ in pairs], codes[0::2])
    done, failures = outcomes(Action.REPLACE, [new for _, new in pairs], codes[1::2])
    return done, refused + failures


def outcomes(action: Action, objects: Iterable[KernelObject], codes: Iterable[int]
             ) -> tuple[list[KernelObject], list[Failure]]:
    """`apply`'s result from the kernel's answer to each request (an errno, 0: done):
    a removal of what is not there (ENOENT, ESRCH) is done too. Every adapter of the
    kernel port (kernelport) answers so."""
    remove = action is Action.REMOVE
    done: list[KernelObject] = []
    failures: list[Failure] = []
    for obj, code in zip(objects, codes, strict=True):
        if code == 0 or (remove and code in _GONE):
            done.append(obj)
        else:
            failures.append(Failure(
                action, obj, DataPlaneError(f"{action.value} {obj}: {os.strerror(code)}")))
    return done, failures


def _neighbour_event(kind: int, body: bytes, sender: int) -> NetlinkEvent:
    deleted = kind == rtnl.RTM_DELNEIGH
    family, ifindex, _state, _flags, dst, lladdr = rtnl.decode_neighbour(body, 0, len(body))
    if family == AF_BRIDGE:
        obj: KernelObject | None = Fdb(ifindex, lladdr, dst) if dst is not None and lladdr else None
        return NetlinkEvent("fdb", deleted, ifindex, sender, None, None, None, None, obj)
    if family not in _FAMILIES:
        return NetlinkEvent("other", deleted, 0, sender)
    obj = Neighbour(ifindex, dst, lladdr) if dst is not None else None
    return NetlinkEvent("neighbour", deleted, ifindex, sender, None, None, None, None, obj)


_NEIGHBOUR_KINDS = frozenset((rtnl.RTM_NEWNEIGH, rtnl.RTM_DELNEIGH))


def event_from_message(kind: int, sender: int, body: bytes) -> NetlinkEvent:
    """A NetlinkEvent from one raw rtnetlink broadcast (body without nlmsghdr)."""
    if kind in _NEIGHBOUR_KINDS:  # the most of them: a mass removal's echoes
        return _neighbour_event(kind, body, sender)
    if kind in (rtnl.RTM_NEWLINK, rtnl.RTM_DELLINK):
        index, flags, name = rtnl.decode_link(body, 0, len(body))
        return NetlinkEvent("link", kind == rtnl.RTM_DELLINK, index, sender,
                            ifname=name, up=bool(flags & IFF_UP))
    if kind in (rtnl.RTM_NEWROUTE, rtnl.RTM_DELROUTE):
        deleted = kind == rtnl.RTM_DELROUTE
        if body[0] not in _FAMILIES:
            return NetlinkEvent("other", deleted, 0, sender)
        route, protocol, table = rtnl.decode_route(body, 0, len(body))
        return NetlinkEvent("route", deleted, route.ifindex if route else 0, sender,
                            protocol=protocol, table=table, obj=route,
                            host_route=rtnl.host_route(body, 0, len(body)))
    return NetlinkEvent("other", False, 0, sender)


class NetlinkEvents:
    """A socket subscribed to link, neighbour (both families, and FDB) and IPv4 and IPv6
    route broadcasts."""

    def __init__(self, raw: RtnlSocket) -> None:
        self._raw = raw

    @classmethod
    async def open(cls, netns: str | None = None) -> NetlinkEvents:
        try:
            raw = RtnlSocket.open(
                netns, groups=(rtnl.RTMGRP_LINK | rtnl.RTMGRP_NEIGH | rtnl.RTMGRP_IPV4_ROUTE
                               | rtnl.RTMGRP_IPV6_ROUTE),
                rcvbuf=_EVENT_RCVBUF)
        except OSError as exc:
            raise _error("cannot subscribe to rtnetlink events", exc) from exc
        return cls(raw)

    async def receive(self, *, ignore: frozenset[int] = frozenset(),
                      unsent_additions: bool = True) -> list[NetlinkEvent]:
        """The next batch of events (one or more) not caused by a port in `ignore`;
        without neighbour and FDB additions told with port id 0 (dropped unparsed)
        unless `unsent_additions` (kernelport.KernelEvents).

        Raises DataPlaneError when the socket is broken (e.g. overflowed):
        close it and open a new one."""
        try:
            raw = await self._raw.read_events(ignore, unsent_additions=unsent_additions)
        except OSError as exc:
            raise _error("rtnetlink event socket failed", exc) from exc
        return [event_from_message(kind, sender, body) for kind, sender, body in raw]

    def close(self) -> None:
        self._raw.close()


def objects_by_kind(objects: Iterable[KernelObject]) -> dict[str, int]:
    """Count objects per kind ("route", "neighbour", "fdb") for metrics."""
    counts: dict[str, int] = {}
    for obj in objects:
        counts[obj.kind] = counts.get(obj.kind, 0) + 1
    return counts
