"""The host-gw backend's profile: flannel's pkg/backend/hostgw, everything but the kernel.

Config: `{"Type": "host-gw"}`, nothing else. No device: the peers' subnets are
routed through the underlay interface, so every host must be on one L2 segment.
Lease data: none beyond PublicIP. FLANNEL_MTU: the underlay's.

Kernel objects per peer and family (`plan_peer`): Route(<subnet> via <public
address> dev underlay). Traffic rules: masquerade and forward, no peer filter.
Doctor: each peer's PublicIP on the underlay's link, and ours an address of the
interface (leaseagent.dataplane.hostgw). Cleanup: its routes carry our route
protocol (removed with every such route).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from leaseagent.core.plan import KernelObject, Route, ipv6_part
from leaseagent.core.profiles.base import BackendProfile, no_lease_data, no_options

if TYPE_CHECKING:
    from leaseagent.core.leases import Peer

NAME = "host-gw"


def plan_peer(peer: Peer, underlay_index: int, *, ipv6: bool = False) -> frozenset[KernelObject]:
    """The routes a host-gw peer needs: IPv4, and IPv6 when it is dual-stack and this
    host has an IPv6 underlay address (`ipv6`); empty for a peer of another backend."""
    if peer.backend_type != NAME:
        return frozenset()
    routes = {Route(peer.subnet, peer.public_ip, underlay_index)}
    v6 = ipv6_part(peer)
    if ipv6 and v6 is not None:
        routes.add(Route(v6.subnet, v6.public_ip, underlay_index))
    return frozenset(routes)


PROFILE = BackendProfile(NAME, no_options, no_lease_data)
