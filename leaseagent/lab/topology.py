"""What the lab looks like and how it is wired: names, addresses, hosts, containers.

    la-<name>-ul      underlay: bridge ul0 (10.250.0.1/24), one veth port per host and etcd
    la-<name>-etcd    etcd's namespace: eth0 10.250.0.2/24
    la-<name>-prom    Prometheus's (only with `Lab(prometheus=True)`, `up --prometheus`):
                      eth0 10.250.0.3/24; it scrapes every host's agent on the underlay
                      (leaseagent.lab.prometheus)
    la-<name>-out     "outside": eth0 10.250.0.254/24, no agent and no route to the
                      cluster network (it stands for the internet): a container
                      reaches it only through masquerade (--ip-masq)
    la-<name>-h<i>    host i: eth0 10.250.0.<10+i>/24, ip_forward on; bridge br0 =
                      FLANNEL_SUBNET from its agent's subnet.env (what `dockerd --bip`
                      does), MTU = FLANNEL_MTU
    la-<name>-c<i>-<j> container j of host i: eth0 on host i's br0, address .<1+j> of the
                      host's subnet, default route via the bridge (as Pipework does)

Dual-stack (`Lab(ipv6=True)`, `up --ipv6`): the underlay also carries IPv6
(fd00:250::/64, a ULA prefix, so nothing outside the lab is named), each node
at the IPv4 address's last number written as IPv6 digits (10.250.0.11 is
fd00:250::11, ul0 fd00:250::1, the outside host fd00:250::254), one link with
no IPv6 default route. Hosts forward IPv6 too; br0 also gets the first
address of FLANNEL_IPV6_SUBNET and container j the address ::<1+j> of it with
an IPv6 default route via the bridge. Every IPv6 address is added with
`nodad` (leaseagent.lab.netns): unique by construction, so nothing waits for
Duplicate Address Detection.

With Docker (`Lab(docker=True)`, leaseagent.lab.docker) there is no br0 and
no container namespace of the lab's: each host runs a real dockerd (docker0
from the agent's options) and its containers are Docker's, named c<j>; the
name la-<name>-c<i>-<j> is then only their label in tables, and a command
reaches one through `docker exec` (`Container.exec_argv`). In a dual-stack lab
their IPv6 addresses are Docker's too (inside --fixed-cidr-v6).

Every name carries the lab's name, and `owns` matches the whole shape, so a
namespace someone else named `la-lab-foo` is never touched. Links are made
with leaseagent.lab.netns: each veth is created inside one lab namespace with
its peer placed straight into another, so the root namespace gets nothing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Interface, IPv4Network, IPv6Address, IPv6Interface, IPv6Network
from pathlib import Path

from leaseagent.lab import netns
from leaseagent.lab.commands import run
from leaseagent.lab.errors import LabError

UNDERLAY = IPv4Network("10.250.0.0/24")
UNDERLAY_GW = IPv4Address("10.250.0.1")
ETCD_IP = IPv4Address("10.250.0.2")
PROMETHEUS_IP = IPv4Address("10.250.0.3")
OUTSIDE_IP = IPv4Address("10.250.0.254")
ETCD_PORTS = (2379, 2380)  # client, peer: alone in its namespace, etcd has them free
HOST_IP_BASE = 10  # host i is 10.250.0.<10+i>
CONTAINER_NETWORK = IPv4Network("10.244.0.0/16")
UNDERLAY6 = IPv6Network("fd00:250::/64")
CONTAINER_NETWORK6 = IPv6Network("fd00:244::/56")  # the network config's IPv6Network
NAME_RE = re.compile(r"^[a-z0-9]{1,12}$")

Address = IPv4Address | IPv6Address


def underlay_ipv6(ip: IPv4Address) -> IPv6Address:
    """A node's IPv6 underlay address: its IPv4 address's last number read as IPv6
    digits (10.250.0.11 -> fd00:250::11), so both families' tables name a node alike."""
    return UNDERLAY6.network_address + int(str(int(ip) - int(UNDERLAY.network_address)), 16)


OUTSIDE_IP6 = underlay_ipv6(OUTSIDE_IP)


