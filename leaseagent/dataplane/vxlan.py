"""The vxlan backend: flannel's VXLAN data plane, kept in sync (docs/architecture.md).

Per host, one device per address family in use (flannel's
pkg/backend/vxlan/vxlan.go, device.go):

- `flannel.<VNI>` (type vxlan, id VNI, local = PublicIP, dev = underlay,
  dstport = Port (8472), learning off unless Backend.Learning, the GBP extension
  when Backend.GBP), MTU = (Backend.MTU or the underlay MTU) - 50, address
  `<own subnet base>/32`;
- on a dual-stack network with a PublicIPv6, also `flannel-v6.<VNI>`: the
  same VNI and port, local = PublicIPv6, MTU = (Backend.MTU or the underlay
  MTU) - 70, address
  `<own IPv6 subnet base>/128`.

A host route (/32, /128) as the address: no broadcast or subnet route
appears. Backend.MTU, when set, is flannel's: the MTU of the path under both
devices, each device taking its overhead off it (flannel's cfg.MTU - 50).
FLANNEL_MTU (`BackendAttrs.mtu`) is
the smallest MTU of the devices in use, so a container's packet fits either
tunnel (the rule's one home: core.profiles.vxlan, the profile's `mtu`).

Why 70 and not flannel's 50: VXLAN over IPv6 puts an outer IPv6 header (40
bytes, not IPv4's 20) + UDP 8 + VXLAN 8 + the inner Ethernet header 14 in
front of each packet. flannel subtracts 50 for the IPv6 device too
(pkg/backend/vxlan/device.go; flannel-io/flannel#1781 asked for the 20 bytes
and was closed "wontfix"), so a full-size packet on flannel-v6 exceeds the
underlay MTU by 20 bytes and is dropped or fragmented. We subtract what the
encapsulation costs; the MTU is local, so a mixed cluster is not affected.

Per peer and family: permanent neighbour `<subnet base> lladdr <VtepMAC>`,
permanent FDB `<VtepMAC> dst <PublicIP>`, route `<subnet> via <subnet base>
onlink`, all on that family's device, with that family's VtepMAC and public
address (BackendData, BackendV6Data); with Backend.DirectRouting and the
peer's public address on a network the underlay is directly attached to,
only `<subnet> via <public address> dev underlay` (core.plan).

VtepMAC of each device (files `<state_dir>/vtep-mac`, `vtep-mac-v6`), in
order of preference: the MAC of the existing device (an agent restart keeps
the device, so peers' neighbour entries stay valid), the one in its file, a
fresh random locally administered unicast MAC. Whatever is used is written
back to the file (atomically: temp file, fsync, rename), so a device deleted
while the agent is down comes back with the same MAC.

Each device is described by a pure `DeviceSpec` and compared with what the
kernel has by `core.plan.compare_device`, the same comparison `leasectl
doctor` prints: an existing device whose VNI, port, local address, underlay,
learning or GBP setting differ is deleted and created again (with its MAC); one
with another MTU, MAC, state or addresses is adjusted in place. `Vtep` does
this for one device; both families use it.

The mechanics of sync/update/run/close are in
leaseagent.dataplane.reconciling; this module is policy.
"""

from __future__ import annotations

import logging
import secrets
import socket
from collections.abc import Mapping
from ipaddress import IPv4Network, ip_interface
from pathlib import Path

from leaseagent.core.diagnosis import Problem, vtep_mac_problems
from leaseagent.core.kerneldiff import Claims
from leaseagent.core.leases import LeaseValue, Peer
from leaseagent.core.network import Address, Network
from leaseagent.core.plan import (
    DeviceDifference,
    DeviceSpec,
    DeviceState,
    Interface,
    KernelObject,
    Observation,
    PlanDiff,
    Route,
    VxlanAttrs,
    compare_device,
    needs_recreate,
)
from leaseagent.core.profiles import vxlan
from leaseagent.core.profiles.vxlan import VxlanLeaseData, VxlanOptions, unicast_mac
from leaseagent.dataplane import kept
from leaseagent.dataplane.base import BackendAttrs, DataPlaneSettings, DoctorFindings
from leaseagent.dataplane.devices import fix_in_place
from leaseagent.dataplane.kernelport import Kernel
from leaseagent.dataplane.netlink import (
    Action,
    Failure,
    Known,
    Link,
    NetlinkEvent,
    nothing_known,
    read_again,
)
from leaseagent.dataplane.reconciling import ReconcilingBackend
from leaseagent.dataplane.rtnl import family_of
from leaseagent.errors import ConfigError, DataPlaneError
from leaseagent.files import write_atomic

