"""`leasectl doctor`: does this host have what etcd says it should? Read-only.

Run on a host with the agent's host flags (`--iface`, `--public-ip`,
`--subnet-file`, `--state-dir`, `--route-protocol`, or the same LEASEAGENT_*
variables, e.g. from /etc/default/leaseagent), so it sees the host as that
agent does. It gathers facts and leaves the verdicts to the pure
leaseagent.core.diagnosis:

- etcd: the network config; this host's lease, found by its PublicIP (as
  resolve_host picks it) and the subnet in subnet.env; the valid peers,
  decided exactly as the agent's watcher decides (leaseagent.core.lease);
- the kernel, through the netlink adapter's dump functions only (never a
  change): for vxlan the device flannel.<VNI> (kind, VNI, port, local,
  underlay, learning, up, MAC, MTU, its /32), and the routes carrying our
  route protocol, the permanent neighbours and FDB entries on that device,
  against core.plan's desired set; for host-gw the routes;
- files: subnet.env (network, subnet, MTU) and <state-dir>/vtep-mac.

It may run while the agent is running: a peer that joins or leaves during
the few milliseconds of the check can show as one missing or stale entry.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

from leaseagent.config import parse_public_ip, parse_route_protocol
from leaseagent.core.diagnosis import (
    DeviceFacts,
    Problem,
    check_subnet_env,
    check_vxlan_device,
    compare_objects,
    env_subnet,
    pick_own_lease,
    problem,
)
from leaseagent.core.lease import (
    InvalidLease,
    LeaseValue,
    Peer,
    decode_lease_value,
    parse_lease_key,
    validate_peer,
)
from leaseagent.core.network import NetworkConfig, parse_network_config, subnet_key_name
from leaseagent.core.plan import KernelObject, VxlanOptions, plan_host_gw, plan_vxlan, vxlan_options
from leaseagent.core.subnetenv import parse_subnet_env
from leaseagent.dataplane.base import HostInfo
from leaseagent.errors import NetworkConfigError
from leaseagent.store.base import LeaseStore

VTEP_MAC_FILE = "vtep-mac"  # leaseagent.dataplane.vxlan keeps the VtepMAC there

@dataclass(frozen=True)
class DoctorSettings:
    iface: str | None
    public_ip: str | None
    subnet_file: Path
    state_dir: Path
    route_protocol: int


def settings_from(ns: argparse.Namespace) -> DoctorSettings:
    """Validate the host flags; ConfigError names the bad one."""
    protocol = parse_route_protocol(ns.route_protocol)
    parse_public_ip(ns.public_ip)
    return DoctorSettings(iface=ns.iface or None, public_ip=ns.public_ip or None,
                          subnet_file=Path(ns.subnet_file), state_dir=Path(ns.state_dir),
                          route_protocol=protocol)


def _invalid_config(key: str, exc: NetworkConfigError) -> Problem:
    return problem("etcd", key, str(exc), text=f"network config {key} is invalid: {exc}")


@dataclass
class Report:
    problems: list[Problem] = field(default_factory=list)
    summary: str = ""

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "problems": [p.to_json() for p in self.problems]}


def _read_env(path: Path) -> dict[str, str] | None:
    try:
        return parse_subnet_env(path.read_text())
    except (OSError, UnicodeDecodeError):
        return None


def _read_stored_mac(state_dir: Path) -> str | None:
    try:
        return (state_dir / VTEP_MAC_FILE).read_text().strip().lower() or None
    except (OSError, UnicodeDecodeError):
        return None


async def _host(settings: DoctorSettings, network: NetworkConfig) -> HostInfo:
    # As the agent does: alloc with --public-ip needs no interface.
    if network.backend_type == "alloc" and settings.public_ip and not settings.iface:
        return HostInfo(public_ip=IPv4Address(settings.public_ip))
    from leaseagent.dataplane.host import resolve_host

    return await resolve_host(settings.iface, settings.public_ip)


async def examine(store: LeaseStore, prefix: str, settings: DoctorSettings) -> Report:
    """Every difference between etcd's view of this host and the host itself."""
    report = Report()
    key = f"{prefix}/config"
    kv = await store.get(key)
    if kv is None:
        report.problems.append(problem("etcd", key, "not set",
                                       text=f"network config {key} is not set"))
        return report
    try:
        network = parse_network_config(kv.value)
    except NetworkConfigError as exc:
        report.problems.append(_invalid_config(key, exc))
        return report

    host = await _host(settings, network)
    env = _read_env(settings.subnet_file)
    subnets_prefix = f"{prefix}/subnets/"
    listing = await store.list_prefix(subnets_prefix)
    decoded: dict[IPv4Network, LeaseValue] = {}
    for item in listing.items:
        try:
            decoded[parse_lease_key(item.key, subnets_prefix)] = decode_lease_value(item.value)
        except InvalidLease:
            continue  # nobody's lease; the agent skips it too
    ours = {s: v for s, v in decoded.items() if v.public_ip == host.public_ip}
    from_env = env_subnet(env)
    own_subnet, found = pick_own_lease(
        ours, public_ip=host.public_ip, env_subnet=from_env,
        holder_of_env_subnet=decoded.get(from_env) if from_env else None)
    report.problems += found
    own_key = subnets_prefix + subnet_key_name(own_subnet) if own_subnet else None
    own_value = ours.get(own_subnet) if own_subnet else None
    if own_subnet is not None and own_value is not None:
        try:
            validate_peer(own_subnet, own_value, network=network, own_public_ip=None)
        except InvalidLease as exc:
            report.problems.append(problem("lease", str(own_subnet), exc.detail,
                                           text=f"lease {own_subnet} is invalid: {exc.detail}"))
        if own_value.backend_type != network.backend_type:
            why = f"BackendType {own_value.backend_type!r}, network is {network.backend_type!r}"
            report.problems.append(problem("lease", str(own_subnet), why,
                                           text=f"lease {own_subnet} has {why}"))

    peers: dict[IPv4Network, Peer] = {}
    for item in listing.items:
        if item.key == own_key:
            continue
        try:
            subnet = parse_lease_key(item.key, subnets_prefix)
            peers[subnet] = validate_peer(subnet, decode_lease_value(item.value),
                                          network=network, own_public_ip=host.public_ip)
        except InvalidLease:
            continue

    checked = 0
    mtu: int | None = host.iface_mtu
    mtu_source = f"interface {host.iface}"
    if network.backend_type == "vxlan":
        try:
            options = vxlan_options(network.backend)
        except NetworkConfigError as exc:
            report.problems.append(_invalid_config(key, exc))
            return report
        mtu, mtu_source, checked = await _check_vxlan(
            report, settings, host=host, options=options, own_subnet=own_subnet,
            lease_mac=own_value.vtep_mac if own_value else None, peers=peers)
    elif network.backend_type == "host-gw":
        checked = await _check_host_gw(report, settings, host=host, own_subnet=own_subnet,
                                       peers=peers)
    report.problems += check_subnet_env(
        env, path=str(settings.subnet_file), network=network.network, subnet=own_subnet,
        mtu=mtu, mtu_source=mtu_source)
    report.summary = (f"lease {own_subnet} for {host.public_ip}, backend {network.backend_type}, "
                      f"{len(peers)} valid peers, {checked} kernel entries as planned")
    return report


