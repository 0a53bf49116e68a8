"""The host-gw backend: one route per peer, no encapsulation (docs/architecture.md).

Per peer: `<peer subnet> via <peer PublicIP> dev <underlay>`, carrying our
route protocol number. It only works when every host sits on one L2
segment (the PublicIP must be a next hop the kernel can reach directly),
so `prepare` insists that this host's PublicIP is an address of the
underlay interface, as flannel does; otherwise peers would route to an
address that is not ours.

The kernel drops these routes silently when the underlay goes down; the
underlay's link events wake a resync (see leaseagent.dataplane.reconciling),
which puts them back once it is up again.
"""

from __future__ import annotations

from ipaddress import IPv4Network

from leaseagent.core.leases import Peer
from leaseagent.core.plan import KernelObject, plan_host_gw_peer
from leaseagent.dataplane.base import BackendAttrs
from leaseagent.dataplane.netlink import Netlink
from leaseagent.dataplane.reconciling import ReconcilingBackend
from leaseagent.errors import ConfigError


class HostGwBackend(ReconcilingBackend):
    """flannel's host-gw backend, with resync and drift repair."""

    backend_type = "host-gw"

    async def prepare(self) -> BackendAttrs:
        host = self._settings.host
        if not host.iface or not host.iface_index:
            raise ConfigError("host-gw needs the underlay interface (--iface)")
        async with self._lock:
            nl = await self._netlink()
            link = await nl.link_by_index(host.iface_index)
            if link is None:
                raise ConfigError(f"--iface {host.iface}: the interface no longer exists")
            addresses = {addr.ip for _, addr in await nl.ipv4_addresses(link.index)}
        if host.public_ip not in addresses:
            raise ConfigError(
                f"host-gw: PublicIP {host.public_ip} is not an address of {host.iface}; "
                "host-gw needs all hosts on one L2 segment (set --public-ip to an address "
                "of the interface or use the vxlan backend)"
            )
        return BackendAttrs(backend_type="host-gw", mtu=link.mtu)

    async def start(self, own_subnet: IPv4Network) -> None:
        async with self._lock:
            self._own_subnet = own_subnet

    def _plan_peer(self, peer: Peer) -> frozenset[KernelObject]:
        return plan_host_gw_peer(peer, self._settings.host.iface_index)

    async def _current(self, nl: Netlink) -> set[KernelObject]:
        return set(await nl.routes(protocol=self._settings.route_protocol))
