"""The one rule that judges a listing, and its incremental form (LeaseBook)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Network

from hypothesis import given, settings
from hypothesis import strategies as st

from leaseagent.core.leases import (
    DUPLICATE,
    INVALID,
    OWN,
    PEER,
    RESERVED,
    Identity,
    KeyLayout,
    LeaseBook,
    Peer,
    PeerChanges,
    judge,
)
from leaseagent.core.network import NetworkConfig, parse_network_config

LAYOUT = KeyLayout("/coreos.com/network")
P = LAYOUT.subnets_prefix
NETWORK = parse_network_config(b'{"Network": "10.5.0.0/16", "Backend": {"Type": "host-gw"}}')
OWN_IP = IPv4Address("10.250.0.1")


@dataclass(frozen=True)
class KV:
    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    lease: int = 7


def value(ip: str, backend: str = "host-gw") -> bytes:
    return json.dumps({"PublicIP": ip, "BackendType": backend}).encode()


def test_the_oldest_of_two_keys_naming_one_subnet_holds_it() -> None:
    items = [
        KV(P + "10.5.34.0-24&fd00::-64", value("10.250.0.9"), 5, 5),
        KV(P + "10.5.34.0-24", value("10.250.0.3"), 3, 8),
    ]
    result = judge(items, layout=LAYOUT, network=NETWORK)
    subnet = IPv4Network("10.5.34.0/24")
    assert result.peers[subnet].public_ip == IPv4Address("10.250.0.3")
    assert result.holders[subnet] == P + "10.5.34.0-24"
    younger = result.verdicts[P + "10.5.34.0-24&fd00::-64"]
    assert younger.status == DUPLICATE and not younger.valid
    assert younger.detail == f"duplicate: 10.5.34.0/24 is held under key {P}10.5.34.0-24"


def test_an_invalid_older_key_does_not_hold_the_subnet() -> None:
    items = [KV(P + "10.5.3.0-24", b"{", 2, 2), KV(P + "10.5.3.0-024", value("10.250.0.4"), 4, 4)]
    result = judge(items, layout=LAYOUT, network=NETWORK)
    assert result.holders[IPv4Network("10.5.3.0/24")] == P + "10.5.3.0-024"
    assert result.verdicts[P + "10.5.3.0-24"].reason == "malformed_json"


def test_own_key_and_keys_naming_the_own_subnet() -> None:
    own = P + "10.5.1.0-24"
    items = [
        KV(own, value(str(OWN_IP)), 2, 2),
        KV(P + "10.5.1.0-24&fd00::-64", value("10.250.0.5"), 3, 3),
        KV(P + "10.5.2.0-24", value(str(OWN_IP)), 4, 4),
    ]
    result = judge(items, layout=LAYOUT, network=NETWORK,
                   identity=Identity(public_ip=OWN_IP, own_key=own))
    assert result.verdicts[own].status == OWN and result.verdicts[own].valid
    assert result.verdicts[P + "10.5.1.0-24&fd00::-64"].reason == "own_subnet"
    assert result.verdicts[P + "10.5.2.0-24"].reason == "public_ip_is_ours"
    assert result.peers == {}
    assert [v.key for v in result.naming(OWN_IP)] == [own, P + "10.5.2.0-24"]


def test_an_unclaimed_reservation_is_reserved_and_no_peer_a_claimed_one_is_a_peer() -> None:
    unclaimed = KV(P + "10.5.3.0-24", value("10.250.0.3"), 2, 2, lease=0)
    claimed = KV(P + "10.5.4.0-24", json.dumps({"PublicIP": "10.250.0.4", "BackendType": "host-gw",
                                                "NodeID": "h4"}).encode(), 3, 3, lease=0)
    result = judge([unclaimed, claimed], layout=LAYOUT, network=NETWORK)
    first = result.verdicts[unclaimed.key]
    assert first.status == RESERVED and first.valid and first.reason is None and first.reservation
    assert list(result.peers) == [IPv4Network("10.5.4.0/24")]


def test_a_younger_valid_key_naming_the_same_public_ip_is_named() -> None:
    items = [KV(P + "10.5.3.0-24", value("10.250.0.3"), 2, 2),
             KV(P + "10.5.4.0-24", value("10.250.0.3"), 5, 5)]
    result = judge(items, layout=LAYOUT, network=NETWORK)
    assert result.same_ip == {P + "10.5.4.0-24": P + "10.5.3.0-24"}
    assert len(result.peers) == 2  # both still programmed


def test_without_a_network_config_values_are_decoded_but_nothing_is_a_peer() -> None:
    result = judge([KV(P + "10.5.3.0-24", value("10.250.0.3"), 2, 2)], layout=LAYOUT, network=None)
    verdict = result.verdicts[P + "10.5.3.0-24"]
    assert verdict.status == PEER and verdict.value is not None and verdict.peer is None
    assert result.peers == {}


def test_bad_key_names_are_invalid() -> None:
    result = judge([KV(P + "junk", value("10.250.0.3"), 2, 2),
                    KV(P + "10.5.3.7-24", value("10.250.0.3"), 3, 3)], layout=LAYOUT, network=NETWORK)
    assert {v.reason for v in result.verdicts.values()} == {"bad_key"}
    assert all(v.status == INVALID for v in result.verdicts.values())


def test_book_promotes_the_next_key_when_the_holder_goes_without_a_listing() -> None:
    book = LeaseBook(layout=LAYOUT, network=NETWORK, identity=Identity(public_ip=OWN_IP))
    book.reset([KV(P + "10.5.3.0-24", value("10.250.0.3"), 2, 2)])
    changes = book.put(KV(P + "10.5.3.0-024", value("10.250.0.9"), 5, 5))
    assert not changes
    assert [v.reason for v in book.rejected] == ["duplicate_subnet"]
    changes = book.delete(P + "10.5.3.0-24")
    assert [p.public_ip for p in changes.changed] == [IPv4Address("10.250.0.9")]
    assert book.holder(IPv4Network("10.5.3.0/24")) == P + "10.5.3.0-024"


def test_book_keeps_one_subnet_object_for_a_changed_lease() -> None:
    """A change of a lease's value leaves its subnet as one object: the one the book's
    dicts are keyed by is the changed Peer's (a second, equal copy a changed peer, kept
    until it left, was part of the soak's RSS climb)."""
    book = LeaseBook(layout=LAYOUT, network=NETWORK, identity=Identity(public_ip=OWN_IP))
    book.put(KV(P + "10.5.3.0-24", value("10.250.0.3"), 2, 2))
    (first,) = book.peers
    changes = book.put(KV(P + "10.5.3.0-24", value("10.250.0.4"), 2, 3))
    (peer,) = changes.changed
    assert peer.public_ip == IPv4Address("10.250.0.4")
    assert peer.subnet is first and book.peers[first].subnet is first
    assert next(iter(book.peers)) is first
    assert book.holder(first) == P + "10.5.3.0-24"
    # A key that was not a valid peer keeps its subnet object too.
    book.put(KV(P + "10.5.4.0-24", b"{", 4, 4))
    (rejected,) = book.rejected
    changes = book.put(KV(P + "10.5.4.0-24", value("10.250.0.5"), 4, 5))
    assert [p.subnet for p in changes.added] == [IPv4Network("10.5.4.0/24")]
    assert changes.added[0].subnet is rejected.subnet


