"""A lab whose underlay carries IPv6 but whose network config has it only when told."""

from __future__ import annotations

from leaseagent.lab import Lab, agents, netns, run
from leaseagent.lab.topology import Host


class SwitchingLab(Lab):
    """A dual-stack lab (IPv6 on the underlay) whose network config says EnableIPv6
    only once `ipv6_on` is set: an IPv4 cluster about to turn IPv6 on. Build it with
    `ipv6=True`."""

    ipv6_on = False

    def network_config(self) -> dict[str, object]:
        config = super().network_config()
        if not self.ipv6_on:
            config.pop("EnableIPv6", None)
            config.pop("IPv6Network", None)
        return config

    def wait_subnet(self, host: Host, *, timeout: float = 30) -> None:
        agents.wait_subnet(host, timeout=timeout, ipv6=self.ipv6_on)


def give_containers_ipv6(host: Host) -> None:
    """What `dockerd --ipv6 --fixed-cidr-v6` does once restarted on the new options:
    docker0 and the containers get addresses of FLANNEL_IPV6_SUBNET."""
    assert host.subnet6 is not None
    netns.address(host.ns, "br0", str(host.subnet6))
    for c in host.containers:
        c.ip6 = host.subnet6.ip + c.index
        netns.address(c.ns, "eth0", f"{c.ip6}/{host.subnet6.network.prefixlen}")
        run(["ip", "-n", c.ns, "-6", "route", "add", "default", "via", str(host.subnet6.ip)])
