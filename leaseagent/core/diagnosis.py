"""What `leasectl doctor` finds wrong: etcd's view of a host against what the host has.

Pure: no I/O. The caller (leaseagent.cli.doctor) judges etcd's listing with
the lease layer, has the backend observe the kernel and compares the two
with `core.plan.compare` (as the backend's reconcile does), then hands the
differences here; each function returns a list of `Problem`s, empty when
all is well.

A Problem has a `kind` (missing, stale, wrong, device, lease, subnet.env,
state), the `object` it is about and a `detail`; `text` is the one line an
operator reads, e.g.

    missing route 10.5.3.0/24 via 10.5.3.0 dev flannel.1 onlink (peer 10.250.0.12)
    stale neighbour 10.5.9.0 lladdr 0a:..:01 dev flannel.1 (no valid lease holds 10.5.9.0/24)
    subnet.env FLANNEL_SUBNET=10.5.4.1/24 but the lease is 10.5.3.0/24

An object the plan wants but the kernel lacks is missing; one whose identity
(plan `key`) the kernel has with other attributes is wrong; one of ours no
plan wants is stale. WireGuard peers are shown with their public key, and a
preshared key only by its fingerprint (`psk:1a2b3c4d`); a wrong peer says
which of its settings differ, e.g. that its preshared key is not the network
config's PSK. A peer that was sent packets but never completed a handshake is
a problem too (`peer`): its key, PSK or endpoint do not match the other side.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface, IPv4Network, IPv6Network

from leaseagent.core.kerneldiff import Admission
from leaseagent.core.leases import LeaseValue, Peer
from leaseagent.core.network import Network
from leaseagent.core.plan import (
    ADD_ADDRESS,
    CREATE,
    REMOVE_ADDRESS,
    RT_SCOPE_LINK,
    SET_MTU,
    AllowedIP,
    DeviceDifference,
    Fdb,
    KernelObject,
    Neighbour,
    PlanDiff,
    Route,
    WgPeer,
)
from leaseagent.core.profiles.vxlan import VxlanLeaseData
from leaseagent.core.profiles.wireguard import WireguardLeaseData
from leaseagent.core.subnetenv import first_address


@dataclass(frozen=True)
class Problem:
    kind: str
    object: str
    detail: str
    text: str

    def to_json(self) -> dict[str, str]:
        return {"kind": self.kind, "object": self.object, "detail": self.detail}


def problem(kind: str, obj: str, detail: str = "", *, text: str | None = None) -> Problem:
    """A Problem whose line is `<kind> <object> (<detail>)` unless `text` says otherwise."""
    if text is None:
        text = f"{kind} {obj}" + (f" ({detail})" if detail else "")
    return Problem(kind, obj, detail, text)


# ------------------------------------------------------------------ kernel objects


def render_object(obj: KernelObject, names: Mapping[int, str]) -> str:
    """An object as iproute2 would show it: `route 10.5.3.0/24 via 10.5.3.0 dev flannel.1 onlink`."""

    def dev(index: int) -> str:
        return names.get(index, f"if{index}")

    if isinstance(obj, Route):
        text = f"route {obj.dst}"
        if obj.gateway is not None:
            text += f" via {obj.gateway}"
        if obj.ifindex:
            text += f" dev {dev(obj.ifindex)}"
        if obj.onlink:
            text += " onlink"
        if obj.scope == RT_SCOPE_LINK:
            text += " scope link"
        if obj.metric:
            text += f" metric {obj.metric}"
        return text
    if isinstance(obj, Neighbour):
        return f"neighbour {obj.dst} lladdr {obj.lladdr} dev {dev(obj.ifindex)}"
    if isinstance(obj, Fdb):
        return f"fdb {obj.lladdr} dst {obj.dst} dev {dev(obj.ifindex)}"
    if isinstance(obj, AllowedIP):
        return f"allowed-ip {obj.network} peer {obj.public_key} dev {obj.device}"
    return f"peer {obj.public_key} dev {obj.device}" + "".join(
        f" {name} {value}" for name, value in _peer_settings(obj).items())


def _peer_settings(peer: WgPeer) -> dict[str, str]:
    """A WireGuard peer's settings as wg(8) names them (a PSK by its fingerprint)."""
    out = {"endpoint": _endpoint(peer)}
    if peer.psk is not None:
        out["preshared-key"] = str(peer.psk)
    if peer.keepalive:
        out["persistent-keepalive"] = str(peer.keepalive)
    return out


def _endpoint(peer: WgPeer) -> str:
    if peer.endpoint is None:
        return "(none)"
    ip, port = peer.endpoint
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


