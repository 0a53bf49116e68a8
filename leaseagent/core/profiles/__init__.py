"""The backend profiles: one module per backend type, and their registry.

Each module (vxlan, hostgw, wireguard, alloc) holds everything about its type
that does not need the kernel: its config fields and how flannel decodes them,
its devices, its MTU rule, the BackendData it publishes and accepts, its kernel
objects per peer, what traffic rules it needs, what `leasectl cleanup` removes
(leaseagent.core.profiles.base, `BackendProfile`). The rest of the code asks the
profile of the network's type and never compares the backend's name.

`BACKEND_TYPES` is the registry: a plain mapping, written out here. The data
plane (leaseagent.dataplane.BACKENDS) registers one implementation per type
under the same names; a unit test checks that the two registries name the same
types. Adding a backend type: a module here, its implementation in
leaseagent.dataplane, one line in each registry (docs/architecture.md,
"Backend profiles").
"""

from __future__ import annotations

from leaseagent.core.profiles import alloc, hostgw, vxlan, wireguard
from leaseagent.core.profiles.base import BackendProfile
from leaseagent.errors import NetworkConfigError

DEFAULT_BACKEND = vxlan.NAME

BACKEND_TYPES: dict[str, BackendProfile] = {
    vxlan.NAME: vxlan.PROFILE,
    hostgw.NAME: hostgw.PROFILE,
    wireguard.NAME: wireguard.PROFILE,
    alloc.NAME: alloc.PROFILE,
}


def backend_type(name: str) -> BackendProfile:
    """The registered type `name`; NetworkConfigError naming the supported ones if unknown."""
    found = BACKEND_TYPES.get(name)
    if found is None:
        raise NetworkConfigError(
            f"Backend.Type={name!r}: not supported (supported: {', '.join(sorted(BACKEND_TYPES))})")
    return found
