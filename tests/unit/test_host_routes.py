"""A Network or a lease that would take over the hosts' own routes (core.network, core.plan)."""

from __future__ import annotations

import json
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

import pytest

from leaseagent.core.leases import Peer
from leaseagent.core.network import host_overlap, parse_network_config
from leaseagent.core.plan import HostRoute, cluster_relevant, host_conflict
from leaseagent.core.profiles.vxlan import VxlanLeaseData
from leaseagent.errors import NetworkConfigError


@pytest.mark.parametrize(("network", "why"), [
    ("0.0.0.0/0", "is every address"),
    ("0.0.0.0/1", "0.0.0.0/8"),
    ("127.0.0.0/16", "loopback"),
    ("126.0.0.0/7", "loopback"),
    ("169.254.0.0/16", "link-local"),
    ("224.0.0.0/8", "multicast"),
    ("240.0.0.0/8", "reserved"),
])
def test_a_network_over_special_ranges_is_refused(network: str, why: str) -> None:
    with pytest.raises(NetworkConfigError) as err:
        parse_network_config(json.dumps({"Network": network}))
    assert why in str(err.value) and "Network=" in str(err.value)


@pytest.mark.parametrize("network", ["::/0", "fe80::/48", "ff00::/48", "::/112"])
def test_an_ipv6_network_over_special_ranges_is_refused(network: str) -> None:
    with pytest.raises(NetworkConfigError) as err:
        parse_network_config(json.dumps({"Network": "10.5.0.0/16", "EnableIPv6": True,
                                         "IPv6Network": network}))
    assert "IPv6Network=" in str(err.value)


def test_ordinary_networks_pass() -> None:
    for network in ("10.0.0.0/8", "100.64.0.0/10", "172.16.0.0/12", "192.168.0.0/16"):
        parse_network_config(json.dumps({"Network": network}))


def test_a_network_holding_the_hosts_address_or_underlay_is_refused_on_that_host() -> None:
    config = parse_network_config(json.dumps({"Network": "10.0.0.0/8", "EnableIPv6": True,
                                              "IPv6Network": "fd00:5::/48"}))
    host = [(IPv4Address("10.250.0.11"), "this host's PublicIP"),
            (IPv4Network("10.250.0.0/24"), "the network of eth0")]
    assert host_overlap(config, host) == "Network 10.0.0.0/8 holds 10.250.0.11, this host's PublicIP"
    assert host_overlap(config, host[1:]) == ("Network 10.0.0.0/8 overlaps 10.250.0.0/24, "
                                              "the network of eth0")
    assert host_overlap(config, [(IPv4Network("192.168.1.0/24"), "x")]) is None
    # A Network inside the underlay's network overlaps it too (other hosts live there).
    assert host_overlap(config, [(IPv4Network("10.0.0.0/7"), "the network of eth0")])
    assert "fd00:5::/48 holds fd00:5::11" in (host_overlap(
        config, [(IPv6Address("fd00:5::11"), "this host's PublicIPv6")]) or "")


def _peer(subnet: str, ipv6: str | None = None) -> Peer:
    return Peer(IPv4Network(subnet), IPv4Address("10.250.0.9"), "vxlan",
                VxlanLeaseData(vtep_mac="0a:00:00:00:00:09"),
                ipv6_subnet=IPv6Network(ipv6) if ipv6 else None)


def test_a_peer_conflicts_with_a_route_or_address_inside_it_or_a_link_holding_it() -> None:
    static = HostRoute(IPv4Network("10.244.7.0/24"))
    inner = HostRoute(IPv4Network("10.244.8.128/25"))
    address = HostRoute(IPv4Network("10.244.9.5/32"), address=True)
    link = HostRoute(IPv4Network("10.244.16.0/20"), connected=True)
    via = HostRoute(IPv4Network("10.244.32.0/20"))  # broader, with a gateway: ours wins
    v6 = HostRoute(IPv6Network("fd00:5:0:3::/64"), connected=True)
    routes = (static, inner, address, link, via, v6)
    assert host_conflict(_peer("10.244.7.0/24"), routes) == static  # would be replaced
    assert host_conflict(_peer("10.244.8.0/24"), routes) == inner
    assert host_conflict(_peer("10.244.9.0/24"), routes) == address
    assert host_conflict(_peer("10.244.17.0/24"), routes) == link
    assert host_conflict(_peer("10.244.33.0/24"), routes) is None
    assert host_conflict(_peer("10.244.40.0/24", "fd00:5:0:3::/64"), routes) == v6
    assert host_conflict(_peer("10.244.40.0/24", "fd00:5:0:4::/64"), routes) is None
    assert address.text == "address 10.244.9.5" and link.text == "connected route 10.244.16.0/20"


def test_only_routes_overlapping_the_cluster_network_are_kept_never_a_default_route() -> None:
    routes = [HostRoute(IPv4Network("0.0.0.0/0")), HostRoute(IPv4Network("10.250.0.0/24"),
                                                             connected=True),
              HostRoute(IPv4Network("10.0.0.0/8")), HostRoute(IPv4Network("10.244.3.0/24"))]
    kept = cluster_relevant(routes, [IPv4Network("10.244.0.0/16")])
    assert [str(r.dst) for r in kept] == ["10.0.0.0/8", "10.244.3.0/24"]


def test_flanneld_route_for_the_peer_itself_is_no_conflict() -> None:
    """flanneld's route to a peer (vxlan: via the subnet's base; host-gw: via its
    PublicIP) is replaced when the peer is programmed; any other gateway is a conflict."""
    vxlan = HostRoute(IPv4Network("10.244.7.0/24"), gateway=IPv4Address("10.244.7.0"))
    hostgw = HostRoute(IPv4Network("10.244.7.0/24"), gateway=IPv4Address("10.250.0.9"))
    other = HostRoute(IPv4Network("10.244.7.0/24"), gateway=IPv4Address("10.250.0.1"))
    inner = HostRoute(IPv4Network("10.244.7.128/25"), gateway=IPv4Address("10.244.7.128"))
    assert host_conflict(_peer("10.244.7.0/24"), (vxlan,)) is None
    assert host_conflict(_peer("10.244.7.0/24"), (hostgw,)) is None
    assert host_conflict(_peer("10.244.7.0/24"), (other,)) == other
    assert host_conflict(_peer("10.244.7.0/24"), (inner,)) == inner
