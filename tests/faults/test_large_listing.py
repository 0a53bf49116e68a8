"""A subnets listing over gRPC's 4 MiB receive limit, and values too large to receive.

A real etcd (one member, --max-request-bytes 10 MiB so that it takes a 5 MiB value)
holding 100 peer leases of ~50 KB each (valid: under the 64 KiB a lease value may
have; ~5 MB in all, over the 4 MiB a gRPC client receives in one message) and one
lease of 5 MiB:

- `leasectl list` lists the 100 (and warns about the one, exit 0);
- an agent (in-process, tests/faults/inproc.py) starts, counts 100 peers and the
  5 MiB lease as invalid (too_large), and goes on;
- a second 5 MiB value written while it runs (a watch response it cannot receive)
  makes it list again, not stop; a peer written after that is seen;
- a 5 MiB network config under a running agent is ignored as invalid (too large),
  the last good one kept.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Iterator
from ipaddress import IPv4Interface, IPv4Network
from pathlib import Path

import pytest
from etcd_cluster import EtcdCluster
from faultkit import ALLOC, SUBNETS, put_config
from inproc import gauge, make_agent, wait_all, wait_for
from subnets import free_subnet

from leaseagent.core.subnetenv import parse_environment_file
from leaseagent.store.etcd import EtcdSettings, EtcdStore

PEERS = 100
PAD = 50_000  # bytes of padding per lease value (an extra field flannel ignores)
HUGE = 5 * 1024 * 1024


@pytest.fixture
def roomy_etcd() -> Iterator[EtcdCluster]:
    cluster = EtcdCluster(1, extra_args=["--max-request-bytes", str(10 * 1024 * 1024)])
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.close()


def lease_value(n: int, pad: int) -> bytes:
    return json.dumps({"PublicIP": f"10.210.{n // 200}.{n % 200 + 1}", "BackendType": "alloc",
                       "NodeID": f"peer{n}", "Pad": "x" * pad}).encode()


async def test_a_listing_over_4_mib_and_values_too_large_to_receive(roomy_etcd, tmp_path: Path):
    etcd = roomy_etcd
    put_config(etcd, ALLOC)
    store = await EtcdStore.connect(EtcdSettings(endpoints=etcd.endpoints, timeout=10))
    a = None
    try:
        for n in range(PEERS):
            await store.put(f"{SUBNETS}10.6.{n + 101}.0-24", lease_value(n, PAD))
        huge = f"{SUBNETS}10.6.250.0-24"
        await store.put(huge, lease_value(250, HUGE))
        total = sum(len(kv.value) for kv in (await store.list_prefix(SUBNETS)).items)
        assert total > 4 * 1024 * 1024

        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "leaseagent.cli.leasectl", "--etcd-endpoints", etcd.endpoints,
            "list", "--json", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, err.decode()
        assert len(json.loads(out)) == PEERS
        assert huge in err.decode() and "too large to receive" in err.decode()

        a = await make_agent(tmp_path, "a", "10.200.0.1", endpoints=etcd.endpoints,
                             extra=["--etcd-timeout", "10"])
        started = time.monotonic()
        a.start()
        await wait_all([a], lambda x: x.ready, timeout=60, what="agent ready")
        ready = time.monotonic() - started
        assert gauge(a, "leaseagent_peers", backend="alloc") == PEERS
        assert gauge(a, "leaseagent_invalid_leases_skipped_total", reason="too_large") == 1

        relists = gauge(a, "leaseagent_watch_relists_total", reason="stream_lost") or 0
        # Above SubnetMax: no agent holds it.
        await store.put(f"{SUBNETS}10.6.251.0-24", lease_value(251, HUGE))
        await wait_for("the second huge value counted", lambda: gauge(
            a, "leaseagent_invalid_leases_skipped_total", reason="too_large") == 2, 30)
        assert (gauge(a, "leaseagent_watch_relists_total", reason="stream_lost") or 0) > relists
        # A subnet the agent does not hold (its own is random in SubnetMin..SubnetMax).
        own = IPv4Interface(parse_environment_file((tmp_path / "a.env").read_text())["FLANNEL_SUBNET"])
        later = free_subnet(IPv4Network(ALLOC["Network"]), [own.network], first=99)
        await store.put(f"{SUBNETS}{later.network_address}-24", lease_value(99, 10))
        seen = await wait_for("a peer after it", lambda: gauge(
            a, "leaseagent_peers", backend="alloc") == PEERS + 1, 30)
        assert a.task is not None and not a.task.done()
    finally:
        if a is not None:
            await a.close()
        await store.close()
    print(f"\nlarge listing: {PEERS} leases of {PAD // 1000} KB ({total / 2**20:.1f} MiB) and "
          f"one of 5 MiB: leasectl list ok, agent ready in {ready:.2f}s with {PEERS} peers, "
          f"the 5 MiB ones skipped (too_large); a peer after a 5 MiB watch event seen in "
          f"{seen:.2f}s")


async def test_a_listing_in_pages_is_the_listing_in_one(etcd):
    store = await EtcdStore.connect(EtcdSettings(endpoints=etcd.endpoints, timeout=5))
    try:
        for n in range(10):
            await store.put(f"/paging/k{n:02d}", b"v%d" % n)
        await store.put("/paginh", b"outside the prefix")
        whole = await store.list_prefix("/paging/")
        store.page = 3
        paged = await store.list_prefix("/paging/")
        assert paged == whole and len(paged.items) == 10 and not paged.oversize
    finally:
        await store.close()


async def test_a_network_config_too_large_to_receive_is_ignored(roomy_etcd, tmp_path: Path):
    etcd = roomy_etcd
    put_config(etcd, ALLOC)
    store = await EtcdStore.connect(EtcdSettings(endpoints=etcd.endpoints, timeout=10))
    a = await make_agent(tmp_path, "a", "10.200.0.1", endpoints=etcd.endpoints,
                         extra=["--etcd-timeout", "10"])
    try:
        a.start()
        await wait_all([a], lambda x: x.ready, timeout=30, what="agent ready")
        network = a.agent.network
        big = json.dumps({**ALLOC, "Pad": "x" * HUGE}).encode()
        await store.put(f"{SUBNETS.rsplit('/', 2)[0]}/config", big)
        await wait_for("the config ignored as invalid", lambda: gauge(
            a, "leaseagent_network_config_ignored_total", reason="invalid") == 1, 30)
        assert gauge(a, "leaseagent_etcd_up") == 1  # a value too large is no outage
        await asyncio.sleep(1)
        assert a.task is not None and not a.task.done()
        assert a.agent.network == network
    finally:
        await a.close()
        await store.close()


async def test_a_listing_whose_revision_is_compacted_between_pages_starts_again(etcd):
    store = await EtcdStore.connect(EtcdSettings(endpoints=etcd.endpoints, timeout=5))
    try:
        for n in range(6):
            await store.put(f"/paging/k{n}", b"v")
        store.page = 2
        lists = 0

        def compact_after_the_first_page(operation: str, _seconds: float) -> None:
            nonlocal lists
            if operation != "list":
                return
            lists += 1
            if lists == 1:  # between the first page and the second: history goes
                etcd.etcdctl("put", "/paging/k9", "late")
                revision = json.loads(etcd.etcdctl("get", "/paging/k9", "-w", "json"))
                etcd.etcdctl("compact", str(revision["header"]["revision"]))

        store.observer = compact_after_the_first_page
        listing = await store.list_prefix("/paging/")
        assert [kv.key for kv in listing.items] == [*(f"/paging/k{n}" for n in range(6)),
                                                    "/paging/k9"]
        assert lists > 4  # the first attempt's pages, then all 4 again
    finally:
        await store.close()
