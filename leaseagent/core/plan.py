"""Desired kernel state from the peer set, and its comparison with what the kernel has.

Pure: no I/O, no netlink. A backend (leaseagent.dataplane) describes what it
wants as a `BackendSpec` (its devices as `DeviceSpec`s, its per-peer objects
from its profile's `plan_peer`, leaseagent.core.profiles) and reads what the kernel has
into an `Observation` of the same shapes; `compare` says what differs. The
backend's reconcile acts on the differences, `leasectl doctor` prints them,
the tests assert on them: one comparison for all three.

The objects (docs/architecture.md, "Kernel objects"), per family: IPv4 on
the vxlan device `flannel.<VNI>`, IPv6 (a dual-stack peer, on a host with an
IPv6 device or underlay address) on `flannel-v6.<VNI>`, as flannel lays them
out (pkg/backend/vxlan/vxlan_network.go, pkg/backend/route_network.go):

- vxlan, per peer and family: Neighbour(<subnet base> -> VtepMAC on the
  family's device), Fdb(VtepMAC -> PublicIP / PublicIPv6 on that device),
  Route(<subnet> via <subnet base> dev <that device> onlink). With
  DirectRouting and the peer's public address on a directly connected
  network: only Route(<subnet> via <public address> dev underlay).
- host-gw, per peer and family: Route(<subnet> via <public address> dev underlay).
- wireguard, per peer and family: WgPeer(its PublicKey on the family's device,
  endpoint <public address>:<Port>, the config's PSK and keepalive) and
  AllowedIP(<subnet> -> that key). Besides, the backend's own objects: one
  Route(<network> dev <device> scope link) per family (flannel's
  wireguard_network.go/device.go), kept under the network's key of the plan.

So a dual-stack vxlan peer has up to six objects. Peers stay keyed by their
IPv4 subnet (`PeerPlan`): the IPv6 objects are part of the same peer.

Identity. Each object has a `key`: what the kernel uses to tell two entries
apart for a *replace* (RTM_NEWROUTE/RTM_NEWNEIGH with NLM_F_REPLACE):

- Route: (dst, metric) in the main table of the dst's family. A route with
  the same dst but another gateway or device is replaced in place, never
  removed first. An IPv6 route given no metric is stored by the kernel at
  1024 (IP6_RT_PRIO_USER), so `Route` says so itself: what we plan is what a
  dump reads back.
- Neighbour: (ifindex, dst). A new lladdr replaces the entry.
- Fdb: (ifindex, lladdr). The kernel keeps one remote per unicast MAC of a
  vxlan device (several only for the all-zeros and multicast MACs, which are
  not ours): a new remote replaces the old one in place (NLM_F_REPLACE;
  NLM_F_APPEND to an existing unicast MAC is accepted and changes nothing,
  and removing the old remote afterwards would take the MAC's only entry).
- WgPeer: (device, public key): WireGuard knows a peer by its key. A new
  endpoint, PSK or keepalive is set in place; a new key is another peer.
- AllowedIP: (device, network): a device routes a network to exactly one peer;
  naming another key for it moves it. Two leases with one key (a host holding a
  leftover lease) share the WgPeer, as two leases with one VtepMAC share an FDB
  entry.

Invariants: a peer whose subnet would take over a route or address of this
host that is not ours (`host_conflict`: the underlay's connected route, a VPN
route, another interface's address) is never planned, whatever the backend
and family; a peer whose subnet is our own is never planned; peers of another
backend type are skipped (flannel does the same: a vxlan host does not route
to a host-gw lease and vice versa); order of application is fixed by `diff`:
removals route -> neighbour -> FDB, additions neighbour -> FDB -> route, so a
route never points at a neighbour that is not there yet.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from ipaddress import (
    IPv4Address,
    IPv4Interface,
    IPv4Network,
    IPv6Address,
    IPv6Interface,
    IPv6Network,
)
from operator import attrgetter
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:  # types only: the profiles below the lease model import this module
    from leaseagent.core.leases import Peer
    from leaseagent.core.network import Address, Network
    from leaseagent.core.profiles.base import LeaseData
    from leaseagent.core.profiles.wireguard import PresharedKey

MAIN_TABLE = 254
RT_SCOPE_UNIVERSE, RT_SCOPE_LINK = 0, 253
# The metric the kernel gives an IPv6 route added without one (IP6_RT_PRIO_USER).
IPV6_DEFAULT_METRIC = 1024


def span(network: Network) -> tuple[int, int]:
    """The first and the last address of `network` as numbers. Not ipaddress's
    `broadcast_address`, which caches itself and the hostmask on the object: two more
    addresses and a larger `__dict__` on each of thousands of peers' subnets (~290 B
    a peer; docs/benchmarks.md, "Memory at 5,000 peers")."""
    first = int(network.network_address)
    return first, first | ((1 << (network.max_prefixlen - network.prefixlen)) - 1)

Interface = IPv4Interface | IPv6Interface


# The objects are hashed and compared tens of thousands of times per sync
# (sets, diffs, the per-peer plan); ipaddress's __hash__/__eq__ are Python
# code, so each object computes an identity of plain ints and strings once
# (`_ident`) and its hash from that; equality compares identities, which
# are equal exactly when all fields are. Each identity holds the address
# family (4 or 6): 10.0.0.1 and ::a00:1 are one integer. The identity of a
# route, neighbour or FDB entry is made by one function each (`route_ident`,
# ...), which the raw rtnetlink reader calls too: a table dump is compared with
# the plan identity by identity, without an object per entry
# (leaseagent.dataplane.rtnl). Slots: no instance dict (docs/benchmarks.md).
# Each writes its own `__init__`, every field set once (a dataclass's would set the
# fields, then call `__post_init__` to set the identity: a plan makes three objects a
# peer, twice at a join and again at a removal), through its slot's own setter
# (`_setters`): `object.__setattr__`, which a frozen object needs otherwise, looks each
# name up (a fifth of making a Route).

Ident = tuple[object, ...]
_Setter = Callable[[object, object], None]


def _setters(cls: type, *names: str) -> tuple[_Setter, ...]:
    """The setters of `cls`'s slots `names` (which its frozen `__setattr__` refuses)."""
    return tuple(getattr(cls, name).__set__ for name in names)


