"""Fixtures for integration tests: a real etcd, a network config, agents as processes."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from agentproc import AgentProc
from etcd_server import EtcdServer

PREFIX = "/coreos.com/network"


def put_config(etcd: EtcdServer, config: dict[str, object], prefix: str = PREFIX) -> None:
    etcd.etcdctl("put", f"{prefix}/config", json.dumps(config))


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