log = logging.getLogger(__name__)

VTEP_MAC_FILE = "vtep-mac"  # in the state dir
VTEP_MAC_V6_FILE = "vtep-mac-v6"


def random_vtep_mac() -> str:
    """A random locally administered (bit 1) unicast (bit 0 clear) MAC."""
    octets = bytearray(secrets.token_bytes(6))
    octets[0] = (octets[0] & 0xFC) | 0x02
    return ":".join(f"{b:02x}" for b in octets)


def load_vtep_mac(state_dir: Path, name: str = VTEP_MAC_FILE) -> str | None:
    """The VtepMAC stored in state_dir/name, or None if there is none (or it is garbage)."""
    path = state_dir / name
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise DataPlaneError(f"cannot read the stored VtepMAC {path}: {exc}") from exc
    mac = unicast_mac(text.strip())
    if mac is None:
        log.warning("ignoring %s: %r is not a unicast MAC address", path, text.strip()[:40])
    return mac


def store_vtep_mac(state_dir: Path, mac: str, name: str = VTEP_MAC_FILE) -> None:
    """Write the VtepMAC atomically, never through a planted symlink."""
    path = state_dir / name
    try:
        write_atomic(path, (mac + "\n").encode(), mode=0o644)
    except (OSError, ConfigError) as exc:
        raise DataPlaneError(f"cannot store the VtepMAC in {path}: {exc}") from exc


def host_address(subnet: Network) -> Interface:
    """The device address for a lease: its base address as a host route (/32, /128)."""
    return ip_interface((subnet.network_address, subnet.max_prefixlen))


