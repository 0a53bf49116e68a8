"""How to reach etcd: endpoints, TLS files, credentials, timeout. No gRPC here.

Kept apart from the adapter (leaseagent.store.etcd) so that parsing flags,
`leasectl docker-opts` and the lab do not load grpc. `parse_endpoints`
checks the endpoint list and names a bad entry in a one-line ConfigError. An
endpoint with credentials in it (`https://user:pw@host:2379`) is refused by
its position in the list, never echoed: the password belongs in
--etcd-password-file, and an endpoint list is logged at start.
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
    for number, item in enumerate((part.strip() for part in spec.split(",")), 1):
        if not item:
            continue
        if "@" in item:
            # user:password@host: never echoed (a message would put the password in a log),
            # and refused rather than ignored (gRPC would connect without them).
            raise ConfigError(f"--etcd-endpoints: endpoint {number} holds credentials "
                              "(user:password@): give the user with --etcd-username and the "
                              "password in a file named by --etcd-password-file")
        try:
            url = urlsplit(item if "://" in item else f"http://{item}")
            hostname = url.hostname
        except ValueError:
            raise ConfigError(f"--etcd-endpoints: {item!r} is not an http(s)://HOST:PORT URL"
                              ) from None
        if url.scheme not in ("http", "https") or not hostname:
            raise ConfigError(f"--etcd-endpoints: {item!r} is not an http(s)://HOST:PORT URL")
        try:
            port = url.port or 2379
        except ValueError:
            raise ConfigError(f"--etcd-endpoints: {item!r} has a bad port") from None
        out.append(Endpoint(host=hostname, port=port, tls=url.scheme == "https"))
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
