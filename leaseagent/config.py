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
import os
import re
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address, ip_address
from pathlib import Path
from typing import NoReturn

from leaseagent.core.leases import DEFAULT_PREFIX, unusable_ip_reason
from leaseagent.core.rules import TrafficSettings
from leaseagent.dataplane.base import (
    DEFAULT_RESYNC_SECONDS,
    DEFAULT_ROUTE_PROTOCOL,
    InterfaceChoice,
)
from leaseagent.dataplane.firewall import DEFAULT_CHECK_SECONDS
from leaseagent.errors import ConfigError
from leaseagent.store.settings import DEFAULT_ENDPOINTS, DEFAULT_TIMEOUT, EtcdSettings, parse_endpoints

DEFAULT_SUBNET_FILE = Path("/run/leaseagent/subnet.env")
DEFAULT_STATE_DIR = Path("/var/lib/leaseagent")
DEFAULT_LEASE_TTL = 24 * 3600
MIN_LEASE_TTL = 2  # etcd refuses less
DEFAULT_PEER_HOLD_SECONDS = 5.0
# Between checks of the watcher's lease count against etcd's (leaseagent.agent.watching).
DEFAULT_LEASE_CHECK_SECONDS = 300.0


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


def flannel_env_name(flag: str) -> str:
    """flanneld's variable for `flag` (coreos/pkg/flagutil.SetFlagsFromEnv, prefix FLANNELD)."""
    return "FLANNELD_" + flag.lstrip("-").replace("-", "_").upper()


# strconv.ParseBool, which Go's flag package uses for booleans.
GO_TRUE = frozenset({"1", "t", "T", "TRUE", "true", "True"})
GO_FALSE = frozenset({"0", "f", "F", "FALSE", "false", "False"})


