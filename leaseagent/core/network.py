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
  and must be a type of leaseagent.core.profiles, whose options are checked
  here too: a config this module accepts is one every agent can run.

Dual-stack (flannel's `EnableIPv6`, `IPv6Network`, `IPv6SubnetLen`,
`IPv6SubnetMin`, `IPv6SubnetMax`): the same rules with IPv6 numbers (the
subnet length defaults to /64 for a /62 or larger network, else prefix + 2,
and is at most /126; a network longer than /124 is too small). IPv4 stays
mandatory (`EnableIPv4: false` is refused), as in flannel's etcd mode.

Stricter than flannel: a Network (either family) that is every address
(0.0.0.0/0, ::/0) or holds loopback, link-local, multicast or reserved
addresses is refused (`special_range`). Whether a Network holds a host's own
addresses can only be judged on a host: `host_overlap`, which the agent asks
of its own addresses and leasectl of the host it runs on.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any

from leaseagent.core import gojson
from leaseagent.core.profiles import DEFAULT_BACKEND, backend_type
from leaseagent.core.profiles.base import BackendOptions, BackendProfile
from leaseagent.errors import NetworkConfigError

Address = IPv4Address | IPv6Address
Network = IPv4Network | IPv6Network

# Dotted-quad IPv4 text exactly as ipaddress accepts it (each octet 0-255, no leading
# zero), as a regular expression of four groups. Thousands of leases are read at
# start-up: their addresses are read from these groups with integer arithmetic
# (`ipv4_int`), ipaddress's own parser being ~10x slower; any other text goes to
# ipaddress, which refuses it or reads it, with its own error messages. Compile it with
# re.ASCII: `\d` alone also matches other scripts' digits.
_OCTET = r"(25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
IPV4_TEXT = rf"{_OCTET}\.{_OCTET}\.{_OCTET}\.{_OCTET}"
_IPV4_TEXT = re.compile(IPV4_TEXT, re.ASCII)  # ASCII digits only (int() reads any script's)


def ipv4_int(a: str, b: str, c: str, d: str) -> int:
    """The address of four octets matched by IPV4_TEXT."""
    return (int(a) << 24) | (int(b) << 16) | (int(c) << 8) | int(d)


class HashedIPv4Network(IPv4Network):
    """An IPv4Network that computes its hash once. ipaddress's `__hash__` is Python
    (two `__int__` calls and a xor, ~3 us on a loaded machine); a lease's subnet is the
    key of a dozen dicts and sets between its judging, its plan and its removal (the
    watcher's book, the peer set, the plan, the admission), ~37 lookups a peer in a
    join and removal. Equal to, and hashed as, the IPv4Network of the same text, and
    shown as one, so dicts and messages mix the two freely. Lease keys are parsed
    into it (leaseagent.core.leases.keys)."""

    __slots__ = ("_hash",)

    def __init__(self, address: Any, strict: bool = True) -> None:
        super().__init__(address, strict)
        self._hash = IPv4Network.__hash__(self)

    def __hash__(self) -> int:
        return self._hash

    def __repr__(self) -> str:
        return f"IPv4Network({str(self)!r})"


def ipv4_address(text: str) -> IPv4Address:
    """`IPv4Address(text)`, the same answers and errors, faster for dotted quads."""
    match = _IPV4_TEXT.fullmatch(text)
    if match is None:
        return IPv4Address(text)
    return IPv4Address(ipv4_int(*match.groups()))