class Vtep:
    """One vxlan device of the backend (flannel.<VNI> or flannel-v6.<VNI>): its fixed
    settings, and the index and MAC it has once made or adopted."""

    def __init__(self, name: str, local: Address, *, vni: int, port: int, link: int, mtu: int,
                 mac_file: str, state_dir: Path,
                 flags: frozenset[str] = frozenset()) -> None:
        self.name = name
        self.local = local
        self.attrs = VxlanAttrs(vni=vni, port=port, local=local, link=link, flags=flags)
        self.mtu = mtu
        self.mac_file = mac_file
        self._state_dir = state_dir
        self.index = 0  # 0: no device known yet
        self.mac: str | None = None

    @property
    def lease_data(self) -> dict[str, object]:
        """BackendData (or BackendV6Data) of a lease: flannel's vxlanLeaseAttrs."""
        assert self.mac is not None
        return {"VNI": self.attrs.vni, "VtepMAC": self.mac}

    def spec(self, own: Network | None) -> DeviceSpec:
        return DeviceSpec(name=self.name, kind=vxlan.DEVICE_KIND, mtu=self.mtu, vxlan=self.attrs,
                          mac=self.mac, address=host_address(own) if own else None)

    async def observe(self, nl: Kernel) -> DeviceState | None:
        """The device as the kernel has it; a backend that never prepared (doctor)
        plans with the index found."""
        state = await nl.device_state(self.name)
        if not self.index and state is not None and state.kind == vxlan.DEVICE_KIND:
            self.index = state.index
        return state

    async def converge(self, nl: Kernel, own: Network | None, *, repair: bool = False) -> bool:
        """Make the device what `spec` says: adopt, adjust in place, or (re)create it;
        True if anything changed. The first time, the device's MAC is adopted. A
        `repair` (someone changed the device) is logged at INFO, setting it up at DEBUG."""
        state = await nl.device_state(self.name)
        spec = self.spec(own)
        differences = compare_device(spec, state)
        changed = False
        if needs_recreate(differences):
            state = await self._create(nl, state, differences)
            differences = compare_device(spec, state)
            changed = True
        assert state is not None
        if self.mac is None:
            self.mac = unicast_mac(state.mac)
            if self.mac is None:
                raise DataPlaneError(f"{self.name} has an unusable MAC {state.mac!r}")
        if state.index != self.index:
            changed = changed or bool(self.index)
            self.index = state.index
        changed = await fix_in_place(nl, state, spec, differences, repair=repair) or changed
        if load_vtep_mac(self._state_dir, self.mac_file) != self.mac:
            store_vtep_mac(self._state_dir, self.mac, self.mac_file)
        return changed

    async def converge_or_choose(self, nl: Kernel, own: Network | None) -> bool:
        """At the agent's start, before the lease: a device of this name is made what
        `spec` says (`converge`); with none, only its MAC is chosen (`_mac`) and stored
        now, so the lease names the MAC that this and every later attempt make the device
        with. True when the device is left to make (the first sync makes it)."""
        if await nl.device_state(self.name) is not None:
            await self.converge(nl, own)
            return False
        self.mac = self._mac(None)
        if load_vtep_mac(self._state_dir, self.mac_file) != self.mac:
            store_vtep_mac(self._state_dir, self.mac, self.mac_file)
        return True

    def _mac(self, reuse: str | None) -> str:
        """The MAC a device made now gets, in this order: ours, the old device's
        (`reuse`), the stored one, a new random one (as the kernel would choose)."""
        return (self.mac or reuse or load_vtep_mac(self._state_dir, self.mac_file)
                or random_vtep_mac())

    async def _create(self, nl: Kernel, state: DeviceState | None,
                      differences: list[DeviceDifference]) -> DeviceState:
        """Delete a device that cannot be adopted and create it as specified, with the
        MAC `_mac` gives."""
        reuse = unicast_mac(state.mac) if state is not None and state.kind == vxlan.DEVICE_KIND else None
        mac = self._mac(reuse)
        if state is not None:
            log.warning("recreating %s: %s", self.name, "; ".join(d.text for d in differences))
            await nl.delete_link(state.index)
        else:
            log.info("creating %s (VNI %d, port %d, local %s, MAC %s)", self.name,
                     self.attrs.vni, self.attrs.port, self.local, mac)
        await nl.create_vxlan(self.name, vni=self.attrs.vni, port=self.attrs.port,
                              local=self.local, link=self.attrs.link, mtu=self.mtu, mac=mac,
                              flags=self.attrs.flags)
        self.mac = mac
        created = await nl.device_state(self.name)
        if created is None:
            raise DataPlaneError(f"vxlan device {self.name} vanished right after it was created")
        return created

    def concerns(self, event: NetlinkEvent) -> str | None:
        """The drift `event` shows on this device: "device" (gone, down, another one
        with its name), "neighbour" or "fdb" (an entry on it), or None."""
        index = self.index
        if not index:
            return None
        if event.kind == "link" and (event.ifindex == index or event.ifname == self.name):
            if event.deleted or event.up is False or event.ifindex != index:
                return "device"
        if (
            event.kind in ("neighbour", "fdb")
            and event.ifindex == index
            and (event.deleted or event.sender)
        ):
            return event.kind
        return None


async def _remove_vxlan(nl: Kernel, name: str, why: str) -> None:
    """Delete the vxlan device `name` if there is one (its entries go with it)."""
    state = await nl.device_state(name)
    if state is not None and state.kind == vxlan.DEVICE_KIND:
        log.info("removing %s (%s)", name, why)
        await nl.delete_link(state.index)


