"""`leasectl`: read and manage the cluster's subnet leases in etcd.

    leasectl list [-o table|wide|json]
    leasectl show SUBNET|KEY-NAME [-o json|table]
    leasectl config get
    leasectl config set [--dry-run] FILE|-
                                    (validated as the agents validate it; a bad file leaves etcd
                                    untouched; prints the change's class and which hosts re-lease
                                    or restart Docker, against the live cluster)
    leasectl reserve SUBNET --public-ip IP [--force]
    leasectl release SUBNET|KEY-NAME
    leasectl watch [-o table|json]
    leasectl prometheus-targets FILE|- [--once]
    leasectl doctor [-o text|json] [host flags]
    leasectl docker-opts [-f SUBNET_ENV] [-d FILE|-] [-o env|daemon-json] [-i] [-c] [-k KEY] [-m]
    leasectl cleanup [host flags]
    leasectl cleanup --flannel [host flags]     (flanneld's leftovers; reads etcd)
    leasectl completion bash

`docker-opts`, `cleanup` (without --flannel) and `completion` need no etcd (and do not
load its client).

Same etcd flags and LEASEAGENT_* variables as the agent. Errors are one
line on stderr, never a traceback; exit status (also in --help): 0 done,
1 the operation failed (or doctor found a problem), 2 bad usage or
configuration, 130 interrupted.

Every key is judged by the lease layer (leaseagent.core.leases), as the
agents judge it; rows and statuses are leaseagent.cli.presenting's.

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
from collections.abc import Coroutine, Sequence
from ipaddress import IPv4Address, IPv4Interface, IPv4Network, IPv6Address, IPv6Network
from pathlib import Path
from typing import Any

from leaseagent.cli import doctor
from leaseagent.cli.presenting import (
    LIST_FIELDS,
    WATCH_FIELDS,
    SeenKeys,
    UsageError,
    format_table,
    format_watch_line,
    row_of,
    rows_of,
    subnet_of,
    watch_header,
)
from leaseagent.cli.targets import check_writable, keep_targets
from leaseagent.cli.unitenv import host_environment
from leaseagent.cli.watching import ADDED, CHANGED, LeaseEvent, lease_events
from leaseagent.config import (
    _EnvDefaults,
    add_etcd_arguments,
    add_host_arguments,
    add_traffic_arguments,
    etcd_settings,
    new_parser,
    parse_route_protocol,
    unknown_variables,
)
from leaseagent.core.configchange import REBUILD, classify, lease_impact
from leaseagent.core.dockeropts import render_daemon_json, render_docker_env
from leaseagent.core.escaping import escaped, escaped_lines
from leaseagent.core.leases import PEER, KeyLayout, LeaseValue, decode_lease_value, judge
from leaseagent.core.network import NetworkConfig, host_overlap, parse_network_config
from leaseagent.core.plan import HostRoute, cluster_relevant, subnet_conflict
from leaseagent.core.subnetenv import parse_environment_file
from leaseagent.dataplane.base import DEFAULT_ROUTE_PROTOCOL
from leaseagent.errors import (
    ConfigError,
    DataPlaneError,
    InvalidLease,
    LeaseagentError,
    NetworkConfigError,
)
from leaseagent.files import write_atomic
from leaseagent.store.base import KeyValue, LeaseStore
from leaseagent.store.settings import check_credential_files
from leaseagent.waiting import first_to_end


async def load_network(store: LeaseStore, layout: KeyLayout) -> NetworkConfig | None:
    kv = await store.get(layout.config_key)
    if kv is None:
        return None
    try:
        return parse_network_config(kv.value)
    except NetworkConfigError:
        return None


async def _ttls(store: LeaseStore, items: Sequence[KeyValue]) -> dict[int, int]:
    lease_ids = sorted({kv.lease for kv in items if kv.lease})
    ttls = await asyncio.gather(*(store.time_to_live(i) for i in lease_ids))
    return dict(zip(lease_ids, ttls, strict=True))


async def list_rows(store: LeaseStore, layout: KeyLayout, *, route_protocol: object = None
                    ) -> list[dict[str, Any]]:
    network = await load_network(store, layout)
    listing = await store.list_prefix(layout.subnets_prefix)
    for kv in listing.oversize:
        print(f"leasectl: warning: {escaped(kv.key)}: its value is too large to receive "
              f"(over gRPC's 4 MiB message limit); an invalid lease (too_large), not listed",
              file=sys.stderr)
    routes, addresses = (await this_host_routes(network, route_protocol) if route_protocol
                         else ((), frozenset()))
    return rows_of(listing.items, layout, network, await _ttls(store, listing.items),
                   host_routes=routes, host_addresses=addresses)


async def _find(store: LeaseStore, layout: KeyLayout, text: str
                ) -> tuple[KeyValue, list[KeyValue], NetworkConfig | None]:
    """The key a SUBNET or KEY-NAME argument names, with the whole listing (to judge it
    among the others) and the network config. A name that is no subnet may still be a
    key's name: junk can be shown and released by the name it has."""
    network = await load_network(store, layout)
    listing = (await store.list_prefix(layout.subnets_prefix)).items
    by_key = {kv.key: kv for kv in listing}
    if layout.subnets_prefix + text in by_key:
        return by_key[layout.subnets_prefix + text], listing, network
    subnet = subnet_of(text, network)
    verdicts = judge(listing, layout=layout, network=None).verdicts
    named = [kv for kv in listing if subnet in (verdicts[kv.key].subnet,
                                                  verdicts[kv.key].ipv6_subnet)]
    if not named:
        raise LeaseagentError(f"no lease for {subnet}")
    return min(named, key=lambda kv: (kv.create_revision, kv.key)), listing, network