@dataclass(frozen=True)
class SubnetRange:
    """One family's part of the config: the network, the subnet length and
    [SubnetMin, SubnetMax] (flannel's rules, the same for both families)."""

    network: Network
    subnet_len: int
    subnet_min: Address
    subnet_max: Address

    @property
    def bits(self) -> int:
        return self.network.max_prefixlen

    @property
    def subnet_size(self) -> int:
        return 1 << (self.bits - self.subnet_len)

    @property
    def capacity(self) -> int:
        """How many subnets [SubnetMin, SubnetMax] holds."""
        return (int(self.subnet_max) - int(self.subnet_min)) // self.subnet_size + 1

    def subnet_at(self, index: int) -> Network:
        """The index-th subnet of the range (0-based)."""
        base = int(self.subnet_min) + index * self.subnet_size
        return ip_network((base, self.subnet_len), self.bits)

    def subnets(self) -> Iterator[Network]:
        """Every subnet in [SubnetMin, SubnetMax], in address order."""
        for index in range(self.capacity):
            yield self.subnet_at(index)

    def in_range(self, subnet: Network) -> bool:
        """Whether `subnet` is one this range could hand out."""
        version, low, high = self._range_ints
        return (
            subnet.version == version
            and subnet.prefixlen == self.subnet_len
            and low <= int(subnet.network_address) <= high
        )

    def check_subnet(self, subnet: Network) -> str | None:
        """Why `subnet` cannot be a lease of this range, or None if it can.

        A lease outside [SubnetMin, SubnetMax] but inside the network and aligned is
        accepted: an operator may narrow the range while hosts hold leases.
        """
        version, shift, prefix = self._network_bits
        if subnet.version != version:
            return f"subnet {subnet} is not an IPv{version} subnet"
        if subnet.prefixlen != self.subnet_len:
            return f"subnet {subnet} is not a /{self.subnet_len}"
        if int(subnet.network_address) >> shift != prefix:
            return f"subnet {subnet} is outside the network {self.network}"
        return None

    @cached_property
    def _range_ints(self) -> tuple[int, int, int]:
        """(version, SubnetMin, SubnetMax as numbers): `in_range` in integers, as it is
        asked of every lease of a listing when a host takes a new subnet."""
        return self.network.version, int(self.subnet_min), int(self.subnet_max)

    @cached_property
    def _network_bits(self) -> tuple[int, int, int]:
        """(version, host bits, the network's prefix as a number): `subnet_of` in
        integers, as `check_subnet` is asked of every lease of a listing."""
        shift = self.bits - self.network.prefixlen
        return self.network.version, shift, int(self.network.network_address) >> shift


# Ranges a Network may not hold any part of, with why (flannel accepts them all): a lease
# there would route loopback, link-local or multicast traffic, or every address, into the
# overlay. 0.0.0.0/0 and ::/0 hold all of them.
_SPECIAL: tuple[tuple[Network, str], ...] = (
    (IPv4Network("0.0.0.0/8"), "holds 0.0.0.0/8 (\"this network\", never a destination)"),
    (IPv4Network("127.0.0.0/8"), "holds loopback addresses (127.0.0.0/8)"),
    (IPv4Network("169.254.0.0/16"), "holds link-local addresses (169.254.0.0/16)"),
    (IPv4Network("224.0.0.0/4"), "holds multicast addresses (224.0.0.0/4)"),
    (IPv4Network("240.0.0.0/4"), "holds reserved and broadcast addresses (240.0.0.0/4)"),
    (IPv6Network("::/128"), "holds the unspecified address ::"),
    (IPv6Network("::1/128"), "holds the loopback address ::1"),
    (IPv6Network("fe80::/10"), "holds link-local addresses (fe80::/10)"),
    (IPv6Network("ff00::/8"), "holds multicast addresses (ff00::/8)"),
)


def special_range(network: Network) -> str | None:
    """Why `network` cannot be a cluster Network (every address, loopback, link-local,
    multicast, reserved), or None."""
    if network.prefixlen == 0:
        return "is every address; the overlay would take the hosts' own traffic"
    for special, why in _SPECIAL:
        if special.version == network.version and network.overlaps(special):
            return why
    return None


def host_overlap(config: NetworkConfig, host: Iterable[tuple[Address | Network, str]]
                 ) -> str | None:
    """Why `config` cannot run on a host, judged against the host's own addresses and
    networks (`host`: each with what it is, e.g. "PublicIP" or "the network of eth0"):
    a Network (IPv4 or IPv6) that holds one of them, or overlaps one, would send the
    hosts' own traffic (etcd's included) into the overlay. None: it can."""
    for family in (config.ipv4, config.ipv6):
        if family is None:
            continue
        net = family.network
        for item, what in host:
            if item.version != net.version:
                continue
            if isinstance(item, IPv4Address | IPv6Address):
                if item in net:
                    return f"Network {net} holds {item}, {what}"
            elif net.overlaps(item):
                return f"Network {net} overlaps {item}, {what}"
    return None


