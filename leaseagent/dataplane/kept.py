"""Devices of ours that the running backend does not use, found at start: what a rebuild's
hold kept when the agent stopped within it (docs/architecture.md, "Config changes").

A rebuild keeps the replaced backend's devices until --peer-hold-time after no peer
runs another type (`Plane.leaving`): the flannel.<VNI> that a change to host-gw or to
another VNI leaves, a Port change's flaside.<VNI>. An agent stopped or killed within
that time leaves them in the kernel, and the backend that starts next does not know
their names. Peers that have not switched yet still send to them, and a vxlan device
accepts VXLAN from anyone unless the peer filter guards its port. So at start, every
device of ours (a backend profile's `owns_link`, the rule `leasectl cleanup` and
doctor use) that the backend does not want is taken over as kept (`KeptDevices`, the
plane's `leaving`): its port is guarded, and it is removed --peer-hold-time after no
peer runs another type, the hold counted again from the start. Only a device that
cannot stand beside one the backend wants (`in_the_way`: a vxlan device on the same
VNI and port in the same family, which the kernel refuses twice: the config changed
back while the agent was down) takes that one's name before the backend prepares,
the device of that name put aside and kept (`VxlanBackend.clear_the_way`, as a change
back within the hold does); where a name will not fit it is removed, and the wanted
device receives on that port instead.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from ipaddress import IPv4Network, IPv6Network
from typing import TYPE_CHECKING

from leaseagent.core.plan import BackendSpec, DeviceSpec
from leaseagent.core.profiles import BACKEND_TYPES

if TYPE_CHECKING:
    from leaseagent.core.leases import Peer
    from leaseagent.dataplane.base import DataPlaneSettings
    from leaseagent.dataplane.kernelport import Kernel
    from leaseagent.dataplane.netlink import Link

log = logging.getLogger("leaseagent.dataplane")


def ours(links: Iterable[Link]) -> list[Link]:
    """The links a backend profile owns (`BackendProfile.owns_link`)."""
    return [link for link in links
            if any(p.owns_link(link.kind, link.name) for p in BACKEND_TYPES.values())]


def unused(links: Iterable[Link], wanted: Collection[str]) -> list[Link]:
    """The links of ours not named `wanted` (the backend's devices): kept, or left by an
    agent stopped within a hold, and taken over at the next start."""
    return [link for link in ours(links) if link.name not in wanted]


def in_the_way(link: Link, wanted: Iterable[DeviceSpec]) -> bool:
    """Whether `link` keeps a `wanted` device of another name from being made: both
    vxlan on the same VNI and port in the same family (the kernel refuses the second)."""
    have = link.vxlan
    if have is None or have.local is None:
        return False
    return any(w.name != link.name and w.vxlan is not None and w.vxlan.local is not None
               and (w.vxlan.vni, w.vxlan.port, w.vxlan.local.version)
               == (have.vni, have.port, have.local.version) for w in wanted)


def describe(link: Link) -> str:
    """`link` as a log or doctor line names it: "flannel.1 (vxlan VNI 1, UDP 8472)"."""
    attrs = link.vxlan
    if attrs is None:
        return f"{link.name} ({link.kind or 'device'})"
    return f"{link.name} (vxlan VNI {attrs.vni}, UDP {attrs.port})"


class KeptDevices:
    """The devices of ours a backend found unused at start, kept as a rebuild keeps the
    replaced backend's (`Plane.leaving`): `spec` names them (the peer filter guards their
    ports, `core.rules.receive_ports`), `remove(objects=False)` deletes them. A device
    the running backend has taken over since by name (`in_use`: a change back to the
    config that made it) is neither named nor removed; nor is one renamed since."""

    def __init__(self, settings: DataPlaneSettings, links: Sequence[Link],
                 in_use: Callable[[], Collection[str]]) -> None:
        self._settings = settings
        self._links = tuple(links)
        self._in_use = in_use

    def spec(self, own_subnet: IPv4Network | None, peers: Mapping[IPv4Network, Peer], *,
             own_ipv6: IPv6Network | None = None) -> BackendSpec:
        in_use = self._in_use()
        return BackendSpec(devices=tuple(
            DeviceSpec(name=link.name, kind=link.kind or "", mtu=0, vxlan=link.vxlan)
            for link in self._links if link.name not in in_use))

    async def remove(self, *, objects: bool = True) -> None:
        """Delete each device still there under its name (what is on it goes with it)."""
        in_use = self._in_use()
        nl: Kernel = await self._settings.open_kernel()
        try:
            for link in self._links:
                now = await nl.link_by_index(link.index)
                if now is None or now.name != link.name or link.name in in_use:
                    continue
                log.info("removing %s (kept from before a restart, its hold over)",
                         describe(link))
                await nl.delete_link(link.index)
        finally:
            nl.close()

    async def close(self) -> None:
        return None