async def cmd_list(store: LeaseStore, layout: KeyLayout, args: argparse.Namespace) -> int:
    rows = await list_rows(store, layout, route_protocol=args.route_protocol)
    if args.output == "json":
        print(json.dumps([{k: r[k] for k in LIST_FIELDS} for r in rows], indent=2))
    else:
        print(format_table(rows, wide=args.output == "wide"))
    return 0


async def cmd_show(store: LeaseStore, layout: KeyLayout, args: argparse.Namespace) -> int:
    kv, listing, network = await _find(store, layout, args.subnet)
    ttl = await store.time_to_live(kv.lease) if kv.lease else None
    result = judge(listing, layout=layout, network=network)
    row = row_of(result.verdicts[kv.key], layout, expires_in=ttl,
                 same_ip_as=result.same_ip.get(kv.key))
    if args.output == "table":
        print(format_table([row], wide=True))
        return 0
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
        print(escaped_lines(kv.value.decode(errors="replace")))
        return 0
    raw, network = args.config_data
    current = await store.get(key)
    listing = (await store.list_prefix(layout.subnets_prefix)).items
    if not args.dry_run:
        await store.put(key, raw)
        print(f"{key} set: network {network.network}, /{network.subnet_len} subnets, "
              f"backend {network.backend_type}")
    for line in change_summary(current, network, listing, layout):
        print(escaped(line))
    return 0


