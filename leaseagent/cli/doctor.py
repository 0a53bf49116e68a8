"""`leasectl doctor`: does this host have what etcd says it should? Read-only.

Run on a host with the agent's host flags (`--iface`, `--public-ip`,
`--subnet-file`, `--state-dir`, `--route-protocol`, or the same LEASEAGENT_*
variables, e.g. from /etc/default/leaseagent), so it sees the host as that
agent does. It decides nothing on its own:

- etcd: the listing is judged by the lease layer (leaseagent.core.leases),
  the same rule the agent's watcher applies: first as nobody, to find the
  leases naming this host's PublicIP (the one subnet.env names wins), then
  as this host (its own key and PublicIP), which gives exactly the peers the
  agent programs;
- the kernel: the backend of the network config (leaseagent.dataplane) says
  what it wants (`spec`) and reads what the kernel has (`observe`), and
  `core.plan.compare` finds the differences, as the backend's reconcile
  does; leaseagent.core.diagnosis turns them into lines;
- files: subnet.env (network, subnet, MTU, where each device's MTU comes from: the
  profile's `mtu_notes`); whether the directories of subnet.env and the state can
  be written (read-only, full);
- devices of ours (a backend profile's, leaseagent.dataplane.kept) that the network
  config does not use: a `kept:` line each, not a problem (the agent keeps them for a
  rebuild's hold, takes them over at its next start and removes them
  --peer-hold-time later; their ports are guarded, so the rules check wants them);
  and the entries kept for a peer that still runs another backend type or VNI (a
  roll-out, the agent's own rule: core.diagnosis.kept_for_roll_out): a `kept:` line
  for the peer, not a stale entry each;
- the agent (with `--metrics-addr`, as the unit sets it): its /readyz, whose
  reason when it is not ready names what fails (a traffic rule that cannot be
  written: the command and what the tool or kernel said);
- the backend's own checks (`DataPlane.doctor`, in its data-plane module): vxlan's
  VtepMAC three ways (device, lease, state file); host-gw's gateways on the link
  and this host's addresses on the interface; wireguard's public key three ways
  (each device's, the lease's PublicKey, the key file's), which WireGuard drives
  the devices (kernel or wireguard-go), and each peer that was sent packets but
  never completed a handshake (a key or PSK that does not match the other
  side's). A peer's PSK that is not the network config's shows as a wrong peer,
  like any other setting. Run it where the agent runs: wireguard-go's control
  socket is in /var/run/wireguard.

It may run while the agent is running: a peer that joins or leaves during
the few milliseconds of the check can show as one missing or stale entry.
"""

from __future__ import annotations

import argparse
import asyncio
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from pathlib import Path
from typing import TYPE_CHECKING, Any

from leaseagent.config import (
    interface_choice,
    parse_hostport,
    parse_public_ip,
    parse_route_protocol,
    source,
    traffic_settings,
)
from leaseagent.core.diagnosis import (
    Problem,
    check_subnet_env,
    device_problems,
    env_subnet,
    kept_for_roll_out,
    object_problems,
    pick_own_lease,
    problem,
)
from leaseagent.core.leases import Identity, KeyLayout, Peer, Verdict, judge
from leaseagent.core.network import Network, NetworkConfig, parse_network_config
from leaseagent.core.plan import compare, flatten, needs_recreate
from leaseagent.core.profiles.base import runs_other
from leaseagent.core.rules import (
    FAMILIES,
    TrafficSettings,
    peer_addresses,
    receive_ports,
    ruleset,
)
from leaseagent.core.rules import compare as compare_rules
from leaseagent.core.subnetenv import parse_environment_file
from leaseagent.dataplane.base import DataPlaneSettings, HostInfo, InterfaceChoice
from leaseagent.errors import ConfigError, DataPlaneError, NetworkConfigError
from leaseagent.files import unwritable_reason
from leaseagent.store.base import LeaseStore

if TYPE_CHECKING:
    from leaseagent.dataplane.leftovers import Leftover
from leaseagent.waiting import within


@dataclass(frozen=True)
class DoctorSettings:
    iface: InterfaceChoice
    public_ip: str | None
    subnet_file: Path
    state_dir: Path
    route_protocol: int
    traffic: TrafficSettings = field(default_factory=TrafficSettings)
    public_ipv6: str | None = None
    metrics_addr: tuple[str, int] | None = None  # the agent's, to ask its /readyz


