"""PeerTable: snapshots and single events turned into added / changed / removed."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network

from leaseagent.core.lease import Peer
from leaseagent.core.peers import PeerChanges, PeerTable


def peer(third_octet: int, *, ip: str = "", mac: str = "c6:d2:32:6f:8f:01") -> Peer:
    return Peer(
        subnet=IPv4Network(f"10.5.{third_octet}.0/24"),
        public_ip=IPv4Address(ip or f"192.168.64.{third_octet}"),
        backend_type="vxlan",
        vtep_mac=mac,
    )


def snapshot(*peers: Peer) -> dict[IPv4Network, Peer]:
    return {p.subnet: p for p in peers}


def test_first_replace_adds_everything() -> None:
    table = PeerTable()
    changes = table.replace(snapshot(peer(1), peer(2)))
    assert changes == PeerChanges(added=[peer(1), peer(2)])
    assert dict(table.peers) == snapshot(peer(1), peer(2))
    assert len(table) == 2


def test_replace_reports_added_changed_and_removed_against_the_old_table() -> None:
    table = PeerTable()
    table.replace(snapshot(peer(1), peer(2), peer(3)))
    moved = peer(2, ip="192.168.64.99")
    changes = table.replace(snapshot(peer(1), moved, peer(4)))
    assert changes.added == [peer(4)]
    assert changes.changed == [moved]
    assert changes.removed == [peer(3)]
    assert dict(table.peers) == snapshot(peer(1), moved, peer(4))


def test_replace_with_the_same_snapshot_changes_nothing() -> None:
    table = PeerTable()
    table.replace(snapshot(peer(1), peer(2)))
    changes = table.replace(snapshot(peer(1), peer(2)))
    assert not changes
    assert changes == PeerChanges()


def test_replace_with_an_empty_snapshot_removes_all() -> None:
    table = PeerTable()
    table.replace(snapshot(peer(1), peer(2)))
    assert table.replace({}).removed == [peer(1), peer(2)]
    assert len(table) == 0


def test_table_does_not_alias_the_snapshot() -> None:
    table = PeerTable()
    snap = snapshot(peer(1))
    table.replace(snap)
    snap[peer(2).subnet] = peer(2)
    assert len(table) == 1


def test_put_adds_then_changes_then_is_a_no_op() -> None:
    table = PeerTable()
    assert table.put(peer(1)) == PeerChanges(added=[peer(1)])
    new_mac = peer(1, mac="c6:d2:32:6f:8f:02")
    assert table.put(new_mac) == PeerChanges(changed=[new_mac])
    assert not table.put(new_mac)
    assert table.peers[new_mac.subnet] == new_mac


def test_remove_reports_the_removed_peer_once() -> None:
    table = PeerTable()
    table.put(peer(1))
    assert table.remove(peer(1).subnet) == PeerChanges(removed=[peer(1)])
    assert not table.remove(peer(1).subnet)
    assert not table.remove(IPv4Network("10.5.200.0/24"))


def test_changes_extend_concatenates() -> None:
    total = PeerChanges()
    total.extend(PeerChanges(added=[peer(1)]))
    total.extend(PeerChanges(removed=[peer(2)], changed=[peer(3)]))
    assert total == PeerChanges(added=[peer(1)], changed=[peer(3)], removed=[peer(2)])
    assert total
