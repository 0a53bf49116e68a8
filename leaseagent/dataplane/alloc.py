"""The `alloc` backend: a lease and subnet.env, no data path (as flannel's alloc)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Collection, Mapping
from ipaddress import IPv4Network, IPv6Network
from typing import TYPE_CHECKING

from leaseagent.core.leases import LeaseValue, Peer, PeerChanges
from leaseagent.core.plan import BackendSpec, Observation
from leaseagent.core.profiles import alloc
from leaseagent.dataplane.base import BackendAttrs, DataPlaneSettings, DataPlaneStatus, DoctorFindings

if TYPE_CHECKING:
    from leaseagent.dataplane.kept import KeptDevices


class AllocBackend:
    backend_type = alloc.NAME

    def __init__(self, settings: DataPlaneSettings) -> None:
        self._settings = settings
        self.status = DataPlaneStatus()

    async def prepare(self, *, devices_at_sync: bool = False) -> BackendAttrs:
        return BackendAttrs(backend_type=self.backend_type, mtu=self._settings.flannel_mtu)

    async def start(self, own_subnet: IPv4Network, *, own_ipv6: IPv6Network | None = None
                    ) -> None:
        return None

    async def sync(self, peers: Mapping[IPv4Network, Peer], *,
                   ready: Awaitable[object] | None = None) -> None:
        if ready is not None:
            await ready
        self.status.in_sync = True

    async def update(self, changes: PeerChanges, peers: Mapping[IPv4Network, Peer], *,
                     ready: Awaitable[object] | None = None) -> None:
        if ready is not None:
            await ready

    async def run(self, get_peers: Callable[[], Mapping[IPv4Network, Peer]]) -> None:
        await asyncio.Event().wait()

    def spec(self, own_subnet: IPv4Network | None, peers: Mapping[IPv4Network, Peer], *,
             own_ipv6: IPv6Network | None = None) -> BackendSpec:
        return BackendSpec()

    async def observe(self) -> Observation:
        return Observation()

    async def remove(self, *, objects: bool = True) -> None:
        return None

    async def step_aside(self) -> bool:
        return False

    async def step_back(self) -> None:
        return None

    async def clear_the_way(self) -> None:
        return None

    async def take_over(self, in_use: Callable[[], Collection[str]]) -> KeptDevices | None:
        return None  # no kernel access: a device a rebuild to alloc kept stays (cleanup)

    async def doctor(self, own: LeaseValue | None, peers: Mapping[IPv4Network, Peer],
                     observed: Observation) -> DoctorFindings:
        return DoctorFindings()  # no data path: nothing of its own to check

    async def close(self) -> None:
        return None
