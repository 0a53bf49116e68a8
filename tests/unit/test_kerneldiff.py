"""core.kerneldiff: the reconciler's diff, without a kernel."""

from __future__ import annotations

from dataclasses import replace
from ipaddress import IPv4Address, IPv4Network

import pytest

from leaseagent.core.kerneldiff import (
    Admission,
    AppliedPlan,
    Claims,
    FullPass,
    Verdict,
    Work,
    judge_event,
    neighbour_key,
    use_key,
)
from leaseagent.core.leases import Peer
from leaseagent.core.plan import Fdb, HostRoute, KernelObject, Neighbour, Route
from leaseagent.core.profiles.base import runs_other
from leaseagent.core.profiles.vxlan import VxlanLeaseData, VxlanOptions

VX = 5


def peer(i: int, *, mac: str | None = None, ip: str | None = None) -> Peer:
    return Peer(IPv4Network(f"10.5.{i}.0/24"), IPv4Address(ip or f"192.168.0.{i}"), "vxlan",
                VxlanLeaseData(mac or f"02:00:00:00:00:{i:02x}"))


def plan(p: Peer) -> frozenset[KernelObject]:
    assert isinstance(p.data, VxlanLeaseData)
    base = p.subnet.network_address
    return frozenset({Neighbour(VX, base, p.data.vtep_mac), Fdb(VX, p.data.vtep_mac, p.public_ip),
                      Route(p.subnet, base, VX, onlink=True)})


def applied_with(*peers: Peer) -> AppliedPlan:
    applied = AppliedPlan()
    for p in peers:
        applied.add(p, plan)
    return applied


# --- AppliedPlan: an incremental update's diff ---------------------------------------


def test_a_peer_added_is_all_added_and_counted() -> None:
    applied = applied_with(peer(2))
    new = applied.add(peer(3), plan)
    changes = applied.change((), new, synced=True)
    assert set(changes.to_add) == plan(peer(3))
    assert [o.kind for o in changes.to_add] == ["neighbour", "fdb", "route"]  # make before break
    assert all(applied.wants(o) for o in plan(peer(2)) | plan(peer(3)))


def test_a_peer_removed_goes_but_what_another_peer_shares_stays() -> None:
    # Two leases of one host: one VtepMAC at one address, so one FDB entry for both.
    a, b = peer(2, mac="02:00:00:00:00:aa", ip="192.168.0.9"), peer(3, mac="02:00:00:00:00:aa",
                                                                    ip="192.168.0.9")
    applied = applied_with(a, b)
    before, old = applied.drop(b.subnet, plan)
    assert before == b
    changes = applied.change(old, (), synced=True)
    assert [o.kind for o in changes.to_remove] == ["route", "neighbour"]  # FDB entry kept
    assert applied.wants(Fdb(VX, "02:00:00:00:00:aa", IPv4Address("192.168.0.9")))


def test_peers_dropped_at_once_free_what_no_peer_left_wants_as_dropping_each_would() -> None:
    # a and b share an FDB entry (one host's two leases), and so do c and d; a, b and c go.
    a, b = peer(2, mac="02:00:00:00:00:aa", ip="192.168.0.9"), peer(3, mac="02:00:00:00:00:aa",
                                                                    ip="192.168.0.9")
    c, d = peer(4, mac="02:00:00:00:00:cc", ip="192.168.0.8"), peer(5, mac="02:00:00:00:00:cc",
                                                                    ip="192.168.0.8")
    gone = [a.subnet, b.subnet, c.subnet, IPv4Network("10.5.99.0/24")]  # the last one unknown
    each = applied_with(a, b, c, d)
    old: set[KernelObject] = set()
    for subnet in gone:
        old |= each.drop(subnet, plan)[1]
    expected = each.change(old, (), synced=True).to_remove

    at_once = applied_with(a, b, c, d)
    peers, unwanted = at_once.drop_all(gone, plan)
    assert peers == [a, b, c]
    assert sorted(unwanted, key=lambda o: o._ident) == sorted(expected, key=lambda o: o._ident)
    assert len(unwanted) == len(set(unwanted)) == 7  # a's and b's shared FDB entry once
    assert Fdb(VX, "02:00:00:00:00:cc", IPv4Address("192.168.0.8")) not in unwanted  # d's
    assert (at_once.peers, at_once.uses) == (each.peers, each.uses) == (
        {d.subnet: d}, applied_with(d).uses)


def test_nothing_is_removed_before_the_first_full_pass() -> None:
    applied = applied_with(peer(2))
    _, old = applied.drop(IPv4Network("10.5.2.0/24"), plan)
    assert applied.change(old, (), synced=False).to_remove == ()
    assert applied.peers == {} and applied.uses == {}


