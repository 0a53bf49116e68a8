"""Faults the tests inflict on a namespace lab (leaseagent.lab.Lab): etcd stopped, started
again, paused, resumed, or cut off from one host.

Built on the lab's own handles: `Lab.etcd` (the shared etcd launcher, which
stops by PID with a start-time check) and the host's namespace. An agent is
killed with `lab.stop_agent(host, sig=signal.SIGKILL)`. A paused etcd needs no
resume before `Lab.down`: stopping sends SIGCONT first.
"""

from __future__ import annotations

import signal

from etcd_cluster import pause_member, resume_member

from leaseagent.lab import ETCD_IP, Host, Lab, LabError, run


def stop_etcd(lab: Lab, sig: int = signal.SIGKILL) -> None:
    """Stop the lab's etcd (by its recorded PID) and wait until it has exited; its
    data dir stays, so `start_etcd` brings the same cluster back."""
    lab.etcd.stop_member(0, sig=sig)


def start_etcd(lab: Lab, *, timeout: float = 30) -> None:
    """Start the lab's etcd again on its data dir; returns once it is healthy.
    etcd extends every lease by its full TTL when it starts (lessor promotion), so
    a stop longer than the TTL expires nobody."""
    if lab.etcd.members[0].running:
        raise LabError("etcd already running")
    lab.etcd.start(timeout=timeout)


def pause_etcd(lab: Lab) -> None:
    """SIGSTOP etcd: connections stay open and unanswered (a hung server)."""
    if not lab.etcd.members[0].running:
        raise LabError("etcd is not running")
    pause_member(lab.etcd, 0)


def resume_etcd(lab: Lab) -> None:
    """SIGCONT etcd (harmless if it was not paused)."""
    resume_member(lab.etcd, 0)


def cut_etcd(lab: Lab, host: Host) -> None:
    """Cut `host` off from etcd (and nothing else: the underlay to its peers stays):
    a blackhole route to etcd's address in the host's namespace, so every packet
    to etcd is dropped and new connections fail. `heal_etcd` removes it."""
    run(["ip", "-n", host.ns, "route", "replace", "blackhole", f"{ETCD_IP}/32"])


def heal_etcd(lab: Lab, host: Host) -> None:
    run(["ip", "-n", host.ns, "route", "del", "blackhole", f"{ETCD_IP}/32"], check=False)
