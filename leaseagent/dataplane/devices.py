"""Putting a device's in-place differences right: one rule for every backend's devices.

`core.plan.compare_device` says how a device differs from its spec, and each
difference says how it is fixed (`fix`). A device to create or re-create is
the backend's own business (a vxlan device keeps its MAC, a WireGuard device
needs its driver); what can be changed in place is the same for all of them
and done here: MTU, MAC, up, the lease's address added and any other address
of its family removed. A fix this module does not know (WireGuard's key and
port) goes to the caller's `other`.

A `repair` (someone changed the device under a running agent) is logged at
INFO, the routine fixes of a start at DEBUG.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable

from leaseagent.core.plan import (
    ADD_ADDRESS,
    REMOVE_ADDRESS,
    SET_MAC,
    SET_MTU,
    SET_UP,
    DeviceDifference,
    DeviceSpec,
    DeviceState,
    Interface,
)
from leaseagent.dataplane.kernelport import Kernel

log = logging.getLogger("leaseagent.dataplane")


async def fix_in_place(
    nl: Kernel,
    state: DeviceState,
    spec: DeviceSpec,
    differences: Iterable[DeviceDifference],
    *,
    repair: bool = False,
    other: Callable[[DeviceDifference], Awaitable[bool]] | None = None,
) -> bool:
    """Apply every in-place fix of `differences` to the device; True if anything was
    changed. Re-creations are not in-place fixes and are skipped."""
    changed = False
    for difference in differences:
        fix = difference.fix
        if fix == SET_MTU:
            await nl.set_link(state.index, mtu=spec.mtu)
        elif fix == SET_MAC:
            await nl.set_link(state.index, mac=spec.mac)
        elif fix == SET_UP:
            await nl.set_link(state.index, up=True)
        elif fix == ADD_ADDRESS:
            assert spec.address is not None
            await nl.add_address(state.index, spec.address)
        elif fix == REMOVE_ADDRESS:
            assert isinstance(difference.have, Interface)
            await nl.delete_address(state.index, difference.have)
        elif other is None or not await other(difference):
            continue
        log.log(logging.INFO if repair else logging.DEBUG, "%s; fixed", difference.text)
        changed = True
    return changed
