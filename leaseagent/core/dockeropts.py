"""Docker daemon options from subnet.env, as flannel's mk-docker-opts.sh makes them.

Pure. flannel's current dist/mk-docker-opts.sh (a /bin/sh script) writes, for
FLANNEL_SUBNET=10.5.34.1/24, FLANNEL_MTU=1450, FLANNEL_IPMASQ=false:

    DOCKER_OPT_BIP="--bip=10.5.34.1/24"
    DOCKER_OPT_IPMASQ="--ip-masq=true"
    DOCKER_OPT_MTU="--mtu=1450"
    DOCKER_OPTS=" --bip=10.5.34.1/24 --ip-masq=true --mtu=1450"

FLANNEL_IPMASQ=true gives --ip-masq=false (the overlay masquerades, Docker must
not), false gives --ip-masq=true, absent gives neither, anything else is the
script's error "Invalid value of FLANNEL_IPMASQ: <value>" (exit 1); -m leaves the
option out and the check too. The individual variables come in name order (`set`
lists them so); the combined one last, made of the combined key's existing value
(from subnet.env, which the script sources, else the environment) and a space
when it has one, then " <option>" for each. tests/unit/test_dockeropts.py holds the
script's own output for each option (-i, -c, -m, -k), taken by running it.

The agent's own file (`--docker-opts-file`) names the combined variable
DOCKER_NETWORK_OPTIONS (`mk-docker-opts.sh -k DOCKER_NETWORK_OPTIONS`, as
flannel's Docker integration does), so the docker.service drop-in adds it to
dockerd's command line beside the operator's own $DOCKER_OPTS.

With IPv6 (FLANNEL_IPV6_SUBNET set) Docker also gets `--ipv6
--fixed-cidr-v6=<FLANNEL_IPV6_SUBNET>` (DOCKER_OPT_IPV6, DOCKER_OPT_FIXED_CIDR_V6):
ours, since mk-docker-opts.sh has no IPv6 options at all.

The script's last step, exit 1 when the host's routing table already routes the
subnet via a gateway (after writing), is `leasectl docker-opts`'s: it needs the
kernel, and this module is pure.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

DOCKER_OPTIONS_KEY = "DOCKER_NETWORK_OPTIONS"  # the combined variable of the agent's file


def docker_options(env: Mapping[str, str], *, ipmasq: bool = True) -> dict[str, str]:
    """DOCKER_OPT_* name -> option, in the order mk-docker-opts.sh emits them; ValueError
    with the script's message for a FLANNEL_IPMASQ other than true or false."""
    opts: dict[str, str] = {}
    if env.get("FLANNEL_SUBNET"):
        opts["DOCKER_OPT_BIP"] = f"--bip={env['FLANNEL_SUBNET']}"
    if env.get("FLANNEL_MTU"):
        opts["DOCKER_OPT_MTU"] = f"--mtu={env['FLANNEL_MTU']}"
    masq = env.get("FLANNEL_IPMASQ", "")
    if masq and ipmasq:
        if masq not in ("true", "false"):
            raise ValueError(f"Invalid value of FLANNEL_IPMASQ: {masq}")
        opts["DOCKER_OPT_IPMASQ"] = f"--ip-masq={'false' if masq == 'true' else 'true'}"
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
        if combined_key in env:  # subnet.env is sourced after the environment is read
            existing = env[combined_key]
            if len(existing) > 1 and existing[0] == existing[-1] and existing[0] in "\"'":
                existing = existing[1:-1]
        joined = (f"{existing} " if existing else "") + "".join(f" {v}" for v in opts.values())
        lines.append(f'{combined_key}="{joined}"')
    return "".join(line + "\n" for line in lines)


def render_daemon_json(env: Mapping[str, str]) -> str:
    """A daemon.json fragment: {"bip": ..., "mtu": ...} (and "ip-masq" as the env file's
    --ip-masq says, "ipv6" and "fixed-cidr-v6" with IPv6)."""
    doc: dict[str, object] = {}
    if env.get("FLANNEL_SUBNET"):
        doc["bip"] = env["FLANNEL_SUBNET"]
    if env.get("FLANNEL_MTU"):
        doc["mtu"] = int(env["FLANNEL_MTU"])
    if env.get("FLANNEL_IPMASQ") in ("true", "false"):
        doc["ip-masq"] = env["FLANNEL_IPMASQ"] == "false"
    if env.get("FLANNEL_IPV6_SUBNET"):
        doc["ipv6"] = True
        doc["fixed-cidr-v6"] = env["FLANNEL_IPV6_SUBNET"]
    return json.dumps(doc, indent=2) + "\n"
