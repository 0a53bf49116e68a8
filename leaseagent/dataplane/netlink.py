"""The netlink adapter: every pyroute2 call of the data plane lives here.

Two sockets, both pyroute2 `AsyncIPRoute` (rtnetlink), optionally opened
inside a named network namespace (`netns=`; pyroute2 forks a helper that
enters the namespace and passes the socket back, so the agent itself never
changes namespace):

- `Netlink`: requests (dump, replace, delete). Never bound to multicast
  groups, so no broadcast piles up in its queue.
- `NetlinkEvents`: bound to the link, neighbour and IPv4 route groups and
  used for nothing else. pyroute2 files messages by sequence number; a
  broadcast carries the sequence number of whatever request caused it
  (e.g. `ip route del`), which pyroute2 routes to its tag-0 queue because no
  request of this socket waits on it, and `get()` on tag 0 reads them.
  Each event carries the netlink port id of the socket whose request caused
  it, so the caller can ignore echoes of its own changes.

Errors: pyroute2's `NetlinkError` and `OSError` are translated here into
`leaseagent.errors.DataPlaneError` (`raise ... from exc`); nothing above
this module sees a pyroute2 type. The kernel objects are the frozen
dataclasses of `leaseagent.core.plan`.

Quirks of the kernel worth knowing (all checked on Linux 6.x):

- Deleting a missing route answers ESRCH, a missing neighbour/FDB entry
  ENOENT; `apply` treats both as success (the goal was "gone").
- RTM_NEWNEIGH with NLM_F_REPLACE on AF_BRIDGE/vxlan replaces the first
  remote of an existing MAC; NLM_F_APPEND adds a remote and is idempotent.
- A deleted device takes its routes with it without RTM_DELROUTE
  notifications; only RTM_DELLINK tells.
- A receive queue overflow (ENOBUFS) poisons a pyroute2 socket for good: the
  only cure is a new socket, which `NetlinkEvents` users must open.

Performance: `apply` sends one request per object and waits for its ack
(~50-100 us each). It is the single place to switch to batched sends (many
messages per sendmsg, acks collected after) when start-up with thousands of
peers needs it; its signature already takes the whole batch.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import Enum
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from typing import Any

from pyroute2 import AsyncIPRoute
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl import RTMGRP_IPV4_ROUTE, RTMGRP_LINK, RTMGRP_NEIGH

from leaseagent.core.plan import MAIN_TABLE, Fdb, KernelObject, Neighbour, Route
from leaseagent.errors import DataPlaneError

AF_BRIDGE = 7
RTNH_F_ONLINK = 4
NUD_NOARP = 0x40
NUD_PERMANENT = 0x80
NTF_SELF = 0x02
IFF_UP = 0x1
SO_RCVBUFFORCE = 33  # Linux; missing from typeshed's socket module
RTN_UNICAST = 1
_GONE = (errno.ENOENT, errno.ESRCH)
_ZERO_MAC = "00:00:00:00:00:00"
# Broadcasts for our own changes at start-up (thousands of routes) must not
# overflow the event socket; SO_RCVBUFFORCE lifts net.core.rmem_max (root).
_EVENT_RCVBUF = 8 * 1024 * 1024


def _error(what: str, exc: BaseException) -> DataPlaneError:
    return DataPlaneError(f"{what}: {exc}")


@dataclass(frozen=True)
class VxlanInfo:
    vni: int
    port: int
    local: IPv4Address | None
    link: int
    learning: bool


@dataclass(frozen=True)
class Link:
    index: int
    name: str
    kind: str | None
    mtu: int
    address: str | None
    up: bool
    vxlan: VxlanInfo | None = None


class Action(Enum):
    REPLACE = "replace"
    REMOVE = "remove"


@dataclass(frozen=True)
class Failure:
    action: Action
    obj: KernelObject
    error: DataPlaneError


@dataclass(frozen=True)
class NetlinkEvent:
    """One change the kernel broadcast; only the fields the data plane looks at."""

    kind: str  # "link" | "route" | "neighbour" | "fdb" | "other"
    deleted: bool
    ifindex: int
    sender: int  # netlink port id of the requesting socket; 0 if the kernel did it
    ifname: str | None = None
    up: bool | None = None
    protocol: int | None = None
    table: int | None = None
    obj: KernelObject | None = None  # the route/neighbour/FDB entry, as core.plan models it


def _link_from_msg(msg: Any) -> Link:
    info = msg.get("linkinfo")
    kind = info.get("kind") if info is not None else None
    vxlan = None
    if kind == "vxlan":
        data = info.get("data")
        local = data.get("vxlan_local") if data is not None else None
        vxlan = VxlanInfo(
            vni=int(data.get("vxlan_id") or 0),
            port=int(data.get("vxlan_port") or 0),
            local=IPv4Address(local) if local else None,
            link=int(data.get("vxlan_link") or 0),
            learning=bool(data.get("vxlan_learning")),
        )
    return Link(
        index=int(msg["index"]),
        name=str(msg.get("ifname")),
        kind=kind,
        mtu=int(msg.get("mtu") or 0),
        address=msg.get("address"),
        up=bool(msg["flags"] & IFF_UP),
        vxlan=vxlan,
    )


def _route_from_msg(msg: Any) -> Route | None:
    if msg.get("family") != socket.AF_INET or msg.get("type") != RTN_UNICAST:
        return None
    dst = msg.get("dst") or "0.0.0.0"
    gateway = msg.get("gateway")
    return Route(
        dst=IPv4Network(f"{dst}/{msg['dst_len']}"),
        gateway=IPv4Address(gateway) if gateway else None,
        ifindex=int(msg.get("oif") or 0),
        onlink=bool(msg["flags"] & RTNH_F_ONLINK),
        metric=int(msg.get("priority") or 0),
    )


class Netlink:
    """Request socket of one network namespace (None: the agent's own)."""

    def __init__(self, ipr: Any, netns: str | None) -> None:
        self._ipr = ipr
        self.netns = netns

    @classmethod
    async def open(cls, netns: str | None = None) -> Netlink:
        try:
            ipr = AsyncIPRoute(netns=netns) if netns else AsyncIPRoute()
            # Bind now (no groups) so port_id is known for filtering echoes.
            await ipr.bind(groups=0)
        except (NetlinkError, OSError) as exc:
            where = f" in netns {netns}" if netns else ""
            raise _error(f"cannot open an rtnetlink socket{where}", exc) from exc
        return cls(ipr, netns)

    @property
    def port_id(self) -> int:
        """The netlink port id the kernel puts in notifications our requests cause."""
        return int(self._ipr.getsockname()[0])

    def close(self) -> None:
        self._ipr.close()

    # -- links ---------------------------------------------------------------

    async def links(self) -> list[Link]:
        try:
            return [_link_from_msg(m) async for m in await self._ipr.link("dump")]
        except (NetlinkError, OSError) as exc:
            raise _error("cannot list links", exc) from exc

    async def link_by_name(self, name: str) -> Link | None:
        try:
            msgs = await self._ipr.link("get", ifname=name)
        except NetlinkError as exc:
            if exc.code in (errno.ENODEV, errno.ENOENT):
                return None
            raise _error(f"cannot read link {name}", exc) from exc
        except OSError as exc:
            raise _error(f"cannot read link {name}", exc) from exc
        return _link_from_msg(msgs[0]) if msgs else None

    async def link_by_index(self, index: int) -> Link | None:
        try:
            msgs = await self._ipr.link("get", index=index)
        except NetlinkError as exc:
            if exc.code in (errno.ENODEV, errno.ENOENT):
                return None
            raise _error(f"cannot read link {index}", exc) from exc
        except OSError as exc:
            raise _error(f"cannot read link {index}", exc) from exc
        return _link_from_msg(msgs[0]) if msgs else None

    async def create_vxlan(
        self,
        name: str,
        *,
        vni: int,
        port: int,
        local: IPv4Address,
        link: int,
        mtu: int,
        mac: str,
    ) -> Link:
        spec: dict[str, Any] = {
            "ifname": name,
            "kind": "vxlan",
            "vxlan_id": vni,
            "vxlan_port": port,
            "vxlan_local": str(local),
            "vxlan_learning": 0,
            "mtu": mtu,
            "address": mac,
        }
        if link:
            spec["vxlan_link"] = link
        try:
            await self._ipr.link("add", **spec)
        except (NetlinkError, OSError) as exc:
            raise _error(f"cannot create vxlan device {name} (VNI {vni}, local {local})", exc) \
                from exc
        created = await self.link_by_name(name)
        if created is None:
            raise DataPlaneError(f"vxlan device {name} vanished right after it was created")
        return created

    async def delete_link(self, index: int) -> None:
        try:
            await self._ipr.link("del", index=index)
        except NetlinkError as exc:
            if exc.code not in (errno.ENODEV, errno.ENOENT):
                raise _error(f"cannot delete link {index}", exc) from exc
        except OSError as exc:
            raise _error(f"cannot delete link {index}", exc) from exc

    async def set_link(self, index: int, *, mtu: int | None = None, up: bool | None = None) -> None:
        spec: dict[str, Any] = {}
        if mtu is not None:
            spec["mtu"] = mtu
        if up is not None:
            spec["state"] = "up" if up else "down"
        try:
            await self._ipr.link("set", index=index, **spec)
        except (NetlinkError, OSError) as exc:
            raise _error(f"cannot set {spec} on link {index}", exc) from exc

    # -- addresses and routes that are not ours -------------------------------

    async def ipv4_addresses(self, index: int | None = None) -> list[tuple[int, IPv4Interface]]:
        """(ifindex, address/prefix) of every IPv4 address, or those of one link."""
        try:
            msgs = [m async for m in await self._ipr.addr("dump", family=socket.AF_INET)]
        except (NetlinkError, OSError) as exc:
            raise _error("cannot list addresses", exc) from exc
        out = []
        for m in msgs:
            if index is None or m["index"] == index:
                out.append((int(m["index"]), IPv4Interface(f"{m.get('address')}/{m['prefixlen']}")))
        return out

    async def add_address(self, index: int, address: IPv4Interface) -> None:
        try:
            await self._ipr.addr(
                "replace", index=index, address=str(address.ip), prefixlen=address.network.prefixlen
            )
        except (NetlinkError, OSError) as exc:
            raise _error(f"cannot add address {address} to link {index}", exc) from exc

    async def delete_address(self, index: int, address: IPv4Interface) -> None:
        try:
            await self._ipr.addr(
                "del", index=index, address=str(address.ip), prefixlen=address.network.prefixlen
            )
        except NetlinkError as exc:
            if exc.code not in (errno.EADDRNOTAVAIL, errno.ENOENT, errno.ENODEV):
                raise _error(f"cannot remove address {address} from link {index}", exc) from exc
        except OSError as exc:
            raise _error(f"cannot remove address {address} from link {index}", exc) from exc

    async def default_route_ifindex(self) -> int | None:
        """The output interface of the IPv4 default route in the main table, if any."""
        try:
            msgs = [
                m async for m in await self._ipr.route("dump", family=socket.AF_INET)
                if m.get("dst_len") == 0 and m.get("table") == MAIN_TABLE
            ]
        except (NetlinkError, OSError) as exc:
            raise _error("cannot read the routing table", exc) from exc
        for m in msgs:
            oif = m.get("oif")
            if oif:
                return int(oif)
            for hop in m.get("multipath") or ():
                if hop.get("oif"):
                    return int(hop["oif"])
        return None

    # -- the objects we own ----------------------------------------------------

    async def routes(self, *, protocol: int) -> set[Route]:
        """IPv4 unicast routes of the main table carrying `protocol`."""
        try:
            msgs = [
                m async for m in await self._ipr.route("dump", family=socket.AF_INET)
                if m.get("proto") == protocol and m.get("table") == MAIN_TABLE
            ]
        except (NetlinkError, OSError) as exc:
            raise _error("cannot dump routes", exc) from exc
        return {r for r in (_route_from_msg(m) for m in msgs) if r is not None}

    async def neighbours(self, ifindex: int) -> set[Neighbour]:
        """Permanent IPv4 neighbour entries of one device (others are the kernel's)."""
        try:
            msgs = [
                m async for m in await self._ipr.neigh("dump", family=socket.AF_INET)
                if m.get("ifindex") == ifindex
            ]
        except (NetlinkError, OSError) as exc:
            raise _error(f"cannot dump neighbours of link {ifindex}", exc) from exc
        return {
            Neighbour(ifindex, IPv4Address(m.get("dst")), str(m.get("lladdr")).lower())
            for m in msgs
            if m["state"] & NUD_PERMANENT and m.get("dst") and m.get("lladdr")
        }

    async def fdb(self, ifindex: int, *, own_mac: str | None = None) -> set[Fdb]:
        """Permanent, self, unicast-to-IPv4 FDB entries of one vxlan device."""
        try:
            msgs = [
                m async for m in await self._ipr.neigh("dump", family=AF_BRIDGE)
                if m.get("ifindex") == ifindex
            ]
        except (NetlinkError, OSError) as exc:
            raise _error(f"cannot dump FDB of link {ifindex}", exc) from exc
        out = set()
        for m in msgs:
            mac = str(m.get("lladdr") or "").lower()
            dst = m.get("dst")
            if (
                not m["state"] & NUD_PERMANENT
                or not m["flags"] & NTF_SELF
                or mac in ("", _ZERO_MAC, own_mac)
                or not dst
                or ":" in dst
            ):
                continue
            out.add(Fdb(ifindex, mac, IPv4Address(dst)))
        return out

    async def apply(
        self, action: Action, objects: Sequence[KernelObject], *, protocol: int
    ) -> tuple[list[KernelObject], list[Failure]]:
        """Replace or remove each object, in order; return (done, failures).

        Never raises for one object: a refusal is a Failure and the rest go on.
        """
        done: list[KernelObject] = []
        failures: list[Failure] = []
        for obj in objects:
            try:
                if action is Action.REPLACE:
                    await self._replace(obj, protocol=protocol)
                else:
                    await self._remove(obj, protocol=protocol)
            except NetlinkError as exc:
                if action is Action.REMOVE and exc.code in _GONE:
                    done.append(obj)
                else:
                    failures.append(Failure(action, obj, _error(f"{action.value} {obj}", exc)))
                continue
            except OSError as exc:
                failures.append(Failure(action, obj, _error(f"{action.value} {obj}", exc)))
                continue
            done.append(obj)
        return done, failures

    async def _replace(self, obj: KernelObject, *, protocol: int) -> None:
        if isinstance(obj, Route):
            await self._ipr.route("replace", **_route_spec(obj, protocol))
        elif isinstance(obj, Neighbour):
            await self._ipr.neigh(
                "replace", family=socket.AF_INET, ifindex=obj.ifindex, dst=str(obj.dst),
                lladdr=obj.lladdr, state=NUD_PERMANENT,
            )
        else:
            await self._ipr.neigh(
                "append", family=AF_BRIDGE, ifindex=obj.ifindex, lladdr=obj.lladdr,
                dst=str(obj.dst), state=NUD_PERMANENT | NUD_NOARP, flags=NTF_SELF,
            )

    async def _remove(self, obj: KernelObject, *, protocol: int) -> None:
        if isinstance(obj, Route):
            await self._ipr.route("del", **_route_spec(obj, protocol))
        elif isinstance(obj, Neighbour):
            await self._ipr.neigh(
                "del", family=socket.AF_INET, ifindex=obj.ifindex, dst=str(obj.dst)
            )
        else:
            await self._ipr.neigh(
                "del", family=AF_BRIDGE, ifindex=obj.ifindex, lladdr=obj.lladdr,
                dst=str(obj.dst), state=NUD_PERMANENT | NUD_NOARP, flags=NTF_SELF,
            )


def _route_spec(route: Route, protocol: int) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "family": socket.AF_INET,
        "dst": str(route.dst),
        "table": MAIN_TABLE,
        "proto": protocol,
        "type": RTN_UNICAST,
    }
    if route.gateway is not None:
        spec["gateway"] = str(route.gateway)
    if route.ifindex:
        spec["oif"] = route.ifindex
    if route.onlink:
        spec["flags"] = RTNH_F_ONLINK
    if route.metric:
        spec["priority"] = route.metric
    return spec


