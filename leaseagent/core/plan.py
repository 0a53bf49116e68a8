"""Desired kernel state from the peer set, and its diff against what the kernel has.

Pure: no I/O, no netlink. The backends (leaseagent.dataplane.vxlan, .hostgw)
call `plan_vxlan` / `plan_host_gw` with the peer set and the interface
indexes they resolved, read what the kernel holds into the same frozen
dataclasses, and apply `diff`.

The objects (DESIGN.md §3):

- vxlan, per peer: Neighbour(<subnet .0> -> VtepMAC on the vxlan device),
  Fdb(VtepMAC -> PublicIP on the vxlan device), Route(<subnet> via <subnet .0>
  dev vxlan onlink). With DirectRouting and the peer's PublicIP on a directly
  connected network: only Route(<subnet> via PublicIP dev underlay).
- host-gw, per peer: Route(<subnet> via PublicIP dev underlay).

Identity. Each object has a `key`: what the kernel uses to tell two entries
apart for a *replace* (RTM_NEWROUTE/RTM_NEWNEIGH with NLM_F_REPLACE):

- Route: (dst, metric) in the main table. A route with the same dst but
  another gateway or device is replaced in place, never removed first.
- Neighbour: (ifindex, dst). A new lladdr replaces the entry.
- Fdb: the whole object (ifindex, lladdr, dst). A vxlan FDB entry may hold
  several remote destinations for one MAC; a stale one is removed on its own
  after the new one is appended.

Invariants: a peer whose subnet is our own is never planned; peers of another
backend type are skipped (flannel does the same: a vxlan host does not route
to a host-gw lease and vice versa); order of application is fixed by `diff`:
removals route -> neighbour -> FDB, additions neighbour -> FDB -> route, so a
route never points at a neighbour that is not there yet.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from typing import Any, NamedTuple

from leaseagent.core.lease import Peer
from leaseagent.errors import NetworkConfigError

MAIN_TABLE = 254
VXLAN_OVERHEAD = 50  # outer IPv4 20 + UDP 8 + VXLAN 8 + inner Ethernet 14
DEFAULT_VNI = 1
DEFAULT_PORT = 8472  # flannel's default, the Linux kernel's original VXLAN port


# The objects are hashed and compared tens of thousands of times per sync
# (sets, diffs, the per-peer plan); ipaddress's __hash__/__eq__ are Python
# code, so each object computes an identity of plain ints and strings once
# (`_ident`) and its hash from that; equality compares identities, which
# are equal exactly when all fields are.


@dataclass(frozen=True, eq=False)
class Route:
    """An IPv4 unicast route in the main table, carrying our protocol number."""

    dst: IPv4Network
    gateway: IPv4Address | None
    ifindex: int
    onlink: bool = False
    metric: int = 0
    _ident: tuple[object, ...] = field(init=False, repr=False, compare=False)
    _hash: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        ident = (0, int(self.dst.network_address), self.dst.prefixlen,
                 int(self.gateway) if self.gateway is not None else -1,
                 self.ifindex, self.onlink, self.metric)
        object.__setattr__(self, "_ident", ident)
        object.__setattr__(self, "_hash", hash(ident))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Route) and self._ident == other._ident

    def __hash__(self) -> int:
        return self._hash

    @property
    def key(self) -> tuple[object, ...]:
        return ("route", self.dst, self.metric)

    kind = "route"


@dataclass(frozen=True, eq=False)
class Neighbour:
    """A permanent IPv4 neighbour (ARP) entry."""

    ifindex: int
    dst: IPv4Address
    lladdr: str
    _ident: tuple[object, ...] = field(init=False, repr=False, compare=False)
    _hash: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        ident = (1, self.ifindex, int(self.dst), self.lladdr)
        object.__setattr__(self, "_ident", ident)
        object.__setattr__(self, "_hash", hash(ident))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Neighbour) and self._ident == other._ident

    def __hash__(self) -> int:
        return self._hash

    @property
    def key(self) -> tuple[object, ...]:
        return ("neighbour", self.ifindex, self.dst)

    kind = "neighbour"


@dataclass(frozen=True, eq=False)
class Fdb:
    """A permanent bridge FDB entry on a vxlan device: MAC -> remote VTEP."""

    ifindex: int
    lladdr: str
    dst: IPv4Address
    _ident: tuple[object, ...] = field(init=False, repr=False, compare=False)
    _hash: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        ident = (2, self.ifindex, self.lladdr, int(self.dst))
        object.__setattr__(self, "_ident", ident)
        object.__setattr__(self, "_hash", hash(ident))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Fdb) and self._ident == other._ident

    def __hash__(self) -> int:
        return self._hash

    @property
    def key(self) -> tuple[object, ...]:
        return ("fdb", self.ifindex, self.lladdr, self.dst)

    kind = "fdb"


KernelObject = Route | Neighbour | Fdb
# Per peer subnet: the objects that peer needs. Backends keep this to undo a
# peer's objects on an incremental update without dumping kernel tables.
PeerPlan = Mapping[IPv4Network, frozenset[KernelObject]]

_ADD_ORDER = {"neighbour": 0, "fdb": 1, "route": 2}
_REMOVE_ORDER = {"route": 0, "neighbour": 1, "fdb": 2}


class PlanDiff(NamedTuple):
    """What to change, each already in the order it must be applied."""

    to_add: tuple[KernelObject, ...]
    to_remove: tuple[KernelObject, ...]


@dataclass(frozen=True)
class VxlanOptions:
    """The vxlan part of the network config's Backend object."""

    vni: int = DEFAULT_VNI
    port: int = DEFAULT_PORT
    mtu: int | None = None
    direct_routing: bool = False

    @property
    def device_name(self) -> str:
        return f"flannel.{self.vni}"

    def mtu_for(self, underlay_mtu: int) -> int:
        return self.mtu if self.mtu is not None else underlay_mtu - VXLAN_OVERHEAD