@dataclass
class Container:
    ns: str  # its namespace, or (a Docker container) its label: la-<name>-c<i>-<j>
    ip: IPv4Address
    index: int
    via: list[str] | None = None  # a Docker container: `docker -H ... exec c<j>`
    ip6: IPv6Address | None = None  # in a dual-stack lab

    def address(self, family: int) -> Address:
        """Its address of IP version `family` (4 or 6)."""
        if family == 4:
            return self.ip
        if self.ip6 is None:
            raise LabError(f"{short(self.ns)} has no IPv6 address")
        return self.ip6

    def exec_argv(self, argv: list[str]) -> list[str]:
        """`argv` as run inside the container."""
        if self.via is not None:
            return [*self.via, *argv]
        return netns.exec_argv(self.ns, argv)


@dataclass
class Host:
    index: int
    ns: str
    public_ip: IPv4Address
    dir: Path  # its part of the state dir: subnet.env, the agent's pid file, log, state
    subnet: IPv4Interface | None = None  # FLANNEL_SUBNET: the bridge's address / lease length
    mtu: int | None = None
    public_ipv6: IPv6Address | None = None  # its eth0's IPv6 address in a dual-stack lab
    subnet6: IPv6Interface | None = None  # FLANNEL_IPV6_SUBNET, in a dual-stack lab
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


def short(ns: str) -> str:
    """`la-demo-c2-1` -> `c2-1`: the part after the lab prefix, for tables."""
    return ns.split("-", 2)[2]


