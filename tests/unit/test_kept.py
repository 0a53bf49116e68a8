"""Which devices are ours and which of them the running backend does not use
(leaseagent.dataplane.kept): the rule the agent's start, doctor and cleanup share."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address

from leaseagent.core.plan import DeviceSpec, VxlanAttrs
from leaseagent.dataplane.kept import describe, in_the_way, ours, unused
from leaseagent.dataplane.netlink import Link

V4, V6 = IPv4Address("10.99.0.1"), IPv6Address("fd00::1")


def vxlan(name: str, *, vni: int = 1, port: int = 8472, local: IPv4Address | IPv6Address = V4
          ) -> Link:
    return Link(index=len(name), name=name, kind="vxlan", mtu=1450, address=None, up=True,
                vxlan=VxlanAttrs(vni=vni, port=port, local=local, link=2))


def wanted(name: str, *, vni: int = 1, port: int = 8472,
           local: IPv4Address | IPv6Address = V4) -> DeviceSpec:
    return DeviceSpec(name=name, kind="vxlan", mtu=1450,
                      vxlan=VxlanAttrs(vni=vni, port=port, local=local, link=2))


def test_ours_are_the_devices_a_backend_profile_owns_by_name_and_kind() -> None:
    links = [vxlan("flannel.1"), vxlan("flaside.1"), vxlan("flback6.2"), vxlan("flannel-v6.7"),
             vxlan("other.1"), Link(9, "flannel.2", "bridge", 1500, None, True),
             Link(10, "flannel-wg", "wireguard", 1420, None, True),
             Link(11, "eth0", None, 1500, None, True)]
    assert [link.name for link in ours(links)] == [
        "flannel.1", "flaside.1", "flback6.2", "flannel-v6.7", "flannel-wg"]
    assert [link.name for link in unused(links, {"flannel.1", "flannel-wg"})] == [
        "flaside.1", "flback6.2", "flannel-v6.7"]


def test_a_device_is_in_the_way_only_on_a_wanted_ones_vni_port_and_family() -> None:
    want = [wanted("flannel.1"), wanted("flannel-v6.1", local=V6)]
    assert in_the_way(vxlan("flaside.1"), want)
    assert in_the_way(vxlan("flaside6.1", local=V6), want)
    assert not in_the_way(vxlan("flaside.1", port=4789), want)  # beside it: kept
    assert not in_the_way(vxlan("flannel.2", vni=2), want)
    assert not in_the_way(vxlan("flannel.1", port=4789), want)  # the wanted name: prepare's
    assert not in_the_way(Link(9, "flannel-wg", "wireguard", 1420, None, True), want)


def test_a_kept_device_is_described_with_its_vni_and_port() -> None:
    assert describe(vxlan("flaside.1", port=4789)) == "flaside.1 (vxlan VNI 1, UDP 4789)"
    assert describe(Link(9, "flannel-wg", "wireguard", 1420, None, True)) == \
        "flannel-wg (wireguard)"