def _peer_differences(have: WgPeer, want: WgPeer) -> str:
    """How a WireGuard peer differs from the plan, in words (a PSK never in the clear)."""
    out = []
    if have.endpoint != want.endpoint:
        out.append(f"endpoint {_endpoint(have)}, want {_endpoint(want)}")
    if have.psk != want.psk:
        out.append("no preshared key, the network config has a PSK" if have.psk is None
                   else "a preshared key, the network config has none" if want.psk is None
                   else f"preshared key {have.psk} is not the network config's PSK ({want.psk})")
    if have.keepalive != want.keepalive:
        out.append(f"persistent keepalive {have.keepalive}, want {want.keepalive}")
    return "; ".join(out)


def _peer_label(peer: Peer) -> str:
    label = f"peer {peer.public_ip}"
    return label + (f", node {peer.node_id}" if peer.node_id else "")


def object_problems(
    changes: PlanDiff,
    *,
    plan: Mapping[IPv4Network, frozenset[KernelObject]],
    current: Iterable[KernelObject],
    peers: Mapping[IPv4Network, Peer],
    names: Mapping[int, str],
) -> list[Problem]:
    """Missing, wrong and stale objects: what `core.plan.compare` found between the
    per-peer `plan` and what the kernel has of ours (`current`)."""
    owner: dict[KernelObject, Peer] = {}
    for subnet, objects in plan.items():
        for obj in objects:
            if subnet in peers:
                owner.setdefault(obj, peers[subnet])
    current_by_key = {obj.key: obj for obj in current}
    to_add, to_remove = changes
    out: list[Problem] = []
    for obj in to_add:
        peer = owner.get(obj)
        label = _peer_label(peer) if peer else ""
        there = current_by_key.get(obj.key)
        if there is None:
            out.append(problem("missing", render_object(obj, names), label))
        elif isinstance(there, WgPeer) and isinstance(obj, WgPeer):
            out.append(problem("wrong", f"peer {obj.public_key} dev {obj.device}",
                               _peer_differences(there, obj) + (f"; {label}" if label else "")))
        else:
            want = render_object(obj, names)
            out.append(problem(
                "wrong", render_object(there, names), f"want {want}" + (f"; {label}" if label else "")))
    for obj in to_remove:
        out.append(problem("stale", render_object(obj, names), _stale_reason(obj, peers)))
    return out


def kept_for_roll_out(changes: PlanDiff, peers: Mapping[IPv4Network, Peer],
                      runs_other: Callable[[Peer], str | None]) -> tuple[PlanDiff, list[str]]:
    """What the agent keeps during a roll-out, by its own rule (core.kerneldiff.Admission:
    the kernel's entries for a peer that runs another type or variant, `runs_other`, stay
    until its lease says ours): `changes` without them among the stale, and a `kept:`
    line for each such peer instead of a problem."""
    admission = Admission()
    rolling = admission.note_foreign(peers, peers, runs_other)
    if not rolling:
        return changes, []
    to_remove = tuple(admission.not_kept(list(changes.to_remove), peers))
    return PlanDiff(changes.to_add, to_remove), [
        f"kept: the entries for peer {peer.subnet} ({peer.public_ip}), which runs {other} "
        "(a roll-out): the agent keeps them until its lease says ours" for peer, other in rolling]


def _subnet(peer: Peer, version: int) -> Network | None:
    """The peer's subnet of one family (None: an IPv4-only peer asked for IPv6)."""
    return peer.subnet if version == 4 else peer.ipv6_subnet


def _stale_reason(obj: KernelObject, peers: Mapping[IPv4Network, Peer]) -> str:
    if isinstance(obj, WgPeer):
        return "no valid lease has this public key"
    if isinstance(obj, AllowedIP):
        if any(_subnet(p, obj.network.version) == obj.network for p in peers.values()):
            return f"not the key of the lease of {obj.network}"
        return f"no valid lease holds {obj.network}"
    if isinstance(obj, Route):
        if any(_subnet(p, obj.dst.version) == obj.dst for p in peers.values()):
            return f"not what the lease of {obj.dst} needs"
        return f"no valid lease holds {obj.dst}"
    if isinstance(obj, Neighbour):
        held = [s for p in peers.values() if (s := _subnet(p, obj.dst.version)) is not None
                and s.network_address == obj.dst]
        return f"not what the lease of {held[0]} needs" if held else \
            f"no valid lease holds a subnet at {obj.dst}"
    macs = {data.vtep_mac for p in peers.values() for data in (p.data, p.data6)
            if isinstance(data, VxlanLeaseData)}
    return "no valid lease has this VtepMAC at this address" if obj.lladdr in macs else \
        "no valid lease has this VtepMAC"


# ------------------------------------------------------------------ devices