def test_a_changed_key_keeps_its_ipv6_part_in_an_ipv4_only_network() -> None:
    """The subnet object is reused on a change, but the verdict still says what the key
    names: its IPv6 part too, which the Peer of an IPv4-only network does not carry."""
    book = LeaseBook(layout=LAYOUT, network=NETWORK, identity=Identity(public_ip=OWN_IP))
    book.put(KV(P + "10.5.3.0-24", value("10.250.0.3"), 2, 2))
    twin = P + "10.5.3.0-24&fd00:0:0:3::-64"
    for version in (3, 4):  # created, then changed: the same verdict each time
        book.put(KV(twin, value(f"10.250.0.{version}"), 3, version))
        (duplicate,) = book.rejected
        assert duplicate.reason == "duplicate_subnet"
        assert duplicate.ipv6_subnet == IPv6Network("fd00:0:0:3::/64"), version


def test_book_reports_a_rejected_key_once_per_version() -> None:
    book = LeaseBook(layout=LAYOUT, network=NETWORK, identity=Identity(public_ip=OWN_IP))
    book.reset([KV(P + "10.5.3.0-24", b"{", 2, 2)])
    assert [v.reason for v in book.rejected] == ["malformed_json"]
    book.reset([KV(P + "10.5.3.0-24", b"{", 2, 2)])
    assert book.rejected == []
    book.put(KV(P + "10.5.3.0-24", b"[", 2, 6))
    assert [v.reason for v in book.rejected] == ["malformed_json"]


