"""leasectl against a real etcd and real agents."""

from __future__ import annotations

import json
from ipaddress import IPv4Interface, IPv4Network

import pytest
from etcd_server import PREFIX, put_config
from leasectl_run import leasectl, leasectl_all
from subnets import free_subnet

pytestmark = pytest.mark.shared_etcd  # tests/conftest.py: one etcd, emptied before each test


ALLOC = {"Network": "10.6.0.0/16", "Backend": {"Type": "alloc"}}
FIELDS = ["subnet", "ipv6_subnet", "public_ip", "public_ipv6", "backend", "vtep_mac", "public_key",
          "node_id", "expires_in", "reservation", "status", "valid", "error"]


def one_line_error(result) -> str:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_list_json_shows_every_agents_lease_with_exactly_the_documented_fields(etcd, agents):
    put_config(etcd, ALLOC)
    fleet = [agents(f"h{i}", f"10.200.0.{i}").start() for i in (1, 2, 3)]
    subnets = {a.public_ip: a.wait_subnet() for a in fleet}
    # On a subnet no agent holds (theirs are random in the Network).
    garbage = str(free_subnet(IPv4Network(ALLOC["Network"]),
                              [IPv4Interface(s).network for s in subnets.values()]))
    etcd.etcdctl("put", f"{PREFIX}/subnets/{garbage.replace('/', '-')}", "garbage")
    result, table, wide = leasectl_all(etcd, ["list", "--json"], ["list"], ["list", "-o", "wide"])
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert all(list(row) == FIELDS for row in rows)
    by_ip = {row["public_ip"]: row for row in rows if row["valid"]}
    assert set(by_ip) == set(subnets)
    for ip, line in subnets.items():
        row = by_ip[ip]
        assert row["subnet"] == line.replace(".1/", ".0/")
        assert row["backend"] == "alloc" and row["reservation"] is False
        assert 0 < row["expires_in"] <= 10
        assert row["node_id"].startswith("h") and row["error"] is None and row["vtep_mac"] is None
    bad = [row for row in rows if not row["valid"]]
    assert len(bad) == 1 and bad[0]["subnet"] == garbage
    assert bad[0]["error"] == "value is not valid JSON"

    assert table.returncode == 0
    assert "invalid: value is not valid JSON" in table.stdout
    assert all(line.replace(".1/", ".0/") in table.stdout for line in subnets.values())
    assert "NODE ID" in wide.stdout


def test_reserve_show_release(etcd):
    put_config(etcd, ALLOC)
    assert leasectl(etcd, "reserve", "10.6.9.0/24", "--public-ip", "10.200.0.9").returncode == 0
    shown = json.loads(leasectl(etcd, "show", "10.6.9.0/24").stdout)
    assert shown["reservation"] is True and shown["expires_in"] is None
    assert shown["public_ip"] == "10.200.0.9"
    again = leasectl(etcd, "reserve", "10.6.9.0/24", "--public-ip", "10.200.0.10")
    assert "already taken by 10.200.0.9" in one_line_error(again)
    outside = leasectl(etcd, "reserve", "10.9.9.0/24", "--public-ip", "10.200.0.10")
    assert "outside the network" in one_line_error(outside)
    assert leasectl(etcd, "release", "10.6.9.0/24").returncode == 0
    assert "no lease for 10.6.9.0/24" in one_line_error(leasectl(etcd, "show", "10.6.9.0/24"))


def test_config_set_validates_first_and_leaves_etcd_untouched(etcd, tmp_path):
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"Network": "10.8.0.0/16", "Backend": {"Type": "vxlan"}}))
    assert leasectl(etcd, "config", "set", str(good)).returncode == 0
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"Network": "10.9.0.0/16", "SubnetMin": "10.9.1.7"}))
    error = one_line_error(leasectl(etcd, "config", "set", str(bad)))
    assert "SubnetMin" in error and "boundary" in error
    assert json.loads(leasectl(etcd, "config", "get").stdout)["Network"] == "10.8.0.0/16"
    missing = leasectl(etcd, "config", "set", str(tmp_path / "nope.json"))
    assert "cannot read" in one_line_error(missing)


@pytest.mark.fresh_etcd  # stops it
def test_errors_are_one_line_without_traceback(etcd):  # etcd stopped: local checks first
    etcd.stop()
    down, scheme, subnet = leasectl_all(etcd, ["--etcd-timeout", "2", "list"],
                                        ["--etcd-endpoints", "ftp://x", "list"],
                                        ["show", "10.6.9.300/24"])
    assert "etcd" in one_line_error(down)
    assert "--etcd-endpoints" in one_line_error(scheme)
    assert "is not a subnet" in one_line_error(subnet)


