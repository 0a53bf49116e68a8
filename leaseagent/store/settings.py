"""How to reach etcd: endpoints, TLS files, credentials, timeout. No gRPC here.

Kept apart from the adapter (leaseagent.store.etcd) so that parsing flags,
`leasectl docker-opts` and the lab do not load grpc. `parse_endpoints`
checks the endpoint list and names a bad entry in a one-line ConfigError.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from leaseagent.errors import ConfigError

DEFAULT_ENDPOINTS = "http://127.0.0.1:2379"
DEFAULT_TIMEOUT = 5.0


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int
    tls: bool


def parse_endpoints(spec: str) -> list[Endpoint]:
    """`http://10.0.0.1:2379,https://etcd2:2379` -> endpoints; ConfigError names a bad one."""
    out: list[Endpoint] = []
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        url = urlsplit(item if "://" in item else f"http://{item}")
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ConfigError(f"--etcd-endpoints: {item!r} is not an http(s)://HOST:PORT URL")
        try:
            port = url.port or 2379
        except ValueError:
            raise ConfigError(f"--etcd-endpoints: {item!r} has a bad port") from None
        out.append(Endpoint(host=url.hostname, port=port, tls=url.scheme == "https"))
    if not out:
        raise ConfigError("--etcd-endpoints: no endpoint given")
    if len({e.tls for e in out}) > 1:
        raise ConfigError("--etcd-endpoints: mix of http:// and https:// endpoints")
    return out


@dataclass(frozen=True)
class EtcdSettings:
    endpoints: str = DEFAULT_ENDPOINTS
    cafile: Path | None = None
    certfile: Path | None = None
    keyfile: Path | None = None
    username: str | None = None
    password_file: Path | None = None
    timeout: float = DEFAULT_TIMEOUT
