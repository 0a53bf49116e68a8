"""Network-namespace helpers for kernel tests: "hosts" on a private underlay.

`underlay(n)` builds a switch namespace with a bridge and n host namespaces,
each with `eth0` (a veth into the bridge) holding 10.99.0.<i+1>/24. Only
addresses inside these namespaces are used; nothing leaves them. Names carry
a random suffix so parallel runs never collide, and every namespace created
is deleted by name on the way out, also when building or the test fails.

Built with the project's one namespace helper (leaseagent.lab.netns). `sh`
runs a command synchronously (fixtures); `ash` is its asyncio twin for use
inside async tests, where a blocking subprocess would stall the agent code
under test. `ajson` parses `ip -j`.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from leaseagent.lab import netns
from leaseagent.lab.commands import run

UNDERLAY_PREFIX = "10.99.0"


def sh(*args: str, check: bool = True) -> str:
    return run(args, check=check)


async def ash(*args: str, check: bool = True) -> str:
    proc = await asyncio.create_subprocess_exec(
        *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await proc.communicate()
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}): {err.decode().strip()}")
    return out.decode()


async def ajson(*args: str) -> Any:
    out = await ash(*args)
    return json.loads(out) if out.strip() else []


@dataclass
class Underlay:
    switch: str
    hosts: list[str]
    namespaces: netns.Namespaces = field(default_factory=netns.Namespaces)

    @property
    def created(self) -> list[str]:
        return self.namespaces.created

    def ip_of(self, i: int) -> str:
        return f"{UNDERLAY_PREFIX}.{i + 1}"

    def add_namespace(self, name: str) -> str:
        return self.namespaces.add(name)

    def add_container(self, host: int, *, gateway: str, address: str) -> str:
        """A "container" namespace behind host `host`: veth `vc<n>` with the
        gateway address on the host side, default route through it."""
        ns_host = self.hosts[host]
        n = len(self.created)
        ns = self.add_namespace(f"{ns_host}c{n}")
        hostdev = f"vc{n}"
        netns.veth(ns_host, hostdev, "eth0", peer_ns=ns)
        netns.address(ns_host, hostdev, gateway)
        netns.link_up(ns_host, hostdev)
        netns.address(ns, "eth0", address)
        netns.link_up(ns, "eth0")
        sh("ip", "-n", ns, "route", "add", "default", "via", gateway.split("/")[0])
        netns.enable_forwarding(ns_host)
        return ns


@contextmanager
def underlay(n_hosts: int, *, prefix: str = "ladp") -> Iterator[Underlay]:
    tag = secrets.token_hex(3)
    lab = Underlay(switch=f"{prefix}{tag}sw", hosts=[])
    with lab.namespaces:
        lab.add_namespace(lab.switch)
        netns.bridge(lab.switch, "br0")
        for i in range(n_hosts):
            host = lab.add_namespace(f"{prefix}{tag}h{i}")
            lab.hosts.append(host)
            netns.veth(lab.switch, f"p{i}", "eth0", peer_ns=host)
            netns.link_up(lab.switch, f"p{i}", master="br0")
            netns.address(host, "eth0", f"{lab.ip_of(i)}/24")
            netns.link_up(host, "eth0")
        yield lab
