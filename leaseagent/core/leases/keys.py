"""The key layout of a prefix in etcd, and lease key names (flannel's format).

    <prefix>/config                              the network config (JSON)
    <prefix>/subnets/<ipv4>-<len>                an IPv4 lease
    <prefix>/subnets/<ipv4>-<len>&<ipv6>-<len>   a dual-stack lease
    <prefix>/metrics/<node id>                   ours: where a host's agent serves /metrics
                                                 (leaseagent.core.monitoring); flanneld reads
                                                 only <prefix>/config and <prefix>/subnets

flannel names a lease `MakeSubnetKey` and reads it back with the regular
expression `(\\d+\\.\\d+.\\d+.\\d+)-(\\d+)(?:&([a-f\\d:]+)-(\\d+))?$`
(pkg/subnet/subnet.go): the IPv4 network, a dash, its length, and for a
dual-stack lease `&`, the IPv6 network in Go's text form (compressed,
lowercase; Python's `str(IPv6Address)` writes the same) and its length.

Where we are stricter than that expression (and so refuse, as invalid, a
name flannel would accept): the whole name must match (flannel does not
anchor the start), and each part must be a network address (no host bits).
flannel never writes such names; an operator's typo is reported instead of
guessed at. Digits are ASCII digits only, as Go's `\\d` (Python's `\\d` and
`int()` also take other scripts' digits: such a name is invalid).
Leading zeros in a length (`10.5.1.0-024`) are accepted, as
flannel's ParseUint does; such a key names the same subnet as `-24`, which
is why judging a listing must decide which of two keys holds a subnet
(leaseagent.core.leases.judging).

Pure: no I/O.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network

from leaseagent.core.network import IPV4_TEXT, HashedIPv4Network, ipv4_int

DEFAULT_PREFIX = "/coreos.com/network"

# re.ASCII: Go's \d is [0-9]; Python's would also take other scripts' digits (U+0661...),
# which int() reads as numbers, so a key flannel ignores would name a subnet here.
_NAME = re.compile(r"(\d+\.\d+\.\d+\.\d+)-(\d+)(?:&([a-f\d:]+)-(\d+))?", re.ASCII)
# An IPv4 key name as flannel writes it, the address as ipaddress reads it: read with
# integer arithmetic (core.network.ipv4_int). Anything else takes the general path.
_PLAIN = re.compile(rf"{IPV4_TEXT}-(\d{{1,3}})", re.ASCII)


@dataclass(frozen=True, slots=True)
class SubnetKey:
    """The subnet(s) a lease key names."""

    ipv4: IPv4Network
    ipv6: IPv6Network | None = None

    @property
    def name(self) -> str:
        """The last path element: `10.5.34.0-24` or `10.5.34.0-24&fd00:5:34::-64`."""
        return key_name(self.ipv4, self.ipv6)


def key_name(ipv4: IPv4Network, ipv6: IPv6Network | None = None) -> str:
    """flannel's MakeSubnetKey: `10.5.34.0-24`, or with IPv6 `10.5.34.0-24&fd00:5:34::-64`."""
    name = f"{ipv4.network_address}-{ipv4.prefixlen}"
    if ipv6 is not None:
        name += f"&{ipv6.network_address}-{ipv6.prefixlen}"
    return name


def parse_key_name(name: str) -> SubnetKey:
    """The subnet(s) of a key name; ValueError with a message if it is not one."""
    plain = _PLAIN.fullmatch(name)
    if plain is not None:
        # Every lease of an IPv4 network is named so; a listing of thousands is read at
        # start-up, so no text is parsed twice here (the result is the same).
        a, b, c, d, length = plain.groups()
        try:
            return SubnetKey(HashedIPv4Network((ipv4_int(a, b, c, d), int(length))))
        except ValueError:
            pass  # host bits set, a length over 32: said below as for any name
    match = _NAME.fullmatch(name)
    if match is None:
        raise ValueError(f"key name {name!r} is not of the form ADDR-LEN or ADDR-LEN&ADDR6-LEN")
    v4, v4_len, v6, v6_len = match.groups()
    try:
        ipv4 = HashedIPv4Network(f"{v4}/{int(v4_len)}", strict=True)
    except ValueError as exc:
        raise ValueError(f"key name {name!r} is not an IPv4 network: {exc}") from None
    ipv6 = None
    if v6 is not None:
        try:
            ipv6 = IPv6Network(f"{v6}/{int(v6_len)}", strict=True)
        except ValueError as exc:
            raise ValueError(f"key name {name!r} is not an IPv6 network: {exc}") from None
    return SubnetKey(ipv4, ipv6)


@dataclass(frozen=True, slots=True)
class KeyLayout:
    """Where a prefix keeps what: every key name of the project is built here."""

    prefix: str = DEFAULT_PREFIX

    @property
    def config_key(self) -> str:
        return f"{self.prefix}/config"

    @property
    def subnets_prefix(self) -> str:
        return f"{self.prefix}/subnets/"

    @property
    def metrics_prefix(self) -> str:
        return f"{self.prefix}/metrics/"

    def metrics_key(self, node_id: str) -> str:
        return self.metrics_prefix + node_id

    def lease_key(self, ipv4: IPv4Network, ipv6: IPv6Network | None = None) -> str:
        return self.subnets_prefix + key_name(ipv4, ipv6)

    def is_lease_key(self, key: str) -> bool:
        return key.startswith(self.subnets_prefix)

    def parse_lease_key(self, key: str) -> SubnetKey:
        """The subnet(s) a lease key names; ValueError if it is not under the subnets
        prefix or its name does not parse."""
        if not self.is_lease_key(key):
            raise ValueError(f"key {key!r} is not under {self.subnets_prefix}")
        return parse_key_name(key[len(self.subnets_prefix):])

    def name_of(self, key: str) -> str:
        """The key name (last path element) of a key under the subnets prefix."""
        return key[len(self.subnets_prefix):] if self.is_lease_key(key) else key
