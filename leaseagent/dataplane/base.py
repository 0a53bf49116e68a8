"""The data-plane port: what the control plane asks of a backend, and what it reports.

Life cycle, driven by the agent (leaseagent.agent):

    attrs = await dp.prepare(devices_at_sync=True)
                                        # before the lease: VtepMACs, MTU; devices
                                        #   there adopted, the others left to sync
    await dp.start(own_subnet, own_ipv6=own_ipv6)
                                        # lease held: own addresses on the devices
    await dp.sync(peers, ready=...)     # first complete list: devices made, full
                                        #   reconcile, removes entries of vanished peers
    await dp.update(changes, peers, ready=...)
                                        # each pass of watch events
    task: await dp.run(get_peers)       # periodic resync + netlink drift repair
    await dp.close()                    # stop: never removes peer state

On a network config change (docs/architecture.md, "Config changes") the
agent closes the running instance and starts a new one on the new settings,
which adopts the kernel state and reconciles it (in place). For a rebuild
(another backend type) whose devices the new one does not share, the new one
is built beside the old and takes its routes over (a route replace), then

    await dp.remove(objects=False)      # the old backend's devices, with what is on them

once no peer runs the old type any more; with a device shared (one name), first

    await dp.remove()                   # the backend's kernel objects and devices, all gone

An agent stopped before then leaves the old devices; the next start takes them over
(leaseagent.dataplane.kept):

    await dp.clear_the_way()            # one that would block a wanted device: its name
    attrs = await dp.prepare(devices_at_sync=True)
    kept = await dp.take_over(in_use)   # the others, removed --peer-hold-time later

Read-only, for `leasectl doctor` and the tests as much as for reconcile:

    dp.spec(own_subnet, peers, own_ipv6=own_ipv6)
                                        # pure: what the backend wants (core.plan.BackendSpec)
    await dp.observe()                  # what the kernel has of it (core.plan.Observation)

and `core.plan.compare(spec, observation)` says what differs. A backend that
was never prepared (doctor) learns its device from `observe()`.

`sync` is level-triggered: it computes the desired kernel state from the
whole peer set, reads what the kernel has (only objects the agent owns),
and applies the difference. `update` may be incremental but must converge
to the same state. Nothing is removed before the first `sync`. Both await
`ready` (when given) after planning and before changing anything: the agent
passes its traffic rules' admission of new peers, which must be in place
before their routes, and whose processes so run while the plan is made.

Dual-stack: the data plane works in IPv6 too when the network config has an
IPv6 range and this host an IPv6 address to publish (`HostInfo.public_ipv6`;
`ipv6_enabled` says both); `own_ipv6` is then the IPv6 part of this host's
lease. Without either, everything is as on an IPv4-only network.

A backend reports its state in `status` (in sync, last error, what it
added, removed and repaired, how long reconciles took); it never touches
metrics. The agent decides readiness from `status` and exports the metrics
from it (leaseagent.metrics).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Interface, IPv4Network, IPv6Address, IPv6Interface, IPv6Network
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from leaseagent.core.diagnosis import Problem
from leaseagent.core.leases import LeaseValue, Peer, PeerChanges
from leaseagent.core.network import NetworkConfig
from leaseagent.core.plan import BackendSpec, Observation

if TYPE_CHECKING:
    from leaseagent.dataplane.kept import KeptDevices
    from leaseagent.dataplane.kernelport import Kernel, KernelOpener

# rtnetlink protocol number on every route we add. iproute2's rt_protos names
# 0-4 (kernel, boot, static), 8-19 and 42 onwards for routing daemons (bird 12,
# zebra 11, babel 42, bgp 186, isis 187, ospf 188, rip 189, eigrp 192, ...);
# 0x4c ("L") = 76 is unassigned.
DEFAULT_ROUTE_PROTOCOL = 76
DEFAULT_RESYNC_SECONDS = 30.0

# Buckets of the reconcile duration histogram, in seconds.
RECONCILE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


@dataclass(frozen=True)
class InterfaceChoice:
    """How the underlay interface is found (flanneld's flags, tried in its order): each
    `--iface` (a name or an address of one) in turn, the first that matches winning;
    then each `--iface-regex`, matched against the interfaces' IPv4 addresses, then
    their names; then the interface `--iface-can-reach` is routed through. None
    given: the interface of the default route."""

    names: tuple[str, ...] = ()
    regexes: tuple[str, ...] = ()
    can_reach: str | None = None

    def __bool__(self) -> bool:
        return bool(self.names or self.regexes or self.can_reach)

    @property
    def text(self) -> str:
        """The flags as given, for messages."""
        return " ".join([*(f"--iface {n}" for n in self.names),
                         *(f"--iface-regex {r}" for r in self.regexes),
                         *([f"--iface-can-reach {self.can_reach}"] if self.can_reach else [])])


@dataclass(frozen=True)
class HostInfo:
    """This host as the data plane sees it."""

    public_ip: IPv4Address
    iface: str | None = None  # underlay interface; None only for alloc with --public-ip
    iface_index: int = 0
    iface_mtu: int = 1500
    public_ipv6: IPv6Address | None = None  # PublicIPv6; None: this host publishes no IPv6
    # The underlay interface's addresses with their prefixes (both families): the
    # networks a cluster Network must stay out of (core.network.host_overlap).
    underlay: tuple[IPv4Interface | IPv6Interface, ...] = ()

    def own_addresses(self, *, public_ip: str = "this host's PublicIP"
                      ) -> list[tuple[IPv4Address | IPv6Address | IPv4Network | IPv6Network,
                                      str]]:
        """This host's addresses and underlay networks, each with what it is (`public_ip`:
        what to call the PublicIP): what a cluster Network may not hold
        (core.network.host_overlap)."""
        out: list[tuple[IPv4Address | IPv6Address | IPv4Network | IPv6Network, str]] = [
            (self.public_ip, public_ip)]
        if self.public_ipv6 is not None:
            out.append((self.public_ipv6, "this host's PublicIPv6"))
        for address in self.underlay:
            if address.network.prefixlen < address.network.max_prefixlen and \
                    not address.ip.is_link_local:
                out.append((address.network, f"the network of {self.iface} ({address})"))
        return out


@dataclass(frozen=True)
class BackendAttrs:
    """What a backend publishes in the lease (BackendData, BackendV6Data: flannel's
    LeaseAttrs) and in subnet.env (FLANNEL_MTU: the smallest MTU of its devices)."""

    backend_type: str
    mtu: int
    backend_data: Mapping[str, Any] = field(default_factory=dict)
    backend_v6_data: Mapping[str, Any] = field(default_factory=dict)  # empty: no IPv6


@dataclass(frozen=True)
class DataPlaneSettings:
    network: NetworkConfig
    host: HostInfo
    state_dir: Path
    route_protocol: int = DEFAULT_ROUTE_PROTOCOL
    resync_seconds: float = DEFAULT_RESYNC_SECONDS
    # --peer-hold-time: how long what a config change replaced stays (wireguard: a moved
    # port's redirect, leaseagent.dataplane.portmove)
    hold_seconds: float = 0.0
    netns: str | None = None  # for tests and the lab: program another namespace
    # How the backend opens the kernel (leaseagent.dataplane.kernelport); None: the real
    # one over netlink. A simulation or a test passes FakeNetlink's (fakenetlink.py).
    kernel: KernelOpener | None = None

    async def open_kernel(self) -> Kernel:
        """A request socket of `netns`, through `kernel` (None: rtnetlink)."""
        if self.kernel is not None:
            return await self.kernel(self.netns)
        from leaseagent.dataplane.netlink import Netlink

        return await Netlink.open(self.netns)

    @property
    def flannel_mtu(self) -> int:
        """FLANNEL_MTU on this host: its backend profile's rule (core.profiles, `mtu`)
        for the underlay's MTU and the devices in use."""
        return self.network.profile.mtu(self.network.options, self.host.iface_mtu,
                                        self.ipv6_enabled)

    @property
    def ipv6_enabled(self) -> bool:
        """Whether the data plane works in IPv6 too: the network has an IPv6 range
        and this host a PublicIPv6."""
        return self.network.ipv6 is not None and self.host.public_ipv6 is not None


