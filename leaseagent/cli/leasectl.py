"""`leasectl`: read and manage the cluster's subnet leases in etcd.

    leasectl list [--json | --output table|wide|json]
    leasectl show SUBNET
    leasectl config get
    leasectl config set FILE        (validated first; a bad file leaves etcd untouched)
    leasectl reserve SUBNET --public-ip IP
    leasectl release SUBNET
    leasectl watch [--output table|json]
    leasectl doctor [--json] [--iface IF] [--public-ip IP] [--subnet-file F] [--state-dir D]
    leasectl docker-opts [-f SUBNET_ENV] [-d OUT|-] [-i] [-c] [-k KEY] [-m] [--daemon-json]

`docker-opts` needs no etcd: it turns subnet.env into Docker's options the
way flannel's mk-docker-opts.sh does.

Same etcd flags and LEASEAGENT_* variables as the agent. Errors are one
line on stderr with a non-zero exit (1: the operation failed, 2: bad usage
or configuration), never a traceback.

`watch` prints one line per lease event (added, changed, removed, expired) as
it happens, flushed at once; status lines (listed, etcd lost) go to stderr.
Ctrl-C or SIGTERM ends it with status 0. See leaseagent.cli.watching.

`doctor` compares what etcd says this host should have with this host's
kernel and files; read-only. See leaseagent.cli.doctor.

`list` costs one range request for all keys plus one TimeToLive per distinct
etcd lease, sent concurrently.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import Sequence
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

from leaseagent.cli import doctor
from leaseagent.cli.watching import ADDED, CHANGED, LeaseEvent, lease_events
from leaseagent.config import (
    Parser,
    _EnvDefaults,
    add_etcd_arguments,
    add_host_arguments,
    etcd_settings,
)
from leaseagent.core.dockeropts import render_daemon_json, render_docker_env
from leaseagent.core.leases import KeyLayout, LeaseValue, Verdict, decode_lease_value, judge
from leaseagent.core.network import NetworkConfig, parse_network_config
from leaseagent.core.subnetenv import parse_subnet_env
from leaseagent.errors import ConfigError, InvalidLease, LeaseagentError, NetworkConfigError
from leaseagent.files import write_atomic
from leaseagent.store.base import KeyValue, LeaseStore
from leaseagent.store.etcd import EtcdStore

WATCH_FIELDS = ("subnet", "public_ip", "backend", "node_id", "valid", "error")
LIST_FIELDS = ("subnet", "public_ip", "backend", "vtep_mac", "node_id", "expires_in",
               "reservation", "valid", "error")


class UsageError(LeaseagentError):
    """Bad arguments: exit status 2."""


async def load_network(store: LeaseStore, layout: KeyLayout) -> NetworkConfig | None:
    kv = await store.get(layout.config_key)
    if kv is None:
        return None
    try:
        return parse_network_config(kv.value)
    except NetworkConfigError:
        return None


def row_of(verdict: Verdict, layout: KeyLayout, *, expires_in: int | None) -> dict[str, Any]:
    """One row of `list` (and `show`, `watch`): a key as the lease layer judged it."""
    value = verdict.value
    return {
        "subnet": str(verdict.subnet) if verdict.subnet is not None else layout.name_of(verdict.key),
        "public_ip": str(value.public_ip) if value is not None else None,
        "backend": (value.backend_type or None) if value is not None else None,
        "vtep_mac": value.vtep_mac if value is not None else None,
        "node_id": value.node_id if value is not None else None,
        "expires_in": expires_in if verdict.lease else None,
        "reservation": verdict.reservation,
        "valid": verdict.valid,
        "error": verdict.detail,
    }


async def list_rows(store: LeaseStore, layout: KeyLayout) -> list[dict[str, Any]]:
    network = await load_network(store, layout)
    listing = await store.list_prefix(layout.subnets_prefix)
    lease_ids = sorted({kv.lease for kv in listing.items if kv.lease})
    ttls = await asyncio.gather(*(store.time_to_live(i) for i in lease_ids))
    ttl_of = dict(zip(lease_ids, ttls, strict=True))
    verdicts = judge(listing.items, layout=layout, network=network).verdicts
    return [row_of(verdicts[kv.key], layout, expires_in=max(ttl_of.get(kv.lease, -1), 0))
            for kv in listing.items]


def format_table(rows: list[dict[str, Any]], *, wide: bool) -> str:
    cols = ["subnet", "public_ip", "backend", "expires_in", "status"]
    if wide:
        cols = ["subnet", "public_ip", "backend", "vtep_mac", "node_id", "expires_in", "status"]
    heads = {c: c.upper().replace("_", " ") for c in cols}
    lines = []
    for row in rows:
        cells = dict(row)
        if row["reservation"]:
            cells["expires_in"] = "reserved"
        elif row["expires_in"] is not None:
            cells["expires_in"] = f"{row['expires_in']}s"
        cells["status"] = "ok" if row["valid"] else f"INVALID: {row['error']}"
        lines.append({c: "-" if cells.get(c) is None else str(cells[c]) for c in cols})
    widths = {c: max([len(heads[c])] + [len(line[c]) for line in lines]) for c in cols}
    out = ["  ".join(heads[c].ljust(widths[c]) for c in cols).rstrip()]
    out += ["  ".join(line[c].ljust(widths[c]) for c in cols).rstrip() for line in lines]
    return "\n".join(out)


def parse_subnet_arg(text: str) -> IPv4Network:
    try:
        if "/" not in text and "-" in text:
            text = text.replace("-", "/")
        return IPv4Network(text, strict=True)
    except ValueError as exc:
        raise UsageError(f"SUBNET {text!r} is not an IPv4 network ({exc})") from None


async def cmd_list(store: LeaseStore, layout: KeyLayout, args: argparse.Namespace) -> int:
    rows = await list_rows(store, layout)
    output = "json" if args.json else args.output
    if output == "json":
        print(json.dumps([{k: r[k] for k in LIST_FIELDS} for r in rows], indent=2))
    else:
        print(format_table(rows, wide=output == "wide"))
    return 0


async def cmd_show(store: LeaseStore, layout: KeyLayout, args: argparse.Namespace) -> int:
    subnet = parse_subnet_arg(args.subnet)
    key = layout.lease_key(subnet)
    # Judged among every key of the prefix: another key may hold this subnet.
    listing = await store.list_prefix(layout.subnets_prefix)
    kv = next((item for item in listing.items if item.key == key), None)
    if kv is None:
        raise LeaseagentError(f"no lease for {subnet}")
    ttl = await store.time_to_live(kv.lease) if kv.lease else None
    verdict = judge(listing.items, layout=layout,
                    network=await load_network(store, layout)).verdicts[key]
    row = row_of(verdict, layout, expires_in=max(ttl, 0) if ttl is not None else None)
    row.update(key=kv.key, etcd_lease=f"{kv.lease:x}" if kv.lease else None,
               create_revision=kv.create_revision, mod_revision=kv.mod_revision,
               value=kv.value.decode(errors="replace"))
    print(json.dumps(row, indent=2))
    return 0


async def cmd_config(store: LeaseStore, layout: KeyLayout, args: argparse.Namespace) -> int:
    key = layout.config_key
    if args.config_cmd == "get":
        kv = await store.get(key)
        if kv is None:
            raise LeaseagentError(f"{key} is not set")
        print(kv.value.decode(errors="replace"))
        return 0
    raw, network = args.config_data
    await store.put(key, raw)
    print(f"{key} set: network {network.network}, /{network.subnet_len} subnets, "
          f"backend {network.backend_type}")
    return 0


async def cmd_reserve(store: LeaseStore, layout: KeyLayout, args: argparse.Namespace) -> int:
    subnet = parse_subnet_arg(args.subnet)
    try:
        public_ip = IPv4Address(args.public_ip)
    except ValueError:
        raise UsageError(f"--public-ip {args.public_ip!r} is not an IPv4 address") from None
    network = await load_network(store, layout)
    if network is None:
        raise LeaseagentError(f"{layout.config_key} is missing or invalid; set it first")
    why = network.check_subnet(subnet)
    if why:
        raise UsageError(why)
    key = layout.lease_key(subnet)
    value = LeaseValue(public_ip=public_ip, backend_type=network.backend_type).encode()
    won, current = await store.create(key, value, lease=0)
    if not won:
        assert current is not None
        try:
            holder = str(decode_lease_value(current.value).public_ip)
        except InvalidLease:
            holder = "an invalid lease"
        raise LeaseagentError(f"{subnet} is already taken by {holder}; release it first")
    print(f"reserved {subnet} for {public_ip}")
    return 0


async def cmd_release(store: LeaseStore, layout: KeyLayout, args: argparse.Namespace) -> int:
    subnet = parse_subnet_arg(args.subnet)
    key = layout.lease_key(subnet)
    kv = await store.get(key)
    if kv is None:
        raise LeaseagentError(f"no lease for {subnet}")
    if not await store.delete(key, mod_revision=kv.mod_revision):
        raise LeaseagentError(f"{subnet} changed while releasing it; try again")
    note = "" if kv.lease == 0 else " (a running agent holding it will take it back)"
    print(f"released {subnet}{note}")
    return 0


WATCH_WIDTHS = (10, 9, 20, 17, 9, 24, 0)
WATCH_HEADS = ("TIME", "EVENT", "SUBNET", "PUBLIC IP", "BACKEND", "NODE ID", "STATUS")


def format_watch_line(event: str, row: dict[str, Any], *, when: float) -> str:
    status = "ok" if row["valid"] else f"INVALID: {row['error']}"
    cells = [time.strftime("%H:%M:%S", time.localtime(when)), event]
    cells += ["-" if row[k] is None else str(row[k]) for k in ("subnet", "public_ip", "backend",
                                                                 "node_id")]
    cells.append(status)
    return "".join(c.ljust(w) for c, w in zip(cells, WATCH_WIDTHS, strict=False)).rstrip()


class _Seen:
    """The keys `watch` has seen, so each event's key is judged among the keys naming
    the same subnet (the oldest holds it), as `list` and the agents judge it."""

    def __init__(self, layout: KeyLayout) -> None:
        self._layout = layout
        self._kvs: dict[str, KeyValue] = {}
        self._by_subnet: dict[IPv4Network, set[str]] = {}

    def _subnet(self, key: str) -> IPv4Network | None:
        try:
            return self._layout.parse_lease_key(key).ipv4
        except ValueError:
            return None

    def verdict(self, kv: KeyValue, network: NetworkConfig | None) -> Verdict:
        subnet = self._subnet(kv.key)
        rivals = [self._kvs[k] for k in self._by_subnet.get(subnet, ()) if k != kv.key] \
            if subnet is not None else []
        return judge([*rivals, kv], layout=self._layout, network=network).verdicts[kv.key]

    def put(self, kv: KeyValue) -> None:
        self._kvs[kv.key] = kv
        subnet = self._subnet(kv.key)
        if subnet is not None:
            self._by_subnet.setdefault(subnet, set()).add(kv.key)

    def forget(self, key: str) -> None:
        self._kvs.pop(key, None)
        subnet = self._subnet(key)
        if subnet is not None:
            self._by_subnet.get(subnet, set()).discard(key)


async def _print_events(store: LeaseStore, layout: KeyLayout, *, output: str) -> None:
    network = await load_network(store, layout)
    relisted = False
    seen = _Seen(layout)

    def on_listed(items: Sequence[KeyValue], revision: int, reason: str) -> None:
        nonlocal relisted
        count = len(items)
        if reason == "start":
            for kv in items:
                seen.put(kv)
            note = (f"watching {count} leases under {layout.subnets_prefix} "
                    f"from revision {revision + 1}")
        else:
            relisted = True
            note = f"listed again ({reason}): {count} leases; changes since follow"
        print(f"leasectl: {note}", file=sys.stderr, flush=True)

    def on_unavailable(exc: BaseException) -> None:
        print(f"leasectl: {exc}; retrying", file=sys.stderr, flush=True)

    if output == "table":
        print("".join(h.ljust(w) for h, w in zip(WATCH_HEADS, WATCH_WIDTHS, strict=True)).rstrip(),
              flush=True)
    event: LeaseEvent
    async for event in lease_events(store, layout.subnets_prefix, on_listed=on_listed,
                                    on_unavailable=on_unavailable):
        if relisted:  # the network config may have changed while we were away
            network, relisted = await load_network(store, layout), False
        if event.kind in (ADDED, CHANGED):
            seen.put(event.kv)
            row = row_of(seen.verdict(event.kv, network), layout, expires_in=None)
        else:
            row = row_of(seen.verdict(event.kv, network), layout, expires_in=None)
            seen.forget(event.kv.key)
        if output == "json":
            doc = {"event": event.kind, **{k: row[k] for k in WATCH_FIELDS}}
            print(json.dumps(doc), flush=True)
        else:
            print(format_watch_line(event.kind, row, when=time.time()), flush=True)


async def cmd_watch(store: LeaseStore, layout: KeyLayout, args: argparse.Namespace) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    printer = asyncio.create_task(_print_events(store, layout, output=args.output))
    stopper = asyncio.create_task(stop.wait())
    try:
        done, _ = await asyncio.wait({printer, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (printer, stopper):
            task.cancel()
        await asyncio.gather(printer, stopper, return_exceptions=True)
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    if printer in done and not printer.cancelled():
        printer.result()  # an error that is not retried: one line, exit 1
    return 0


async def cmd_doctor(store: LeaseStore, layout: KeyLayout, args: argparse.Namespace) -> int:
    report = await doctor.examine(store, layout, args.doctor_settings)
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        for problem in report.problems:
            print(problem.text)
        if report.ok:
            print(f"ok: {report.summary}")
    return 0 if report.ok else 1


def cmd_docker_opts(args: argparse.Namespace) -> int:
    try:
        env = parse_subnet_env(Path(args.subnet_file).read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise LeaseagentError(f"cannot read {args.subnet_file}: {exc}") from None
    if not env.get("FLANNEL_SUBNET"):
        raise LeaseagentError(f"{args.subnet_file} has no FLANNEL_SUBNET")
    if args.daemon_json:
        text = render_daemon_json(env)
    else:
        individual, combined = args.individual, args.combined
        if not individual and not combined:
            individual = combined = True
        text = render_docker_env(env, individual=individual, combined=combined,
                                 combined_key=args.key, existing=os.environ.get(args.key, ""),
                                 ipmasq=not args.no_ipmasq)
    if args.output == "-":
        sys.stdout.write(text)
    else:
        try:
            write_atomic(Path(args.output), text.encode(), mode=0o644)
        except (OSError, ConfigError) as exc:
            raise LeaseagentError(f"cannot write {args.output}: {exc}") from None
    return 0


COMMANDS = {"list": cmd_list, "show": cmd_show, "config": cmd_config,
            "reserve": cmd_reserve, "release": cmd_release, "watch": cmd_watch,
            "doctor": cmd_doctor}


def build_parser(environ: dict[str, str]) -> argparse.ArgumentParser:
    parser = Parser(prog="leasectl", allow_abbrev=False,
                                     description="Inspect and manage leaseagent's "
                                     "subnet leases in etcd.")
    add_etcd_arguments(_EnvDefaults(parser, environ))
    sub = parser.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    p = sub.add_parser("list", help="list all leases, valid or not")
    p.add_argument("--json", action="store_true", help="same as --output json")
    p.add_argument("--output", "-o", choices=["table", "wide", "json"], default="table")
    p = sub.add_parser("show", help="one lease in detail (JSON)")
    p.add_argument("subnet")
    p = sub.add_parser("config", help="get or set the network config")
    csub = p.add_subparsers(dest="config_cmd", required=True, metavar="get|set")
    csub.add_parser("get", help="print <prefix>/config")
    cset = csub.add_parser("set", help="validate FILE and write it to <prefix>/config")
    cset.add_argument("file", help="JSON file, or - for standard input")
    p = sub.add_parser("reserve", help="reserve SUBNET for the host with --public-ip (no TTL)")
    p.add_argument("subnet")
    p.add_argument("--public-ip", required=True)
    p = sub.add_parser("release", help="delete the lease or reservation of SUBNET")
    p.add_argument("subnet")
    p = sub.add_parser("watch", help="stream lease events (added, changed, removed, expired)")
    p.add_argument("--output", "-o", choices=["table", "json"], default="table",
                   help="a table line or a JSON object per event")
    p = sub.add_parser("doctor", help="compare etcd's view of this host with its kernel and files")
    p.add_argument("--json", action="store_true", help='{"ok": ..., "problems": [...]}')
    add_host_arguments(_EnvDefaults(p, environ))
    p = sub.add_parser("docker-opts", help="Docker options from subnet.env (as mk-docker-opts.sh)")
    p.add_argument("-f", "--subnet-file", default=os.environ.get(
        "LEASEAGENT_SUBNET_FILE", "/run/leaseagent/subnet.env"))
    p.add_argument("-d", "--output", default="/run/docker_opts.env", help="file to write, - for stdout")
    p.add_argument("-i", "--individual", action="store_true", help="DOCKER_OPT_* variables")
    p.add_argument("-c", "--combined", action="store_true", help="the combined DOCKER_OPTS variable")
    p.add_argument("-k", "--key", default="DOCKER_OPTS", help="name of the combined variable")
    p.add_argument("-m", "--no-ipmasq", action="store_true", help="never emit --ip-masq")
    p.add_argument("--daemon-json", action="store_true", help="a daemon.json fragment instead")
    _accept_etcd_flags_after_command(parser, [*sub.choices.values(), *csub.choices.values()])
    return parser


def _accept_etcd_flags_after_command(parser: argparse.ArgumentParser,
                                     subparsers: Sequence[argparse.ArgumentParser]) -> None:
    """`leasectl doctor --etcd-endpoints URL` works as well as `leasectl --etcd-endpoints URL
    doctor`: operators paste the agent's flags after the command. SUPPRESS as default
    keeps the value (or LEASEAGENT_* variable) given before the command when the flag
    is not repeated after it."""
    etcd_actions = [a for a in parser._actions if a.dest.startswith("etcd_")]
    for sub in subparsers:
        # As on the main parser: `--etcd-password SECRET` must not match --etcd-password-file.
        sub.allow_abbrev = False
        for action in etcd_actions:
            sub.add_argument(*action.option_strings, dest=action.dest,
                             default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def read_config_file(name: str) -> tuple[bytes, NetworkConfig]:
    """Read and validate a config file before anything talks to etcd."""
    try:
        raw = sys.stdin.buffer.read() if name == "-" else Path(name).read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {name}: {exc.strerror}") from None
    try:
        return raw, parse_network_config(raw)
    except NetworkConfigError as exc:
        raise UsageError(f"{name}: {exc}; etcd left unchanged") from None


async def run(args: argparse.Namespace) -> int:
    settings = etcd_settings(args)
    store = await EtcdStore.connect(settings)
    try:
        return await COMMANDS[args.cmd](store, KeyLayout(str(args.etcd_prefix)), args)
    finally:
        await store.close()


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser(dict(os.environ)).parse_args(argv)
        if args.cmd == "docker-opts":
            return cmd_docker_opts(args)
        if args.cmd == "config" and args.config_cmd == "set":
            args.config_data = read_config_file(args.file)
        if args.cmd == "doctor":
            args.doctor_settings = doctor.settings_from(args)
        return asyncio.run(run(args))
    except (UsageError, ConfigError) as exc:
        print(f"leasectl: error: {exc}", file=sys.stderr)
        return 2
    except LeaseagentError as exc:
        print(f"leasectl: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # stdout's reader is gone (`leasectl watch | head`): nothing more to say, and
        # Python's flush at exit must not complain about it either.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as exc:
        # Nothing should get here; if it does, still one line and no traceback.
        print(f"leasectl: error: unexpected {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
