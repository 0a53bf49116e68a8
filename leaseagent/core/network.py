"""Subnet arithmetic and the cluster network config (flannel's rules).

Pure: no I/O. `parse_network_config` takes the raw bytes of
`<prefix>/config` and returns a validated, defaulted `NetworkConfig`, or
raises `NetworkConfigError` whose message names the field and the value.

flannel's rules, kept exactly (pkg/subnet/config.go; docs/architecture.md, "Wire contract"):
- SubnetLen defaults to 24 when Network is /22 or larger, else prefix + 2;
  a Network smaller than /28 is refused when SubnetLen is not given.
- SubnetLen must be >= prefix + 2 and <= 30.
- SubnetMin defaults to the second subnet (the first is skipped: its .0 would
  clash with the network address), SubnetMax to the last; both must lie in
  Network and sit on a SubnetLen boundary.
- Backend.Type defaults to "vxlan" (flannel's code says udp, its docs vxlan)
  and must be a type of leaseagent.core.backends, whose options are checked
  here too: a config this module accepts is one every agent can run.

IPv6 fields are parsed and checked for form, but only IPv4 leases are
served: `EnableIPv6: true` is refused with a clear message.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from typing import Any

from leaseagent.core.backends import DEFAULT_BACKEND, BackendOptions, backend_type
from leaseagent.errors import NetworkConfigError


@dataclass(frozen=True)
class NetworkConfig:
    """A validated network config with flannel's defaults applied."""

    network: IPv4Network
    subnet_len: int
    subnet_min: IPv4Address
    subnet_max: IPv4Address
    backend_type: str
    options: BackendOptions  # the Backend object read by its type's rules (core.backends)
    backend: Mapping[str, Any] = field(default_factory=dict)
    enable_nftables: bool = False  # flannel's EnableNFTables: traffic rules with nftables

    @property
    def subnet_size(self) -> int:
        return 1 << (32 - self.subnet_len)

    @property
    def capacity(self) -> int:
        """How many subnets [SubnetMin, SubnetMax] holds."""
        return (int(self.subnet_max) - int(self.subnet_min)) // self.subnet_size + 1

    def subnets(self) -> Iterator[IPv4Network]:
        """Every subnet in [SubnetMin, SubnetMax], in address order."""
        size = self.subnet_size
        for base in range(int(self.subnet_min), int(self.subnet_max) + 1, size):
            yield IPv4Network((base, self.subnet_len))

    def subnet_at(self, index: int) -> IPv4Network:
        """The index-th subnet of the range (0-based)."""
        base = int(self.subnet_min) + index * self.subnet_size
        return IPv4Network((base, self.subnet_len))

    def in_range(self, subnet: IPv4Network) -> bool:
        """Whether `subnet` is one this config could hand out."""
        return (
            subnet.prefixlen == self.subnet_len
            and self.subnet_min <= subnet.network_address <= self.subnet_max
        )

    def check_subnet(self, subnet: IPv4Network) -> str | None:
        """Why `subnet` cannot be a lease of this network, or None if it can.

        A lease outside [SubnetMin, SubnetMax] but inside Network and aligned is
        accepted: an operator may narrow the range while hosts hold leases.
        """
        if subnet.prefixlen != self.subnet_len:
            return f"subnet {subnet} is not a /{self.subnet_len}"
        if not subnet.subnet_of(self.network):
            return f"subnet {subnet} is outside the network {self.network}"
        return None


def _field_error(name: str, value: object, why: str) -> NetworkConfigError:
    return NetworkConfigError(f"{name}={json.dumps(value)}: {why}")


def _parse_ipv4(name: str, value: object) -> IPv4Address:
    if not isinstance(value, str):
        raise _field_error(name, value, "must be a string holding an IPv4 address")
    try:
        return IPv4Address(value)
    except ValueError:
        raise _field_error(name, value, "is not an IPv4 address") from None


def _parse_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _field_error(name, value, "must be an integer")
    return value


def _parse_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise _field_error(name, value, "must be true or false")
    return value


