"""The lab's agents: one leaseagent process per host, in the host's namespace.

Its command line (`argv`), starting it (recorded in the host's pid file by
PID and start time), and waiting for what it promises: subnet.env (the lease
is in etcd; in a dual-stack lab with both families' subnets) and /readyz 200
(the data plane is programmed). Each agent's metrics address is the same
port on every address of its own host (the lab asks on its loopback, the
lab's Prometheus on its PublicIP). In a dual-stack lab the command
line is the same: the agent finds its PublicIPv6 on eth0, as on a real host.

Each host has its own /run/wireguard (`host_argv`): wireguard-go, which the
agent starts for the wireguard backend, puts its control socket in that fixed
directory, one for all of a machine's namespaces. The agent runs in a mount
namespace of its own (`unshare --mount`, mounts slave to the machine's) with
the host's own directory `<host dir>/wireguard` bound at /run/wireguard; wireguard-go, the
agent's grandchild, inherits it, and so does every later agent of the host
(the same directory is bound again), `wg` and `leasectl doctor` run through
`host_argv` too. The directory /run/wireguard itself is created on the
machine if missing (an empty mount point); nothing is mounted outside those
private namespaces.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from ipaddress import IPv4Interface, IPv6Interface
from pathlib import Path

from leaseagent.core.subnetenv import parse_environment_file
from leaseagent.lab import processes
from leaseagent.lab.errors import LabError
from leaseagent.lab.probes import http_get
from leaseagent.lab.processes import log_tail
from leaseagent.lab.topology import Host

# Inside each host namespace, so every agent can use the same port. The agents listen
# on every address of their host (METRICS_BIND), so the lab's Prometheus scrapes them
# over the underlay at <PublicIP>:9464, the address each publishes in etcd
# (leaseagent.core.monitoring); the lab itself asks on the host's loopback.
METRICS_ADDR = "127.0.0.1:9464"
METRICS_BIND = "0.0.0.0:9464"


def argv(host: Host, *, command: Sequence[str], endpoints: str, prefix: str, lease_ttl: int,
         node_id: str, extra: Sequence[str] = ()) -> list[str]:
    """The agent's command line on `host`; `extra` comes last, so its flags win."""
    return [
        *command,
        "--etcd-endpoints", endpoints,
        "--etcd-prefix", prefix,
        "--iface", "eth0",
        "--public-ip", str(host.public_ip),
        "--subnet-file", str(host.subnet_file),
        "--state-dir", str(host.dir / "state"),
        "--lease-ttl", str(lease_ttl),
        "--node-id", node_id,
        "--metrics-addr", METRICS_BIND,
        "--log-level", "info",
        "--log-format", "text",
        *extra,
    ]


WIREGUARD_RUN_DIR = "/run/wireguard"  # wireguard-go's (/var/run/wireguard), fixed


def own_wireguard_dir_argv(own: Path, argv: Sequence[str]) -> list[str]:
    """`argv` in a mount namespace of its own with the directory `own` at /run/wireguard
    (mounts made there go nowhere else). The program is exec'd in place: a PID is the
    program's own."""
    own.mkdir(parents=True, exist_ok=True)
    script = (f'mkdir -p {WIREGUARD_RUN_DIR} && mount --bind "$0" {WIREGUARD_RUN_DIR} '
              '&& exec "$@"')
    return ["unshare", "--mount", "--propagation", "slave", "sh", "-c", script, str(own), *argv]


def host_argv(host: Host, argv: Sequence[str]) -> list[str]:
    """`argv` as run on `host` (inside its network namespace, once the caller adds it),
    with the host's own /run/wireguard (see the module docstring)."""
    return own_wireguard_dir_argv(host.dir / "wireguard", argv)


def start(host: Host, agent_argv: Sequence[str]) -> int:
    """Start the host's agent (appending to its log); returns its PID."""
    if processes.running(host.pid_file) is not None:
        raise LabError(f"{host.name}: agent already running")
    host.dir.mkdir(parents=True, exist_ok=True)
    return processes.spawn(host_argv(host, agent_argv), log_file=host.log_file, ns=host.ns,
                           pid_file=host.pid_file).pid


def running(host: Host) -> processes.Process | None:
    return processes.running(host.pid_file)


def stop(host: Host, *, sig: int, grace: float = 10) -> None:
    """Send `sig` to the host's agent, SIGKILL after `grace` s; forget its pid file."""
    proc = processes.running(host.pid_file)
    if proc is not None:
        proc.stop(first=sig, grace=grace)
    host.pid_file.unlink(missing_ok=True)


def wait_subnet(host: Host, *, timeout: float = 30, ipv6: bool = False) -> None:
    """Wait for the agent's subnet.env; fill host.subnet / host.mtu (and, if `ipv6`,
    host.subnet6) from it."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            text = host.subnet_file.read_text()
            env = parse_environment_file(text)
            host.subnet = IPv4Interface(env["FLANNEL_SUBNET"])
            host.mtu = int(env["FLANNEL_MTU"])
        except (OSError, KeyError, ValueError):
            pass  # not written yet (the agent renames it into place, so never half)
        else:
            if ipv6:
                host.subnet6 = ipv6_subnet(host, env, text)
            host.subnet_seen_at = time.monotonic()
            return
        if running(host) is None:
            raise LabError(f"{host.name}: agent exited before writing {host.subnet_file}:\n"
                           + log_tail(host.log_file))
        if time.monotonic() > deadline:
            raise LabError(f"{host.name}: no {host.subnet_file} after {timeout}s:\n"
                           + log_tail(host.log_file))
        time.sleep(0.02)


def ipv6_subnet(host: Host, env: Mapping[str, str], text: str) -> IPv6Interface:
    """FLANNEL_IPV6_SUBNET of a complete subnet.env. Its absence is final, not a file
    still being written: the agent writes subnet.env once per lease, with the IPv6
    lines whenever its network config has EnableIPv6."""
    value = env.get("FLANNEL_IPV6_SUBNET")
    try:
        if value:
            return IPv6Interface(value)
    except ValueError:
        pass
    raise LabError(f"{host.name}: the network config enables IPv6, but {host.subnet_file} "
                   f"has no (valid) FLANNEL_IPV6_SUBNET:\n{text.rstrip()}\n"
                   + log_tail(host.log_file))


def wait_ready(host: Host, *, timeout: float = 30) -> None:
    """Wait until the agent's /readyz answers 200 (asked from inside its namespace,
    where its metrics address lives)."""
    deadline = time.monotonic() + timeout
    while True:
        if http_get(host.ns, f"http://{METRICS_ADDR}/readyz", timeout=1)[0] == 200:
            return
        if running(host) is None:
            raise LabError(f"{host.name}: agent exited:\n" + log_tail(host.log_file))
        if time.monotonic() > deadline:
            raise LabError(f"{host.name}: not ready after {timeout}s:\n"
                           + log_tail(host.log_file))
        time.sleep(0.05)
