"""`Lab`: one lab by name, the face the CLI, the end-to-end tests and the demo use.

It composes the parts (topology, state, etcd, agents, probes, teardown) and
adds what only the whole knows: the order of `up`, the network config and
lease keys in etcd, the hosts it has built. Sync API, safe to use from
pytest fixtures; as a context manager it always calls `down` on exit, also
when the body raised.
"""

from __future__ import annotations

import base64
import json
import secrets
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path
from types import TracebackType

from leaseagent.core.leases import DEFAULT_PREFIX, KeyLayout
from leaseagent.core.profiles import BACKEND_TYPES
from leaseagent.lab import agents, docker, netns, probes, processes, teardown
from leaseagent.lab.commands import tool
from leaseagent.lab.errors import LabError, LabExists
from leaseagent.lab.etcd import Etcd
from leaseagent.lab.probes import Reachability, Source
from leaseagent.lab.prometheus import LabPrometheus
from leaseagent.lab.state import STATE_ROOT, StateDir
from leaseagent.lab.topology import (
    CONTAINER_NETWORK,
    CONTAINER_NETWORK6,
    ETCD_IP,
    ETCD_PORTS,
    Address,
    Container,
    Host,
    Topology,
)

ETCD_PREFIX = DEFAULT_PREFIX
BACKENDS = tuple(BACKEND_TYPES)  # every type the agents run


