"""`down`: remove everything a lab made, from its name alone, also after a crash.

Order: the processes recorded in pid files (the systemd lab's machines, Docker's
restart hooks, dockerd, agents, then etcd; each checked against its start time, so a recycled PID is
never hit), then what a dockerd that died left running (its containers'
processes, found by container id in their cgroup; its containerd and shims,
strays in the host namespace), then strays found inside the lab's
namespaces, then the namespaces (containers, hosts, etcd, underlay), then
the machines' roots and cgroups, whatever dockerd left mounted under the state
dir, then the state dir (only once nothing is mounted in it).

A stray is a process in a lab namespace whose command line names the lab's
state dir (spawned just before a crash, its pid file never written) or that
is one of the lab's helpers (ping, etcdctl, leasectl) or wireguard-go (which
the wireguard backend's agents start and, on purpose, never stop); anything
else in there is reported, not killed, and its namespace lives on until it
exits.
"""

from __future__ import annotations

import signal
from pathlib import Path

from leaseagent.lab import docker, machines, netns, processes
from leaseagent.lab.processes import Process
from leaseagent.lab.state import StateDir
from leaseagent.lab.topology import Topology

# Short-lived programs the lab runs inside its namespaces (argv[0], or argv[1] for a
# Python console script); `down` may stop them when a crash left them behind.
HELPERS = frozenset({"ping", "etcdctl", "leasectl", "wireguard-go"})


def down(topology: Topology, state: StateDir) -> list[str]:
    """Remove the lab; returns warnings (empty when everything went)."""
    warnings: list[str] = []
    # A machine's init outlives a SIGKILLed nspawn: known before, killed after.
    inits = machines.inits(state.path)
    for group in state.pid_files():
        procs = [p for f in group if (p := processes.running(f)) is not None]
        processes.stop(procs, first=signal.SIGTERM, grace=30)
    processes.stop(inits, first=signal.SIGKILL, grace=5)
    processes.stop(docker.leftover_container_processes(state.path), first=signal.SIGKILL,
                   grace=5)

    ours = topology.present()
    warnings += stop_strays(ours, state)

    for ns in topology.removal_order(ours):
        problem = netns.delete(ns)
        if problem is not None:
            warnings.append(problem)
    for machine_dir in sorted(state.path.glob("h*/machine.pid")):
        warnings += machines.remove_leftovers(f"{topology.name}-{machine_dir.parent.name}",
                                              machine_dir.parent)
    warnings += docker.unmount_under(state.path)
    if docker.mounted_under(state.path):
        warnings.append(f"{state.path} left in place: something is still mounted in it")
    else:
        state.remove()
    return warnings


def stop_strays(namespaces: list[str], state: StateDir) -> list[str]:
    """Stop the lab's processes left in `namespaces` (see the module docstring); warnings
    for the others, which are left running."""
    warnings: list[str] = []
    strays: list[Process] = []
    for ns in namespaces:
        for pid in netns.pids(ns):
            start = processes.start_time(pid)
            argv = processes.cmdline(pid)
            if start is None or not argv:
                continue  # gone meanwhile, or a kernel thread
            if any(str(state.path) in a for a in argv) or any(
                Path(a).name in HELPERS for a in argv[:2]
            ):
                strays.append(Process(pid, start))
            else:
                warnings.append(f"{ns}: pid {pid} ({' '.join(argv)[:80]}) not started by "
                                "the lab; left running, the namespace lives on until it exits")
    processes.stop(strays, first=signal.SIGTERM, grace=5)
    return warnings