def test_list_marks_a_second_key_for_one_subnet_as_a_duplicate(etcd):
    put_config(etcd, ALLOC)
    value = json.dumps({"PublicIP": "10.200.0.3", "BackendType": "alloc", "NodeID": "a"})
    etcd.etcdctl("put", f"{PREFIX}/subnets/10.6.3.0-24", value)
    etcd.etcdctl("put", f"{PREFIX}/subnets/10.6.3.0-24&fd00:6:3::-64",
                 json.dumps({"PublicIP": "10.200.0.9", "BackendType": "alloc", "NodeID": "b"}))
    rows = json.loads(leasectl(etcd, "list", "--json").stdout)
    assert [(r["public_ip"], r["valid"]) for r in rows] == [("10.200.0.3", True),
                                                           ("10.200.0.9", False)]
    assert rows[1]["error"] == f"duplicate: 10.6.3.0/24 is held under key {PREFIX}/subnets/10.6.3.0-24"


def test_list_sorts_numerically_and_says_each_status(etcd, agents):
    put_config(etcd, ALLOC)
    value = {"BackendType": "alloc", "NodeID": "n"}
    for name, ip in (("10.6.100.0-24", "10.200.0.100"), ("10.6.11.0-24", "10.200.0.11"),
                     ("10.6.2.0-24", "10.200.0.2"), ("10.6.12.0-24", "10.200.0.2")):
        etcd.etcdctl("put", f"{PREFIX}/subnets/{name}", json.dumps({**value, "PublicIP": ip}))
    assert leasectl(etcd, "reserve", "10.6.7.0/24", "--public-ip", "10.200.0.7").returncode == 0
    etcd.etcdctl("put", f"{PREFIX}/subnets/junk", "x")
    # Started after them, so its random subnet is none of theirs.
    a = agents("a", "10.200.0.1").start()
    own = a.wait_subnet().replace(".1/", ".0/")
    rows = json.loads(leasectl(etcd, "list", "-o", "json").stdout)
    subnets = [r["subnet"] for r in rows]
    expected = sorted({own, "10.6.100.0/24", "10.6.11.0/24", "10.6.2.0/24", "10.6.12.0/24",
                       "10.6.7.0/24"}, key=lambda s: tuple(int(x) for x in s[:-3].split(".")))
    assert subnets == [*expected, "junk"]
    status = {r["subnet"]: (r["status"], r["valid"]) for r in rows}
    assert status[own] == ("ok", True), rows
    assert status["10.6.7.0/24"] == ("reserved", True)  # as the agents see it: no error
    assert status["10.6.2.0/24"] == ("reserved", True)  # written with no etcd lease
    assert status["10.6.12.0/24"] == ("duplicate", True)  # the younger key of 10.200.0.2
    assert "PublicIP 10.200.0.2 also holds key" in rows[subnets.index("10.6.12.0/24")]["error"]
    assert status["junk"] == ("invalid", False)


def test_reserve_refuses_a_second_subnet_for_one_ip_or_one_outside_the_range(etcd):
    put_config(etcd, {"Network": "10.6.0.0/16", "SubnetMin": "10.6.10.0", "Backend": {"Type": "alloc"}})
    assert leasectl(etcd, "reserve", "10.6.20.0/24", "--public-ip", "10.200.0.9").returncode == 0
    second = leasectl(etcd, "reserve", "10.6.21.0/24", "--public-ip", "10.200.0.9")
    assert second.returncode == 2 and "already has 10.6.20.0/24" in one_line_error(second)
    low = leasectl(etcd, "reserve", "10.6.3.0/24", "--public-ip", "10.200.0.8")
    assert low.returncode == 2 and "outside [SubnetMin, SubnetMax]" in one_line_error(low)
    assert leasectl(etcd, "reserve", "10.6.3.0/24", "--public-ip", "10.200.0.8",
                    "--force").returncode == 0
    assert leasectl(etcd, "reserve", "10.6.21.0/24", "--public-ip", "10.200.0.9",
                    "--force").returncode == 0


def test_every_form_of_subnet_names_the_same_lease_and_junk_goes_by_its_name(etcd):
    put_config(etcd, ALLOC)
    assert leasectl(etcd, "reserve", "10.6.34.1/24", "--public-ip", "10.200.0.34").returncode == 0
    forms = ("10.6.34.0/24", "10.6.34.1/24", "10.6.34.0-24", "10.6.34.0")
    for form, shown in zip(forms, leasectl_all(etcd, *(["show", f] for f in forms)), strict=True):
        assert shown.returncode == 0, (form, shown.stderr)
        assert json.loads(shown.stdout)["key"] == f"{PREFIX}/subnets/10.6.34.0-24"
    etcd.etcdctl("put", f"{PREFIX}/subnets/not-a-subnet", "x")
    shown = json.loads(leasectl(etcd, "show", "not-a-subnet").stdout)
    assert shown["status"] == "invalid" and shown["key"].endswith("/not-a-subnet")
    assert leasectl(etcd, "release", "not-a-subnet").returncode == 0
    assert leasectl(etcd, "release", "10.6.34.1/24").returncode == 0
    # One mistake, one exit status, whichever command makes it.
    mistakes = (["show", "10.6.34.7-24"], ["release", "10.6.34.300/24"],
                ["reserve", "10.6.34.300/24", "--public-ip", "10.200.0.3"])
    for command, result in zip(mistakes, leasectl_all(etcd, *mistakes), strict=True):
        assert result.returncode == 2, command


