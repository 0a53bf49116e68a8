"""This host, checked before it takes part: the paths the agent writes and the identity
it publishes (its interface, PublicIP and PublicIPv6).

`preflight` runs before the first etcd request (every check that needs no
etcd); `resolve_host` once the network config is known, at start and on a
config change. A ConfigError (exit status 2 at start) names the flag.
"""

from __future__ import annotations

import logging

from leaseagent.config import AgentConfig
from leaseagent.core.leases import unusable_ip_reason
from leaseagent.core.network import NetworkConfig, host_overlap
from leaseagent.dataplane.base import HostInfo
from leaseagent.errors import ConfigError
from leaseagent.files import check_writable, exposure, refuse_non_regular, refuse_symlink
from leaseagent.store.settings import check_credential_files

log = logging.getLogger("leaseagent")


async def preflight(cfg: AgentConfig) -> HostInfo | None:
    """Every check that needs no etcd, before the first etcd request: the paths we write
    (no planted symlink; their directories can be made, which a unit's ProtectSystem=
    may forbid) and this host's interface and PublicIP (when they do not depend on the
    backend: alloc with --public-ip needs no interface). ConfigError (exit status 2)
    names the flag; the resolved host, if any, is returned for the agent to use."""
    for path in (cfg.subnet_file.parent, cfg.state_dir,
                 *((cfg.docker_opts_file.parent,) if cfg.docker_opts_file else ())):
        refuse_symlink(path)
    for path in (cfg.subnet_file, *((cfg.docker_opts_file,) if cfg.docker_opts_file else ())):
        refuse_non_regular(path)
    for flag, directory in (("--subnet-file", cfg.subnet_file.parent),
                            ("--state-dir", cfg.state_dir),
                            *((("--docker-opts-file", cfg.docker_opts_file.parent),)
                              if cfg.docker_opts_file else ())):
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"{flag}: cannot create {directory}: {exc.strerror}") from None
        # A read-only or full file system is found now, not after a lease is taken.
        check_writable(directory, flag)
    # The state dir holds what identifies this host (VtepMAC, WireGuard's private key):
    # another user who may write in it could plant or swap them.
    problems = exposure(cfg.state_dir, secret=False)
    if problems:
        raise ConfigError(f"--state-dir: {cfg.state_dir} is {', '.join(problems)}; make it "
                          "root's and mode 0700 or 0755")
    for warning in check_credential_files(cfg.etcd):
        log.warning("%s", warning)
    if cfg.public_ip is not None and not cfg.iface:
        return None  # which interface depends on the backend (alloc needs none)
    from leaseagent.dataplane.host import resolve_host as resolve

    host = await resolve(cfg.iface, str(cfg.public_ip) if cfg.public_ip else None)
    why = unusable_ip_reason(host.public_ip)
    if why and not cfg.allow_any_public_ip:
        raise ConfigError(f"interface {host.iface}: its first IPv4 address {host.public_ip} is "
                          f"{why}; peers would refuse it (pass --public-ip)")
    return host


async def resolve_host(cfg: AgentConfig, network: NetworkConfig,
                       host: HostInfo | None = None) -> HostInfo:
    """This host's underlay interface and PublicIP (alloc needs no interface), and its
    PublicIPv6 when the network config has IPv6. `host`: what preflight found already
    (it ran before the config was known, so IPv6 may still be missing). ConfigError if
    the Network holds one of this host's addresses or its underlay network."""
    resolved = await _resolve_host(cfg, network, host)
    # A Network that holds this host's own addresses would take its underlay (and etcd)
    # into the overlay: refused here, at start (exit 2) and on a config change (ignored).
    why = host_overlap(network, resolved.own_addresses())
    if why:
        raise ConfigError(f"{why}: a lease there would route this host's own traffic into "
                          "the overlay; choose a Network apart from the hosts' networks")
    return resolved


async def _resolve_host(cfg: AgentConfig, network: NetworkConfig,
                        host: HostInfo | None) -> HostInfo:
    want_ipv6 = network.ipv6 is not None
    if host is not None and (host.public_ipv6 is not None or not want_ipv6):
        return host
    if not network.profile.data_path and cfg.public_ip is not None and not cfg.iface:
        return HostInfo(public_ip=cfg.public_ip, public_ipv6=cfg.public_ipv6)
    from leaseagent.dataplane.host import resolve_host as resolve

    return await resolve(cfg.iface, str(cfg.public_ip) if cfg.public_ip else None,
                         public_ipv6=str(cfg.public_ipv6) if cfg.public_ipv6 else None,
                         want_ipv6=want_ipv6)