def route_ident(version: int, dst: int, prefixlen: int, gateway: int, ifindex: int,
                onlink: bool, metric: int, scope: int) -> Ident:
    """A route's identity (`gateway` -1: none), as the kernel keeps it: an IPv6 route
    without a metric has 1024, and universe scope whatever it was given."""
    if version == 6:
        metric, scope = metric or IPV6_DEFAULT_METRIC, RT_SCOPE_UNIVERSE
    return (0, version, dst, prefixlen, gateway, ifindex, onlink, metric, scope)


def neighbour_ident(version: int, ifindex: int, dst: int, lladdr: str) -> Ident:
    return (1, version, ifindex, dst, lladdr)


def fdb_ident(version: int, ifindex: int, lladdr: str, dst: int) -> Ident:
    return (2, version, ifindex, lladdr, dst)


@dataclass(frozen=True, eq=False, slots=True, init=False)
class Route:
    """A unicast route (IPv4 or IPv6) in the main table, carrying our protocol number."""

    dst: Network
    gateway: Address | None
    ifindex: int
    onlink: bool = False
    metric: int = 0
    # RT_SCOPE_LINK for a route to a device without a gateway (wireguard's network
    # route, as `ip route add NET dev X` makes it). The kernel keeps no scope for an
    # IPv6 route (it reads back universe), so an IPv6 route says universe itself.
    scope: int = RT_SCOPE_UNIVERSE
    _ident: tuple[object, ...] = field(init=False, repr=False, compare=False)
    _hash: int = field(init=False, repr=False, compare=False)

    def __init__(self, dst: Network, gateway: Address | None, ifindex: int,
                 onlink: bool = False, metric: int = 0, scope: int = RT_SCOPE_UNIVERSE) -> None:
        ident = route_ident(dst.version, int(dst.network_address), dst.prefixlen,
                            int(gateway) if gateway is not None else -1,
                            ifindex, onlink, metric, scope)
        set_dst, set_gateway, set_ifindex, set_onlink, set_metric, set_scope, set_ident, \
            set_hash = _ROUTE_SETTERS
        set_dst(self, dst)
        set_gateway(self, gateway)
        set_ifindex(self, ifindex)
        set_onlink(self, onlink)
        set_metric(self, ident[7])
        set_scope(self, ident[8])
        set_ident(self, ident)
        set_hash(self, hash(ident))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Route) and self._ident == other._ident

    def __hash__(self) -> int:
        return self._hash

    @property
    def key(self) -> tuple[object, ...]:
        return ("route", self.dst, self.metric)

    kind = "route"