def test_config_set_refuses_what_the_agents_would_refuse(etcd, tmp_path):
    for backend, field in (({"Type": "udp"}, "Backend.Type"), ({"Type": "vxlan", "VNI": "x"},
                                                                "Backend.VNI")):
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps({"Network": "10.9.0.0/16", "Backend": backend}))
        result = leasectl(etcd, "config", "set", str(bad))
        assert result.returncode == 2 and field in one_line_error(result)
    assert "is not set" in one_line_error(leasectl(etcd, "config", "get"))


def test_version_and_help_show_defaults_variables_and_exit_codes(etcd):
    version, doctor_help, typo = leasectl_all(etcd, ["--version"], ["doctor", "--help"],
                                              ["list", "--outptu", "json"])
    assert version.returncode == 0 and version.stdout.startswith("leasectl ")
    helped = " ".join(doctor_help.stdout.split())
    assert ("[default: /run/leaseagent/subnet.env; $LEASEAGENT_SUBNET_FILE, "
            "$FLANNELD_SUBNET_FILE]") in helped
    assert "exit status:" in helped
    assert typo.returncode == 2 and one_line_error(typo).endswith("(see leasectl --help)")


DUAL_VXLAN = {"Network": "10.6.0.0/16", "EnableIPv6": True, "IPv6Network": "fd00:6::/48",
              "Backend": {"Type": "vxlan"}}
# A lease as flanneld writes it on a dual-stack host (pkg/lease/lease.go's LeaseAttrs).
FLANNELD_DUAL = ('{"PublicIP":"10.200.0.7","PublicIPv6":"fd00:200::7","BackendType":"vxlan",'
                 '"BackendData":{"VNI":1,"VtepMAC":"a6:4f:0b:2f:10:07"},'
                 '"BackendV6Data":{"VNI":1,"VtepMAC":"a6:4f:0b:2f:16:07"}}')


def test_dual_stack_leases_show_both_families_and_are_found_by_either(etcd):
    put_config(etcd, DUAL_VXLAN)
    etcd.etcdctl("put", f"{PREFIX}/subnets/10.6.7.0-24&fd00:6:0:7::-64", FLANNELD_DUAL)
    names = ("fd00:6:0:7::/64", "fd00:6:0:7::1/64", "10.6.7.0/24", "10.6.7.0-24&fd00:6:0:7::-64")
    listed, wide_run, *shows = leasectl_all(etcd, ["list", "-o", "json"], ["list", "-o", "wide"],
                                            *(["show", name] for name in names))
    rows = json.loads(listed.stdout)
    assert [(r["subnet"], r["ipv6_subnet"], r["public_ip"], r["public_ipv6"], r["status"])
            for r in rows] == [("10.6.7.0/24", "fd00:6:0:7::/64", "10.200.0.7", "fd00:200::7",
                                "reserved")]  # put by hand: no etcd lease
    wide = wide_run.stdout
    assert "IPV6 SUBNET" in wide and "PUBLIC IPV6" in wide and "fd00:6:0:7::/64" in wide
    for name, show in zip(names, shows, strict=True):
        shown = json.loads(show.stdout)
        assert shown["key"].endswith("10.6.7.0-24&fd00:6:0:7::-64"), name

    ok = leasectl(etcd, "reserve", "10.6.9.0/24", "--public-ip", "10.200.0.9",
                  "--ipv6-subnet", "fd00:6:0:9::/64")
    assert ok.returncode == 0, ok.stderr
    assert "reserved 10.6.9.0/24 and fd00:6:0:9::/64 for 10.200.0.9" in ok.stdout
    # One subnet is never reserved twice, whatever IPv6 part the second key would have.
    again, taken6, outside = leasectl_all(  # three refusals: none writes
        etcd, ["reserve", "10.6.7.0/24", "--public-ip", "10.200.0.10"],
        ["reserve", "10.6.11.0/24", "--public-ip", "10.200.0.11", "--ipv6-subnet",
         "fd00:6:0:9::/64"],
        ["reserve", "10.6.12.0/24", "--public-ip", "10.200.0.12", "--ipv6-subnet", "fd00:7::/64"])
    assert "already taken by 10.200.0.7" in one_line_error(again)
    assert "fd00:6:0:9::/64 is already taken" in one_line_error(taken6)
    assert "outside the network fd00:6::/48" in one_line_error(outside)