# --- property: events one by one end where judging the final listing ends ------

KEY_NAMES = ["10.5.3.0-24", "10.5.3.0-024", "10.5.3.0-24&fd00::-64", "10.5.4.0-24",
             "10.5.4.0-24&fd00:0:0:4::-64", "10.5.1.0-24", "junk", "10.6.0.0-24",
             "10.5.5.0-24&fd00:0:0:1::-64", "10.5.6.0-24&fd01::-64", "10.5.7.0-24&fd00::-96"]
DUAL_VALUES = [json.dumps({"PublicIP": "10.250.0.7", "PublicIPv6": "fd00:250::7",
                           "BackendType": "host-gw"}).encode(),
               json.dumps({"PublicIP": "10.250.0.8", "PublicIPv6": "fe80::8",
                           "BackendType": "host-gw"}).encode(),
               json.dumps({"PublicIP": "10.250.0.9", "PublicIPv6": "10.250.0.9",
                           "BackendType": "host-gw"}).encode()]
VALUES = [value("10.250.0.3"), value("10.250.0.4"), value(str(OWN_IP)), value("10.250.0.5", "alloc"),
          value("127.0.0.1"), value("10.250.0.6", "udp"), b"{", b"null", *DUAL_VALUES]
DUAL = parse_network_config(b'{"Network": "10.5.0.0/16", "Backend": {"Type": "host-gw"}, '
                            b'"EnableIPv6": true, "IPv6Network": "fd00::/48"}')

_op = st.one_of(
    st.tuples(st.just("put"), st.sampled_from(KEY_NAMES), st.sampled_from(VALUES)),
    st.tuples(st.just("delete"), st.sampled_from(KEY_NAMES), st.just(b"")),
)


class Etcd:
    """Just enough of etcd's revision rules for the property."""

    def __init__(self) -> None:
        self.revision = 1
        self.kvs: dict[str, KV] = {}

    def put(self, key: str, raw: bytes) -> KV:
        self.revision += 1
        old = self.kvs.get(key)
        kv = KV(key, raw, old.create_revision if old else self.revision, self.revision)
        self.kvs[key] = kv
        return kv

    def delete(self, key: str) -> bool:
        if key not in self.kvs:
            return False
        self.revision += 1
        del self.kvs[key]
        return True

    @classmethod
    def after(cls, ops: list[tuple[str, str, bytes]]) -> Etcd:
        """An etcd that has seen `ops` (put or delete, key name under P, value)."""
        etcd = cls()
        for op, name, raw in ops:
            if op == "put":
                etcd.put(P + name, raw)
            else:
                etcd.delete(P + name)
        return etcd


def apply_changes(table: dict[IPv4Network, Peer], changes: object) -> None:
    for peer in changes.removed:  # type: ignore[attr-defined]
        assert table.pop(peer.subnet) == peer
    for peer in changes.changed:  # type: ignore[attr-defined]
        assert peer.subnet in table
        table[peer.subnet] = peer
    for peer in changes.added:  # type: ignore[attr-defined]
        assert peer.subnet not in table
        table[peer.subnet] = peer


@settings(max_examples=400, deadline=None)
@given(first=st.lists(_op, max_size=6), then=st.lists(_op, max_size=25),
       own=st.sampled_from([None, "10.5.1.0-24", "10.5.3.0-24", "10.5.1.0-24&fd00:0:0:4::-64"]),
       network=st.sampled_from([NETWORK, DUAL]))