def _int_option(backend: Mapping[str, Any], name: str, default: int, lo: int, hi: int) -> int:
    value = backend.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise NetworkConfigError(f"Backend.{name}={value!r}: must be an integer in {lo}..{hi}")
    return value


def vxlan_options(backend: Mapping[str, Any]) -> VxlanOptions:
    """Read VNI, Port, MTU, DirectRouting from Backend; raise NetworkConfigError naming the field."""
    direct = backend.get("DirectRouting", False)
    if not isinstance(direct, bool):
        raise NetworkConfigError(f"Backend.DirectRouting={direct!r}: must be true or false")
    mtu = _int_option(backend, "MTU", 0, 0, 65535) if "MTU" in backend else None
    if mtu is not None and mtu < 68:
        raise NetworkConfigError(f"Backend.MTU={mtu}: must be at least 68 (IPv4 minimum)")
    return VxlanOptions(
        # VNI 0 is valid for the kernel but flannel treats 0 as "unset" -> 1.
        vni=_int_option(backend, "VNI", DEFAULT_VNI, 0, (1 << 24) - 1) or DEFAULT_VNI,
        port=_int_option(backend, "Port", DEFAULT_PORT, 0, 65535) or DEFAULT_PORT,
        mtu=mtu,
        direct_routing=direct,
    )


def plan_vxlan_peer(
    peer: Peer,
    vxlan_index: int,
    *,
    underlay_index: int,
    direct_routing: bool,
    is_direct: Callable[[IPv4Address], bool],
) -> frozenset[KernelObject]:
    """The objects one vxlan peer needs (empty if it cannot be served by vxlan)."""
    if peer.backend_type != "vxlan" or not peer.vtep_mac:
        return frozenset()
    if direct_routing and is_direct(peer.public_ip):
        return frozenset({Route(peer.subnet, peer.public_ip, underlay_index)})
    gateway = peer.subnet.network_address
    return frozenset({
        Neighbour(vxlan_index, gateway, peer.vtep_mac),
        Fdb(vxlan_index, peer.vtep_mac, peer.public_ip),
        Route(peer.subnet, gateway, vxlan_index, onlink=True),
    })


def plan_vxlan(
    own_subnet: IPv4Network | None,
    peers: Mapping[IPv4Network, Peer],
    *,
    vxlan_index: int,
    underlay_index: int,
    direct_routing: bool = False,
    is_direct: Callable[[IPv4Address], bool] = lambda _ip: False,
) -> dict[IPv4Network, frozenset[KernelObject]]:
    """Per peer subnet, the objects the vxlan backend wants in the kernel."""
    return {
        subnet: plan_vxlan_peer(
            peer, vxlan_index,
            underlay_index=underlay_index, direct_routing=direct_routing, is_direct=is_direct,
        )
        for subnet, peer in peers.items()
        if subnet != own_subnet
    }


def plan_host_gw_peer(peer: Peer, underlay_index: int) -> frozenset[KernelObject]:
    """The one route a host-gw peer needs (empty for a peer of another backend)."""
    if peer.backend_type != "host-gw":
        return frozenset()
    return frozenset({Route(peer.subnet, peer.public_ip, underlay_index)})


def plan_host_gw(
    own_subnet: IPv4Network | None,
    peers: Mapping[IPv4Network, Peer],
    *,
    underlay_index: int,
) -> dict[IPv4Network, frozenset[KernelObject]]:
    """Per peer subnet, the routes the host-gw backend wants in the kernel."""
    return {
        subnet: plan_host_gw_peer(peer, underlay_index)
        for subnet, peer in peers.items()
        if subnet != own_subnet
    }


def flatten(plan: PeerPlan) -> frozenset[KernelObject]:
    """All objects of a per-peer plan as one set."""
    out: set[KernelObject] = set()
    for objects in plan.values():
        out |= objects
    return frozenset(out)


def _ordered(objects: Iterable[KernelObject], order: Mapping[str, int]) -> tuple[KernelObject, ...]:
    """Grouped by kind in `order`; within a kind by identity (deterministic, no
    ipaddress comparisons: this runs over every object of a 5,000-peer sync)."""
    groups: list[list[KernelObject]] = [[] for _ in order]
    for obj in objects:
        groups[order[obj.kind]].append(obj)
    out: list[KernelObject] = []
    for group in groups:
        group.sort(key=lambda o: o._ident)
        out.extend(group)
    return tuple(out)


def diff(desired: Iterable[KernelObject], current: Iterable[KernelObject]) -> PlanDiff:
    """What to add (by replace) and what to remove to turn `current` into `desired`.

    An object in `desired` but not exactly in `current` is added with a replace
    operation; an object in `current` whose key no object in `desired` has is
    removed. So a route to the same dst with another gateway is only replaced.
    """
    desired_set = desired if isinstance(desired, (set, frozenset)) else frozenset(desired)
    current_set = current if isinstance(current, (set, frozenset)) else frozenset(current)
    stale = current_set - desired_set
    to_remove: list[KernelObject] = []
    if stale:
        desired_keys = {obj.key for obj in desired_set}
        to_remove = [obj for obj in stale if obj.key not in desired_keys]
    return PlanDiff(_ordered(desired_set - current_set, _ADD_ORDER),
                    _ordered(to_remove, _REMOVE_ORDER))