def settings_from(ns: argparse.Namespace) -> DoctorSettings:
    """Validate the host flags; ConfigError names the bad one."""
    protocol = parse_route_protocol(ns.route_protocol, name=source(ns, "--route-protocol"))
    parse_public_ip(ns.public_ip, name=source(ns, "--public-ip"), allow_any=True)
    parse_public_ip(ns.public_ipv6, name=source(ns, "--public-ipv6"), allow_any=True, version=6)
    metrics = getattr(ns, "metrics_addr", None)
    return DoctorSettings(iface=interface_choice(ns), public_ip=ns.public_ip or None,
                          metrics_addr=parse_hostport(source(ns, "--metrics-addr"), metrics)
                          if metrics else None,
                          public_ipv6=ns.public_ipv6 or None,
                          subnet_file=Path(ns.subnet_file), state_dir=Path(ns.state_dir),
                          route_protocol=protocol,
                          traffic=traffic_settings(ns, nftables=False))


@dataclass
class Report:
    problems: list[Problem] = field(default_factory=list)
    summary: str = ""
    leftovers: list[Leftover] = field(default_factory=list)  # flanneld's, each also a problem
    # Devices of ours the network config does not use, kept by the agent for a rebuild's
    # hold (leaseagent.dataplane.kept): a line each, not a problem.
    kept: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"ok": self.ok, "problems": [p.to_json() for p in self.problems]}
        if self.kept:  # only then: the usual answer stays as it was
            out["kept"] = self.kept
        return out


def _read_env(path: Path) -> dict[str, str] | None:
    try:
        return parse_environment_file(path.read_text())
    except (OSError, UnicodeDecodeError):
        return None


async def _host(settings: DoctorSettings, network: NetworkConfig) -> HostInfo:
    # As the agent does: alloc with --public-ip needs no interface.
    if not network.profile.data_path and settings.public_ip and not settings.iface:
        return HostInfo(public_ip=IPv4Address(settings.public_ip),
                        public_ipv6=IPv6Address(settings.public_ipv6)
                        if settings.public_ipv6 else None)
    from leaseagent.dataplane.host import resolve_host

    return await resolve_host(settings.iface, settings.public_ip,
                              public_ipv6=settings.public_ipv6,
                              want_ipv6=network.ipv6 is not None)


def _own_lease(report: Report, verdicts: list[Verdict], *, public_ip: IPv4Address,
               env: dict[str, str] | None, holders: dict[IPv4Network, Verdict]
               ) -> Verdict | None:
    """This host's lease among the keys naming its PublicIP (the oldest per subnet)."""
    ours: dict[IPv4Network, Verdict] = {}
    for verdict in verdicts:
        if verdict.subnet is not None:
            ours.setdefault(verdict.subnet, verdict)
    from_env = env_subnet(env)
    holder = holders.get(from_env) if from_env is not None else None
    own_subnet, found = pick_own_lease(
        {s: v.value for s, v in ours.items() if v.value is not None}, public_ip=public_ip,
        env_subnet=from_env, holder_of_env_subnet=holder.value if holder else None)
    report.problems += found
    return ours.get(own_subnet) if own_subnet is not None else None


READYZ_TIMEOUT = 5.0  # seconds for the agent's /readyz to answer


async def agent_problems(addr: tuple[str, int]) -> list[Problem]:
    """The agent's own word on whether it is ready (GET /readyz at its metrics address):
    nothing when it is, else one problem with its reason, or saying it did not answer."""
    host, port = addr
    shown = f"http://{host}:{port}/readyz"
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1" if host == "0.0.0.0" else "::1"
    try:
        reader, writer = await within(asyncio.open_connection(host, port), READYZ_TIMEOUT)
        try:
            writer.write(b"GET /readyz HTTP/1.0\r\nHost: leaseagent\r\n\r\n")
            answer = await within(reader.read(), READYZ_TIMEOUT)  # it closes when done
        finally:
            writer.close()
    except (OSError, TimeoutError) as exc:
        # asyncio's connect error says "Connect call failed (...)": the errno says what.
        why = (os.strerror(exc.errno) if isinstance(exc, OSError) and exc.errno
               else "no answer in time")
        return [problem("agent", shown, why,
                        text=f"agent: {shown}: {why} (is leaseagent running?)")]
    head, _, body = answer.decode("utf-8", "replace").partition("\r\n\r\n")
    status = head.split(" ", 2)[1] if head.count(" ") >= 1 else "?"
    if status == "200":
        return []
    reason = body.strip() or f"HTTP {status}"
    return [problem("agent", shown, reason, text=f"agent not ready: {reason}")]