@dataclass
class Durations:
    """A histogram's state: how many observations fell at or below each bucket."""

    buckets: tuple[float, ...] = RECONCILE_BUCKETS
    counts: list[int] = field(default_factory=lambda: [0] * len(RECONCILE_BUCKETS))
    count: int = 0
    total: float = 0.0

    def observe(self, seconds: float) -> None:
        self.count += 1
        self.total += seconds
        for i, bound in enumerate(self.buckets):
            if seconds <= bound:
                self.counts[i] += 1


@dataclass
class DataPlaneStatus:
    """What a backend reports about itself. Counters only grow; kinds are
    "route", "neighbour", "fdb", "peer", "allowed-ip" and, for repairs, "device"."""

    in_sync: bool = False
    last_error: str | None = None
    added: Counter[str] = field(default_factory=Counter)
    removed: Counter[str] = field(default_factory=Counter)
    repairs: Counter[str] = field(default_factory=Counter)
    reconciles: Durations = field(default_factory=Durations)
    foreign_peers: int = 0  # peers of another backend type: not programmed, unreachable
    # Peers not programmed here, with why: their subnet would take over a route or
    # address of this host that is not ours (core.plan.host_conflict), or they claim
    # what this host or another peer holds (vxlan: a VtepMAC).
    conflicting_peers: dict[IPv4Network, str] = field(default_factory=dict)
    # Peers some of whose objects the kernel refused at the last attempt (host-gw: a
    # gateway not on the link), each with what was refused and why: unreachable from
    # this host, retried at every resync. They do not make the data plane out of sync:
    # `in_sync` is about this host's own objects and every other peer's.
    refused_peers: dict[IPv4Network, str] = field(default_factory=dict)