class Topology:
    """The namespaces of lab `name`: their names, and building and removing them."""

    def __init__(self, name: str, *, ipv6: bool = False) -> None:
        if not NAME_RE.match(name):
            raise LabError(f"lab name {name!r}: use 1-12 lowercase letters or digits")
        self.name = name
        self.ipv6 = ipv6  # the underlay and the hosts carry IPv6 too
        self.ul_ns = self.ns("ul")
        self.etcd_ns = self.ns("etcd")
        self.outside_ns = self.ns("out")
        self.prometheus_ns = self.ns("prom")

    # ---------------------------------------------------------------- names

    def ns(self, suffix: str) -> str:
        return f"la-{self.name}-{suffix}"

    def owns(self, ns: str) -> bool:
        """True for exactly the namespace names this lab makes."""
        return re.fullmatch(rf"la-{self.name}-(ul|etcd|out|prom|h\d+|c\d+-\d+)", ns) is not None

    def present(self) -> list[str]:
        """This lab's namespaces that exist now."""
        return [ns for ns in netns.list_namespaces(self.ns("")) if self.owns(ns)]

    @staticmethod
    def removal_order(namespaces: list[str]) -> list[str]:
        """Containers, hosts, etcd, underlay: each veth goes with the namespace holding it."""
        order = {"c": 0, "h": 1, "o": 2, "e": 2, "p": 2, "u": 3}
        return sorted(namespaces, key=lambda n: order[short(n)[0]])

    def host(self, index: int, dir: Path) -> Host:
        """The record of host `index` (nothing is built)."""
        public_ip = UNDERLAY_GW + HOST_IP_BASE - 1 + index
        return Host(index=index, ns=self.ns(f"h{index}"), public_ip=public_ip, dir=dir,
                    public_ipv6=underlay_ipv6(public_ip) if self.ipv6 else None)

    def container(self, host: Host, index: int, ip: IPv4Address,
                  via: list[str] | None = None, ip6: IPv6Address | None = None) -> Container:
        return Container(ns=self.ns(f"c{host.index}-{index}"), ip=ip, index=index, via=via,
                         ip6=ip6)

    # ---------------------------------------------------------------- building

    def make_underlay(self) -> None:
        """The underlay's bridge, etcd's namespace and the outside host on it."""
        netns.add(self.ul_ns)
        netns.bridge(self.ul_ns, "ul0", address=f"{UNDERLAY_GW}/{UNDERLAY.prefixlen}")
        if self.ipv6:
            netns.address(self.ul_ns, "ul0", f"{underlay_ipv6(UNDERLAY_GW)}/{UNDERLAY6.prefixlen}")
        self._attach_to_underlay(self.etcd_ns, port="etcd", ip=ETCD_IP)
        # No default route: nothing but the underlay is reachable from it.
        self._attach_to_underlay(self.outside_ns, port="out", ip=OUTSIDE_IP, default_route=False)

    def make_prometheus_ns(self) -> None:
        """Prometheus's namespace on the underlay (no default route: it scrapes the hosts
        and asks etcd, all on the underlay)."""
        self._attach_to_underlay(self.prometheus_ns, port="prom", ip=PROMETHEUS_IP,
                                 default_route=False)

    def _attach_to_underlay(self, ns: str, *, port: str, ip: IPv4Address,
                            default_route: bool = True) -> None:
        """New namespace `ns` with eth0 at `ip` (and at its IPv6 twin in a dual-stack
        lab), its peer `port` a port of ul0. The IPv6 underlay is one link: no IPv6
        default route, there is nothing beyond it to reach."""
        netns.add(ns)
        netns.veth(ns, "eth0", port, peer_ns=self.ul_ns)
        netns.link_up(self.ul_ns, port, master="ul0")
        netns.address(ns, "eth0", f"{ip}/{UNDERLAY.prefixlen}")
        if self.ipv6:
            netns.address(ns, "eth0", f"{underlay_ipv6(ip)}/{UNDERLAY6.prefixlen}")
        netns.link_up(ns, "eth0")
        if default_route:
            run(["ip", "-n", ns, "route", "add", "default", "via", str(UNDERLAY_GW)])

    def make_host(self, host: Host, *, forwarding: bool = True) -> None:
        """The host's namespace on the underlay, forwarding on (it routes for its
        containers) unless told: in the systemd lab Docker turns it on, and sets its
        FORWARD policy to DROP when it does."""
        if host.public_ip not in UNDERLAY or host.public_ip == UNDERLAY.broadcast_address:
            raise LabError(f"host {host.index}: no underlay address left")
        self._attach_to_underlay(host.ns, port=host.name, ip=host.public_ip)
        if forwarding:
            netns.enable_forwarding(host.ns, ipv6=self.ipv6)

    def make_bridge(self, host: Host) -> None:
        """docker0's part: bridge br0 with FLANNEL_SUBNET's address and FLANNEL_MTU (and
        FLANNEL_IPV6_SUBNET's, what `dockerd --fixed-cidr-v6` gives docker0)."""
        assert host.subnet is not None and host.mtu is not None
        netns.bridge(host.ns, "br0", mtu=host.mtu, address=str(host.subnet))
        if host.subnet6 is not None:
            netns.address(host.ns, "br0", str(host.subnet6))

    def make_container(self, host: Host, j: int) -> Container:
        """Container `j` on the host's bridge: address .<1+j> (and ::<1+j> of the IPv6
        subnet), default routes via br0."""
        assert host.subnet is not None and host.mtu is not None
        ip = host.subnet.ip + j  # .1 is the bridge
        if ip not in host.subnet.network or ip == host.subnet.network.broadcast_address:
            raise LabError(f"{host.name}: subnet {host.subnet.network} has no room for {j}")
        c = self.container(host, j, ip, ip6=host.subnet6.ip + j if host.subnet6 else None)
        netns.add(c.ns)
        netns.veth(c.ns, "eth0", f"vc{j}", peer_ns=host.ns)
        netns.link_up(host.ns, f"vc{j}", master="br0", mtu=host.mtu)
        netns.link_up(c.ns, "eth0", mtu=host.mtu)
        netns.address(c.ns, "eth0", f"{ip}/{host.subnet.network.prefixlen}")
        run(["ip", "-n", c.ns, "route", "add", "default", "via", str(host.subnet.ip)])
        if host.subnet6 is not None:
            netns.address(c.ns, "eth0", f"{c.ip6}/{host.subnet6.network.prefixlen}")
            run(["ip", "-n", c.ns, "-6", "route", "add", "default", "via", str(host.subnet6.ip)])
        host.containers.append(c)
        return c

    def remove_host(self, host: Host) -> None:
        """Delete the host's and its containers' namespaces."""
        # The kernel tears a deleted namespace down asynchronously; the underlay port
        # would linger for a moment and block a new host of the same index. Deleting
        # one end of the veth removes both, now.
        run(["ip", "-n", self.ul_ns, "link", "del", host.name], check=False)
        for c in host.containers:
            if c.via is None:
                netns.delete(c.ns)
        netns.delete(host.ns)
