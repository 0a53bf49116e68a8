"""The vxlan backend (DESIGN.md §3): flannel's VXLAN data plane, kept in sync.

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

Adoption: an existing device whose VNI, port, local address, underlay or
learning setting differ is deleted and created again (with its MAC); one
with only another MTU is adjusted in place.

The mechanics of sync/update/run/close are in
leaseagent.dataplane.reconciling; this module is policy.
"""

from __future__ import annotations

import logging
import re
import secrets
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from pathlib import Path

from leaseagent.core.lease import Peer
from leaseagent.core.plan import KernelObject, plan_vxlan_peer, vxlan_options
from leaseagent.dataplane.base import BackendAttrs, DataPlaneSettings
from leaseagent.dataplane.netlink import Link, Netlink, NetlinkEvent
from leaseagent.dataplane.reconciling import ReconcilingBackend
from leaseagent.errors import ConfigError, DataPlaneError
from leaseagent.files import write_atomic

log = logging.getLogger(__name__)

VTEP_MAC_FILE = "vtep-mac"
_MAC_RE = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")


def random_vtep_mac() -> str:
    """A random locally administered (bit 1) unicast (bit 0 clear) MAC."""
    octets = bytearray(secrets.token_bytes(6))
    octets[0] = (octets[0] & 0xFC) | 0x02
    return ":".join(f"{b:02x}" for b in octets)


def _usable_mac(mac: str | None) -> str | None:
    if not mac:
        return None
    mac = mac.strip().lower()
    if not _MAC_RE.fullmatch(mac) or int(mac[:2], 16) & 1 or mac == "00:00:00:00:00:00":
        return None
    return mac


def load_vtep_mac(state_dir: Path) -> str | None:
    """The VtepMAC stored in state_dir, or None if there is none (or it is garbage)."""
    path = state_dir / VTEP_MAC_FILE
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise DataPlaneError(f"cannot read the stored VtepMAC {path}: {exc}") from exc
    mac = _usable_mac(text)
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
        # Raises NetworkConfigError naming the bad Backend field.
        self._options = vxlan_options(settings.network.backend)
        self._device: Link | None = None
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
            await self._ensure_device(nl)
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
            nl = await self._netlink()
            if self._device is None:
                await self._ensure_device(nl)
            await self._configure(nl)

    # -- device ----------------------------------------------------------------

    def _mismatch(self, link: Link) -> str | None:
        """Why an existing device cannot be adopted, or None."""
        host = self._settings.host
        info = link.vxlan
        if link.kind != "vxlan" or info is None:
            return f"it is a {link.kind or 'plain'} device, not vxlan"
        if info.vni != self._options.vni:
            return f"its VNI is {info.vni}, not {self._options.vni}"
        if info.port != self._options.port:
            return f"its port is {info.port}, not {self._options.port}"
        if info.local != host.public_ip:
            return f"its local address is {info.local}, not {host.public_ip}"
        if host.iface_index and info.link != host.iface_index:
            return f"its underlay is link {info.link}, not {host.iface} ({host.iface_index})"
        if info.learning:
            return "it has learning on"
        return None

    async def _ensure_device(self, nl: Netlink) -> bool:
        """Adopt or (re)create the device; True if it was created."""
        name = self.device_name
        link = await nl.link_by_name(name)
        why = self._mismatch(link) if link is not None else "it does not exist"
        if link is not None and why is None:
            if link.mtu != self.mtu:
                await nl.set_link(link.index, mtu=self.mtu)
            self._device = link
            self._mac = _usable_mac(link.address)
            if self._mac is None:
                raise DataPlaneError(f"{name} has an unusable MAC {link.address!r}")
            if load_vtep_mac(self._settings.state_dir) != self._mac:
                store_vtep_mac(self._settings.state_dir, self._mac)
            return False
        reuse = _usable_mac(link.address) if link is not None and link.kind == "vxlan" else None
        mac = reuse or self._mac or load_vtep_mac(self._settings.state_dir) or random_vtep_mac()
        if link is not None:
            log.warning("recreating %s: %s", name, why)
            await nl.delete_link(link.index)
        else:
            log.info("creating %s (VNI %d, port %d, MAC %s)", name, self._options.vni,
                     self._options.port, mac)
        host = self._settings.host
        self._device = await nl.create_vxlan(
            name,
            vni=self._options.vni,
            port=self._options.port,
            local=host.public_ip,
            link=host.iface_index,
            mtu=self.mtu,
            mac=mac,
        )
        self._mac = mac
        if load_vtep_mac(self._settings.state_dir) != mac:
            store_vtep_mac(self._settings.state_dir, mac)
        return True

    async def _configure(self, nl: Netlink) -> bool:
        """Own /32 as the only IPv4 address, device up; True if anything changed."""
        device = self._device
        if device is None or self._own_subnet is None:
            return False
        want = IPv4Interface((self._own_subnet.network_address, 32))
        changed = False
        present = [addr for _, addr in await nl.ipv4_addresses(device.index)]
        for addr in present:
            if addr != want:
                await nl.delete_address(device.index, addr)
                changed = True
        if want not in present:
            await nl.add_address(device.index, want)
            changed = True
        if not device.up:
            await nl.set_link(device.index, up=True)
            self._device = Link(
                device.index, device.name, device.kind, device.mtu, device.address, True,
                device.vxlan,
            )
            changed = True
        return changed

    async def _ensure_ready(self, nl: Netlink) -> bool:
        if self._device is None:
            return False  # not prepared yet: nothing to repair
        link = await nl.link_by_name(self.device_name)
        repaired = False
        if link is None or link.index != self._device.index or self._mismatch(link) is not None:
            log.warning("%s was deleted or changed by someone else; recreating it",
                        self.device_name)
            await self._ensure_device(nl)
            repaired = True
        else:
            self._device = link
        if await self._configure(nl):
            repaired = True
        return repaired

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
        if self._device is None:
            raise DataPlaneError("vxlan backend used before prepare()")
        return plan_vxlan_peer(
            peer,
            self._device.index,
            underlay_index=self._settings.host.iface_index,
            direct_routing=self._options.direct_routing,
            is_direct=self._is_direct,
        )

    async def _current(self, nl: Netlink) -> set[KernelObject]:
        current: set[KernelObject] = set(await nl.routes(protocol=self._settings.route_protocol))
        if self._device is not None:
            current |= await nl.neighbours(self._device.index)
            current |= await nl.fdb(self._device.index, own_mac=self._mac)
        return current

    def _drift_kind(self, event: NetlinkEvent) -> str | None:
        kind = super()._drift_kind(event)
        device = self._device
        if kind is not None or device is None:
            return kind
        if event.kind == "link" and (
            event.ifindex == device.index or event.ifname == self.device_name
        ):
            if event.deleted or event.up is False or event.ifindex != device.index:
                return "device"
        if (
            event.kind in ("neighbour", "fdb")
            and event.ifindex == device.index
            and (event.deleted or event.sender)
        ):
            return event.kind
        return None