def change_summary(current: KeyValue | None, new: NetworkConfig, listing: Sequence[KeyValue],
                   layout: KeyLayout) -> list[str]:
    """What writing `new` over `current` does to the running cluster: the change's class
    and fields, then each host that re-leases or restarts Docker (leaseagent.core.
    configchange, the rule the agents apply)."""
    old = None
    if current is not None:
        try:
            old = parse_network_config(current.value)
        except NetworkConfigError:
            pass
    if old is None:
        return ["no valid config in force: agents waiting for one start with this one"]
    change = classify(old, new)
    if not change:
        return ["change: none (the agents read it as the config in force)"]
    lines = [f"change: {change.kind}"] + [f"  {f.text} ({f.kind})" for f in change.fields]
    hosts = sorted(((v.subnet, v.value, v.ipv6_subnet)
                    for v in judge(listing, layout=layout, network=old).verdicts.values()
                    if v.status == PEER and v.subnet is not None and v.value is not None),
                   key=lambda host: int(host[0].network_address))
    affected = 0
    for subnet, value, ipv6_subnet in hosts:
        impact = lease_impact(old, new, subnet, ipv6_subnet)
        what = []
        if impact.moves is not None:
            what.append(f"re-leases: takes a new subnet ({impact.moves})")
        elif impact.rekeys:
            what.append("re-leases: its key moves, its subnet kept")
        if change.kind == REBUILD:
            how = (f"{old.backend_type} -> {new.backend_type}"
                   if old.backend_type != new.backend_type
                   else f"{new.backend_type}: new devices beside the old ones")
            what.append(f"rebuilds its data plane ({how})")
        if impact.restart_docker:
            what.append(f"restart Docker ({', '.join(impact.docker)})")
        if what:
            affected += 1
            node = f", node {value.node_id}" if value.node_id else ""
            lines.append(f"  {subnet} ({value.public_ip}{node}): " + "; ".join(what))
    lines.append(f"hosts: {len(hosts)}, {affected} affected as above, the others keep their "
                 "subnet and Docker's options")
    return lines


async def cmd_reserve(store: LeaseStore, layout: KeyLayout, args: argparse.Namespace) -> int:
    network = await load_network(store, layout)
    if network is None:
        raise LeaseagentError(f"{layout.config_key} is missing or invalid; set it first")
    subnet = subnet_of(args.subnet, network)
    if not isinstance(subnet, IPv4Network):
        raise UsageError(f"SUBNET {args.subnet!r}: name the IPv4 subnet (the IPv6 one goes in "
                         "--ipv6-subnet)")
    try:
        public_ip = IPv4Address(args.public_ip)
    except ValueError:
        raise UsageError(f"--public-ip {args.public_ip!r} is not an IPv4 address") from None
    why = network.check_subnet(subnet)
    if why:
        raise UsageError(why)
    ipv6 = None
    if args.ipv6_subnet:
        named6 = subnet_of(args.ipv6_subnet, None) if "/" in args.ipv6_subnet else None
        if not isinstance(named6, IPv6Network):
            raise UsageError(f"--ipv6-subnet {args.ipv6_subnet!r}: not an IPv6 subnet "
                             "(fd00:5:0:22::/64)")
        why = network.check_ipv6_subnet(named6)
        if why:
            raise UsageError(f"--ipv6-subnet {args.ipv6_subnet}: {why}")
        ipv6 = named6
    conflict = subnet_conflict((subnet, ipv6),
                               (await this_host_routes(network, args.route_protocol))[0])
    if conflict is not None and not args.force:
        raise UsageError(f"{subnet} overlaps this host's {conflict.text}, which is not the "
                         "agent's: its agent would not program the subnet (--force reserves "
                         "it anyway)")
    if not network.in_range(subnet) and not args.force:
        raise UsageError(f"{subnet} is outside [SubnetMin, SubnetMax] = "
                         f"[{network.subnet_min}, {network.subnet_max}]; no agent would be "
                         "given it (--force reserves it anyway)")
    listing = (await store.list_prefix(layout.subnets_prefix)).items
    held = judge(listing, layout=layout, network=None).naming(public_ip)
    if held and not args.force:
        raise UsageError(f"{public_ip} already has {held[0].subnet} ({held[0].key}); a host uses "
                         "one subnet (--force reserves a second anyway)")
    taken6 = [v for v in judge(listing, layout=layout, network=None).verdicts.values()
              if ipv6 is not None and v.ipv6_subnet == ipv6]
    if taken6:
        raise LeaseagentError(f"{ipv6} is already taken ({taken6[0].key}); release it first")
    key = layout.lease_key(subnet, ipv6)
    value = LeaseValue(public_ip=public_ip, backend_type=network.backend_type).encode()
    # Guarded on the IPv4 part: a subnet held under a dual-stack key is taken too.
    won, _ = await store.create(key, value, lease=0, guard=layout.lease_key(subnet))
    if not won:
        holders = [kv for kv in listing if judge([kv], layout=layout, network=None)
                   .verdicts[kv.key].subnet == subnet]
        holder = "another key"
        if holders:
            try:
                holder = str(decode_lease_value(holders[0].value).public_ip)
            except InvalidLease:
                holder = "an invalid lease"
        raise LeaseagentError(f"{subnet} is already taken by {holder}; release it first")
    print(f"reserved {subnet}{f' and {ipv6}' if ipv6 else ''} for {public_ip}")
    return 0


