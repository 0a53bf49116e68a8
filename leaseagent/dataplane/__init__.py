"""Data-plane backends, registered explicitly in BACKENDS (no import side effects)."""

from __future__ import annotations

from collections.abc import Callable

from leaseagent.dataplane.alloc import AllocBackend
from leaseagent.dataplane.base import DataPlane, DataPlaneSettings
from leaseagent.dataplane.hostgw import HostGwBackend
from leaseagent.dataplane.vxlan import VxlanBackend
from leaseagent.dataplane.wireguard import WireguardBackend

BACKENDS: dict[str, Callable[[DataPlaneSettings], DataPlane]] = {
    "alloc": AllocBackend,
    "vxlan": VxlanBackend,
    "host-gw": HostGwBackend,
    "wireguard": WireguardBackend,
}
