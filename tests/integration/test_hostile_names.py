"""Hostile names and reservations in etcd, against a real etcd and real agent processes.

- key names and NodeIDs holding a newline, ESC (a terminal control sequence) or a
  right-to-left override: every agent log line and every leasectl line stays one line,
  with no control character in it; what is stored is shown escaped;
- a key name with non-ASCII digits (flannel's `\\d` is ASCII) is an invalid key, never a
  subnet, for leasectl and the agents;
- a reservation (no etcd lease) outside the Network, of another length than SubnetLen,
  or overlapping another host's lease is not a valid `reserved` in `leasectl list`, and
  an agent whose PublicIP such a reservation names does not take it.
"""

from __future__ import annotations

import json
import sys
import time
from ipaddress import IPv4Interface, IPv4Network

import pytest
from etcd_server import PREFIX, put_config
from leasectl_run import leasectl, leasectl_all
from subnets import free_subnet

pytestmark = pytest.mark.shared_etcd  # tests/conftest.py: one etcd, emptied before each test


ALLOC = {"Network": "10.6.0.0/16", "SubnetLen": 24, "Backend": {"Type": "alloc"}}
NETWORK = IPv4Network(ALLOC["Network"])
SUBNETS = f"{PREFIX}/subnets/"
CONTROL = {chr(c) for c in range(0x20)} | {"\x7f", "\u202e", "\u2028"}
FORGED = "2026-01-01 00:00:00,000 ERROR forged line"


def _clean(text: str) -> None:
    """No control character but the line breaks between lines, no forged line."""
    for line in text.splitlines():
        assert not (set(line) & CONTROL), repr(line)
        assert not line.startswith(FORGED), repr(line)


def _value(ip: str, node_id: str | None = None, **extra: object) -> str:
    doc: dict[str, object] = {"PublicIP": ip, "PublicIPv6": None, "BackendType": "alloc", **extra}
    if node_id is not None:
        doc["NodeID"] = node_id
    return json.dumps(doc)  # JSON escapes the controls; etcd stores the decoded text's escapes


def test_names_with_newlines_and_escapes_never_reach_a_log_or_terminal_raw(etcd, agents):
    put_config(etcd, ALLOC)
    watcher = agents("w", "10.200.0.1", extra=["--log-format", "text"]).start(metrics=True)
    own = IPv4Interface(watcher.wait_subnet()).network
    evil_node = f"evil\n{FORGED}\x1b]0;owned\x07\x1b[2J\u202e"
    # A valid peer whose NodeID is hostile (on a subnet the watcher does not hold: its
    # own is random), and keys whose names are.
    peer = str(free_subnet(NETWORK, [own], first=77))
    etcd.etcdctl("put", SUBNETS + peer.replace("/", "-"),
                 _value("10.200.0.77", evil_node, BackendData={}))
    etcd.etcdctl("put", SUBNETS + f"10.6.78.0-24\n{FORGED}\x1b[31m", _value("10.200.0.78"))
    etcd.etcdctl("put", SUBNETS + "10.6.79.0-24\u202e42-", _value("10.200.0.79"))
    # flannel's \d is ASCII: Arabic-Indic digits name no subnet (int() would read 8 and 24).
    etcd.etcdctl("put", SUBNETS + "10.6.\u0668.0-\u0662\u0664", _value("10.200.0.80"))
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if watcher.metric("leaseagent_invalid_leases_skipped_total", 'reason="bad_key"') == 3:
            break
        time.sleep(0.1)
    assert watcher.metric("leaseagent_invalid_leases_skipped_total", 'reason="bad_key"') == 3
    assert watcher.metric("leaseagent_peers", 'backend="alloc"') == 1  # the evil node only
    log = watcher.log()
    _clean(log)
    assert "10.6.78.0-24\\n2026-01-01" in log and "\\x1b[31m" in log  # shown, escaped
    assert "\\u202e42-" in log

    listed, table, wide_run, shown = leasectl_all(  # reads only
        etcd, ["list", "--json"], ["list", "-o", "table"], ["list", "-o", "wide"],
        ["show", "10.6.78.0-24\nx"])
    rows = json.loads(listed.stdout)
    by_subnet = {row["subnet"]: row for row in rows}
    assert by_subnet[peer]["node_id"] == evil_node  # JSON: the stored text, escaped by JSON
    assert by_subnet[peer]["valid"] is True
    assert not by_subnet["10.6.\u0668.0-\u0662\u0664"]["valid"]
    # Not read as 10.6.8.0/24 (which the watcher itself may hold).
    assert by_subnet.get("10.6.8.0/24", {}).get("public_ip") != "10.200.0.80"
    for result in (table, wide_run):
        assert result.returncode == 0, result.stderr
        _clean(result.stdout)
    wide = wide_run.stdout
    assert "evil\\n2026-01-01" in wide and "\\x1b]0;owned\\x07\\x1b[2J\\u202e" in wide
    # An error naming such a key is one line too.
    _clean(shown.stderr)
    assert len(shown.stderr.strip().splitlines()) == 1


