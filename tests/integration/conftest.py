"""Fixtures for integration tests: a real etcd, a network config, agents as processes."""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from agentproc import AgentProc
from etcd_server import PREFIX, EtcdServer, put_config  # noqa: F401 - re-exported for old imports


@pytest.fixture
def workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="leaseagent-test-") as d:
        yield Path(d)


@pytest.fixture
def agents(etcd: EtcdServer, workdir: Path) -> Iterator[Callable[..., AgentProc]]:
    """Factory of agent processes; every one is stopped by PID at the end."""
    made: list[AgentProc] = []

    def make(name: str, public_ip: str, **kw: object) -> AgentProc:
        agent = AgentProc(workdir=workdir, name=name, endpoints=etcd.url, public_ip=public_ip,
                          **kw)  # type: ignore[arg-type]
        made.append(agent)
        return agent

    try:
        yield make
    finally:
        for agent in made:
            agent.stop()
