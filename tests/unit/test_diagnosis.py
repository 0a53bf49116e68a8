"""leasectl doctor's pure comparison (leaseagent.core.diagnosis)."""

from __future__ import annotations

from dataclasses import replace
from ipaddress import IPv4Address, IPv4Interface, IPv4Network, IPv6Address, IPv6Network

from planning import plan_vxlan

from leaseagent.core.diagnosis import (
    check_subnet_env,
    device_problems,
    kept_for_roll_out,
    object_problems,
    pick_own_lease,
    vtep_mac_problems,
)
from leaseagent.core.leases import LeaseValue, Peer
from leaseagent.core.plan import (
    DeviceSpec,
    DeviceState,
    Fdb,
    Neighbour,
    Route,
    VxlanAttrs,
    compare_device,
    diff,
    flatten,
)
from leaseagent.core.profiles.base import runs_other
from leaseagent.core.profiles.vxlan import VxlanLeaseData, VxlanOptions

NAMES = {2: "eth0", 5: "flannel.1"}
MAC = "0a:00:00:00:00:01"


def _peers() -> dict[IPv4Network, Peer]:
    p = Peer(IPv4Network("10.5.3.0/24"), IPv4Address("10.250.0.12"), "vxlan", VxlanLeaseData(MAC),
             node_id="h2")
    return {p.subnet: p}


def _plan(peers):
    return plan_vxlan(IPv4Network("10.5.1.0/24"), peers, vxlan_index=5, underlay_index=2)


def compare_objects(plan, current, *, peers, names):
    """As doctor does: core.plan's diff, then the lines."""
    return object_problems(diff(flatten(plan), set(current)), plan=plan, current=current,
                           peers=peers, names=names)


def test_a_kernel_that_matches_the_plan_has_no_problem():
    peers = _peers()
    plan = _plan(peers)
    current = [obj for objs in plan.values() for obj in objs]
    assert compare_objects(plan, current, peers=peers, names=NAMES) == []


def test_a_missing_route_is_named_with_its_peer():
    peers = _peers()
    plan = _plan(peers)
    current = [obj for objs in plan.values() for obj in objs if not isinstance(obj, Route)]
    problems = compare_objects(plan, current, peers=peers, names=NAMES)
    assert [p.text for p in problems] == [
        "missing route 10.5.3.0/24 via 10.5.3.0 dev flannel.1 onlink (peer 10.250.0.12, node h2)"]


def test_a_route_of_ours_for_a_subnet_nobody_holds_is_stale():
    peers = _peers()
    plan = _plan(peers)
    stray = Route(IPv4Network("10.5.9.0/24"), IPv4Address("10.5.9.0"), 5, onlink=True)
    current = [obj for objs in plan.values() for obj in objs] + [stray]
    problems = compare_objects(plan, current, peers=peers, names=NAMES)
    assert len(problems) == 1
    assert problems[0].kind == "stale"
    assert "no valid lease holds 10.5.9.0/24" in problems[0].text


def test_ipv6_objects_are_named_in_iproute2_form_and_judged_by_the_ipv6_lease():
    """A dual-stack peer: its IPv6 route missing, the FDB entry of its IPv6 VtepMAC to
    an old remote (a MAC has one); stale: an IPv6 route and neighbour nobody's lease
    explains."""
    mac6 = "0a:00:00:00:06:01"
    peer = replace(next(iter(_peers().values())), ipv6_subnet=IPv6Network("fd00:5:0:3::/64"),
                   public_ipv6=IPv6Address("fd00:250::12"), data6=VxlanLeaseData(mac6))
    peers = {peer.subnet: peer}
    plan = plan_vxlan(IPv4Network("10.5.1.0/24"), peers, vxlan_index=5, underlay_index=2,
                      vxlan6_index=6)
    current = [o for objs in plan.values() for o in objs
               if (o.kind != "route" or o.dst.version == 4) and (o.kind != "fdb" or o.ifindex != 6)]
    current += [Fdb(6, mac6, IPv6Address("fd00:250::99")),
                Neighbour(6, IPv6Address("fd00:5:0:9::"), mac6),
                Route(IPv6Network("fd00:5:0:9::/64"), None, 2)]
    problems = compare_objects(plan, current, peers=peers, names={**NAMES, 6: "flannel-v6.1"})
    assert [p.text for p in problems] == [
        "wrong fdb 0a:00:00:00:06:01 dst fd00:250::99 dev flannel-v6.1 (want fdb "
        "0a:00:00:00:06:01 dst fd00:250::12 dev flannel-v6.1; peer 10.250.0.12, node h2)",
        "missing route fd00:5:0:3::/64 via fd00:5:0:3:: dev flannel-v6.1 onlink metric 1024 "
        "(peer 10.250.0.12, node h2)",
        "stale route fd00:5:0:9::/64 dev eth0 metric 1024 (no valid lease holds fd00:5:0:9::/64)",
        "stale neighbour fd00:5:0:9:: lladdr 0a:00:00:00:06:01 dev flannel-v6.1 "
        "(no valid lease holds a subnet at fd00:5:0:9::)",
    ]


