"""`deploy/lab hosts up|check|down|run`: the systemd lab's command line (leaseagent.lab.hostlab).

`up` prints the hosts and the times (root filesystem, boot to running per
host, install); `check` one line per check with its time and a total, exit 0
only if all pass; `down` removes everything (exit 1 if something is left);
`run` is up, check and down, down also when up or a check failed.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

from leaseagent.lab.errors import LabError, LabExists
from leaseagent.lab.hostlab import HostLab, Result, check


def _print_up(lab: HostLab) -> None:
    for i, m in lab.machines.items():
        host, proc = lab.hosts[i], m.running()
        print(f"  h{i} {host.ns} {host.public_ip}  subnet {lab.subnet(i)}  machine {m.name} "
              f"(nspawn pid {proc.pid if proc else '-'}): "
              f"nsenter --target {m.leader()} --all bash")
    for line in lab.timing.lines():
        print(f"  {line}")


def _print_check(results: list[Result], seconds: float) -> bool:
    for r in results:
        print(f"  {'ok  ' if r.ok else 'FAIL'} {r.name} ({r.seconds:.1f}s): {r.detail}")
    ok = all(r.ok for r in results)
    print(f"check {'passed' if ok else 'FAILED'} in {seconds:.1f}s")
    return ok


def _down(lab: HostLab) -> int:
    for warning in lab.down():
        print(f"lab: {warning}", file=sys.stderr)
    left = lab.topology.present()
    if left or lab.state.exists():
        print(f"lab: still present: {', '.join(left) or lab.state.path}", file=sys.stderr)
        return 1
    print(f"lab {lab.name}: down")
    return 0


def hosts(args: argparse.Namespace) -> int:
    if args.hosts_command == "down":
        return _down(HostLab(args.name))
    if args.hosts_command == "check":
        lab = HostLab.load(args.name)
        started = time.monotonic()
        results = check(lab, args.only)
        return 0 if _print_check(results, time.monotonic() - started) else 1
    lab = HostLab(args.name)
    try:
        lab.up(args.hosts)
    except LabExists:
        raise
    except (LabError, OSError, subprocess.SubprocessError) as exc:
        print(f"lab: hosts up failed: {exc}", file=sys.stderr)
        if args.hosts_command == "run" and not args.keep:
            _down(lab)
        else:
            print(f"lab: left for inspection; remove it with: deploy/lab hosts down --name "
                  f"{args.name}", file=sys.stderr)
        return 1
    print(f"lab {lab.name}: {len(lab.machines)} systemd hosts, etcd {lab.etcd.endpoints}")
    _print_up(lab)
    if args.hosts_command == "up":
        return 0
    started = time.monotonic()
    try:
        ok = _print_check(check(lab), time.monotonic() - started)
    finally:
        if not args.keep:
            _down(lab)
    return 0 if ok else 1