def device_problems(differences: Iterable[DeviceDifference], *,
                    mtu_notes: Mapping[str, str] | None = None) -> list[Problem]:
    """The differences `core.plan.compare_device` found, as doctor's lines; `mtu_notes`
    says per device where its wanted MTU comes from."""
    notes = mtu_notes or {}
    out: list[Problem] = []
    for d in differences:
        if d.fix == CREATE:
            out.append(problem("missing", f"device {d.device}",
                               "no device means no route, neighbour or FDB entry to any peer"))
        elif d.fix == ADD_ADDRESS:
            out.append(problem("missing", f"address {d.want} dev {d.device}", "this host's subnet"))
        elif d.fix == REMOVE_ADDRESS:
            out.append(problem("stale", f"address {d.have} dev {d.device}",
                               "only this host's subnet belongs there"))
        elif d.fix == SET_MTU and notes.get(d.device):
            out.append(problem("device", d.device, f"MTU {d.have}, want {d.want}",
                               text=f"device {d.device} MTU {d.have}, want {d.want} "
                               f"({notes[d.device]})"))
        else:
            out.append(problem("device", d.device, d.text.removeprefix(f"device {d.device} "),
                               text=d.text))
    return out


def kept_identity_problems(*, device: str, what: str, lease_field: str, device_value: str,
                           lease_value: str | None, stored_value: str | None, state_file: str,
                           if_missing: str) -> list[Problem]:
    """What a device shows its peers (a VtepMAC, a public key) three ways: the
    device's, the lease's and the one kept in the state dir."""
    out: list[Problem] = []
    if lease_value is not None and device_value != lease_value:
        detail = f"{what} {device_value} but the lease's {lease_field} is {lease_value}"
        out.append(problem("device", device, detail, text=f"device {device} {detail}"))
    if stored_value is None:
        out.append(problem("state", state_file, f"missing ({if_missing})",
                           text=f"state {state_file} missing: {if_missing}"))
    elif stored_value != device_value:
        detail = f"holds {stored_value} but device {device} has {device_value}"
        out.append(problem("state", state_file, detail, text=f"state {state_file} {detail}"))
    return out


def vtep_mac_problems(*, device: str, device_mac: str | None, lease_mac: str | None,
                      stored_mac: str | None, state_file: str) -> list[Problem]:
    """The VtepMAC three ways: the device's, the lease's, the one kept in the state dir."""
    return kept_identity_problems(
        device=device, what="MAC", lease_field="VtepMAC", device_value=(device_mac or "").lower(),
        lease_value=lease_mac.lower() if lease_mac is not None else None,
        stored_value=stored_mac.lower() if stored_mac is not None else None,
        state_file=state_file, if_missing="the VtepMAC would not survive a deleted device")


def wireguard_key_problems(*, device: str, device_key: str | None, lease_data: object,
                           stored_key: str | None, state_file: str) -> list[Problem]:
    """The public key three ways: the device's (from its private key), the lease's
    PublicKey, the key kept in the state dir."""
    lease_key = lease_data.public_key if isinstance(lease_data, WireguardLeaseData) else None
    return kept_identity_problems(
        device=device, what="public key", lease_field="PublicKey",
        device_value=device_key or "(none)", lease_value=lease_key,
        stored_value=stored_key, state_file=state_file,
        if_missing="the next start makes a new key, which every peer must learn")


# Sent this much without a handshake ever completing: at least two initiations
# (148 bytes each, five seconds apart), not a first packet still waiting for one.
STALLED_TX_BYTES = 2 * 148


def stalled_peer_problems(peers: Iterable[tuple[str, str, float, int, int]],
                          owners: Mapping[str, Peer]) -> list[Problem]:
    """Peers (device, public key, last handshake, rx bytes, tx bytes) that were sent
    packets but never completed a handshake: the other side does not take ours."""
    out: list[Problem] = []
    for device, key, handshake, _rx, tx in peers:
        if handshake or tx < STALLED_TX_BYTES:
            continue
        owner = owners.get(key)
        label = f" ({_peer_label(owner)})" if owner is not None else ""
        out.append(problem(
            "peer", f"{key} dev {device}", f"no handshake, {tx} bytes sent",
            text=f"peer {key} dev {device}{label}: no handshake completed though {tx} bytes "
            "were sent: its public key, the PSK or its endpoint do not match the other side"))
    return out


# ------------------------------------------------------------------ lease and subnet.env


def pick_own_lease(
    ours: Mapping[IPv4Network, LeaseValue],
    *,
    public_ip: IPv4Address,
    env_subnet: IPv4Network | None,
    holder_of_env_subnet: LeaseValue | None,
) -> tuple[IPv4Network | None, list[Problem]]:
    """This host's lease among the leases naming its PublicIP (`ours`).

    The one subnet.env names wins; several is a problem (one of them is a
    leftover that holds a subnet for nothing).
    """
    out: list[Problem] = []
    if not ours:
        detail = "the agent holds no subnet"
        if env_subnet is not None and holder_of_env_subnet is not None:
            detail += (f"; {env_subnet} of subnet.env is held by "
                       f"{holder_of_env_subnet.public_ip}")
        elif env_subnet is not None:
            detail += f"; {env_subnet} of subnet.env is free"
        out.append(problem("lease", str(public_ip), detail,
                           text=f"lease missing: no lease in etcd names PublicIP {public_ip} "
                           f"({detail})"))
        return None, out
    own = env_subnet if env_subnet in ours else sorted(ours)[0]
    if len(ours) > 1:
        others = ", ".join(str(s) for s in sorted(ours) if s != own)
        out.append(problem("lease", str(public_ip), f"also holds {others}",
                           text=f"lease duplicate: PublicIP {public_ip} holds {own} and also "
                           f"{others}"))
    return own, out