@dataclass(frozen=True, eq=False, slots=True, init=False)
class Neighbour:
    """A permanent neighbour entry: ARP (IPv4) or NDP (IPv6)."""

    ifindex: int
    dst: Address
    lladdr: str
    _ident: tuple[object, ...] = field(init=False, repr=False, compare=False)
    _hash: int = field(init=False, repr=False, compare=False)

    def __init__(self, ifindex: int, dst: Address, lladdr: str) -> None:
        ident = (1, dst.version, ifindex, int(dst), lladdr)  # neighbour_ident's
        set_ifindex, set_dst, set_lladdr, set_ident, set_hash = _NEIGHBOUR_SETTERS
        set_ifindex(self, ifindex)
        set_dst(self, dst)
        set_lladdr(self, lladdr)
        set_ident(self, ident)
        set_hash(self, hash(ident))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Neighbour) and self._ident == other._ident

    def __hash__(self) -> int:
        return self._hash

    @property
    def key(self) -> tuple[object, ...]:
        return ("neighbour", self.ifindex, self.dst)

    kind = "neighbour"


@dataclass(frozen=True, eq=False, slots=True, init=False)
class Fdb:
    """A permanent bridge FDB entry on a vxlan device: MAC -> remote VTEP (IPv4 or IPv6)."""

    ifindex: int
    lladdr: str
    dst: Address
    _ident: tuple[object, ...] = field(init=False, repr=False, compare=False)
    _hash: int = field(init=False, repr=False, compare=False)

    def __init__(self, ifindex: int, lladdr: str, dst: Address) -> None:
        ident = (2, dst.version, ifindex, lladdr, int(dst))  # fdb_ident's
        set_ifindex, set_lladdr, set_dst, set_ident, set_hash = _FDB_SETTERS
        set_ifindex(self, ifindex)
        set_lladdr(self, lladdr)
        set_dst(self, dst)
        set_ident(self, ident)
        set_hash(self, hash(ident))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Fdb) and self._ident == other._ident

    def __hash__(self) -> int:
        return self._hash

    @property
    def key(self) -> tuple[object, ...]:
        return ("fdb", self.ifindex, self.lladdr)

    kind = "fdb"


_ROUTE_SETTERS = _setters(Route, "dst", "gateway", "ifindex", "onlink", "metric", "scope",
                          "_ident", "_hash")
_NEIGHBOUR_SETTERS = _setters(Neighbour, "ifindex", "dst", "lladdr", "_ident", "_hash")
_FDB_SETTERS = _setters(Fdb, "ifindex", "lladdr", "dst", "_ident", "_hash")

Endpoint = tuple[IPv4Address | IPv6Address, int]  # a WireGuard peer's IP address and UDP port


