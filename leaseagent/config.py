"""Agent and leasectl settings: flags, LEASEAGENT_* environment variables, validated once.

Every flag `--some-name` can also be given as `LEASEAGENT_SOME_NAME`; a flag
on the command line wins. Errors are ConfigError with a one-line message
naming what the operator wrote (the flag, or the variable when that is where
the value came from) and the bad value. A LEASEAGENT_* variable that sets
nothing is reported (`unknown_variables`), so a typo in /etc/default/leaseagent
is not silent. Secrets are only ever read from files (`--etcd-password-file`):
there is no flag that takes a password. `--help` shows every default and
variable; a mistyped flag is one line and exit status 2.
"""

from __future__ import annotations

import argparse
import difflib
import os
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path
from typing import NoReturn

from leaseagent.core.leases import DEFAULT_PREFIX, unusable_ip_reason
from leaseagent.core.rules import TrafficSettings
from leaseagent.dataplane.base import DEFAULT_RESYNC_SECONDS, DEFAULT_ROUTE_PROTOCOL
from leaseagent.dataplane.firewall import DEFAULT_CHECK_SECONDS
from leaseagent.errors import ConfigError
from leaseagent.store.settings import DEFAULT_ENDPOINTS, DEFAULT_TIMEOUT, EtcdSettings, parse_endpoints

DEFAULT_SUBNET_FILE = Path("/run/leaseagent/subnet.env")
DEFAULT_STATE_DIR = Path("/var/lib/leaseagent")
DEFAULT_LEASE_TTL = 24 * 3600
MIN_LEASE_TTL = 2  # etcd refuses less
DEFAULT_PEER_HOLD_SECONDS = 5.0


# Variables that are not flags but are read by our own scripts (deploy/lab, the tests).
OTHER_VARIABLES = frozenset({"LEASEAGENT_PYTHON", "LEASEAGENT_FULL"})


class Parser(argparse.ArgumentParser):
    """argparse that says what is wrong in one line, without echoing values it does not
    know: a mistyped flag may be followed by a secret (`--etcd-password hunter2`), which
    must not reach a log."""

    def error(self, message: str) -> NoReturn:
        prefix = "unrecognized arguments: "
        if message.startswith(prefix):
            flags = [t.split("=", 1)[0] for t in message[len(prefix):].split() if t.startswith("-")]
            message = prefix + (" ".join(flags) if flags else "(values not shown)")
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog.split()[0]} --help)\n")


