"""Shared fixtures: a real etcd per test module (and a fresh one on demand)."""

from __future__ import annotations

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


@pytest.fixture
def etcd() -> Iterator[EtcdServer]:
    """A fresh etcd for one test, stopped and removed afterwards."""
    yield from _running_etcd()


@pytest.fixture(scope="module")
def etcd_server() -> Iterator[EtcdServer]:
    """One etcd shared by a module's tests (each works under its own key prefix)."""
    yield from _running_etcd()


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
