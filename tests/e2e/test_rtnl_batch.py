"""RtnlSocket.batch (through Netlink.apply) against the real kernel, in a namespace:
requests go without per-request acks, the kernel answers refusals only, and a
final NLMSG_NOOP's ack says every answer has come. Checked: refused requests are
named (with the kernel's errno) among many accepted ones, across several sends
(chunks), and everything else is in the kernel as iproute2 lists it. Needs root;
the namespace is removed afterwards (tests/netns.py)."""

from __future__ import annotations

import errno
import os
from ipaddress import IPv4Address, IPv4Network

import pytest
from netns import Underlay, ajson, underlay

from leaseagent.core.plan import Route
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
