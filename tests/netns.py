"""Network-namespace helpers for kernel tests: "hosts" on a private underlay.

`underlay(n)` builds a switch namespace with a bridge and n host namespaces,
each with `eth0` (a veth into the bridge) holding 10.99.0.<i+1>/24. Only
addresses inside these namespaces are used; nothing leaves them. Names carry
a random suffix so parallel runs never collide, and every namespace created
is deleted by name in a `finally`, also when building or the test fails.

`sh` runs iproute2 synchronously (fixtures); `ash` is its asyncio twin for
use inside async tests, where a blocking subprocess would stall the agent
code under test. `*_json` helpers parse `ip -j`.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

UNDERLAY_PREFIX = "10.99.0"


def sh(*args: str, check: bool = True) -> str:
    proc = subprocess.run(args, capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


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
    created: list[str] = field(default_factory=list)

    def ip_of(self, i: int) -> str:
        return f"{UNDERLAY_PREFIX}.{i + 1}"

    def add_namespace(self, name: str) -> str:
        sh("ip", "netns", "add", name)
        self.created.append(name)
        sh("ip", "-n", name, "link", "set", "lo", "up")
        return name

    def add_container(self, host: int, *, gateway: str, address: str) -> str:
        """A "container" namespace behind host `host`: veth `vc<n>` with the
        gateway address on the host side, default route through it."""
        ns_host = self.hosts[host]
        n = len(self.created)
        ns = self.add_namespace(f"{ns_host}c{n}")
        hostdev = f"vc{n}"
        sh("ip", "-n", ns_host, "link", "add", hostdev, "type", "veth",
           "peer", "name", "eth0", "netns", ns)
        sh("ip", "-n", ns_host, "addr", "add", gateway, "dev", hostdev)
        sh("ip", "-n", ns_host, "link", "set", hostdev, "up")
        sh("ip", "-n", ns, "addr", "add", address, "dev", "eth0")
        sh("ip", "-n", ns, "link", "set", "eth0", "up")
        sh("ip", "-n", ns, "route", "add", "default", "via", gateway.split("/")[0])
        sh("ip", "netns", "exec", ns_host, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        return ns


@contextmanager
def underlay(n_hosts: int, *, prefix: str = "ladp") -> Iterator[Underlay]:
    tag = secrets.token_hex(3)
    lab = Underlay(switch=f"{prefix}{tag}sw", hosts=[])
    try:
        lab.add_namespace(lab.switch)
        sh("ip", "-n", lab.switch, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", lab.switch, "link", "set", "br0", "up")
        for i in range(n_hosts):
            host = lab.add_namespace(f"{prefix}{tag}h{i}")
            lab.hosts.append(host)
            sh("ip", "-n", lab.switch, "link", "add", f"p{i}", "type", "veth",
               "peer", "name", "eth0", "netns", host)
            sh("ip", "-n", lab.switch, "link", "set", f"p{i}", "master", "br0", "up")
            sh("ip", "-n", host, "addr", "add", f"{lab.ip_of(i)}/24", "dev", "eth0")
            sh("ip", "-n", host, "link", "set", "eth0", "up")
        yield lab
    finally:
        for name in reversed(lab.created):
            sh("ip", "netns", "del", name, check=False)