_EVENT_KINDS = {
    "RTM_NEWLINK": ("link", False),
    "RTM_DELLINK": ("link", True),
    "RTM_NEWROUTE": ("route", False),
    "RTM_DELROUTE": ("route", True),
    "RTM_NEWNEIGH": ("neighbour", False),
    "RTM_DELNEIGH": ("neighbour", True),
}


def _neighbour_from_msg(msg: Any) -> Neighbour | Fdb | None:
    dst = msg.get("dst")
    if not dst or ":" in dst:
        return None
    ifindex = int(msg.get("ifindex") or 0)
    lladdr = str(msg.get("lladdr") or "").lower()
    if msg.get("family") == AF_BRIDGE:
        return Fdb(ifindex, lladdr, IPv4Address(dst)) if lladdr else None
    return Neighbour(ifindex, IPv4Address(dst), lladdr)


def _event_from_msg(msg: Any) -> NetlinkEvent:
    kind, deleted = _EVENT_KINDS.get(msg.get("event"), ("other", False))
    sender = int(msg["header"].get("pid") or 0)
    if kind == "link":
        return NetlinkEvent(
            kind, deleted, int(msg.get("index") or 0), sender,
            ifname=msg.get("ifname"), up=bool(msg.get("flags", 0) & IFF_UP),
        )
    if kind == "route":
        if msg.get("family") != socket.AF_INET:
            return NetlinkEvent("other", deleted, 0, sender)
        return NetlinkEvent(
            kind, deleted, int(msg.get("oif") or 0), sender,
            protocol=msg.get("proto"), table=msg.get("table"), obj=_route_from_msg(msg),
        )
    if kind == "neighbour":
        family = msg.get("family")
        if family == AF_BRIDGE:
            kind = "fdb"
        elif family != socket.AF_INET:
            return NetlinkEvent("other", deleted, 0, sender)
        return NetlinkEvent(
            kind, deleted, int(msg.get("ifindex") or 0), sender, obj=_neighbour_from_msg(msg)
        )
    return NetlinkEvent("other", deleted, 0, sender)