async def cmd_release(store: LeaseStore, layout: KeyLayout, args: argparse.Namespace) -> int:
    kv, _, _ = await _find(store, layout, args.subnet)
    if not await store.delete(kv.key, mod_revision=kv.mod_revision):
        raise LeaseagentError(f"{layout.name_of(kv.key)} changed while releasing it; try again")
    note = "" if kv.lease == 0 else " (a running agent holding it will take it back)"
    print(f"released {escaped(layout.name_of(kv.key))}{note}")
    return 0


async def _print_events(store: LeaseStore, layout: KeyLayout, *, output: str) -> None:
    network = await load_network(store, layout)
    relisted = False
    seen = SeenKeys(layout)

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
        print(f"leasectl: {escaped(exc)}; retrying", file=sys.stderr, flush=True)

    if output == "table":
        print(watch_header(), flush=True)
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
    return await _until_stopped(_print_events(store, layout, output=args.output))


async def cmd_prometheus_targets(store: LeaseStore, layout: KeyLayout,
                                 args: argparse.Namespace) -> int:
    path = None if args.file == "-" else Path(args.file)
    return await _until_stopped(keep_targets(store, layout, path, once=args.once))


async def _until_stopped(work: Coroutine[Any, Any, None]) -> int:
    """Run `work` until it ends or SIGINT/SIGTERM: 0, or its error (one line, exit 1)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await first_to_end(work, stop.wait())  # an error that is not retried: one line, exit 1
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    return 0


async def cmd_cleanup_flannel(store: LeaseStore, layout: KeyLayout,
                              args: argparse.Namespace) -> int:
    """`cleanup --flannel`: remove the flanneld leftovers doctor names, nothing else."""
    from leaseagent.dataplane import leftovers

    report = await doctor.examine(store, layout, args.doctor_settings)
    lines = await leftovers.remove(report.leftovers) or ["nothing of flanneld's to remove"]
    for line in lines:
        print(escaped(line))
    return 1 if any(line.startswith("could not") for line in lines) else 0


async def cmd_doctor(store: LeaseStore, layout: KeyLayout, args: argparse.Namespace) -> int:
    report = await doctor.examine(store, layout, args.doctor_settings)
    if args.output == "json":
        print(json.dumps(report.to_json(), indent=2))
    else:
        for problem in report.problems:
            print(escaped(problem.text))
        for line in report.kept:
            print(escaped(line))
        if report.ok:
            print(f"ok: {escaped(report.summary)}")
    return 0 if report.ok else 1


DOCKER_OPTS_FILE = "/run/docker_opts.env"  # mk-docker-opts.sh's default


def cmd_docker_opts(args: argparse.Namespace) -> int:
    try:
        env = parse_environment_file(Path(args.subnet_file).read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise LeaseagentError(f"cannot read {args.subnet_file}: {exc}") from None
    if not env.get("FLANNEL_SUBNET"):
        raise LeaseagentError(f"{args.subnet_file} has no FLANNEL_SUBNET")
    if args.output == "daemon-json":
        text = render_daemon_json(env)
        dest = args.dest or "-"  # a fragment to read or merge: shown unless a file is named
    else:
        individual, combined = args.individual, args.combined
        if not individual and not combined:
            individual = combined = True
        try:
            text = render_docker_env(env, individual=individual, combined=combined,
                                     combined_key=args.key, existing=os.environ.get(args.key, ""),
                                     ipmasq=not args.no_ipmasq)
        except ValueError as exc:
            raise LeaseagentError(f"{args.subnet_file}: {exc}") from None
        dest = args.dest or DOCKER_OPTS_FILE
    if dest == "-":
        sys.stdout.write(text)
    else:
        try:
            write_atomic(Path(dest), text.encode(), mode=0o644)
        except (OSError, ConfigError) as exc:
            raise LeaseagentError(f"cannot write {dest}: {exc}") from None
    if args.output == "env":
        # mk-docker-opts.sh's last step, after writing: a route to the subnet through a
        # gateway means the subnet is routed elsewhere, and Docker's bridge would clash.
        try:
            subnet = IPv4Interface(env["FLANNEL_SUBNET"]).network
        except ValueError:
            raise LeaseagentError(f"{args.subnet_file}: FLANNEL_SUBNET="
                                  f"{env['FLANNEL_SUBNET']!r} is not an IPv4 address/length"
                                  ) from None
        found = asyncio.run(_gateway_route_to(subnet))
        if found is not None:
            raise LeaseagentError(f"the routing table already routes {found.dst} via "
                                  f"{found.gateway} (mk-docker-opts.sh's check)")
    return 0


async def _gateway_route_to(subnet: IPv4Network) -> HostRoute | None:
    """A main-table route to exactly `subnet` with a gateway, if this host has one."""
    import socket

    from leaseagent.dataplane.netlink import Netlink

    found: list[HostRoute] = []
    nl = await Netlink.open()
    try:
        # Protocol 0 is no route's: every route of the table reaches `others`.
        await nl.scan_routes(lambda _: True, protocol=0, family=socket.AF_INET,
                             others=found.append)
    finally:
        nl.close()
    return next((r for r in found if r.dst == subnet and r.gateway is not None), None)


COMMANDS = {"cleanup": cmd_cleanup_flannel, "list": cmd_list, "show": cmd_show,
            "config": cmd_config,
            "reserve": cmd_reserve, "release": cmd_release, "watch": cmd_watch,
            "doctor": cmd_doctor, "prometheus-targets": cmd_prometheus_targets}

DESCRIPTION = """\
Inspect and manage leaseagent's subnet leases in etcd (flannel's layout).