def test_reservations_are_judged_like_leases(etcd, agents):
    put_config(etcd, ALLOC)
    holder = agents("h", "10.200.0.1").start()
    held = holder.wait_subnet().replace(".1/", ".0/")  # 10.6.X.0/24
    octet = held.split(".")[2]
    reservation = _value("10.200.0.9")
    # What `leasectl reserve` refuses, written by hand: no etcd lease on any of them.
    etcd.etcdctl("put", SUBNETS + "10.9.1.0-24", reservation)  # outside the Network
    etcd.etcdctl("put", SUBNETS + "10.6.240.0-20", reservation)  # not a /24
    etcd.etcdctl("put", SUBNETS + f"10.6.{octet}.0-024", reservation)  # another host's subnet
    free = str(free_subnet(NETWORK, [IPv4Network(held)]))  # a good one
    etcd.etcdctl("put", SUBNETS + free.replace("/", "-"), _value("10.200.0.10"))
    listed, table_run = leasectl_all(etcd, ["list", "--json"], ["list"])
    rows = {row["subnet"]: row for row in json.loads(listed.stdout)}
    good = rows[free]
    assert good["status"] == "reserved" and good["valid"] is True
    outside, wrong_len = rows["10.9.1.0/24"], rows["10.6.240.0/20"]
    for row in (outside, wrong_len):
        assert row["reservation"] is True and row["valid"] is False and row["status"] == "invalid"
    assert "outside the network" in outside["error"]
    assert "not a /24" in wrong_len["error"]
    over = [r for r in json.loads(listed.stdout) if r["subnet"] == held and r["reservation"]]
    assert len(over) == 1 and over[0]["valid"] is False and over[0]["status"] == "duplicate"
    assert "overlaps a lease" in over[0]["error"]
    table = table_run.stdout
    statuses = [line.split("never", 1)[1].split(":")[0].strip()
                for line in table.splitlines() if "never" in line]
    assert sorted(statuses) == ["duplicate", "invalid", "invalid", "reserved"], table

    # The host all three name does not take any of them; it gets a subnet of its own.
    nine = agents("n", "10.200.0.9").start()
    got = nine.wait_subnet().replace(".1/", ".0/")
    assert got not in (held, "10.9.1.0/24", "10.6.240.0/20")
    assert "overlaps a lease" in nine.log()
    assert holder.subnet_file.read_text().count(f"FLANNEL_SUBNET={held.replace('.0/', '.1/')}") == 1