SPEC = DeviceSpec(name="flannel.1", kind="vxlan", mtu=1450,
                  vxlan=VxlanAttrs(1, 8472, IPv4Address("10.250.0.11"), 2),
                  address=IPv4Interface("10.5.1.0/32"))


def test_device_with_wrong_mtu_and_vni_and_a_missing_address():
    state = DeviceState(name="flannel.1", index=5, kind="vxlan", up=True, mac="0a:00:00:00:00:99",
                        mtu=1400, vxlan=VxlanAttrs(2, 8472, IPv4Address("10.250.0.11"), 2))
    texts = " | ".join(p.text for p in device_problems(
        compare_device(SPEC, state), mtu_notes={"flannel.1": "underlay MTU 1500 - 50"}))
    assert "device flannel.1 VNI is 2, want 1" in texts
    assert "MTU 1400, want 1450 (underlay MTU 1500 - 50)" in texts
    assert "missing address 10.5.1.0/32 dev flannel.1" in texts


def test_vtep_mac_three_ways():
    problems = vtep_mac_problems(device="flannel.1", device_mac="0a:00:00:00:00:99", lease_mac=MAC,
                                 stored_mac="0a:00:00:00:00:99", state_file="/var/lib/x/vtep-mac")
    assert [p.text for p in problems] == [
        "device flannel.1 MAC 0a:00:00:00:00:99 but the lease's VtepMAC is 0a:00:00:00:00:01"]


def test_no_device_is_one_problem():
    problems = device_problems(compare_device(SPEC, None))
    assert [p.kind for p in problems] == ["missing"]


def test_a_device_of_another_kind_is_one_problem():
    state = DeviceState(name="flannel.1", index=5, kind="bridge", up=True, mac=MAC, mtu=1450)
    assert [p.text for p in device_problems(compare_device(SPEC, state))] == [
        "device flannel.1 kind is bridge, want vxlan"]


def test_subnet_env_against_the_lease():
    env = {"FLANNEL_NETWORK": "10.5.0.0/16", "FLANNEL_SUBNET": "10.5.4.1/24", "FLANNEL_MTU": "1450",
           "FLANNEL_IPMASQ": "false"}
    problems = check_subnet_env(env, path="/run/x", network=IPv4Network("10.5.0.0/16"),
                                subnet=IPv4Network("10.5.3.0/24"), mtu=1450, mtu_source="device")
    assert [p.text for p in problems] == [
        "subnet.env FLANNEL_SUBNET=10.5.4.1/24 but the lease is 10.5.3.0/24 (want 10.5.3.1/24)"]
    assert check_subnet_env({**env, "FLANNEL_SUBNET": "10.5.3.1/24"}, path="/run/x",
                            network=IPv4Network("10.5.0.0/16"), subnet=IPv4Network("10.5.3.0/24"),
                            mtu=1450, mtu_source="device") == []


