"""The host-gw backend: one route per peer and family, no encapsulation (docs/architecture.md).

Per peer: `<peer subnet> via <peer PublicIP> dev <underlay>`, and on a
dual-stack network with a PublicIPv6, for a dual-stack peer, `<peer IPv6
subnet> via <peer PublicIPv6> dev <underlay>` (flannel's
pkg/backend/hostgw, pkg/backend/route_network.go), each carrying our route
protocol number. It only works when every host sits on one L2 segment (the
public address must be a next hop the kernel can reach directly), so
`prepare` insists that this host's PublicIP, and PublicIPv6 when IPv6 is
on, are addresses of the underlay interface, as flannel does for the
PublicIP; otherwise peers would route to an address that is not ours.

The kernel drops these routes silently when the underlay goes down; the
underlay's link events wake a resync (see leaseagent.dataplane.reconciling),
which puts them back once it is up again.
"""

from __future__ import annotations

from collections.abc import Mapping
from ipaddress import IPv4Network

from leaseagent.core.diagnosis import Problem, gateway_problems, problem
from leaseagent.core.leases import LeaseValue, Peer
from leaseagent.core.network import Address
from leaseagent.core.plan import KernelObject, Observation
from leaseagent.core.profiles import hostgw
from leaseagent.dataplane.base import BackendAttrs, DoctorFindings
from leaseagent.dataplane.kernelport import Kernel
from leaseagent.dataplane.netlink import Known
from leaseagent.dataplane.reconciling import ReconcilingBackend
from leaseagent.errors import ConfigError


class HostGwBackend(ReconcilingBackend):
    """flannel's host-gw backend, with resync and drift repair."""

    backend_type = hostgw.NAME

    async def prepare(self, *, devices_at_sync: bool = False) -> BackendAttrs:
        host = self._settings.host
        if not host.iface or not host.iface_index:
            raise ConfigError("host-gw needs the underlay interface (--iface)")
        async with self._lock:
            nl = await self._netlink()
            link = await nl.link_by_index(host.iface_index)
            if link is None:
                raise ConfigError(f"--iface {host.iface}: the interface no longer exists")
            addresses = {a.interface.ip for a in await nl.addresses(index=link.index)}
        public: list[tuple[str, Address, str]] = [("PublicIP", host.public_ip, "--public-ip")]
        if self._settings.ipv6_enabled and host.public_ipv6 is not None:
            public.append(("PublicIPv6", host.public_ipv6, "--public-ipv6"))
        for name, ip, flag in public:
            if ip not in addresses:
                raise ConfigError(
                    f"host-gw: {name} {ip} is not an address of {host.iface}; host-gw needs "
                    f"all hosts on one L2 segment (set {flag} to an address of the interface "
                    "or use the vxlan backend)"
                )
        return BackendAttrs(backend_type=self.backend_type, mtu=link.mtu)

    async def doctor(self, own: LeaseValue | None, peers: Mapping[IPv4Network, Peer],
                     observed: Observation) -> DoctorFindings:
        """Each host-gw peer's PublicIP on the underlay's link (else the kernel refuses
        its route), and this host's public addresses on the interface (else peers route
        to an address that is not ours)."""
        host = self._settings.host
        if not host.iface_index:
            return DoctorFindings()
        async with self._lock:
            nl = await self._netlink()
            interfaces = [a.interface for a in await nl.addresses(index=host.iface_index)]
        ours = {subnet: p for subnet, p in peers.items() if p.backend_type == self.backend_type}
        found: list[Problem] = gateway_problems(
            ours, on_link=[i.network for i in interfaces], iface=host.iface or "?")
        addresses = {i.ip for i in interfaces}
        for ip in (host.public_ip, host.public_ipv6):
            if ip is not None and ip not in addresses:
                found.append(problem(
                    "host", str(ip), f"not an address of {host.iface}",
                    text=f"host-gw: PublicIP {ip} is not an address of {host.iface}; "
                    "peers cannot route to it"))
        return DoctorFindings(found)

    def _plan_peer(self, peer: Peer) -> frozenset[KernelObject]:
        return hostgw.plan_peer(peer, self._settings.host.iface_index,
                                ipv6=self._settings.ipv6_enabled)

    async def _scan(self, nl: Kernel, known: Known) -> list[KernelObject]:
        return list(await self._scan_routes(nl, known))
