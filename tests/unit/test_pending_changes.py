"""Peer changes gathered while the data plane is busy, and programmed at once.

The data plane and the traffic rules take a change set to mean: per subnet, an
added or changed peer is programmed as it is now, a removed one unprogrammed.
Folding changes (PendingChanges) must end where applying each in turn would,
and a watcher that is slow to program must still end in the book's peer set.
"""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network

from hypothesis import given
from hypothesis import strategies as st

from leaseagent.core.leases import Peer, PeerChanges, PendingChanges
from leaseagent.core.profiles.base import NoLeaseData

SUBNETS = [IPv4Network(f"10.5.{i}.0/24") for i in range(1, 5)]


def peer(subnet: IPv4Network, version: int) -> Peer:
    return Peer(subnet, IPv4Address(f"10.250.0.{version + 1}"), "alloc", NoLeaseData())


def program(state: dict[IPv4Network, Peer], changes: PeerChanges) -> None:
    """What the data plane does with a change set."""
    assert not ({p.subnet for p in changes.removed}
                & {p.subnet for p in [*changes.added, *changes.changed]})
    for p in changes.removed:
        state.pop(p.subnet, None)
    for p in [*changes.added, *changes.changed]:
        state[p.subnet] = p


# A history: which subnet each step touches and whether it is there afterwards.
STEPS = st.lists(st.tuples(st.sampled_from(SUBNETS), st.booleans()), max_size=40)


def changes_of(history: list[tuple[IPv4Network, bool]]) -> list[PeerChanges]:
    """Each step as the book reports it: added, changed or removed (nothing when a
    missing subnet is removed again)."""
    there: dict[IPv4Network, Peer] = {}
    out = []
    for version, (subnet, present) in enumerate(history):
        before = there.get(subnet)
        if present:
            now = there[subnet] = peer(subnet, version)
            out.append(PeerChanges(added=[now]) if before is None else PeerChanges(changed=[now]))
        elif before is not None:
            del there[subnet]
            out.append(PeerChanges(removed=[before]))
    return out


@given(STEPS, st.integers(0, 40))
def test_folded_changes_program_what_each_in_turn_would(history: list[tuple[IPv4Network, bool]],
                                                        split: int) -> None:
    steps = changes_of(history)
    one_by_one: dict[IPv4Network, Peer] = {}
    for changes in steps:
        program(one_by_one, changes)
    # Programmed in two passes, each everything gathered so far.
    folded: dict[IPv4Network, Peer] = {}
    for part in (steps[:split], steps[split:]):
        pending = PendingChanges()
        for changes in part:
            pending.add(changes)
        program(folded, pending.take())
    assert folded == one_by_one


def test_an_addition_then_its_removal_is_nothing() -> None:
    x = peer(SUBNETS[0], 1)
    assert not PeerChanges(added=[x]).then(PeerChanges(removed=[x]))
    assert PeerChanges(removed=[x]).then(PeerChanges(added=[x])).changed == [x]
