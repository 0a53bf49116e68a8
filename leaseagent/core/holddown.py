"""Hold-down of peer removal: a peer whose lease vanishes keeps its kernel entries a while.

Routing daemons keep forwarding state across a restart of their control
plane (BGP graceful restart, RFC 4724); we do the same across a blip of
etcd. When a paused etcd resumes it expires every lease at once, and each
owner takes its subnet back within milliseconds: without a hold, every peer
would remove and re-add each host's routes in between, and packets would be
lost for nothing.

So a peer removed because its key was deleted (expired, revoked) or because
a listing no longer has it is *held*: the data plane keeps it for
`seconds`; a new lease for the subnet within that time replaces it at once
(a change, or nothing if it is the same), and only when the time is up is it
removed. A removal that a lease says on purpose is never held: a key turned
invalid, or released by its agent (`--release-on-exit` marks the value
released before it revokes the lease; leaseagent.core.leases). 0 seconds
disables the hold.

Pure: the time is passed in.
"""

from __future__ import annotations

from collections.abc import Mapping
from ipaddress import IPv4Network

from leaseagent.core.leases import Peer, PeerChanges


class HoldDown:
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._held: dict[IPv4Network, tuple[Peer, float]] = {}

    @property
    def held(self) -> Mapping[IPv4Network, Peer]:
        return {subnet: peer for subnet, (peer, _) in self._held.items()}

    def __len__(self) -> int:
        return len(self._held)

    def filter(self, changes: PeerChanges, *, now: float, hold_removals: bool) -> PeerChanges:
        """What the data plane must do now of `changes`: removals held (when `hold_removals`),
        a new lease for a held subnet turned into a change (or nothing)."""
        out = PeerChanges(changed=list(changes.changed))
        for peer in changes.added:
            held = self._held.pop(peer.subnet, None)
            if held is None:
                out.added.append(peer)
            elif held[0] != peer:
                out.changed.append(peer)
        for peer in changes.removed:
            if hold_removals and self.seconds > 0:
                self._held[peer.subnet] = (peer, now + self.seconds)
            else:
                out.removed.append(peer)
        return out

    def due(self, now: float) -> list[Peer]:
        """The held peers whose time is up (no longer held after this call)."""
        gone = [subnet for subnet, (_, deadline) in self._held.items() if deadline <= now]
        return [self._held.pop(subnet)[0] for subnet in gone]

    def next_deadline(self) -> float | None:
        return min((deadline for _, deadline in self._held.values()), default=None)
