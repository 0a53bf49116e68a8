"""Lease values (flannel's LeaseAttrs JSON) and the checks before a lease is a peer.

Pure: no I/O. A lease value is

    {"PublicIP": "192.168.64.3", "PublicIPv6": null, "BackendType": "vxlan",
     "BackendData": {"VNI": 1, "VtepMAC": "c6:d2:32:6f:8f:44"}, "NodeID": "..."}

and, for a dual-stack lease (flannel's LeaseAttrs, pkg/lease/lease.go, in its
field order), `"PublicIPv6": "fd00::11"` and `"BackendV6Data": {...}` after
BackendData: the IPv6 device's VNI and VtepMAC for vxlan. A host without IPv6
writes `"PublicIPv6": null` and no BackendV6Data.

`NodeID` is ours; flannel's decoder ignores unknown fields, so a mixed
cluster keeps working. A lease without NodeID (written by flanneld) is valid.
So is `"Released": true`, ours too: an agent stopping with --release-on-exit
writes it into its value just before it revokes its lease, so peers tell a
host that left on purpose (removed at once) from a lease that expired (held
a few seconds in case its owner takes it back; leaseagent.core.holddown).

`decode_lease_value` and `validate_peer` refuse anything that is not clearly
usable with InvalidLease (a short reason for metrics, a detail for people),
never another exception: a hostile value in etcd costs one skipped lease.
What BackendData must hold is the backend type's rule
(leaseagent.core.profiles).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import TYPE_CHECKING, Any

from leaseagent.core.network import ipv4_address
from leaseagent.core.profiles import BACKEND_TYPES
from leaseagent.core.profiles.base import LeaseData
from leaseagent.errors import InvalidLease

if TYPE_CHECKING:
    from leaseagent.core.network import NetworkConfig

MAX_VALUE_BYTES = 64 * 1024


@dataclass(frozen=True)
class LeaseValue:
    """The attributes flannel keeps in a lease value (plus our NodeID)."""

    public_ip: IPv4Address
    backend_type: str
    backend_data: Mapping[str, Any] = field(default_factory=dict)
    node_id: str | None = None
    released: bool = False
    public_ipv6: IPv6Address | None = None
    backend_v6_data: Mapping[str, Any] = field(default_factory=dict)

    @property
    def vtep_mac(self) -> str | None:
        mac = self.backend_data.get("VtepMAC")
        return mac if isinstance(mac, str) else None

    @property
    def public_key(self) -> str | None:
        """A WireGuard lease's PublicKey (the same in BackendV6Data, flannel's one key)."""
        key = self.backend_data.get("PublicKey")
        return key if isinstance(key, str) else None

    def encode(self) -> bytes:
        """Encode as flannel does (field order and names kept)."""
        doc: dict[str, Any] = {
            "PublicIP": str(self.public_ip),
            "PublicIPv6": str(self.public_ipv6) if self.public_ipv6 is not None else None,
            "BackendType": self.backend_type,
        }
        if self.backend_data:
            doc["BackendData"] = dict(self.backend_data)
        if self.backend_v6_data:
            doc["BackendV6Data"] = dict(self.backend_v6_data)
        if self.node_id is not None:
            doc["NodeID"] = self.node_id
        if self.released:
            doc["Released"] = True
        return json.dumps(doc, separators=(",", ":")).encode()


def decode_lease_value(raw: bytes) -> LeaseValue:
    """Decode a lease value; raise InvalidLease (reason, detail) on anything odd."""
    if len(raw) > MAX_VALUE_BYTES:
        raise InvalidLease("too_large", f"value is {len(raw)} bytes (limit {MAX_VALUE_BYTES})")
    try:
        # A value that opens with `{"` is UTF-8 by json's own detection: decoded here as
        # json.loads would (its detection is a Python function, run for every lease).
        doc = json.loads(raw.decode("utf-8", "surrogatepass") if raw[:2] == b'{"' else raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        # RecursionError: a deeply nested array/object fits well under the size limit.
        raise InvalidLease("malformed_json", "value is not valid JSON") from None
    if not isinstance(doc, dict):
        raise InvalidLease("malformed_json", "value is not a JSON object")
    public_ip = doc.get("PublicIP")
    if not isinstance(public_ip, str):
        raise InvalidLease("bad_public_ip", f"PublicIP {public_ip!r} is not a string")
    try:
        ip = ipv4_address(public_ip)
    except ValueError:
        raise InvalidLease("bad_public_ip", f"PublicIP {public_ip!r} is not an IPv4 address") from None
    backend_type = doc.get("BackendType", "")
    if not isinstance(backend_type, str):
        raise InvalidLease("unknown_backend", f"BackendType {backend_type!r} is not a string")
    backend_data = doc.get("BackendData") or {}
    if not isinstance(backend_data, dict):
        raise InvalidLease("bad_backend_data", "BackendData is not a JSON object")
    backend_v6_data = doc.get("BackendV6Data") or {}
    if not isinstance(backend_v6_data, dict):
        raise InvalidLease("bad_backend_data", "BackendV6Data is not a JSON object")
    raw_v6 = doc.get("PublicIPv6")
    ipv6: IPv6Address | None = None
    if raw_v6 is not None:
        if not isinstance(raw_v6, str):
            raise InvalidLease("bad_public_ip", f"PublicIPv6 {raw_v6!r} is not a string")
        try:
            ipv6 = IPv6Address(raw_v6)
        except ValueError:
            raise InvalidLease("bad_public_ip",
                               f"PublicIPv6 {raw_v6!r} is not an IPv6 address") from None
    node_id = doc.get("NodeID")
    if node_id is not None and not isinstance(node_id, str):
        raise InvalidLease("bad_node_id", f"NodeID {node_id!r} is not a string")
    return LeaseValue(
        public_ip=ip, backend_type=backend_type, backend_data=backend_data, node_id=node_id,
        released=doc.get("Released") is True, public_ipv6=ipv6, backend_v6_data=backend_v6_data,
    )


# IPv4 ranges a PublicIP may not be in, as (first, last, reason), first match wins:
# ipaddress's is_unspecified, is_loopback, is_multicast, the broadcast address,
# is_reserved (240.0.0.0/4), is_link_local. Compared as integers: thousands of leases
# are judged at start-up, and each property of ipaddress builds networks to compare.
_UNUSABLE_IPV4 = (
    (0, 0, "unspecified"),
    (0x7F000000, 0x7FFFFFFF, "loopback"),
    (0xE0000000, 0xEFFFFFFF, "multicast"),
    (0xFFFFFFFF, 0xFFFFFFFF, "broadcast"),
    (0xF0000000, 0xFFFFFFFF, "reserved"),
    (0xA9FE0000, 0xA9FEFFFF, "link-local"),
)


def unusable_ip_reason(ip: IPv4Address | IPv6Address) -> str | None:
    """Why `ip` cannot be a host's PublicIP (or PublicIPv6), or None."""
    if ip.version == 4:
        number = int(ip)
        for first, last, reason in _UNUSABLE_IPV4:
            if first <= number <= last:
                return reason
        return None
    if ip.is_unspecified:
        return "unspecified"
    if ip.is_loopback:
        return "loopback"
    if ip.is_multicast:
        return "multicast"
    if ip.is_reserved:
        return "reserved"
    if ip.is_link_local:
        return "link-local"
    return None


