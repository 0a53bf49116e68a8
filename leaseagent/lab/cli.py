"""The lab's command line: `python -m leaseagent.lab up|status|down` (wrapped by deploy/lab).

`up` builds the lab, waits until every container reaches a container on
every other host, and prints the lease list and the ping matrix (exit 0 only
if all pairs reach); with `--ipv6` the lab is dual-stack, with one matrix per
IP version, each of which must be complete. `status` prints the same for a
running lab. `down` removes everything the lab made, also after a crash (exit
1 if a namespace is left). Needs root; no output beyond these tables and one
line per problem.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence

from leaseagent.lab.errors import DockerError, LabError, LabExists
from leaseagent.lab.lab import BACKENDS, Lab
from leaseagent.lab.probes import OUTSIDE, Reachability
from leaseagent.lab.topology import CONTAINER_NETWORK6


def print_status(lab: Lab, *, reach: Mapping[int, Reachability] | None = None) -> bool:
    """Hosts, `leasectl list` and the reachability matrix of each IP version; True if
    all pairs reach in every one."""
    print(f"lab {lab.name}: backend {lab.backend}, etcd {lab.endpoints} (in {lab.etcd_ns})"
          + (f", dual-stack (IPv6 {CONTAINER_NETWORK6})" if lab.ipv6 else "")
          + (", real Docker per host" if lab.docker else "")
          + (", --ip-masq" if lab.ip_masq else "")
          + (", nftables" if lab.nftables else ", iptables"))
    if lab.prometheus:
        try:
            url = lab.prometheus_server.url
        except LabError as exc:
            url = f"not running ({exc})"
        print(f"  prometheus {url}  (scrapes every host; rules deploy/prometheus/"
              f"leaseagent-rules.yml; in {lab.topology.prometheus_ns})")
    for host, pid in lab.agents_status():
        state = f"agent pid {pid}" if pid else "agent NOT RUNNING"
        public = f"{host.public_ip} {host.public_ipv6}" if lab.ipv6 else f"{host.public_ip}"
        subnet = f"{host.subnet} {host.subnet6}" if lab.ipv6 else f"{host.subnet}"
        print(f"  {host.name} {host.ns} {public}  subnet {subnet}  mtu {host.mtu}"
              f"  {state}  log {host.log_file}")
        if lab.docker:
            dockerd = lab.dockerd(host)
            running = dockerd.running()
            print(f"     dockerd {'pid ' + str(running.pid) if running else 'NOT RUNNING'}: "
                  f"docker -H unix://{dockerd.socket} ps")
        for c in host.containers:
            print(f"     {'container c' + str(c.index) if lab.docker else c.ns}  {c.ip}"
                  + (f"  {c.ip6}" if lab.ipv6 else ""))
    print("\n$ leasectl list")
    try:
        listing = lab.leasectl("list")
        print((listing.stdout + listing.stderr).rstrip() or "(no output)")
    except LabError as exc:  # the lease table is a nicety; the matrix is the verdict
        print(f"({exc})")
    if reach is None:
        reach = {f: lab.reachability(family=f) for f in lab.families}
    for family in lab.families:
        over = "" if family == 4 else " over IPv6"
        ping = "ping" if family == 4 else "ping -6"
        print(f"\nreachability{over} ({ping} -c 1 -W 1, each container -> first container of "
              "every other host)")
        print(reach[family].format())
    for family in lab.families:
        outside = lab.outside(family=family)
        reached = [c for c, ok in outside.items() if ok]
        print(f"outside host {OUTSIDE[family]} (no route back: masquerade only): reached from "
              f"{len(reached)}/{len(outside)} containers"
              + ("" if lab.ip_masq else " (the lab runs without --ip-masq)"))
    return all(r.all_ok for r in reach.values())


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lab", description="A leaseagent cluster in network namespaces on this machine "
        "(root). Everything it makes is named la-<name>-*; `down` removes it all.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_up = sub.add_parser("up", help="build the lab, start etcd and one agent per host, "
                          "ping all pairs; exit 0 only if all reach")
    p_up.add_argument("--hosts", type=int, default=3)
    p_up.add_argument("--containers", type=int, default=2, help="containers per host")
    p_up.add_argument("--backend", choices=BACKENDS, default="vxlan")
    p_up.add_argument("--lease-ttl", type=int, default=10)
    p_up.add_argument("--timeout", type=float, default=10,
                      help="seconds to wait for all pairs to reach (default 10)")
    p_up.add_argument("--docker", action="store_true",
                      help="a real dockerd per host, started on its agent's options, and "
                      "`docker run` containers (docker.io, busybox-static)")
    p_up.add_argument("--ip-masq", action="store_true",
                      help="the agents masquerade traffic that leaves the cluster network")
    p_up.add_argument("--nftables", action="store_true",
                      help="traffic rules with nftables (the network config's EnableNFTables)")
    p_up.add_argument("--ipv6", action="store_true",
                      help=f"dual-stack: IPv6 on the underlay too, the network config's "
                      f"EnableIPv6 with IPv6Network {CONTAINER_NETWORK6}, containers with both "
                      "families, a matrix per family")
    p_up.add_argument("--prometheus", action=argparse.BooleanOptionalAction, default=None,
                      help="a real Prometheus (Debian's prometheus) scraping every host with "
                      "the shipped alert rules, its URL printed (default: on when "
                      "`prometheus` is installed)")
    p_up.add_argument("--docker-fallback", action="store_true",
                      help="with --docker: if dockerd cannot run here, say why in one line "
                      "and use namespace containers")
    p_status = sub.add_parser("status", help="leasectl list and the reachability matrix")
    p_down = sub.add_parser("down", help="remove everything the lab made (also after a crash)")
    p_down.add_argument("--purge", action="store_true",
                        help="also remove the cached container image (/var/cache/leaseagent-lab)")
    for p in (p_up, p_status, p_down):
        p.add_argument("--name", default="lab", help="lab name (default: lab)")
        p.add_argument("-v", "--verbose", action="store_true")
    p_hosts = sub.add_parser("hosts", help="the systemd lab: hosts booted by systemd-nspawn, "
                             "installed by the README's steps (`hosts up|check|down`)")
    hosts_sub = p_hosts.add_subparsers(dest="hosts_command", required=True)
    h_up = hosts_sub.add_parser("up", help="build the rootfs (cached), boot and install the "
                                "hosts, start their containers")
    h_up.add_argument("--hosts", type=int, default=3)
    h_check = hosts_sub.add_parser("check", help="cross-host pings, restart, watchdog, config "
                                   "error, reboot; exit 0 only if all pass")
    h_check.add_argument("--only", action="append", metavar="CHECK",
                         help="run only this check (repeatable)")
    h_down = hosts_sub.add_parser("down", help="power the hosts off and remove everything")
    h_run = hosts_sub.add_parser("run", help="up, check, down (down also on failure)")
    h_run.add_argument("--hosts", type=int, default=3)
    h_run.add_argument("--keep", action="store_true", help="leave the lab up afterwards")
    for p in (h_up, h_check, h_down, h_run):
        p.add_argument("--name", default="hosts", help="lab name (default: hosts)")
        p.add_argument("-v", "--verbose", action="store_true")
    return parser


def _up(args: argparse.Namespace) -> int:
    docker = args.docker
    prometheus = args.prometheus
    if prometheus is None:
        prometheus = shutil.which("prometheus", path=os.environ.get("PATH", "")
                                  + ":/usr/sbin:/usr/bin") is not None
        if not prometheus:
            print("lab: no prometheus installed (Debian: apt-get install prometheus); "
                  "running without one")
    if docker and args.docker_fallback:
        from leaseagent.lab.docker import unavailable

        why = unavailable()
        if why:
            print(f"lab: dockerd cannot run here ({why}); using namespace containers")
            docker = False
    lab = Lab(args.name, backend=args.backend, lease_ttl=args.lease_ttl, docker=docker,
              ip_masq=args.ip_masq, nftables=args.nftables, ipv6=args.ipv6,
              prometheus=prometheus)
    started = time.monotonic()
    try:
        try:
            lab.up(args.hosts, args.containers)
        except DockerError as exc:
            if not args.docker_fallback:
                raise
            print(f"lab: dockerd did not start ({str(exc).splitlines()[0]}); "
                  "using namespace containers")
            lab.down()
            lab = Lab(args.name, backend=args.backend, lease_ttl=args.lease_ttl,
                      ip_masq=args.ip_masq, nftables=args.nftables, ipv6=args.ipv6,
                      prometheus=prometheus)
            lab.up(args.hosts, args.containers)
    except LabExists:
        raise
    except (LabError, subprocess.SubprocessError) as exc:
        print(f"lab: up failed: {exc}\nlab: the half-built lab is left for "
              f"inspection; remove it with: deploy/lab down --name {args.name}",
              file=sys.stderr)
        return 1
    built = time.monotonic() - started
    reach = lab.wait_reachable_all(timeout=args.timeout)
    reached = time.monotonic() - started  # before the status's own probes and leasectl
    ok = print_status(lab, reach=reach)
    print(f"\nbuilt in {built:.1f}s, all pairs "
          f"{'reachable' if ok else 'NOT reachable'} after {reached:.1f}s")
    return 0 if ok else 1


def _down(args: argparse.Namespace) -> int:
    lab = Lab(args.name)
    for warning in lab.down():
        print(f"lab: {warning}", file=sys.stderr)
    if args.purge:
        from leaseagent.lab.docker import purge_image_cache

        purge_image_cache()
    left = lab.topology.present()
    if left:
        print(f"lab: still present: {', '.join(left)}", file=sys.stderr)
        return 1
    print(f"lab {args.name}: down")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="lab: %(message)s")
    if os.geteuid() != 0:
        print("lab: needs root (network namespaces)", file=sys.stderr)
        return 2
    try:
        if args.command == "hosts":
            from leaseagent.lab.hostcli import hosts

            return hosts(args)
        if args.command == "up":
            return _up(args)
        if args.command == "status":
            return 0 if print_status(Lab.load(args.name)) else 1
        return _down(args)
    except LabError as exc:
        print(f"lab: {exc}", file=sys.stderr)
        return 1