The etcd flags may come before or after the command, and from the agent's
LEASEAGENT_* variables: those of this shell, else what the installed unit gives the
agent (/etc/systemd/system/leaseagent.service's Environment=, then
/etc/default/leaseagent), so a root shell on an agent's host needs none."""

EPILOG = """\
exit status:
  0    done (doctor: nothing wrong)
  1    the operation failed: etcd said no, a lease is missing (doctor: a problem found)
  2    bad usage or configuration (a flag, variable, argument or file); etcd untouched
  130  interrupted"""


def _subparser(sub: Any, name: str, help_text: str, description: str | None = None
               ) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = sub.add_parser(
        name, help=help_text, description=description or help_text[:1].upper() + help_text[1:] + ".",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    return parser


def _route_protocol_argument(p: argparse.ArgumentParser, environ: dict[str, str]) -> None:
    p.add_argument("--route-protocol", default=environ.get("LEASEAGENT_ROUTE_PROTOCOL",
                                                           str(DEFAULT_ROUTE_PROTOCOL)),
                   help="the agent's route protocol: its routes are not this host's own "
                   "[default: 76; $LEASEAGENT_ROUTE_PROTOCOL]")


async def this_host_routes(network: NetworkConfig | None, protocol: object
                           ) -> tuple[tuple[HostRoute, ...], frozenset[IPv4Address | IPv6Address]]:
    """The routes and addresses of the host leasectl runs on that overlap the cluster
    network and are not the agent's (`protocol`), read as the agents read theirs
    (core.plan.cluster_relevant), and every address of the host (a lease naming one as
    its PublicIP is this host's own: its agent does not judge it as a peer); none when
    the kernel cannot be asked."""
    if network is None:
        return (), frozenset()
    from leaseagent.dataplane.netlink import Netlink

    ours = parse_route_protocol(protocol)
    seen: list[HostRoute] = []
    try:
        nl = await Netlink.open()
    except (DataPlaneError, OSError):
        return (), frozenset()
    try:
        await nl.scan_routes(lambda _ident: True, protocol=ours, others=seen.append)
    except (DataPlaneError, OSError):
        return (), frozenset()
    finally:
        nl.close()
    networks: list[IPv4Network | IPv6Network] = [network.network]
    if network.ipv6_network is not None:
        networks.append(network.ipv6_network)
    addresses = frozenset(r.dst.network_address for r in seen if r.address)
    return cluster_relevant(seen, networks), addresses


def build_parser(environ: dict[str, str]) -> argparse.ArgumentParser:
    parser = new_parser("leasectl", DESCRIPTION, epilog=EPILOG)
    envs = [_EnvDefaults(parser, environ)]
    add_etcd_arguments(envs[0])
    sub = parser.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    p = _subparser(sub, "list", "list every lease, valid or not, with its status")
    _route_protocol_argument(p, environ)
    p.add_argument("-o", "--output", choices=["table", "wide", "json"], default="table",
                   help="a table, a wider one (VtepMAC, node id), or JSON [default: table]")
    p.add_argument("--json", action="store_const", dest="output", const="json",
                   help="same as -o json")
    p = _subparser(sub, "show", "one lease in detail",
                   "One lease in detail. SUBNET may be 10.5.34.0/24, 10.5.34.1/24 (as in\n"
                   "FLANNEL_SUBNET), 10.5.34.0-24 (its key name) or 10.5.34.0 (the network's\n"
                   "subnet length); a key that names no subnet by its name.")
    p.add_argument("subnet", metavar="SUBNET|KEY-NAME")
    p.add_argument("-o", "--output", choices=["json", "table"], default="json",
                   help="JSON with the etcd details, or a table row [default: json]")
    p = _subparser(sub, "config", "get or set the network config (<prefix>/config)")
    csub = p.add_subparsers(dest="config_cmd", required=True, metavar="get|set")
    _subparser(csub, "get", "print the network config")
    cset = _subparser(csub, "set", "validate FILE as the agents do, then write it",
                      "Validate FILE exactly as every agent validates the network config, then\n"
                      "write it; a file an agent would refuse leaves etcd untouched (exit 2).\n"
                      "A Network holding an address or the network of this host's default-route\n"
                      "interface is refused too (the agents check their own interfaces).\n"
                      "Then say what the running agents do about it: the change's class (in-place,\n"
                      "re-lease, rebuild) and which hosts re-lease or must restart Docker.")
    cset.add_argument("file", metavar="FILE", help="JSON file, or - for standard input")
    cset.add_argument("--dry-run", action="store_true",
                      help="only print what writing FILE would do to the running cluster")
    cset.add_argument("--no-host-check", action="store_true",
                      help="do not refuse a Network that holds this host's addresses (leasectl "
                      "runs on a machine outside the cluster; every agent checks its own)")
    p = _subparser(sub, "reserve", "reserve SUBNET for the host with --public-ip (no TTL)",
                   "Reserve SUBNET for the host with --public-ip: a key with no TTL that only that\n"
                   "host's agent takes. Refused for a subnet outside [SubnetMin, SubnetMax], a\n"
                   "PublicIP that has a subnet already, or a subnet over a route or address of\n"
                   "the host leasectl runs on (its agent would not program it), unless --force.")
    p.add_argument("subnet", metavar="SUBNET")
    p.add_argument("--public-ip", required=True, help="the host's PublicIP")
    p.add_argument("--ipv6-subnet", metavar="SUBNET6",
                   help="also its IPv6 subnet (dual-stack; without it the host's agent adds one)")
    p.add_argument("--force", action="store_true",
                   help="reserve outside [SubnetMin, SubnetMax], a second subnet for one IP, or "
                   "a subnet over a route or address of this host")
    _route_protocol_argument(p, environ)
    p = _subparser(sub, "release", "delete the lease or reservation of SUBNET (or a key by name)")
    p.add_argument("subnet", metavar="SUBNET|KEY-NAME")
    p = _subparser(sub, "watch", "stream lease events (added, changed, removed, expired)")
    p.add_argument("-o", "--output", choices=["table", "json"], default="table",
                   help="a table line or a JSON object per event [default: table]")
    p = _subparser(sub, "prometheus-targets",
                   "write Prometheus file_sd JSON of every agent's metrics address, kept current",
                   "Write every agent's published metrics address (<prefix>/metrics/) to FILE as\n"
                   "Prometheus file_sd JSON, with the labels node and public_ip; then watch etcd\n"
                   "and rewrite FILE (atomically, only when it changes) as agents come and go,\n"
                   "until SIGINT/SIGTERM. - writes to standard output.")
    p.add_argument("file", metavar="FILE", help="the file_sd file, or - for standard output")
    p.add_argument("--once", action="store_true", help="write it once and exit")
    p = _subparser(sub, "doctor", "compare etcd's view of this host with its kernel and files",
                   "Compare what etcd says this host should have with its kernel and files; read\n"
                   "only. Give it the agent's host flags or LEASEAGENT_* variables.")
    p.add_argument("-o", "--output", choices=["text", "json"], default="text",
                   help='one line per problem, or {"ok": ..., "problems": [...]} [default: text]')
    p.add_argument("--json", action="store_const", dest="output", const="json",
                   help="same as -o json")
    envs.append(_EnvDefaults(p, environ))
    add_host_arguments(envs[-1])
    add_traffic_arguments(envs[-1])
    envs[-1].add("--metrics-addr", help="the agent's HOST:PORT (as it was given): ask its "
                 "/readyz whether it is ready, and why not")
    p = _subparser(sub, "docker-opts", "Docker's options from subnet.env, as mk-docker-opts.sh",
                   "Docker's options from subnet.env, byte for byte as flannel's mk-docker-opts.sh\n"
                   "writes them; needs no etcd.")
    p.add_argument("-f", "--subnet-file", default=environ.get(
        "LEASEAGENT_SUBNET_FILE", "/run/leaseagent/subnet.env"),
        help="subnet.env to read [default: /run/leaseagent/subnet.env; $LEASEAGENT_SUBNET_FILE]")
    p.add_argument("-d", "--dest", metavar="FILE",
                   help=f"file to write, - for standard output [default: {DOCKER_OPTS_FILE}; "
                   "with -o daemon-json: standard output]")
    p.add_argument("-o", "--output", choices=["env", "daemon-json"], default="env",
                   help="an environment file, or a daemon.json fragment [default: env]")
    p.add_argument("--daemon-json", action="store_const", dest="output", const="daemon-json",
                   help="same as -o daemon-json")
    p.add_argument("-i", "--individual", action="store_true", help="DOCKER_OPT_* variables")
    p.add_argument("-c", "--combined", action="store_true", help="the combined DOCKER_OPTS variable")
    p.add_argument("-k", "--key", default="DOCKER_OPTS",
                   help="name of the combined variable [default: DOCKER_OPTS]")
    p.add_argument("-m", "--no-ipmasq", action="store_true", help="never emit --ip-masq")
    p = _subparser(sub, "cleanup", "remove what the agent owns on this host (to uninstall)",
                   "Remove what the agent owns on this host, which it leaves in place when it\n"
                   "stops: routes with its protocol, its vxlan devices, its traffic rules\n"
                   "(nftables table, iptables chains, ipset). Stop the agent first. Needs no\n"
                   "etcd; the lease in etcd stays (leasectl release).")
    p.add_argument("--flannel", action="store_true",
                   help="instead, remove what flanneld left (its iptables chains and rules, "
                   "nftables tables, devices and routes the agent does not use): run it with "
                   "the agent running and ready; reads the network config and leases from etcd")
    envs.append(_EnvDefaults(p, environ))
    add_host_arguments(envs[-1])
    add_traffic_arguments(envs[-1])
    p = _subparser(sub, "completion", "print a shell completion script (bash)",
                   "Print a bash completion script for leasectl and leaseagent:\n"
                   "  leasectl completion bash > /usr/share/bash-completion/completions/leasectl")
    p.add_argument("shell", choices=["bash"])
    _accept_etcd_flags_after_command(parser, [*sub.choices.values(), *csub.choices.values()])
    parser.set_defaults(_envs=envs)
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


async def check_against_this_host(network: NetworkConfig) -> list[str]:
    """Refuse (UsageError) a Network that holds an address or the network of the host
    leasectl runs on, as its default-route interface has them: the one thing an agent
    there would refuse that only a host can judge (core.network.host_overlap). What was
    checked, as notes; a host with no default route is not checked (said so)."""
    from leaseagent.dataplane.host import resolve_host

    try:
        host = await resolve_host(None, None)
    except (ConfigError, LeaseagentError) as exc:
        return [f"note: Network not checked against this host's addresses ({exc})"]
    why = host_overlap(network, host.own_addresses(public_ip=f"an address of {host.iface}"))
    if why:
        raise UsageError(f"{why} (checked on this host, interface {host.iface}); agents there "
                         "would refuse it; etcd left unchanged (--no-host-check if leasectl runs "
                         "outside the cluster)")
    addresses = ", ".join(str(a) for a in host.underlay) or str(host.public_ip)
    return [f"note: Network checked against this host's interface {host.iface} ({addresses}); "
            "every agent checks its own"]


async def run(args: argparse.Namespace) -> int:
    from leaseagent.store.etcd import EtcdStore  # loads grpc: only for commands that need etcd

    settings = etcd_settings(args)
    for warning in check_credential_files(settings):
        print(f"leasectl: warning: {warning}", file=sys.stderr)
    store = await EtcdStore.connect(settings)
    try:
        return await COMMANDS[args.cmd](store, KeyLayout(str(args.etcd_prefix)), args)
    finally:
        await store.close()


def main(argv: Sequence[str] | None = None) -> int:
    try:
        argv = sys.argv[1:] if argv is None else list(argv)
        # The unit's settings (its defaults, /etc/default/leaseagent) under this shell's.
        environ = host_environment(os.environ)
        parser = build_parser(environ)
        args = parser.parse_args(argv)
        for env in args._envs:
            env.note_origins(args, argv)
        for warning in unknown_variables(environ):
            print(f"leasectl: warning: {warning}", file=sys.stderr)
        if args.cmd == "docker-opts":
            return cmd_docker_opts(args)
        if args.cmd == "cleanup" and args.flannel:
            args.doctor_settings = doctor.settings_from(args)
            return asyncio.run(run(args))
        if args.cmd == "cleanup":
            from leaseagent.cli.cleanup import cleanup

            for line in asyncio.run(cleanup(doctor.settings_from(args))) or ["nothing to remove"]:
                print(line)
            return 0
        if args.cmd == "completion":
            from leaseagent.cli.completion import bash_completion

            sys.stdout.write(bash_completion())
            return 0
        if args.cmd in ("show", "release", "reserve") and "/" in args.subnet:
            subnet_of(args.subnet, None)  # a CIDR that is wrong is wrong before etcd is asked
        if args.cmd == "config" and args.config_cmd == "set":
            args.config_data = read_config_file(args.file)
            if not args.no_host_check:
                for line in asyncio.run(check_against_this_host(args.config_data[1])):
                    print(f"leasectl: {line}", file=sys.stderr)
        if args.cmd == "prometheus-targets" and args.file != "-":
            check_writable(Path(args.file))  # before etcd is asked anything
        if args.cmd == "doctor":
            args.doctor_settings = doctor.settings_from(args)
        return asyncio.run(run(args))
    except (UsageError, ConfigError) as exc:
        print(f"leasectl: error: {escaped(exc)}", file=sys.stderr)
        return 2
    except LeaseagentError as exc:
        print(f"leasectl: error: {escaped(exc)}", file=sys.stderr)
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
        print(f"leasectl: error: unexpected {type(exc).__name__}: {escaped(exc)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
