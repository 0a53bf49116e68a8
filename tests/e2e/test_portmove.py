"""The WireGuard port move's redirect (leaseagent.dataplane.portmove) on a real kernel.

In a namespace of its own (tests/netns.py): while a socket listens on the old
port, packets to it are left alone; once it is closed they reach the new port;
the moves are read back from the table, and removing it leaves nothing.
"""

from __future__ import annotations

import asyncio
import os
import sys

import pytest
from netns import underlay

from leaseagent.dataplane import portmove
from leaseagent.dataplane.portmove import Move
from leaseagent.lab import netns
from leaseagent.lab.commands import run, tool

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)")]

# Binds the old and the new port, sends to the old one with the old socket open, then
# closed; prints where each datagram arrived.
PROBE = """
import socket
def bound(port):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", port))
    return s
def got(s, wait):
    s.settimeout(wait)
    try:
        return s.recv(16).decode()
    except socket.timeout:
        return "-"
old, new = bound(51820), bound(51830)
tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
tx.sendto(b"open", ("10.99.0.1", 51820))
print(got(old, 5), got(new, 0.3))
old.close()
tx.sendto(b"closed", ("10.99.0.1", 51820))
print(got(new, 5))
"""


async def test_packets_to_the_old_port_reach_the_new_one_only_once_nothing_listens() -> None:
    with underlay(1, prefix="lapm") as lab:
        ns = lab.hosts[0]
        moves = {Move(4, 51820, 51830), Move(6, 51821, 51831)}
        await portmove.put(moves, netns=ns)
        assert await portmove.observe(netns=ns) == moves
        proc = await asyncio.create_subprocess_exec(
            *netns.exec_argv(ns, [sys.executable, "-c", PROBE]),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await proc.communicate()
        assert proc.returncode == 0, err.decode()
        assert out.decode().split() == ["open", "-", "closed"]
        await portmove.put({Move(4, 51820, 51830)}, netns=ns)  # one move fewer
        assert await portmove.observe(netns=ns) == {Move(4, 51820, 51830)}
        await portmove.put((), netns=ns)
        assert await portmove.observe(netns=ns) == set()
        assert not await portmove.remove(netns=ns)  # nothing left to remove


async def test_leasectl_cleanup_removes_what_a_port_change_left() -> None:
    """An agent stopped within --peer-hold-time of a port change left the WireGuard
    redirect, or a vxlan device put aside: `leasectl cleanup` removes both."""
    with underlay(1, prefix="lapc") as lab:
        ns = lab.hosts[0]
        await portmove.put({Move(4, 51820, 51830)}, netns=ns)
        run(netns.exec_argv(ns, ["ip", "link", "add", "flaside.1", "type", "vxlan", "id", "1",
                                 "dstport", "8472", "local", "10.99.0.1", "dev", "eth0"]))
        out = run(netns.exec_argv(ns, [tool("leasectl"), "cleanup"]))
        assert "removed device flaside.1" in out
        assert "removed the nftables table inet leaseagent-ports" in out
        assert await portmove.observe(netns=ns) == set()