def test_a_moved_peer_replaces_its_fdb_remote_in_place() -> None:
    applied = applied_with(peer(2))
    _, old = applied.drop(IPv4Network("10.5.2.0/24"), plan)
    new = applied.add(peer(2, ip="192.168.0.99"), plan)
    changes = applied.change(old, new, synced=True)
    assert changes.to_add == (Fdb(VX, "02:00:00:00:00:02", IPv4Address("192.168.0.99")),)
    assert changes.to_remove == ()  # the MAC's one remote is replaced, not removed after


# --- FullPass: a full sync's diff as the tables stream in ----------------------------------


def plans_of(*peers: Peer) -> list[tuple[IPv4Network, frozenset[KernelObject]]]:
    return [(p.subnet, plan(p)) for p in peers]


def read(full: FullPass, kernel: set[KernelObject], peers: dict[IPv4Network, Peer]
         ) -> tuple[tuple[KernelObject, ...], tuple[KernelObject, ...]]:
    reading = full.reading()
    stale = [obj for obj in kernel if not reading.known(obj._ident)]
    return reading.finish(stale, planned_again=lambda key: plan(peers[key]),
                          whole_plan=lambda: (o for p in peers.values() for o in plan(p)))


def test_a_join_plans_every_object_again_and_drops_the_identities() -> None:
    peers = {p.subnet: p for p in (peer(2), peer(3))}
    full = FullPass(plans_of(*peers.values()))
    assert len(full.desired) == 6
    to_add, to_remove = read(full, set(), peers)
    assert set(to_add) == plan(peer(2)) | plan(peer(3)) and to_remove == ()
    assert full.desired == {}  # not held beside the objects once read
    assert set(full.uses) == {use_key(o) for o in to_add}


def test_only_what_the_kernel_lacks_is_added_and_only_what_no_plan_keys_is_removed() -> None:
    peers = {p.subnet: p for p in (peer(2), peer(3))}
    full = FullPass(plans_of(*peers.values()))
    wrong_route = Route(IPv4Network("10.5.3.0/24"), IPv4Address("192.168.0.77"), 2)
    gone_peer = plan(peer(9))
    kernel = set(plan(peer(2))) | {wrong_route} | gone_peer
    to_add, to_remove = read(full, kernel, peers)
    assert set(to_add) == plan(peer(3))
    # The wrong route is replaced by the planned one (same key), not removed.
    assert set(to_remove) == gone_peer
    assert [o.kind for o in to_remove] == ["route", "neighbour", "fdb"]


def test_an_object_two_peers_plan_is_added_once() -> None:
    a, b = peer(2, mac="02:00:00:00:00:aa", ip="192.168.0.9"), peer(3, mac="02:00:00:00:00:aa",
                                                                    ip="192.168.0.9")
    peers = {a.subnet: a, b.subnet: b}
    full = FullPass(plans_of(a, b))
    to_add, _ = read(full, set(), peers)
    assert len(to_add) == 5
    assert full.uses[use_key(Fdb(VX, "02:00:00:00:00:aa", IPv4Address("192.168.0.9")))] == 2


def test_a_reading_again_starts_from_the_whole_plan() -> None:
    peers = {p.subnet: p for p in (peer(2),)}
    full = FullPass(plans_of(*peers.values()))
    first = full.reading()
    for obj in plan(peer(2)):
        first.known(obj._ident)  # an interrupted dump told all of them
    to_add, _ = read(full, set(), peers)  # read again: the kernel has nothing now
    assert set(to_add) == plan(peer(2))


@pytest.mark.parametrize("kernel", ["empty", "part", "stale"])
def test_a_first_pass_keeps_its_objects_and_finds_the_same_diff(kernel: str) -> None:
    peers = {p.subnet: p for p in (peer(2), peer(3), peer(4))}
    held: set[KernelObject] = {
        "empty": set(), "part": set(plan(peer(2))),
        "stale": set(plan(peer(3))) | {Route(IPv4Network("10.5.4.0/24"),
                                             IPv4Address("192.168.0.77"), 2)} | plan(peer(9)),
    }[kernel]
    planned: list[IPv4Network] = []

    def again(key: IPv4Network) -> frozenset[KernelObject]:
        planned.append(key)
        return plan(peers[key])

    kept = FullPass(plans_of(*peers.values()), keep=True)
    reading = kept.reading()
    stale = [obj for obj in held if not reading.known(obj._ident)]
    got = reading.finish(stale, planned_again=again, whole_plan=lambda: [])
    assert got == read(FullPass(plans_of(*peers.values())), held, peers)  # same, same order
    assert planned == []  # nothing planned again
    assert kept.uses == FullPass(plans_of(*peers.values())).uses


