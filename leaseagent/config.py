"""Agent and leasectl settings: flags, LEASEAGENT_* environment variables, validated once.

Every flag `--some-name` can also be given as `LEASEAGENT_SOME_NAME`; a flag
on the command line wins. Errors are ConfigError with a one-line message
naming the flag (or variable) and the bad value. Secrets are only ever read
from files (`--etcd-password-file`): there is no flag that takes a password.
"""

from __future__ import annotations

import argparse
import os
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path
from typing import NoReturn

from leaseagent.core.leases import DEFAULT_PREFIX
from leaseagent.dataplane.base import DEFAULT_RESYNC_SECONDS, DEFAULT_ROUTE_PROTOCOL
from leaseagent.errors import ConfigError
from leaseagent.store.settings import DEFAULT_ENDPOINTS, DEFAULT_TIMEOUT, EtcdSettings, parse_endpoints

DEFAULT_SUBNET_FILE = Path("/run/leaseagent/subnet.env")
DEFAULT_STATE_DIR = Path("/var/lib/leaseagent")
DEFAULT_LEASE_TTL = 24 * 3600
MIN_LEASE_TTL = 2  # etcd refuses less
DEFAULT_PEER_HOLD_SECONDS = 5.0


class Parser(argparse.ArgumentParser):
    """argparse without echoing values it does not know: a mistyped flag may be
    followed by a secret (`--etcd-password hunter2`), which must not reach a log."""

    def error(self, message: str) -> NoReturn:
        prefix = "unrecognized arguments: "
        if message.startswith(prefix):
            flags = [t.split("=", 1)[0] for t in message[len(prefix):].split() if t.startswith("-")]
            message = prefix + (" ".join(flags) if flags else "(values not shown)")
        super().error(message)


def env_name(flag: str) -> str:
    return "LEASEAGENT_" + flag.lstrip("-").replace("-", "_").upper()


class _EnvDefaults:
    """Fills argparse defaults from LEASEAGENT_* variables, remembering where each came from."""

    def __init__(self, parser: argparse.ArgumentParser, environ: Mapping[str, str]) -> None:
        self._parser = parser
        self._environ = environ

    def add(self, flag: str, *, default: object = None, flag_type: str = "str", **kw: object) -> None:
        value: object = default
        raw = self._environ.get(env_name(flag))
        if raw is not None and raw != "":
            if flag_type == "bool":
                low = raw.strip().lower()
                if low in ("1", "true", "yes", "on"):
                    value = True
                elif low in ("0", "false", "no", "off"):
                    value = False
                else:
                    raise ConfigError(f"{env_name(flag)}={raw!r}: must be true or false")
            else:
                choices = kw.get("choices")
                if isinstance(choices, list) and raw not in choices:
                    raise ConfigError(f"{env_name(flag)}={raw!r}: must be one of {', '.join(choices)}")
                value = raw
        if flag_type == "bool":
            self._parser.add_argument(flag, action=argparse.BooleanOptionalAction,
                                      default=value, **kw)  # type: ignore[arg-type]
        else:
            self._parser.add_argument(flag, default=value, **kw)  # type: ignore[arg-type]


def add_etcd_arguments(env: _EnvDefaults) -> None:
    env.add("--etcd-endpoints", default=DEFAULT_ENDPOINTS,
            help="comma-separated etcd URLs (http:// or https://); fails over between them")
    env.add("--etcd-prefix", default=DEFAULT_PREFIX, help="etcd key prefix (flannel's)")
    env.add("--etcd-cafile", help="CA certificate file for https:// endpoints")
    env.add("--etcd-certfile", help="client certificate file")
    env.add("--etcd-keyfile", help="client key file")
    env.add("--etcd-username", help="etcd user name")
    env.add("--etcd-password-file", help="file holding the etcd password (never a flag)")
    env.add("--etcd-timeout", default=f"{DEFAULT_TIMEOUT:g}", help="seconds an etcd request may take")


def _path(value: str | None) -> Path | None:
    return Path(value) if value else None


def _seconds(flag: str, raw: object, *, zero: bool = False) -> float:
    """A finite number of seconds, positive (or 0 when `zero`); ConfigError names the flag."""
    try:
        value = float(str(raw))
    except ValueError:
        raise ConfigError(f"{flag}={raw!r}: not a number") from None
    if not (value >= 0 if zero else value > 0) or value == float("inf"):
        raise ConfigError(f"{flag}={raw!r}: must be a number of seconds"
                          + (", 0 or more" if zero else " above 0"))
    return value


def etcd_settings(ns: argparse.Namespace) -> EtcdSettings:
    parse_endpoints(ns.etcd_endpoints)  # validate early, with the flag's name
    prefix = str(ns.etcd_prefix)
    if not prefix.startswith("/") or (prefix.endswith("/") and prefix != "/"):
        raise ConfigError(f"--etcd-prefix={prefix!r}: must start with / and not end with /")
    if ns.etcd_password_file and not ns.etcd_username:
        raise ConfigError("--etcd-password-file needs --etcd-username")
    return EtcdSettings(
        endpoints=ns.etcd_endpoints,
        cafile=_path(ns.etcd_cafile),
        certfile=_path(ns.etcd_certfile),
        keyfile=_path(ns.etcd_keyfile),
        username=ns.etcd_username or None,
        password_file=_path(ns.etcd_password_file),
        timeout=_seconds("--etcd-timeout", ns.etcd_timeout),
    )


