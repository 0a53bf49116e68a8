"""Turning snapshots and watch events of the lease prefix into peer changes.

Pure. A `PeerTable` holds the current valid peers by subnet plus the
invalid keys (with their reasons). `replace` takes a whole snapshot (a
list) and returns what changed; `apply` takes one event. The first is used
after every (re-)list, so a compaction or lost stream never loses an add or
a remove: the diff against the new list finds them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Network

from leaseagent.core.lease import Peer


@dataclass
class PeerChanges:
    added: list[Peer] = field(default_factory=list)
    changed: list[Peer] = field(default_factory=list)
    removed: list[Peer] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.added or self.changed or self.removed)

    def extend(self, other: PeerChanges) -> None:
        self.added.extend(other.added)
        self.changed.extend(other.changed)
        self.removed.extend(other.removed)


class PeerTable:
    """The set of valid peers, keyed by subnet."""

    def __init__(self) -> None:
        self._peers: dict[IPv4Network, Peer] = {}

    @property
    def peers(self) -> Mapping[IPv4Network, Peer]:
        return self._peers

    def __len__(self) -> int:
        return len(self._peers)

    def replace(self, snapshot: Mapping[IPv4Network, Peer]) -> PeerChanges:
        """Make the table equal to `snapshot`; return the difference."""
        changes = PeerChanges()
        for subnet, old in self._peers.items():
            if subnet not in snapshot:
                changes.removed.append(old)
        for subnet, new in snapshot.items():
            old_peer = self._peers.get(subnet)
            if old_peer is None:
                changes.added.append(new)
            elif old_peer != new:
                changes.changed.append(new)
        self._peers = dict(snapshot)
        return changes

    def put(self, peer: Peer) -> PeerChanges:
        old = self._peers.get(peer.subnet)
        self._peers[peer.subnet] = peer
        if old is None:
            return PeerChanges(added=[peer])
        if old != peer:
            return PeerChanges(changed=[peer])
        return PeerChanges()

    def remove(self, subnet: IPv4Network) -> PeerChanges:
        old = self._peers.pop(subnet, None)
        return PeerChanges(removed=[old]) if old is not None else PeerChanges()
