"""The data-plane port: what the control plane asks of a backend.

Life cycle, driven by the agent (leaseagent.agent):

    attrs = await dp.prepare()          # before the lease: device, VtepMAC, MTU
    await dp.start(own_subnet)          # lease held: own address on the device
    await dp.sync(peers)                # first complete list: full reconcile,
                                        #   removes entries of vanished peers
    await dp.update(changes, peers)     # each batch of watch events
    task: await dp.run(get_peers)       # periodic resync + netlink drift repair
    await dp.close()                    # stop: never removes peer state

`sync` is level-triggered: it computes the desired kernel state from the
whole peer set, reads what the kernel has (only objects the agent owns),
and applies the difference. `update` may be incremental but must converge
to the same state. Nothing is removed before the first `sync`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any, Protocol

from leaseagent.core.lease import Peer
from leaseagent.core.network import NetworkConfig
from leaseagent.core.peers import PeerChanges
from leaseagent.metrics import Metrics

# rtnetlink protocol number on every route we add. iproute2's rt_protos names
# 0-4 (kernel, boot, static), 8-19 and 42 onwards for routing daemons (bird 12,
# zebra 11, babel 42, bgp 186, isis 187, ospf 188, rip 189, eigrp 192, ...);
# 0x4c ("L") = 76 is unassigned.
DEFAULT_ROUTE_PROTOCOL = 76


@dataclass(frozen=True)
class HostInfo:
    """This host as the data plane sees it."""

    public_ip: IPv4Address
    iface: str | None = None  # underlay interface; None only for alloc with --public-ip
    iface_index: int = 0
    iface_mtu: int = 1500


@dataclass(frozen=True)
class BackendAttrs:
    """What a backend publishes in the lease and in subnet.env."""

    backend_type: str
    mtu: int
    backend_data: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DataPlaneSettings:
    network: NetworkConfig
    host: HostInfo
    state_dir: Path
    metrics: Metrics
    route_protocol: int = DEFAULT_ROUTE_PROTOCOL
    resync_seconds: float = 30.0
    netns: str | None = None  # for tests and the lab: program another namespace


class DataPlane(Protocol):
    async def prepare(self) -> BackendAttrs: ...

    async def start(self, own_subnet: IPv4Network) -> None: ...

    async def sync(self, peers: Mapping[IPv4Network, Peer]) -> None: ...

    async def update(self, changes: PeerChanges, peers: Mapping[IPv4Network, Peer]) -> None: ...

    async def run(self, get_peers: Callable[[], Mapping[IPv4Network, Peer]]) -> None: ...

    async def close(self) -> None: ...