async def _check_vxlan(
    report: Report,
    settings: DoctorSettings,
    *,
    host: HostInfo,
    options: VxlanOptions,
    own_subnet: IPv4Network | None,
    lease_mac: str | None,
    peers: Mapping[IPv4Network, Peer],
) -> tuple[int | None, str, int]:
    """Device and per-peer entries; returns (the MTU subnet.env should carry, its source,
    how many kernel entries matched the plan)."""
    from leaseagent.dataplane.netlink import Netlink

    nl = await Netlink.open()
    try:
        links = await nl.links()
        names = {link.index: link.name for link in links}
        link = next((lk for lk in links if lk.name == options.device_name), None)
        dev = None
        if link is not None:
            addresses = tuple(addr for _, addr in await nl.ipv4_addresses(link.index))
            info = link.vxlan
            dev = DeviceFacts(
                name=link.name, index=link.index, kind=link.kind, up=link.up, mac=link.address,
                mtu=link.mtu, addresses=addresses,
                vni=info.vni if info else None, port=info.port if info else None,
                local=info.local if info else None, link=info.link if info else None,
                learning=info.learning if info else None)
        report.problems += check_vxlan_device(
            dev, options=options, public_ip=host.public_ip, underlay_index=host.iface_index,
            underlay_mtu=host.iface_mtu, own_subnet=own_subnet, lease_mac=lease_mac,
            stored_mac=_read_stored_mac(settings.state_dir),
            state_file=str(settings.state_dir / VTEP_MAC_FILE))
        if dev is None or dev.kind != "vxlan":
            return options.mtu_for(host.iface_mtu), "the vxlan device (as configured)", 0
        direct: tuple[IPv4Network, ...] = ()
        if options.direct_routing and host.iface_index:
            direct = tuple(a.network for _, a in await nl.ipv4_addresses(host.iface_index))
        plan = plan_vxlan(own_subnet, peers, vxlan_index=dev.index,
                          underlay_index=host.iface_index,
                          direct_routing=options.direct_routing,
                          is_direct=lambda ip: any(ip in net for net in direct))
        current: set[KernelObject] = set(await nl.routes(protocol=settings.route_protocol))
        current |= await nl.neighbours(dev.index)
        current |= await nl.fdb(dev.index, own_mac=(dev.mac or "").lower())
    finally:
        nl.close()
    report.problems += compare_objects(plan, current, peers=peers, names=names)
    planned = {obj for objects in plan.values() for obj in objects}
    return dev.mtu, f"device {dev.name}", len(planned & current)


async def _check_host_gw(
    report: Report,
    settings: DoctorSettings,
    *,
    host: HostInfo,
    own_subnet: IPv4Network | None,
    peers: Mapping[IPv4Network, Peer],
) -> int:
    from leaseagent.dataplane.netlink import Netlink

    nl = await Netlink.open()
    try:
        names = {link.index: link.name for link in await nl.links()}
        addresses = {a.ip for _, a in await nl.ipv4_addresses(host.iface_index)}
        current: set[KernelObject] = set(await nl.routes(protocol=settings.route_protocol))
    finally:
        nl.close()
    if host.public_ip not in addresses:
        report.problems.append(problem(
            "host", str(host.public_ip), f"not an address of {host.iface}",
            text=f"host-gw: PublicIP {host.public_ip} is not an address of {host.iface}; "
            "peers cannot route to it"))
    plan = plan_host_gw(own_subnet, peers, underlay_index=host.iface_index)
    report.problems += compare_objects(plan, current, peers=peers, names=names)
    planned = {obj for objects in plan.values() for obj in objects}
    return len(planned & current)