class VxlanBackend(ReconcilingBackend):
    """flannel's vxlan backend, with resync and drift repair, in one or both families."""

    backend_type = vxlan.NAME

    def __init__(self, settings: DataPlaneSettings) -> None:
        super().__init__(settings)
        options = settings.network.options
        if not isinstance(options, VxlanOptions):
            raise ConfigError(f"the vxlan backend cannot run a {settings.network.backend_type} network")
        self._options = options
        self._v4 = self._vtep(settings.host.public_ip)
        public_ipv6 = settings.host.public_ipv6 if settings.ipv6_enabled else None
        self._v6 = self._vtep(public_ipv6) if public_ipv6 is not None else None
        self._devices = (self._v4,) if self._v6 is None else (self._v4, self._v6)
        self._direct_networks: tuple[Network, ...] = ()

    def _vtep(self, local: Address) -> Vtep:
        """The device of `local`'s family: flannel's name, MTU and MAC file for it."""
        options, host = self._options, self._settings.host
        ipv6 = local.version == 6
        return Vtep(
            options.device_name6 if ipv6 else options.device_name, local,
            vni=options.vni, port=options.port, link=host.iface_index,
            mtu=options.mtu_for(host.iface_mtu, ipv6=ipv6),
            mac_file=VTEP_MAC_V6_FILE if ipv6 else VTEP_MAC_FILE,
            state_dir=self._settings.state_dir,
            flags=vxlan.device_flags(options),
        )

    @property
    def device_name(self) -> str:
        return self._v4.name

    def _with_own(self, own_subnet: Network | None, own_ipv6: Network | None
                  ) -> zip[tuple[Vtep, Network | None]]:
        """Each device in use with the lease subnet of its family."""
        return zip(self._devices, (own_subnet, own_ipv6), strict=False)

    async def prepare(self, *, devices_at_sync: bool = False) -> BackendAttrs:
        async with self._lock:
            nl = await self._netlink()
            if devices_at_sync:
                later = [await vtep.converge_or_choose(nl, None) for vtep in self._devices]
                self._make_at_sync = any(later)
                if self._v6 is None:
                    await self._remove_unused_v6(nl)
            else:
                await self._converge_devices(nl)
            await self._refresh(nl)
        return BackendAttrs(
            backend_type=self.backend_type,
            mtu=self._settings.flannel_mtu,
            backend_data=self._v4.lease_data,
            backend_v6_data=self._v6.lease_data if self._v6 is not None else {},
        )

    # -- a Port change: the new device beside the old one --------------------------

    async def step_aside(self) -> bool:
        """Rename this backend's devices out of the way (`vxlan.aside_name`) for a new
        instance on another Port, which makes its own of flannel's names beside them: a
        device's port cannot be changed, and the same VNI may be on two ports. Renamed
        running, a device keeps its routes, neighbour and FDB entries and its socket on
        the old port, so peers not yet switched still reach this host, until
        `remove(objects=False)` takes it. A device an earlier Port change put aside
        (a change back within its hold) takes flannel's name back in the same step, by
        way of `vxlan.back_name`: the new instance adopts it when it is what it wants
        (the port wanted again), never a moment without a device on that port, and
        makes it anew otherwise (`Vtep.converge`). False, nothing changed, when a name
        would not fit (the new instance then makes its device again in place)."""
        asides = [vxlan.aside_name(vtep.name) for vtep in self._devices]
        if None in asides:
            return False
        async with self._lock:
            nl = await self._netlink()
            for vtep, aside in zip(self._devices, asides, strict=True):
                assert aside is not None
                kept = await nl.device_state(aside)
                if kept is not None and kept.kind == vxlan.DEVICE_KIND:
                    await nl.rename_link(kept.index, vxlan.back_name(aside))
                state = await nl.device_state(vtep.name)
                if state is not None and state.kind == vxlan.DEVICE_KIND:
                    await nl.rename_link(state.index, aside)
                    log.info("%s renamed %s: kept beside the new device until no peer "
                             "sends to its port", vtep.name, aside)
                if kept is not None and kept.kind == vxlan.DEVICE_KIND:
                    await nl.rename_link(kept.index, vtep.name)
                    log.info("%s (put aside by an earlier Port change) renamed %s: taken "
                             "back if it is what the new config wants", aside, vtep.name)
                vtep.name = aside
        return True

    async def clear_the_way(self) -> None:
        """At start: a device of ours in the way of one this backend wants (`kept.in_the_way`:
        its VNI, port and family; the config changed back while the agent was down within
        a Port change's hold) takes flannel's name back, as a change back within the hold
        does (`step_aside`): the device of that name, on the other port, goes aside
        (`vxlan.aside_name`; taken over as kept after `prepare`), by way of
        `vxlan.back_name` when the one in the way has the aside name. So it is adopted
        with its entries, never a moment without a device on either port. Where a name
        will not fit or is another device's, the one in the way is removed instead."""
        nl = await self._netlink()
        wanted = self.spec(None, {}).devices
        for link in kept.unused(await nl.links(), {d.name for d in wanted}):
            want = next((w for w in wanted if kept.in_the_way(link, [w])), None)
            if want is None:
                continue
            if not await self._take_name_back(nl, link, want.name):
                log.info("removing %s: a device the network config wants cannot stand "
                         "beside it and receives on its port instead", kept.describe(link))
                await nl.delete_link(link.index)

    async def _take_name_back(self, nl: Kernel, link: Link, name: str) -> bool:
        """`link` renamed `name`, the device of that name (if any) put aside; False when
        that cannot be done (nothing changed)."""
        current = await nl.link_by_name(name)
        aside = vxlan.aside_name(name)
        if current is not None:
            other = await nl.link_by_name(aside) if aside is not None else None
            if (aside is None or current.kind != vxlan.DEVICE_KIND
                    or (other is not None and other.index != link.index)):
                return False
            if link.name == aside:
                await nl.rename_link(link.index, vxlan.back_name(aside))
            await nl.rename_link(current.index, aside)
            log.info("%s renamed %s: kept beside the device the network config wants again",
                     name, aside)
        await nl.rename_link(link.index, name)
        log.info("%s renamed %s: the network config wants it again (changed back while the "
                 "agent was stopped)", kept.describe(link), name)
        return True

    async def step_back(self) -> None:
        """Undo `step_aside` (the new instance could not be prepared): each device gets
        flannel's name back, a device of that name the new instance made removed first."""
        async with self._lock:
            nl = await self._netlink()
            for vtep in self._devices:
                name = self._options.device_name_for(ipv6=vtep.local.version == 6)
                if vtep.name == name:
                    continue
                await _remove_vxlan(nl, name, "made for a config this host could not run")
                state = await nl.device_state(vtep.name)
                if state is not None:
                    await nl.rename_link(state.index, name)
                vtep.name = name

    # -- devices ---------------------------------------------------------------

    def _device_specs(self, own_subnet: Network | None, own_ipv6: Network | None
                      ) -> tuple[DeviceSpec, ...]:
        return tuple(vtep.spec(own) for vtep, own in self._with_own(own_subnet, own_ipv6))

    async def _observe_devices(self, nl: Kernel) -> dict[str, DeviceState | None]:
        return {vtep.name: await vtep.observe(nl) for vtep in self._devices}

    async def _converge_devices(self, nl: Kernel, *, repair: bool = False) -> bool:
        changed = False
        for vtep, own in self._with_own(self._own_subnet, self._own_ipv6):
            changed = await vtep.converge(nl, own, repair=repair) or changed
        if self._v6 is None:
            changed = await self._remove_unused_v6(nl) or changed
        return changed

    async def _remove_unused_v6(self, nl: Kernel) -> bool:
        """Delete flannel-v6.<VNI> left from a dual-stack run (IPv6 turned off since, in
        a running agent or across a restart); its neighbour and FDB entries go with it,
        its routes are ours and go with the next sync. True if it was there."""
        name = self._options.device_name6
        state = await nl.device_state(name)
        if state is None or state.kind != vxlan.DEVICE_KIND:
            return False
        log.info("removing %s: the network config has no IPv6 now", name)
        await nl.delete_link(state.index)
        return True

    async def doctor(self, own: LeaseValue | None, peers: Mapping[IPv4Network, Peer],
                     observed: Observation) -> DoctorFindings:
        """Each device's VtepMAC three ways: the device's, the lease's, the one kept in
        the state directory."""
        found: list[Problem] = []
        for vtep in self._devices:
            device = observed.devices.get(vtep.name)
            if device is None or device.kind != vxlan.DEVICE_KIND:
                continue
            data = {} if own is None else (
                own.backend_v6_data if vtep.local.version == 6 else own.backend_data)
            lease_mac = data.get("VtepMAC") if isinstance(data.get("VtepMAC"), str) else None
            try:
                stored = load_vtep_mac(self._settings.state_dir, vtep.mac_file)
            except DataPlaneError:
                stored = None
            found += vtep_mac_problems(
                device=device.name, device_mac=device.mac, lease_mac=lease_mac,
                stored_mac=stored, state_file=str(self._settings.state_dir / vtep.mac_file))
        return DoctorFindings(found)

    async def _ensure_ready(self, nl: Kernel) -> bool:
        if not self._v4.index:
            return False  # not prepared yet: nothing to repair
        return await self._converge_devices(nl, repair=True)

    # -- plan --------------------------------------------------------------------

    async def _refresh(self, nl: Kernel) -> None:
        host = self._settings.host
        if self._options.direct_routing and host.iface_index:
            self._direct_networks = tuple(
                a.interface.network for a in await nl.addresses(index=host.iface_index)
                if not a.is_ipv6_link_local
            )

    def _is_direct(self, ip: Address) -> bool:
        return any(ip in net for net in self._direct_networks)  # `in` is False across families

    def _claims(self, peer: Peer) -> Claims:
        # The MAC and the holder as the peer holds them: no text made per peer (kept
        # as the admission's keys) and no str() of an address (a microsecond; a full
        # pass asks this of every peer).
        data, data6 = peer.data, peer.data6
        if not isinstance(data, VxlanLeaseData):
            return ()
        if isinstance(data6, VxlanLeaseData) and peer.public_ipv6 is not None:
            return (("VtepMAC", data.vtep_mac, peer.public_ip),
                    ("VtepMAC", data6.vtep_mac, peer.public_ipv6))
        return (("VtepMAC", data.vtep_mac, peer.public_ip),)

    def _own_claims(self) -> frozenset[str]:
        return frozenset(vtep.mac for vtep in self._devices if vtep.mac)

    def _plan_peer(self, peer: Peer) -> frozenset[KernelObject]:
        if not self._v4.index:
            return frozenset()  # no device (not prepared, or doctor found none): nothing to plan
        if self._runs_other(peer) is not None:
            return frozenset()  # another VNI (or type): served the old way meanwhile
        return vxlan.plan_peer(
            peer,
            self._v4.index,
            underlay_index=self._settings.host.iface_index,
            direct_routing=self._options.direct_routing,
            is_direct=self._is_direct,
            vxlan6_index=self._v6.index if self._v6 is not None else 0,
        )

    async def _scan(self, nl: Kernel, known: Known) -> list[KernelObject]:
        # Routes of both families: an IPv6 route of ours left from a dual-stack run
        # is found (and removed) on an IPv4-only one too.
        found: list[KernelObject] = []
        found += await self._scan_routes(nl, known)
        for vtep in self._devices:
            if vtep.index:
                found += await nl.scan_neighbours(known, vtep.index,
                                                  family=family_of(vtep.local))
                found += await nl.scan_fdb(known, vtep.index, own_mac=vtep.mac)
        return found

    async def _program(self, nl: Kernel, changes: PlanDiff
                       ) -> tuple[list[KernelObject], list[KernelObject], list[Failure]]:
        """As every backend's, but an IPv6 route moving to a new device (a VNI or Port
        change made beside the old one) is moved: IPv6 refuses an onlink route whose
        gateway's route is on another device (EINVAL), and our route to the peer's
        subnet, holding the gateway, is on the old one. That route is removed and the
        new one added, back to back in one send (`Kernel.move`: two sends let a loaded
        host give the moment between them to other work, a window without the route)."""
        removed, added, failures = await super()._program(nl, changes)
        moving = {f.obj for f in failures if f.action is Action.REPLACE
                  and isinstance(f.obj, Route) and f.obj.dst.version == 6 and f.obj.onlink}
        if not moving:
            return removed, added, failures
        protocol = self._settings.route_protocol
        new = {(r.dst, r.metric): r for r in moving}
        pairs = [(r, new[(r.dst, r.metric)]) for r in await read_again(lambda: nl.scan_routes(
                     nothing_known, protocol=protocol, family=socket.AF_INET6))
                 if (r.dst, r.metric) in new and new[(r.dst, r.metric)].ifindex != r.ifindex]
        paired = {n for _, n in pairs}
        moved, still = await nl.move(sorted(pairs, key=str), protocol=protocol)
        if moving - paired:  # its old route gone meanwhile: put in as it is
            done, refused = await nl.apply(Action.REPLACE, sorted(moving - paired, key=str),
                                           protocol=protocol)
            moved, still = moved + done, still + refused
        return removed, added + moved, [f for f in failures if f.obj not in moving] + still

    def _drift_kind(self, event: NetlinkEvent) -> str | None:
        kind = super()._drift_kind(event)
        if kind is not None:
            return kind
        for vtep in self._devices:
            kind = vtep.concerns(event)
            if kind is not None:
                return kind
        return None
