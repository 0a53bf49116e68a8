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
  planned again afterwards (usually none), and the whole plan only when the
  kernel holds objects it does not want (which another object
  replaces: `core.plan.diff_found`). The first pass (`keep`: a join, where the
  kernel lacks every object) keeps the objects instead and plans nothing again.
- `judge_event`: what a kernel notification of someone else calls for: a
  targeted repair of exactly that object, a full pass, or nothing; `Work`
  collects the verdicts for the resync loop.
- `Admission`: which peers may be planned at all: none of another backend
  type (what the kernel has for them is kept meanwhile: a roll-out), none whose
  subnet would take over a route or address of this host that is not ours
  (`core.plan.host_conflict`), none claiming what this host or another planned
  peer holds (vxlan: a VtepMAC).

Order of application and identity are `core.plan`'s (`diff`, `diff_found`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from enum import Enum
from ipaddress import IPv4Network
from itertools import chain
from typing import TYPE_CHECKING, cast

from leaseagent.core.plan import (
    HostRoute,
    Ident,
    KernelObject,
    Neighbour,
    PlanDiff,
    diff,
    diff_found,
    host_conflict,
    peer_keys,
    serves,
)

if TYPE_CHECKING:
    from leaseagent.core.leases import Peer

Plans = Iterable[tuple[IPv4Network, frozenset[KernelObject]]]  # per key, its objects
# What a peer claims that only one host may hold: (what it is, as messages name it; the
# claimed value, e.g. a VtepMAC as the peer's lease data holds it; the address that holds
# it). `Claimed` is keyed by the value itself: a string the peer already holds, not one
# made per peer (5,000 "VtepMAC ..." texts were ~0.35 MiB).
Claims = tuple[tuple[str, str, object], ...]
Claimed = dict[str, tuple[object, IPv4Network]]  # claim -> (its holder, the peer's subnet)
# The counts of wanting peers are kept by an object's hash cut to 60 bits: an int below
# 2**60 takes 32 bytes, a full 64-bit hash 48 (15,000 of them with 5,000 vxlan peers:
# 0.23 MiB); two planned objects would share a key with a chance of ~1e-10, not ~1e-11.
_USE_BITS = (1 << 60) - 1


def use_key(obj: KernelObject) -> int:
    """`obj`'s key in the counts of wanting peers (AppliedPlan.uses, FullPass.uses): its
    hash, as the object keeps it (`hash(obj)` would call its Python `__hash__`)."""
    return obj._hash & _USE_BITS


class AppliedPlan:
    """The plan last applied to the kernel (see the module docstring)."""

    __slots__ = ("peers", "uses")

    def __init__(self) -> None:
        self.peers: dict[IPv4Network, Peer] = {}
        self.uses: dict[int, int] = {}

    def wants(self, obj: KernelObject) -> bool:
        """Whether some peer (or the backend itself) of the plan wants `obj`."""
        return use_key(obj) in self.uses

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
            key = use_key(obj)
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

    def drop_all(self, subnets: Iterable[IPv4Network],
                 plan: Callable[[Peer], frozenset[KernelObject]]
                 ) -> tuple[list[Peer], list[KernelObject]]:
        """`drop` each of `subnets` (a mass expiry: thousands at once): the peers they
        had, and the objects of theirs that no peer of the plan wants any more, each
        once (an object two of them shared, once). What `drop` of each and then
        `change` with no new objects give, each object's key taken once."""
        peers, uses = self.peers, self.uses
        gone: list[Peer] = []
        planned: list[tuple[int, KernelObject]] = []
        for subnet in subnets:
            before = peers.pop(subnet, None)
            if before is None:
                continue
            gone.append(before)
            for obj in plan(before):
                key = use_key(obj)
                n = uses.get(key, 0) - 1
                if n > 0:
                    uses[key] = n
                else:
                    uses.pop(key, None)
                planned.append((key, obj))
        # Each once, by its key (an int, hashed in C; the objects' hash is Python code).
        return gone, list({key: obj for key, obj in planned if key not in uses}.values())

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
        uses = self.uses
        if not new:  # only removals (a mass expiry): what no peer still wants, in order
            return diff_found((), (), (o for o in old if use_key(o) not in uses) if synced else ())
        to_add, to_remove = diff(new, old)
        if not synced:
            return PlanDiff(to_add, ())
        return PlanDiff(to_add, tuple(o for o in to_remove if use_key(o) not in uses))

    def objects(self, plan: Callable[[Peer], frozenset[KernelObject]]
                ) -> Iterator[KernelObject]:
        """The objects of its peers, planned again."""
        for peer in self.peers.values():
            yield from plan(peer)