@dataclass(frozen=True, eq=False, slots=True)
class WgPeer:
    """A peer of one of our WireGuard devices (by name: a device is addressed by name
    through its control socket or genetlink). `psk` None: no preshared key."""

    device: str
    public_key: str  # base64
    endpoint: Endpoint | None
    psk: PresharedKey | None = None
    keepalive: int = 0
    _ident: tuple[object, ...] = field(init=False, repr=False, compare=False)
    _hash: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        ep = (-1, 0, 0) if self.endpoint is None else (
            self.endpoint[0].version, int(self.endpoint[0]), self.endpoint[1])
        ident = (3, self.device, self.public_key, *ep,
                 self.psk.raw if self.psk is not None else b"", self.keepalive)
        object.__setattr__(self, "_ident", ident)
        object.__setattr__(self, "_hash", hash(ident))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, WgPeer) and self._ident == other._ident

    def __hash__(self) -> int:
        return self._hash

    @property
    def key(self) -> tuple[object, ...]:
        return ("peer", self.device, self.public_key)

    kind = "peer"


@dataclass(frozen=True, eq=False, slots=True)
class AllowedIP:
    """A network a WireGuard device routes to (and accepts from) the peer `public_key`."""

    device: str
    network: Network
    public_key: str
    _ident: tuple[object, ...] = field(init=False, repr=False, compare=False)
    _hash: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        ident = (4, self.device, self.network.version, int(self.network.network_address),
                 self.network.prefixlen, self.public_key)
        object.__setattr__(self, "_ident", ident)
        object.__setattr__(self, "_hash", hash(ident))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, AllowedIP) and self._ident == other._ident

    def __hash__(self) -> int:
        return self._hash

    @property
    def key(self) -> tuple[object, ...]:
        return ("allowed-ip", self.device, self.network)

    kind = "allowed-ip"


NetlinkObject = Route | Neighbour | Fdb  # what rtnetlink programs
WireguardObject = WgPeer | AllowedIP  # what a WireGuard device's configuration holds
KernelObject = NetlinkObject | WireguardObject
# Per peer subnet: the objects that peer needs. Backends keep this to undo a
# peer's objects on an incremental update without dumping kernel tables.
PeerPlan = Mapping[IPv4Network, frozenset[KernelObject]]

# A WireGuard peer exists before a network is routed to it, and goes after.
_ADD_ORDER = {"neighbour": 0, "fdb": 1, "peer": 2, "allowed-ip": 3, "route": 4}
_REMOVE_ORDER = {"route": 0, "neighbour": 1, "fdb": 2, "allowed-ip": 3, "peer": 4}


class PlanDiff(NamedTuple):
    """What to change, each already in the order it must be applied."""

    to_add: tuple[KernelObject, ...]
    to_remove: tuple[KernelObject, ...]


class IPv6Part(NamedTuple):
    """A dual-stack peer's IPv6 subnet, PublicIPv6 and BackendV6Data."""

    subnet: IPv6Network
    public_ip: IPv6Address
    data: LeaseData


def ipv6_part(peer: Peer) -> IPv6Part | None:
    """The peer's IPv6 part, or None for an IPv4-only peer."""
    if peer.ipv6_subnet is None or peer.public_ipv6 is None or peer.data6 is None:
        return None
    return IPv6Part(peer.ipv6_subnet, peer.public_ipv6, peer.data6)


def peer_keys(peer: Peer) -> frozenset[Address | Network]:
    """What the kernel objects serving `peer` are keyed on, whichever backend made
    them: its subnets (routes), their base addresses (vxlan's neighbour entries) and
    its public addresses (vxlan's FDB entries)."""
    keys: set[Address | Network] = {peer.subnet, peer.subnet.network_address, peer.public_ip}
    v6 = ipv6_part(peer)
    if v6 is not None:
        keys |= {v6.subnet, v6.subnet.network_address, v6.public_ip}
    return frozenset(keys)


def serves(obj: KernelObject, keys: Collection[Address | Network]) -> bool:
    """Whether `obj` is a route, neighbour or FDB entry of a peer whose `peer_keys` are
    among `keys` (what a roll-out keeps for a peer still on the old backend)."""
    if isinstance(obj, (Route, Neighbour, Fdb)):
        return obj.dst in keys
    return False