def check_subnet_env(
    env: Mapping[str, str] | None,
    *,
    path: str,
    network: IPv4Network,
    subnet: IPv4Network | None,
    mtu: int | None,
    mtu_source: str,
    ipmasq: bool = False,
    ipv6_network: IPv6Network | None = None,
    ipv6_subnet: IPv6Network | None = None,
) -> list[Problem]:
    """subnet.env against the lease (FLANNEL_NETWORK, FLANNEL_SUBNET and, with IPv6,
    FLANNEL_IPV6_NETWORK, FLANNEL_IPV6_SUBNET) and the devices (the smallest MTU)."""
    if env is None:
        return [problem("subnet.env", path, "missing",
                        text=f"subnet.env {path} is missing or unreadable")]
    out: list[Problem] = []

    def mismatch(name: str, have: str | None, want: str) -> None:
        shown = f"{name}={have}" if have is not None else f"{name} (absent)"
        out.append(problem("subnet.env", shown, f"but {want}",
                           text=f"subnet.env {shown} but {want}"))

    if env.get("FLANNEL_NETWORK") != str(network):
        mismatch("FLANNEL_NETWORK", env.get("FLANNEL_NETWORK"), f"the network is {network}")
    if subnet is not None and env.get("FLANNEL_SUBNET") != str(first_address(subnet)):
        mismatch("FLANNEL_SUBNET", env.get("FLANNEL_SUBNET"),
                 f"the lease is {subnet} (want {first_address(subnet)})")
    if ipv6_network is None:
        for name in ("FLANNEL_IPV6_NETWORK", "FLANNEL_IPV6_SUBNET"):
            if name in env:
                mismatch(name, env[name], "the network config has no IPv6")
    else:
        if env.get("FLANNEL_IPV6_NETWORK") != str(ipv6_network):
            mismatch("FLANNEL_IPV6_NETWORK", env.get("FLANNEL_IPV6_NETWORK"),
                     f"the IPv6 network is {ipv6_network}")
        if ipv6_subnet is not None and env.get("FLANNEL_IPV6_SUBNET") != str(
                first_address(ipv6_subnet)):
            mismatch("FLANNEL_IPV6_SUBNET", env.get("FLANNEL_IPV6_SUBNET"),
                     f"the lease's IPv6 subnet is {ipv6_subnet} "
                     f"(want {first_address(ipv6_subnet)})")
    if mtu is not None and env.get("FLANNEL_MTU") != str(mtu):
        mismatch("FLANNEL_MTU", env.get("FLANNEL_MTU"), f"{mtu_source} has MTU {mtu}")
    want_masq = "true" if ipmasq else "false"
    if env.get("FLANNEL_IPMASQ") != want_masq:
        mismatch("FLANNEL_IPMASQ", env.get("FLANNEL_IPMASQ"),
                 f"the agent runs {'with' if ipmasq else 'without'} --ip-masq")
    return out


def env_subnet(env: Mapping[str, str] | None) -> IPv4Network | None:
    """The lease subnet FLANNEL_SUBNET names, or None."""
    if not env or not env.get("FLANNEL_SUBNET"):
        return None
    try:
        return IPv4Interface(env["FLANNEL_SUBNET"]).network
    except ValueError:
        return None


def gateway_problems(peers: Mapping[IPv4Network, Peer], *, on_link: Iterable[Network],
                     iface: str) -> list[Problem]:
    """host-gw: each of the host-gw `peers` whose PublicIP is in none of `on_link` (the
    underlay interface's networks): the kernel refuses its route (no gateway on the
    link), so it is unreachable from this host."""
    out = []
    networks = list(on_link)
    for subnet, peer in sorted(peers.items(), key=lambda item: int(item[0].network_address)):
        if not any(peer.public_ip in network for network in networks):
            out.append(problem(
                "peer", str(subnet), f"PublicIP {peer.public_ip} not on {iface}'s link",
                text=f"peer {subnet}: its PublicIP {peer.public_ip} is not on the link of "
                     f"{iface}: the kernel refuses its host-gw route, unreachable from here "
                     f"(host-gw needs every host on one L2 segment)"))
    return out
