"""Looking at a running lab: ping, the reachability matrix, HTTP to an agent, metrics,
and the kernel entries of a host.

Traffic only goes to addresses inside the lab's namespaces: every ping target
is checked against the underlay (10.250.0.0/24, fd00:250::/64) and the
container network (10.244.0.0/16, fd00:244::/56), and HTTP goes to an agent's
metrics address on the loopback of its own host namespace.

The matrix and the outside check are per IP version (`family` 4 or 6): the
same pairs, each container's address of that family, `ping -6` for IPv6.
"""

from __future__ import annotations

import math
import re
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network, ip_address

from leaseagent.lab import netns
from leaseagent.lab.commands import run, tool
from leaseagent.lab.errors import LabError
from leaseagent.lab.topology import (
    CONTAINER_NETWORK,
    CONTAINER_NETWORK6,
    OUTSIDE_IP,
    OUTSIDE_IP6,
    UNDERLAY,
    UNDERLAY6,
    Address,
    Container,
    Host,
    short,
)

_PING_RE = re.compile(r"(\d+) packets transmitted, (\d+) (?:packets )?received")


def parse_ping_summary(text: str) -> tuple[int, int]:
    """(transmitted, received) from ping's summary line; (0, 0) if there is none."""
    m = _PING_RE.search(text)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


# By IP version: the lab's networks (the only ping targets) and its outside host.
LAB_NETWORKS: dict[int, tuple[IPv4Network | IPv6Network, ...]] = {
    4: (UNDERLAY, CONTAINER_NETWORK), 6: (UNDERLAY6, CONTAINER_NETWORK6)}
OUTSIDE: dict[int, Address] = {4: OUTSIDE_IP, 6: OUTSIDE_IP6}


def check_target(ip: Address | str) -> Address:
    """`ip` if it is a lab address; LabError otherwise (the lab sends nothing elsewhere)."""
    addr = ip_address(str(ip))
    if not any(addr in net for net in LAB_NETWORKS[addr.version]):
        raise LabError(f"{addr} is not a lab address")
    return addr


Source = str | Container  # a namespace, or a container (Docker's too)


def _ping_words(to_ip: Address | str, *options: str, quiet: bool = True) -> list[str]:
    target = check_target(to_ip)
    return ["ping", *(["-6"] if target.version == 6 else []), "-n", *(["-q"] if quiet else []),
            *options, str(target)]


def _ping_argv(source: Source, to_ip: Address | str, *options: str,
               quiet: bool = True) -> list[str]:
    argv = _ping_words(to_ip, *options, quiet=quiet)
    if isinstance(source, Container):
        return source.exec_argv(argv)
    return netns.exec_argv(source, argv)


def ping(source: Source, to_ip: Address | str, *, count: int = 1, wait: float = 1,
         interval: float = 1) -> bool:
    """Any of `count` pings, `interval` s apart (root may go below 0.2 s), answered within
    `wait` s of the last. `-i` only when not ping's own 1 s (what every ping here knows)."""
    spacing = ("-i", f"{interval:g}") if interval != 1 else ()
    proc = subprocess.run(_ping_argv(source, to_ip, "-c", str(count), *spacing, "-W", str(wait)),
                          capture_output=True, stdin=subprocess.DEVNULL, check=False)
    return proc.returncode == 0


REPLY_WAIT = 1  # s: a background ping's -W


def ping_background(source: Source, to_ip: Address | str, *, count: int,
                    interval: float) -> subprocess.Popen[str]:
    """`count` pings, one every `interval` s (root may go below 0.2 s); read the
    outcome with `parse_ping_summary` on its stdout. A count, not a deadline, so
    the last reply is waited for instead of being counted lost."""
    return subprocess.Popen(
        _ping_argv(source, to_ip, "-c", str(count), "-i", str(interval), "-W", str(REPLY_WAIT)),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
    )


_REPLY_RE = re.compile(r"icmp_seq=(\d+)")


