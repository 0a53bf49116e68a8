"""Render and parse subnet.env, byte for byte as flanneld writes it.

flanneld (WriteSubnetFile, pkg/subnet/subnet.go) writes, in this order:

    FLANNEL_NETWORK=10.5.0.0/16
    FLANNEL_SUBNET=10.5.34.1/24      first usable address of the lease / len
    FLANNEL_IPV6_NETWORK=fd00:5::/48          only with EnableIPv6
    FLANNEL_IPV6_SUBNET=fd00:5:0:22::1/64     the same for the IPv6 subnet
    FLANNEL_MTU=1450
    FLANNEL_IPMASQ=false

Addresses in Go's text form, which for IPv6 is RFC 5952's (compressed,
lowercase), the form Python's ipaddress writes too.

Pure: the atomic write lives in leaseagent.files.
"""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Interface, IPv4Network, IPv6Interface, IPv6Network


def first_address(subnet: IPv4Network | IPv6Network) -> IPv4Interface | IPv6Interface:
    """The subnet's first usable address with its length, as FLANNEL_SUBNET gives it
    (what dockerd --bip puts on docker0)."""
    base = int(subnet.network_address) + 1
    if isinstance(subnet, IPv4Network):
        return IPv4Interface((base, subnet.prefixlen))
    return IPv6Interface((base, subnet.prefixlen))


@dataclass(frozen=True)
class SubnetEnv:
    network: IPv4Network
    subnet: IPv4Network
    mtu: int
    ipmasq: bool = False
    ipv6_network: IPv6Network | None = None  # both set with EnableIPv6
    ipv6_subnet: IPv6Network | None = None

    def render(self) -> str:
        text = f"FLANNEL_NETWORK={self.network}\nFLANNEL_SUBNET={first_address(self.subnet)}\n"
        if self.ipv6_network is not None and self.ipv6_subnet is not None:
            text += (f"FLANNEL_IPV6_NETWORK={self.ipv6_network}\n"
                     f"FLANNEL_IPV6_SUBNET={first_address(self.ipv6_subnet)}\n")
        return text + (f"FLANNEL_MTU={self.mtu}\n"
                       f"FLANNEL_IPMASQ={'true' if self.ipmasq else 'false'}\n")


def parse_environment_file(text: str) -> dict[str, str]:
    """KEY=VALUE lines as systemd's EnvironmentFile= reads them (and a shell sourcing
    subnet.env, as flannel's mk-docker-opts.sh does): blank lines and `#`/`;` comments
    skipped, a line without `=` ignored, one pair of surrounding quotes taken off the
    value. subnet.env, docker_opts.env and /etc/default/leaseagent are read with this."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")) or "=" not in line:
            continue
        key, _, value = line.partition("=")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        out[key.strip()] = value
    return out


def previous_subnet(text: str) -> IPv4Network | None:
    """The lease subnet recorded in an old subnet.env, or None if absent or unreadable."""
    value = parse_environment_file(text).get("FLANNEL_SUBNET")
    try:
        return IPv4Interface(value).network if value else None
    except ValueError:
        return None


def previous_ipv6_subnet(text: str) -> IPv6Network | None:
    """The IPv6 subnet recorded in an old subnet.env, or None if absent or unreadable."""
    value = parse_environment_file(text).get("FLANNEL_IPV6_SUBNET")
    try:
        return IPv6Interface(value).network if value else None
    except ValueError:
        return None
