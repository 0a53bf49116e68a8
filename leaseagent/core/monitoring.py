"""Where each agent's metrics are, for Prometheus: published in etcd, read as file_sd.

Pure: no I/O. Each agent with a reachable --metrics-addr publishes

    <prefix>/metrics/<node id> = {"Address": "10.0.0.11:9643", "NodeID": "host1",
                                  "PublicIP": "10.0.0.11"}

(`KeyLayout.metrics_key`), and `leasectl prometheus-targets` turns every such key
into Prometheus's file_sd JSON (`file_sd`): one target group per host with the
labels `node` and `public_ip`, which the alert rules name the host by
(deploy/prometheus/leaseagent-rules.yml).

Why a key of its own and not a field in the lease value (which flannel's decoder
would ignore as well): a lease goes with its etcd lease, so a host that is down
longer than its TTL would drop out of discovery, and its "down" alert would
resolve by itself. The metrics key has no TTL: a host stays a target until it
leaves on purpose (--release-on-exit deletes the key with the lease) or an
operator deletes the key (`etcdctl del <prefix>/metrics/<node id>`). flanneld
never reads it: it reads `<prefix>/config` and ranges over `<prefix>/subnets`
only (pkg/subnet/etcd/registry.go).

The published address (`published_address`): a metrics address on a specific
host address is published as it is; on the unspecified address (0.0.0.0, ::) as
the host's PublicIP with the port; on a loopback address (the unit's default,
127.0.0.1:9643) nothing is published, since no other host could scrape it, and
neither is a host name.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address, ip_address

MAX_TARGET_BYTES = 4096


@dataclass(frozen=True, order=True)
class MetricsTarget:
    """One agent's metrics endpoint: HOST:PORT (IPv6 in brackets), who it is."""

    node_id: str
    address: str
    public_ip: str

    def encode(self) -> bytes:
        return json.dumps({"Address": self.address, "NodeID": self.node_id,
                           "PublicIP": self.public_ip}, separators=(",", ":")).encode()


def decode_target(raw: bytes) -> MetricsTarget:
    """A published target; ValueError (with what is wrong) for anything else."""
    if len(raw) > MAX_TARGET_BYTES:
        raise ValueError(f"value is {len(raw)} bytes (limit {MAX_TARGET_BYTES})")
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise ValueError("value is not valid JSON") from None
    if not isinstance(doc, dict):
        raise ValueError("value is not a JSON object")
    fields = {name: doc.get(name) for name in ("Address", "NodeID", "PublicIP")}
    for name, value in fields.items():
        if not isinstance(value, str) or not value or not value.isprintable():
            raise ValueError(f"{name} {value!r} is not a printable string")
    address = fields["Address"]
    assert address is not None  # checked above; for mypy
    host, sep, port = address.rpartition(":")
    try:
        ip_address(host[1:-1] if host.startswith("[") and host.endswith("]") else host)
        number = int(port)
    except ValueError:
        raise ValueError(f"Address {address!r} is not IP:PORT") from None
    if not sep or not 0 < number < 65536 or not port.isascii() or not port.isdigit():
        raise ValueError(f"Address {address!r} is not IP:PORT")
    return MetricsTarget(node_id=str(fields["NodeID"]), address=address,
                         public_ip=str(fields["PublicIP"]))


def published_address(host: str, port: int, public_ip: IPv4Address) -> str | None:
    """What an agent listening on `host`:`port` publishes (see the module docstring); a
    host name is not published (a target is IP:PORT, what `decode_target` accepts)."""
    try:
        addr = ip_address(host)
    except ValueError:
        return None
    if addr.is_loopback:
        return None
    if addr.is_unspecified:
        return f"{public_ip}:{port}"
    return f"[{addr}]:{port}" if addr.version == 6 else f"{addr}:{port}"


def file_sd(targets: Iterable[MetricsTarget]) -> str:
    """Prometheus file_sd JSON: a target group per host, sorted by node id."""
    groups = [{"targets": [t.address], "labels": {"node": t.node_id, "public_ip": t.public_ip}}
              for t in sorted(set(targets))]
    return json.dumps(groups, indent=2) + "\n"