def test_subnet_env_ipv6_lines_against_the_lease():
    env = {"FLANNEL_NETWORK": "10.5.0.0/16", "FLANNEL_SUBNET": "10.5.3.1/24",
           "FLANNEL_IPV6_NETWORK": "fd00:5::/48", "FLANNEL_IPV6_SUBNET": "fd00:5:0:4::1/64",
           "FLANNEL_MTU": "1430", "FLANNEL_IPMASQ": "false"}
    common = {"path": "/run/x", "network": IPv4Network("10.5.0.0/16"),
              "subnet": IPv4Network("10.5.3.0/24"), "mtu": 1430, "mtu_source": "device"}
    problems = check_subnet_env(env, **common, ipv6_network=IPv6Network("fd00:5::/48"),
                                ipv6_subnet=IPv6Network("fd00:5:0:3::/64"))
    assert [p.text for p in problems] == [
        "subnet.env FLANNEL_IPV6_SUBNET=fd00:5:0:4::1/64 but the lease's IPv6 subnet is "
        "fd00:5:0:3::/64 (want fd00:5:0:3::1/64)"]
    assert [p.text for p in check_subnet_env(env, **common)] == [
        "subnet.env FLANNEL_IPV6_NETWORK=fd00:5::/48 but the network config has no IPv6",
        "subnet.env FLANNEL_IPV6_SUBNET=fd00:5:0:4::1/64 but the network config has no IPv6"]


def test_own_lease_prefers_the_subnet_env_one_and_reports_duplicates():
    value = LeaseValue(public_ip=IPv4Address("10.250.0.11"), backend_type="vxlan")
    ours = {IPv4Network("10.5.3.0/24"): value, IPv4Network("10.5.7.0/24"): value}
    own, problems = pick_own_lease(ours, public_ip=IPv4Address("10.250.0.11"),
                                   env_subnet=IPv4Network("10.5.7.0/24"), holder_of_env_subnet=None)
    assert own == IPv4Network("10.5.7.0/24")
    assert len(problems) == 1 and "also 10.5.3.0/24" in problems[0].text
    own, problems = pick_own_lease({}, public_ip=IPv4Address("10.250.0.11"),
                                   env_subnet=IPv4Network("10.5.7.0/24"), holder_of_env_subnet=None)
    assert own is None and "lease missing" in problems[0].text
    assert "10.5.7.0/24 of subnet.env is free" in problems[0].text


def test_a_roll_out_s_kept_entries_are_a_kept_line_not_stale():
    """During a VNI change (ours 2), the kernel's entries for a peer whose lease still
    names VNI 1 are what the agent keeps on the old device (its own rule): doctor says
    `kept:` for that peer and reports only what nobody keeps as stale."""
    late = Peer(IPv4Network("10.5.3.0/24"), IPv4Address("10.250.0.12"), "vxlan",
                VxlanLeaseData(MAC, 1), node_id="h2")
    switched = Peer(IPv4Network("10.5.4.0/24"), IPv4Address("10.250.0.13"), "vxlan",
                    VxlanLeaseData("0a:00:00:00:00:02", 2), node_id="h3")
    peers = {late.subnet: late, switched.subnet: switched}
    plan = plan_vxlan(IPv4Network("10.5.1.0/24"), {switched.subnet: switched},
                      vxlan_index=6, underlay_index=2)  # the new flannel.2 (6)
    on_old = plan_vxlan(IPv4Network("10.5.1.0/24"), {late.subnet: late},
                        vxlan_index=5, underlay_index=2)[late.subnet]  # the kept flannel.1 (5)
    stray = Route(IPv4Network("10.5.9.0/24"), IPv4Address("10.5.9.0"), 5, onlink=True)
    current = [*flatten(plan), *on_old, stray]
    names = {**NAMES, 6: "flannel.2"}
    changes = diff(flatten(plan), set(current))
    assert len(changes.to_remove) == len(on_old) + 1  # without the rule: all stale

    def rule(peer: Peer) -> str | None:
        return runs_other(peer, "vxlan", VxlanOptions(vni=2))

    kept_changes, lines = kept_for_roll_out(changes, peers, rule)
    problems = object_problems(kept_changes, plan=plan, current=current, peers=peers,
                               names=names)
    assert [p.kind for p in problems] == ["stale"]
    assert "10.5.9.0/24" in problems[0].text
    assert lines == ["kept: the entries for peer 10.5.3.0/24 (10.250.0.12), which runs vxlan "
                     "VNI 1 (a roll-out): the agent keeps them until its lease says ours"]
    # No roll-out: nothing is kept, the changes are as they were.
    assert kept_for_roll_out(changes, {switched.subnet: switched}, rule) == (changes, [])
