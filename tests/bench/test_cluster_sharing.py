"""What `bench.cluster` shares between the simulated hosts of one worker, and what not.

`share_judged_leases` lets equal judged results (a valid lease's `Peer`, the book's
entry of a key at one revision) be held once in a worker: each host must still judge
every key itself (its own call, its own verdict), and a host whose judging differs
(its own key, its own PublicIP) must not get a result it would not have judged.

Run in a child process (as a worker is): the sharing replaces module attributes for
the process's life, and `bench` here would be this directory, not the harness.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

CHECK = r'''
import json
from ipaddress import IPv4Address, IPv4Network

from bench.cluster import PREFIX, network_config, share_judged_leases
from leaseagent.core.leases import KeyLayout, judging
from leaseagent.core.network import parse_network_config
from leaseagent.store.base import KeyValue

LAYOUT = KeyLayout(PREFIX)
NETWORK = parse_network_config(json.dumps(network_config(10, "alloc")))
calls = []
validate = judging.validate_peer

def counted(*args, **kwargs):
    calls.append(1)
    return validate(*args, **kwargs)

judging.validate_peer = counted
share_judged_leases()

def lease(i, *, revision, ip=None):
    value = {"PublicIP": ip or f"172.20.0.{i + 1}", "BackendType": "alloc",
             "BackendData": None, "NodeID": f"h{i}"}
    return KeyValue(f"{LAYOUT.subnets_prefix}10.0.{i + 1}.0-24", json.dumps(value).encode(),
                    create_revision=10 + i, mod_revision=revision, version=1, lease=7)

def book(i):
    return judging.LeaseBook(layout=LAYOUT, network=NETWORK, identity=judging.Identity(
        IPv4Address(f"172.20.0.{i + 1}"), lease(i, revision=10 + i).key))

items = [lease(i, revision=10 + i) for i in range(4)]
books = [book(i) for i in range(3)]
for b in books:
    b.reset(items)
assert len(calls) == 3 * 4, calls  # each host judged every lease itself (its own too)
one, four = IPv4Network("10.0.1.0/24"), IPv4Network("10.0.4.0/24")
assert one not in books[0].peers  # its own subnet: not its own peer
assert books[1].peers[one] is books[2].peers[one]  # one Peer, held once
assert books[0].peers[four] is books[1].peers[four] is books[2].peers[four]
# An event, judged by each host again; the new equal result shared again.
moved = lease(3, revision=20, ip="172.20.0.40")
for b in books:
    b.put(moved)
assert len(calls) == 3 * 4 + 3, calls
assert books[0].peers[four].public_ip == IPv4Address("172.20.0.40")
assert books[0].peers[four] is books[2].peers[four]
# A lease naming host 1's PublicIP: a peer of host 0 and 2, refused by host 1's own
# judging (public_ip_is_ours), whatever the others made of it.
clash = lease(3, revision=30, ip="172.20.0.2")
for b in books:
    b.put(clash)
assert four in books[0].peers and four in books[2].peers and four not in books[1].peers
print("ok")
'''


def test_equal_judged_results_are_held_once_and_every_host_still_judges() -> None:
    proc = subprocess.run([sys.executable, "-c", CHECK], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]