class _Repeated(argparse.Action):
    """A flag that may be given several times, kept in order (flanneld's flagSlice). The
    command line's values replace a variable's, as flanneld applies FLANNELD_* only to
    flags the command line did not set."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: object, option_string: str | None = None) -> None:
        mark = f"_{self.dest}_given"
        current = getattr(namespace, self.dest) if getattr(namespace, mark, False) else []
        setattr(namespace, mark, True)
        setattr(namespace, self.dest, [*current, values])


class _EnvDefaults:
    """Adds flags whose defaults may come from LEASEAGENT_* variables (and, for a flag
    flanneld has, from its FLANNELD_* variable, read with Go's syntax), and remembers
    which did, so an error names what the operator wrote: the flag or the variable."""

    def __init__(self, parser: argparse.ArgumentParser, environ: Mapping[str, str]) -> None:
        self._parser = parser
        self._environ = environ
        self.from_env: dict[str, str] = {}  # dest -> the variable that set it

    def _variable(self, flag: str, flag_type: str, choices: object, flannel: bool
                  ) -> tuple[str, object] | None:
        """(variable, value) of the variable that sets `flag`: LEASEAGENT_* first."""
        for var in (env_name(flag), *((flannel_env_name(flag),) if flannel else ())):
            raw = self._environ.get(var)
            if raw is None or raw == "":
                continue
            go = var.startswith("FLANNELD_")
            if flag_type == "bool":
                low = raw.strip().lower()
                if raw in GO_TRUE or (not go and low in ("1", "true", "yes", "on")):
                    return var, True
                if raw in GO_FALSE or (not go and low in ("0", "false", "no", "off")):
                    return var, False
                raise ConfigError(f"{var}={raw!r}: must be true or false")
            if isinstance(choices, list) and raw not in choices:
                raise ConfigError(f"{var}={raw!r}: must be one of {', '.join(choices)}")
            return var, [raw] if flag_type == "list" else raw
        return None

    def add(self, flag: str, *, default: object = None, flag_type: str = "str",
            flannel: bool = False, **kw: object) -> None:
        """`flannel`: flanneld has this flag, so FLANNELD_<FLAG> sets it too."""
        value: object = default if flag_type != "list" else list(default or [])  # type: ignore[call-overload]
        found = self._variable(flag, flag_type, kw.get("choices"), flannel)
        if found is not None:
            var, value = found
            self.from_env[flag.lstrip("-").replace("-", "_")] = var
        shown = "off" if default is None or default is False else ("on" if default is True else default)
        names = "$" + env_name(flag) + (f", ${flannel_env_name(flag)}" if flannel else "")
        kw["help"] = f"{kw.get('help', '')} [default: {shown}; {names}]".lstrip()
        if flag_type == "bool":
            self._parser.add_argument(flag, action=argparse.BooleanOptionalAction,
                                      default=value, **kw)  # type: ignore[arg-type]
        elif flag_type == "list":
            self._parser.add_argument(flag, action=_Repeated, default=value,
                                      **kw)  # type: ignore[arg-type]
        else:
            self._parser.add_argument(flag, default=value, **kw)  # type: ignore[arg-type]

    def note_origins(self, ns: argparse.Namespace, argv: Sequence[str]) -> None:
        """Record on `ns` which flags were set by a variable (and not on the command line)."""
        given = {a.split("=", 1)[0].replace("--no-", "--", 1) for a in argv if a.startswith("--")}
        origins = dict(getattr(ns, "_origins", {}))
        for dest, var in self.from_env.items():
            if "--" + dest.replace("_", "-") not in given:
                origins[dest] = var
        ns._origins = origins


def source(ns: argparse.Namespace, flag: str) -> str:
    """The name to put in an error about `flag`: the variable if that is where it came from."""
    return str(getattr(ns, "_origins", {}).get(flag.lstrip("-").replace("-", "_"), flag))


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """One warning per LEASEAGENT_* or FLANNELD_* variable that sets nothing (a typo is not
    silent; flanneld ignores such a FLANNELD_* variable in silence)."""
    options = [opt for action in agent_parser({})._actions for opt in action.option_strings
               if opt.startswith("--")]
    known = ({env_name(opt) for opt in options} | OTHER_VARIABLES
             | {flannel_env_name(f.name) for f in FLANNEL_FLAGS})
    out = []
    for name in sorted(environ):
        if name.startswith(("LEASEAGENT_", "FLANNELD_")) and name not in known:
            import difflib  # only for a mistyped variable: not in every agent's memory

            close = difflib.get_close_matches(name, sorted(known), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            out.append(f"ignoring {name}: no such setting{hint}")
    return out


# flanneld's --etcd-password (and FLANNELD_ETCD_PASSWORD): refused, never echoed.
PASSWORD_FLAG = "--etcd-password"
PASSWORD_REFUSAL = ("{}: leaseagent reads the etcd password only from a file; put it in a "
                    "file only root can read and pass --etcd-password-file")


def add_etcd_arguments(env: _EnvDefaults) -> None:
    """The etcd flags (the agent's and leasectl's); flanneld's FLANNELD_ETCD_PASSWORD is
    refused here, for both (its flag, --etcd-password, in go_style)."""
    if env._environ.get(flannel_env_name(PASSWORD_FLAG)):
        raise ConfigError(PASSWORD_REFUSAL.format(flannel_env_name(PASSWORD_FLAG)))
    env.add("--etcd-endpoints", default=DEFAULT_ENDPOINTS, flannel=True,
            help="comma-separated etcd URLs (http:// or https://); fails over between them")
    env.add("--etcd-prefix", default=DEFAULT_PREFIX, flannel=True, help="etcd key prefix (flannel's)")
    env.add("--etcd-cafile", flannel=True, help="CA certificate file for https:// endpoints")
    env.add("--etcd-certfile", flannel=True, help="client certificate file")
    env.add("--etcd-keyfile", flannel=True, help="client key file")
    env.add("--etcd-username", flannel=True, help="etcd user name")
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
    iface: InterfaceChoice
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
    lease_check_interval: float = DEFAULT_LEASE_CHECK_SECONDS  # 0: never
    iptables_resync: float = DEFAULT_CHECK_SECONDS  # iptables: seconds between rule checks
    allow_any_public_ip: bool = False
    public_ipv6: IPv6Address | None = None  # used when the network config has IPv6
    # --subnet-lease-renew-margin in seconds: renew at least this long before expiry
    # (None: not given; renewals come every TTL/3 regardless).
    renew_margin: float | None = None
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
    env.add("--iface", flag_type="list", flannel=True,
            help="underlay interface, by name or IP; may be repeated: the first that matches "
            "wins (off: that of the default route)")
    env.add("--iface-regex", flag_type="list", flannel=True,
            help="regular expression for the underlay interface's IPv4 address, else its "
            "name; may be repeated; tried after every --iface")
    env.add("--iface-can-reach", flannel=True,
            help="the underlay interface is the one the kernel routes this address through; "
            "tried last")
    env.add("--public-ip", flannel=True,
            help="IPv4 address published to peers (off: the interface's first)")
    env.add("--public-ipv6", flannel=True, help="IPv6 address published to peers when the "
            "network config has IPv6 (off: the interface's first global one)")
    env.add("--subnet-file", default=str(DEFAULT_SUBNET_FILE), flannel=True,
            help="where to write subnet.env (flanneld's default: /run/flannel/subnet.env)")
    env.add("--state-dir", default=str(DEFAULT_STATE_DIR), help="where to keep state (VtepMAC)")
    env.add("--route-protocol", default=str(DEFAULT_ROUTE_PROTOCOL),
            help="rtnetlink protocol number marking the routes this agent owns")


def add_traffic_arguments(env: _EnvDefaults) -> None:
    """The flags that say which traffic rules the agent keeps (shared with `leasectl doctor`,
    which compares them, and `leasectl cleanup`)."""
    env.add("--ip-masq", default=False, flag_type="bool", flannel=True,
            help="masquerade traffic that leaves the cluster network (flannel's --ip-masq); "
            "subnet.env says FLANNEL_IPMASQ=true and Docker's options --ip-masq=false")
    env.add("--ip-masq-fully-random-disable", default=False, flag_type="bool", flannel=True,
            help="masquerade without --random-fully (nftables: fully-random)")
    env.add("--iptables-forward-rules", default=True, flag_type="bool", flannel=True,
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
    env.add("--iptables-resync", default=f"{DEFAULT_CHECK_SECONDS:g}", flannel=True,
            help="iptables mode: seconds between checks of the traffic rules (flannel's flag; "
            "nftables tells of changes and needs none)")
    env.add("--peer-hold-time", default=f"{DEFAULT_PEER_HOLD_SECONDS:g}",
            help="seconds a peer whose lease vanished keeps its kernel entries in case it comes "
            "back (0: remove at once); a lease released on purpose is removed at once")
    env.add("--lease-check-interval", default=f"{DEFAULT_LEASE_CHECK_SECONDS:g}",
            help="seconds between checks of the leases known here against etcd's count (two "
            "count-only requests; a watch that missed an event lists again; 0: never)")
    env.add("--allow-any-public-ip", default=False, flag_type="bool",
            help="with the alloc backend, publish --public-ip even if it is loopback, "
            "link-local, multicast, ... (peers will call the lease invalid)")
    add_flanneld_arguments(parser, environ)
    parser.set_defaults(_env=env)
    return parser


# ------------------------------------------------------------------ flanneld's flags


@dataclass(frozen=True)
class FlannelFlag:
    """One of flanneld's flags (its main.go; FLANNELD_<NAME> sets it too): its Go type
    and default, what flanneld does with it, what leaseagent does, and the test that
    shows the two agree. docs/flannel.md is rendered from FLANNEL_FLAGS."""

    name: str
    go_type: str  # string, bool, int, or strings (repeatable: flanneld's flagSlice)
    default: str  # as flanneld's -help shows it
    meaning: str  # flanneld's
    ours: str  # leaseagent's
    test: str  # tests/unit/test_flanneld_flags.py::<test>, or another file::test


_KUBE_ONLY = "read only with --kube-subnet-mgr (refused): accepted and unused, as by flanneld"
FLANNEL_FLAGS: tuple[FlannelFlag, ...] = (
    FlannelFlag("etcd-endpoints", "string", "http://127.0.0.1:4001,http://127.0.0.1:2379",
                "comma-separated etcd URLs", "the same; default http://127.0.0.1:2379 (etcd's "
                "port since 2015; 4001 was its legacy one)", "test_etcd_flags_by_flannel_names"),
    FlannelFlag("etcd-prefix", "string", "/coreos.com/network", "etcd key prefix", "the same",
                "test_etcd_flags_by_flannel_names"),
    FlannelFlag("etcd-keyfile", "string", "", "TLS client key file", "the same",
                "test_etcd_flags_by_flannel_names"),
    FlannelFlag("etcd-certfile", "string", "", "TLS client certificate file", "the same",
                "test_etcd_flags_by_flannel_names"),
    FlannelFlag("etcd-cafile", "string", "", "TLS CA file", "the same",
                "test_etcd_flags_by_flannel_names"),
    FlannelFlag("etcd-username", "string", "", "etcd user name", "the same (with "
                "--etcd-password-file)", "test_etcd_flags_by_flannel_names"),
    FlannelFlag("etcd-password", "string", "", "etcd password", "refused, flag and variable: "
                "a password is read only from a file (--etcd-password-file)",
                "test_etcd_password_is_refused_without_echoing_it"),
    FlannelFlag("iface", "strings", "", "interface (name or IP); repeated: the first that "
                "matches", "the same", "test_repeated_iface_keeps_flannels_order"),
    FlannelFlag("iface-regex", "strings", "", "regex on the interfaces' IPs, then names; "
                "after --iface", "the same (Python's re: RE2's syntax for common patterns)",
                "tests/e2e/test_flanneld_host.py::test_iface_choice_in_flannels_order"),
    FlannelFlag("iface-can-reach", "string", "", "the interface of `ip route get <IP>`; last",
                "the same", "tests/e2e/test_flanneld_host.py::test_iface_choice_in_flannels_order"),
    FlannelFlag("subnet-file", "string", "/run/flannel/subnet.env", "where subnet.env goes",
                "the same; default /run/leaseagent/subnet.env (pass flanneld's path to keep "
                "its readers)", "test_flannel_flags_in_go_syntax"),
    FlannelFlag("public-ip", "string", "", "IPv4 address published to peers", "the same",
                "test_flannel_flags_in_go_syntax"),
    FlannelFlag("public-ipv6", "string", "", "IPv6 address published to peers", "the same",
                "test_flannel_flags_in_go_syntax"),
    FlannelFlag("subnet-lease-renew-margin", "int", "60", "renew the lease this many minutes "
                "before it expires (1..1439)", "the same range; renewed at least that long "
                "before expiry, and every TTL/3 at the latest (earlier than flanneld)",
                "test_renew_margin_in_minutes"),
    FlannelFlag("ip-masq", "bool", "false", "masquerade traffic leaving the network",
                "the same", "test_flannel_flags_in_go_syntax"),
    FlannelFlag("ip-masq-fully-random-disable", "bool", "false", "MASQUERADE without "
                "--random-fully", "the same", "test_flannel_flags_in_go_syntax"),
    FlannelFlag("kube-subnet-mgr", "bool", "false", "leases from the Kubernetes API",
                "false accepted; true refused (leaseagent keeps leases in etcd)",
                "test_kubernetes_flags"),
    FlannelFlag("kube-api-url", "string", "", "Kubernetes API URL", _KUBE_ONLY,
                "test_kubernetes_flags"),
    FlannelFlag("kube-annotation-prefix", "string", "flannel.alpha.coreos.com",
                "node annotation prefix", _KUBE_ONLY, "test_kubernetes_flags"),
    FlannelFlag("kubeconfig-file", "string", "", "kubeconfig path", _KUBE_ONLY,
                "test_kubernetes_flags"),
    FlannelFlag("net-config-path", "string", "/etc/kube-flannel/net-conf.json",
                "network config file (Kubernetes mode)", _KUBE_ONLY, "test_kubernetes_flags"),
    FlannelFlag("set-node-network-unavailable", "bool", "true", "Kubernetes node condition",
                _KUBE_ONLY, "test_kubernetes_flags"),
    FlannelFlag("version", "bool", "false", "print the version and exit", "the same "
                "(FLANNELD_VERSION is read after flanneld's check: no effect, nor here)",
                "test_version_and_help_in_go_syntax"),
    FlannelFlag("healthz-ip", "string", "0.0.0.0", "address of /healthz", "the address of "
                "/healthz, /readyz and /metrics when --healthz-port is set",
                "test_healthz_flags_serve_our_endpoints"),
    FlannelFlag("healthz-port", "int", "0", "port of /healthz (0: none); always answers 200",
                "the port of --metrics-addr; /healthz answers 200 only while the agent is "
                "healthy (flanneld's is always 200)", "test_healthz_flags_serve_our_endpoints"),
    FlannelFlag("iptables-resync", "int", "5", "seconds between iptables rule checks",
                "the same, default 5; fractions accepted", "test_flannel_flags_in_go_syntax"),
    FlannelFlag("iptables-forward-rules", "bool", "true", "accept rules in FORWARD",
                "the same (after DOCKER-USER, see docs/flannel.md)",
                "test_flannel_flags_in_go_syntax"),
    FlannelFlag("ip-blackhole-route", "bool", "false", "a blackhole route for the own "
                "subnet", "false accepted; true refused (not implemented: Docker's bridge "
                "route covers the subnet)", "test_blackhole_route_is_refused_when_true"),
    FlannelFlag("v", "int", "0", "klog verbosity", "above 0: --log-level debug (unless "
                "--log-level is given)", "test_klog_flags"),
    FlannelFlag("vmodule", "string", "", "klog per-file verbosity", "empty accepted; "
                "anything else refused (no per-file levels)", "test_klog_flags"),
    FlannelFlag("log_backtrace_at", "string", ":0", "klog: stack trace at file:line",
                "empty or :0 accepted; anything else refused", "test_klog_flags"),
)


def add_flanneld_arguments(parser: argparse.ArgumentParser, environ: Mapping[str, str]
                           ) -> None:
    """flanneld's flags leaseagent has no flag of its own for (the others are its own flags
    by the same names). Each is taken with flanneld's meaning or refused in
    parse_agent_config."""
    group = parser.add_argument_group(
        "flanneld's flags", "accepted so that flanneld's unit and /etc/default file start "
        "leaseagent with the same meaning (docs/flannel.md); Go's syntax works for every flag: "
        "-flag, --flag=value, --flag value, --bool=false")
    env = _EnvDefaults(group, environ)  # type: ignore[arg-type]
    env.add("--subnet-lease-renew-margin", flannel=True,
            help="renew the lease at least this many minutes before it expires (1..1439)")
    env.add("--kube-subnet-mgr", default=False, flag_type="bool", flannel=True,
            help="refused when true: leaseagent keeps leases in etcd")
    for name in ("kube-api-url", "kube-annotation-prefix", "kubeconfig-file",
                 "net-config-path"):
        env.add(f"--{name}", flannel=True, help="unused (Kubernetes mode only)")
    env.add("--set-node-network-unavailable", default=True, flag_type="bool", flannel=True,
            help="unused (Kubernetes mode only)")
    env.add("--healthz-ip", default="0.0.0.0", flannel=True,
            help="address for --healthz-port")
    env.add("--healthz-port", default="0", flannel=True,
            help="serve /healthz, /readyz, /metrics on --healthz-ip:this port (0: off)")
    env.add("--ip-blackhole-route", default=False, flag_type="bool", flannel=True,
            help="refused when true (not implemented)")
    env.add("--v", default="0", flannel=True, help="klog verbosity: above 0 means debug logs")
    env.add("--vmodule", flannel=True, help="refused unless empty")
    env.add("--log_backtrace_at", flannel=True, help="refused unless empty or :0")
    parser.set_defaults(_flannel_env=env)


def go_style(argv: Sequence[str], parser: argparse.ArgumentParser) -> list[str]:
    """flanneld's command line as this parser reads it. Go's flag package takes `-flag`
    and `--flag` alike, `-flag=value` or `-flag value`, and booleans only as `-flag` or
    `-flag=<strconv.ParseBool>` (true, false, 1, 0, t, f, ...); `-h` and `-help` show the
    help. A value that starts with "-" after a flag that takes one is kept as its value,
    as Go does. Anything else is passed on for the parser to refuse."""
    bools = {opt for action in parser._actions
             if isinstance(action, argparse.BooleanOptionalAction)
             for opt in action.option_strings if not opt.startswith("--no-")}
    takes_value = {opt for action in parser._actions if action.nargs != 0
                   for opt in action.option_strings} - bools
    out: list[str] = []
    tokens = list(argv)
    i = 0
    while i < len(tokens):
        token = tokens[i]
        i += 1
        if token == "--":
            out.extend(tokens[i - 1:])
            break
        body = token[2:] if token.startswith("--") else token[1:]
        if not token.startswith("-") or not body or body.startswith("-"):
            out.append(token)
            continue
        name, eq, value = body.partition("=")
        flag = f"--{name}"
        if flag == PASSWORD_FLAG:
            raise ConfigError(PASSWORD_REFUSAL.format(PASSWORD_FLAG))  # the value never shown
        if name in ("h", "help"):
            out.append("--help")
        elif flag == "--version":
            if not eq or value in GO_TRUE:
                out.append(flag)
            elif value not in GO_FALSE:
                raise ConfigError(f"--version={value!r}: must be true or false")
        elif flag in bools:
            if not eq or value in GO_TRUE:
                out.append(flag)
            elif value in GO_FALSE:
                out.append(f"--no-{name}")
            else:
                raise ConfigError(f"{flag}={value!r}: must be true or false")
        elif flag in takes_value and not eq and i < len(tokens):
            out.append(f"{flag}={tokens[i]}")  # Go takes the next word, even "-x"
            i += 1
        else:
            out.append(flag + (f"={value}" if eq else ""))
    return out


def _go_int(name: str, raw: object) -> int:
    """An int flag as Go's flag package reads it (strconv.ParseInt, base 0)."""
    try:
        return int(str(raw).replace("_", ""), 0)
    except ValueError:
        raise ConfigError(f"{name}={raw!r}: not a whole number") from None


