"""Agents in this process (one event loop, one EtcdStore each) for scenarios with many hosts.

A hundred agent processes would cost ~100 interpreters on a small CI box; a
hundred `Agent` objects on one loop still acquire concurrently against the
real etcd, each over its own gRPC channel, which is what the scenarios test.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path

from leaseagent.agent.daemon import Agent
from leaseagent.config import parse_agent_config
from leaseagent.dataplane.base import DataPlane, DataPlaneSettings, HostInfo
from leaseagent.dataplane.fakefirewall import MemoryFirewall
from leaseagent.store.base import LeaseStore
from leaseagent.store.etcd import EtcdSettings, EtcdStore


class LogCounter(logging.Handler):
    """Counts leaseagent's log records at WARNING and above, keeps the ERROR ones."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.warnings = 0
        self.errors: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.ERROR:
            self.errors.append(record.getMessage())
        else:
            self.warnings += 1


@contextlib.contextmanager
def counting_logs() -> object:
    counter = LogCounter()
    logger = logging.getLogger("leaseagent")
    logger.addHandler(counter)
    try:
        yield counter
    finally:
        logger.removeHandler(counter)


@dataclass
class InProcAgent:
    agent: Agent
    store: LeaseStore
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None

    @property
    def ready(self) -> bool:
        a = self.agent
        return (a.own is not None and a.subnet_env_written and a.watcher is not None
                and a.watcher.synced.is_set())

    def start(self) -> InProcAgent:
        self.task = asyncio.ensure_future(self.agent.run(self.stop))
        return self

    async def close(self) -> None:
        """Stop (shutdown revokes the lease with --release-on-exit) and close the store."""
        self.stop.set()
        if self.task is not None:
            await asyncio.gather(self.task, return_exceptions=True)
        await self.agent.shutdown()
        await self.store.close()


def agent_config(workdir: Path, name: str, *, endpoints: str, ttl: int = 30,
                 extra: list[str] | None = None):  # type: ignore[no-untyped-def]
    return parse_agent_config([
        "--etcd-endpoints", endpoints, "--subnet-file", str(workdir / f"{name}.env"),
        "--state-dir", str(workdir / f"{name}.state"), "--lease-ttl", str(ttl),
        "--node-id", name, "--release-on-exit", *(extra or [])], environ={})


async def make_agent(workdir: Path, name: str, public_ip: str, *, endpoints: str,
                     store: LeaseStore | None = None, ttl: int = 30,
                     backends: Mapping[str, Callable[[DataPlaneSettings], DataPlane]] | None = None,
                     extra: list[str] | None = None,
                     public_ipv6: str | None = None) -> InProcAgent:
    cfg = agent_config(workdir, name, endpoints=endpoints, ttl=ttl, extra=extra)
    if store is None:
        store = await EtcdStore.connect(EtcdSettings(endpoints=endpoints, timeout=5))
    host = HostInfo(public_ip=IPv4Address(public_ip),
                    public_ipv6=IPv6Address(public_ipv6) if public_ipv6 else None)
    # Traffic rules in memory: this process is not in a namespace of the test's own.
    agent = Agent(cfg, store, host=host, notify=lambda _: None, backends=backends,
                  firewalls=lambda _nftables, family: MemoryFirewall(family))
    return InProcAgent(agent, store)


async def wait_all(agents: list[InProcAgent], cond: Callable[[InProcAgent], bool], *,
                   timeout: float, what: str) -> float:  # noqa: ASYNC109 (a deadline that names what)
    loop = asyncio.get_running_loop()
    start = loop.time()
    while not all(cond(a) for a in agents):
        for a in agents:
            if a.task is not None and a.task.done():
                exc = a.task.exception() if not a.task.cancelled() else None
                raise AssertionError(f"agent {a.agent.cfg.node_id} stopped: {exc!r}")
        if loop.time() - start > timeout:
            missing = sum(1 for a in agents if not cond(a))
            raise AssertionError(f"{what}: {missing} of {len(agents)} not there in {timeout}s")
        await asyncio.sleep(0.05)
    return loop.time() - start


def gauge(agent: InProcAgent, name: str, **labels: str) -> float | None:
    """A sample of the in-process agent's own metrics registry."""
    return agent.agent.metrics.registry.get_sample_value(name, labels or None)


async def wait_for(what: str, cond: Callable[[], bool], timeout: float) -> float:  # noqa: ASYNC109
    """Seconds until `cond()` holds; AssertionError naming `what` after `timeout`."""
    started = time.monotonic()
    while not cond():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"{what}: not within {timeout}s")
        await asyncio.sleep(0.05)
    return time.monotonic() - started