def test_incremental_events_end_in_the_same_result_as_judging_the_final_listing(
    first: list[tuple[str, str, bytes]], then: list[tuple[str, str, bytes]], own: str | None,
    network: NetworkConfig,
) -> None:
    """Dual-stack keys and values too: IPv4-only and dual keys for one subnet, a key naming
    our IPv6 subnet with another IPv4 one, IPv6 parts outside the network, bad PublicIPv6s."""
    net = network
    identity = Identity(public_ip=OWN_IP, own_key=P + own if own else None)
    etcd = Etcd.after(first)
    book = LeaseBook(layout=LAYOUT, network=net, identity=identity)
    table: dict[IPv4Network, Peer] = {}
    apply_changes(table, book.reset(list(etcd.kvs.values())))
    reported = {v.key: (v.reason, v.mod_revision) for v in book.rejected}
    for op, name, raw in then:
        key = P + name
        if key == identity.own_key:
            continue  # the watcher hands the own key to the lease holder, not the book
        if op == "put":
            apply_changes(table, book.put(etcd.put(key, raw)))
        elif etcd.delete(key):
            apply_changes(table, book.delete(key))
        reported.update({v.key: (v.reason, v.mod_revision) for v in book.rejected})
    final = judge(etcd.kvs.values(), layout=LAYOUT, network=net, identity=identity)
    for verdict in final.verdicts.values():  # each valid duplicate was reported as one
        if verdict.status == DUPLICATE and verdict.peer is not None:
            assert reported.get(verdict.key) == ("duplicate_subnet", verdict.mod_revision)
    assert dict(book.peers) == final.peers
    own6 = LAYOUT.parse_lease_key(identity.own_key).ipv6 if identity.own_key else None
    for peer in final.peers.values():
        assert own6 is None or peer.ipv6_subnet != own6  # never our own IPv6 subnet
        assert peer.ipv6_subnet is None or net is DUAL
    assert table == final.peers
    for subnet in final.peers:
        assert book.holder(subnet) == final.holders[subnet]
    assert book.counts.get("host-gw", 0) + book.counts.get("alloc", 0) == len(final.peers)


@settings(max_examples=200, deadline=None)
@given(ops=st.lists(_op, max_size=12),
       own=st.sampled_from([None, "10.5.1.0-24", "10.5.1.0-24&fd00:0:0:4::-64"]),
       network=st.sampled_from([NETWORK, DUAL]))
def test_a_listing_judged_with_its_keys_parsed_already_is_judged_the_same(
    ops: list[tuple[str, str, bytes]], own: str | None, network: NetworkConfig,
) -> None:
    """The lease watcher's first listing comes with its keys parsed by the acquisition
    (`parsed`): every verdict, peer and holder as when the book parses them itself."""
    identity = Identity(public_ip=OWN_IP, own_key=P + own if own else None)
    etcd = Etcd.after(ops)
    parsed = {}
    for key in etcd.kvs:
        try:
            parsed[key] = LAYOUT.parse_lease_key(key)
        except ValueError:
            pass  # as the acquisition's survey: a key that does not parse is left out
    plain = LeaseBook(layout=LAYOUT, network=network, identity=identity)
    given_keys = LeaseBook(layout=LAYOUT, network=network, identity=identity)
    assert plain.reset(list(etcd.kvs.values())) == given_keys.reset(list(etcd.kvs.values()),
                                                                    parsed=parsed)
    assert dict(plain.peers) == dict(given_keys.peers)
    assert plain.rejected == given_keys.rejected
    for subnet in plain.peers:
        assert plain.holder(subnet) == given_keys.holder(subnet)


# --- listings diffed against the book ------------------------------------------


def listing(*hosts: tuple[int, str]) -> list[KV]:
    """Leases of 10.5.<n>.0/24 at PublicIP <ip>, each created at revision n."""
    return [KV(P + f"10.5.{n}.0-24", value(ip), n, n) for n, ip in hosts]


def book_with(*hosts: tuple[int, str]) -> LeaseBook:
    book = LeaseBook(layout=LAYOUT, network=NETWORK, identity=Identity(public_ip=OWN_IP))
    book.reset(listing(*hosts))
    return book


def test_first_listing_adds_everything() -> None:
    book = LeaseBook(layout=LAYOUT, network=NETWORK, identity=Identity(public_ip=OWN_IP))
    changes = book.reset(listing((2, "10.250.0.2"), (3, "10.250.0.3")))
    assert [str(p.subnet) for p in changes.added] == ["10.5.2.0/24", "10.5.3.0/24"]
    assert not changes.changed and not changes.removed and len(book) == 2


def test_a_listing_reports_added_changed_and_removed_against_the_book() -> None:
    book = book_with((2, "10.250.0.2"), (3, "10.250.0.3"), (4, "10.250.0.4"))
    changes = book.reset(listing((2, "10.250.0.2"), (3, "10.250.0.99"), (5, "10.250.0.5")))
    assert [str(p.subnet) for p in changes.added] == ["10.5.5.0/24"]
    assert [str(p.public_ip) for p in changes.changed] == ["10.250.0.99"]
    assert [str(p.subnet) for p in changes.removed] == ["10.5.4.0/24"]


def test_the_same_listing_again_changes_nothing_and_an_empty_one_removes_all() -> None:
    book = book_with((2, "10.250.0.2"), (3, "10.250.0.3"))
    assert not book.reset(listing((2, "10.250.0.2"), (3, "10.250.0.3")))
    assert len(book.reset([]).removed) == 2 and len(book) == 0