# --- judge_event --------------------------------------------------------------------------


def test_verdicts_on_notifications_of_someone_else() -> None:
    applied = applied_with(peer(2))
    route = Route(IPv4Network("10.5.2.0/24"), IPv4Address("10.5.2.0"), VX, onlink=True)
    other = Route(IPv4Network("10.5.2.0/24"), IPv4Address("192.168.0.77"), 2)
    fdb = Fdb(VX, "02:00:00:00:00:02", IPv4Address("192.168.0.2"))
    foreign_fdb = Fdb(VX, "02:00:00:00:00:99", IPv4Address("192.168.0.99"))
    removing: set[int] = set()

    def judge(kind: str, obj: KernelObject | None, deleted: bool) -> Verdict:
        return judge_event(kind, deleted=deleted, obj=obj, planned=applied, removing=removing)

    assert judge("route", route, True) is Verdict.REPAIR
    assert judge("fdb", fdb, True) is Verdict.REPAIR
    assert judge("route", route, False) is Verdict.IGNORE  # exactly ours again
    assert judge("route", other, False) is Verdict.FULL  # ours changed by someone else
    assert judge("route", other, True) is Verdict.FULL  # of our protocol, not as planned
    assert judge("fdb", foreign_fdb, True) is Verdict.IGNORE
    assert judge("fdb", foreign_fdb, False) is Verdict.IGNORE  # for the periodic pass
    assert judge("device", None, True) is Verdict.FULL
    assert judge("route", None, True) is Verdict.FULL


def test_a_neighbour_deletion_is_ours_once_if_we_are_removing_it() -> None:
    applied = AppliedPlan()
    told = Neighbour(VX, IPv4Address("10.5.7.0"), "")  # a deletion names no MAC
    removing = {neighbour_key(Neighbour(VX, IPv4Address("10.5.7.0"), "02:00:00:00:00:07"))}
    assert judge_event("neighbour", deleted=True, obj=told, planned=applied,
                       removing=removing) is Verdict.IGNORE
    assert removing == set()
    assert judge_event("neighbour", deleted=True, obj=told, planned=applied,
                       removing=removing) is Verdict.FULL  # now someone else's


# --- Admission: which peers may be planned ------------------------------------------------


def claims_of(p: Peer) -> Claims:
    assert isinstance(p.data, VxlanLeaseData)
    return (("VtepMAC", p.data.vtep_mac, p.public_ip),)


def test_a_peer_over_a_route_of_the_host_is_not_admitted() -> None:
    admission = Admission()
    admission.host_routes = (HostRoute(IPv4Network("10.5.3.0/25"), ifindex=7),)
    out = admission.judge({p.subnet: p for p in (peer(2), peer(3))}, claims_of, frozenset())
    assert list(out) == [IPv4Network("10.5.3.0/24")]
    assert "overlaps this host's route 10.5.3.0/25 (link 7)" in out[IPv4Network("10.5.3.0/24")]


def test_the_first_peer_keeps_a_claim_and_an_own_claim_is_refused() -> None:
    admission = Admission()
    first, thief = peer(2), peer(3, mac="02:00:00:00:00:02", ip="192.168.0.3")
    same_host = peer(4, mac="02:00:00:00:00:02", ip="192.168.0.2")  # a leftover lease of it
    mine = peer(5, mac="02:00:00:00:00:ee")
    peers = {p.subnet: p for p in (first, thief, same_host, mine)}
    out = admission.judge(peers, claims_of, frozenset({"02:00:00:00:00:ee"}))
    assert out == {
        thief.subnet: "it has VtepMAC 02:00:00:00:00:02, which peer 10.5.2.0/24 (192.168.0.2) has",
        mine.subnet: "it has VtepMAC 02:00:00:00:00:ee, this host's own",
    }
    # The claim goes with its holder: the other one may have it then.
    admission.unclaim(first, claims_of(first))
    assert admission.conflict(thief, claims_of(thief), frozenset()) is None