RENEW_MARGIN_MINUTES = (1, 24 * 60 - 1)  # flanneld's range for --subnet-lease-renew-margin


def _flanneld_settings(ns: argparse.Namespace) -> dict[str, object]:
    """What flanneld's own flags change in AgentConfig; ConfigError for one refused."""
    ns._flannel_env.note_origins(ns, ns._argv)
    if ns.kube_subnet_mgr:
        raise ConfigError(f"{source(ns, '--kube-subnet-mgr')}: leaseagent keeps leases in etcd "
                          "only (flanneld's Kubernetes mode is not implemented)")
    if ns.ip_blackhole_route:
        raise ConfigError(f"{source(ns, '--ip-blackhole-route')}: not implemented by leaseagent "
                          "(Docker's bridge route already covers the host's subnet)")
    if ns.vmodule:
        raise ConfigError(f"{source(ns, '--vmodule')}={ns.vmodule!r}: per-file log levels are "
                          "not implemented; use --log-level")
    if ns.log_backtrace_at not in (None, "", ":0"):
        raise ConfigError(f"{source(ns, '--log_backtrace_at')}={ns.log_backtrace_at!r}: not "
                          "implemented")
    out: dict[str, object] = {}
    if _go_int(source(ns, "--v"), ns.v) > 0 and "log_level" not in ns._origins \
            and ns.log_level == "info":
        out["log_level"] = "debug"
    if ns.subnet_lease_renew_margin is not None:
        name = source(ns, "--subnet-lease-renew-margin")
        minutes = _go_int(name, ns.subnet_lease_renew_margin)
        low, high = RENEW_MARGIN_MINUTES
        if not low <= minutes <= high:
            raise ConfigError(f"{name}={minutes}: must be {low} to {high} minutes")
        out["renew_margin"] = minutes * 60.0
    port = _go_int(source(ns, "--healthz-port"), ns.healthz_port)
    if port:
        name = source(ns, "--healthz-port")
        if not 0 < port < 65536:
            raise ConfigError(f"{name}={port}: not a TCP port")
        addr = (str(ns.healthz_ip or "0.0.0.0"), port)
        if ns.metrics_addr and parse_hostport("--metrics-addr", ns.metrics_addr) != addr:
            raise ConfigError(f"{name}={port} and --metrics-addr={ns.metrics_addr}: one HTTP "
                              "server serves /healthz and /metrics; give one of them")
        out["metrics_addr"] = addr
    return out


