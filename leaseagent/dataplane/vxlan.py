"""The vxlan backend: flannel's VXLAN data plane, kept in sync (docs/architecture.md).

Per host: a device `flannel.<VNI>` (type vxlan, id VNI, local = PublicIP,
dev = underlay, dstport = Port (8472), learning off), MTU = underlay MTU - 50
(or Backend.MTU), address `<own subnet network>/32` (a /32: no broadcast or
subnet route appears) and a VtepMAC that survives restarts. Per peer:
permanent neighbour `<subnet .0> lladdr <VtepMAC>`, permanent FDB
`<VtepMAC> dst <PublicIP>`, route `<subnet> via <subnet .0> onlink`;
with Backend.DirectRouting and the peer's PublicIP on a network the
underlay is directly attached to, only `<subnet> via <PublicIP> dev underlay`.

VtepMAC, in order of preference: the MAC of the existing device (an agent
restart keeps the device, so peers' neighbour entries stay valid), the one
in `<state_dir>/vtep-mac`, a fresh random locally administered unicast MAC.
Whatever is used is written back to the file (atomically: temp file,
fsync, rename), so a device deleted while the agent is down comes back
with the same MAC.

The device is described by a pure `DeviceSpec` and compared with what the
kernel has by `core.plan.compare_device`, the same comparison `leasectl
doctor` prints: an existing device whose VNI, port, local address, underlay
or learning setting differ is deleted and created again (with its MAC); one
with another MTU, MAC, state or addresses is adjusted in place.

The mechanics of sync/update/run/close are in
leaseagent.dataplane.reconciling; this module is policy.
"""

from __future__ import annotations

import logging
import secrets
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from pathlib import Path

from leaseagent.core.backends import VxlanOptions, unicast_mac
from leaseagent.core.leases import Peer
from leaseagent.core.plan import (
    ADD_ADDRESS,
    REMOVE_ADDRESS,
    SET_MAC,
    SET_MTU,
    SET_UP,
    DeviceDifference,
    DeviceSpec,
    DeviceState,
    KernelObject,
    VxlanAttrs,
    compare_device,
    needs_recreate,
    plan_vxlan_peer,
)
from leaseagent.dataplane.base import BackendAttrs, DataPlaneSettings
from leaseagent.dataplane.netlink import Netlink, NetlinkEvent
from leaseagent.dataplane.reconciling import ReconcilingBackend
from leaseagent.errors import ConfigError, DataPlaneError
from leaseagent.files import write_atomic

log = logging.getLogger(__name__)

VTEP_MAC_FILE = "vtep-mac"  # in the state dir


def random_vtep_mac() -> str:
    """A random locally administered (bit 1) unicast (bit 0 clear) MAC."""
    octets = bytearray(secrets.token_bytes(6))
    octets[0] = (octets[0] & 0xFC) | 0x02
    return ":".join(f"{b:02x}" for b in octets)


def load_vtep_mac(state_dir: Path) -> str | None:
    """The VtepMAC stored in state_dir, or None if there is none (or it is garbage)."""
    path = state_dir / VTEP_MAC_FILE
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


def store_vtep_mac(state_dir: Path, mac: str) -> None:
    """Write the VtepMAC atomically, never through a planted symlink."""
    path = state_dir / VTEP_MAC_FILE
    try:
        write_atomic(path, (mac + "\n").encode(), mode=0o644)
    except (OSError, ConfigError) as exc:
        raise DataPlaneError(f"cannot store the VtepMAC in {path}: {exc}") from exc


