"""Render and parse subnet.env, byte for byte as flanneld writes it.

flanneld (WriteSubnetFile) writes, in this order:

    FLANNEL_NETWORK=10.5.0.0/16
    FLANNEL_SUBNET=10.5.34.1/24      first usable address of the lease / len
    FLANNEL_MTU=1450
    FLANNEL_IPMASQ=false

Pure: the atomic write lives in leaseagent.files.
"""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Interface, IPv4Network


@dataclass(frozen=True)
class SubnetEnv:
    network: IPv4Network
    subnet: IPv4Network
    mtu: int
    ipmasq: bool = False

    def render(self) -> str:
        first = IPv4Interface((int(self.subnet.network_address) + 1, self.subnet.prefixlen))
        return (
            f"FLANNEL_NETWORK={self.network}\n"
            f"FLANNEL_SUBNET={first}\n"
            f"FLANNEL_MTU={self.mtu}\n"
            f"FLANNEL_IPMASQ={'true' if self.ipmasq else 'false'}\n"
        )


def parse_subnet_env(text: str) -> dict[str, str]:
    """KEY=VALUE lines into a dict; blank lines and # comments are skipped."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        out[key.strip()] = value.strip()
    return out


def previous_subnet(text: str) -> IPv4Network | None:
    """The lease subnet recorded in an old subnet.env, or None if absent or unreadable."""
    value = parse_subnet_env(text).get("FLANNEL_SUBNET")
    if not value:
        return None
    try:
        return IPv4Interface(value).network
    except ValueError:
        return None