def new_parser(prog: str, description: str, *, epilog: str | None = None) -> Parser:
    from leaseagent import __version__

    parser = Parser(
        prog=prog,
        # No prefix matching: `--etcd-password SECRET` must be an error, not a
        # silent `--etcd-password-file SECRET` whose "cannot read" message logs it.
        allow_abbrev=False,
        description=description,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def env_name(flag: str) -> str:
    return "LEASEAGENT_" + flag.lstrip("-").replace("-", "_").upper()


class _EnvDefaults:
    """Adds flags whose defaults may come from LEASEAGENT_* variables, and remembers which
    did, so an error names what the operator wrote: the flag or the variable."""

    def __init__(self, parser: argparse.ArgumentParser, environ: Mapping[str, str]) -> None:
        self._parser = parser
        self._environ = environ
        self.from_env: dict[str, str] = {}  # dest -> the variable that set it

    def add(self, flag: str, *, default: object = None, flag_type: str = "str", **kw: object) -> None:
        value: object = default
        var = env_name(flag)
        raw = self._environ.get(var)
        if raw is not None and raw != "":
            if flag_type == "bool":
                low = raw.strip().lower()
                if low in ("1", "true", "yes", "on"):
                    value = True
                elif low in ("0", "false", "no", "off"):
                    value = False
                else:
                    raise ConfigError(f"{var}={raw!r}: must be true or false")
            else:
                choices = kw.get("choices")
                if isinstance(choices, list) and raw not in choices:
                    raise ConfigError(f"{var}={raw!r}: must be one of {', '.join(choices)}")
                value = raw
            self.from_env[flag.lstrip("-").replace("-", "_")] = var
        shown = "off" if default is None or default is False else ("on" if default is True else default)
        kw["help"] = f"{kw.get('help', '')} [default: {shown}; ${var}]".lstrip()
        if flag_type == "bool":
            self._parser.add_argument(flag, action=argparse.BooleanOptionalAction,
                                      default=value, **kw)  # type: ignore[arg-type]
        else:
            self._parser.add_argument(flag, default=value, **kw)  # type: ignore[arg-type]

    def note_origins(self, ns: argparse.Namespace, argv: Sequence[str]) -> None:
        """Record on `ns` which flags were set by a variable (and not on the command line)."""
        given = {a.split("=", 1)[0] for a in argv if a.startswith("--")}
        origins = dict(getattr(ns, "_origins", {}))
        for dest, var in self.from_env.items():
            if "--" + dest.replace("_", "-") not in given:
                origins[dest] = var
        ns._origins = origins


def source(ns: argparse.Namespace, flag: str) -> str:
    """The name to put in an error about `flag`: the variable if that is where it came from."""
    return str(getattr(ns, "_origins", {}).get(flag.lstrip("-").replace("-", "_"), flag))


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """One warning per LEASEAGENT_* variable that sets nothing (a typo is not silent)."""
    known = {env_name(opt) for action in agent_parser({})._actions
             for opt in action.option_strings if opt.startswith("--")} | OTHER_VARIABLES
    out = []
    for name in sorted(environ):
        if name.startswith("LEASEAGENT_") and name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            out.append(f"ignoring {name}: no such setting{hint}")
    return out


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


def _seconds(name: str, raw: object, *, zero: bool = False) -> float:
    """A finite number of seconds, positive (or 0 when `zero`); ConfigError names the setting."""
    try:
        value = float(str(raw))
    except ValueError:
        raise ConfigError(f"{name}={raw!r}: not a number") from None
    if not (value >= 0 if zero else value > 0) or value == float("inf"):
        raise ConfigError(f"{name}={raw!r}: must be a number of seconds"
                          + (", 0 or more" if zero else " above 0"))
    return value


def etcd_settings(ns: argparse.Namespace) -> EtcdSettings:
    try:
        parse_endpoints(ns.etcd_endpoints)  # validate early, with the setting's name
    except ConfigError as exc:
        raise ConfigError(str(exc).replace("--etcd-endpoints", source(ns, "--etcd-endpoints"), 1)
                          ) from None
    prefix = str(ns.etcd_prefix)
    if not prefix.startswith("/") or (prefix.endswith("/") and prefix != "/"):
        raise ConfigError(f"{source(ns, '--etcd-prefix')}={prefix!r}: must start with / and "
                          "not end with /")
    if ns.etcd_password_file and not ns.etcd_username:
        raise ConfigError(f"{source(ns, '--etcd-password-file')} needs --etcd-username")
    return EtcdSettings(
        endpoints=ns.etcd_endpoints,
        cafile=_path(ns.etcd_cafile),
        certfile=_path(ns.etcd_certfile),
        keyfile=_path(ns.etcd_keyfile),
        username=ns.etcd_username or None,
        password_file=_path(ns.etcd_password_file),
        timeout=_seconds(source(ns, "--etcd-timeout"), ns.etcd_timeout),
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
    iptables_resync: float = DEFAULT_CHECK_SECONDS  # iptables: seconds between rule checks
    allow_any_public_ip: bool = False
    public_ipv6: IPv6Address | None = None  # used when the network config has IPv6
    # Which traffic rules; `nftables` comes from the network config (EnableNFTables).
    traffic: TrafficSettings = field(default_factory=TrafficSettings)


def default_node_id() -> str:
    try:
        machine_id = Path("/etc/machine-id").read_text().strip()
    except OSError:
        machine_id = ""
    return machine_id or socket.gethostname()


def parse_hostport(name: str, raw: str) -> tuple[str, int]:
    host, sep, port = raw.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{name}={raw!r}: must be HOST:PORT")
    return host.strip("[]") or "0.0.0.0", int(port)


def add_host_arguments(env: _EnvDefaults) -> None:
    """The flags that say how the agent sees this host (shared with `leasectl doctor`)."""
    env.add("--iface", help="underlay interface, by name or IP (off: that of the default route)")
    env.add("--public-ip", help="IPv4 address published to peers (off: the interface's first)")
    env.add("--public-ipv6", help="IPv6 address published to peers when the network config "
            "has IPv6 (off: the interface's first global one)")
    env.add("--subnet-file", default=str(DEFAULT_SUBNET_FILE), help="where to write subnet.env")
    env.add("--state-dir", default=str(DEFAULT_STATE_DIR), help="where to keep state (VtepMAC)")
    env.add("--route-protocol", default=str(DEFAULT_ROUTE_PROTOCOL),
            help="rtnetlink protocol number marking the routes this agent owns")


def add_traffic_arguments(env: _EnvDefaults) -> None:
    """The flags that say which traffic rules the agent keeps (shared with `leasectl doctor`,
    which compares them, and `leasectl cleanup`)."""
    env.add("--ip-masq", default=False, flag_type="bool",
            help="masquerade traffic that leaves the cluster network (flannel's --ip-masq); "
            "subnet.env says FLANNEL_IPMASQ=true and Docker's options --ip-masq=false")
    env.add("--ip-masq-fully-random-disable", default=False, flag_type="bool",
            help="masquerade without --random-fully (nftables: fully-random)")
    env.add("--iptables-forward-rules", default=True, flag_type="bool",
            help="accept forwarded traffic from and to the cluster network, whatever the FORWARD "
            "policy (flannel's flag; with nftables too)")
    env.add("--vxlan-peer-filter", default=True, flag_type="bool",
            help="vxlan: accept UDP to the VXLAN port only from the current peers' PublicIPs")


def traffic_settings(ns: argparse.Namespace, *, nftables: bool) -> TrafficSettings:
    return TrafficSettings(ip_masq=bool(ns.ip_masq),
                           random_fully=not ns.ip_masq_fully_random_disable,
                           forward=bool(ns.iptables_forward_rules),
                           peer_filter=bool(ns.vxlan_peer_filter), nftables=nftables)


def parse_public_ip(raw: str | None, *, name: str = "--public-ip", allow_any: bool = False,
                    version: int = 4) -> IPv4Address | IPv6Address | None:
    """--public-ip (or, version 6, --public-ipv6) as an address peers can use
    (leaseagent.core.leases: the rule they apply)."""
    if not raw:
        return None
    try:
        ip = IPv4Address(raw) if version == 4 else IPv6Address(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r}: not an IPv{version} address") from None
    why = unusable_ip_reason(ip)
    if why and not allow_any:
        raise ConfigError(f"{name}={raw!r}: a {why} address; peers would refuse the lease "
                          "(with the alloc backend, --allow-any-public-ip publishes it anyway)")
    return ip


def parse_route_protocol(raw: object, *, name: str = "--route-protocol") -> int:
    try:
        protocol = int(str(raw))
    except ValueError:
        protocol = -1
    if not 5 <= protocol <= 255:
        raise ConfigError(f"{name}={raw!r}: must be a number from 5 to 255")
    return protocol


AGENT_DESCRIPTION = """\
Per-host subnet lease in etcd (flannel's format), subnet.env and Docker's options for
dockerd, and the data plane (vxlan or host-gw) to every other host.

Every flag may also be set as an environment variable LEASEAGENT_<FLAG> (shown
after each default, e.g. --lease-ttl as $LEASEAGENT_LEASE_TTL); a flag on the
command line wins. The systemd unit reads them from /etc/default/leaseagent."""

AGENT_EPILOG = """\
exit status:
  0  stopped by SIGTERM or SIGINT
  1  a fatal error at run time (subnet range exhausted, etcd refused our credentials,
     a task died)
  2  a configuration error (a flag, variable, file or interface); not worth a restart"""


def agent_parser(environ: Mapping[str, str]) -> argparse.ArgumentParser:
    parser = new_parser("leaseagent", AGENT_DESCRIPTION, epilog=AGENT_EPILOG)
    env = _EnvDefaults(parser, environ)
    add_etcd_arguments(env)
    add_host_arguments(env)
    add_traffic_arguments(env)
    env.add("--lease-ttl", default=str(DEFAULT_LEASE_TTL), help="lease TTL in seconds")
    env.add("--release-on-exit", default=False, flag_type="bool",
            help="give the lease up when stopping (off: keep it for the restart)")
    env.add("--node-id", help="stable id of this host (off: /etc/machine-id, else the hostname)")
    env.add("--metrics-addr", help="HOST:PORT for /metrics, /healthz, /readyz")
    env.add("--log-level", default="info", choices=["debug", "info", "warning", "error"],
            help="least important log level shown")
    env.add("--log-format", default="text", choices=["text", "json"],
            help="text lines, or one JSON object per line")
    env.add("--docker-opts-file",
            help="also write Docker's options here, as `leasectl docker-opts` does")
    env.add("--resync-interval", default=f"{DEFAULT_RESYNC_SECONDS:g}",
            help="seconds between full data-plane resyncs")
    env.add("--iptables-resync", default=f"{DEFAULT_CHECK_SECONDS:g}",
            help="iptables mode: seconds between checks of the traffic rules (flannel's flag; "
            "nftables tells of changes and needs none)")
    env.add("--peer-hold-time", default=f"{DEFAULT_PEER_HOLD_SECONDS:g}",
            help="seconds a peer whose lease vanished keeps its kernel entries in case it comes "
            "back (0: remove at once); a lease released on purpose is removed at once")
    env.add("--allow-any-public-ip", default=False, flag_type="bool",
            help="with the alloc backend, publish --public-ip even if it is loopback, "
            "link-local, multicast, ... (peers will call the lease invalid)")
    parser.set_defaults(_env=env)
    return parser


def parse_agent_config(argv: Sequence[str], environ: Mapping[str, str] | None = None) -> AgentConfig:
    environ = os.environ if environ is None else environ
    parser = agent_parser(environ)
    ns = parser.parse_args(list(argv))
    ns._env.note_origins(ns, argv)
    etcd = etcd_settings(ns)
    try:
        ttl = int(ns.lease_ttl)
    except ValueError:
        raise ConfigError(f"{source(ns, '--lease-ttl')}={ns.lease_ttl!r}: not a whole number "
                          "of seconds") from None
    if ttl < MIN_LEASE_TTL:
        raise ConfigError(f"{source(ns, '--lease-ttl')}={ttl}: must be at least {MIN_LEASE_TTL} "
                          "seconds (etcd's floor)")
    allow_any = bool(ns.allow_any_public_ip)
    public_ip = parse_public_ip(ns.public_ip, name=source(ns, "--public-ip"), allow_any=allow_any)
    public_ipv6 = parse_public_ip(ns.public_ipv6, name=source(ns, "--public-ipv6"),
                                  allow_any=allow_any, version=6)
    assert not isinstance(public_ip, IPv6Address) and not isinstance(public_ipv6, IPv4Address)
    route_protocol = parse_route_protocol(ns.route_protocol, name=source(ns, "--route-protocol"))
    node_id = ns.node_id or default_node_id()
    if any(c.isspace() for c in node_id) or len(node_id) > 253:
        raise ConfigError(f"{source(ns, '--node-id')}={node_id!r}: must be at most 253 "
                          "characters, no spaces")
    return AgentConfig(
        etcd=etcd,
        prefix=str(ns.etcd_prefix),
        iface=ns.iface or None,
        public_ip=public_ip,
        public_ipv6=public_ipv6,
        subnet_file=Path(ns.subnet_file),
        state_dir=Path(ns.state_dir),
        lease_ttl=ttl,
        release_on_exit=bool(ns.release_on_exit),
        node_id=node_id,
        metrics_addr=(parse_hostport(source(ns, "--metrics-addr"), ns.metrics_addr)
                      if ns.metrics_addr else None),
        log_level=ns.log_level,
        log_format=ns.log_format,
        route_protocol=route_protocol,
        resync_interval=_seconds(source(ns, "--resync-interval"), ns.resync_interval),
        docker_opts_file=Path(ns.docker_opts_file) if ns.docker_opts_file else None,
        peer_hold_time=_seconds(source(ns, "--peer-hold-time"), ns.peer_hold_time, zero=True),
        iptables_resync=_seconds(source(ns, "--iptables-resync"), ns.iptables_resync),
        allow_any_public_ip=allow_any,
        traffic=traffic_settings(ns, nftables=False),
    )