class Lab:
    """One lab, by name. Build with `up`, query with `reachability`, remove with `down`."""

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
        docker: bool = False,
        ip_masq: bool = False,
        nftables: bool = False,
        ipv6: bool = False,
        prometheus: bool = False,
        forwarding: bool = True,
    ) -> None:
        # Checks the name: everything below carries it. Knows whether the lab is
        # dual-stack (`ipv6`): the underlay, hosts and containers then carry IPv6 too.
        self.topology = Topology(name, ipv6=ipv6)
        if backend not in BACKENDS:
            raise LabError(f"backend {backend!r}: one of {', '.join(BACKENDS)}")
        self.name = name
        self.backend = backend
        self.docker = docker  # a real dockerd per host (leaseagent.lab.docker)
        self.ip_masq = ip_masq  # the agents masquerade what leaves the cluster network
        self.nftables = nftables  # the network config says EnableNFTables
        # The hosts forward from the start; else (with Docker) dockerd turns forwarding
        # on, and so sets FORWARD's policy to DROP, as on a host where nothing else did.
        self.forwarding = forwarding
        self.lease_ttl = lease_ttl
        self.agent_args = list(agent_args)
        # Extra flags for one host's agent (by host index), after `agent_args`, so
        # e.g. a second --lease-ttl wins for that host; read at each start_agent.
        self.host_agent_args: dict[int, list[str]] = {
            i: list(a) for i, a in (host_agent_args or {}).items()}
        # Lets the lab's own parts be exercised with a stand-in agent.
        self.agent_command = list(agent_command) if agent_command else None
        self.state = StateDir(state_root, name)
        self.dir = self.state.path
        self.ul_ns = self.topology.ul_ns
        self.etcd_ns = self.topology.etcd_ns
        self.etcd = Etcd(self.state.etcd_dir, ns=self.etcd_ns, host=str(ETCD_IP),
                         ports=[ETCD_PORTS], log_level="info")
        self.keys = KeyLayout(ETCD_PREFIX)
        # A real Prometheus scraping every host (leaseagent.lab.prometheus).
        self.prometheus = prometheus
        self.prometheus_server = LabPrometheus(
            self.dir / "prometheus", ns=self.topology.prometheus_ns,
            endpoints=self.etcd.endpoints, prefix=ETCD_PREFIX)
        self.hosts: dict[int, Host] = {}
        self.containers_per_host = 2

    # ---------------------------------------------------------------- naming

    def ns(self, suffix: str) -> str:
        return self.topology.ns(suffix)

    def owns(self, ns: str) -> bool:
        """True for exactly the namespace names this lab makes."""
        return self.topology.owns(ns)

    @property
    def endpoints(self) -> str:
        return self.etcd.endpoints

    @property
    def ipv6(self) -> bool:
        """Dual-stack: the network config has EnableIPv6, everything carries IPv6 too."""
        return self.topology.ipv6

    @property
    def families(self) -> tuple[int, ...]:
        """The IP versions the lab's containers speak: (4,) or (4, 6)."""
        return (4, 6) if self.ipv6 else (4,)

    # ---------------------------------------------------------------- context manager

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.down()

    # ---------------------------------------------------------------- state file

    def _save(self) -> None:
        self.state.save(name=self.name, backend=self.backend, lease_ttl=self.lease_ttl,
                        containers_per_host=self.containers_per_host,
                        hosts=self.hosts.values(), docker=self.docker, ip_masq=self.ip_masq,
                        nftables=self.nftables, ipv6=self.ipv6, prometheus=self.prometheus,
                        forwarding=self.forwarding)

    @classmethod
    def load(cls, name: str, *, state_root: Path = STATE_ROOT) -> Lab:
        """The lab `up` built earlier (possibly from another process), from its state file."""
        lab = cls(name, state_root=state_root)
        saved = lab.state.load(lab.topology)
        lab.backend, lab.lease_ttl = saved.backend, saved.lease_ttl
        lab.containers_per_host = saved.containers_per_host
        lab.docker, lab.ip_masq, lab.nftables = saved.docker, saved.ip_masq, saved.nftables
        lab.prometheus, lab.forwarding = saved.prometheus, saved.forwarding
        lab.hosts = {h.index: h for h in saved.hosts}
        if lab.docker:
            for host in lab.hosts.values():
                for c in host.containers:
                    c.via = lab.dockerd(host).exec_prefix(f"c{c.index}")
        lab.etcd.attach()
        return lab

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
        leftovers = self.topology.present()
        if leftovers or self.state.exists():
            raise LabExists(
                f"lab {self.name!r} exists ({', '.join(leftovers) or self.dir}); "
                f"run: deploy/lab down --name {self.name}"
            )
        self.containers_per_host = containers
        self.state.create()
        self._save()
        self.topology.make_underlay()
        self.etcd.start(timeout=timeout)
        self._write_network_config()
        if self.prometheus:
            # Before the hosts: each is discovered as its agent publishes its address.
            self.topology.make_prometheus_ns()
            self.prometheus_server.start(timeout=timeout)
        new = [self._make_host(i) for i in range(1, hosts + 1)]
        for host in new:
            self.start_agent(host)
        for host in new:
            self._wire_containers(host, timeout=timeout)

    def add_host(self, containers: int | None = None, *, timeout: float = 30) -> Host:
        """One more host (next free index), its agent, bridge and containers."""
        host = self._make_host(max(self.hosts, default=0) + 1)
        self.start_agent(host)
        self._wire_containers(
            host, count=self.containers_per_host if containers is None else containers,
            timeout=timeout,
        )
        return host

    def _make_host(self, index: int) -> Host:
        host = self.topology.host(index, self.state.host_dir(index))
        host.dir.mkdir(parents=True, exist_ok=True)
        self.hosts[index] = host
        self._save()
        self.topology.make_host(host, forwarding=self.forwarding)
        return host

    def _wire_containers(self, host: Host, *, count: int | None = None,
                         timeout: float = 30) -> None:
        """docker0-like bridge from subnet.env (`dockerd --bip=$FLANNEL_SUBNET
        --mtu=$FLANNEL_MTU`), then `count` containers on it; with Docker, a real
        dockerd on the agent's options and `docker run` containers."""
        self.wait_subnet(host, timeout=timeout)
        count = self.containers_per_host if count is None else count
        if self.docker:
            self._start_docker(host, count, timeout=timeout)
        else:
            self.topology.make_bridge(host)
            for j in range(1, count + 1):
                self.topology.make_container(host, j)
        self._save()

    # ---------------------------------------------------------------- Docker

    def dockerd(self, host: Host) -> docker.Dockerd:
        return docker.Dockerd(host.ns, host.dir)

    def _start_docker(self, host: Host, count: int, *, timeout: float) -> None:
        """The host's dockerd on the options its agent wrote, the image (with nftables,
        the FORWARD rule an operator adds), `count` containers, and the restart hook."""
        dockerd = self.dockerd(host)
        deadline = time.monotonic() + timeout
        while not dockerd.options_file.exists():  # written with subnet.env, before READY
            if time.monotonic() > deadline:
                raise LabError(f"{host.name}: the agent wrote no {dockerd.options_file}")
            time.sleep(0.02)
        dockerd.start()
        dockerd.load_image()
        if self.nftables:
            # The agent's nftables accept cannot override the DROP of Docker's
            # iptables-nft FORWARD chain (docs/architecture.md, "Traffic rules"): the
            # accept an operator then adds in DOCKER-USER. In iptables mode the agent's
            # own LEASEAGENT-FORWARD chain lets the overlay through.
            docker.forward_accept(host.ns, str(CONTAINER_NETWORK))
        for j in range(1, count + 1):
            ip = dockerd.run_container(f"c{j}")
            ip6 = dockerd.container_ip6(f"c{j}") if self.ipv6 else None
            host.containers.append(self.topology.container(
                host, j, ip, via=dockerd.exec_prefix(f"c{j}"), ip6=ip6))
        processes.spawn(docker.hook_argv(host.ns, host.dir), log_file=host.dir / "docker-hook.log",
                        pid_file=host.dir / "docker-hook.pid")

    def refresh_containers(self, host: Host, *, timeout: float = 60) -> None:
        """Read the Docker containers' addresses again (after a dockerd restart moved them)."""
        dockerd = self.dockerd(host)
        for c in host.containers:
            c.ip = dockerd.container_ip(f"c{c.index}", timeout=timeout)
            if self.ipv6:
                c.ip6 = dockerd.container_ip6(f"c{c.index}", timeout=timeout)
        self._save()

    def remove_host(self, host: Host) -> None:
        """Stop the host's agent (SIGKILL: what happens to a host that dies) and what it
        started (wireguard-go), delete its published metrics address and its namespaces;
        its lease stays in etcd until TTL or `delete_lease`."""
        self.stop_agent(host, sig=signal.SIGKILL, grace=5)
        # Decommissioned, as an operator would: no longer a Prometheus target (its
        # metrics key has no TTL; leaseagent.core.monitoring).
        self.etcdctl("del", self.keys.metrics_key(self.node_id(host)))
        teardown.stop_strays([host.ns], self.state)
        self.topology.remove_host(host)
        del self.hosts[host.index]
        self._save()

    # ---------------------------------------------------------------- etcd contents

    def etcdctl(self, *args: str) -> str:
        """Run etcdctl (v3 API) against the lab's etcd, from inside the etcd namespace."""
        return self.etcd.etcdctl(*args, timeout=30)

    def network_config(self) -> dict[str, object]:
        """What the lab puts at <prefix>/config: the cluster network, dual-stack with
        flannel's EnableIPv6 and IPv6Network (/64 subnets by flannel's default)."""
        backend: dict[str, object] = {"Type": self.backend}
        if self.backend == "vxlan":
            backend.update({"VNI": 1, "Port": 8472})
        if self.backend == "wireguard":
            # flannel's defaults (ports 51820/51821, Mode separate) and a PSK of the lab's
            # own, so the preshared key is always exercised.
            backend["PSK"] = base64.b64encode(secrets.token_bytes(32)).decode()
        config: dict[str, object] = {"Network": str(CONTAINER_NETWORK), "SubnetLen": 24,
                                     "Backend": backend}
        if self.ipv6:
            config.update({"EnableIPv6": True, "IPv6Network": str(CONTAINER_NETWORK6)})
        if self.nftables:
            config["EnableNFTables"] = True
        return config

    def _write_network_config(self) -> None:
        self.etcdctl("put", self.keys.config_key, json.dumps(self.network_config()))

    def host_run(self, host: Host, argv: Sequence[str], *, timeout: float = 30
                 ) -> subprocess.CompletedProcess[str]:
        """Run `argv` on `host` as its agent runs: in its namespace, with its own
        /run/wireguard (`wg show`, `leasectl doctor`)."""
        return subprocess.run(netns.exec_argv(host.ns, agents.host_argv(host, argv)),
                              capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL, check=False)

    def leasectl(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run leasectl against the lab's etcd (from the etcd namespace, the only one
        that reaches it besides the hosts)."""
        argv = [tool("leasectl"), "--etcd-endpoints", self.endpoints,
                "--etcd-prefix", ETCD_PREFIX, *args]
        return subprocess.run(netns.exec_argv(self.etcd_ns, argv), capture_output=True,
                              text=True, timeout=30, stdin=subprocess.DEVNULL, check=False)

    def lease_key(self, host: Host) -> str:
        """The host's lease key: flannel's dual-stack form (`<ipv4>-<len>&<ipv6>-<len>`)
        when the host has an IPv6 subnet."""
        if host.subnet is None:
            raise LabError(f"{host.name} has no lease yet")
        return self.keys.lease_key(host.subnet.network,
                                   host.subnet6.network if host.subnet6 else None)

    def lease_value(self, host: Host) -> dict[str, object] | None:
        out = self.etcdctl("get", self.lease_key(host), "--print-value-only")
        return json.loads(out) if out.strip() else None

    def delete_lease(self, host: Host) -> None:
        self.etcdctl("del", self.lease_key(host))

    # ---------------------------------------------------------------- agents

    def node_id(self, host: Host) -> str:
        """The host's agent's --node-id: unique across labs sharing a machine."""
        return f"{self.name}-{host.name}"

    def agent_argv(self, host: Host) -> list[str]:
        return agents.argv(
            host, command=self.agent_command or [tool("leaseagent")], endpoints=self.endpoints,
            prefix=ETCD_PREFIX, lease_ttl=self.lease_ttl, node_id=self.node_id(host),
            extra=["--docker-opts-file", str(self.dockerd(host).options_file),
                   *(["--ip-masq"] if self.ip_masq else []),
                   *self.agent_args, *self.host_agent_args.get(host.index, ())],
        )

    def start_agent(self, host: Host) -> int:
        """Start the host's agent (appending to its log); returns its PID."""
        return agents.start(host, self.agent_argv(host))

    def stop_agent(self, host: Host, *, sig: int = signal.SIGTERM, grace: float = 10) -> None:
        """Stop the host's agent by PID and wait until it has exited: SIGTERM (a clean
        stop that keeps the data plane) unless told, SIGKILL after `grace` s."""
        agents.stop(host, sig=sig, grace=grace)

    def agent_pid(self, host: Host) -> int | None:
        proc = agents.running(host)
        return proc.pid if proc is not None else None

    def agent_alive(self, host: Host) -> bool:
        return agents.running(host) is not None

    def agents_status(self) -> list[tuple[Host, int | None]]:
        return [(h, self.agent_pid(h)) for h in self.hosts.values()]

    def wait_subnet(self, host: Host, *, timeout: float = 30) -> None:
        """Wait for the agent's subnet.env; fill host.subnet / host.mtu (and host.subnet6
        in a dual-stack lab) from it."""
        agents.wait_subnet(host, timeout=timeout, ipv6=self.ipv6)

    def wait_ready(self, host: Host, *, timeout: float = 30) -> None:
        """Wait until the agent's /readyz answers 200."""
        agents.wait_ready(host, timeout=timeout)

    # ---------------------------------------------------------------- probes

    def ping(self, from_ns: Source, to_ip: Address | str, *, count: int = 1,
             wait: float = 1, interval: float = 1) -> bool:
        """Ping from a namespace or a container (Docker's too); IPv6 with `ping -6`."""
        return probes.ping(from_ns, to_ip, count=count, wait=wait, interval=interval)

    def ping_background(self, from_ns: Source, to_ip: Address | str, *, count: int,
                        interval: float) -> subprocess.Popen[str]:
        return probes.ping_background(from_ns, to_ip, count=count, interval=interval)

    def ping_run(self, from_ns: Source, to_ip: Address | str, *,
                 interval: float) -> probes.PingRun:
        """Pings until `stop()`, every reply by number: see `probes.PingRun`. From a Docker
        container, the host's ping runs in the container's network namespace."""
        netns_path = None
        if isinstance(from_ns, Container) and from_ns.via is not None:
            host = next(h for h in self.hosts.values() if from_ns in h.containers)
            pid = self.dockerd(host).docker("inspect", "-f", "{{.State.Pid}}",
                                            f"c{from_ns.index}").strip()
            netns_path = f"/proc/{int(pid)}/ns/net"
        return probes.PingRun(from_ns, to_ip, interval=interval, netns_path=netns_path)

    def pairs(self) -> list[tuple[Container, Host]]:
        """Every container, to the first container of every other host."""
        return probes.pairs(list(self.hosts.values()))

    def reachability(self, pairs: Sequence[tuple[Container, Host]] | None = None, *,
                     wait: float = 1, family: int = 4) -> Reachability:
        """One ping per pair (`ping -c 1 -W wait`, over IPv`family`), all pairs at once."""
        return probes.reachability(list(self.hosts.values()), pairs, wait=wait, family=family)

    def outside(self, *, wait: float = 1, family: int = 4) -> dict[str, bool]:
        """Which containers reach the outside host over IPv`family` (only through
        masquerade)."""
        return probes.outside(list(self.hosts.values()), wait=wait, family=family)

    def wait_reachable(self, *, timeout: float = 10, wait: float = 1,
                       family: int = 4) -> Reachability:
        """Ping all pairs over IPv`family`, re-ping only the failed ones until all reach or
        `timeout`."""
        return probes.wait_reachable(list(self.hosts.values()), timeout=timeout, wait=wait,
                                     family=family)

    def wait_reachable_all(self, *, timeout: float = 10, wait: float = 1
                           ) -> dict[int, Reachability]:
        """`wait_reachable` for each of the lab's families, within one `timeout`."""
        deadline = time.monotonic() + timeout
        return {f: self.wait_reachable(timeout=max(0.0, deadline - time.monotonic()), wait=wait,
                                       family=f)
                for f in self.families}

    def http_get(self, host: Host, path: str, *, timeout: float = 2) -> tuple[int, str]:
        """(status, body) of GET <the agent's metrics address><path> from inside the
        host's namespace; status 0 if nothing answered."""
        return probes.http_get(host.ns, f"http://{agents.METRICS_ADDR}{path}", timeout=timeout)

    def metrics(self, host: Host) -> dict[str, float]:
        """The agent's /metrics as {'name{labels}': value} (empty if it did not answer)."""
        status, body = self.http_get(host, "/metrics")
        return probes.parse_metrics(body) if status == 200 else {}

    def kernel_entries(self, host: Host, peer: IPv4Network | IPv6Network,
                       vtep_mac: str | None = None) -> list[str]:
        return probes.kernel_entries(host, peer, vtep_mac)

    def kernel_state(self, host: Host) -> dict[str, list[str]]:
        return probes.kernel_state(host)

    # ---------------------------------------------------------------- down

    def down(self) -> list[str]:
        """Remove everything this lab made, also after a crash; returns warnings."""
        warnings = teardown.down(self.topology, self.state)
        self.hosts.clear()
        return warnings
