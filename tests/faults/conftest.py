"""Fixtures for the fault scenarios: a 3-member etcd cluster and agent processes on it,
and etcd's own gRPC proxy in front of the module's single etcd.

Everything started here is stopped by PID in a finalizer (agents first, then
the etcd members) and its temp dirs removed, also when a test fails.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from agentproc import AgentProc, agent_factory
from etcd_cluster import EtcdCluster
from etcd_server import EtcdServer

from leaseagent.lab.etcd import start_grpc_proxy


@pytest.fixture
def etcd_cluster() -> Iterator[EtcdCluster]:
    """A fresh 3-member etcd cluster on 127.0.0.1, removed afterwards."""
    cluster = EtcdCluster(3)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.close()


@pytest.fixture(scope="module")
def proxy_url(etcd_server: EtcdServer) -> Iterator[str]:
    """A grpc-proxy in front of the module's etcd, on a free 127.0.0.1 port; stopped by
    PID afterwards."""
    pdir = Path(tempfile.mkdtemp(prefix="leaseagent-grpc-proxy-"))
    proxy, url = start_grpc_proxy(etcd_server, pdir)
    try:
        yield url
    finally:
        proxy.stop()
        shutil.rmtree(pdir, ignore_errors=True)


@pytest.fixture
def workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="leaseagent-faults-") as d:
        yield Path(d)


@pytest.fixture
def cluster_agents(etcd_cluster: EtcdCluster, workdir: Path
                   ) -> Iterator[Callable[..., AgentProc]]:
    """Factory of agent processes given all three endpoints (or `endpoints=`)."""
    with agent_factory(workdir, etcd_cluster.endpoints) as make:
        yield make