def flatten(plan: PeerPlan) -> frozenset[KernelObject]:
    """All objects of a per-peer plan as one set."""
    out: set[KernelObject] = set()
    for objects in plan.values():
        out |= objects
    return frozenset(out)


_IDENT = attrgetter("_ident")


def _ordered(objects: Iterable[KernelObject], order: Mapping[str, int]) -> tuple[KernelObject, ...]:
    """Grouped by kind in `order`; within a kind by identity (deterministic, no
    ipaddress comparisons: this runs over every object of a 5,000-peer sync)."""
    groups: list[list[KernelObject]] = [[] for _ in order]
    for obj in objects:
        groups[order[obj.kind]].append(obj)
    out: list[KernelObject] = []
    for group in groups:
        group.sort(key=_IDENT)
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
    return diff_found(desired_set, desired_set - current_set, current_set - desired_set)


def diff_found(desired: Collection[KernelObject], missing: Iterable[KernelObject],
               stale: Iterable[KernelObject]) -> PlanDiff:
    """`diff` once the kernel has been read against `desired`: `missing` are the objects
    of `desired` it lacks, `stale` those it has that are not in `desired`."""
    to_remove = list(stale)
    if to_remove and desired:  # nothing desired (a mass removal): every stale one goes
        desired_keys = {obj.key for obj in desired}
        to_remove = [obj for obj in to_remove if obj.key not in desired_keys]
    return PlanDiff(_ordered(missing, _ADD_ORDER), _ordered(to_remove, _REMOVE_ORDER))


# ------------------------------------------------------------------ devices


@dataclass(frozen=True, slots=True)
class VxlanAttrs:
    """The vxlan settings of a device (IFLA_VXLAN_*)."""

    vni: int
    port: int
    local: Address | None  # IPv4 for flannel.<VNI>, IPv6 for flannel-v6.<VNI>
    link: int  # underlay ifindex; 0 when not bound to one
    # The device's flags that are on (the vxlan profile's DEVICE_FLAGS, by the name a
    # difference shows), fixed at its creation; a flag not named is off.
    flags: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class WireguardAttrs:
    """The settings of a WireGuard device besides its peers. `public_key` None in a
    spec: any (doctor, which has no key to want)."""

    listen_port: int
    public_key: str | None


@dataclass(frozen=True, slots=True)
class DeviceState:
    """A device as the kernel has it. `addresses`: all of them but IPv6 link-local
    ones (the kernel gives every device one; they are not ours to judge)."""

    name: str
    index: int
    kind: str | None
    up: bool
    mac: str | None
    mtu: int
    addresses: tuple[Interface, ...] = ()
    vxlan: VxlanAttrs | None = None
    wireguard: WireguardAttrs | None = None  # None: no WireGuard control answers for it


@dataclass(frozen=True, slots=True)
class DeviceSpec:
    """A device as a backend wants it. `mac` None: any (the device keeps its own);
    `address` None: no address wanted yet (no lease held); `vxlan.link` 0: any.
    `address` is the one address of its family the device may hold; addresses of
    the other family are left alone (flannel's EnsureV4AddressOnLink and
    EnsureV6AddressOnLink each look at their own family)."""

    name: str
    kind: str
    mtu: int
    vxlan: VxlanAttrs | None = None
    mac: str | None = None
    address: Interface | None = None
    up: bool = True
    wireguard: WireguardAttrs | None = None


# How a difference is put right: the device created or made again (its settings are
# fixed at creation), or one attribute changed in place.
CREATE, RECREATE, SET_MTU, SET_MAC, SET_UP, ADD_ADDRESS, REMOVE_ADDRESS = (
    "create", "recreate", "mtu", "mac", "up", "add-address", "remove-address")
SET_WIREGUARD = "wireguard"  # its private key or listen port, set in place