def test_a_lease_whose_public_ip_is_inside_the_network_is_invalid(etcd, agents):
    """Found while trying more of the same kind: a PublicIP inside the cluster network
    (the overlay carrying its own underlay: a route loop) was a valid peer."""
    put_config(etcd, ALLOC)
    watcher = agents("w", "10.200.0.1").start(metrics=True)
    planted = str(free_subnet(NETWORK, [IPv4Interface(watcher.wait_subnet()).network], first=60))
    etcd.etcdctl("put", SUBNETS + planted.replace("/", "-"),
                 _value("10.6.61.7", "n", BackendData={}))
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and not watcher.metric(
            "leaseagent_invalid_leases_skipped_total", 'reason="bad_public_ip"'):
        time.sleep(0.1)
    assert watcher.metric("leaseagent_invalid_leases_skipped_total", 'reason="bad_public_ip"') == 1
    assert watcher.metric("leaseagent_peers", 'backend="alloc"') == 0
    rows = {r["subnet"]: r for r in json.loads(leasectl(etcd, "list", "--json").stdout)}
    row = rows[planted]
    assert row["valid"] is False
    assert row["error"] == "PublicIP 10.6.61.7 is inside the cluster network 10.6.0.0/16"


def test_a_huge_or_non_utf8_key_name_is_shown_short_and_can_be_released(etcd, agents):
    """Found trying more of the same kind: a 100,000-character key name made a 200 KB log
    line and a 200 KB table row; a key that is not UTF-8 was read with its odd bytes
    replaced, so `leasectl release` could never delete it ("changed while releasing it")."""
    import subprocess

    from leaseagent.lab.etcd import tool

    put_config(etcd, ALLOC)
    watcher = agents("w", "10.200.0.1", extra=["--log-format", "text"]).start(metrics=True)
    watcher.wait_subnet()
    etcd.etcdctl("put", SUBNETS + "10.6.70.0-24" + "x" * 100_000, _value("10.200.0.70"))
    raw = SUBNETS.encode() + b"10.6.71.0-24\xff\xfe"
    put = subprocess.run([tool("etcdctl"), "--endpoints", etcd.url, "put", raw, b"{}"],
                         capture_output=True, timeout=30)
    assert put.returncode == 0, put.stderr
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and watcher.metric(
            "leaseagent_invalid_leases_skipped_total", 'reason="bad_key"') != 2:
        time.sleep(0.1)
    assert watcher.metric("leaseagent_invalid_leases_skipped_total", 'reason="bad_key"') == 2
    log = watcher.log()
    _clean(log)
    assert max(len(line) for line in log.splitlines()) < 4500
    assert "more characters)" in log and "10.6.71.0-24\\udcff\\udcfe" in log
    table = leasectl(etcd, "list")
    assert table.returncode == 0, table.stderr
    _clean(table.stdout)
    assert max(len(line) for line in table.stdout.splitlines()) < 1000
    # The odd key is released by its name as the shell passes it (the same bytes).
    argv = [sys.executable, "-m", "leaseagent.cli.leasectl", "--etcd-endpoints", etcd.url,
            "release", b"10.6.71.0-24\xff\xfe"]
    released = subprocess.run(argv, capture_output=True, timeout=60)
    assert released.returncode == 0, released.stderr
    keys = subprocess.run([tool("etcdctl"), "--endpoints", etcd.url, "get", "--prefix",
                           "--keys-only", SUBNETS + "10.6.71"], capture_output=True, timeout=30)
    assert keys.stdout.strip() == b""
    assert watcher.proc is not None and watcher.proc.alive


def test_an_agent_refuses_to_start_on_a_network_holding_its_public_ip(etcd, agents):
    """The Network is read by the agent: one holding this host's PublicIP is refused at
    start, exit 2 in one line, nothing taken in etcd (on a running agent it is ignored
    as unusable: tests/e2e/test_hostile_routes.py)."""
    put_config(etcd, {"Network": "10.200.0.0/16", "Backend": {"Type": "alloc"}})
    agent = agents("a", "10.200.0.1").start()
    assert agent.proc is not None
    assert agent.proc.wait(timeout=30) == 2
    lines = [line for line in agent.log().splitlines() if line.strip()]
    assert len(lines) >= 1 and "Traceback" not in agent.log()
    assert "Network 10.200.0.0/16 holds 10.200.0.1, this host's PublicIP" in lines[-1]
    assert etcd.etcdctl("get", "--prefix", "--keys-only", SUBNETS).strip() == ""