@dataclass(frozen=True)
class AgentConfig:
    etcd: EtcdSettings
    prefix: str
    iface: str | None
    public_ip: IPv4Address | None
    subnet_file: Path
    state_dir: Path
    lease_ttl: int
    release_on_exit: bool
    node_id: str
    metrics_addr: tuple[str, int] | None
    log_level: str
    log_format: str
    route_protocol: int
    resync_interval: float
    docker_opts_file: Path | None = None
    peer_hold_time: float = DEFAULT_PEER_HOLD_SECONDS


def default_node_id() -> str:
    try:
        machine_id = Path("/etc/machine-id").read_text().strip()
    except OSError:
        machine_id = ""
    return machine_id or socket.gethostname()


def _parse_hostport(flag: str, raw: str) -> tuple[str, int]:
    host, sep, port = raw.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{flag}={raw!r}: must be HOST:PORT")
    return host.strip("[]") or "0.0.0.0", int(port)


def add_host_arguments(env: _EnvDefaults) -> None:
    """The flags that say how the agent sees this host (shared with `leasectl doctor`)."""
    env.add("--iface", help="underlay interface, by name or IP (default: that of the default route)")
    env.add("--public-ip", help="IPv4 address published to peers (default: the interface's first)")
    env.add("--subnet-file", default=str(DEFAULT_SUBNET_FILE), help="where to write subnet.env")
    env.add("--state-dir", default=str(DEFAULT_STATE_DIR), help="where to keep state (VtepMAC)")
    env.add("--route-protocol", default=str(DEFAULT_ROUTE_PROTOCOL),
            help="rtnetlink protocol number marking the routes this agent owns")


def parse_public_ip(raw: str | None) -> IPv4Address | None:
    if not raw:
        return None
    try:
        return IPv4Address(raw)
    except ValueError:
        raise ConfigError(f"--public-ip={raw!r}: not an IPv4 address") from None


def parse_route_protocol(raw: object) -> int:
    try:
        protocol = int(str(raw))
    except ValueError:
        protocol = -1
    if not 5 <= protocol <= 255:
        raise ConfigError(f"--route-protocol={raw!r}: must be a number from 5 to 255")
    return protocol


def agent_parser(environ: Mapping[str, str]) -> argparse.ArgumentParser:
    parser = Parser(
        prog="leaseagent",
        # No prefix matching: `--etcd-password SECRET` must be an error, not a
        # silent `--etcd-password-file SECRET` whose "cannot read" message logs it.
        allow_abbrev=False,
        description="Per-host subnet lease in etcd, subnet.env for dockerd, and the data plane "
        "to every other host. Every flag may also be set as LEASEAGENT_<FLAG_NAME>.",
    )
    env = _EnvDefaults(parser, environ)
    add_etcd_arguments(env)
    add_host_arguments(env)
    env.add("--lease-ttl", default=str(DEFAULT_LEASE_TTL), help="lease TTL in seconds")
    env.add("--release-on-exit", default=False, flag_type="bool",
            help="revoke the lease when stopping (default: keep it for the restart)")
    env.add("--node-id", help="stable id of this host (default: /etc/machine-id, else hostname)")
    env.add("--metrics-addr", help="HOST:PORT for /metrics, /healthz, /readyz (default: off)")
    env.add("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    env.add("--log-format", default="text", choices=["text", "json"])
    env.add("--docker-opts-file",
            help="also write Docker's options here, as `leasectl docker-opts` does (default: off)")
    env.add("--resync-interval", default=f"{DEFAULT_RESYNC_SECONDS:g}",
            help="seconds between full data-plane resyncs")
    env.add("--peer-hold-time", default=f"{DEFAULT_PEER_HOLD_SECONDS:g}",
            help="seconds a peer whose lease vanished keeps its kernel entries in case it comes "
            "back (0: remove at once); a lease released on purpose is removed at once")
    return parser


def parse_agent_config(argv: Sequence[str], environ: Mapping[str, str] | None = None) -> AgentConfig:
    environ = os.environ if environ is None else environ
    ns = agent_parser(environ).parse_args(list(argv))
    etcd = etcd_settings(ns)
    try:
        ttl = int(ns.lease_ttl)
    except ValueError:
        raise ConfigError(f"--lease-ttl={ns.lease_ttl!r}: not a whole number of seconds") from None
    if ttl < MIN_LEASE_TTL:
        raise ConfigError(f"--lease-ttl={ttl}: must be at least {MIN_LEASE_TTL} seconds (etcd's floor)")
    public_ip = parse_public_ip(ns.public_ip)
    route_protocol = parse_route_protocol(ns.route_protocol)
    node_id = ns.node_id or default_node_id()
    if any(c.isspace() for c in node_id) or len(node_id) > 253:
        raise ConfigError(f"--node-id={node_id!r}: must be at most 253 characters, no spaces")
    return AgentConfig(
        etcd=etcd,
        prefix=str(ns.etcd_prefix),
        iface=ns.iface or None,
        public_ip=public_ip,
        subnet_file=Path(ns.subnet_file),
        state_dir=Path(ns.state_dir),
        lease_ttl=ttl,
        release_on_exit=bool(ns.release_on_exit),
        node_id=node_id,
        metrics_addr=_parse_hostport("--metrics-addr", ns.metrics_addr) if ns.metrics_addr else None,
        log_level=ns.log_level,
        log_format=ns.log_format,
        route_protocol=route_protocol,
        resync_interval=_seconds("--resync-interval", ns.resync_interval),
        docker_opts_file=Path(ns.docker_opts_file) if ns.docker_opts_file else None,
        peer_hold_time=_seconds("--peer-hold-time", ns.peer_hold_time, zero=True),
    )
