"""A kernel backend's desired-versus-observed diff, pure: no I/O, no event loop.

The reconciler (leaseagent.dataplane.reconciling) composes these with the
kernel port (leaseagent.dataplane.kernelport); everything it decides about
objects is decided here, and unit-tested without a kernel:

- `AppliedPlan`: the last applied plan, kept small. Per peer subnet the peer
  it was planned from (planned again when it changes or goes) and per object
  a count of the peers that want it, by hash (an object two peers want, two
  leases with one VtepMAC share an FDB entry, stays while one does).
  `AppliedPlan.change` is an incremental update's diff (no table dump).
- `FullPass`: a full sync's diff, made as the kernel's tables stream in. Only
  each planned object's identity is kept, with the key it was planned under;
  each dumped entry is told by its identity (`Reading.known`), and only one
  the plan does not hold becomes an object. The objects the kernel lacks are
  planned again afterwards (usually none but at a join), and the whole plan
  only when the kernel holds objects it does not want (which another object
  replaces: `core.plan.diff_found`).
- `judge_event`: what a kernel notification of someone else calls for: a
  targeted repair of exactly that object, a full pass, or nothing.

Order of application and identity are `core.plan`'s (`diff`, `diff_found`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from enum import Enum
from ipaddress import IPv4Network
from typing import TYPE_CHECKING

from leaseagent.core.plan import Ident, KernelObject, Neighbour, PlanDiff, diff, diff_found

if TYPE_CHECKING:
    from leaseagent.core.leases import Peer

Plans = Iterable[tuple[IPv4Network, frozenset[KernelObject]]]  # per key, its objects


class AppliedPlan:
    """The plan last applied to the kernel (see the module docstring)."""

    __slots__ = ("peers", "uses")

    def __init__(self) -> None:
        self.peers: dict[IPv4Network, Peer] = {}
        self.uses: dict[int, int] = {}

    def wants(self, obj: KernelObject) -> bool:
        """Whether some peer (or the backend itself) of the plan wants `obj`."""
        return hash(obj) in self.uses

    def replace(self, peers: Mapping[IPv4Network, Peer], uses: dict[int, int]) -> None:
        """A full pass applied: its peers and counts are the plan from now on."""
        self.peers = dict(peers)
        self.uses = uses

    def clear(self) -> None:
        self.peers, self.uses = {}, {}

    def count(self, objects: Iterable[KernelObject], delta: int) -> None:
        """Count `objects` as wanted by one more (delta +1) or one fewer (-1) peer."""
        uses = self.uses
        for obj in objects:
            key = hash(obj)
            n = uses.get(key, 0) + delta
            if n > 0:
                uses[key] = n
            else:
                uses.pop(key, None)

    def drop(self, subnet: IPv4Network, plan: Callable[[Peer], frozenset[KernelObject]]
             ) -> tuple[Peer | None, frozenset[KernelObject]]:
        """Take `subnet`'s peer out of the plan: the peer it had (None: none) and its
        objects, planned again as they were (what plans depend on besides the peer,
        device indexes, changes only with a full pass, which plans anew)."""
        before = self.peers.pop(subnet, None)
        if before is None:
            return None, frozenset()
        planned = plan(before)
        self.count(planned, -1)
        return before, planned

    def add(self, peer: Peer, plan: Callable[[Peer], frozenset[KernelObject]]
            ) -> frozenset[KernelObject]:
        """Put `peer` in the plan; its objects."""
        after = plan(peer)
        self.peers[peer.subnet] = peer
        self.count(after, +1)
        return after

    def change(self, old: Iterable[KernelObject], new: Iterable[KernelObject], *,
               synced: bool) -> PlanDiff:
        """An incremental update's diff once its peers were dropped and added: `new` is
        added; of `old`, what no peer of the plan still wants is removed, and nothing
        before the first full pass has shown which peers are really gone (`synced`)."""
        to_add, to_remove = diff(new, old)
        if not synced:
            return PlanDiff(to_add, ())
        return PlanDiff(to_add, tuple(o for o in to_remove if hash(o) not in self.uses))

    def objects(self, plan: Callable[[Peer], frozenset[KernelObject]]
                ) -> Iterator[KernelObject]:
        """The objects of its peers, planned again."""
        for peer in self.peers.values():
            yield from plan(peer)


class FullPass:
    """A full sync's plan, kept as identities (see the module docstring)."""

    __slots__ = ("desired", "uses")

    def __init__(self, plans: Plans) -> None:
        self.desired: dict[Ident, IPv4Network] = {}
        self.uses: dict[int, int] = {}  # AppliedPlan.uses once applied
        for key, objects in plans:
            for obj in objects:
                self.desired[obj._ident] = key
                self.uses[hash(obj)] = self.uses.get(hash(obj), 0) + 1

    def reading(self) -> Reading:
        """One reading of the kernel's tables against the plan (a dump interrupted and
        read again starts a new one)."""
        return Reading(self.desired)