@dataclass(frozen=True, slots=True)
class DeviceDifference:
    """One way a device differs from its spec: `what` differs, `have` vs `want`."""

    device: str
    what: str
    have: object
    want: object
    fix: str

    @property
    def text(self) -> str:
        if self.fix == CREATE:
            return f"device {self.device} is missing"
        if self.fix == SET_UP:
            return f"device {self.device} is down"
        if self.fix == ADD_ADDRESS:
            return f"address {self.want} missing on device {self.device}"
        if self.fix == REMOVE_ADDRESS:
            return f"address {self.have} on device {self.device} does not belong there"
        return f"device {self.device} {self.what} is {self.have}, want {self.want}"


def compare_device(spec: DeviceSpec, state: DeviceState | None) -> list[DeviceDifference]:
    """Every way `state` differs from `spec`; a missing or wrong-kind device is one
    difference (nothing else about it matters: it is made anew)."""
    name = spec.name

    def differ(what: str, have: object, want: object, fix: str) -> DeviceDifference:
        return DeviceDifference(name, what, have, want, fix)

    if state is None:
        return [differ("existence", None, spec.kind, CREATE)]
    if state.kind != spec.kind:
        return [differ("kind", state.kind or "plain", spec.kind, RECREATE)]
    out: list[DeviceDifference] = []
    if spec.vxlan is not None:
        have = state.vxlan
        want = spec.vxlan
        if have is None:
            return [differ("vxlan settings", None, want, RECREATE)]
        for what, got, wanted in (("VNI", have.vni, want.vni), ("port", have.port, want.port),
                                  ("local address", have.local, want.local)):
            if got != wanted:
                out.append(differ(what, got, wanted, RECREATE))
        for what in sorted(have.flags ^ want.flags):
            out.append(differ(what, what in have.flags, what in want.flags, RECREATE))
        if want.link and have.link != want.link:
            out.append(differ("underlay link", have.link, want.link, RECREATE))
    if spec.wireguard is not None:
        wg, want_wg = state.wireguard, spec.wireguard
        if wg is None:
            return [differ("WireGuard control", None, "answering", RECREATE)]
        if wg.listen_port != want_wg.listen_port:
            out.append(differ("listen port", wg.listen_port, want_wg.listen_port,
                              SET_WIREGUARD))
        if want_wg.public_key is not None and wg.public_key != want_wg.public_key:
            out.append(differ("public key", wg.public_key, want_wg.public_key, SET_WIREGUARD))
    if state.mtu != spec.mtu:
        out.append(differ("MTU", state.mtu, spec.mtu, SET_MTU))
    if spec.mac is not None and (state.mac or "").lower() != spec.mac:
        out.append(differ("MAC", (state.mac or "").lower(), spec.mac, SET_MAC))
    if spec.up and not state.up:
        out.append(differ("state", "down", "up", SET_UP))
    if spec.address is not None:
        if spec.address not in state.addresses:
            out.append(differ("address", None, spec.address, ADD_ADDRESS))
        for addr in state.addresses:
            if addr.version == spec.address.version and addr != spec.address:
                out.append(differ("address", addr, None, REMOVE_ADDRESS))
    return out


def needs_recreate(differences: Iterable[DeviceDifference]) -> bool:
    return any(d.fix in (CREATE, RECREATE) for d in differences)


# ------------------------------------------------------------------ a backend's whole state


@dataclass(frozen=True, slots=True)
class HostRoute:
    """A route or address of this host that is not ours (another protocol than our route
    protocol, or an address: a local-table route): what a peer's subnet must not cover.
    `connected`: a route with no gateway in link scope (the hosts on that link are
    reached directly, so a subnet inside it would take their traffic too)."""

    dst: Network
    connected: bool = False
    address: bool = False
    ifindex: int = 0  # its device (for the message)
    gateway: Address | None = None  # its gateway, if it has one
    # dst's first and last address as numbers: compared with every peer of a full pass
    # (ipaddress's subnet_of made a pass of 5,000 peers ~45 ms slower per such route).
    first: int = field(init=False, repr=False, compare=False)
    last: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        first, last = span(self.dst)
        object.__setattr__(self, "first", first)
        object.__setattr__(self, "last", last)

    @property
    def text(self) -> str:
        on = f" (link {self.ifindex})" if self.ifindex else ""
        if self.address:
            return f"address {self.dst.network_address}{on}"
        return f"{'connected route' if self.connected else 'route'} {self.dst}{on}"


