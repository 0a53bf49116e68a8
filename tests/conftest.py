"""Shared fixtures: a real etcd per test module (and a fresh one on demand)."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings

sys.path.insert(0, str(Path(__file__).parent))

from etcd_server import EtcdServer, make_etcd, remove

# Property tests check what holds, not how fast: Hypothesis's default 200 ms deadline per
# example fails them on a loaded 2-core machine (seen once in test_pending_changes).
settings.register_profile("leaseagent", deadline=None)
settings.load_profile("leaseagent")


def _running_etcd() -> Iterator[EtcdServer]:
    server = make_etcd()
    try:
        server.start()
        yield server
    finally:
        remove(server)


@pytest.fixture(scope="module")
def etcd_server() -> Iterator[EtcdServer]:
    """One etcd shared by a module's tests (each works under its own key prefix)."""
    yield from _running_etcd()


def emptied(server: EtcdServer) -> EtcdServer:
    """`server` running, with no key and no lease left by an earlier test: what a test that
    only reads and writes keys sees on a fresh etcd, without starting one (0.3-1 s each)."""
    if not all(m.running for m in server.members):
        server.start()  # an earlier test stopped it anyway (its data is kept; emptied below)
    server.etcdctl("del", "", "--from-key=true")
    for lease in json.loads(server.etcdctl("lease", "list", "-w", "json")).get("leases") or []:
        server.etcdctl("lease", "revoke", format(lease["id"], "x"))
    return server


@pytest.fixture
def etcd(request: pytest.FixtureRequest) -> Iterator[EtcdServer]:
    """A fresh etcd for one test, stopped and removed afterwards. In a module marked
    `shared_etcd`, the module's etcd (`etcd_server`) emptied for the test instead, unless the
    test is marked `fresh_etcd`: one that stops, compacts or partitions etcd, or counts
    revisions from 1, keeps an etcd of its own."""
    if request.node.get_closest_marker("shared_etcd") and not request.node.get_closest_marker(
            "fresh_etcd"):
        yield emptied(request.getfixturevalue("etcd_server"))
    else:
        yield from _running_etcd()


def pytest_sessionstart(session: pytest.Session) -> None:
    """Byte-compile the package and the benchmarks once, up front. The suite starts hundreds
    of Python processes from this tree (agents, leasectl, lab and bench helpers); with
    PYTHONDONTWRITEBYTECODE set (as in CI), none of them writes a .pyc, so each compiled
    every module it imports again: ~0.12 s of CPU more for each agent start (0.66 -> 0.54 s,
    measured). compileall writes the .pyc files whatever that variable says, and skips the
    ones that are current."""
    import compileall
    root = Path(__file__).resolve().parents[1]
    for package in ("leaseagent", "bench"):
        compileall.compile_dir(root / package, quiet=1)


# When pytest-xdist spreads the suite over workers (deploy/test.sh), these run one at a
# time, in one worker, as without xdist: the tests that run agents, Docker or systemd hosts
# in network namespaces (the labs, the benchmarks on a real kernel). They share
# the kernel's global locks and tables (the xtables lock, Docker's), the e2e modules share
# their labs (tests/e2e/conftest.py), and side by side one was seen to miss its time bound.
# Beside them, in the other worker, the other modules (unit, contract, integration, etcd
# faults, security, the benchmarks on 127.0.0.1 and the fake kernel) run module by module.
SERIAL_PATHS = ("tests/e2e/", "tests/bench/test_bench_smoke.py", "tests/bench/test_soak_short.py",
                "tests/faults/test_lab_faults.py")
SERIAL_GROUP = "agents in network namespaces"


def work_unit(nodeid: str) -> str:
    """What one worker runs from start to end: a test's module, or the serial group."""
    module = nodeid.split("::", 1)[0]
    return SERIAL_GROUP if module.startswith(SERIAL_PATHS) else module


@pytest.hookimpl(tryfirst=True, optionalhook=True)  # a hook of pytest-xdist's
def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object:
    """Modules as work units (xdist's loadfile), the serial group as one of them (the
    largest, so it starts first). Not xdist's loadgroup: it renames items, which pytest 9
    no longer lets a plugin do."""
    from xdist.scheduler import LoadScopeScheduling

    class Scheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return work_unit(nodeid)

    return Scheduling(config, log)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="needs root (network namespaces)")
    for item in items:
        if "root" in item.keywords:
            item.add_marker(skip)


_HOST_DEVICES = ("/dev/null", "/dev/zero", "/dev/urandom")


@pytest.fixture(autouse=True)
def _host_devices_untouched() -> Iterator[None]:
    """No test may replace a device node of the host (a writer pointed at /dev/null once
    renamed a regular file over it): each test fails if one is no longer a device."""
    yield
    import stat
    for dev in _HOST_DEVICES:
        mode = os.lstat(dev).st_mode
        assert stat.S_ISCHR(mode), f"{dev} is no longer a character device after this test"