class FullPass:
    """A full sync's plan, kept as identities (see the module docstring), or with
    `keep` as the objects themselves: for the first pass, usually a join, where the
    kernel lacks them all and each would be planned again."""

    __slots__ = ("desired", "kept", "uses")

    def __init__(self, plans: Plans, *, keep: bool = False) -> None:
        # Per identity the key it was planned under, or (kept) the object.
        self.desired: dict[Ident, IPv4Network | KernelObject] = {}
        self.kept = keep
        self.uses: dict[int, int] = {}  # AppliedPlan.uses once applied
        desired, uses = self.desired, self.uses
        for key, objects in plans:
            for obj in objects:
                desired[obj._ident] = obj if keep else key
                use = use_key(obj)
                uses[use] = uses.get(use, 0) + 1

    def reading(self) -> Reading:
        """One reading of the kernel's tables against the plan (a dump interrupted and
        read again starts a new one)."""
        return Reading(self.desired, kept=self.kept)


class Reading:
    """The kernel's entries told one by one (`known`), then `finish`ed into the diff."""

    __slots__ = ("desired", "kept", "missing")

    def __init__(self, desired: dict[Ident, IPv4Network | KernelObject], *,
                 kept: bool = False) -> None:
        self.desired = desired
        self.kept = kept
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
        identities are not held beside them. When the objects were kept, none is
        planned again."""
        missing, desired = self.missing, self.desired
        if self.kept:
            objects = cast("dict[Ident, KernelObject]", desired)
            to_add = list(cast("dict[Ident, KernelObject]", missing).values())
            missing.clear()
            return diff_found(list(objects.values()) if stale else [], to_add, stale)
        lacking = dict.fromkeys(missing.values())
        everything = len(missing) == len(desired)
        if everything:
            missing.clear()
            desired.clear()
        # Two peers may plan one object: it is added once (dict.fromkeys, by identity).
        to_add = list(dict.fromkeys(obj for key in lacking
                                    for obj in planned_again(key)  # type: ignore[arg-type]
                                    if everything or obj._ident in missing))
        missing.clear()
        planned: list[KernelObject] = list(whole_plan()) if stale else []
        return diff_found(planned, to_add, stale)


def neighbour_key(obj: Neighbour) -> int:
    """A neighbour entry's key (the kernel's: device and address), hashed; from its
    identity (core.plan.neighbour_ident: kind, version, ifindex, address, MAC), no
    ipaddress code run: a mass removal asks it of thousands."""
    _, version, ifindex, dst, _ = obj._ident
    return hash((ifindex, version, dst))


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


class Work:
    """What the event watcher hands the resync loop (`repairs`: objects to put back;
    `full`: a full pass), and the neighbour entries we are removing ourselves
    (`removing`, for `judge_event`)."""

    __slots__ = ("full", "removing", "repairs")

    def __init__(self) -> None:
        self.repairs: set[KernelObject] = set()
        self.full = False
        self.removing: set[int] = set()

    def note(self, kind: str, *, deleted: bool, obj: KernelObject | None,
             planned: AppliedPlan) -> bool:
        """A notification of drift of `kind` (judge_event); True if it calls for work."""
        verdict = judge_event(kind, deleted=deleted, obj=obj, planned=planned,
                              removing=self.removing)
        if verdict is Verdict.IGNORE:
            return False
        if verdict is Verdict.REPAIR:
            assert obj is not None
            self.repairs.add(obj)
        else:
            self.full = True
        return True

    def removes(self, objects: Iterable[KernelObject]) -> None:
        """We are about to remove `objects`: their neighbour entries' deletions are ours."""
        self.removing.update(neighbour_key(obj) for obj in objects if isinstance(obj, Neighbour))

    def take(self) -> tuple[bool, set[KernelObject]]:
        """The work queued (whether a full pass, the objects to repair), emptied."""
        full, repairs = self.full, self.repairs
        self.full, self.repairs = False, set()
        return full, repairs


def _holds(held: Claimed, peer: Peer, claims: Claims) -> bool:
    """Whether `peer` holds one of its `claims` in `held` (Admission.claimed). Identity
    first: the objects are usually the very ones claimed (ipaddress compares in Python)."""
    subnet = peer.subnet
    for _what, claim, holder in claims:
        had = held.get(claim)
        if had is not None and (had[1] is subnet or had[1] == subnet) and (
                had[0] is holder or had[0] == holder):
            return True
    return False