def cluster_relevant(routes: Iterable[HostRoute], networks: Iterable[Network]
                     ) -> tuple[HostRoute, ...]:
    """The host routes that overlap a cluster network (the rest can never conflict with
    a valid lease: it lies inside the network). Default routes never conflict: every
    more specific route overrides them, which is how routing works."""
    nets = list(networks)
    return tuple(r for r in routes if r.dst.prefixlen > 0
                 and any(n.version == r.dst.version and n.overlaps(r.dst) for n in nets))


def host_conflict(peer: Peer, routes: Collection[HostRoute]) -> HostRoute | None:
    """The route or address of this host that `peer`'s subnets (IPv4 and, when it has
    one, IPv6) would take over, or None. A subnet conflicts with a host route inside it
    (or equal: programming it would replace that route) and with a connected route that
    holds it (the hosts on that link are reached directly). A broader route with a
    gateway is no conflict: the subnet's own route is more specific. `routes`: those
    `cluster_relevant` kept, usually none, so this costs nothing per peer then.

    No conflict: a route to exactly the peer's subnet through the gateway flanneld (or
    this agent, under another route protocol) uses for that peer: the subnet's base
    address (vxlan: `via <subnet base> dev flannel.<VNI> onlink`) or the peer's public
    address (host-gw). It is the peer's route, left by flanneld on a host switching to
    leaseagent; programming the peer replaces it (docs/flannel.md, "Migration")."""
    if not routes:
        return None
    return subnet_conflict((peer.subnet, peer.ipv6_subnet), routes,
                           publics=(peer.public_ip, peer.public_ipv6))


def subnet_conflict(subnets: Iterable[Network | None], routes: Collection[HostRoute], *,
                    publics: Iterable[Address | None] = ()) -> HostRoute | None:
    """`host_conflict` for bare subnets (a reservation's, say); `publics`: the public
    address of the host holding each subnet, in the same order, if known."""
    known = list(publics)
    for i, subnet in enumerate(subnets):
        public = known[i] if i < len(known) else None
        if subnet is None:
            continue
        version = subnet.version
        first, last = span(subnet)
        for route in routes:
            if route.dst.version != version:
                continue
            if (route.first == first and route.last == last and route.gateway is not None
                    and route.gateway in (subnet.network_address, public)):
                continue
            if (first <= route.first and route.last <= last) or (
                    route.connected and route.first <= first and last <= route.last):
                return route
    return None


@dataclass(frozen=True)
class BackendSpec:
    """Everything a backend wants in the kernel: its devices and, per peer, its objects.
    `skipped`: the peers it will not program here, with why: their subnet would take
    over a route or address of this host (`host_conflict`), or they claim what this
    host or another peer holds (vxlan: a VtepMAC)."""

    devices: tuple[DeviceSpec, ...] = ()
    objects: PeerPlan = field(default_factory=dict)
    skipped: Mapping[IPv4Network, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Observation:
    """What the kernel has of a backend: its devices by name (None: absent) and the
    objects it owns (routes carrying our protocol, permanent entries on its devices)."""

    devices: Mapping[str, DeviceState | None] = field(default_factory=dict)
    objects: frozenset[KernelObject] = frozenset()


@dataclass(frozen=True)
class Comparison:
    devices: tuple[DeviceDifference, ...]
    objects: PlanDiff

    def __bool__(self) -> bool:
        return bool(self.devices or self.objects.to_add or self.objects.to_remove)


def compare(spec: BackendSpec, observed: Observation) -> Comparison:
    """How the kernel differs from what the backend wants (see `compare_device`, `diff`)."""
    devices = tuple(d for dev in spec.devices
                    for d in compare_device(dev, observed.devices.get(dev.name)))
    return Comparison(devices, diff(flatten(spec.objects), observed.objects))