def parse_network_config(raw: bytes | str) -> NetworkConfig:
    """Decode and validate `<prefix>/config`; raise NetworkConfigError naming the bad field."""
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise NetworkConfigError(f"not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise NetworkConfigError("must be a JSON object")
    return network_config_from_dict(data)


def network_config_from_dict(data: Mapping[str, Any]) -> NetworkConfig:
    """Validate an already decoded config object (see parse_network_config)."""
    enable_v4 = _parse_bool("EnableIPv4", data.get("EnableIPv4", True))
    enable_v6 = _parse_bool("EnableIPv6", data.get("EnableIPv6", False))
    if "IPv6Network" in data:
        v6 = data["IPv6Network"]
        try:
            ipaddress.IPv6Network(v6 if isinstance(v6, str) else "x")
        except ValueError:
            raise _field_error("IPv6Network", v6, "is not an IPv6 CIDR") from None
    if enable_v6:
        raise _field_error("EnableIPv6", True, "IPv6 leases are not supported by leaseagent yet")
    if not enable_v4:
        raise _field_error("EnableIPv4", False, "at least IPv4 must be enabled")

    if "Network" not in data:
        raise NetworkConfigError("Network is missing (it is mandatory)")
    raw_net = data["Network"]
    if not isinstance(raw_net, str):
        raise _field_error("Network", raw_net, "must be a string holding an IPv4 CIDR")
    try:
        network = IPv4Network(raw_net, strict=True)
    except ValueError as exc:
        raise _field_error("Network", raw_net, f"is not an IPv4 CIDR ({exc})") from None

    subnet_len = _parse_int("SubnetLen", data.get("SubnetLen", 0))
    if subnet_len < 0:
        raise _field_error("SubnetLen", subnet_len, "must not be negative")
    if subnet_len > 0:
        if subnet_len > 30:
            raise _field_error("SubnetLen", subnet_len, "must be at most 30")
        if subnet_len < network.prefixlen + 2:
            raise _field_error(
                "SubnetLen",
                subnet_len,
                f"must be at least the Network prefix + 2 ({network.prefixlen + 2}) "
                "so the network holds four subnets",
            )
    elif network.prefixlen > 28:
        raise _field_error("Network", raw_net, "is too small; the smallest useful network is a /28")
    elif network.prefixlen <= 22:
        subnet_len = 24
    else:
        subnet_len = network.prefixlen + 2

    size = 1 << (32 - subnet_len)
    mask = (0xFFFFFFFF << (32 - subnet_len)) & 0xFFFFFFFF
    net_first = int(network.network_address)
    net_last_subnet = int(network.broadcast_address) + 1 - size

    subnet_min = IPv4Address(net_first + size)
    if data.get("SubnetMin") not in (None, ""):
        subnet_min = _parse_ipv4("SubnetMin", data["SubnetMin"])
        if subnet_min not in network:
            raise _field_error("SubnetMin", data["SubnetMin"], f"is not in the Network {network}")
    subnet_max = IPv4Address(net_last_subnet)
    if data.get("SubnetMax") not in (None, ""):
        subnet_max = _parse_ipv4("SubnetMax", data["SubnetMax"])
        if subnet_max not in network:
            raise _field_error("SubnetMax", data["SubnetMax"], f"is not in the Network {network}")
    if int(subnet_min) & mask != int(subnet_min):
        raise _field_error("SubnetMin", str(subnet_min), f"is not on a /{subnet_len} boundary")
    if int(subnet_max) & mask != int(subnet_max):
        raise _field_error("SubnetMax", str(subnet_max), f"is not on a /{subnet_len} boundary")
    if subnet_min > subnet_max:
        raise _field_error("SubnetMin", str(subnet_min), f"is above SubnetMax {subnet_max}")

    backend = data.get("Backend", {})
    if backend is None:
        backend = {}
    if not isinstance(backend, dict):
        raise _field_error("Backend", backend, "must be a JSON object")
    type_name = backend.get("Type", DEFAULT_BACKEND)
    if not isinstance(type_name, str) or not type_name:
        raise _field_error("Backend.Type", type_name, "must be a non-empty string")
    kind = backend_type(type_name.lower())
    return NetworkConfig(
        network=network,
        subnet_len=subnet_len,
        subnet_min=subnet_min,
        subnet_max=subnet_max,
        backend_type=kind.name,
        backend=dict(backend),
        options=kind.parse_options(backend),
        enable_nftables=_parse_bool("EnableNFTables", data.get("EnableNFTables", False)),
    )