class NetlinkEvents:
    """A socket subscribed to link, neighbour (incl. FDB) and IPv4 route broadcasts."""

    def __init__(self, ipr: Any) -> None:
        self._ipr = ipr

    @classmethod
    async def open(cls, netns: str | None = None) -> NetlinkEvents:
        try:
            ipr = AsyncIPRoute(netns=netns) if netns else AsyncIPRoute()
            try:
                ipr.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, _EVENT_RCVBUF)
            except OSError:
                pass  # not root: the default buffer has to do; overflow is handled
            await ipr.bind(groups=RTMGRP_LINK | RTMGRP_NEIGH | RTMGRP_IPV4_ROUTE)
        except (NetlinkError, OSError) as exc:
            raise _error("cannot subscribe to rtnetlink events", exc) from exc
        return cls(ipr)

    async def receive(self) -> list[NetlinkEvent]:
        """The next batch of events (one or more). Raises DataPlaneError when the
        socket is broken (e.g. overflowed): close it and open a new one."""
        try:
            batch = [_event_from_msg(m) async for m in self._ipr.get()]
        except (NetlinkError, OSError) as exc:
            raise _error("rtnetlink event socket failed", exc) from exc
        if not batch:
            raise DataPlaneError("rtnetlink event socket closed")
        return batch

    def close(self) -> None:
        self._ipr.close()


def objects_by_kind(objects: Iterable[KernelObject]) -> dict[str, int]:
    """Count objects per kind ("route", "neighbour", "fdb") for metrics."""
    counts: dict[str, int] = {}
    for obj in objects:
        counts[obj.kind] = counts.get(obj.kind, 0) + 1
    return counts