async def examine(store: LeaseStore, layout: KeyLayout, settings: DoctorSettings) -> Report:
    """Every difference between etcd's view of this host and the host itself."""
    report = Report()
    if settings.metrics_addr is not None:
        report.problems += await agent_problems(settings.metrics_addr)
    key = layout.config_key
    kv = await store.get(key)
    if kv is None:
        report.problems.append(problem("etcd", key, "not set",
                                       text=f"network config {key} is not set"))
        return report
    try:
        network = parse_network_config(kv.value)
    except NetworkConfigError as exc:
        report.problems.append(problem("etcd", key, str(exc),
                                       text=f"network config {key} is invalid: {exc}"))
        return report

    host = await _host(settings, network)
    env = _read_env(settings.subnet_file)
    listing = await store.list_prefix(layout.subnets_prefix)
    as_nobody = judge(listing.items, layout=layout, network=network)
    holders = {subnet: as_nobody.verdicts[k] for subnet, k in as_nobody.holders.items()}
    own = _own_lease(report, as_nobody.naming(host.public_ip), public_ip=host.public_ip, env=env,
                     holders=holders)
    own_subnet = own.subnet if own is not None else None
    own_ipv6 = own.ipv6_subnet if own is not None else None
    judged = judge(listing.items, layout=layout, network=network,
                   identity=Identity(public_ip=host.public_ip,
                                     own_key=own.key if own is not None else None))
    if own is not None:
        verdict = judged.verdicts[own.key]
        if verdict.reason is not None:
            report.problems.append(problem("lease", str(own_subnet), verdict.detail or "",
                                           text=f"lease {own_subnet} is invalid: {verdict.detail}"))
        value = verdict.value
        if value is not None and value.backend_type != network.backend_type:
            why = f"BackendType {value.backend_type!r}, network is {network.backend_type!r}"
            report.problems.append(problem("lease", str(own_subnet), why,
                                           text=f"lease {own_subnet} has {why}"))
    peers = judged.peers

    from leaseagent.dataplane import BACKENDS
    from leaseagent.dataplane.netlink import Netlink

    dp_settings = DataPlaneSettings(network=network, host=host, state_dir=settings.state_dir,
                                    route_protocol=settings.route_protocol)
    backend = BACKENDS[network.backend_type](dp_settings)
    try:
        observed = await backend.observe()
        spec = backend.spec(own_subnet, peers, own_ipv6=own_ipv6)
        found = await backend.doctor(own.value if own is not None else None, peers, observed)
    finally:
        await backend.close()
    comparison = compare(spec, observed)
    for subnet, why in spec.skipped.items():  # the agent skips them too (dataplane)
        peer = peers[subnet]
        report.problems.append(problem(
            "lease", str(subnet), why,
            text=f"lease {subnet} ({peer.public_ip}) not programmed here: {why}; fix the lease "
            "or the host"))
    mtu = dp_settings.flannel_mtu  # named after the device that has it, if one does
    smallest = next((d for d in spec.devices if d.mtu == mtu), None)
    mtu_source = f"device {smallest.name}" if smallest is not None else f"interface {host.iface}"
    report.problems += found.problems
    mtu_notes = network.profile.mtu_notes(network.options, host.iface_mtu,
                                          dp_settings.ipv6_enabled)
    report.problems += device_problems(comparison.devices, mtu_notes=mtu_notes)
    nl = await Netlink.open()
    try:
        links = await nl.links()
    finally:
        nl.close()
    names = {link.index: link.name for link in links}
    from leaseagent.dataplane import kept

    ours = kept.ours(links)  # the rule `leasectl cleanup` and the agent's start use
    wanted = {d.name for d in spec.devices}
    for link in kept.unused(links, wanted):
        report.kept.append(
            f"kept: device {kept.describe(link)}, which the network config does not use (a "
            "rebuild's old device): the agent guards its port and removes it --peer-hold-time "
            "after no peer runs another type or VNI (taking it over at its next start if it is "
            "stopped)" if network.profile.data_path else
            f"left: device {kept.describe(link)}, which the network config does not use: "
            f"the agent ({network.backend_type}) does not remove it; `leasectl cleanup` does")
    if not needs_recreate(comparison.devices):  # no device: no entries could be on it
        objects, rolling = kept_for_roll_out(
            comparison.objects, peers,
            lambda peer: runs_other(peer, network.backend_type, network.options))
        report.kept += rolling
        report.problems += object_problems(objects, plan=spec.objects,
                                           current=observed.objects, peers=peers, names=names)
    if network.profile.data_path:  # no data path (alloc): no traffic rules either
        # The ports the agent's peer filter guards: its devices' and those of ours the
        # kernel has besides (a rebuild's kept device, until the agent removes it).
        report.problems += await _check_rules(settings, network, own_subnet, peers, own_ipv6,
                                              ports=receive_ports([*spec.devices, *ours]))
    from leaseagent.dataplane import leftovers

    report.leftovers = await leftovers.find(
        ours=wanted | {link.name for link in ours},  # the agent's to remove, not flanneld's
        networks=[network.network, *([network.ipv6.network] if network.ipv6 else [])],
        leased={*peers, *(p.ipv6_subnet for p in peers.values() if p.ipv6_subnet),
                *(s for s in (own_subnet, own_ipv6) if s is not None)})
    report.problems += [problem("flanneld", x.name, x.what, text=x.text)
                        for x in report.leftovers]
    report.problems += check_subnet_env(
        env, path=str(settings.subnet_file), network=network.network, subnet=own_subnet,
        mtu=mtu, mtu_source=mtu_source, ipmasq=settings.traffic.ip_masq,
        ipv6_network=network.ipv6_network, ipv6_subnet=own_ipv6)
    for what, directory in (("subnet.env", settings.subnet_file.parent),
                            ("state", settings.state_dir)):
        unwritable = unwritable_reason(directory) if directory.is_dir() else None
        if unwritable is not None:
            report.problems.append(problem(
                "files", str(directory), unwritable,
                text=f"{what} directory {directory} cannot be written: {unwritable} (the agent "
                "keeps retrying; it cannot start so)"))
    matched = len(flatten(spec.objects) & observed.objects)
    report.summary = (f"lease {own_subnet} for {host.public_ip}, backend {network.backend_type}"
                      f"{found.summary}, {len(peers)} valid peers, {matched} kernel entries as planned")
    return report