@dataclass(frozen=True)
class DoctorFindings:
    """What a backend's own doctor checks found (`DataPlane.doctor`): its problems, and
    what doctor's ok line adds about it (wireguard: the driver and the public key)."""

    problems: list[Problem] = field(default_factory=list)
    summary: str = ""


class DataPlane(Protocol):
    status: DataPlaneStatus

    async def prepare(self, *, devices_at_sync: bool = False) -> BackendAttrs:
        """The devices made or adopted, what the lease publishes (VtepMAC, public key)
        chosen. `devices_at_sync` (the agent's start): a device that is not there yet
        may be left to the first `sync` to make, after the lease and its listing's
        judging, with what `prepare` chose (vxlan: the stored or a new random MAC,
        stored now); a config change makes them here, before anything changes."""
        ...

    async def start(self, own_subnet: IPv4Network, *, own_ipv6: IPv6Network | None = None
                    ) -> None: ...

    async def sync(self, peers: Mapping[IPv4Network, Peer], *,
                   ready: Awaitable[object] | None = None) -> None: ...

    async def update(self, changes: PeerChanges, peers: Mapping[IPv4Network, Peer], *,
                     ready: Awaitable[object] | None = None) -> None: ...

    async def run(self, get_peers: Callable[[], Mapping[IPv4Network, Peer]]) -> None: ...

    def spec(self, own_subnet: IPv4Network | None, peers: Mapping[IPv4Network, Peer], *,
             own_ipv6: IPv6Network | None = None) -> BackendSpec: ...

    async def observe(self) -> Observation: ...

    async def remove(self, *, objects: bool = True) -> None: ...

    async def step_aside(self) -> bool:
        """Before a rebuild to a new instance that wants this one's device names but
        cannot adopt the devices (vxlan: another Port): rename them out of its way, in
        use, so the new one is made beside them; `remove(objects=False)` takes them under
        their new names. False when this backend cannot (nothing changed)."""
        ...

    async def step_back(self) -> None:
        """Undo `step_aside` (the new instance could not be prepared)."""
        ...

    async def clear_the_way(self) -> None:
        """At start, before `prepare`: each device of ours that would keep one this backend
        wants from being made (leaseagent.dataplane.kept) takes that one's name (the
        device of that name put aside), or is removed where it cannot."""
        ...

    async def take_over(self, in_use: Callable[[], Collection[str]]) -> KeptDevices | None:
        """At start, after `prepare`: the devices of ours this backend does not use (a
        rebuild's, kept within its hold when the agent stopped), to keep as a rebuild
        keeps the replaced backend's (leaseagent.dataplane.kept); `in_use`: the names
        the running backend's devices have, whichever backend runs by then."""
        ...

    async def doctor(self, own: LeaseValue | None, peers: Mapping[IPv4Network, Peer],
                     observed: Observation) -> DoctorFindings:
        """`leasectl doctor`'s checks of this backend beyond the comparison of `spec` and
        `observe` (given `own`, this host's lease value, and `observed`): what needs the
        kernel or the state directory and is the backend's alone."""
        ...

    async def close(self) -> None: ...
