"""A UDP port moved: packets still sent to the old port reach the new one for a while.

A WireGuard device listens on one port. When ListenPort changes, a peer that
has not yet read this host's new lease (or whose agent writes the endpoint its
lease view still has) sends to the old port, where nothing listens any more.
While `Move`s are in force, the nftables table `inet leaseagent-ports` (one
base chain at prerouting, priority raw: before conntrack, so no connection
state keeps the old port) rewrites such packets' destination port, per family:

    meta nfproto ipv4 udp dport OLD socket transparent 0 accept
    meta nfproto ipv4 udp dport OLD counter udp dport set NEW

The first rule leaves the packet alone while a socket still listens on the
old port (`socket` matches only when one does), so the table is written
before the device moves and takes over the moment it has moved: no window in
between. The moves are read back from the rules' comments. The table is the
wireguard backend's (leaseagent.dataplane.wireguard): removed --peer-hold-time
after a move, at the next start if the agent stopped before (a move to a
port no longer used goes at once), and by `leasectl cleanup`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from leaseagent.dataplane.firewall import run_tool
from leaseagent.errors import DataPlaneError

TABLE = "inet leaseagent-ports"
_TAG = "leaseagent:port-move"
_FOUND = re.compile(rf'comment "{_TAG}:([46]):(\d+):(\d+)"')


@dataclass(frozen=True, order=True)
class Move:
    """Packets of IPv`family` to UDP port `old` go to `new`."""

    family: int
    old: int
    new: int

    @property
    def text(self) -> str:
        return f"IPv{self.family} UDP {self.old} -> {self.new}"


def render(moves: Iterable[Move]) -> str:
    """The whole table, replacing any there (an nft script: one transaction)."""
    lines = [f"table {TABLE}", f"delete table {TABLE}", f"table {TABLE} {{",
             "\tchain prerouting {",
             "\t\ttype filter hook prerouting priority raw; policy accept;"]
    for m in sorted(set(moves)):
        proto = f"meta nfproto ipv{m.family} udp dport {m.old}"
        lines += [f"\t\t{proto} socket transparent 0 accept",
                  f'\t\t{proto} counter udp dport set {m.new} comment "{_TAG}:{m.family}:'
                  f'{m.old}:{m.new}"']
    return "\n".join([*lines, "\t}", "}", ""])


async def observe(*, netns: str | None = None) -> set[Move]:
    """The moves in force (none: no table, or no nft on this host)."""
    try:
        code, out, _ = await run_tool(["nft", "list", "table", *TABLE.split()], netns=netns,
                                      check=False)
    except DataPlaneError:
        return set()  # no nft: nothing of ours can be there
    if code != 0:
        return set()
    return {Move(int(f), int(old), int(new)) for f, old, new in _FOUND.findall(out)}


async def put(moves: Iterable[Move], *, netns: str | None = None) -> None:
    """Make `moves` the ones in force (none: the table removed); DataPlaneError if nft
    cannot (missing, or refused)."""
    wanted = set(moves)
    if wanted:
        await run_tool(["nft", "-f", "-"], netns=netns, input=render(wanted))
    else:
        await remove(netns=netns)


async def remove(*, netns: str | None = None) -> bool:
    """Remove the table; True if it was there."""
    try:
        code, _, _ = await run_tool(["nft", "delete", "table", *TABLE.split()], netns=netns,
                                    check=False)
    except DataPlaneError:
        return False
    return code == 0
