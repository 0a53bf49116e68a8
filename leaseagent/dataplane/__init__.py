"""Data-plane backends, registered explicitly in BACKENDS (no import side effects).

A backend's module is imported when its type is first looked up, not with this
package: an agent runs one backend, and the others' modules (wireguard's, with
`cryptography`'s ~8 MiB) would only take memory (docs/benchmarks.md).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Mapping

from leaseagent.dataplane.base import DataPlane, DataPlaneSettings

Constructor = Callable[[DataPlaneSettings], DataPlane]


class _Registry(Mapping[str, Constructor]):
    """Backend type -> its class, imported from its module on first use."""

    def __init__(self, where: Mapping[str, tuple[str, str]]) -> None:
        self._where = dict(where)
        self._loaded: dict[str, Constructor] = {}

    def __getitem__(self, name: str) -> Constructor:
        found = self._loaded.get(name)
        if found is None:
            module, attr = self._where[name]
            found = self._loaded[name] = getattr(importlib.import_module(module), attr)
        return found

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


BACKENDS: Mapping[str, Constructor] = _Registry({
    "alloc": ("leaseagent.dataplane.alloc", "AllocBackend"),
    "vxlan": ("leaseagent.dataplane.vxlan", "VxlanBackend"),
    "host-gw": ("leaseagent.dataplane.hostgw", "HostGwBackend"),
    "wireguard": ("leaseagent.dataplane.wireguard", "WireguardBackend"),
})
