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
from leaseagent.files import exposure

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


def check_credential_files(settings: EtcdSettings) -> list[str]:
    """The files that hold credentials, as kept on disk. Refused (ConfigError, one line
    naming the flag and the path): a password file another user can read or change
    (ours alone: flannel has no such file; keep it 0600 or 0640, root's). Warned (the
    lines returned): a CA, certificate or key file another user can change, or a key
    file others can read (flannel accepts them, so a flannel user's files keep working)."""
    warnings: list[str] = []
    if settings.password_file is not None:
        try:
            problems = exposure(settings.password_file, secret=True)
        except OSError:
            problems = []  # unreadable or missing: said when it is read
        if problems:
            raise ConfigError(f"--etcd-password-file: {settings.password_file} is "
                              f"{', '.join(problems)}; keep it root's and mode 0600")
    for flag, path, secret in (("--etcd-cafile", settings.cafile, False),
                               ("--etcd-certfile", settings.certfile, False),
                               ("--etcd-keyfile", settings.keyfile, True)):
        if path is None:
            continue
        try:
            problems = exposure(path, secret=secret)
        except OSError:
            continue
        if problems:
            warnings.append(f"{flag}: {path} is {', '.join(problems)}; another user could "
                            + ("read the key or " if "readable by others" in problems else "")
                            + "replace it (keep it root's, mode 0600 for a key)")
    return warnings


@dataclass(frozen=True)
class EtcdSettings:
    endpoints: str = DEFAULT_ENDPOINTS
    cafile: Path | None = None
    certfile: Path | None = None
    keyfile: Path | None = None
    username: str | None = None
    password_file: Path | None = None
    timeout: float = DEFAULT_TIMEOUT
