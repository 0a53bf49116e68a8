"""RtnlSocket.batch (through Netlink.apply) against the real kernel, in a namespace:
requests go without per-request acks, the kernel answers refusals only, and a
final NLMSG_NOOP's ack says every answer has come. Checked: refused requests are
named (with the kernel's errno) among many accepted ones, across several sends
(chunks), and everything else is in the kernel as iproute2 lists it. And the event
socket's filter, in the kernel (rtnl.event_filter). Needs root;
the namespace is removed afterwards (tests/netns.py)."""

from __future__ import annotations

import errno
import os
import socket
from ipaddress import IPv4Address, IPv4Network

import pytest
from netns import Underlay, ajson, ash, underlay

from leaseagent.core.plan import Fdb, Neighbour, Route
from leaseagent.dataplane import rtnl
from leaseagent.dataplane.netlink import Action, Netlink

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)"),
]


@pytest.fixture
def lab() -> Underlay:
    with underlay(1, prefix="lart") as topo:
        yield topo


async def test_refusals_are_named_among_thousands_of_accepted_requests(lab: Underlay) -> None:
    ns = lab.hosts[0]
    nl = await Netlink.open(ns)
    try:
        eth0 = (await ajson("ip", "-n", ns, "-j", "link", "show", "eth0"))[0]["ifindex"]
        count = 3 * nl._raw.chunk + 7  # several sends
        gateway = IPv4Address(lab.ip_of(1))  # on eth0's /24
        routes = [Route(IPv4Network(f"10.{i >> 8}.{i & 255}.0/24"), gateway, eth0)
                  for i in range(count)]
        # A route through a device that does not exist, in every chunk: refused (Linux
        # 6.x says ENETUNREACH, as `ip route replace ... dev <gone>` would).
        bad = {i: Route(IPv4Network(f"10.200.{i & 255}.0/24"), gateway, 9999)
               for i in range(5, count, nl._raw.chunk)}
        objects = [bad.get(i, r) for i, r in enumerate(routes)]
        done, failures = await nl.apply(Action.REPLACE, objects, protocol=76)
        assert {f.obj for f in failures} == set(bad.values())
        said = {os.strerror(errno.ENODEV), os.strerror(errno.ENETUNREACH)}
        assert all(str(f.error).rsplit(": ", 1)[1] in said for f in failures), failures[0]
        assert len(done) == count - len(bad)
        listed = await ajson("ip", "-n", ns, "-j", "route", "show", "proto", "76")
        assert len(listed) == count - len(bad)
        # Removing them again, and some that are not there (gone already is done).
        done, failures = await nl.apply(Action.REMOVE, routes, protocol=76)
        assert failures == [] and len(done) == count
        assert await ajson("ip", "-n", ns, "-j", "route", "show", "proto", "76") == []
    finally:
        nl.close()


async def test_the_event_filter_drops_our_echoes_and_unsent_additions_in_the_kernel(
        lab: Underlay) -> None:
    """The socket filter `read_events` attaches (rtnl.event_filter), read past the reader's
    own check: the echoes of our requests and the FDB's additions (told with port id 0)
    never reach the socket; someone else's changes, and deletions, do."""
    ns = lab.hosts[0]
    await ash("ip", "-n", ns, "link", "add", "flannel.9", "type", "vxlan", "id", "9",
              "dstport", "8472", "local", lab.ip_of(0), "nolearning")
    await ash("ip", "-n", ns, "link", "set", "flannel.9", "up")
    index = (await ajson("ip", "-n", ns, "-j", "link", "show", "flannel.9"))[0]["ifindex"]
    events = rtnl.RtnlSocket.open(ns, groups=rtnl.RTMGRP_NEIGH | rtnl.RTMGRP_IPV4_ROUTE)
    nl = await Netlink.open(ns)
    try:
        filtered = rtnl.event_filter(nl.port_ids, unsent_additions=False)
        rtnl._attach_filter(events._sock, filtered)
        mac, gateway = "02:00:00:00:00:09", IPv4Address("10.5.9.0")
        ours = [Neighbour(index, gateway, mac), Fdb(index, mac, IPv4Address("192.0.2.9")),
                Route(IPv4Network("10.5.9.0/24"), gateway, index, onlink=True)]
        assert (await nl.apply(Action.REPLACE, ours, protocol=76))[1] == []
        await ash("ip", "-n", ns, "neigh", "replace", "10.5.8.0", "lladdr", "02:00:00:00:00:08",
                  "dev", "flannel.9", "nud", "permanent")  # someone else's
        assert (await nl.apply(Action.REMOVE, ours, protocol=76))[1] == []
        seen: list[tuple[int, int, int]] = []  # (type, family, port id)
        while (data := events._recv_nowait()) is not None:
            seen += [(kind, data[start], pid) for kind, _f, _s, pid, start, _e in rtnl.messages(data)]
        assert not [s for s in seen if s[2] in nl.port_ids]
        assert (rtnl.RTM_NEWNEIGH, rtnl.AF_BRIDGE, 0) not in seen  # the FDB addition
        assert [s for s in seen if s[2] not in (0, *nl.port_ids)] == [
            (rtnl.RTM_NEWNEIGH, socket.AF_INET, seen[0][2])]  # someone else's neighbour
        assert (rtnl.RTM_DELNEIGH, rtnl.AF_BRIDGE, 0) in seen  # deletions come (port id 0)
        assert (rtnl.RTM_DELNEIGH, socket.AF_INET, 0) in seen
    finally:
        nl.close()
        events.close()