def test_a_pass_leaves_a_claim_with_its_holder_whatever_the_order() -> None:
    """A whole pass admits the peer that holds a claim, as between passes, not the first
    of the set (a planted lease held after its deletion came first; so does one older than
    its victim's key taken back); the first of the set only when none holds it."""
    admission = Admission()
    owner, planted = peer(2), peer(9, mac="02:00:00:00:00:02", ip="192.168.0.9")
    assert admission.judge({owner.subnet: owner, planted.subnet: planted}, claims_of,
                           frozenset()) == {planted.subnet: (
        "it has VtepMAC 02:00:00:00:00:02, which peer 10.5.2.0/24 (192.168.0.2) has")}
    assert list(admission.judge({planted.subnet: planted, owner.subnet: owner}, claims_of,
                                frozenset())) == [planted.subnet]
    assert list(Admission().judge({planted.subnet: planted, owner.subnet: owner}, claims_of,
                                  frozenset())) == [owner.subnet]  # nobody held it


def test_host_routes_noted_only_once_read() -> None:
    admission = Admission()
    route = HostRoute(IPv4Network("10.5.3.0/25"))
    assert not admission.note_host_route(route, deleted=False)
    admission.host_routes = ()
    assert admission.note_host_route(route, deleted=False)
    assert admission.conflict(peer(3), (), frozenset()) is not None
    assert admission.note_host_route(route, deleted=True)
    assert admission.host_routes == ()


def test_work_collects_verdicts_for_the_resync_loop() -> None:
    applied = applied_with(peer(2))
    work = Work()
    route = Route(IPv4Network("10.5.2.0/24"), IPv4Address("10.5.2.0"), VX, onlink=True)
    neighbour = Neighbour(VX, IPv4Address("10.5.9.0"), "02:00:00:00:00:09")
    work.removes([neighbour, route])
    assert work.note("route", deleted=True, obj=route, planned=applied)  # a repair
    assert not work.note("neighbour", deleted=True, obj=Neighbour(VX, neighbour.dst, ""),
                         planned=applied)  # our own removal's echo
    assert work.take() == (False, {route})
    assert work.note("device", deleted=True, obj=None, planned=applied)
    assert work.take() == (True, set())
    assert work.take() == (False, set())


VNI1 = VxlanOptions(vni=1)


def runs_other_than_vni1(p: Peer) -> str | None:
    return runs_other(p, "vxlan", VNI1)


@pytest.mark.parametrize(("switched", "runs"), [
    (replace(peer(3), backend_type="host-gw"), "the host-gw backend"),
    (replace(peer(3), data=VxlanLeaseData("02:00:00:00:02:03", 2)), "vxlan VNI 2"),
])
def test_what_serves_a_peer_of_another_type_or_vni_is_kept_until_it_goes(
        switched: Peer, runs: str) -> None:
    admission = Admission()
    peers = {p.subnet: p for p in (peer(2), switched)}
    assert admission.note_foreign(peers, peers, runs_other_than_vni1) == [(switched, runs)]
    left_by_vxlan = sorted(plan(peer(3)), key=lambda o: o.kind)
    stray = Route(IPv4Network("10.5.9.0/24"), IPv4Address("10.5.9.0"), VX, onlink=True)
    assert admission.not_kept([*left_by_vxlan, stray], peers) == [stray]
    del peers[switched.subnet]
    assert admission.note_foreign([switched.subnet], peers, runs_other_than_vni1) == []
    assert admission.not_kept([*left_by_vxlan, stray], peers) == [*left_by_vxlan, stray]


def test_a_peer_on_another_vni_is_foreign_until_its_lease_says_ours() -> None:
    """A vxlan peer's profile identity: its type and the VNI its lease names (either
    family's); none named (older flanneld) matches any, and flanneld's uint16 VNI matches
    ours truncated."""
    def vni(v: int | None, v6: int | None = None) -> Peer:
        return replace(peer(3), data=VxlanLeaseData("02:00:00:00:00:03", v),
                       data6=VxlanLeaseData("02:00:00:00:06:03", v6))
    assert runs_other_than_vni1(vni(2)) == "vxlan VNI 2"
    assert runs_other_than_vni1(vni(None, 2)) == "vxlan VNI 2"  # BackendV6Data's
    assert runs_other_than_vni1(vni(1, 1)) is None
    assert runs_other_than_vni1(vni(None)) is None
    assert runs_other(vni(1), "vxlan", VxlanOptions(vni=65537)) is None
    assert runs_other(vni(1), "vxlan", VxlanOptions(vni=3)) == "vxlan VNI 1"
    admission = Admission()
    peers = {p.subnet: p for p in (peer(2), vni(2))}
    admission.note_foreign(peers, peers, runs_other_than_vni1)
    assert admission.foreign == {vni(2).subnet}
    peers[vni(1).subnet] = vni(1)  # its lease says ours now
    assert admission.note_foreign([vni(1).subnet], peers, runs_other_than_vni1) == []
    assert admission.foreign == set()
