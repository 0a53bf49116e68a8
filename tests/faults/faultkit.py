"""Helpers shared by the fault scenarios: the network config, and checks of etcd's leases."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Iterable
from ipaddress import IPv4Interface
from typing import Any

from agentproc import AgentProc
from etcd_cluster import EtcdCluster
from etcd_server import PREFIX
from etcd_server import put_config as put_config  # the fault tests' one import for it
from lengths import FULL as FULL  # LEASEAGENT_FULL=1: the long variants (docs/reliability.md)
from polling import wait_for

from leaseagent.core.leases import KeyLayout

KEYS = KeyLayout(PREFIX)
SUBNETS = KEYS.subnets_prefix
ALLOC = {"Network": "10.6.0.0/16", "SubnetMin": "10.6.1.0", "SubnetMax": "10.6.200.0",
         "Backend": {"Type": "alloc"}}



def key_of(subnet_line: str) -> str:
    return KEYS.lease_key(IPv4Interface(subnet_line).network)


def subnet_of_env(agent: AgentProc) -> str | None:
    if not agent.subnet_file.exists():
        return None
    for line in agent.subnet_file.read_text().splitlines():
        if line.startswith("FLANNEL_SUBNET="):
            return line.split("=", 1)[1]
    return None


def public_ips(cluster: EtcdCluster) -> dict[str, str]:
    """lease key -> PublicIP, for every key under the subnets prefix."""
    out = {}
    for key, (value, _) in cluster.get_prefix(SUBNETS).items():
        out[key] = json.loads(value)["PublicIP"]
    return out


def check_no_lease_lost_or_duplicated(cluster: EtcdCluster, running: Iterable[AgentProc],
                                      everyone: Iterable[AgentProc]) -> int:
    """Every running agent's subnet.env subnet is held in etcd by its PublicIP, no two keys
    share a PublicIP, and no agent ever logged SUBNET LOST. Returns the number of keys."""
    held = public_ips(cluster)
    ips = list(held.values())
    assert len(ips) == len(set(ips)), f"two keys share a PublicIP: {held}"
    for agent in running:
        line = subnet_of_env(agent)
        assert line is not None, f"{agent.name} has no subnet.env"
        assert held.get(key_of(line)) == agent.public_ip, (
            f"{agent.name} ({agent.public_ip}) believes it holds {line}; etcd: {held}")
    for agent in everyone:
        assert "SUBNET LOST" not in agent.log(), f"{agent.name}:\n{agent.log()}"
        check_clean_log(agent.name, agent.log())
    return len(held)


def wait_until(what: str, cond: Callable[[], bool], timeout: float, step: float = 0.05) -> float:
    """Seconds until cond() holds; AssertionError naming `what` after `timeout`."""
    return wait_for(cond, timeout=timeout, what=what, every=step)


def renewals(agent: AgentProc) -> float:
    try:
        return agent.metric("leaseagent_lease_renewals_total") or 0.0
    except OSError:
        return -1.0


def check_clean_log(name: str, log: str) -> None:
    """No traceback and no asyncio leak reports (one line per error; docs/architecture.md, "Fault rules")."""
    for bad in ("Traceback", "Task was destroyed", "never retrieved"):
        assert bad not in log, f"{name} logged {bad!r}:\n{log}"


class WatchStub:
    """The store's watch stub, wrapped: a subclass changes what `Watch` does."""

    def __init__(self, stub: Any) -> None:
        self._stub = stub

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stub, name)

    def Watch(self, *args: Any, **kwargs: Any) -> Any:
        return self._stub.Watch(*args, **kwargs)

    @classmethod
    def install(cls, store: Any) -> Any:
        """Put a new one between `store` (an EtcdStore) and its etcd watch stub."""
        service: Any = store._client.watch
        service._stub = cls(service._stub)
        return service._stub


def first_batch(stream: AsyncIterator[list[Any]]) -> asyncio.Future[list[Any]]:
    """The first batch `stream` delivers, read in the background."""
    async def read() -> list[Any]:
        async for batch in stream:
            return batch
        return []
    return asyncio.ensure_future(read())