def ip_network(spec: tuple[int, int], bits: int) -> Network:
    return IPv4Network(spec) if bits == 32 else IPv6Network(spec)


@dataclass(frozen=True)
class NetworkConfig:
    """A validated network config with flannel's defaults applied. `ipv4` is always
    there (etcd mode needs it, as flannel's does); `ipv6` when EnableIPv6 is true."""

    ipv4: SubnetRange
    backend_type: str
    options: BackendOptions  # the Backend object read by its type's profile (core.profiles)
    backend: Mapping[str, Any] = field(default_factory=dict)
    enable_nftables: bool = False  # flannel's EnableNFTables: traffic rules with nftables
    ipv6: SubnetRange | None = None

    @property
    def profile(self) -> BackendProfile:
        """The profile of the backend type: what the rest of the code asks about it."""
        return backend_type(self.backend_type)

    # The IPv4 range's facts under the names the code used before dual-stack.
    @property
    def network(self) -> IPv4Network:
        assert isinstance(self.ipv4.network, IPv4Network)
        return self.ipv4.network

    @property
    def subnet_len(self) -> int:
        return self.ipv4.subnet_len

    @property
    def subnet_min(self) -> IPv4Address:
        assert isinstance(self.ipv4.subnet_min, IPv4Address)
        return self.ipv4.subnet_min

    @property
    def subnet_max(self) -> IPv4Address:
        assert isinstance(self.ipv4.subnet_max, IPv4Address)
        return self.ipv4.subnet_max

    @property
    def subnet_size(self) -> int:
        return self.ipv4.subnet_size

    @property
    def capacity(self) -> int:
        return self.ipv4.capacity

    def subnets(self) -> Iterator[IPv4Network]:
        return self.ipv4.subnets()  # type: ignore[return-value]

    def subnet_at(self, index: int) -> IPv4Network:
        return self.ipv4.subnet_at(index)  # type: ignore[return-value]

    def in_range(self, subnet: IPv4Network) -> bool:
        return self.ipv4.in_range(subnet)

    def check_subnet(self, subnet: IPv4Network) -> str | None:
        return self.ipv4.check_subnet(subnet)

    @property
    def ipv6_network(self) -> IPv6Network | None:
        """The IPv6Network (None without IPv6)."""
        if self.ipv6 is None:
            return None
        assert isinstance(self.ipv6.network, IPv6Network)
        return self.ipv6.network

    def keeps(self, subnet: IPv4Network) -> bool:
        """Whether a host holding `subnet` keeps it under this config: inside the network
        with the subnet length (the acquisition's rule; [SubnetMin, SubnetMax] bounds
        only new leases). A running agent whose subnet fails this re-leases."""
        return self.check_subnet(subnet) is None

    def ipv6_part_fits(self, ipv6: IPv6Network | None) -> bool:
        """Whether a lease key's IPv6 part fits this config: none without IPv6, one in
        [IPv6SubnetMin, IPv6SubnetMax] with it. A key that does not fit is moved to one
        that does, its IPv4 subnet kept (leaseagent.agent.leasing)."""
        if self.ipv6 is None:
            return ipv6 is None
        return ipv6 is not None and self.ipv6.in_range(ipv6)

    def check_ipv6_subnet(self, subnet: IPv6Network) -> str | None:
        """Why `subnet` cannot be this network's IPv6 part of a lease (None: it can)."""
        if self.ipv6 is None:
            return "the network config has no IPv6 (EnableIPv6 is not true)"
        return self.ipv6.check_subnet(subnet)


def _field_error(name: str, value: object, why: str) -> NetworkConfigError:
    return NetworkConfigError(f"{name}={json.dumps(gojson.plain(value))}: {why}")


def _parse_address(name: str, value: object, version: int) -> Address:
    """An address as flannel's ip.IP4 / ip.IP6 decode it (Go's net.ParseIP): an IPv4
    field also takes the IPv4-mapped IPv6 form ("::ffff:10.5.1.0")."""
    if not isinstance(value, str):
        raise _field_error(name, value, f"must be a string holding an IPv{version} address")
    try:
        if version == 6:
            return IPv6Address(value)
        if ":" in value:
            mapped = IPv6Address(value).ipv4_mapped
            if mapped is not None:
                return mapped
        return IPv4Address(value)
    except ValueError:
        raise _field_error(name, value, f"is not an IPv{version} address") from None


