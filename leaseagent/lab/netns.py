"""Named network namespaces and the links between them, through iproute2.

The one helper for everything that builds namespaces: the lab, the kernel
tests' underlay (tests/netns.py) and the bench (bench/env.py).

- `add` / `delete` a named namespace (`ip netns add`, with `lo` up), `list_namespaces`
  by prefix, `pids` of the processes inside one;
- `veth`: a pair created inside one namespace with its peer placed straight into
  another (`ip -n A link add X type veth peer name Y netns B`) or left beside
  it. The root namespace never holds either end, so deleting the namespaces
  removes every link;
- `bridge`, `link_up`, `address` (IPv6 ones without DAD), `enable_forwarding`: what
  building a topology needs besides;
- `exec_argv` / `run_in`: a command run inside a namespace (`ip netns exec`, which
  execs the program in place, so a PID is the program's own);
- `Namespaces`: the namespaces one user made, deleted newest first by `close`,
  also when building failed half-way.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import TracebackType

from leaseagent.lab.commands import run


def exec_argv(ns: str, argv: Sequence[str]) -> list[str]:
    """`argv` as run inside namespace `ns`."""
    return ["ip", "netns", "exec", ns, *argv]


def run_in(ns: str, argv: Sequence[str], *, check: bool = True, timeout: float | None = 30) -> str:
    """Run `argv` inside `ns`; its stdout (LabError if it fails and `check`)."""
    return run(exec_argv(ns, argv), check=check, timeout=timeout)


def add(name: str) -> str:
    """Create namespace `name` with its loopback up; returns the name."""
    run(["ip", "netns", "add", name])
    run(["ip", "-n", name, "link", "set", "lo", "up"])
    return name


def delete(name: str) -> str | None:
    """Delete namespace `name`; None if done, else iproute2's complaint."""
    try:
        run(["ip", "netns", "del", name])
    except Exception as exc:  # LabError, or iproute2 hanging
        return str(exc)
    return None


def list_namespaces(prefix: str = "") -> list[str]:
    """Names of the namespaces that exist, those starting with `prefix`."""
    out = run(["ip", "netns", "list"])
    names = [line.split()[0] for line in out.splitlines() if line.strip()]
    return [n for n in names if n.startswith(prefix)]


def pids(ns: str) -> list[int]:
    """PIDs of the processes inside `ns` (empty if it is gone)."""
    return [int(p) for p in run(["ip", "netns", "pids", ns], check=False).split()]


def veth(ns: str, name: str, peer: str, *, peer_ns: str | None = None) -> None:
    """A veth pair created in `ns`: `name` stays there, `peer` goes straight into
    `peer_ns` (or stays in `ns`). Both ends are down, without addresses."""
    argv = ["ip", "-n", ns, "link", "add", name, "type", "veth", "peer", "name", peer]
    run(argv + (["netns", peer_ns] if peer_ns is not None else []))


def link_up(ns: str, dev: str, *, master: str | None = None, mtu: int | None = None) -> None:
    """Set `dev` up, optionally as a port of bridge `master` and with `mtu`."""
    argv = ["ip", "-n", ns, "link", "set", dev]
    if master is not None:
        argv += ["master", master]
    if mtu is not None:
        argv += ["mtu", str(mtu)]
    run([*argv, "up"])


def bridge(ns: str, name: str, *, mtu: int | None = None, address: str | None = None) -> None:
    """A bridge `name` in `ns`, optionally with `mtu` and an address (CIDR), up."""
    run(["ip", "-n", ns, "link", "add", name, "type", "bridge"])
    if mtu is not None:
        run(["ip", "-n", ns, "link", "set", name, "mtu", str(mtu)])
    if address is not None:
        run(["ip", "-n", ns, "addr", "add", address, "dev", name])
    link_up(ns, name)


def address(ns: str, dev: str, cidr: str) -> None:
    """Add address `cidr` (e.g. 10.0.0.1/24, fd00::1/64) to `dev`. An IPv6 address is
    added `nodad`: the namespaces' addresses are unique by construction, and a
    tentative address would stay unusable for a second or more of Duplicate Address
    Detection."""
    run(["ip", "-n", ns, "addr", "add", cidr, "dev", dev, *(["nodad"] if ":" in cidr else [])])


def enable_forwarding(ns: str, *, ipv6: bool = False) -> None:
    """IPv4 forwarding (and IPv6's, if `ipv6`) on in `ns` (a new namespace starts with
    both off)."""
    run_in(ns, ["sysctl", "-qw", "net.ipv4.ip_forward=1",
                *(["net.ipv6.conf.all.forwarding=1"] if ipv6 else [])])


class Namespaces:
    """The namespaces one user made; `close` deletes them, newest first.

    As a context manager, `close` runs on the way out whatever happened; a
    namespace whose creation failed half-way is deleted too.
    """

    def __init__(self) -> None:
        self.created: list[str] = []

    def add(self, name: str) -> str:
        self.created.append(name)  # before: a half-made namespace is deleted too
        return add(name)

    def close(self) -> list[str]:
        """Delete every namespace made here; the complaints of those that would not go."""
        problems = []
        for name in reversed(self.created):
            if name in list_namespaces(name) and (problem := delete(name)) is not None:
                problems.append(problem)
        self.created.clear()
        return problems

    def __enter__(self) -> Namespaces:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
