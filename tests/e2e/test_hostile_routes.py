"""A lease or a Network that would take over the hosts' own routes, in a namespace lab.

Three hosts with real agents, a real etcd, real kernels (vxlan and host-gw):

- a network config whose Network holds the underlay (10.0.0.0/8 over the lab's
  10.250.0.0/24), put with etcdctl: every running agent ignores it (one ERROR line,
  `leaseagent_network_config_ignored_total{reason="unusable"}`), `leasectl config set`
  refuses it; a lease covering the underlay /24 put with etcdctl is skipped; the
  underlay route stays on every host, etcd stays reachable, every container still
  reaches every other;
- a foreign route (proto static) on one host and an address on another, both inside
  the cluster Network, and leases whose subnets cover them: each host skips exactly
  the lease that overlaps its own route or address (log once, metric
  `leaseagent_dataplane_conflicting_peers`, `leasectl doctor`, `leasectl list` run
  there says `conflict`, `leasectl reserve` there refuses the subnet), the other hosts
  program it; the host's route and address are untouched; deleting the leases
  removes what was programmed and breaks nothing.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from ipaddress import IPv4Network, IPv6Network

import pytest
from labdoctor import doctor
from polling import wait_for
from subnets import lab_free, lab_free6

from leaseagent.lab import Host, Lab, tool

pytestmark = pytest.mark.root



@pytest.fixture(params=["vxlan_lab", "hostgw_lab"], ids=["vxlan", "host-gw"])
def lab(request: pytest.FixtureRequest) -> Lab:
    """The shared 3-host lab of each backend (tests/e2e/conftest.py); each test leaves
    it as it found it."""
    return request.getfixturevalue(request.param)  # type: ignore[no-any-return]


def _hosts(lab: Lab) -> list[Host]:
    return sorted(lab.hosts.values(), key=lambda h: h.index)


def _ip(lab: Lab, host: Host, *args: str) -> str:
    result = lab.host_run(host, ["ip", *args])
    assert result.returncode == 0, result.stderr
    return result.stdout


def _route(lab: Lab, host: Host, dst: str) -> str:
    return _ip(lab, host, "-4", "route", "show", "table", "main", "exact", dst).strip()


def _wait(what: str, check: Callable[[], bool], timeout: float = 15.0) -> None:
    wait_for(check, timeout=timeout, what=what, every=0.1)


def _value(ip: str, backend: str, mac: str) -> str:
    data = {"VNI": 1, "VtepMAC": mac} if backend == "vxlan" else {}
    return json.dumps({"PublicIP": ip, "PublicIPv6": None, "BackendType": backend,
                       "BackendData": data, "NodeID": "planted"})


def _leasectl(lab: Lab, host: Host, *args: str) -> subprocess.CompletedProcess[str]:
    return lab.host_run(host, [tool("leasectl"), "--etcd-endpoints", lab.endpoints,
                               "--etcd-prefix", lab.keys.prefix, *args])


def test_a_network_or_lease_over_the_underlay_leaves_the_underlay_alone(lab: Lab) -> None:
    hosts = _hosts(lab)
    underlay = {h.name: _route(lab, h, "10.250.0.0/24") for h in hosts}
    assert all("proto kernel" in r for r in underlay.values()), underlay
    good = lab.etcdctl("get", lab.keys.config_key, "--print-value-only").strip()
    ignored = {h.name: lab.metrics(h).get(
        'leaseagent_network_config_ignored_total{reason="unusable"}', 0.0) for h in hosts}

    bad = {**json.loads(good), "Network": "10.0.0.0/8"}
    lab.etcdctl("put", lab.keys.config_key, json.dumps(bad))
    for h in hosts:
        _wait(f"{h.name} ignores the config", lambda h=h: lab.metrics(h).get(
            'leaseagent_network_config_ignored_total{reason="unusable"}', 0.0)
            == ignored[h.name] + 1)
        log = h.log_file.read_text()
        assert f"Network 10.0.0.0/8 holds {h.public_ip}, this host's PublicIP" in log
    # A lease naming the underlay's /24, as anyone with write access can put it.
    lab.etcdctl("put", lab.keys.subnets_prefix + "10.250.0.0-24",
                _value("10.250.0.99", lab.backend, "0a:44:00:00:99:01"))
    time.sleep(1.0)  # well past a watch event's programming (milliseconds)
    for h in hosts:
        assert _route(lab, h, "10.250.0.0/24") == underlay[h.name], h.name
        metrics = lab.metrics(h)
        assert metrics.get("leaseagent_etcd_up") == 1.0, h.name
        assert metrics.get(
            'leaseagent_invalid_leases_skipped_total{reason="subnet_outside_network"}', 0) >= 1
        assert lab.http_get(h, "/readyz")[0] == 200
    reach = lab.wait_reachable(timeout=10)
    assert reach.all_ok, "\n" + reach.format()
    lab.etcdctl("del", lab.keys.subnets_prefix + "10.250.0.0-24")
    lab.etcdctl("put", lab.keys.config_key, good)
    for h in hosts:
        assert _route(lab, h, "10.250.0.0/24") == underlay[h.name], h.name
    assert lab.wait_reachable(timeout=10).all_ok


def test_leasectl_config_set_refuses_a_network_holding_this_hosts_network(lab: Lab) -> None:
    good = lab.etcdctl("get", lab.keys.config_key, "--print-value-only").strip()
    bad = json.dumps({**json.loads(good), "Network": "10.240.0.0/12"})  # holds 10.250.0.0/24
    h1 = _hosts(lab)[0]
    path = h1.subnet_file.parent / "bad-network.json"
    path.write_text(bad)
    # In h1's namespace: its default-route interface is eth0 on the underlay.
    cmd = ["ip", "netns", "exec", h1.ns, tool("leasectl"), "--etcd-endpoints", lab.endpoints,
           "--etcd-prefix", lab.keys.prefix, "config", "set", str(path)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=60,
                            stdin=subprocess.DEVNULL, check=False)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert f"Network 10.240.0.0/12 holds {h1.public_ip}, an address of eth0" in lines[0]
    assert lab.etcdctl("get", lab.keys.config_key, "--print-value-only").strip() == good


def test_a_lease_over_a_hosts_own_route_or_address_is_skipped_there_only(lab: Lab) -> None:
    h1, h2, h3 = _hosts(lab)
    # Subnets no host holds (theirs are random in the same range): a static route on h1
    # (as a VPN would add), an address on a device of h2 (a bridge: no dummy module here).
    routed, addressed = (str(n) for n in lab_free(lab, 2))
    address = addressed.replace(".0/24", ".5")
    macs = {routed: "0a:44:00:00:fa:01", addressed: "0a:44:00:00:fb:01"}
    _ip(lab, h1, "route", "add", routed, "via", "10.250.0.1", "proto", "static")
    _ip(lab, h2, "link", "add", "hostile0", "type", "bridge")
    try:
        _ip(lab, h2, "addr", "add", f"{address}/24", "dev", "hostile0")
        _ip(lab, h2, "link", "set", "hostile0", "up")
        before = {routed: _route(lab, h1, routed), addressed: _route(lab, h2, addressed)}
        assert "proto static" in before[routed] and "proto kernel" in before[addressed]
        for subnet, ip in ((routed, "10.250.0.98"), (addressed, "10.250.0.97")):
            lab.etcdctl("put", lab.keys.subnets_prefix + subnet.replace("/", "-"),
                        _value(ip, lab.backend, macs[subnet]))
        # The hosts without a conflict program both; each conflicted host only the other.
        programmed = ((h3, (routed, addressed)), (h1, (addressed,)), (h2, (routed,)))
        for h, subnets in programmed:
            for subnet in subnets:
                _wait(f"{h.name} programs {subnet}",
                      lambda h=h, subnet=subnet: "proto" in _route(lab, h, subnet)
                      and _route(lab, h, subnet) != before.get(subnet))
        time.sleep(1.0)
        assert _route(lab, h1, routed) == before[routed]
        assert _route(lab, h2, addressed) == before[addressed]
        assert address in _ip(lab, h2, "-4", "addr", "show", "dev", "hostile0")
        for h, expected in ((h1, 1.0), (h2, 1.0), (h3, 0.0)):
            assert lab.metrics(h).get("leaseagent_dataplane_conflicting_peers") == expected, h.name
        log1 = h1.log_file.read_text()
        assert log1.count(f"peer {routed} (10.250.0.98, node planted) not programmed") == 1
        assert f"its subnet overlaps this host's route {routed}" in log1
        log2 = h2.log_file.read_text()
        assert f"peer {addressed} (10.250.0.97, node planted) not programmed" in log2
        assert (f"connected route {addressed}" in log2 or f"address {address}" in log2), log2
        doc = doctor(lab, h1)
        assert doc.returncode == 1, doc.stdout + doc.stderr
        assert (f"lease {routed} (10.250.0.98) not programmed here: its subnet overlaps this "
                f"host's route {routed}") in doc.stdout
        # leasectl list on h1 says it; on h3 the same key is what it is (no etcd lease).
        for h, status in ((h1, "conflict"), (h3, "reserved")):  # planted with no etcd lease
            listed = _leasectl(lab, h, "list", "--json")
            assert listed.returncode == 0, listed.stderr
            row = next(r for r in json.loads(listed.stdout) if r["subnet"] == routed)
            assert row["status"] == status and row["valid"] is True, row
            if status == "conflict":
                assert row["error"].startswith(f"overlaps this host's route {routed}")
        # Gone again: the programmed entries go, the host's own stay, nothing breaks.
        for subnet in (routed, addressed):
            lab.etcdctl("del", lab.keys.subnets_prefix + subnet.replace("/", "-"))
        for h in (h1, h2, h3):
            _wait(f"{h.name} clean", lambda h=h: lab.metrics(h).get(
                "leaseagent_dataplane_conflicting_peers") == 0.0)
        _wait("h3 removed both", lambda: not _route(lab, h3, routed) and not _route(lab, h3,
                                                                                  addressed))
        assert _route(lab, h1, routed) == before[routed]
        assert _route(lab, h2, addressed) == before[addressed]
        assert lab.wait_reachable(timeout=10).all_ok
        # `leasectl reserve` on h1 refuses the subnet over its route; on h3 it may.
        refused = _leasectl(lab, h1, "reserve", routed, "--public-ip", "10.250.0.55")
        assert refused.returncode == 2
        assert f"overlaps this host's route {routed}" in refused.stderr.strip(), refused.stderr
        assert _leasectl(lab, h3, "reserve", routed, "--public-ip", "10.250.0.55").returncode == 0
        assert _leasectl(lab, h3, "release", routed).returncode == 0
    finally:
        lab.host_run(h1, ["ip", "route", "del", routed, "proto", "static"])
        lab.host_run(h2, ["ip", "link", "del", "hostile0"])


def test_a_lease_with_another_hosts_vtep_mac_is_not_programmed(lab: Lab) -> None:
    """Found trying more of the same kind (vxlan): a lease planted with a running host's
    VtepMAC and another PublicIP was programmed everywhere: the other hosts routed the
    planted subnet to the victim's VTEP (a neighbour entry with its MAC), and the victim
    got an FDB entry for its own MAC pointing at the planted address. Now the first peer
    holding a VtepMAC keeps it: the planted lease is skipped everywhere (on the victim,
    as its own MAC)."""
    if lab.backend != "vxlan":
        pytest.skip("VtepMACs are vxlan's")
    h1, h2, h3 = _hosts(lab)
    value = lab.lease_value(h1)
    assert value is not None
    mac = value["BackendData"]["VtepMAC"]  # type: ignore[index]
    planted = str(lab_free(lab)[0])
    lab.etcdctl("put", lab.keys.subnets_prefix + planted.replace("/", "-"),
                _value("10.250.0.96", "vxlan", mac))
    try:
        for h in (h1, h2, h3):
            _wait(f"{h.name} skips the planted lease", lambda h=h: lab.metrics(h).get(
                "leaseagent_dataplane_conflicting_peers") == 1.0)
        time.sleep(1.0)
        for h in (h1, h2, h3):
            fdb = lab.kernel_state(h)["fdb"]
            assert not [line for line in fdb if "10.250.0.96" in line], (h.name, fdb)
            assert not _route(lab, h, planted), h.name
        for h in (h2, h3):
            assert [line for line in lab.kernel_state(h)["fdb"] if line.startswith(mac)] == [
                f"{mac} dst {h1.public_ip} self permanent"], h.name
            assert f"it has VtepMAC {mac}, which peer" in h.log_file.read_text()
        assert f"it has VtepMAC {mac}, this host's own" in h1.log_file.read_text()
        assert lab.wait_reachable(timeout=10).all_ok
    finally:
        lab.etcdctl("del", lab.keys.subnets_prefix + planted.replace("/", "-"))
    for h in (h1, h2, h3):  # after the peer hold time (2 s here); once seen slower under load
        try:
            _wait(f"{h.name} clean", lambda h=h: lab.metrics(h).get(
                "leaseagent_dataplane_conflicting_peers") == 0.0, timeout=30)
        except AssertionError as exc:
            # Once in CI (7 December, 11 runs alone passed): what that host's agent saw.
            log = h.log_file.read_text().splitlines()[-40:]
            raise AssertionError(f"{exc}; {h.name}'s agent log, last lines:\n"
                                 + "\n".join(log)) from exc
    # That failure's cause: a full pass while the deleted lease was held gave it h1's MAC,
    # and h1's entries went until the next full pass (Admission.judge; the unit tests in
    # test_holddown make that order every time).
    for h in (h2, h3):
        assert f"which peer {planted} (10.250.0.96) has" not in h.log_file.read_text(), h.name
    assert lab.wait_reachable(timeout=10).all_ok


def _route6(lab: Lab, host: Host, dst: str) -> str:
    return _ip(lab, host, "-6", "route", "show", "table", "main", "exact", dst).strip()


@pytest.mark.parametrize("lab6", ["vxlan_lab6", "hostgw_lab6"], ids=["vxlan", "host-gw"])
def test_the_ipv6_part_of_a_lease_over_a_hosts_own_route_is_skipped_there(
        lab6: str, request: pytest.FixtureRequest) -> None:
    """The same rule for the IPv6 side: a dual-stack lease whose IPv6 subnet covers a
    route of one host (proto static) is not programmed there (neither family), and is
    programmed, both families, on the others."""
    lab: Lab = request.getfixturevalue(lab6)
    backend = lab.backend
    h1, h2, _h3 = _hosts(lab)
    # A subnet of each family no host holds (theirs are random in the same ranges).
    routed4, routed6 = str(lab_free(lab)[0]), str(lab_free6(lab)[0])
    via6 = str(h2.public_ipv6)
    _ip(lab, h1, "-6", "route", "add", routed6, "via", via6, "proto", "static")
    key = lab.keys.lease_key(IPv4Network(routed4), IPv6Network(routed6))
    data = {"VNI": 1, "VtepMAC": "0a:44:00:00:f8:01"} if backend == "vxlan" else {}
    data6 = {"VNI": 1, "VtepMAC": "0a:44:00:00:f8:02"} if backend == "vxlan" else {}
    value = {"PublicIP": "10.250.0.95", "PublicIPv6": "fd00:250::95", "BackendType": backend,
             "BackendData": data, **({"BackendV6Data": data6} if data6 else {}),
             "NodeID": "planted6"}
    try:
        before = _route6(lab, h1, routed6)
        assert "proto static" in before
        lab.etcdctl("put", key, json.dumps(value))
        _wait("h2 programs both families", lambda: "proto" in _route(lab, h2, routed4)
              and "proto" in _route6(lab, h2, routed6))
        _wait("h1 counts the conflict", lambda: lab.metrics(h1).get(
            "leaseagent_dataplane_conflicting_peers") == 1.0)
        time.sleep(1.0)
        assert _route6(lab, h1, routed6) == before
        assert not _route(lab, h1, routed4)
        assert f"overlaps this host's route {routed6}" in h1.log_file.read_text()
    finally:
        lab.etcdctl("del", key)
        lab.host_run(h1, ["ip", "-6", "route", "del", routed6, "proto", "static"])
    _wait("h1 clean", lambda: lab.metrics(h1).get("leaseagent_dataplane_conflicting_peers") == 0.0)
    assert lab.wait_reachable(timeout=10).all_ok
