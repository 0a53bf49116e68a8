"""The lab: a cluster of hosts, etcd and containers on one machine, in network namespaces.

    la-<name>-ul      underlay: bridge ul0 (10.250.0.1/24), one veth port per host and etcd
    la-<name>-etcd    etcd at 10.250.0.2:2379, data under the state dir
    la-<name>-h<i>    host i: eth0 10.250.0.<10+i>/24, ip_forward on, one leaseagent,
                      bridge br0 = FLANNEL_SUBNET from that agent's subnet.env (what
                      `dockerd --bip` does), MTU = FLANNEL_MTU
    la-<name>-c<i>-<j> container j of host i: eth0 on host i's br0, address .<1+j> of the
                      host's subnet, default route via the bridge (as Pipework does)
    la-<name>-prom    with `Lab(prometheus=True)`: Prometheus at 10.250.0.3:9090 scraping
                      every host's agent, reached from 127.0.0.1:<port> by a forwarder

Dual-stack (`Lab(ipv6=True)`, `up --ipv6`): the network config has EnableIPv6
with IPv6Network fd00:244::/56, the underlay also fd00:250::/64 (host i at
fd00:250::<10+i>, the IPv4 address's last number as IPv6 digits), br0 also
FLANNEL_IPV6_SUBNET's first address, each container also ::<1+j> of it, and
every probe runs per family (`family=4|6`; `ping -6`).

Used by the CLI (`python -m leaseagent.lab up|status|down`, wrapped by
deploy/lab), by the end-to-end tests (`Lab` as a context manager) and by the
README's demo. Its etcd launcher and namespace helper also serve the tests'
etcd fixtures (tests/etcd_server.py, tests/etcd_cluster.py), the kernel
tests' underlay (tests/netns.py) and the bench (bench/env.py).

Invariants, so that `down` is safe to run at any time, even after the process
that ran `up` was killed:

- Everything the lab makes carries its name: namespace names match
  `la-<name>-(ul|etcd|out|prom|h<i>|c<i>-<j>)`, and `down` touches no other namespace.
- The root namespace gets nothing (but a listening socket on 127.0.0.1, the
  Prometheus forwarder's): each veth pair is created inside one lab
  namespace with its peer placed straight into another (`ip -n A link add ...
  peer name X netns B`), so deleting the lab's namespaces removes every link.
- Every process the lab starts (etcd, agents) is recorded in a pid file under
  /run/leaseagent-lab/<name>/ as "<pid> <start time>", written before anything
  waits on it; `down` stops exactly those PIDs (SIGCONT, SIGTERM, then SIGKILL;
  agents before etcd), after checking the start time so a recycled PID is
  never hit. It also stops any process found inside the lab's namespaces whose
  command line names the lab's state dir (spawned just before a crash, its pid
  file never written) or that is one of the lab's helpers (ping, etcdctl,
  leasectl); anything else in there is reported, not killed.
- Traffic only goes to addresses inside the lab's namespaces: 10.250.0.0/24
  and fd00:250::/64 on the underlay, 10.244.0.0/16 and fd00:244::/56 for
  containers.

Processes are started in their own session, so agents and etcd outlive a CLI
`up` (the lab keeps running until `down`) and a Ctrl-C at the terminal does
not reach them.

One job per module:

    lab        `Lab`, the facade: the order of `up`, network config and lease keys
    topology   names, addresses, building hosts, bridges and containers
    netns      named namespaces, veth pairs, commands inside a namespace
    state      the state dir, its pid files, state.json
    processes  spawning, finding and stopping processes by PID and start time
    etcd       the etcd launcher: one member or a cluster, in a namespace or not
    agents     the agents' command line, start, waiting for subnet.env and /readyz
    probes     ping, the reachability matrix, HTTP, metrics, kernel entries
    prometheus the lab's Prometheus, its targets writer and forwarder; its HTTP API
    forward    the forwarder from 127.0.0.1 into a lab namespace (`python -m`)
    teardown   `down`, from the lab's name alone
    commands   `run` and `tool`
    cli        `up|status|down`, and `hosts ...` (`__main__` runs it)

The systemd lab (`deploy/lab hosts up|check|down|run`) reuses the topology,
etcd, state and teardown with hosts booted by systemd-nspawn instead of
agent processes:

    rootfs     the cached Debian root filesystem (debootstrap) and wheelhouse
    machines   one nspawn host: cgroups, overlay root, boot, reboot, commands inside
    hostlab    `HostLab`: the README's install steps run in each host, the checks
    hostcli    `hosts up|check|down|run`

Fault injection (etcd stopped, paused or cut off, agents killed) is the
tests' own (tests/labfaults.py), built on `Lab.etcd` and `Lab.stop_agent`.
"""

from leaseagent.lab.agents import METRICS_ADDR
from leaseagent.lab.commands import run, tool
from leaseagent.lab.errors import LabError, LabExists
from leaseagent.lab.lab import BACKENDS, ETCD_PREFIX, Lab
from leaseagent.lab.probes import Reachability, parse_metrics, parse_ping_summary
from leaseagent.lab.state import STATE_ROOT
from leaseagent.lab.topology import (
    CONTAINER_NETWORK,
    CONTAINER_NETWORK6,
    ETCD_IP,
    UNDERLAY,
    UNDERLAY6,
    Container,
    Host,
)

__all__ = [
    "BACKENDS", "CONTAINER_NETWORK", "CONTAINER_NETWORK6", "ETCD_IP", "ETCD_PREFIX",
    "METRICS_ADDR", "STATE_ROOT", "UNDERLAY", "UNDERLAY6", "Container", "Host", "Lab", "LabError",
    "LabExists", "Reachability", "parse_metrics", "parse_ping_summary", "run", "tool",
]