class Admission:
    """Which peers may be planned here (see the module docstring).

    `host_routes`: this host's routes and addresses that are not ours and overlap the
    cluster network (None: not read yet), as peers are judged by them; `dumped`: the
    same from the last route dump. `claimed`: what the planned peers claim.
    `foreign`: the subnets of peers of another backend type or variant (vxlan's VNI)."""

    __slots__ = ("claimed", "dumped", "foreign", "host_routes")

    def __init__(self) -> None:
        self.host_routes: tuple[HostRoute, ...] | None = None
        self.dumped: tuple[HostRoute, ...] = ()
        self.claimed: Claimed = {}
        self.foreign: set[IPv4Network] = set()

    def note_foreign(self, subnets: Iterable[IPv4Network], peers: Mapping[IPv4Network, Peer],
                     runs_other: Callable[[Peer], str | None]) -> list[tuple[Peer, str]]:
        """Keep `foreign` right for `subnets`; the peers among them that run another type
        or variant of the backend, with what they run (`runs_other`: this host's
        backend's core.profiles.base.runs_other)."""
        out: list[tuple[Peer, str]] = []
        for subnet in subnets:
            peer = peers.get(subnet)
            other = runs_other(peer) if peer is not None else None
            if peer is None or other is None:
                self.foreign.discard(subnet)
            else:
                self.foreign.add(subnet)
                out.append((peer, other))
        return out

    def not_kept(self, stale: list[KernelObject], peers: Mapping[IPv4Network, Peer]
                 ) -> list[KernelObject]:
        """Of the kernel's objects no plan wants, those to remove: not what serves a
        peer of another type (made by the backend this host ran before, kept while the
        peer runs the other type; core.plan.serves)."""
        if not self.foreign or not stale:
            return stale
        keys = frozenset(chain.from_iterable(peer_keys(peers[s]) for s in self.foreign
                                             if s in peers))
        return [obj for obj in stale if not serves(obj, keys)]

    def note_host_route(self, route: HostRoute, *, deleted: bool) -> bool:
        """A route or address of someone else (one that overlaps the cluster network)
        came or went: peers are judged with it from now on. False if the routes were
        not read yet (the first read will see it)."""
        if self.host_routes is None:
            return False
        routes = [r for r in self.host_routes if r != route]
        if not deleted:
            routes.append(route)
        self.host_routes = tuple(routes)
        return True

    def conflict(self, peer: Peer, claims: Claims, own: frozenset[str],
                 claimed: Claimed | None = None) -> str | None:
        """Why `peer` must not be planned here (None: it may): its subnet over a route or
        address of this host, or a claim this host holds (`own`) or another planned
        peer holds with another holder (`claimed`, by default the admitted peers')."""
        route = host_conflict(peer, self.host_routes or ())
        if route is not None:
            return f"its subnet overlaps this host's {route.text}, which is not the agent's"
        claimed = self.claimed if claimed is None else claimed
        for what, claim, holder in claims:
            if claim in own:
                return f"it has {what} {claim}, this host's own"
            other = claimed.get(claim)
            if other is not None and other[0] != holder and other[1] != peer.subnet:
                return f"it has {what} {claim}, which peer {other[1]} ({other[0]}) has"
        return None

    def claim(self, peer: Peer, claims: Claims, claimed: Claimed | None = None) -> None:
        """`peer` is admitted: what it claims is held (the first holder keeps a claim)."""
        claimed = self.claimed if claimed is None else claimed
        for _what, claim, holder in claims:
            claimed.setdefault(claim, (holder, peer.subnet))

    def unclaim(self, peer: Peer, claims: Claims) -> None:
        """`peer` is planned no more: what it held is free."""
        subnet = peer.subnet
        for _what, claim, _holder in claims:
            held = self.claimed.get(claim)
            # The subnet held is usually this very object (ipaddress compares in Python).
            if held is not None and (held[1] is subnet or held[1] == subnet):
                del self.claimed[claim]

    def judge(self, peers: Mapping[IPv4Network, Peer], claims_of: Callable[[Peer], Claims],
              own: frozenset[str]) -> dict[IPv4Network, str]:
        """Of a whole peer set, those that must not be planned, with why; `claimed` is
        then what the admitted ones claim. Of peers claiming one thing, the one that
        holds it now keeps it, as between passes (`claim`: the first holder keeps a
        claim), else the first of the set: a pass must not hand a claim to another peer
        because of the set's order (a planted lease older than its victim's key, taken
        back after an etcd pause, would take the victim's VtepMAC)."""
        out: dict[IPv4Network, str] = {}
        claimed: Claimed = {}
        held = self.claimed
        first: list[tuple[IPv4Network, Peer, Claims]] = []
        later: list[tuple[IPv4Network, Peer, Claims]] = []  # claimants holding nothing now
        for subnet, peer in peers.items():
            claims = claims_of(peer)
            (later if held and claims and not _holds(held, peer, claims) else first).append(
                (subnet, peer, claims))
        for subnet, peer, claims in chain(first, later):
            why = self.conflict(peer, claims, own, claimed)
            if why is not None:
                out[subnet] = why
            else:
                self.claim(peer, claims, claimed)
        self.claimed = claimed
        return out
