"""Data-plane backends, registered explicitly in BACKENDS (no import side effects).

Each entry imports its backend's module when it is called, not with this
package: an agent runs one backend, and the others' modules (wireguard's, with
`cryptography`'s ~8 MiB) would only take memory.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from leaseagent.core.profiles import alloc, hostgw, vxlan, wireguard
from leaseagent.dataplane.base import DataPlane, DataPlaneSettings

Constructor = Callable[[DataPlaneSettings], DataPlane]


def _alloc(settings: DataPlaneSettings) -> DataPlane:
    from leaseagent.dataplane.alloc import AllocBackend

    return AllocBackend(settings)


def _vxlan(settings: DataPlaneSettings) -> DataPlane:
    from leaseagent.dataplane.vxlan import VxlanBackend

    return VxlanBackend(settings)


def _host_gw(settings: DataPlaneSettings) -> DataPlane:
    from leaseagent.dataplane.hostgw import HostGwBackend

    return HostGwBackend(settings)


def _wireguard(settings: DataPlaneSettings) -> DataPlane:
    from leaseagent.dataplane.wireguard import WireguardBackend

    return WireguardBackend(settings)


BACKENDS: Mapping[str, Constructor] = {
    alloc.NAME: _alloc,
    vxlan.NAME: _vxlan,
    hostgw.NAME: _host_gw,
    wireguard.NAME: _wireguard,
}
