"""The wireguard backend: flannel's WireGuard data plane, kept in sync (docs/architecture.md).

Per host, one device per address family in use (flannel's Mode "separate";
pkg/backend/wireguard/device.go, wireguard_network.go):

- `flannel-wg`: listen port ListenPort (51820), MTU = (Backend.MTU or the
  underlay's) - 60, address `<own subnet base>/32`, and the route `<network>
  dev flannel-wg scope link` (ours: our route protocol);
- on a dual-stack network with a PublicIPv6, also `flannel-wg-v6`: port
  ListenPortV6 (51821), MTU - 80, address `<own IPv6 subnet base>/128`, route
  `<IPv6 network> dev flannel-wg-v6`.

Both devices hold this host's one private key (leaseagent.dataplane.wgkeys);
the lease publishes its public key and each device's port (BackendData,
BackendV6Data). Per peer and family: the peer (its public key, endpoint
<public address>:<Port or our port>, the config's PSK and keepalive) with its
subnet as allowed IP (core.profiles.wireguard.plan_peer).

MTU. WireGuard adds 60 bytes over IPv4 (outer IP 20, UDP 8, message header
16, authentication tag 16) and 80 over IPv6; flannel subtracts 80 for both,
which costs IPv4 20 bytes of every full packet. Padding to a multiple of 16
never grows a packet beyond the device MTU. FLANNEL_MTU is the smallest
device MTU (core.profiles.wireguard, the profile's `mtu`).

Which WireGuard. Chosen once, at the first look at the devices, and logged:
an existing `flannel-wg` of kind wireguard is the kernel's; one of kind tun
whose control socket answers is wireguard-go's, adopted (a restart keeps it);
otherwise the kernel's if its genetlink family exists (leaseagent.dataplane.
wgnetlink), else wireguard-go (leaseagent.dataplane.wguapi, which says who
owns that process). Both are one `WireguardControl`; nothing below depends on
which.

Drift. A device deleted or set down, or our route removed, is seen at once in
netlink events, as for vxlan. WireGuard tells nobody when a peer changes, so
the devices' peers are read every PEER_CHECK_SECONDS (0.5 s) and compared with
the last applied plan: a peer removed by hand (`wg set flannel-wg peer K
remove`), or given another endpoint, PSK or allowed IPs, is put back at once;
a peer or allowed IP no lease wants starts a full resync, which removes it;
another private key or port, or a device that does not answer, starts one too
(the device is then set right or made anew). At start the full sync removes
the peers of hosts that vanished while the agent was down.

A ListenPort change is set on the running device (in place); a peer whose
view of our lease is older still sends to the old port, where nothing
listens then. So before the device moves, the old port's packets are
redirected to the new one (leaseagent.dataplane.portmove: nftables, taking
over only once nothing listens on the old port) for --peer-hold-time.

Priming. A peer that an event adds (a host joined, or rotated its key) is
written with a 1 s keepalive, then with its own: WireGuard sends a keepalive
when one is turned on, which starts the handshake now. The other host has
most likely tried first, before this host knew its key, and was ignored; it
tries again only 5 s later (REKEY_TIMEOUT), and its packets wait (or are
lost) until then. A full sync primes only a replaced key: an agent starting
into 1,000 peers sends no 1,000 handshakes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import replace
from ipaddress import IPv4Network, IPv6Network
from typing import Any

from leaseagent.core.diagnosis import Problem, problem, stalled_peer_problems, wireguard_key_problems
from leaseagent.core.leases import LeaseValue, Peer, PeerChanges
from leaseagent.core.network import Network
from leaseagent.core.plan import (
    RT_SCOPE_LINK,
    SET_WIREGUARD,
    AllowedIP,
    DeviceDifference,
    DeviceSpec,
    DeviceState,
    KernelObject,
    Observation,
    PlanDiff,
    Route,
    WgPeer,
    WireguardAttrs,
    compare_device,
    diff,
    needs_recreate,
)
from leaseagent.core.profiles import wireguard
from leaseagent.core.profiles.wireguard import WireguardLeaseData, WireguardOptions, wireguard_lease_data
from leaseagent.dataplane import portmove
from leaseagent.dataplane.base import BackendAttrs, DataPlaneSettings, DoctorFindings
from leaseagent.dataplane.devices import fix_in_place
from leaseagent.dataplane.kernelport import Kernel
from leaseagent.dataplane.netlink import Action, Failure, Known, NetlinkEvent
from leaseagent.dataplane.portmove import Move
from leaseagent.dataplane.reconciling import ReconcilingBackend
from leaseagent.dataplane.vxlan import host_address
from leaseagent.dataplane.wgdevice import (
    DeviceConfig,
    DeviceWrite,
    WireguardControl,
    restore_keepalive,
    updates,
)
from leaseagent.dataplane.wgkeys import PrivateKey, key_path, load_or_create_private_key, load_private_key
from leaseagent.dataplane.wgnetlink import KernelWireguard, find_family
from leaseagent.dataplane.wguapi import WireguardGo
from leaseagent.errors import ConfigError, DataPlaneError, InvalidLease

log = logging.getLogger(__name__)

PEER_CHECK_SECONDS = 0.5
WIREGUARD_OBJECTS = (WgPeer, AllowedIP)


class WgDevice:
    """One family's WireGuard device: what it should be, and its index once known."""

    def __init__(self, name: str, *, ipv6: bool, mtu: int, listen_port: int) -> None:
        self.name = name
        self.ipv6 = ipv6
        self.mtu = mtu
        self.listen_port = listen_port
        self.index = 0

    def lease_data(self, public_key: str) -> dict[str, object]:
        """BackendData (or BackendV6Data): flannel's wireguardLeaseAttrs."""
        return {"PublicKey": public_key, "Port": self.listen_port}


