"""The port move's nftables script (leaseagent.dataplane.portmove): what it writes and
reads back. tests/e2e/test_portmove.py runs it on a real kernel."""

from __future__ import annotations

from leaseagent.dataplane.portmove import _FOUND, Move, render


def test_each_move_leaves_a_listened_port_alone_and_redirects_it_once_nothing_listens() -> None:
    script = render([Move(6, 51821, 51831), Move(4, 51820, 51830)])
    assert script.startswith("table inet leaseagent-ports\ndelete table inet leaseagent-ports\n")
    rules = [line.strip() for line in script.splitlines() if "udp dport" in line]
    assert rules == [
        "meta nfproto ipv4 udp dport 51820 socket transparent 0 accept",
        'meta nfproto ipv4 udp dport 51820 counter udp dport set 51830 comment '
        '"leaseagent:port-move:4:51820:51830"',
        "meta nfproto ipv6 udp dport 51821 socket transparent 0 accept",
        'meta nfproto ipv6 udp dport 51821 counter udp dport set 51831 comment '
        '"leaseagent:port-move:6:51821:51831"',
    ]
    assert "priority raw" in script  # before conntrack: no connection keeps the old port


def test_the_moves_are_read_back_from_the_comments() -> None:
    moves = {Move(4, 51820, 51830), Move(6, 51821, 51831)}
    found = {Move(int(f), int(o), int(n)) for f, o, n in _FOUND.findall(render(moves))}
    assert found == moves
