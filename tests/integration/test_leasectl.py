"""leasectl against a real etcd and real agents."""

from __future__ import annotations

import json

from etcd_server import PREFIX, put_config
from leasectl_run import leasectl

ALLOC = {"Network": "10.6.0.0/16", "Backend": {"Type": "alloc"}}
FIELDS = ["subnet", "public_ip", "backend", "vtep_mac", "node_id", "expires_in",
          "reservation", "valid", "error"]


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
    etcd.etcdctl("put", f"{PREFIX}/subnets/10.6.250.0-24", "garbage")
    result = leasectl(etcd, "list", "--json")
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
    assert len(bad) == 1 and bad[0]["subnet"] == "10.6.250.0/24"
    assert bad[0]["error"] == "value is not valid JSON"

    table = leasectl(etcd, "list")
    assert table.returncode == 0
    assert "INVALID: value is not valid JSON" in table.stdout
    assert all(line.replace(".1/", ".0/") in table.stdout for line in subnets.values())
    wide = leasectl(etcd, "list", "-o", "wide")
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


def test_errors_are_one_line_without_traceback(etcd):
    etcd.stop()
    assert "etcd" in one_line_error(leasectl(etcd, "--etcd-timeout", "2", "list"))
    assert "--etcd-endpoints" in one_line_error(leasectl(etcd, "--etcd-endpoints", "ftp://x", "list"))
    assert "not an IPv4 network" in one_line_error(leasectl(etcd, "show", "10.6.9.3/24"))


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
