"""Fixtures for integration tests: a real etcd, a network config, agents as processes."""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from agentproc import AgentProc, agent_factory
from etcd_server import EtcdServer


@pytest.fixture
def workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="leaseagent-test-") as d:
        yield Path(d)


@pytest.fixture
def agents(etcd: EtcdServer, workdir: Path) -> Iterator[Callable[..., AgentProc]]:
    """Factory of agent processes; every one is stopped by PID at the end."""
    with agent_factory(workdir, etcd.url) as make:
        yield make