@dataclass(frozen=True, slots=True)
class Peer:
    """Another host's valid lease, as the data plane needs it. `data` is what the
    backend type reads from BackendData (leaseagent.core.profiles)."""

    subnet: IPv4Network
    public_ip: IPv4Address
    backend_type: str
    data: LeaseData
    node_id: str | None = None
    # Its IPv6 part, when both it and this network are dual-stack (else all None).
    ipv6_subnet: IPv6Network | None = None
    public_ipv6: IPv6Address | None = None
    data6: LeaseData | None = None


def check_placement(subnet: IPv4Network, value: LeaseValue, *, network: NetworkConfig,
                    ipv6_subnet: IPv6Network | None = None) -> None:
    """The part of a lease's rules that a reservation (no etcd lease, no backend data
    yet) must pass too: its subnet inside the network with the network's subnet length
    (and its IPv6 part, when the network has IPv6, in the IPv6 network), its PublicIP
    usable and outside the cluster network. InvalidLease says which failed."""
    why = network.check_subnet(subnet)
    if why:
        raise InvalidLease("subnet_outside_network", why)
    bad_ip = unusable_ip_reason(value.public_ip)
    if bad_ip:
        raise InvalidLease("bad_public_ip", f"PublicIP {value.public_ip} is {bad_ip}")
    if value.public_ip in network.network:
        # The underlay address inside the overlay: its packets would be sent into the
        # overlay they carry (a route loop), and the lease's route would shadow a host.
        raise InvalidLease("bad_public_ip", f"PublicIP {value.public_ip} is inside the cluster "
                           f"network {network.network}")
    if ipv6_subnet is not None and network.ipv6 is not None:
        why = network.check_ipv6_subnet(ipv6_subnet)
        if why:
            raise InvalidLease("subnet_outside_network", why)


