"""The lab's state on disk: /run/leaseagent-lab/<name>/.

    state.json          what `up` built: backend, lease TTL, hosts, their subnets (both
                        families' in a dual-stack lab) and containers (so `status`,
                        `down`, a test, can pick the lab up from another process)
    etcd/m0/            etcd's data, log and pid file (leaseagent.lab.etcd)
    prometheus/         the lab's Prometheus (leaseagent.lab.prometheus): its config,
                        data, the targets file, logs and pid files (Prometheus, the
                        targets writer, the forwarder)
    h<i>/               host i: subnet.env, the agent's log, pid file and state dir;
                        with Docker also docker_opts.env, docker.sock, dockerd's data and
                        exec roots (docker/), its log and pid file, the restart hook's;
                        in the systemd lab (leaseagent.lab.hostlab) the machine's pid
                        file and console log, its overlay (upper/, work/, root/) and
                        its /var/lib/docker (var-lib-docker/)

Pid files hold "<pid> <start time>" (leaseagent.lab.processes). `down` finds
them here: agents first, then etcd. The state dir is <root>/<name> with the
name checked by the topology, so removing it never removes anything else.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface, IPv6Address, IPv6Interface
from pathlib import Path

from leaseagent.files import write_atomic
from leaseagent.lab.errors import LabError
from leaseagent.lab.topology import Host, Topology

# leaseagent.lab.prometheus's, in stopping order (named here: that module starts them)
PROMETHEUS_PID_FILES = ("forward.pid", "prometheus.pid", "targets.pid")

STATE_ROOT = Path("/run/leaseagent-lab")
# What outlives a lab: the Docker lab's container image (leaseagent.lab.docker), the
# systemd lab's root filesystem and wheelhouse (leaseagent.lab.rootfs).
CACHE_ROOT = Path("/var/cache/leaseagent-lab")


@dataclass
class Saved:
    """What state.json says."""

    backend: str
    lease_ttl: int
    containers_per_host: int
    hosts: list[Host]
    docker: bool = False
    ip_masq: bool = False
    nftables: bool = False
    ipv6: bool = False
    prometheus: bool = False
    forwarding: bool = True


class StateDir:
    def __init__(self, root: Path, name: str) -> None:
        self.path = root / name

    @property
    def state_file(self) -> Path:
        return self.path / "state.json"

    @property
    def etcd_dir(self) -> Path:
        return self.path / "etcd"

    def host_dir(self, index: int) -> Path:
        return self.path / f"h{index}"

    def exists(self) -> bool:
        return self.path.exists()

    def create(self) -> None:
        self.path.mkdir(parents=True)

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    def pid_files(self) -> list[list[Path]]:
        """Pid files in stopping order: the systemd lab's machines (whose poweroff stops
        their agents and dockerd), the lab's Prometheus and its helpers, Docker's
        restart hooks, dockerd (which stops its
        containers and containerd), the agents, then etcd (an agent stopping while etcd
        goes away would wait on it)."""
        if not self.path.is_dir():
            return []
        return [sorted(self.path.glob("h*/machine.pid")),
                [self.path / "prometheus" / name for name in PROMETHEUS_PID_FILES],
                sorted(self.path.glob("h*/docker-hook.pid")),
                sorted(self.path.glob("h*/dockerd.pid")),
                sorted(self.path.glob("h*/agent.pid")), sorted(self.etcd_dir.glob("*/etcd.pid"))]

    def save(self, *, name: str, backend: str, lease_ttl: int, containers_per_host: int,
             hosts: Iterable[Host], docker: bool = False, ip_masq: bool = False,
             nftables: bool = False, ipv6: bool = False, prometheus: bool = False,
             forwarding: bool = True) -> None:
        doc = {
            "name": name,
            "backend": backend,
            "docker": docker,
            "ip_masq": ip_masq,
            "nftables": nftables,
            "ipv6": ipv6,
            "prometheus": prometheus,
            "forwarding": forwarding,
            "lease_ttl": lease_ttl,
            "containers_per_host": containers_per_host,
            "hosts": [
                {
                    "index": h.index,
                    "subnet": str(h.subnet) if h.subnet else None,
                    "subnet6": str(h.subnet6) if h.subnet6 else None,
                    "mtu": h.mtu,
                    "containers": [{"index": c.index, "ip": str(c.ip),
                                    "ip6": str(c.ip6) if c.ip6 else None}
                                   for c in h.containers],
                }
                for h in hosts
            ],
        }
        write_atomic(self.state_file, (json.dumps(doc, indent=2) + "\n").encode())

    def load(self, topology: Topology) -> Saved:
        try:
            doc = json.loads(self.state_file.read_text())
        except (OSError, ValueError) as exc:
            raise LabError(f"no lab {topology.name!r} ({self.state_file}: {exc})") from exc
        # Before the hosts: the topology gives them their IPv6 addresses by it.
        topology.ipv6 = bool(doc.get("ipv6", False))
        hosts = []
        for h in doc["hosts"]:
            host = topology.host(h["index"], self.host_dir(h["index"]))
            host.subnet = IPv4Interface(h["subnet"]) if h["subnet"] else None
            host.subnet6 = IPv6Interface(h["subnet6"]) if h.get("subnet6") else None
            host.mtu = h["mtu"]
            host.containers = [
                topology.container(host, c["index"], IPv4Address(c["ip"]),
                                   ip6=IPv6Address(c["ip6"]) if c.get("ip6") else None)
                for c in h["containers"]]
            hosts.append(host)
        return Saved(backend=doc["backend"], lease_ttl=doc["lease_ttl"],
                     containers_per_host=doc["containers_per_host"], hosts=hosts,
                     docker=bool(doc.get("docker", False)),
                     ip_masq=bool(doc.get("ip_masq", False)),
                     nftables=bool(doc.get("nftables", False)),
                     ipv6=topology.ipv6, prometheus=bool(doc.get("prometheus", False)),
                     forwarding=bool(doc.get("forwarding", True)))