class PingRun:
    """A ping every `interval` s from a namespace (or a namespace container) until `stop`,
    each reply listed by number: what was lost is known exactly, however long it ran,
    so a test stops it once what it watches is over instead of waiting out a count."""

    def __init__(self, source: Source, to_ip: Address | str, *, interval: float,
                 netns_path: str | None = None) -> None:
        """`netns_path`: for a Docker container, its network namespace
        (`/proc/<its pid>/ns/net`), where the host's ping runs: docker exec does not pass
        SIGINT on to ping."""
        options = ("-i", str(interval), "-W", str(REPLY_WAIT))
        if netns_path is not None:
            argv = [tool("nsenter"), f"--net={netns_path}",
                    *_ping_words(to_ip, *options, quiet=False)]
        elif isinstance(source, Container) and source.via is not None:
            raise LabError("PingRun: a Docker container needs its netns_path (docker exec "
                           "does not pass SIGINT on to ping)")
        else:
            argv = _ping_argv(source, to_ip, *options, quiet=False)
        self.interval = interval
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, text=True)

    def running(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> tuple[int, list[int], str]:
        """SIGINT (ping then prints its summary): (pings sent, the numbers of those sent
        more than REPLY_WAIT s before the stop that were never answered, the output).
        The pings of that last second may still be on their way: neither counted lost
        nor answered. Stop it at least that long after what it watches."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            out, _ = self.proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
        sent, _ = parse_ping_summary(out)
        answered = {int(n) for n in _REPLY_RE.findall(out)}
        settled = sent - math.ceil(REPLY_WAIT / self.interval)
        return sent, [n for n in range(1, settled + 1) if n not in answered], out


# --------------------------------------------------------------------------- reachability


@dataclass(frozen=True)
class Reachability:
    """Ping results over IP version `family`: rows are source containers, columns are
    hosts (their first container)."""

    rows: list[Container]
    columns: list[Host]
    cells: dict[tuple[str, str], bool]  # (source container ns, target host ns) -> reached
    family: int = 4

    @property
    def all_ok(self) -> bool:
        return all(self.cells.values())

    @property
    def failures(self) -> list[tuple[str, str]]:
        return [pair for pair, ok in self.cells.items() if not ok]

    def format(self) -> str:
        def label(c: Container) -> str:
            return f"{short(c.ns)} {c.address(self.family)}"

        heads = [label(h.containers[0]) for h in self.columns]
        first = max([len("from \\ to")] + [len(label(c)) for c in self.rows])
        width = max([4] + [len(h) for h in heads])
        lines = ["from \\ to".ljust(first) + "  " + "  ".join(h.ljust(width) for h in heads)]
        for c in self.rows:
            marks = []
            for h in self.columns:
                ok = self.cells.get((c.ns, h.ns))
                marks.append({None: "-", True: "ok", False: "FAIL"}[ok].ljust(width))
            lines.append((label(c).ljust(first) + "  " + "  ".join(marks)).rstrip())
        total, good = len(self.cells), sum(self.cells.values())
        lines.append(f"{good}/{total} cross-host pairs reachable"
                     + (" over IPv6" if self.family == 6 else ""))
        return "\n".join(lines)


def pairs(hosts: Sequence[Host]) -> list[tuple[Container, Host]]:
    """Every container, to the first container of every other host."""
    hosts = [h for h in hosts if h.containers]
    return [(c, h) for src in hosts for c in src.containers for h in hosts if h is not src]


def _ping_once(todo: Sequence[tuple[Container, Address]], *, wait: float) -> list[bool]:
    """One ping per (source, target), all at once; whether each was answered."""
    procs = [subprocess.Popen(_ping_argv(c, to, "-c", "1", "-W", str(wait)),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              stdin=subprocess.DEVNULL)
             for c, to in todo]
    return [p.wait() == 0 for p in procs]


def reachability(hosts: Sequence[Host], todo: Sequence[tuple[Container, Host]] | None = None,
                 *, wait: float = 1, family: int = 4) -> Reachability:
    """One ping per pair (`ping -c 1 -W wait`, over IP version `family`), all pairs at
    once."""
    todo = pairs(hosts) if todo is None else list(todo)
    answered = _ping_once([(c, h.containers[0].address(family)) for c, h in todo], wait=wait)
    cells = {(c.ns, h.ns): ok for (c, h), ok in zip(todo, answered, strict=True)}
    columns = [h for h in hosts if h.containers]
    return Reachability(rows=[c for h in columns for c in h.containers], columns=columns,
                        cells=cells, family=family)


def outside(hosts: Sequence[Host], *, wait: float = 1, family: int = 4) -> dict[str, bool]:
    """Which containers reach the outside host over IP version `family` (it has no route
    back: only a masquerade makes its reply find them); by container label."""
    todo = [c for h in hosts for c in h.containers]
    answered = _ping_once([(c, OUTSIDE[family]) for c in todo], wait=wait)
    return {short(c.ns): ok for c, ok in zip(todo, answered, strict=True)}


def wait_reachable(hosts: Sequence[Host], *, timeout: float = 10, wait: float = 1,
                   family: int = 4) -> Reachability:
    """Ping all pairs, re-ping only the failed ones until all reach or `timeout`."""
    deadline = time.monotonic() + timeout
    result = reachability(hosts, wait=wait, family=family)
    while not result.all_ok and time.monotonic() < deadline:
        time.sleep(0.05)
        todo = [(c, h) for (c, h) in pairs(hosts) if not result.cells[(c.ns, h.ns)]]
        again = reachability(hosts, todo, wait=wait, family=family)
        result = Reachability(rows=result.rows, columns=result.columns,
                              cells={**result.cells, **again.cells}, family=family)
    return result


# --------------------------------------------------------------------------- HTTP, metrics

_HTTP_GET = """\
import sys, urllib.request as u, urllib.error as e
try:
    r = u.urlopen(sys.argv[1], timeout=float(sys.argv[2]))
    print(r.status); sys.stdout.write(r.read().decode())
except e.HTTPError as x:
    print(x.code); sys.stdout.write(x.read().decode())
except Exception as x:
    print(0); sys.stdout.write(str(x))
"""


def http_get(ns: str, url: str, *, timeout: float = 2) -> tuple[int, str]:
    """(status, body) of GET `url` from inside namespace `ns`; status 0 if nothing
    answered."""
    proc = subprocess.run(
        netns.exec_argv(ns, [sys.executable, "-c", _HTTP_GET, url, str(timeout)]),
        capture_output=True, text=True, stdin=subprocess.DEVNULL, check=False,
        timeout=timeout + 10,
    )
    status, _, body = proc.stdout.partition("\n")
    try:
        return int(status), body
    except ValueError:
        return 0, proc.stderr


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text exposition -> {'name{label="value",...}': value}, labels in the
    order the text gives them (so keys read as the exposition's lines)."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{_escape(v)}"' for k, v in sample.labels.items())
            out[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return out


# --------------------------------------------------------------------------- kernel


def kernel_entries(host: Host, peer: IPv4Network | IPv6Network, vtep_mac: str | None = None
                   ) -> list[str]:
    """What `host`'s kernel holds for a peer subnet of either family: routes to it,
    neighbour entries for its first address (the vxlan gateway, .0 or ::), FDB entries
    for its VTEP MAC (the IPv6 device's own for an IPv6 subnet)."""
    ns, family = host.ns, f"-{peer.version}"  # iproute2 lists IPv4 unless told
    found = [f"route {line}" for line in
             run(["ip", "-n", ns, family, "route", "show", "exact", str(peer)]).splitlines()]
    found += [f"neigh {line}" for line in
              run(["ip", "-n", ns, family, "neigh", "show", "to", str(peer.network_address)])
              .splitlines()]
    if vtep_mac:
        found += [f"fdb {line}" for line in run(["bridge", "-n", ns, "fdb", "show"])
                  .splitlines() if line.lower().startswith(vtep_mac.lower())]
    return found


def kernel_state(host: Host, *, route_protocol: int = 76) -> dict[str, list[str]]:
    """Everything the data plane owns in `host`'s kernel, as sorted text lines:
    routes of the agent's protocol, neighbours and FDB entries of its vxlan
    devices, and the devices' addresses (IPv6 ones too, in a dual-stack lab; an IPv4
    lab has none): for before/after comparisons."""
    ns = host.ns
    devs = [line.split(":")[1].strip().split("@")[0]
            for line in run(["ip", "-n", ns, "-o", "link", "show", "type", "vxlan"]).splitlines()]
    state: dict[str, list[str]] = {
        "route": [line for family in ("-4", "-6") for line in run(
            ["ip", "-n", ns, family, "route", "show", "proto", str(route_protocol)]).splitlines()],
        "neigh": [], "fdb": [], "addr": [],
    }
    for dev in devs:
        state["neigh"] += run(["ip", "-n", ns, "neigh", "show", "dev", dev]).splitlines()
        state["fdb"] += run(["bridge", "-n", ns, "fdb", "show", "dev", dev]).splitlines()
        state["addr"] += run(["ip", "-n", ns, "-4", "-o", "addr", "show", "dev", dev]).splitlines()
        state["addr"] += run(["ip", "-n", ns, "-6", "-o", "addr", "show", "dev", dev, "scope",
                              "global"]).splitlines()
    return {k: sorted(v) for k, v in state.items()}
