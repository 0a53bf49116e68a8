"""Whole-peer-set plans for unit tests: a profile's `plan_peer` over every peer but
our own (what a backend's `spec` does, without the backend)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from ipaddress import IPv4Network

from leaseagent.core.leases import Peer
from leaseagent.core.network import Address
from leaseagent.core.plan import KernelObject
from leaseagent.core.profiles import hostgw, vxlan


def plan_vxlan(
    own_subnet: IPv4Network | None,
    peers: Mapping[IPv4Network, Peer],
    *,
    vxlan_index: int,
    underlay_index: int,
    direct_routing: bool = False,
    is_direct: Callable[[Address], bool] = lambda _ip: False,
    vxlan6_index: int = 0,
) -> dict[IPv4Network, frozenset[KernelObject]]:
    """Per peer subnet, the objects the vxlan backend wants in the kernel."""
    return {
        subnet: vxlan.plan_peer(peer, vxlan_index, underlay_index=underlay_index,
                                direct_routing=direct_routing, is_direct=is_direct,
                                vxlan6_index=vxlan6_index)
        for subnet, peer in peers.items()
        if subnet != own_subnet
    }


def plan_host_gw(own_subnet: IPv4Network | None, peers: Mapping[IPv4Network, Peer], *,
                 underlay_index: int, ipv6: bool = False
                 ) -> dict[IPv4Network, frozenset[KernelObject]]:
    """Per peer subnet, the routes the host-gw backend wants in the kernel."""
    return {subnet: hostgw.plan_peer(peer, underlay_index, ipv6=ipv6)
            for subnet, peer in peers.items() if subnet != own_subnet}
