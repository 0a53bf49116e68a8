"""An in-memory kernel behind the kernel port (leaseagent.dataplane.kernelport).

`FakeKernel` is one network namespace: links, addresses, the main routing
table, neighbour entries and vxlan FDB entries, and the broadcasts their
changes cause. `FakeNetlink` is a request socket on it (what `Netlink` is on
the real kernel), with its own port id; `FakeEvents` a subscription. It
behaves as the real kernel does where the data plane can tell (checked by
tests/contract/test_reconciler_contract.py, which runs one suite on both):

- routes are keyed by (family, dst, metric), neighbour entries by (device,
  address), FDB entries by (device, MAC) (a unicast MAC has one remote): a
  replace overwrites the entry of that key; NLM_F_EXCL on an existing key
  answers EEXIST; an FDB append to an existing MAC answers 0 and changes
  nothing;
- deleting what is not there answers ESRCH (a route) or ENOENT (a neighbour or
  FDB entry), which `apply` counts as done, as netlink.outcomes says; a link
  of an existing name answers EEXIST, and so does a vxlan device of a VNI
  another one of its family already has on its UDP port; a running link can
  be renamed (Linux 6.2 and later), to a name no other link has (EEXIST);
- a route through a missing device answers ENODEV, through a down device
  (IPv4) ENETDOWN, via a gateway not on the device's networks (without
  onlink) ENETUNREACH (IPv4) or EHOSTUNREACH (IPv6); an IPv6 onlink route
  whose gateway's best route (the default one aside) is on another device
  EINVAL (so is one replacing, on a new device, a route holding its gateway); an FDB entry on a device
  that is not a vxlan device EOPNOTSUPP;
- a device going down takes its routes with it, a deleted device its routes,
  addresses and entries, without a route notification (only the link's);
- every change is broadcast with the port id of the socket that asked for it;
  FDB changes and neighbour deletions with port id 0, the deleted
  neighbour's notification without its MAC;
- a subscription that holds EVENT_QUEUE_LIMIT unread broadcasts overflows:
  its next receive fails (ENOBUFS), as the real socket's does;
- a dump yields to the event loop every DUMP_CHUNK entries, and a table
  changed meanwhile makes it fail with DumpInterrupted (NLM_F_DUMP_INTR);
  `interrupt_dumps(n)` makes the next n dumps fail so, for tests.

Errors are the real adapter's: DataPlaneError (DumpInterrupted), and
`apply`'s Failures through netlink.outcomes.

A data plane on it, as a test or a simulation builds one (no root, no
namespace)::

    kernel = FakeKernel()
    host = kernel.underlay("eth0", "10.99.0.1/24")          # a HostInfo
    settings = DataPlaneSettings(network=config, host=host, state_dir=tmp,
                                 kernel=kernel.open)
    backend = VxlanBackend(settings)                          # or HostGwBackend
    await backend.prepare(); await backend.start(own_subnet); await backend.sync(peers)

An agent takes it through its backend constructors (Agent's `backends`,
e.g. ``{"vxlan": lambda s: VxlanBackend(replace(s, kernel=kernel.open))}``)
and the pre-resolved HostInfo. Many hosts in one process: give every
FakeKernel one `intern` dict, so the hosts' equal objects (the same peers
planned on devices of the same index) are held once; a kernel then keeps one
dict entry per object.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import os
import socket
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from ipaddress import IPv4Address, IPv4Interface, IPv6Address, ip_interface
from typing import TYPE_CHECKING, Any

from leaseagent.core.network import Address
from leaseagent.core.plan import (
    MAIN_TABLE,
    RT_SCOPE_LINK,
    RT_SCOPE_UNIVERSE,
    Fdb,
    HostRoute,
    Interface,
    KernelObject,
    Neighbour,
    Route,
    VxlanAttrs,
)
from leaseagent.core.profiles import vxlan as vxlan_profile
from leaseagent.core.profiles import wireguard as wireguard_profile
from leaseagent.dataplane.base import HostInfo
from leaseagent.dataplane.netlink import (
    Action,
    Addr,
    DumpInterrupted,
    Failure,
    Known,
    Link,
    NetlinkEvent,
    WholeTables,
    moved,
    outcomes,
)
from leaseagent.errors import DataPlaneError

if TYPE_CHECKING:
    from leaseagent.dataplane.kernelport import KernelOpener

DUMP_CHUNK = 256  # entries a dump reads between two yields to the event loop
# Broadcasts a subscription holds unread before it overflows (the real socket's
# receive buffer): then it fails with ENOBUFS, as NetlinkEvents does, and its user
# opens another and makes a full pass.
EVENT_QUEUE_LIMIT = 65536
KERNEL_PROTOCOL = 2  # RTPROT_KERNEL: a connected route of an address
_FAMILY = {4: socket.AF_INET, 6: socket.AF_INET6}
_ports = itertools.count(1_000_000)  # port ids of fake sockets (never 0: the kernel's)


def _netlink_error(code: int) -> str:
    """What the kernel's refusal says as an OSError (the real adapter's messages carry it)."""
    return str(OSError(code, os.strerror(code)))


class _Link:
    __slots__ = ("index", "kind", "mac", "mtu", "name", "up", "vxlan")

    def __init__(self, index: int, name: str, kind: str | None, mtu: int, mac: str | None,
                 up: bool, vxlan: VxlanAttrs | None) -> None:
        self.index, self.name, self.kind, self.mtu = index, name, kind, mtu
        self.mac, self.up, self.vxlan = mac, up, vxlan

    def public(self) -> Link:
        return Link(self.index, self.name, self.kind, self.mtu, self.mac, self.up, self.vxlan)


def _route_key(route: Route) -> tuple[int, int, int, int]:
    ident = route._ident
    return ident[1], ident[2], ident[3], ident[7]  # type: ignore[return-value]


def _neighbour_key(neighbour: Neighbour) -> tuple[int, int, int]:
    ident = neighbour._ident
    return ident[2], ident[1], ident[3]  # type: ignore[return-value]


def _host_route(route: Route) -> HostRoute:
    """The route as a route of the host (rtnl.host_route of its notification)."""
    return HostRoute(route.dst, connected=route.gateway is None and route.scope == RT_SCOPE_LINK,
                     ifindex=route.ifindex, gateway=route.gateway)


class FakeKernel:
    """One network namespace in memory (see the module docstring)."""

    def __init__(self, name: str | None = None, *, intern: dict[Any, Any] | None = None,
                 route_protocol: int = 76) -> None:
        self.name = name
        self._intern = intern
        self._indexes = itertools.count(1)
        self._links: dict[int, _Link] = {}
        self._names: dict[str, int] = {}
        self._addresses: dict[int, list[Addr]] = {}
        # The main table by (version, dst, prefixlen, metric); the protocol of a route
        # only when it is not `route_protocol` (the agent's: nearly every route).
        self._routes: dict[tuple[int, int, int, int], Route] = {}
        self._route_protocol = route_protocol
        self._protocols: dict[tuple[int, int, int, int], int] = {}
        self._neighbours: dict[tuple[int, int, int], Neighbour] = {}
        self._fdb: dict[tuple[int, str], Fdb] = {}  # by device and MAC
        self._subscribers: list[FakeEvents] = []
        self._generation = 0  # changes of the tables, for dumps
        self._interrupts = 0
        self.requests = 0  # how many objects were asked for (apply), for tests and figures
        self._add_link("lo", None, 65536, "00:00:00:00:00:00", up=True)

    # -- set-up, as the host and its administrator have it --------------------

    async def open(self, netns: str | None = None) -> FakeNetlink:
        """A request socket on this namespace: a `KernelOpener` (DataPlaneSettings.kernel)."""
        if netns is not None and self.name is not None and netns != self.name:
            raise DataPlaneError(f"cannot open an rtnetlink socket in netns {netns}: "
                                 f"{_netlink_error(errno.ENOENT)}")
        return FakeNetlink(self)

    def socket(self) -> FakeNetlink:
        """A request socket of someone else (a test's hand on the kernel)."""
        return FakeNetlink(self)

    def underlay(self, name: str, *addresses: str, mtu: int = 1500) -> HostInfo:
        """An up interface with `addresses` (and their connected routes), as HostInfo
        with the first IPv4 one as PublicIP and the first IPv6 one as PublicIPv6."""
        link = self._add_link(name, "veth", mtu, f"02:ff:00:00:00:{len(self._links):02x}",
                              up=True)
        interfaces = [ip_interface(a) for a in addresses]
        for interface in interfaces:
            self._add_address(link.index, interface)
        v4 = [i.ip for i in interfaces if isinstance(i.ip, IPv4Address)]
        v6 = [i.ip for i in interfaces if isinstance(i.ip, IPv6Address)]
        return HostInfo(public_ip=v4[0], iface=name, iface_index=link.index, iface_mtu=mtu,
                        public_ipv6=v6[0] if v6 else None, underlay=tuple(interfaces))

    def interrupt_dumps(self, count: int = 1) -> None:
        """The next `count` dumps fail as one whose table changed under it."""
        self._interrupts += count

    def add_host_route(self, route: Route, protocol: int) -> None:
        """A route of someone else (another protocol), as `ip route replace` makes it."""
        key = self._store_route(route)
        self._protocols[key] = protocol
        self._changed()
        self._broadcast(lambda: NetlinkEvent("route", False, route.ifindex, 0, protocol=protocol,
                                             table=MAIN_TABLE, obj=route,
                                             host_route=_host_route(route)))

    # -- what a dump reads -----------------------------------------------------

    def links(self) -> list[Link]:
        return [link.public() for link in self._links.values()]

    def routes(self, protocol: int | None = None) -> set[Route]:
        """The main table's routes (of `protocol`, if given)."""
        return {r for k, r in self._routes.items()
                if protocol is None or self._protocol(k) == protocol}

    def neighbours(self, ifindex: int | None = None) -> set[Neighbour]:
        return {n for n in self._neighbours.values() if ifindex is None or n.ifindex == ifindex}

    def fdb(self, ifindex: int | None = None) -> set[Fdb]:
        return {f for f in self._fdb.values() if ifindex is None or f.ifindex == ifindex}

    # -- internals ---------------------------------------------------------------

    def _protocol(self, key: tuple[int, int, int, int]) -> int:
        return self._protocols.get(key, self._route_protocol)

    def _changed(self) -> None:
        self._generation += 1

    def _canonical(self, value: Any) -> Any:
        return value if self._intern is None else self._intern.setdefault(value, value)

    def _store_route(self, route: Route) -> tuple[int, int, int, int]:
        key = self._canonical(_route_key(route))
        self._routes[key] = self._canonical(route)
        self._protocols.pop(key, None)
        return key

    def _add_link(self, name: str, kind: str | None, mtu: int, mac: str | None, *, up: bool,
                  vxlan: VxlanAttrs | None = None) -> _Link:
        link = _Link(next(self._indexes), name, kind, mtu, mac, up, vxlan)
        self._links[link.index] = link
        self._names[name] = link.index
        self._changed()
        return link

    def _add_address(self, index: int, interface: Interface) -> None:
        addresses = self._addresses.setdefault(index, [])
        if any(a.interface == interface for a in addresses):
            return
        scope = RT_SCOPE_LINK if interface.ip.is_link_local else RT_SCOPE_UNIVERSE
        addresses.append(Addr(index, interface, scope, 0))
        network = interface.network
        if network.prefixlen < network.max_prefixlen:
            connected = Route(network, None, index, scope=RT_SCOPE_LINK,
                              metric=256 if network.version == 6 else 0)
            self._protocols[self._store_route(connected)] = KERNEL_PROTOCOL
        self._changed()

    def _flush_routes(self, index: int) -> None:
        """A device gone or down takes its routes (no notification tells)."""
        for key in [k for k, r in self._routes.items() if r.ifindex == index]:
            del self._routes[key]
            self._protocols.pop(key, None)
        self._changed()

    def _broadcast(self, make: Callable[[], NetlinkEvent], sender: int = 0) -> None:
        for subscriber in self._subscribers:
            subscriber._put(make, sender)

    def _on_link(self, route: Route) -> bool:
        """Whether `route`'s gateway is on one of its device's networks."""
        gateway = route.gateway
        return any(gateway in a.interface.network for a in self._addresses.get(route.ifindex, ()))

    # -- requests ----------------------------------------------------------------

    def request(self, obj: KernelObject, *, remove: bool = False, replace: bool = True,
                append: bool = False, exclusive: bool = False, protocol: int = 76,
                sender: int = 0) -> int:
        """One RTM_NEW*/RTM_DEL* request for `obj`, with the flags NLM_F_REPLACE
        (`replace`), NLM_F_APPEND, NLM_F_EXCL; the kernel's answer (0 or an errno)."""
        self.requests += 1
        if isinstance(obj, Route):
            return self._route_request(obj, remove, replace, exclusive, protocol, sender)
        if isinstance(obj, Neighbour):
            return self._neighbour_request(obj, remove, replace, exclusive, sender)
        if isinstance(obj, Fdb):
            return self._fdb_request(obj, remove, replace, append, exclusive)
        raise TypeError(f"not an rtnetlink object: {obj!r}")

    def _route_request(self, route: Route, remove: bool, replace: bool, exclusive: bool,
                       protocol: int, sender: int) -> int:
        key = _route_key(route)
        have = self._routes.get(key)
        if remove:
            if (have is None or self._protocol(key) != protocol
                    or (route.gateway is not None and have.gateway != route.gateway)
                    or (route.ifindex and have.ifindex != route.ifindex)):
                return errno.ESRCH
            del self._routes[key]
            self._protocols.pop(key, None)
            self._changed()
            self._broadcast(lambda: NetlinkEvent(
                "route", True, have.ifindex, sender, protocol=protocol, table=MAIN_TABLE,
                obj=have, host_route=_host_route(have)), sender)
            return 0
        if have is not None and (exclusive or not replace):
            return errno.EEXIST
        link = self._links.get(route.ifindex)
        if link is None:
            return errno.ENODEV
        if route.dst.version == 4 and not link.up:
            return errno.ENETDOWN
        if route.gateway is not None and not route.onlink and not self._on_link(route):
            return errno.ENETUNREACH if route.dst.version == 4 else errno.EHOSTUNREACH
        if route.dst.version == 6 and route.onlink and route.gateway is not None:
            # IPv6 looks the onlink gateway up: its best route (not the default one) must
            # be on the same device.
            gateway = route.gateway
            best = max((r for r in self._routes.values() if r.dst.version == 6
                        and r.dst.prefixlen and gateway in r.dst),
                       key=lambda r: r.dst.prefixlen, default=None)
            if best is not None and best.ifindex != route.ifindex:
                return errno.EINVAL
        key = self._store_route(route)
        if protocol != self._route_protocol:
            self._protocols[key] = protocol
        self._changed()
        self._broadcast(lambda: NetlinkEvent(
            "route", False, route.ifindex, sender, protocol=protocol, table=MAIN_TABLE,
            obj=route, host_route=_host_route(route)), sender)
        return 0

    def _neighbour_request(self, neighbour: Neighbour, remove: bool, replace: bool,
                           exclusive: bool, sender: int) -> int:
        key = _neighbour_key(neighbour)
        have = self._neighbours.get(key)
        if remove:
            if have is None:
                return errno.ENOENT
            del self._neighbours[key]
            self._changed()
            gone = Neighbour(have.ifindex, have.dst, "")  # told without its MAC, by port 0
            self._broadcast(lambda: NetlinkEvent("neighbour", True, gone.ifindex, 0, obj=gone))
            return 0
        if have is not None and (exclusive or not replace):
            return errno.EEXIST
        if neighbour.ifindex not in self._links:
            return errno.ENODEV
        self._neighbours[self._canonical(key)] = self._canonical(neighbour)
        self._changed()
        self._broadcast(lambda: NetlinkEvent("neighbour", False, neighbour.ifindex, sender,
                                             obj=neighbour), sender)
        return 0

    def _fdb_request(self, entry: Fdb, remove: bool, replace: bool, append: bool,
                     exclusive: bool) -> int:
        key = (entry.ifindex, entry.lladdr)  # one remote per unicast MAC
        have = self._fdb.get(key)
        if remove:
            if have is None or have.dst != entry.dst:
                return errno.ENOENT
            del self._fdb[key]
            self._changed()
            self._broadcast(lambda: NetlinkEvent("fdb", True, entry.ifindex, 0, obj=entry))
            return 0
        link = self._links.get(entry.ifindex)
        if link is None:
            return errno.ENODEV
        if link.kind != vxlan_profile.DEVICE_KIND:
            return errno.EOPNOTSUPP
        if have is not None:
            if exclusive:
                return errno.EEXIST
            if append or not replace or have == entry:
                return 0  # an append to a unicast MAC: accepted, nothing changes
        self._fdb[self._canonical(key)] = self._canonical(entry)
        self._changed()
        self._broadcast(lambda: NetlinkEvent("fdb", False, entry.ifindex, 0, obj=entry))
        return 0


class FakeNetlink(WholeTables):
    """A request socket on a FakeKernel: the kernel port as `Netlink` offers it."""

    def __init__(self, kernel: FakeKernel) -> None:
        self.kernel = kernel
        self.netns = kernel.name
        self.port_id = next(_ports)
        self._closed = False

    @property
    def port_ids(self) -> frozenset[int]:
        return frozenset({self.port_id})

    def close(self) -> None:
        self._closed = True

    def _check(self, what: str) -> None:
        if self._closed:
            raise DataPlaneError(f"{what}: {_netlink_error(errno.EBADF)}")

    async def events(self) -> FakeEvents:
        self._check("cannot subscribe to rtnetlink events")
        events = FakeEvents(self.kernel)
        self.kernel._subscribers.append(events)
        return events

    # -- links -------------------------------------------------------------------

    async def links(self) -> list[Link]:
        self._check("cannot list links")
        return self.kernel.links()

    async def link_by_name(self, name: str) -> Link | None:
        self._check(f"cannot read link {name}")
        index = self.kernel._names.get(name)
        return self.kernel._links[index].public() if index is not None else None

    async def link_by_index(self, index: int) -> Link | None:
        self._check(f"cannot read link {index}")
        link = self.kernel._links.get(index)
        return link.public() if link is not None else None

    def _new_link(self, what: str, name: str, kind: str, *, mtu: int = 1500,
                  mac: str | None = None, link: int = 0, vxlan: VxlanAttrs | None = None
                  ) -> _Link:
        kernel = self.kernel
        code = (errno.EEXIST if name in kernel._names
                else errno.ENODEV if link and link not in kernel._links else 0)
        if code:
            raise DataPlaneError(f"{what}: {_netlink_error(code)}")
        made = kernel._add_link(name, kind, mtu, mac, up=False, vxlan=vxlan)
        kernel._broadcast(lambda: NetlinkEvent("link", False, made.index, self.port_id,
                                               ifname=name, up=False), self.port_id)
        return made

    async def create_vxlan(self, name: str, *, vni: int, port: int, local: Address, link: int,
                           mtu: int, mac: str, flags: frozenset[str] = frozenset()
                           ) -> Link:
        self._check(f"cannot create vxlan device {name}")
        if any(other.vxlan is not None and other.vxlan.vni == vni and other.vxlan.port == port
               and other.vxlan.local is not None and other.vxlan.local.version == local.version
               for other in self.kernel._links.values()):
            raise DataPlaneError(f"cannot create vxlan device {name} (VNI {vni}, local {local}): "
                                 f"{_netlink_error(errno.EEXIST)}")
        made = self._new_link(
            f"cannot create vxlan device {name} (VNI {vni}, local {local})", name,
            vxlan_profile.DEVICE_KIND, mtu=mtu, mac=mac.lower(), link=link,
            vxlan=VxlanAttrs(vni=vni, port=port, local=local, link=link, flags=flags))
        return made.public()

    async def create_link(self, name: str, kind: str) -> None:
        self._check(f"cannot create {kind} device {name}")
        mac = None if kind == wireguard_profile.DEVICE_KIND else "02:fe:00:00:00:01"
        self._new_link(f"cannot create {kind} device {name}", name, kind, mac=mac)

    async def delete_link(self, index: int) -> None:
        self._check(f"cannot delete link {index}")
        kernel = self.kernel
        link = kernel._links.pop(index, None)
        if link is None:
            return  # ENODEV: already gone, as the goal was
        del kernel._names[link.name]
        kernel._addresses.pop(index, None)
        kernel._flush_routes(index)
        for key in [k for k, n in kernel._neighbours.items() if n.ifindex == index]:
            del kernel._neighbours[key]
        for mac in [k for k, f in kernel._fdb.items() if f.ifindex == index]:
            del kernel._fdb[mac]
        kernel._broadcast(lambda: NetlinkEvent("link", True, index, self.port_id,
                                               ifname=link.name, up=False), self.port_id)

    async def rename_link(self, index: int, name: str) -> None:
        self._check(f"cannot rename link {index}")
        kernel = self.kernel
        link = kernel._links.get(index)
        code = (errno.ENODEV if link is None
                else errno.EEXIST if kernel._names.get(name, index) != index else 0)
        if code:
            raise DataPlaneError(f"cannot rename link {index} to {name}: {_netlink_error(code)}")
        assert link is not None
        del kernel._names[link.name]
        kernel._names[name] = index
        link.name = name
        kernel._changed()
        kernel._broadcast(lambda: NetlinkEvent("link", False, index, self.port_id,
                                               ifname=name, up=link.up), self.port_id)

    async def set_link(self, index: int, *, mtu: int | None = None, up: bool | None = None,
                       mac: str | None = None) -> None:
        self._check(f"cannot set link {index}")
        link = self.kernel._links.get(index)
        if link is None:
            raise DataPlaneError(f"cannot set link {index}: {_netlink_error(errno.ENODEV)}")
        if mtu is not None:
            link.mtu = mtu
        if mac is not None:
            link.mac = mac.lower()
        if up is not None:
            if link.up and not up:
                self.kernel._flush_routes(index)
            link.up = up
        self.kernel._changed()
        self.kernel._broadcast(lambda: NetlinkEvent("link", False, index, self.port_id,
                                                    ifname=link.name, up=link.up), self.port_id)

    # -- addresses -----------------------------------------------------------------

    async def addresses(self, family: int = socket.AF_UNSPEC, *, index: int | None = None
                        ) -> list[Addr]:
        self._check("cannot list addresses")
        return [a for i, addresses in self.kernel._addresses.items() for a in addresses
                if (index is None or i == index)
                and family in (socket.AF_UNSPEC, _FAMILY[a.interface.version])]

    async def ipv4_addresses(self, index: int | None = None) -> list[tuple[int, IPv4Interface]]:
        return [(a.index, a.interface) for a in await self.addresses(socket.AF_INET, index=index)
                if isinstance(a.interface, IPv4Interface)]

    async def add_address(self, index: int, address: Interface) -> None:
        self._check(f"cannot add address {address} to link {index}")
        if index not in self.kernel._links:
            raise DataPlaneError(f"cannot add address {address} to link {index}: "
                                 f"{_netlink_error(errno.ENODEV)}")
        self.kernel._add_address(index, address)

    async def delete_address(self, index: int, address: Interface) -> None:
        self._check(f"cannot remove address {address} from link {index}")
        kernel = self.kernel
        addresses = kernel._addresses.get(index, [])
        kept = [a for a in addresses if a.interface != address]
        if len(kept) == len(addresses):
            return  # EADDRNOTAVAIL: not there, as the goal was
        kernel._addresses[index] = kept
        network = address.network
        for key, route in list(kernel._routes.items()):
            if (route.dst == network and route.ifindex == index and route.gateway is None
                    and kernel._protocol(key) == KERNEL_PROTOCOL):
                del kernel._routes[key]
                kernel._protocols.pop(key, None)
        kernel._changed()

    # -- the objects we own --------------------------------------------------------

    async def _dump(self, entries: Iterable[Any], what: str) -> list[Any]:
        """The entries, a chunk between two yields; DumpInterrupted if a table changed
        meanwhile (or the kernel was told to interrupt this dump)."""
        self._check(f"cannot dump {what}")
        kernel = self.kernel
        generation = kernel._generation
        snapshot = list(entries)
        for _part in range(DUMP_CHUNK, len(snapshot), DUMP_CHUNK):
            await asyncio.sleep(0)  # the next part is read later: the table may change
        interrupted = kernel._generation != generation
        if kernel._interrupts:
            kernel._interrupts -= 1
            interrupted = True
        if interrupted:
            raise DumpInterrupted(f"cannot dump {what}: a table changed during the dump")
        return snapshot

    async def scan_routes(self, known: Known, *, protocol: int, family: int = socket.AF_UNSPEC,
                          others: Callable[[HostRoute], None] | None = None) -> list[Route]:
        kernel = self.kernel
        wanted = (4, 6) if family == socket.AF_UNSPEC else (6 if family == socket.AF_INET6 else 4,)
        entries = await self._dump(kernel._routes.items(), "routes")
        unknown: list[Route] = []
        for key, route in entries:
            if key[0] not in wanted:
                continue
            if kernel._protocol(key) != protocol:
                if others is not None:
                    others(_host_route(route))
            elif not known(route._ident):
                unknown.append(route)
        if others is not None:
            for addresses in kernel._addresses.values():
                for a in addresses:
                    if a.interface.version in wanted:
                        host = ip_interface((a.interface.ip, a.interface.max_prefixlen)).network
                        others(HostRoute(host, address=True, ifindex=a.index))
        return unknown

    async def scan_neighbours(self, known: Known, ifindex: int, *,
                              family: int = socket.AF_UNSPEC) -> list[Neighbour]:
        wanted = (4, 6) if family == socket.AF_UNSPEC else (6 if family == socket.AF_INET6 else 4,)
        entries = await self._dump(self.kernel._neighbours.values(),
                                   f"neighbours of link {ifindex}")
        return [n for n in entries if n.ifindex == ifindex and n.dst.version in wanted
                and not known(n._ident)]

    async def scan_fdb(self, known: Known, ifindex: int, *, own_mac: str | None = None
                       ) -> list[Fdb]:
        entries = await self._dump(self.kernel._fdb.values(), f"FDB of link {ifindex}")
        return [f for f in entries if f.ifindex == ifindex and f.lladdr != own_mac
                and not known(f._ident)]

    async def apply(self, action: Action, objects: Sequence[KernelObject], *, protocol: int
                    ) -> tuple[list[KernelObject], list[Failure]]:
        """As Netlink.apply: every object replaced or removed (what rtnl.encode_object
        asks), in order; never raises for one object."""
        if self._closed:
            error = DataPlaneError(f"{action.value} of {len(objects)} objects: "
                                   f"{_netlink_error(errno.EBADF)}")
            return [], [Failure(action, obj, error) for obj in objects]
        remove = action is Action.REMOVE
        request = self.kernel.request
        codes = [request(obj, remove=remove, protocol=protocol, sender=self.port_id)
                 for obj in objects]
        await asyncio.sleep(0)  # the batch's round trip
        return outcomes(action, objects, codes)

    async def move(self, pairs: Sequence[tuple[KernelObject, KernelObject]], *, protocol: int
                   ) -> tuple[list[KernelObject], list[Failure]]:
        """As Netlink.move: each pair's removal and replace, one after the other."""
        if self._closed:
            error = DataPlaneError(f"move of {len(pairs)} objects: "
                                   f"{_netlink_error(errno.EBADF)}")
            return [], [Failure(Action.REPLACE, new, error) for _, new in pairs]
        request = self.kernel.request
        codes = [request(obj, remove=remove, protocol=protocol, sender=self.port_id)
                 for old, new in pairs for obj, remove in ((old, True), (new, False))]
        await asyncio.sleep(0)  # the batch's round trip
        return moved(pairs, codes)


class FakeEvents:
    """A subscription to a FakeKernel's broadcasts (NetlinkEvents' interface). The
    broadcasts of the ports it was last asked to ignore are dropped as they come."""

    def __init__(self, kernel: FakeKernel) -> None:
        self._kernel = kernel
        self._queue: deque[Callable[[], NetlinkEvent]] = deque()
        self._ready = asyncio.Event()
        self._ignore: frozenset[int] = frozenset()
        self._closed = False
        self._overflowed = False

    def _put(self, make: Callable[[], NetlinkEvent], sender: int) -> None:
        if (sender and sender in self._ignore) or self._overflowed:
            return
        if len(self._queue) >= EVENT_QUEUE_LIMIT:
            self._overflowed = True  # what was queued is lost
            self._queue.clear()
        else:
            self._queue.append(make)
        self._ready.set()

    async def receive(self, *, ignore: frozenset[int] = frozenset(),
                      unsent_additions: bool = True) -> list[NetlinkEvent]:
        self._ignore = ignore
        while True:
            if self._closed or self._overflowed:
                code = errno.EBADF if self._closed else errno.ENOBUFS
                raise DataPlaneError(f"rtnetlink event socket failed: {_netlink_error(code)}")
            if self._queue:
                out = [make() for make in self._queue]
                self._queue.clear()
                self._ready.clear()
                events = [e for e in out if not (e.sender and e.sender in ignore) and (
                    unsent_additions or e.sender or e.deleted
                    or e.kind not in ("neighbour", "fdb"))]
                if events:
                    return events
                continue
            await self._ready.wait()

    def close(self) -> None:
        self._closed = True
        self._ready.set()
        if self in self._kernel._subscribers:
            self._kernel._subscribers.remove(self)


if TYPE_CHECKING:
    def _is_a_kernel_opener(kernel: FakeKernel) -> KernelOpener:
        return kernel.open  # mypy: FakeNetlink implements the port