class Reading:
    """The kernel's entries told one by one (`known`), then `finish`ed into the diff."""

    __slots__ = ("desired", "missing")

    def __init__(self, desired: dict[Ident, IPv4Network]) -> None:
        self.desired = desired
        self.missing = dict(desired)

    def known(self, ident: Ident) -> bool:
        """Whether the plan holds the dumped entry of identity `ident`."""
        if ident in self.desired:
            self.missing.pop(ident, None)
            return True
        return False

    def finish(self, stale: list[KernelObject], *,
               planned_again: Callable[[IPv4Network], frozenset[KernelObject]],
               whole_plan: Callable[[], Iterable[KernelObject]]) -> PlanDiff:
        """The diff, from the entries the plan does not hold (`stale`, objects), the
        objects planned again under a key (`planned_again`) and the whole plan (asked
        only when something is stale). When the kernel has none of the plan (a join),
        the identities are dropped once read: every object is planned again, and 15,000
        identities are not held beside them."""
        missing, desired = self.missing, self.desired
        lacking = dict.fromkeys(missing.values())
        everything = len(missing) == len(desired)
        if everything:
            missing.clear()
            desired.clear()
        # Two peers may plan one object: it is added once (dict.fromkeys, by identity).
        to_add = list(dict.fromkeys(obj for key in lacking for obj in planned_again(key)
                                    if everything or obj._ident in missing))
        missing.clear()
        planned: list[KernelObject] = list(whole_plan()) if stale else []
        return diff_found(planned, to_add, stale)


def neighbour_key(obj: Neighbour) -> int:
    """A neighbour entry's key (the kernel's: device and address), hashed."""
    return hash((obj.ifindex, obj.dst.version, int(obj.dst)))


class Verdict(Enum):
    """What a notification of someone else calls for."""

    IGNORE = "ignore"
    REPAIR = "repair"  # put exactly that object back (no table dump)
    FULL = "full"  # a full pass: device first, then a level-triggered sync


OBJECT_KINDS = ("route", "neighbour", "fdb")


def judge_event(kind: str, *, deleted: bool, obj: KernelObject | None, planned: AppliedPlan,
                removing: set[int]) -> Verdict:
    """The verdict on a notification of drift of `kind` ("route", "neighbour", "fdb", or
    "device"/"link"/...: always a full pass) about `obj`. `removing`: the neighbour
    keys (`neighbour_key`) we are removing ourselves; the kernel tells of a
    neighbour's deletion with port id 0 and without its MAC, so our own removals
    are told from someone else's by this (and each is taken out as seen)."""
    if kind not in OBJECT_KINDS or obj is None:
        return Verdict.FULL
    wanted = planned.wants(obj)
    if deleted and wanted:
        return Verdict.REPAIR  # the notification is the object itself
    if deleted and isinstance(obj, Neighbour):
        key = neighbour_key(obj)
        if key in removing:
            removing.discard(key)
            return Verdict.IGNORE  # our own removal (told without its MAC)
        return Verdict.FULL  # someone else's: which of ours, a pass sees
    if deleted:
        # Not planned: an FDB entry is our own removal (told with port id 0) or stale;
        # a route of our protocol not as planned.
        return Verdict.IGNORE if kind == "fdb" else Verdict.FULL
    if wanted or kind == "fdb":
        # Exactly ours again, or an FDB entry (told with port id 0 whoever made it, our
        # own echoes too; a foreign remote is for the periodic pass).
        return Verdict.IGNORE
    return Verdict.FULL  # one of ours changed by someone else
