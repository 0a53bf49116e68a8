"""The kernel port: all a kernel backend asks of the kernel, as one narrow Protocol.

The reconciler (leaseagent.dataplane.reconciling) and the backends built on it
(vxlan, host-gw, wireguard's devices) reach the kernel only through a `Kernel`
(a request socket of one network namespace) and the `KernelEvents` it opens
(a subscription to the kernel's broadcasts). Two adapters implement them:

- `leaseagent.dataplane.netlink.Netlink`: the real kernel, over rtnetlink.
- `leaseagent.dataplane.fakenetlink.FakeNetlink`: an in-memory kernel for
  tests and simulations, with the same semantics and errors (EEXIST, ENOENT,
  replace, dumps, an interrupted dump).

Which adapter a backend uses is `DataPlaneSettings.kernel` (a `KernelOpener`;
None: the real one). tests/contract/test_reconciler_contract.py runs one
suite against both.

The vocabulary (Link, Addr, Action, Failure, NetlinkEvent, Known,
DumpInterrupted) is the netlink adapter's, so both adapters speak it.
Errors: every method raises `leaseagent.errors.DataPlaneError` (a dump whose
table changed under it: `DumpInterrupted`, which `read_again` retries);
`apply` never raises for one object but returns it as a `Failure`.
"""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from leaseagent.core.network import Address
    from leaseagent.core.plan import (
        DeviceState,
        Fdb,
        HostRoute,
        Interface,
        KernelObject,
        Neighbour,
        Route,
    )
    from leaseagent.dataplane.netlink import Action, Addr, Failure, Known, Link, NetlinkEvent


class KernelEvents(Protocol):
    """A subscription to link, neighbour (both families and the FDB) and route broadcasts."""

    async def receive(self, *, ignore: frozenset[int] = frozenset(),
                      unsent_additions: bool = True) -> list[NetlinkEvent]:
        """The next events (one or more) not caused by a port in `ignore`, and unless
        `unsent_additions` none of the neighbour and FDB additions told with port id 0
        (the kernel's own, and every FDB addition: the kernel names no port for them);
        DataPlaneError when the subscription is broken (close it and open another)."""
        ...

    def close(self) -> None: ...


class Kernel(Protocol):
    """A request socket of one network namespace (see leaseagent.dataplane.netlink)."""

    netns: str | None

    @property
    def port_ids(self) -> frozenset[int]:
        """The port ids the kernel puts in the broadcasts our requests cause."""
        ...

    def close(self) -> None: ...

    async def events(self) -> KernelEvents:
        """A new subscription to the namespace's broadcasts."""
        ...

    # links and addresses
    async def links(self) -> list[Link]: ...

    async def link_by_name(self, name: str) -> Link | None: ...

    async def link_by_index(self, index: int) -> Link | None: ...

    async def device_state(self, name: str) -> DeviceState | None: ...

    async def create_vxlan(self, name: str, *, vni: int, port: int, local: Address, link: int,
                           mtu: int, mac: str, flags: frozenset[str] = frozenset()
                           ) -> Link: ...

    async def create_link(self, name: str, kind: str) -> None: ...

    async def delete_link(self, index: int) -> None: ...

    async def rename_link(self, index: int, name: str) -> None: ...

    async def set_link(self, index: int, *, mtu: int | None = None, up: bool | None = None,
                       mac: str | None = None) -> None: ...

    async def addresses(self, family: int = socket.AF_UNSPEC, *, index: int | None = None
                        ) -> list[Addr]: ...

    async def add_address(self, index: int, address: Interface) -> None: ...

    async def delete_address(self, index: int, address: Interface) -> None: ...

    # the objects we own: dumped as a full sync wants them, and changed in batches
    async def scan_routes(self, known: Known, *, protocol: int, family: int = socket.AF_UNSPEC,
                          others: Callable[[HostRoute], None] | None = None) -> list[Route]: ...

    async def scan_neighbours(self, known: Known, ifindex: int, *,
                              family: int = socket.AF_UNSPEC) -> list[Neighbour]: ...

    async def scan_fdb(self, known: Known, ifindex: int, *, own_mac: str | None = None
                       ) -> list[Fdb]: ...

    async def apply(self, action: Action, objects: Sequence[KernelObject], *, protocol: int
                    ) -> tuple[list[KernelObject], list[Failure]]: ...

    async def move(self, pairs: Sequence[tuple[KernelObject, KernelObject]], *, protocol: int
                   ) -> tuple[list[KernelObject], list[Failure]]:
        """Each (old, new): `old` removed and `new` put in, the two requests back to back
        in one send (nothing of user space runs between them: a route the kernel will
        not replace in place, IPv6's onlink route to a new device); (the new objects
        put in, the failures of either step; an `old` already gone is removed)."""
        ...


# Opens a Kernel in a network namespace (None: the agent's own).
KernelOpener = Callable[[str | None], Awaitable[Kernel]]