def _parse_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _field_error(name, value, "must be a whole JSON number (not a string, not a "
                           "fraction)")
    return value


def _parse_bool(name: str, value: object, default: bool) -> bool:
    """A bool field; null leaves the default, as in Go."""
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _field_error(name, value, "must be true or false (not a string)")
    return value


# subnet.Config's fields (pkg/subnet/config.go); BackendType is `json:"-"`, never read.
CONFIG_FIELDS = ("EnableIPv4", "EnableIPv6", "EnableNFTables", "Network", "IPv6Network",
                 "SubnetMin", "SubnetMax", "IPv6SubnetMin", "IPv6SubnetMax", "SubnetLen",
                 "IPv6SubnetLen", "Backend")


def parse_network_config(raw: bytes | str) -> NetworkConfig:
    """Decode and validate `<prefix>/config`; raise NetworkConfigError naming the bad field.

    The JSON is read as flanneld's Go decoder reads it (leaseagent.core.gojson): keys
    match field names ignoring case, the last of a repeated key counts, unknown keys
    are ignored, null leaves a plain field at its default."""
    try:
        data = gojson.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise NetworkConfigError(f"not valid JSON: {exc}") from None
    if not isinstance(data, gojson.JsonObject):
        raise NetworkConfigError("must be a JSON object")
    return network_config_from_dict(data)


@dataclass(frozen=True)
class _Family:
    """Where one family's fields are and flannel's limits for them."""

    version: int
    network: str  # field names
    subnet_len: str
    subnet_min: str
    subnet_max: str
    max_subnet_len: int  # SubnetLen at most (flannel: /30, /126)
    smallest_network: int  # a longer Network prefix is too small (flannel: /28, /124)
    default_len: int  # the default SubnetLen for a large network (/24, /64) ...
    large_network: int  # ... which is one of this prefix or shorter (/22, /62)


_IPV4 = _Family(4, "Network", "SubnetLen", "SubnetMin", "SubnetMax", 30, 28, 24, 22)
_IPV6 = _Family(6, "IPv6Network", "IPv6SubnetLen", "IPv6SubnetMin", "IPv6SubnetMax",
                126, 124, 64, 62)


def _subnet_range(data: Mapping[str, Any], f: _Family) -> SubnetRange:
    """One family's range with flannel's defaults (pkg/subnet/config.go,
    CheckNetworkConfig: the same rules for both families, other numbers)."""
    if f.network not in data:
        raise NetworkConfigError(f"{f.network} is missing (it is mandatory)")
    raw_net = data[f.network]
    if not isinstance(raw_net, str):
        raise _field_error(f.network, raw_net, f"must be a string holding an IPv{f.version} CIDR")
    try:
        network: Network = (IPv4Network(raw_net, strict=True) if f.version == 4
                            else IPv6Network(raw_net, strict=True))
    except ValueError as exc:
        raise _field_error(f.network, raw_net, f"is not an IPv{f.version} CIDR ({exc})") from None
    bits = network.max_prefixlen
    why = special_range(network)
    if why:
        raise _field_error(f.network, raw_net, why)

    subnet_len = _parse_int(f.subnet_len, data.get(f.subnet_len) or 0)  # null: 0, unset
    if subnet_len < 0:
        raise _field_error(f.subnet_len, subnet_len, "must not be negative")
    if subnet_len > 0:
        if subnet_len > f.max_subnet_len:
            raise _field_error(f.subnet_len, subnet_len, f"must be at most {f.max_subnet_len}")
        if subnet_len < network.prefixlen + 2:
            raise _field_error(
                f.subnet_len,
                subnet_len,
                f"must be at least the {f.network} prefix + 2 ({network.prefixlen + 2}) "
                "so the network holds four subnets",
            )
    elif network.prefixlen > f.smallest_network:
        raise _field_error(f.network, raw_net, "is too small; the smallest useful network is "
                           f"a /{f.smallest_network}")
    elif network.prefixlen <= f.large_network:
        subnet_len = f.default_len
    else:
        subnet_len = network.prefixlen + 2

    size = 1 << (bits - subnet_len)
    mask = ((1 << bits) - 1) ^ (size - 1)
    net_first = int(network.network_address)
    net_last_subnet = int(network.broadcast_address) + 1 - size

    def bound(name: str, default: int) -> Address:
        """SubnetMin/SubnetMax as flannel reads them: absent or the zero address means
        the default; "" is an error (net.ParseIP("")); null is an error for IPv4
        (ip.IP4 is handed "null") and the default for IPv6 (a nil *ip.IP6)."""
        if name not in data or (data[name] is None and f.version == 6):
            return ip_network((default, bits), bits).network_address
        raw = data[name]
        address = _parse_address(name, raw, f.version)
        if int(address) == 0:
            return ip_network((default, bits), bits).network_address
        if address not in network:
            raise _field_error(name, raw, f"is not in the {f.network} {network}")
        return address

    subnet_min = bound(f.subnet_min, net_first + size)
    subnet_max = bound(f.subnet_max, net_last_subnet)
    if int(subnet_min) & mask != int(subnet_min):
        raise _field_error(f.subnet_min, str(subnet_min), f"is not on a /{subnet_len} boundary")
    if int(subnet_max) & mask != int(subnet_max):
        raise _field_error(f.subnet_max, str(subnet_max), f"is not on a /{subnet_len} boundary")
    if int(subnet_min) > int(subnet_max):
        raise _field_error(f.subnet_min, str(subnet_min), f"is above {f.subnet_max} {subnet_max}")
    return SubnetRange(network, subnet_len, subnet_min, subnet_max)


