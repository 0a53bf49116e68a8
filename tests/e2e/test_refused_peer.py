"""One peer the kernel refuses (host-gw: a gateway not on the link), in a namespace lab.

Three host-gw hosts with real agents (--resync-interval 1), a real etcd and real
kernels. A lease is put whose PublicIP (192.0.2.77) is on no host's link, so
every kernel refuses its route ("Network is unreachable"):

- every host stays ready (/readyz 200, leaseagent_dataplane_in_sync 1): readiness is
  about this host's own ability to forward, not one broken peer;
- each names the peer once in its log (which peer, which route, why) however many
  resyncs retry it, counts it in leaseagent_dataplane_refused_peers and in STATUS=;
  `leasectl doctor` says why;
- every container still reaches every other;
- an agent restarted meanwhile says in its "ready" line that a peer was refused;
- the lease deleted: the count is 0 again everywhere.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable, Iterator

import pytest
from labdoctor import doctor
from polling import wait_for
from subnets import lab_free

from leaseagent.lab import Lab

pytestmark = pytest.mark.root

GATEWAY = "192.0.2.77"  # TEST-NET-1: on no host's link
RESYNC = 1.0


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces)")
    lab = Lab(f"rp{os.getpid() % 100000}", backend="host-gw",
              # The planted lease's removal is waited for at the end: held 1 s, not 5.
              agent_args=["--resync-interval", f"{RESYNC:g}", "--peer-hold-time", "1"])
    try:
        lab.up(3, 1)
        for host in lab.hosts.values():
            lab.wait_ready(host, timeout=20)
        yield lab
    finally:
        warnings = lab.down()
        assert not warnings, warnings


def _wait(what: str, check: Callable[[], bool], timeout: float = 15.0) -> float:
    return wait_for(check, timeout=timeout, what=what, every=0.1)


def test_one_refused_peer_leaves_every_host_ready_and_is_named(lab: Lab) -> None:
    hosts = sorted(lab.hosts.values(), key=lambda h: h.index)
    subnet = lab_free(lab)[0]  # no host's: theirs are random in the same range
    key = lab.keys.lease_key(subnet)
    lab.etcdctl("put", key, json.dumps({"PublicIP": GATEWAY, "PublicIPv6": None,
                                        "BackendType": "host-gw", "BackendData": {},
                                        "NodeID": "unreachable"}))
    try:
        took = [_wait(f"{h.name} counts the refused peer", lambda h=h: lab.metrics(h).get(
            "leaseagent_dataplane_refused_peers") == 1.0) for h in hosts]
        time.sleep(3 * RESYNC)  # a few resyncs, each retrying the route
        for h in hosts:
            assert lab.http_get(h, "/readyz")[0] == 200, h.name
            metrics = lab.metrics(h)
            assert metrics.get("leaseagent_dataplane_in_sync") == 1.0, h.name
            log = h.log_file.read_text()
            named = [line for line in log.splitlines()
                     if f"peer {subnet} ({GATEWAY}) cannot be programmed" in line]
            assert len(named) == 1, log
            assert f"route {subnet} via {GATEWAY} dev eth0" in named[0], named[0]
            assert "Network is unreachable" in named[0], named[0]
            assert "not ready" not in log, log
        reach = lab.wait_reachable(timeout=10)
        assert reach.all_ok, "\n" + reach.format()
        doc = doctor(lab, hosts[0])
        assert (f"peer {subnet}: its PublicIP {GATEWAY} is not on the link of eth0"
                in doc.stdout), doc.stdout + doc.stderr

        h1 = hosts[0]
        lab.stop_agent(h1, sig=signal.SIGTERM)
        mark = len(h1.log_file.read_text())
        lab.start_agent(h1)
        lab.wait_ready(h1, timeout=20)
        _wait("h1's ready line", lambda: "ready:" in h1.log_file.read_text()[mark:])
        after = h1.log_file.read_text()[mark:]
        assert "ready: 2 peers programmed, 1 refused by the kernel" in after, after
    finally:
        lab.etcdctl("del", key)
    for h in hosts:
        _wait(f"{h.name} has no refused peer", lambda h=h: lab.metrics(h).get(
            "leaseagent_dataplane_refused_peers") == 0.0)
    assert lab.wait_reachable(timeout=10).all_ok
    print(f"\nrefused peer: every host counted it {min(took):.2f}-{max(took):.2f}s after the "
          f"lease, stayed ready over {3 * RESYNC:g}s of resyncs, named it once, all pairs "
          f"reachable; a restarted agent's ready line names it")