async def _check_rules(settings: DoctorSettings, network: NetworkConfig,
                       own_subnet: IPv4Network | None, peers: Mapping[IPv4Network, Peer],
                       own_ipv6_subnet: IPv6Network | None = None, *,
                       ports: tuple[int, ...] = ()) -> list[Problem]:
    """The traffic rules the agent keeps (same flags, same config) against the firewall:
    missing, extra or reordered rules, a chain not hooked in first, the peer set. For
    each family the config has; an IPv6 problem says so (its object and its line).
    `ports`: the VXLAN ports the peer filter guards (core.rules.receive_ports)."""
    from leaseagent.dataplane.firewall import firewall

    traffic = replace(settings.traffic, nftables=network.enable_nftables)
    families: list[tuple[Network, Network | None]] = [(network.network, own_subnet)]
    if network.ipv6 is not None:
        families.append((network.ipv6.network, own_ipv6_subnet))
    found: list[Problem] = []
    for net, own in families:
        shown = FAMILIES[net.version].shown
        wanted = ruleset(traffic, network=net, own_subnet=own, vxlan_ports=ports,
                         peers=peer_addresses(peers.values(), net.version))
        try:
            observed = await firewall(nftables=traffic.nftables, family=net.version).observe()
        except (ConfigError, DataPlaneError) as exc:
            found.append(problem("rule", f"{shown}firewall", str(exc),
                                 text=f"{shown}rule check impossible: {exc}"))
            continue
        found += [problem("rule", f"{shown}{d.chain}", d.detail, text=f"{shown}rule {d.text}")
                  for d in compare_rules(wanted, observed)]
    return found