def network_config_from_dict(obj: gojson.JsonObject | Mapping[str, Any]) -> NetworkConfig:
    """Validate an already decoded config object (see parse_network_config)."""
    data = gojson.struct_fields(obj, CONFIG_FIELDS)
    enable_v4 = _parse_bool("EnableIPv4", data.get("EnableIPv4"), True)
    enable_v6 = _parse_bool("EnableIPv6", data.get("EnableIPv6"), False)
    if not enable_v4:
        raise _field_error("EnableIPv4", False, "leaseagent (like flannel with etcd) needs "
                           "IPv4: IPv6-only is not supported")
    ipv4 = _subnet_range(data, _IPV4)
    ipv6 = _subnet_range(data, _IPV6) if enable_v6 else None
    if not enable_v6 and "IPv6Network" in data:
        v6 = data["IPv6Network"]
        try:
            IPv6Network(v6 if isinstance(v6, str) else "x")
        except ValueError:
            raise _field_error("IPv6Network", v6, "is not an IPv6 CIDR") from None

    kind, backend = _backend(data)
    options = kind.parse_options(backend)
    if kind.check_network is not None:
        kind.check_network(options, ipv6 is not None)
    return NetworkConfig(
        ipv4=ipv4,
        ipv6=ipv6,
        backend_type=kind.name,
        backend=backend,
        options=options,
        enable_nftables=_parse_bool("EnableNFTables", data.get("EnableNFTables"), False),
    )


def _backend(data: Mapping[str, Any]) -> tuple[Any, dict[str, Any]]:
    """The backend type and its fields (Type first, then the type's own, by their
    flannel names) as flanneld reads Backend: its Type from `struct {Type string}`
    (matched ignoring case, its value lower-cased), then the type's own struct.

    No Backend at all: flanneld's code runs udp (its docs say vxlan); leaseagent runs
    vxlan (docs/flannel.md). A Backend that is null, or has no Type, or an empty one:
    flanneld stops ("unknown backend type"), and so is it refused here."""
    if "Backend" not in data:
        return backend_type(DEFAULT_BACKEND), {"Type": DEFAULT_BACKEND}
    raw = data["Backend"]
    if not gojson.is_object(raw):
        raise _field_error("Backend", gojson.plain(raw), "must be a JSON object with a Type")
    type_name = gojson.struct_fields(raw, ("Type",)).get("Type")
    if not isinstance(type_name, str) or not type_name:
        raise _field_error("Backend.Type", type_name, "must be a backend type's name "
                           '(e.g. "vxlan"); flanneld too refuses a Backend without one')
    kind = backend_type(type_name.lower())
    fields = gojson.struct_fields(raw, kind.option_keys)
    return kind, {"Type": type_name, **{k: gojson.plain(v) for k, v in fields.items()}}