class VxlanBackend(ReconcilingBackend):
    """flannel's vxlan backend, with resync and drift repair."""

    backend_type = "vxlan"

    def __init__(self, settings: DataPlaneSettings) -> None:
        super().__init__(settings)
        options = settings.network.options
        if not isinstance(options, VxlanOptions):
            raise ConfigError(f"the vxlan backend cannot run a {settings.network.backend_type} network")
        self._options = options
        self._device_index = 0  # 0: no device known yet
        self._mac: str | None = None
        self._direct_networks: tuple[IPv4Network, ...] = ()

    @property
    def device_name(self) -> str:
        return self._options.device_name

    @property
    def mtu(self) -> int:
        return self._options.mtu_for(self._settings.host.iface_mtu)

    async def prepare(self) -> BackendAttrs:
        async with self._lock:
            nl = await self._netlink()
            await self._converge_device(nl)
            await self._refresh(nl)
        assert self._mac is not None
        return BackendAttrs(
            backend_type="vxlan",
            mtu=self.mtu,
            backend_data={"VNI": self._options.vni, "VtepMAC": self._mac},
        )

    async def start(self, own_subnet: IPv4Network) -> None:
        async with self._lock:
            self._own_subnet = own_subnet
            await self._converge_device(await self._netlink())

    # -- device ----------------------------------------------------------------

    def _device_spec(self, own_subnet: IPv4Network | None) -> DeviceSpec:
        host = self._settings.host
        return DeviceSpec(
            name=self.device_name, kind="vxlan", mtu=self.mtu,
            vxlan=VxlanAttrs(vni=self._options.vni, port=self._options.port, local=host.public_ip,
                             link=host.iface_index, learning=False),
            mac=self._mac,
            # A /32: no broadcast or subnet route appears.
            address=IPv4Interface((own_subnet.network_address, 32)) if own_subnet else None,
        )

    def _device_specs(self, own_subnet: IPv4Network | None) -> tuple[DeviceSpec, ...]:
        return (self._device_spec(own_subnet),)

    async def _observe_devices(self, nl: Netlink) -> dict[str, DeviceState | None]:
        state = await nl.device_state(self.device_name)
        if not self._device_index and state is not None and state.kind == "vxlan":
            self._device_index = state.index  # never prepared (doctor): plan with this one
        return {self.device_name: state}

    async def _converge_device(self, nl: Netlink, *, repair: bool = False) -> bool:
        """Make the device what `_device_spec` says: adopt, adjust in place, or (re)create
        it; True if anything changed. The first time, the device's MAC is adopted. A
        `repair` (someone changed the device) is logged at INFO, setting it up at DEBUG."""
        state = await nl.device_state(self.device_name)
        spec = self._device_spec(self._own_subnet)
        differences = compare_device(spec, state)
        changed = False
        if needs_recreate(differences):
            state = await self._create_device(nl, state, differences)
            differences = compare_device(spec, state)
            changed = True
        assert state is not None
        if self._mac is None:
            self._mac = unicast_mac(state.mac)
            if self._mac is None:
                raise DataPlaneError(f"{self.device_name} has an unusable MAC {state.mac!r}")
        if state.index != self._device_index:
            changed = changed or bool(self._device_index)
            self._device_index = state.index
        for difference in differences:
            if difference.fix == SET_MTU:
                await nl.set_link(state.index, mtu=spec.mtu)
            elif difference.fix == SET_MAC:
                await nl.set_link(state.index, mac=spec.mac)
            elif difference.fix == SET_UP:
                await nl.set_link(state.index, up=True)
            elif difference.fix == ADD_ADDRESS:
                assert spec.address is not None
                await nl.add_address(state.index, spec.address)
            elif difference.fix == REMOVE_ADDRESS:
                assert isinstance(difference.have, IPv4Interface)
                await nl.delete_address(state.index, difference.have)
            else:
                continue
            log.log(logging.INFO if repair else logging.DEBUG, "%s; fixed", difference.text)
            changed = True
        if load_vtep_mac(self._settings.state_dir) != self._mac:
            store_vtep_mac(self._settings.state_dir, self._mac)
        return changed

    async def _create_device(self, nl: Netlink, state: DeviceState | None,
                             differences: list[DeviceDifference]) -> DeviceState:
        """Delete a device that cannot be adopted and create it as specified, keeping a
        MAC in this order: ours, the old device's, the stored one, a new random one."""
        name = self.device_name
        reuse = unicast_mac(state.mac) if state is not None and state.kind == "vxlan" else None
        mac = self._mac or reuse or load_vtep_mac(self._settings.state_dir) or random_vtep_mac()
        if state is not None:
            log.warning("recreating %s: %s", name, "; ".join(d.text for d in differences))
            await nl.delete_link(state.index)
        else:
            log.info("creating %s (VNI %d, port %d, MAC %s)", name, self._options.vni,
                     self._options.port, mac)
        host = self._settings.host
        await nl.create_vxlan(name, vni=self._options.vni, port=self._options.port,
                              local=host.public_ip, link=host.iface_index, mtu=self.mtu, mac=mac)
        self._mac = mac
        created = await nl.device_state(name)
        if created is None:
            raise DataPlaneError(f"vxlan device {name} vanished right after it was created")
        return created

    async def _ensure_ready(self, nl: Netlink) -> bool:
        if not self._device_index:
            return False  # not prepared yet: nothing to repair
        return await self._converge_device(nl, repair=True)

    # -- plan --------------------------------------------------------------------

    async def _refresh(self, nl: Netlink) -> None:
        host = self._settings.host
        if self._options.direct_routing and host.iface_index:
            self._direct_networks = tuple(
                addr.network for _, addr in await nl.ipv4_addresses(host.iface_index)
            )

    def _is_direct(self, ip: IPv4Address) -> bool:
        return any(ip in net for net in self._direct_networks)

    def _plan_peer(self, peer: Peer) -> frozenset[KernelObject]:
        if not self._device_index:
            return frozenset()  # no device (not prepared, or doctor found none): nothing to plan
        return plan_vxlan_peer(
            peer,
            self._device_index,
            underlay_index=self._settings.host.iface_index,
            direct_routing=self._options.direct_routing,
            is_direct=self._is_direct,
        )

    async def _current(self, nl: Netlink) -> set[KernelObject]:
        current: set[KernelObject] = set(await nl.routes(protocol=self._settings.route_protocol))
        if self._device_index:
            current |= await nl.neighbours(self._device_index)
            current |= await nl.fdb(self._device_index, own_mac=self._mac)
        return current

    def _drift_kind(self, event: NetlinkEvent) -> str | None:
        kind = super()._drift_kind(event)
        index = self._device_index
        if kind is not None or not index:
            return kind
        if event.kind == "link" and (event.ifindex == index or event.ifname == self.device_name):
            if event.deleted or event.up is False or event.ifindex != index:
                return "device"
        if (
            event.kind in ("neighbour", "fdb")
            and event.ifindex == index
            and (event.deleted or event.sender)
        ):
            return event.kind
        return None