def test_put_adds_then_changes_then_is_a_no_op_and_delete_removes_once() -> None:
    book = book_with()
    kv = KV(P + "10.5.2.0-24", value("10.250.0.2"), 2, 2)
    assert len(book.put(kv).added) == 1
    moved = KV(kv.key, value("10.250.0.7"), 2, 3)
    assert [str(p.public_ip) for p in book.put(moved).changed] == ["10.250.0.7"]
    assert not book.put(moved)
    assert len(book.delete(kv.key).removed) == 1
    assert not book.delete(kv.key)
    assert not book.delete(P + "10.5.200.0-24")


def test_changes_extend_concatenates() -> None:
    a, b = book_with((2, "10.250.0.2")).peers.values(), book_with((3, "10.250.0.3")).peers.values()
    total = PeerChanges()
    total.extend(PeerChanges(added=list(a)))
    total.extend(PeerChanges(removed=list(b)))
    assert len(total) == 2 and total


def test_a_key_naming_our_ipv6_subnet_is_ours_to_refuse() -> None:
    own = P + "10.5.1.0-24&fd00:0:0:1::-64"
    twin6 = KV(P + "10.5.2.0-24&fd00:0:0:1::-64",
               json.dumps({"PublicIP": "10.250.0.7", "PublicIPv6": "fd00:250::7",
                           "BackendType": "host-gw"}).encode(), 3, 3)
    result = judge([twin6], layout=LAYOUT, network=DUAL,
                   identity=Identity(public_ip=OWN_IP, own_key=own))
    verdict = result.verdicts[twin6.key]
    assert (verdict.status, verdict.reason) == (INVALID, "own_subnet")
    assert "IPv6 subnet fd00:0:0:1::/64" in (verdict.detail or "")
    assert result.peers == {}


def test_a_reservation_is_judged_by_the_rules_of_a_lease() -> None:
    """Outside the network, another length, an unusable PublicIP, or naming a subnet a
    valid lease holds (older or younger): not a valid reservation. The peers stay the
    lease's, in judge and in the LeaseBook alike."""
    bare = value("10.250.0.9")
    items = [
        KV(P + "10.9.1.0-24", bare, 2, 2, lease=0),
        KV(P + "10.5.16.0-20", bare, 3, 3, lease=0),
        KV(P + "10.5.40.0-24", value("127.0.0.1"), 4, 4, lease=0),
        KV(P + "10.5.41.0-024", bare, 5, 5, lease=0),  # older than the lease it overlaps
        KV(P + "10.5.41.0-24", value("10.250.0.3"), 6, 6),
        KV(P + "10.5.42.0-24", value("10.250.0.4"), 7, 7),
        KV(P + "10.5.42.0-24&fd00::-64", bare, 8, 8, lease=0),  # younger
        KV(P + "10.5.43.0-24", bare, 9, 9, lease=0),  # a good one
    ]
    result = judge(items, layout=LAYOUT, network=NETWORK)
    v = result.verdicts
    assert v[P + "10.9.1.0-24"].reason == "subnet_outside_network"
    assert "outside the network" in (v[P + "10.9.1.0-24"].detail or "")
    assert v[P + "10.5.16.0-20"].reason == "subnet_outside_network"
    assert v[P + "10.5.40.0-24"].reason == "bad_public_ip"
    for key in (P + "10.5.41.0-024", P + "10.5.42.0-24&fd00::-64"):
        assert v[key].status == DUPLICATE and not v[key].valid
        assert "overlaps a lease" in (v[key].detail or "")
    assert v[P + "10.5.43.0-24"].status == RESERVED and v[P + "10.5.43.0-24"].valid
    assert all(not v[kv.key].valid for kv in items[:4])
    assert list(v) == [kv.key for kv in items]  # oldest first, reservations too
    assert {str(s) for s in result.peers} == {"10.5.41.0/24", "10.5.42.0/24"}
    book = LeaseBook(layout=LAYOUT, network=NETWORK, identity=Identity())
    book.reset(items)
    assert dict(book.peers) == result.peers
    assert {r.key for r in book.rejected} == {kv.key for kv in items[:4]} | {items[6].key}
    # The incremental path reports a reservation put over a held subnet, too.
    book.reset(items[4:6])
    book.put(items[3])
    assert [r.key for r in book.rejected] == [items[3].key]
    assert book.rejected[0].status == DUPLICATE
