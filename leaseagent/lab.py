"""The lab: a cluster of hosts, etcd and containers on one machine, in network namespaces.

    la-<name>-ul      underlay: bridge ul0 (10.250.0.1/24), one veth port per host and etcd
    la-<name>-etcd    etcd at 10.250.0.2:2379, data under the state dir
    la-<name>-h<i>    host i: eth0 10.250.0.<10+i>/24, ip_forward on, one leaseagent,
                      bridge br0 = FLANNEL_SUBNET from that agent's subnet.env (what
                      `dockerd --bip` does), MTU = FLANNEL_MTU
    la-<name>-c<i>-<j> container j of host i: eth0 on host i's br0, address .<1+j> of the
                      host's subnet, default route via the bridge (as Pipework does)

Used by the CLI (`python -m leaseagent.lab up|status|down`, wrapped by
deploy/lab), by the end-to-end tests (`Lab` as a context manager) and by the
README's demo.

Invariants, so that `down` is safe to run at any time, even after the process
that ran `up` was killed:

- Everything the lab makes carries its name: namespace names match
  `la-<name>-(ul|etcd|h<i>|c<i>-<j>)`, and `down` touches no other namespace.
- The root namespace gets nothing: each veth pair is created inside one lab
  namespace with its peer placed straight into another (`ip -n A link add ...
  peer name X netns B`), so deleting the lab's namespaces removes every link.
- Every process the lab starts (etcd, agents) is recorded in a pid file under
  /run/leaseagent-lab/<name>/ as "<pid> <start time>", written before anything
  waits on it; `down` stops exactly those PIDs (SIGTERM, then SIGKILL; agents
  before etcd), after checking the start time so a recycled PID is never hit.
  It also stops any process found inside the lab's namespaces whose command
  line names the lab's state dir (spawned just before a crash, its pid file
  never written) or that is one of the lab's helpers (ping, etcdctl,
  leasectl); anything else in there is reported, not killed.
- Traffic only goes to addresses inside the lab's namespaces: 10.250.0.0/24
  on the underlay, 10.244.0.0/16 for containers.

Processes are started in their own session, so agents and etcd outlive a CLI
`up` (the lab keeps running until `down`) and a Ctrl-C at the terminal does
not reach them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from pathlib import Path
from types import TracebackType

from leaseagent.core.subnetenv import parse_subnet_env

log = logging.getLogger("leaseagent.lab")

STATE_ROOT = Path("/run/leaseagent-lab")
UNDERLAY = IPv4Network("10.250.0.0/24")
UNDERLAY_GW = IPv4Address("10.250.0.1")
ETCD_IP = IPv4Address("10.250.0.2")
HOST_IP_BASE = 10  # host i is 10.250.0.<10+i>
CONTAINER_NETWORK = IPv4Network("10.244.0.0/16")
ETCD_PREFIX = "/coreos.com/network"
BACKENDS = ("vxlan", "host-gw", "alloc")
# Inside each host namespace, so every agent can use the same port.
METRICS_ADDR = "127.0.0.1:9464"
_NAME_RE = re.compile(r"^[a-z0-9]{1,12}$")
# Short-lived programs the lab runs inside its namespaces (argv[0], or argv[1] for a
# Python console script); `down` may stop them when a crash left them behind.
_HELPERS = frozenset({"ping", "etcdctl", "leasectl"})
_INSTALL_HINTS = {
    "etcd": "apt-get install --no-install-recommends etcd-server",
    "etcdctl": "apt-get install --no-install-recommends etcd-client",
    "ping": "apt-get install --no-install-recommends iputils-ping",
    "leaseagent": "pip install -e . in the venv that runs the lab",
    "leasectl": "pip install -e . in the venv that runs the lab",
}
_PING_RE = re.compile(r"(\d+) packets transmitted, (\d+) (?:packets )?received")


class LabError(RuntimeError):
    """The lab could not be built, queried or taken down; the message says which step."""


class LabExists(LabError):
    """`up` found namespaces or a state dir of a lab with the same name."""


# --------------------------------------------------------------------------- model


@dataclass
class Container:
    ns: str
    ip: IPv4Address
    index: int


@dataclass
class Host:
    index: int
    ns: str
    public_ip: IPv4Address
    dir: Path
    subnet: IPv4Interface | None = None  # FLANNEL_SUBNET: the bridge's address / lease length
    mtu: int | None = None
    containers: list[Container] = field(default_factory=list)
    # time.monotonic() when the lab first saw this host's subnet.env (the agent writes
    # it right after its lease is in etcd): the start of "how soon do peers reach it".
    subnet_seen_at: float | None = None

    @property
    def name(self) -> str:
        return f"h{self.index}"

    @property
    def subnet_file(self) -> Path:
        return self.dir / "subnet.env"

    @property
    def pid_file(self) -> Path:
        return self.dir / "agent.pid"

    @property
    def log_file(self) -> Path:
        return self.dir / "agent.log"


@dataclass(frozen=True)
class Reachability:
    """Ping results: rows are source containers, columns are hosts (their first container)."""

    rows: list[Container]
    columns: list[Host]
    cells: dict[tuple[str, str], bool]  # (source container ns, target host ns) -> reached

    @property
    def all_ok(self) -> bool:
        return all(self.cells.values())

    @property
    def failures(self) -> list[tuple[str, str]]:
        return [pair for pair, ok in self.cells.items() if not ok]

    def format(self) -> str:
        def label(c: Container) -> str:
            return f"{_short(c.ns)} {c.ip}"

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
        lines.append(f"{good}/{total} cross-host pairs reachable")
        return "\n".join(lines)


def _short(ns: str) -> str:
    """`la-demo-c2-1` -> `c2-1`: the part after the lab prefix, for tables."""
    return ns.split("-", 2)[2]


# --------------------------------------------------------------------------- helpers


def run(argv: Sequence[str], *, check: bool = True, timeout: float = 30) -> str:
    """Run a command, return stdout; LabError with its stderr when it fails."""
    proc = subprocess.run(
        list(argv), capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
    )
    if check and proc.returncode != 0:
        raise LabError(f"{' '.join(argv)}: exit {proc.returncode}: {proc.stderr.strip()}")
    return proc.stdout


def _start_time(pid: int) -> int | None:
    """Field 22 of /proc/<pid>/stat (start time in clock ticks), or None if gone/zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    rest = stat[stat.rindex(")") + 2 :].split()
    if rest[0] == "Z":
        return None
    return int(rest[19])


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def parse_ping_summary(text: str) -> tuple[int, int]:
    """(transmitted, received) from ping's summary line; (0, 0) if there is none."""
    m = _PING_RE.search(text)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text exposition -> {'name{labels}': value}; comments skipped."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        with contextlib.suppress(ValueError):
            out[name] = float(value)
    return out


