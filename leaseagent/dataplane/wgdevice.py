"""A WireGuard device's configuration, whichever way it is driven.

Two ways drive a device (leaseagent.dataplane.wireguard picks one at start):
the kernel module through genetlink (leaseagent.dataplane.wgnetlink) and
wireguard-go through its control socket (leaseagent.dataplane.wguapi). Both
read a device into a `DeviceConfig` and write `PeerUpdate`s, so everything
above them (the plan, the comparison, doctor) is one code:

- `DeviceConfig.objects()`: the device's peers as core.plan objects (a WgPeer
  and an AllowedIP per network), what `core.plan.diff` compares with the plan;
- `updates(to_add, to_remove, ...)`: a diff's objects as the per-peer
  operations of one write. Upserts first (a new key for a subnet is in place
  before the old key goes, so the subnet always has a peer), then allowed IPs
  taken from a peer that stays (neither wireguard-go's nor the kernel's
  protocol of this age can remove one allowed IP: the peer's list is replaced
  by what remains, read from the device), then removals.

`WireguardControl` is the port both drivers implement.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from leaseagent.core.network import Network
from leaseagent.core.plan import AllowedIP, Endpoint, KernelObject, WgPeer


@dataclass(frozen=True)
class PeerState:
    """A peer as a device reports it, with what doctor reads of its health."""

    peer: WgPeer
    allowed_ips: tuple[Network, ...] = ()
    last_handshake: float = 0.0  # Unix time; 0: never
    rx_bytes: int = 0
    tx_bytes: int = 0


@dataclass(frozen=True)
class DeviceConfig:
    """A device's WireGuard configuration (never its private key: `public_key` is
    derived from it, None when it has none)."""

    public_key: str | None
    listen_port: int
    peers: tuple[PeerState, ...] = ()

    def objects(self) -> set[KernelObject]:
        out: set[KernelObject] = set()
        for state in self.peers:
            out.add(state.peer)
            out.update(AllowedIP(state.peer.device, net, state.peer.public_key)
                       for net in state.allowed_ips)
        return out

    def peer(self, public_key: str) -> PeerState | None:
        return next((p for p in self.peers if p.peer.public_key == public_key), None)


class Snapshot:
    """A device's configuration as read, parsed only when asked for (`config`), with a
    fingerprint of everything but its counters (handshake times, bytes): the same
    fingerprint twice means the same configuration, so a poll of an unchanged device
    with 1,000 peers costs a hash, not a parse."""

    def __init__(self, fingerprint: bytes, parse: Callable[[], DeviceConfig]) -> None:
        self.fingerprint = fingerprint
        self._parse = parse
        self._config: DeviceConfig | None = None

    @property
    def config(self) -> DeviceConfig:
        if self._config is None:
            self._config = self._parse()
        return self._config


@dataclass(frozen=True)
class PeerUpdate:
    """One peer's part of a write. `peer` set: create or update it (endpoint, PSK,
    keepalive as given); None: only touch it if it exists (allowed IPs for a peer
    already there). `allowed_ips` are added to its list, or replace it when
    `replace_allowed_ips`; `remove`: the peer goes."""

    public_key: str
    peer: WgPeer | None = None
    allowed_ips: tuple[Network, ...] = ()
    replace_allowed_ips: bool = False
    remove: bool = False
    keepalive: int | None = None  # a keepalive other than the peer's (priming)


@dataclass(frozen=True)
class DeviceWrite:
    """Everything one write sets on a device."""

    private_key: bytes | None = field(default=None, repr=False)
    listen_port: int | None = None
    peers: tuple[PeerUpdate, ...] = ()


class WireguardControl(Protocol):
    """The port both drivers implement. `link_kind` is the kind of link their devices
    are (`wireguard`, `tun`); `name` says which driver, for logs and doctor."""

    name: str
    link_kind: str

    async def read(self, device: str) -> DeviceConfig | None:
        """The device's configuration; None when nothing answers for it."""
        ...

    async def snapshot(self, device: str) -> Snapshot | None:
        """The device's configuration, parsed on demand (`read` is its `config`)."""
        ...

    async def write(self, device: str, change: DeviceWrite) -> None:
        """Apply `change`; DataPlaneError (one line) if the device refuses it."""
        ...

    async def create(self, device: str) -> None:
        """Bring a device of this kind named `device` into being (down, no address)."""
        ...

    async def dispose(self, device: str) -> None:
        """What is left of a device after its link was deleted, gone (wireguard-go's
        process); nothing to do for the kernel's."""
        ...

    def close(self) -> None: ...


def updates(to_add: Iterable[KernelObject], to_remove: Iterable[KernelObject], *,
            current: DeviceConfig | None = None, prime: frozenset[str] = frozenset()
            ) -> list[PeerUpdate]:
    """The operations of one write turning a device's peers by a diff (objects of one
    device). `current` is needed only when allowed IPs leave a peer that stays.
    Keys in `prime` are written with a keepalive of 1 s (see
    leaseagent.dataplane.wireguard, "priming"); the caller writes their own keepalive
    right after."""
    peers: dict[str, WgPeer] = {}
    added: dict[str, list[Network]] = {}
    for obj in to_add:
        if isinstance(obj, WgPeer):
            peers[obj.public_key] = obj
        elif isinstance(obj, AllowedIP):
            added.setdefault(obj.public_key, []).append(obj.network)
    gone_peers = {obj.public_key for obj in to_remove if isinstance(obj, WgPeer)}
    taken: dict[str, set[Network]] = {}
    for obj in to_remove:
        if isinstance(obj, AllowedIP) and obj.public_key not in gone_peers:
            taken.setdefault(obj.public_key, set()).add(obj.network)
    out: list[PeerUpdate] = []
    for key in sorted(peers.keys() | added.keys()):
        if key in taken:
            continue  # written below, with its whole list
        peer = peers.get(key)
        out.append(PeerUpdate(key, peer, tuple(added.get(key, ())),
                              keepalive=1 if key in prime and peer is not None else None))
    for key in sorted(taken):
        state = current.peer(key) if current is not None else None
        have = state.allowed_ips if state is not None else ()
        remaining = [n for n in have if n not in taken[key]]
        remaining += [n for n in added.get(key, ()) if n not in remaining]
        out.append(PeerUpdate(key, peers.get(key), tuple(remaining), replace_allowed_ips=True))
    out += [PeerUpdate(key, remove=True) for key in sorted(gone_peers)]
    return out


def restore_keepalive(primed: Sequence[PeerUpdate]) -> list[PeerUpdate]:
    """The second write after priming: each primed peer with its own keepalive."""
    return [PeerUpdate(u.public_key, u.peer) for u in primed
            if u.keepalive is not None and u.peer is not None]


def endpoint_text(endpoint: Endpoint) -> str:
    """`10.250.0.12:51820`, `[fd00:250::12]:51821`: how both wg and wireguard-go write it."""
    ip, port = endpoint
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"
