"""Docker daemon options from subnet.env, as flannel's mk-docker-opts.sh makes them.

Pure. mk-docker-opts.sh writes, for FLANNEL_SUBNET=10.5.34.1/24, FLANNEL_MTU=1450:

    DOCKER_OPT_BIP="--bip=10.5.34.1/24"
    DOCKER_OPT_MTU="--mtu=1450"
    DOCKER_OPTS=" --bip=10.5.34.1/24 --mtu=1450 "

The agent's own file (`--docker-opts-file`) names the combined variable
DOCKER_NETWORK_OPTIONS (`mk-docker-opts.sh -k DOCKER_NETWORK_OPTIONS`, as
flannel's Docker integration does), so the docker.service drop-in adds it to
dockerd's command line beside the operator's own $DOCKER_OPTS.

With IPv6 (FLANNEL_IPV6_SUBNET set) Docker also gets `--ipv6
--fixed-cidr-v6=<FLANNEL_IPV6_SUBNET>` (DOCKER_OPT_IPV6, DOCKER_OPT_FIXED_CIDR_V6):
ours, since mk-docker-opts.sh has no IPv6 options at all.

Individual variables in name order (bash's `compgen -v`), the combined one
last, starting from any existing value of the combined key plus a space, each
option followed by a space. DOCKER_OPT_IPMASQ="--ip-masq=false" appears only
when FLANNEL_IPMASQ=true: then the overlay masquerades and Docker must not.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

DOCKER_OPTIONS_KEY = "DOCKER_NETWORK_OPTIONS"  # the combined variable of the agent's file


def docker_options(env: Mapping[str, str], *, ipmasq: bool = True) -> dict[str, str]:
    """DOCKER_OPT_* name -> option, in the order mk-docker-opts.sh emits them."""
    opts: dict[str, str] = {}
    if env.get("FLANNEL_SUBNET"):
        opts["DOCKER_OPT_BIP"] = f"--bip={env['FLANNEL_SUBNET']}"
    if env.get("FLANNEL_MTU"):
        opts["DOCKER_OPT_MTU"] = f"--mtu={env['FLANNEL_MTU']}"
    if env.get("FLANNEL_IPMASQ") == "true" and ipmasq:
        opts["DOCKER_OPT_IPMASQ"] = "--ip-masq=false"
    if env.get("FLANNEL_IPV6_SUBNET"):
        opts["DOCKER_OPT_IPV6"] = "--ipv6"
        opts["DOCKER_OPT_FIXED_CIDR_V6"] = f"--fixed-cidr-v6={env['FLANNEL_IPV6_SUBNET']}"
    return dict(sorted(opts.items()))


def render_docker_env(
    env: Mapping[str, str],
    *,
    individual: bool = True,
    combined: bool = True,
    combined_key: str = "DOCKER_OPTS",
    existing: str = "",
    ipmasq: bool = True,
) -> str:
    opts = docker_options(env, ipmasq=ipmasq)
    lines = [f'{name}="{value}"' for name, value in opts.items()] if individual else []
    if combined:
        joined = existing + " " + "".join(f"{value} " for value in opts.values())
        lines.append(f'{combined_key}="{joined}"')
    return "".join(line + "\n" for line in lines)


def render_daemon_json(env: Mapping[str, str]) -> str:
    """A daemon.json fragment: {"bip": ..., "mtu": ...} (and "ip-masq" when flannel
    masquerades, "ipv6" and "fixed-cidr-v6" with IPv6)."""
    doc: dict[str, object] = {}
    if env.get("FLANNEL_SUBNET"):
        doc["bip"] = env["FLANNEL_SUBNET"]
    if env.get("FLANNEL_MTU"):
        doc["mtu"] = int(env["FLANNEL_MTU"])
    if env.get("FLANNEL_IPMASQ") == "true":
        doc["ip-masq"] = False
    if env.get("FLANNEL_IPV6_SUBNET"):
        doc["ipv6"] = True
        doc["fixed-cidr-v6"] = env["FLANNEL_IPV6_SUBNET"]
    return json.dumps(doc, indent=2) + "\n"