class WireguardBackend(ReconcilingBackend):
    """flannel's wireguard backend (Mode separate), with resync and drift repair."""

    backend_type = wireguard.NAME

    def __init__(self, settings: DataPlaneSettings) -> None:
        super().__init__(settings)
        options = settings.network.options
        if not isinstance(options, WireguardOptions):
            raise ConfigError(
                f"the wireguard backend cannot run a {settings.network.backend_type} network")
        self._options = options
        families = (False, True) if settings.ipv6_enabled else (False,)
        self._devices = tuple(
            WgDevice(options.device_name_for(ipv6=six), ipv6=six,
                     mtu=options.mtu_for(settings.host.iface_mtu, ipv6=six),
                     listen_port=options.port_for(ipv6=six))
            for six in families)
        self._key: PrivateKey | None = None  # prepare's; doctor has none (wants any key)
        self._control: WireguardControl | None = None
        self._events = False  # programming an update (peers' events): prime what it adds
        # Per device, the fingerprint (Snapshot) of the configuration last found as
        # planned; forgotten whenever anything is applied (the plan or the device moved).
        self._found_clean: dict[str, bytes] = {}
        # Ports this instance moved a device from, still redirected (portmove), and the
        # task that ends that --peer-hold-time after the first full sync (the lease with
        # the new port is out by then).
        self._moves: frozenset[Move] = frozenset()
        self._moves_timer: asyncio.Future[None] | None = None

    @property
    def control(self) -> WireguardControl | None:
        """The driver in use (None until the devices were first looked at)."""
        return self._control

    async def prepare(self, *, devices_at_sync: bool = False) -> BackendAttrs:
        self._key = key = load_or_create_private_key(self._settings.state_dir)
        async with self._lock:
            nl = await self._netlink()
            await self._move_ports(nl)
            await self._converge_devices(nl)
        v4, *v6 = self._devices
        return BackendAttrs(
            backend_type=self.backend_type,
            mtu=self._settings.flannel_mtu,
            backend_data=v4.lease_data(key.public_key),
            backend_v6_data=v6[0].lease_data(key.public_key) if v6 else {},
        )

    async def sync(self, peers: Mapping[IPv4Network, Peer], *,
                   ready: Awaitable[object] | None = None) -> None:
        await super().sync(peers, ready=ready)
        if self._moves and self._moves_timer is None:
            # The first full sync after prepare follows the lease with the new port: the
            # hold of a port move counts from there.
            self._moves_timer = asyncio.ensure_future(self._end_moves_later(self._moves))

    async def update(self, changes: PeerChanges, peers: Mapping[IPv4Network, Peer], *,
                     ready: Awaitable[object] | None = None) -> None:
        self._events = True
        try:
            await super().update(changes, peers, ready=ready)
        finally:
            self._events = False

    async def handshakes(self) -> list[tuple[str, str, float, int, int]]:
        """Each peer's (device, public key, last handshake, rx bytes, tx bytes), for
        doctor: read-only."""
        async with self._lock:
            control = await self._driver(await self._netlink())
            out = []
            for device in self._devices:
                config = await control.read(device.name)
                out += [(device.name, p.peer.public_key, p.last_handshake, p.rx_bytes,
                         p.tx_bytes) for p in (config.peers if config else ())]
            return out

    async def doctor(self, own: LeaseValue | None, peers: Mapping[IPv4Network, Peer],
                     observed: Observation) -> DoctorFindings:
        """The public key three ways per device (the device's, the lease's PublicKey, the
        key file's) and peers that never completed a handshake; the summary names the
        driver (kernel or wireguard-go) and the public key."""
        state_dir = self._settings.state_dir
        found: list[Problem] = []
        try:
            stored = load_private_key(state_dir)
        except ConfigError as exc:
            found.append(problem("state", str(key_path(state_dir)), str(exc), text=f"state {exc}"))
            stored = None
        for device in self._devices:
            state = observed.devices.get(device.name)
            if state is None or state.wireguard is None:
                continue
            data = {} if own is None else (
                own.backend_v6_data if device.ipv6 else own.backend_data)
            try:
                lease = wireguard_lease_data(data) if data else None
            except InvalidLease:
                lease = None  # the lease check has said so
            found += wireguard_key_problems(
                device=device.name, device_key=state.wireguard.public_key, lease_data=lease,
                stored_key=stored.public_key if stored else None,
                state_file=str(key_path(state_dir)))
        owners = {d.public_key: p for p in peers.values() for d in (p.data, p.data6)
                  if isinstance(d, WireguardLeaseData)}
        found += stalled_peer_problems(await self.handshakes(), owners)
        control = self.control
        summary = (f" ({control.name if control is not None else 'no device'}"
                   f"{f', public key {stored.public_key}' if stored else ''})")
        return DoctorFindings(found, summary)

    async def remove(self, *, objects: bool = True) -> None:
        await super().remove(objects=objects)
        await portmove.remove(netns=self._settings.netns)  # no device left to redirect to

    async def close(self) -> None:
        if self._moves_timer is not None:  # the next instance, or the next start, ends it
            self._moves_timer.cancel()
            await asyncio.gather(self._moves_timer, return_exceptions=True)
            self._moves_timer = None
        await super().close()
        if self._control is not None:
            self._control.close()

    # -- a ListenPort change: the old port kept reachable -------------------------

    async def _move_ports(self, nl: Kernel) -> None:
        """Before the devices take their ports: a device listening on another port than
        its spec's (ListenPort changed) has its old port's packets redirected to the new
        one (leaseagent.dataplane.portmove) for --peer-hold-time, so a peer that still
        sends there (its lease view is older than ours) loses nothing. Moves an earlier
        instance or run left are kept while they lead to a port in use (a fresh hold),
        the others removed. Without nft the change goes on, unredirected."""
        netns = self._settings.netns
        ports = {6 if d.ipv6 else 4: d.listen_port for d in self._devices}
        moves = {m for m in await portmove.observe(netns=netns) if ports.get(m.family) == m.new}
        for device in self._devices:
            state = await self._device_state(nl, device)
            have = state.wireguard.listen_port if state is not None and state.wireguard else 0
            if have and have != device.listen_port:
                moves.add(Move(6 if device.ipv6 else 4, have, device.listen_port))
        try:
            await portmove.put(moves, netns=netns)
        except DataPlaneError as exc:
            log.warning("cannot keep the old WireGuard port reachable (%s): a peer still "
                        "sending there loses packets until it reads this host's lease", exc)
            return
        for move in sorted(moves):
            log.info("%s redirected for %gs: packets to the old port reach the new one",
                     move.text, self._settings.hold_seconds)
        self._moves = frozenset(moves)

    async def _end_moves_later(self, moves: frozenset[Move]) -> None:
        """--peer-hold-time after the lease with the new port: the redirect removed
        (every peer has read that lease by then); only these moves, another instance's
        kept."""
        netns = self._settings.netns
        await asyncio.sleep(self._settings.hold_seconds)
        try:
            await portmove.put(await portmove.observe(netns=netns) - moves, netns=netns)
        except DataPlaneError as exc:
            log.warning("could not remove the WireGuard port redirect: %s", exc)
            return
        log.info("%s no longer redirected", ", ".join(m.text for m in sorted(moves)))
        self._moves = frozenset()

    # -- which WireGuard ---------------------------------------------------------

    async def _driver(self, nl: Kernel) -> WireguardControl:
        if self._control is None:
            self._control = await self._choose_driver(nl)
        return self._control

    async def _choose_driver(self, nl: Kernel) -> WireguardControl:
        netns = self._settings.netns
        userspace = WireguardGo(netns=netns)
        first = self._devices[0].name
        state = await nl.device_state(first)
        if state is not None and state.kind == userspace.link_kind and \
                await userspace.read(first) is not None:
            log.info("WireGuard: adopting wireguard-go's %s (pid %s)", first,
                     userspace.pids(first))
            return userspace
        family = await find_family(netns)
        if family is not None:
            log.info("WireGuard: the kernel module (generic netlink family %d)", family)

            async def create_link(name: str) -> None:
                await nl.create_link(name, wireguard.DEVICE_KIND)

            return KernelWireguard(family, create_link, netns=netns)
        log.info("WireGuard: wireguard-go (this kernel has no WireGuard module)")
        return userspace

    # -- devices -------------------------------------------------------------------

    def _device_spec(self, device: WgDevice, own: Network | None) -> DeviceSpec:
        kind = self._control.link_kind if self._control is not None else wireguard.DEVICE_KIND
        public_key = self._key.public_key if self._key is not None else None
        return DeviceSpec(name=device.name, kind=kind, mtu=device.mtu,
                          address=host_address(own) if own else None,
                          wireguard=WireguardAttrs(device.listen_port, public_key))

    def _device_specs(self, own_subnet: IPv4Network | None, own_ipv6: IPv6Network | None
                      ) -> tuple[DeviceSpec, ...]:
        return tuple(self._device_spec(d, own) for d, own in self._with_own(own_subnet, own_ipv6))

    def _with_own(self, own_subnet: Network | None, own_ipv6: Network | None
                  ) -> list[tuple[WgDevice, Network | None]]:
        return [(d, own_ipv6 if d.ipv6 else own_subnet) for d in self._devices]

    async def _device_state(self, nl: Kernel, device: WgDevice,
                            config: DeviceConfig | None = None) -> DeviceState | None:
        """The device as netlink has it, with what its WireGuard control says (none: it
        does not answer); its index is learnt on the way."""
        control = await self._driver(nl)
        state = await nl.device_state(device.name)
        if state is None:
            return None
        if state.kind == control.link_kind:
            device.index = state.index
            if config is None:
                config = await control.read(device.name)
        else:
            config = None
        attrs = WireguardAttrs(config.listen_port, config.public_key) if config else None
        return replace(state, wireguard=attrs)

    async def _observe_devices(self, nl: Kernel) -> dict[str, DeviceState | None]:
        return {d.name: await self._device_state(nl, d) for d in self._devices}

    async def _converge_devices(self, nl: Kernel, *, repair: bool = False) -> bool:
        changed = False
        for device, own in self._with_own(self._own_subnet, self._own_ipv6):
            changed = await self._converge(nl, device, own, repair=repair) or changed
        return changed

    async def _converge(self, nl: Kernel, device: WgDevice, own: Network | None, *,
                        repair: bool) -> bool:
        """Make one device what its spec says: adopt, set in place, or make it anew."""
        control = await self._driver(nl)
        state = await self._device_state(nl, device)
        spec = self._device_spec(device, own)
        differences = compare_device(spec, state)
        changed = False
        if needs_recreate(differences):
            state = await self._create(nl, control, device, state, differences)
            differences = compare_device(spec, state)
            changed = True
        assert state is not None

        async def set_wireguard(difference: DeviceDifference) -> bool:
            if difference.fix != SET_WIREGUARD:
                return False
            assert self._key is not None
            await control.write(device.name, DeviceWrite(private_key=self._key.raw,
                                                          listen_port=device.listen_port))
            if difference.what == "public key" and difference.have is not None:
                # A new key on a device that had one: its sessions end here (a rotation).
                log.info("%s now has public key %s (was %s)", device.name, difference.want,
                         difference.have)
            return True

        return await fix_in_place(nl, state, spec, differences, repair=repair,
                                  other=set_wireguard) or changed

    async def _create(self, nl: Kernel, control: WireguardControl, device: WgDevice,
                      state: DeviceState | None, differences: list[DeviceDifference]
                      ) -> DeviceState:
        if state is not None:
            log.warning("recreating %s: %s", device.name, "; ".join(d.text for d in differences))
            await nl.delete_link(state.index)
        else:
            log.info("creating %s (%s, port %d, MTU %d)", device.name, control.name,
                     device.listen_port, device.mtu)
        await control.create(device.name)
        created = await self._device_state(nl, device)
        if created is None:
            raise DataPlaneError(f"WireGuard device {device.name} vanished right after it "
                                 "was created")
        return created

    async def _ensure_ready(self, nl: Kernel) -> bool:
        if not self._devices[0].index:
            return False  # not prepared yet: nothing to repair
        return await self._converge_devices(nl, repair=True)

    # -- plan --------------------------------------------------------------------------

    def _plan_peer(self, peer: Peer) -> frozenset[KernelObject]:
        v4, *v6 = self._devices
        if not v4.index:
            return frozenset()  # no device (not prepared, or doctor found none)
        return wireguard.plan_peer(peer, self._options, ipv6=bool(v6 and v6[0].index))

    def _own_objects(self) -> frozenset[KernelObject]:
        """Per device, the route to the whole network of its family (flannel's)."""
        network = self._settings.network
        return frozenset(
            Route(network.ipv6_network if d.ipv6 else network.network,  # type: ignore[arg-type]
                  None, d.index, scope=RT_SCOPE_LINK)
            for d in self._devices if d.index)

    async def _scan(self, nl: Kernel, known: Known) -> list[KernelObject]:
        found: list[KernelObject] = []
        found += await self._scan_routes(nl, known)
        control = await self._driver(nl)
        for device in self._devices:
            config = await control.read(device.name) if device.index else None
            if config is not None:
                found += (obj for obj in config.objects() if not known(obj._ident))
        return found

    # -- programming -------------------------------------------------------------------

    async def _program(self, nl: Kernel, changes: PlanDiff
                       ) -> tuple[list[KernelObject], list[KernelObject], list[Failure]]:
        """rtnetlink's objects as every backend's; the peers in one write per device."""
        routes = PlanDiff(*(tuple(o for o in objs if not isinstance(o, WIREGUARD_OBJECTS))
                            for objs in changes))
        removed, added, failures = await super()._program(nl, routes)
        control = await self._driver(nl)
        for device in self._devices:
            add = [o for o in changes.to_add
                   if isinstance(o, WIREGUARD_OBJECTS) and o.device == device.name]
            remove = [o for o in changes.to_remove
                      if isinstance(o, WIREGUARD_OBJECTS) and o.device == device.name]
            if not add and not remove:
                continue
            try:
                await self._write_peers(control, device.name, add, remove)
            except DataPlaneError as exc:
                failures += [Failure(Action.REPLACE, o, exc) for o in add]
                failures += [Failure(Action.REMOVE, o, exc) for o in remove]
            else:
                added += add
                removed += remove
        return removed, added, failures

    async def _write_peers(self, control: WireguardControl, device: str,
                           add: Sequence[KernelObject], remove: Sequence[KernelObject]) -> None:
        """One write of a device's peer changes (and, after priming, a second)."""
        replaced = any(isinstance(o, WgPeer) for o in remove)
        prime = frozenset(o.public_key for o in add if isinstance(o, WgPeer)) \
            if replaced or self._events else frozenset()
        taken = any(isinstance(o, AllowedIP) for o in remove)
        current = await control.read(device) if taken else None
        ops = updates(add, remove, current=current, prime=prime)
        await control.write(device, DeviceWrite(peers=tuple(ops)))
        primed = restore_keepalive(ops)
        if primed:
            await control.write(device, DeviceWrite(peers=tuple(primed)))

    # -- drift -----------------------------------------------------------------------

    def _drift_kind(self, event: NetlinkEvent) -> str | None:
        kind = super()._drift_kind(event)
        if kind is not None or event.kind != "link":
            return kind
        for device in self._devices:
            index = device.index
            if index and (event.ifindex == index or event.ifname == device.name) and (
                    event.deleted or event.up is False or event.ifindex != index):
                return "device"
        return None

    def _watchers(self) -> list[Coroutine[Any, Any, None]]:
        return [self._watch_peers()]

    async def _watch_peers(self) -> None:
        """Read the devices' peers every PEER_CHECK_SECONDS; queue what differs."""
        while True:
            await asyncio.sleep(PEER_CHECK_SECONDS)
            if not self._synced:
                continue
            try:
                async with self._lock:
                    await self._check_peers(await self._netlink())
            except DataPlaneError as exc:
                log.debug("WireGuard peer check failed: %s", exc)
                self._work.full = True
                self._wake.set()

    async def _check_peers(self, nl: Kernel) -> None:
        control = await self._driver(nl)
        wanted: dict[str, set[KernelObject]] | None = None  # the plan's, when first needed
        for device in self._devices:
            snap = await control.snapshot(device.name) if device.index else None
            if snap is not None and self._found_clean.get(device.name) == snap.fingerprint:
                continue  # as found last time, which was as planned: no parse, no compare
            config = snap.config if snap is not None else None
            if config is None or config.listen_port != device.listen_port or (
                    self._key is not None and config.public_key != self._key.public_key):
                self._work.full = True  # the device itself: set right or made anew
                self._wake.set()
                continue
            if wanted is None:
                wanted = {d.name: set() for d in self._devices}
                for obj in self.planned():
                    if isinstance(obj, WIREGUARD_OBJECTS) and obj.device in wanted:
                        wanted[obj.device].add(obj)
            to_add, to_remove = diff(wanted[device.name], config.objects())
            if to_remove:
                self._work.full = True
            self._work.repairs.update(to_add)
            if to_add or to_remove:
                log.debug("WireGuard drift on %s: %d to restore, %d not ours", device.name,
                          len(to_add), len(to_remove))
                self._wake.set()
            elif snap is not None:
                self._found_clean[device.name] = snap.fingerprint

    async def _apply(self, nl: Kernel, changes: PlanDiff, *, repair: bool,
                     peers: Mapping[IPv4Network, Peer] | None = None,
                     decided: Iterable[IPv4Network] | None = ()) -> list[Failure]:
        self._found_clean.clear()
        return await super()._apply(nl, changes, repair=repair, peers=peers, decided=decided)

