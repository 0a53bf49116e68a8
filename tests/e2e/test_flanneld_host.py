"""flanneld's ways of choosing the underlay interface, against a real kernel in a namespace.

flanneld (main.go, pkg/ipmatch) tries each --iface in order and takes the first
that matches, then each --iface-regex (the interfaces' IPv4 addresses, then
their names), then --iface-can-reach (`ip route get`). The namespace "host"
has eth0 (10.99.0.1/24), `uplink1` (172.31.5.1/24, a veth) with a route to
198.18.0.0/15 through it, and `noaddr0` without an address. Needs root; namespaces removed afterwards.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from netns import Underlay, ash, sh, underlay

from leaseagent.dataplane.base import InterfaceChoice
from leaseagent.dataplane.host import resolve_host
from leaseagent.errors import ConfigError

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)"),
]


@pytest.fixture
def lab() -> Iterator[Underlay]:
    with underlay(1, prefix="lafh") as topo:
        yield topo


async def resolved(ns: str, choice: InterfaceChoice, public_ip: str | None = None
                   ) -> tuple[str | None, str]:
    host = await resolve_host(choice, public_ip, netns=ns)
    return host.iface, str(host.public_ip)


async def test_iface_choice_in_flannels_order(lab: Underlay) -> None:
    ns = lab.hosts[0]
    for name in ("uplink1", "noaddr0"):  # veth pairs: this kernel may have no dummy module
        await ash("ip", "-n", ns, "link", "add", name, "type", "veth", "peer", "name", f"{name}p")
        for dev in (name, f"{name}p"):
            await ash("ip", "-n", ns, "link", "set", dev, "up")
    await ash("ip", "-n", ns, "addr", "add", "172.31.5.1/24", "dev", "uplink1")
    await ash("ip", "-n", ns, "route", "add", "198.18.0.0/15", "via", "172.31.5.254")

    # Repeated --iface: the first that matches; a missing one or one without an IPv4
    # address does not match, and the next is tried.
    assert await resolved(ns, InterfaceChoice(names=("eth9", "noaddr0", "uplink1", "eth0"))
                          ) == ("uplink1", "172.31.5.1")
    assert await resolved(ns, InterfaceChoice(names=("eth0", "uplink1"))) == (
        "eth0", "10.99.0.1")
    assert await resolved(ns, InterfaceChoice(names=("172.31.5.1",))) == (
        "uplink1", "172.31.5.1")
    # --iface first, then --iface-regex: an address match wins over a name match.
    assert await resolved(ns, InterfaceChoice(names=("eth9",), regexes=("^172\\.31\\.",))
                          ) == ("uplink1", "172.31.5.1")
    assert await resolved(ns, InterfaceChoice(regexes=("zzz", "^eth"))) == ("eth0", "10.99.0.1")
    # Then --iface-can-reach: the interface of the route, its preferred source address.
    assert await resolved(ns, InterfaceChoice(names=("eth9",), can_reach="198.18.3.4")) == (
        "uplink1", "172.31.5.1")
    assert await resolved(ns, InterfaceChoice(can_reach="10.99.0.200")) == ("eth0", "10.99.0.1")
    # --public-ip still wins over the interface's address.
    assert await resolved(ns, InterfaceChoice(regexes=("^172",)), "192.0.2.9") == (
        "uplink1", "192.0.2.9")
    # Nothing matches: one line naming each flag and why.
    with pytest.raises(ConfigError) as err:
        await resolve_host(InterfaceChoice(names=("eth9",), regexes=("^nope",),
                                           can_reach="203.0.113.1"), None, netns=ns)
    text = str(err.value)
    assert text.startswith("no interface matches --iface eth9: no such interface")
    assert "--iface-regex ^nope: matches no interface" in text
    assert "--iface-can-reach 203.0.113.1: no route to it" in text and "\n" not in text


def test_docker_opts_refuses_a_subnet_the_host_routes_via_a_gateway(lab: Underlay,
                                                                     tmp_path: Path) -> None:
    """mk-docker-opts.sh's last step: the options are written, then exit 1 when the routing
    table already routes FLANNEL_SUBNET's subnet through a gateway."""
    ns = lab.hosts[0]
    subnet_env = tmp_path / "subnet.env"
    subnet_env.write_text("FLANNEL_NETWORK=10.5.0.0/16\nFLANNEL_SUBNET=10.5.34.1/24\n"
                          "FLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n")
    out = tmp_path / "docker_opts.env"

    def docker_opts() -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-m",
                               "leaseagent.cli.leasectl", "docker-opts", "-f", str(subnet_env),
                               "-d", str(out)], capture_output=True, text=True, timeout=60,
                              check=False)

    assert docker_opts().returncode == 0
    sh("ip", "-n", ns, "route", "add", "10.5.34.0/24", "via", "10.99.0.254")
    out.unlink()
    refused = docker_opts()
    assert refused.returncode == 1
    assert refused.stderr == ("leasectl: error: the routing table already routes 10.5.34.0/24 "
                              "via 10.99.0.254 (mk-docker-opts.sh's check)\n")
    assert out.read_text().startswith('DOCKER_OPT_BIP="--bip=10.5.34.1/24"')