def list_namespaces() -> list[str]:
    out = run(["ip", "netns", "list"])
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def tool(name: str) -> str:
    """Path of a program: leaseagent/leasectl from the running venv, others from PATH."""
    if name in ("leaseagent", "leasectl"):
        # The venv's bin dir, without resolving symlinks (the venv python is usually
        # a symlink to the system one, whose bin dir has no leaseagent).
        candidate = Path(sys.executable).parent / name
        if candidate.exists():
            return str(candidate)
    # sudo resets PATH; the Debian packages put everything in /usr/bin or /usr/sbin.
    found = shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/usr/bin")
    if not found:
        raise LabError(f"{name} not found; {_INSTALL_HINTS.get(name, 'install it')}")
    return found


# --------------------------------------------------------------------------- the lab


class Lab:
    """One lab, by name. Build with `up`, query with `reachability`, remove with `down`.

    Sync API, safe to use from pytest fixtures; as a context manager it always
    calls `down` on exit, also when the body raised.
    """

    def __init__(
        self,
        name: str = "lab",
        *,
        backend: str = "vxlan",
        lease_ttl: int = 10,
        state_root: Path = STATE_ROOT,
        agent_args: Sequence[str] = (),
        agent_command: Sequence[str] | None = None,
        host_agent_args: Mapping[int, Sequence[str]] | None = None,
    ) -> None:
        if not _NAME_RE.match(name):
            raise LabError(f"lab name {name!r}: use 1-12 lowercase letters or digits")
        if backend not in BACKENDS:
            raise LabError(f"backend {backend!r}: one of {', '.join(BACKENDS)}")
        self.name = name
        self.backend = backend
        self.lease_ttl = lease_ttl
        self.agent_args = list(agent_args)
        # Extra flags for one host's agent (by host index), after `agent_args`, so
        # e.g. a second --lease-ttl wins for that host; read at each start_agent.
        self.host_agent_args: dict[int, list[str]] = {
            i: list(a) for i, a in (host_agent_args or {}).items()}
        # Lets the lab's own parts be exercised with a stand-in agent.
        self.agent_command = list(agent_command) if agent_command else None
        self.dir = state_root / name
        self.ul_ns = self.ns("ul")
        self.etcd_ns = self.ns("etcd")
        self.hosts: dict[int, Host] = {}
        self.containers_per_host = 2
        # Children of this process, so they can be reaped; a later `down` from
        # another process goes by pid files instead.
        self._children: dict[int, subprocess.Popen[bytes]] = {}

    # ---------------------------------------------------------------- naming

    def ns(self, suffix: str) -> str:
        return f"la-{self.name}-{suffix}"

    def owns(self, ns: str) -> bool:
        """True for exactly the namespace names this lab makes. The whole shape is
        matched, not just the prefix, so a namespace someone else named `la-lab-foo`
        is never touched."""
        return re.fullmatch(rf"la-{self.name}-(ul|etcd|h\d+|c\d+-\d+)", ns) is not None

    @property
    def endpoints(self) -> str:
        return f"http://{ETCD_IP}:2379"

    # ---------------------------------------------------------------- context manager

    def __enter__(self) -> Lab:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.down()

    # ---------------------------------------------------------------- state file

    def _save(self) -> None:
        doc = {
            "name": self.name,
            "backend": self.backend,
            "lease_ttl": self.lease_ttl,
            "containers_per_host": self.containers_per_host,
            "hosts": [
                {
                    "index": h.index,
                    "subnet": str(h.subnet) if h.subnet else None,
                    "mtu": h.mtu,
                    "containers": [{"index": c.index, "ip": str(c.ip)} for c in h.containers],
                }
                for h in self.hosts.values()
            ],
        }
        _write_atomic(self.dir / "state.json", json.dumps(doc, indent=2) + "\n")

    @classmethod
    def load(cls, name: str, *, state_root: Path = STATE_ROOT) -> Lab:
        """The lab `up` built earlier (possibly from another process), from its state file."""
        path = state_root / name / "state.json"
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise LabError(f"no lab {name!r} ({path}: {exc})") from exc
        lab = cls(name, backend=doc["backend"], lease_ttl=doc["lease_ttl"], state_root=state_root)
        lab.containers_per_host = doc["containers_per_host"]
        for h in doc["hosts"]:
            host = lab._host_record(h["index"])
            host.subnet = IPv4Interface(h["subnet"]) if h["subnet"] else None
            host.mtu = h["mtu"]
            host.containers = [
                Container(ns=lab.ns(f"c{host.index}-{c['index']}"), ip=IPv4Address(c["ip"]),
                          index=c["index"])
                for c in h["containers"]
            ]
            lab.hosts[host.index] = host
        return lab

    def _host_record(self, index: int) -> Host:
        return Host(
            index=index,
            ns=self.ns(f"h{index}"),
            public_ip=UNDERLAY_GW + HOST_IP_BASE - 1 + index,
            dir=self.dir / f"h{index}",
        )

    # ---------------------------------------------------------------- up

    def up(self, hosts: int = 3, containers: int = 2, *, timeout: float = 30) -> None:
        """Underlay, etcd, network config, then `hosts` hosts with `containers` each.

        Returns once every host has its bridge and containers; reachability is
        checked separately (`wait_reachable`), so a test can time it.
        """
        if not 1 <= hosts <= 200:
            raise LabError("hosts: 1..200")
        if not 0 <= containers <= 200:
            raise LabError("containers: 0..200")
        leftovers = [ns for ns in list_namespaces() if self.owns(ns)]
        if leftovers or self.dir.exists():
            raise LabExists(
                f"lab {self.name!r} exists ({', '.join(leftovers) or self.dir}); "
                f"run: deploy/lab down --name {self.name}"
            )
        self.containers_per_host = containers
        self.dir.mkdir(parents=True)
        self._save()
        self._make_underlay()
        self._start_etcd(timeout=timeout)
        self._write_network_config()
        new = [self._make_host(i) for i in range(1, hosts + 1)]
        for host in new:
            self.start_agent(host)
        for host in new:
            self._wire_containers(host, timeout=timeout)

    def add_host(self, containers: int | None = None, *, timeout: float = 30) -> Host:
        """One more host (next free index), its agent, bridge and containers."""
        index = max(self.hosts, default=0) + 1
        host = self._make_host(index)
        self.start_agent(host)
        self._wire_containers(
            host, count=self.containers_per_host if containers is None else containers,
            timeout=timeout,
        )
        return host

    def _make_underlay(self) -> None:
        ul = self.ul_ns
        self._netns_add(ul)
        run(["ip", "-n", ul, "link", "add", "ul0", "type", "bridge"])
        run(["ip", "-n", ul, "addr", "add", f"{UNDERLAY_GW}/{UNDERLAY.prefixlen}", "dev", "ul0"])
        run(["ip", "-n", ul, "link", "set", "ul0", "up"])
        self._attach_to_underlay(self.etcd_ns, port="etcd", ip=ETCD_IP)

    def _netns_add(self, ns: str) -> None:
        run(["ip", "netns", "add", ns])
        run(["ip", "-n", ns, "link", "set", "lo", "up"])

    def _attach_to_underlay(self, ns: str, *, port: str, ip: IPv4Address) -> None:
        """New namespace `ns` with eth0 at `ip`, its peer `port` a port of ul0."""
        self._netns_add(ns)
        run(["ip", "-n", ns, "link", "add", "eth0", "type", "veth",
             "peer", "name", port, "netns", self.ul_ns])
        run(["ip", "-n", self.ul_ns, "link", "set", port, "master", "ul0", "up"])
        run(["ip", "-n", ns, "addr", "add", f"{ip}/{UNDERLAY.prefixlen}", "dev", "eth0"])
        run(["ip", "-n", ns, "link", "set", "eth0", "up"])
        run(["ip", "-n", ns, "route", "add", "default", "via", str(UNDERLAY_GW)])

    def _make_host(self, index: int) -> Host:
        host = self._host_record(index)
        if host.public_ip not in UNDERLAY or host.public_ip == UNDERLAY.broadcast_address:
            raise LabError(f"host {index}: no underlay address left")
        host.dir.mkdir(parents=True, exist_ok=True)
        self.hosts[index] = host
        self._save()
        self._attach_to_underlay(host.ns, port=f"h{index}", ip=host.public_ip)
        # A host routes for its containers; namespaces start with forwarding off.
        run(["ip", "netns", "exec", host.ns, "sh", "-c",
             "echo 1 > /proc/sys/net/ipv4/ip_forward"])
        return host

    # ---------------------------------------------------------------- etcd

    def _start_etcd(self, *, timeout: float) -> None:
        data = self.dir / "etcd"
        peer = "http://127.0.0.1:2380"  # peers are not needed: one member, on its own lo
        argv = [
            tool("etcd"), "--name", f"lab-{self.name}", "--data-dir", str(data),
            "--listen-client-urls", self.endpoints, "--advertise-client-urls", self.endpoints,
            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"lab-{self.name}={peer}", "--initial-cluster-state", "new",
            "--logger", "zap",
        ]
        self._spawn(self.etcd_ns, argv, pid_file=self.dir / "etcd.pid",
                    log_file=self.dir / "etcd.log")
        deadline = time.monotonic() + timeout
        while True:
            proc = subprocess.run(
                self._etcdctl_argv("endpoint", "health", "--command-timeout=1s"),
                capture_output=True, text=True, env=self._etcdctl_env(),
                stdin=subprocess.DEVNULL, check=False,
            )
            if proc.returncode == 0:
                return
            if not self._alive_pid_file(self.dir / "etcd.pid"):
                raise LabError(f"etcd exited; see {self.dir / 'etcd.log'}:\n"
                               + _tail(self.dir / "etcd.log"))
            if time.monotonic() > deadline:
                raise LabError(f"etcd not healthy after {timeout}s: {proc.stderr.strip()}")
            time.sleep(0.1)

    def _etcdctl_argv(self, *args: str) -> list[str]:
        return ["ip", "netns", "exec", self.etcd_ns, tool("etcdctl"),
                "--endpoints", self.endpoints, *args]

    @staticmethod
    def _etcdctl_env() -> dict[str, str]:
        return {**os.environ, "ETCDCTL_API": "3"}

    def etcdctl(self, *args: str) -> str:
        """Run etcdctl (v3 API) against the lab's etcd, from inside the etcd namespace."""
        proc = subprocess.run(
            self._etcdctl_argv(*args), capture_output=True, text=True,
            env=self._etcdctl_env(), stdin=subprocess.DEVNULL, timeout=30, check=False,
        )
        if proc.returncode != 0:
            raise LabError(f"etcdctl {' '.join(args)}: {proc.stderr.strip()}")
        return proc.stdout

    def _write_network_config(self) -> None:
        backend: dict[str, object] = {"Type": self.backend}
        if self.backend == "vxlan":
            backend.update({"VNI": 1, "Port": 8472})
        config = {"Network": str(CONTAINER_NETWORK), "SubnetLen": 24, "Backend": backend}
        self.etcdctl("put", f"{ETCD_PREFIX}/config", json.dumps(config))

    def leasectl(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run leasectl against the lab's etcd (from the etcd namespace, the only one
        that reaches it besides the hosts)."""
        argv = ["ip", "netns", "exec", self.etcd_ns, tool("leasectl"),
                "--etcd-endpoints", self.endpoints, "--etcd-prefix", ETCD_PREFIX, *args]
        return subprocess.run(argv, capture_output=True, text=True, timeout=30,
                              stdin=subprocess.DEVNULL, check=False)

    def lease_key(self, host: Host) -> str:
        if host.subnet is None:
            raise LabError(f"{host.name} has no lease yet")
        net = host.subnet.network
        return f"{ETCD_PREFIX}/subnets/{net.network_address}-{net.prefixlen}"

    def lease_value(self, host: Host) -> dict[str, object] | None:
        out = self.etcdctl("get", self.lease_key(host), "--print-value-only")
        return json.loads(out) if out.strip() else None

    def delete_lease(self, host: Host) -> None:
        self.etcdctl("del", self.lease_key(host))

    # ---------------------------------------------------------------- agents

    def agent_argv(self, host: Host) -> list[str]:
        return [
            *(self.agent_command or [tool("leaseagent")]),
            "--etcd-endpoints", self.endpoints,
            "--etcd-prefix", ETCD_PREFIX,
            "--iface", "eth0",
            "--public-ip", str(host.public_ip),
            "--subnet-file", str(host.subnet_file),
            "--state-dir", str(host.dir / "state"),
            "--lease-ttl", str(self.lease_ttl),
            "--node-id", f"{self.name}-{host.name}",
            "--metrics-addr", METRICS_ADDR,
            "--log-level", "info",
            "--log-format", "text",
            *self.agent_args,
            *self.host_agent_args.get(host.index, ()),
        ]

    def start_agent(self, host: Host) -> int:
        """Start the host's agent (appending to its log); returns its PID."""
        if self.agent_alive(host):
            raise LabError(f"{host.name}: agent already running")
        return self._spawn(host.ns, self.agent_argv(host), pid_file=host.pid_file,
                           log_file=host.log_file)

    def agent_pid(self, host: Host) -> int | None:
        return self._read_pid_file(host.pid_file)

    def agent_alive(self, host: Host) -> bool:
        return self._alive_pid_file(host.pid_file)

    def kill_agent(self, host: Host, sig: int = signal.SIGKILL) -> None:
        """Send `sig` to the host's agent and wait until it has exited."""
        self._stop_pid_file(host.pid_file, first=sig, grace=10)

    def stop_agent(self, host: Host) -> None:
        """SIGTERM (a clean stop that keeps the data plane), SIGKILL after 10 s."""
        self.kill_agent(host, signal.SIGTERM)

    def wait_subnet(self, host: Host, *, timeout: float = 30) -> None:
        """Wait for the agent's subnet.env; fill host.subnet / host.mtu from it."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                env = parse_subnet_env(host.subnet_file.read_text())
                host.subnet = IPv4Interface(env["FLANNEL_SUBNET"])
                host.mtu = int(env["FLANNEL_MTU"])
                host.subnet_seen_at = time.monotonic()
                return
            except (OSError, KeyError, ValueError):
                pass  # not written yet (the agent renames it into place, so never half)
            if not self.agent_alive(host):
                raise LabError(f"{host.name}: agent exited before writing {host.subnet_file}:\n"
                               + _tail(host.log_file))
            if time.monotonic() > deadline:
                raise LabError(f"{host.name}: no {host.subnet_file} after {timeout}s:\n"
                               + _tail(host.log_file))
            time.sleep(0.02)

    def wait_ready(self, host: Host, *, timeout: float = 30) -> None:
        """Wait until the agent's /readyz answers 200 (asked from inside its namespace,
        where its metrics address lives)."""
        probe = ("import sys, urllib.request as u; "
                 "sys.exit(0 if u.urlopen(sys.argv[1], timeout=1).status == 200 else 1)")
        url = f"http://{METRICS_ADDR}/readyz"
        deadline = time.monotonic() + timeout
        while True:
            proc = subprocess.run(
                ["ip", "netns", "exec", host.ns, sys.executable, "-c", probe, url],
                capture_output=True, stdin=subprocess.DEVNULL, check=False,
            )
            if proc.returncode == 0:
                return
            if not self.agent_alive(host):
                raise LabError(f"{host.name}: agent exited:\n" + _tail(host.log_file))
            if time.monotonic() > deadline:
                raise LabError(f"{host.name}: not ready after {timeout}s:\n"
                               + _tail(host.log_file))
            time.sleep(0.05)

    def kernel_entries(self, host: Host, peer: IPv4Network, vtep_mac: str | None = None
                       ) -> list[str]:
        """What `host`'s kernel holds for a peer: routes to the peer subnet, neighbour
        entries for its .0 (the vxlan gateway), FDB entries for its VTEP MAC."""
        ns = host.ns
        found = [f"route {line}" for line in
                 run(["ip", "-n", ns, "route", "show", "exact", str(peer)]).splitlines()]
        found += [f"neigh {line}" for line in
                  run(["ip", "-n", ns, "neigh", "show", "to", str(peer.network_address)])
                  .splitlines()]
        if vtep_mac:
            found += [f"fdb {line}" for line in run(["bridge", "-n", ns, "fdb", "show"])
                      .splitlines() if line.lower().startswith(vtep_mac.lower())]
        return found

    # ---------------------------------------------------------------- faults

    def etcd_pid(self) -> int | None:
        """PID of the lab's etcd if it is running (checked against its start time)."""
        return self._read_pid_file(self.dir / "etcd.pid")

    def stop_etcd(self, sig: int = signal.SIGKILL) -> None:
        """Stop the lab's etcd (by its recorded PID) and wait until it has exited; its
        data dir stays, so `start_etcd` brings the same cluster back."""
        self._stop_pid_file(self.dir / "etcd.pid", first=sig, grace=10)

    def start_etcd(self, *, timeout: float = 30) -> None:
        """Start the lab's etcd again on its data dir; returns once it is healthy.
        etcd extends every lease by its full TTL when it starts (lessor promotion), so
        a stop longer than the TTL expires nobody."""
        if self.etcd_pid() is not None:
            raise LabError("etcd already running")
        self._start_etcd(timeout=timeout)

    def pause_etcd(self) -> None:
        """SIGSTOP etcd: connections stay open and unanswered (a hung server)."""
        pid = self.etcd_pid()
        if pid is None:
            raise LabError("etcd is not running")
        os.kill(pid, signal.SIGSTOP)

    def resume_etcd(self) -> None:
        """SIGCONT etcd (harmless if it was not paused)."""
        pid = self.etcd_pid()
        if pid is not None:
            os.kill(pid, signal.SIGCONT)

    def cut_etcd(self, host: Host) -> None:
        """Cut `host` off from etcd (and nothing else: the underlay to its peers stays):
        a blackhole route to etcd's address in the host's namespace, so every packet
        to etcd is dropped and new connections fail. `heal_etcd` removes it."""
        run(["ip", "-n", host.ns, "route", "replace", "blackhole", f"{ETCD_IP}/32"])

    def heal_etcd(self, host: Host) -> None:
        run(["ip", "-n", host.ns, "route", "del", "blackhole", f"{ETCD_IP}/32"], check=False)

    def http_get(self, host: Host, path: str, *, timeout: float = 2) -> tuple[int, str]:
        """(status, body) of GET http://METRICS_ADDR<path> from inside the host's
        namespace; status 0 if nothing answered."""
        probe = ("import sys, urllib.request as u, urllib.error as e\n"
                 "try:\n r = u.urlopen(sys.argv[1], timeout=float(sys.argv[2]))\n"
                 " print(r.status); sys.stdout.write(r.read().decode())\n"
                 "except e.HTTPError as x:\n print(x.code); sys.stdout.write(x.read().decode())\n"
                 "except Exception as x:\n print(0); sys.stdout.write(str(x))\n")
        proc = subprocess.run(
            ["ip", "netns", "exec", host.ns, sys.executable, "-c", probe,
             f"http://{METRICS_ADDR}{path}", str(timeout)],
            capture_output=True, text=True, stdin=subprocess.DEVNULL, check=False,
            timeout=timeout + 10,
        )
        status, _, body = proc.stdout.partition("\n")
        try:
            return int(status), body
        except ValueError:
            return 0, proc.stderr

    def metrics(self, host: Host) -> dict[str, float]:
        """The agent's /metrics as {'name{labels}': value} (empty if it did not answer)."""
        status, body = self.http_get(host, "/metrics")
        if status != 200:
            return {}
        return parse_metrics(body)

    def kernel_state(self, host: Host) -> dict[str, list[str]]:
        """Everything the data plane owns in `host`'s kernel, as sorted text lines:
        routes of the agent's protocol, neighbours and FDB entries of flannel.*
        devices, and the devices' addresses: for before/after comparisons."""
        ns = host.ns
        devs = [line.split(":")[1].strip().split("@")[0]
                for line in run(["ip", "-n", ns, "-o", "link", "show", "type", "vxlan"])
                .splitlines()]
        state = {
            "route": sorted(run(["ip", "-n", ns, "route", "show", "proto", "76"]).splitlines()),
            "neigh": [], "fdb": [], "addr": [],
        }
        for dev in devs:
            state["neigh"] += run(["ip", "-n", ns, "neigh", "show", "dev", dev]).splitlines()
            state["fdb"] += run(["bridge", "-n", ns, "fdb", "show", "dev", dev]).splitlines()
            state["addr"] += run(["ip", "-n", ns, "-4", "-o", "addr", "show", "dev", dev]
                                 ).splitlines()
        return {k: sorted(v) for k, v in state.items()}

    # ---------------------------------------------------------------- bridge + containers

    def _wire_containers(self, host: Host, *, count: int | None = None,
                         timeout: float = 30) -> None:
        """docker0-like bridge from subnet.env (`dockerd --bip=$FLANNEL_SUBNET
        --mtu=$FLANNEL_MTU`), then `count` containers on it."""
        self.wait_subnet(host, timeout=timeout)
        assert host.subnet is not None and host.mtu is not None
        ns, mtu = host.ns, str(host.mtu)
        run(["ip", "-n", ns, "link", "add", "br0", "type", "bridge"])
        run(["ip", "-n", ns, "link", "set", "br0", "mtu", mtu])
        run(["ip", "-n", ns, "addr", "add", str(host.subnet), "dev", "br0"])
        run(["ip", "-n", ns, "link", "set", "br0", "up"])
        for j in range(1, (self.containers_per_host if count is None else count) + 1):
            self._make_container(host, j)
        self._save()

    def _make_container(self, host: Host, j: int) -> Container:
        assert host.subnet is not None and host.mtu is not None
        ip = host.subnet.ip + j  # .1 is the bridge
        if ip not in host.subnet.network or ip == host.subnet.network.broadcast_address:
            raise LabError(f"{host.name}: subnet {host.subnet.network} has no room for {j}")
        c = Container(ns=self.ns(f"c{host.index}-{j}"), ip=ip, index=j)
        mtu = str(host.mtu)
        self._netns_add(c.ns)
        run(["ip", "-n", c.ns, "link", "add", "eth0", "type", "veth",
             "peer", "name", f"vc{j}", "netns", host.ns])
        run(["ip", "-n", host.ns, "link", "set", f"vc{j}", "master", "br0", "mtu", mtu, "up"])
        run(["ip", "-n", c.ns, "link", "set", "eth0", "mtu", mtu, "up"])
        run(["ip", "-n", c.ns, "addr", "add", f"{ip}/{host.subnet.network.prefixlen}",
             "dev", "eth0"])
        run(["ip", "-n", c.ns, "route", "add", "default", "via", str(host.subnet.ip)])
        host.containers.append(c)
        return c

    def remove_host(self, host: Host) -> None:
        """Stop the host's agent (SIGKILL: what happens to a host that dies) and delete
        its namespaces; its lease stays in etcd until TTL or `delete_lease`."""
        self._stop_pid_file(host.pid_file, first=signal.SIGKILL, grace=5)
        # The kernel tears a deleted namespace down asynchronously; the underlay port
        # would linger for a moment and block a new host of the same index. Deleting
        # one end of the veth removes both, now.
        run(["ip", "-n", self.ul_ns, "link", "del", host.name], check=False)
        for c in host.containers:
            run(["ip", "netns", "del", c.ns], check=False)
        run(["ip", "netns", "del", host.ns], check=False)
        del self.hosts[host.index]
        self._save()

    # ---------------------------------------------------------------- reachability

    def ping(self, from_ns: str, to_ip: IPv4Address | str, *, count: int = 1,
             wait: float = 1) -> bool:
        self._check_target(to_ip)
        proc = subprocess.run(
            ["ip", "netns", "exec", from_ns, "ping", "-n", "-q", "-c", str(count),
             "-W", str(wait), str(to_ip)],
            capture_output=True, stdin=subprocess.DEVNULL, check=False,
        )
        return proc.returncode == 0

    def ping_background(self, from_ns: str, to_ip: IPv4Address | str, *, count: int,
                        interval: float) -> subprocess.Popen[str]:
        """`count` pings, one every `interval` s (root may go below 0.2 s); read the
        outcome with `parse_ping_summary` on its stdout. A count, not a deadline, so
        the last reply is waited for instead of being counted lost."""
        self._check_target(to_ip)
        return subprocess.Popen(
            ["ip", "netns", "exec", from_ns, "ping", "-n", "-q", "-c", str(count),
             "-i", str(interval), "-W", "1", str(to_ip)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            text=True,
        )

    def _check_target(self, ip: IPv4Address | str) -> None:
        # The lab never sends traffic out of its own address ranges.
        addr = IPv4Address(str(ip))
        if addr not in CONTAINER_NETWORK and addr not in UNDERLAY:
            raise LabError(f"{addr} is not a lab address")

    def pairs(self) -> list[tuple[Container, Host]]:
        """Every container, to the first container of every other host."""
        hosts = [h for h in self.hosts.values() if h.containers]
        return [(c, h) for src in hosts for c in src.containers for h in hosts if h is not src]

    def reachability(self, pairs: Sequence[tuple[Container, Host]] | None = None, *,
                     wait: float = 1) -> Reachability:
        """One ping per pair (`ping -c 1 -W wait`), all pairs at once."""
        todo = self.pairs() if pairs is None else list(pairs)
        procs = []
        for c, h in todo:
            self._check_target(h.containers[0].ip)
            procs.append(subprocess.Popen(
                ["ip", "netns", "exec", c.ns, "ping", "-n", "-q", "-c", "1",
                 "-W", str(wait), str(h.containers[0].ip)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
            ))
        cells = {(c.ns, h.ns): p.wait() == 0 for (c, h), p in zip(todo, procs, strict=True)}
        hosts = [h for h in self.hosts.values() if h.containers]
        return Reachability(rows=[c for h in hosts for c in h.containers], columns=hosts,
                            cells=cells)

    def wait_reachable(self, *, timeout: float = 10, wait: float = 1) -> Reachability:
        """Ping all pairs, re-ping only the failed ones until all reach or `timeout`."""
        deadline = time.monotonic() + timeout
        result = self.reachability(wait=wait)
        while not result.all_ok and time.monotonic() < deadline:
            time.sleep(0.05)
            todo = [(c, h) for (c, h) in self.pairs() if not result.cells[(c.ns, h.ns)]]
            again = self.reachability(todo, wait=wait)
            result = Reachability(rows=result.rows, columns=result.columns,
                                  cells={**result.cells, **again.cells})
        return result

    # ---------------------------------------------------------------- processes

    def _spawn(self, ns: str, argv: Sequence[str], *, pid_file: Path, log_file: Path) -> int:
        with log_file.open("ab") as out:
            # `ip netns exec` execs the command in place, so the PID is the program's.
            # A new session: the program outlives a CLI `up` and misses its Ctrl-C.
            proc = subprocess.Popen(
                ["ip", "netns", "exec", ns, *argv], stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True,
            )
        started = None
        for _ in range(100):  # /proc/<pid>/stat exists as soon as fork returns
            started = _start_time(proc.pid)
            if started is not None:
                break
            time.sleep(0.001)
        _write_atomic(pid_file, f"{proc.pid} {started or 0}\n")
        self._children[proc.pid] = proc
        return proc.pid

    def _read_pid_file(self, pid_file: Path) -> int | None:
        """The recorded PID if that very process (same start time) is still running."""
        try:
            pid_s, start_s = pid_file.read_text().split()
            pid, start = int(pid_s), int(start_s)
        except (OSError, ValueError):
            return None
        child = self._children.get(pid)
        if child is not None and child.poll() is not None:
            return None
        now = _start_time(pid)
        return pid if now is not None and (start == 0 or now == start) else None

    def _alive_pid_file(self, pid_file: Path) -> bool:
        return self._read_pid_file(pid_file) is not None

    def _stop_pids(self, pids: Sequence[int], *, first: int, grace: float) -> None:
        """Signal `pids`, wait up to `grace` s, SIGKILL what is left, reap our children."""
        starts = {pid: _start_time(pid) for pid in pids}
        live = [pid for pid, st in starts.items() if st is not None]
        for pid in live:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, first)
        deadline = time.monotonic() + grace
        while live and time.monotonic() < deadline:
            self._reap()
            live = [pid for pid in live if _start_time(pid) == starts[pid]]
            if live:
                time.sleep(0.02)
        for pid in live:
            log.warning("pid %d did not exit within %.0fs: SIGKILL", pid, grace)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for pid in pids:
            child = self._children.pop(pid, None)
            if child is not None:
                child.wait(timeout=10)

    def _reap(self) -> None:
        for child in list(self._children.values()):
            child.poll()

    def _stop_pid_file(self, pid_file: Path, *, first: int, grace: float) -> None:
        pid = self._read_pid_file(pid_file)
        if pid is not None:
            self._stop_pids([pid], first=first, grace=grace)
        with contextlib.suppress(FileNotFoundError):
            pid_file.unlink()

    # ---------------------------------------------------------------- down

    def down(self) -> list[str]:
        """Remove everything this lab made, also after a crash; returns warnings.

        Order: agents, etcd, then container, host, etcd and underlay namespaces,
        then the state dir.
        """
        warnings: list[str] = []
        # Agents before etcd: an agent stopping while etcd goes away waits on it.
        for pattern in ("h*/*.pid", "*.pid"):
            files = sorted(self.dir.glob(pattern)) if self.dir.is_dir() else []
            pids = [pid for f in files if (pid := self._read_pid_file(f)) is not None]
            self._stop_pids(pids, first=signal.SIGTERM, grace=10)

        ours = [ns for ns in list_namespaces() if self.owns(ns)]
        strays: list[int] = []
        for ns in ours:
            for pid_s in run(["ip", "netns", "pids", ns], check=False).split():
                pid = int(pid_s)
                argv = _cmdline(pid)
                if any(str(self.dir) in a for a in argv) or any(
                    Path(a).name in _HELPERS for a in argv[:2]
                ):
                    strays.append(pid)
                elif argv:
                    warnings.append(f"{ns}: pid {pid} ({' '.join(argv)[:80]}) not started by "
                                    "the lab; left running, the namespace lives on until it exits")
        self._stop_pids(strays, first=signal.SIGTERM, grace=5)

        # Containers before hosts, so each veth goes with the namespace that holds it.
        order = {"c": 0, "h": 1, "e": 2, "u": 3}
        for ns in sorted(ours, key=lambda n: order[_short(n)[0]]):
            proc = subprocess.run(["ip", "netns", "del", ns], capture_output=True, text=True,
                                  check=False)
            if proc.returncode != 0:
                warnings.append(f"ip netns del {ns}: {proc.stderr.strip()}")
        # <state root>/<name>, with `name` checked against _NAME_RE: never anything else.
        shutil.rmtree(self.dir, ignore_errors=True)
        self.hosts.clear()
        self._children.clear()
        return warnings

    def agents_status(self) -> list[tuple[Host, int | None]]:
        return [(h, self.agent_pid(h)) for h in self.hosts.values()]


def _tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join("    " + line for line in text.splitlines()[-lines:])


# --------------------------------------------------------------------------- CLI


def _print_status(lab: Lab, *, reach: Reachability | None = None) -> bool:
    print(f"lab {lab.name}: backend {lab.backend}, etcd {lab.endpoints} (in {lab.etcd_ns})")
    for host, pid in lab.agents_status():
        state = f"agent pid {pid}" if pid else "agent NOT RUNNING"
        print(f"  {host.name} {host.ns} {host.public_ip}  subnet {host.subnet}  mtu {host.mtu}"
              f"  {state}  log {host.log_file}")
    print("\n$ leasectl list")
    try:
        listing = lab.leasectl("list")
        print((listing.stdout + listing.stderr).rstrip() or "(no output)")
    except LabError as exc:  # the lease table is a nicety; the matrix is the verdict
        print(f"({exc})")
    if reach is None:
        reach = lab.reachability()
    print("\nreachability (ping -c 1 -W 1, each container -> first container of every other host)")
    print(reach.format())
    return reach.all_ok


def main(argv: Sequence[str] | None = None) -> int:
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
    p_status = sub.add_parser("status", help="leasectl list and the reachability matrix")
    p_down = sub.add_parser("down", help="remove everything the lab made (also after a crash)")
    for p in (p_up, p_status, p_down):
        p.add_argument("--name", default="lab", help="lab name (default: lab)")
        p.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="lab: %(message)s")
    if os.geteuid() != 0:
        print("lab: needs root (network namespaces)", file=sys.stderr)
        return 2
    try:
        if args.command == "up":
            lab = Lab(args.name, backend=args.backend, lease_ttl=args.lease_ttl)
            started = time.monotonic()
            try:
                lab.up(args.hosts, args.containers)
            except LabExists:
                raise
            except (LabError, subprocess.SubprocessError) as exc:
                print(f"lab: up failed: {exc}\nlab: the half-built lab is left for "
                      f"inspection; remove it with: deploy/lab down --name {args.name}",
                      file=sys.stderr)
                return 1
            built = time.monotonic() - started
            reach = lab.wait_reachable(timeout=args.timeout)
            ok = _print_status(lab, reach=reach)
            print(f"\nbuilt in {built:.1f}s, all pairs "
                  f"{'reachable' if ok else 'NOT reachable'} after "
                  f"{time.monotonic() - started:.1f}s")
            return 0 if ok else 1
        if args.command == "status":
            return 0 if _print_status(Lab.load(args.name)) else 1
        lab = Lab(args.name)
        for warning in lab.down():
            print(f"lab: {warning}", file=sys.stderr)
        left = [ns for ns in list_namespaces() if lab.owns(ns)]
        if left:
            print(f"lab: still present: {', '.join(left)}", file=sys.stderr)
            return 1
        print(f"lab {args.name}: down")
        return 0
    except LabError as exc:
        print(f"lab: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