def parse_agent_config(argv: Sequence[str], environ: Mapping[str, str] | None = None) -> AgentConfig:
    environ = os.environ if environ is None else environ
    parser = agent_parser(environ)
    argv = go_style(argv, parser)
    ns = parser.parse_args(argv)
    ns._argv = argv
    ns._env.note_origins(ns, argv)
    flanneld = _flanneld_settings(ns)
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
    if ns.iface_regex:
        for pattern in ns.iface_regex:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ConfigError(f"{source(ns, '--iface-regex')}={pattern!r}: not a regular "
                                  f"expression ({exc})") from None
    if ns.iface_can_reach:
        try:
            ip_address(ns.iface_can_reach)
        except ValueError:
            raise ConfigError(f"{source(ns, '--iface-can-reach')}={ns.iface_can_reach!r}: not "
                              "an IP address") from None
    settings = dict(
        etcd=etcd,
        prefix=str(ns.etcd_prefix),
        iface=interface_choice(ns),
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
        lease_check_interval=_seconds(source(ns, "--lease-check-interval"),
                                      ns.lease_check_interval, zero=True),
        iptables_resync=_seconds(source(ns, "--iptables-resync"), ns.iptables_resync),
        allow_any_public_ip=allow_any,
        traffic=traffic_settings(ns, nftables=False),
    )
    return AgentConfig(**{**settings, **flanneld})


def interface_choice(ns: argparse.Namespace) -> InterfaceChoice:
    """--iface (repeated), --iface-regex (repeated), --iface-can-reach, as given."""
    return InterfaceChoice(names=tuple(ns.iface or ()), regexes=tuple(ns.iface_regex or ()),
                           can_reach=ns.iface_can_reach or None)