def validate_peer(
    subnet: IPv4Network,
    value: LeaseValue,
    *,
    network: NetworkConfig,
    own_public_ip: IPv4Address | None,
    ipv6_subnet: IPv6Network | None = None,
) -> Peer:
    """Check a decoded lease against the network and this host; raise InvalidLease.

    `ipv6_subnet` is the IPv6 part of the key. With an IPv6 network it must be in
    it and come with a usable PublicIPv6 and the backend's BackendV6Data, or the
    lease is refused; without one (IPv4-only config) it is ignored. A lease with
    no IPv6 part is an IPv4-only peer either way (a mixed cluster works)."""
    if value.released:
        raise InvalidLease("released", "released by its agent (stopping with --release-on-exit)")
    check_placement(subnet, value, network=network)
    if own_public_ip is not None and value.public_ip == own_public_ip:
        raise InvalidLease("public_ip_is_ours", f"PublicIP {value.public_ip} is this host's")
    kind = BACKEND_TYPES.get(value.backend_type)
    if kind is None:
        raise InvalidLease("unknown_backend", f"BackendType {value.backend_type!r} is unknown")
    data = kind.parse_lease_data(value.backend_data)
    if ipv6_subnet is None or network.ipv6 is None:
        # The registry's name, equal to the lease's text: one string for every peer
        # instead of each lease's own decoded copy.
        return Peer(subnet, value.public_ip, kind.name, data, value.node_id)
    why = network.check_ipv6_subnet(ipv6_subnet)
    if why:
        raise InvalidLease("subnet_outside_network", why)
    if value.public_ipv6 is None:
        raise InvalidLease("bad_public_ip", f"names the IPv6 subnet {ipv6_subnet} but has no "
                           "PublicIPv6")
    bad_ip = unusable_ip_reason(value.public_ipv6)
    if bad_ip:
        raise InvalidLease("bad_public_ip", f"PublicIPv6 {value.public_ipv6} is {bad_ip}")
    if network.ipv6_network is not None and value.public_ipv6 in network.ipv6_network:
        raise InvalidLease("bad_public_ip", f"PublicIPv6 {value.public_ipv6} is inside the "
                           f"cluster network {network.ipv6_network}")
    try:
        data6 = kind.parse_lease_data(value.backend_v6_data)
    except InvalidLease as exc:
        raise InvalidLease(exc.reason, f"BackendV6Data: {exc.detail}") from None
    return Peer(subnet, value.public_ip, kind.name, data, value.node_id,
                ipv6_subnet=ipv6_subnet, public_ipv6=value.public_ipv6, data6=data6)
