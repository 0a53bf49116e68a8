"""The agent's kernel side: the data plane (a backend, `DataPlane`) and every address
family's traffic rules (their keepers), programmed together for the peers.

One lock (`Plane.lock`) is held while either is programmed or replaced. The
traffic rules come first: their peer filter admits a peer before its routes
exist, so its VXLAN traffic is never dropped. A rebuild's replaced backend is
kept aside (`leaving`) while peers still run its type and removed
--peer-hold-time after none does (make before break, docs/architecture.md,
"Config changes"); at start, the devices of ours the backend does not use (an
agent stopped within such a hold left them) are kept the same way
(leaseagent.dataplane.kept).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from ipaddress import IPv4Network

from leaseagent.agent.leasing import OwnLease
from leaseagent.agent.supervision import Tasks
from leaseagent.config import AgentConfig
from leaseagent.core.leases import Peer, PeerChanges
from leaseagent.core.network import Address, NetworkConfig
from leaseagent.core.rules import PeerAdmission, Ruleset, receive_ports, ruleset
from leaseagent.dataplane.base import BackendAttrs, DataPlane, DataPlaneSettings, HostInfo
from leaseagent.dataplane.firewall import Firewall, RulesKeeper
from leaseagent.dataplane.kept import KeptDevices
from leaseagent.errors import ConfigError, DataPlaneError
from leaseagent.metrics import Metrics

log = logging.getLogger("leaseagent")

Peers = Mapping[IPv4Network, Peer]
Backends = Mapping[str, Callable[[DataPlaneSettings], DataPlane]]
Firewalls = Callable[[bool, int], Firewall]  # (nftables, family) -> a firewall


@dataclass(frozen=True)
class FamilyRules:
    """One address family's traffic rules: their keeper, and which peers the peer filter
    admits (leaseagent.core.rules.PeerAdmission, kept per change)."""

    family: int
    keeper: RulesKeeper
    admission: PeerAdmission
    nftables: bool = False  # which tool the keeper writes with


def device_names(backend: DataPlane | KeptDevices) -> set[str]:
    """The names of the devices `backend` wants (none for host-gw and alloc)."""
    return {device.name for device in backend.spec(None, {}).devices}


class Plane:
    def __init__(self, cfg: AgentConfig, network: NetworkConfig, host: HostInfo, *,
                 metrics: Metrics, tasks: Tasks, backends: Backends,
                 firewalls: Firewalls) -> None:
        self._cfg = cfg
        self._metrics = metrics
        self._tasks = tasks
        self._backends = backends
        self._firewalls = firewalls
        self.lock = asyncio.Lock()  # held while the backend or the rules are programmed
        self.rules: list[FamilyRules] = []  # per address family in use
        self.use_network(network)
        self.backend = self.new_backend(network, host)
        self.install_rules(self.traffic_rules(network))
        # The backend a rebuild replaced, its devices kept while peers still run its type
        # (at start: the devices of ours the backend does not use, `prepare`).
        self.leaving: DataPlane | KeptDevices | None = None
        self._leaving_timer: asyncio.Future[None] | None = None  # its removal, when due
        self._foreign = 0  # peers of another backend type, as last reported
        self._own: OwnLease | None = None  # this host's lease, as last programmed

    # --- what the network config asks for ------------------------------------------------

    def use_network(self, network: NetworkConfig) -> None:
        """Program for `network` from now on (the rules' tool)."""
        self.network = network
        self.traffic = replace(self._cfg.traffic, nftables=network.enable_nftables)

    def filter_ports(self) -> tuple[int, ...]:
        """The VXLAN ports the peer filter guards: each port a device of the backend, or
        of the one a rebuild replaced and keeps (`leaving`), receives on."""
        kept = (self.backend, self.leaving) if self.leaving is not None else (self.backend,)
        return receive_ports(d for b in kept for d in b.spec(None, {}).devices)

    async def prepare(self) -> BackendAttrs:
        """At start: the backend prepared, and the devices of ours it does not use taken
        over as kept (`leaving`, leaseagent.dataplane.kept): a rebuild's, left by an agent
        stopped within its hold, guarded and removed --peer-hold-time after no peer runs
        another type (`finish_rollout`), as if the rebuild had just been made; one that
        would block a device the backend wants takes its name back first (or is removed,
        `DataPlane.clear_the_way`). A device not there yet is made by the first sync,
        after the lease (`DataPlane.prepare`)."""
        backend = self.backend
        await backend.clear_the_way()
        attrs = await backend.prepare(devices_at_sync=True)
        self.leaving = await backend.take_over(lambda: device_names(self.backend))
        return attrs

    def new_backend(self, network: NetworkConfig, host: HostInfo) -> DataPlane:
        """A data plane of `network`'s backend type for `host`, its status exported."""
        cfg = self._cfg
        settings = DataPlaneSettings(
            network=network, host=host, state_dir=cfg.state_dir,
            route_protocol=cfg.route_protocol, resync_seconds=cfg.resync_interval,
            hold_seconds=cfg.peer_hold_time)
        backend = self._backends[network.backend_type](settings)
        self._metrics.export_dataplane(backend.status)
        return backend

    def traffic_rules(self, network: NetworkConfig,
                      running: Iterable[FamilyRules] = ()) -> list[FamilyRules]:
        """A keeper of the traffic rules per family the network uses (none for alloc: it
        has no data path): a `running` one where it writes with the same tool, else a new
        one. ConfigError when a program they need is missing."""
        if not network.profile.data_path:
            return []
        nftables = network.enable_nftables
        reuse = {(r.nftables, r.family): r for r in running}
        out = []
        for family in (4, 6) if network.ipv6 is not None else (4,):
            rules = reuse.get((nftables, family))
            if rules is None:
                fw = self._firewalls(nftables, family)
                keeper = RulesKeeper(
                    fw, check_seconds=None if fw.watches() else self._cfg.iptables_resync)
                rules = FamilyRules(family, keeper, PeerAdmission(family), nftables)
            out.append(rules)
        return out

    def install_rules(self, rules: list[FamilyRules]) -> None:
        """Keep `rules` from now on, their status exported (a family gone is no longer)."""
        for gone in {r.family for r in self.rules} - {r.family for r in rules}:
            self._metrics.drop_rules(gone)
        for r in rules:
            self._metrics.export_rules(r.keeper.status, family=r.family)
        self.rules = rules

    def _ruleset(self, rules: FamilyRules, peers: Iterable[Address], own: OwnLease) -> Ruleset:
        """Everything `rules`' family wants, `peers` admitted."""
        network, own_subnet = (
            (self.network.network, own.subnet) if rules.family == 4
            else (self.network.ipv6_network, own.ipv6_subnet))
        if network is None:
            raise ConfigError(f"IPv{rules.family} traffic rules without an IPv{rules.family} "
                              "network in the config")
        return ruleset(self.traffic, network=network, own_subnet=own_subnet,
                       vxlan_ports=self.filter_ports(), peers=peers)

    # --- programming the peers -----------------------------------------------------------

    def spawn(self, get_peers: Callable[[], Peers]) -> None:
        """Run the backend's own task (resync, drift repair) as the supervised "dataplane"."""
        self._tasks.spawn("dataplane", self.backend.run(get_peers))

    async def stop(self) -> None:
        """Stop the backend's task (its kernel state stays)."""
        await self._tasks.stop("dataplane")

    def read_rules_ahead(self) -> None:
        """Start reading every family's traffic rules now (at start, while the lease is
        acquired): the first `program_all` compares with those readings
        (RulesKeeper.read_ahead)."""
        for rules in self.rules:
            rules.keeper.read_ahead()

    def spawn_rules(self, rules: Iterable[FamilyRules]) -> None:
        for r in rules:
            self._tasks.spawn(f"rules-ipv{r.family}", r.keeper.run())

    async def program_all(self, peers: Peers, own: OwnLease) -> None:
        """Every family's traffic rules and the data plane for the whole peer set, the
        peer sets first (their filter admits before routes exist): the rules' processes
        run while the data plane plans and reads the kernel, and it changes nothing
        before every family's peer set is filled (`ready`); the chains (iptables) are
        written beside the programming, which this waits for too. Under `lock`."""
        self._own = own
        admitted = [asyncio.Event() for _ in self.rules]
        syncs = asyncio.gather(*(
            rules.keeper.sync(self._ruleset(rules, rules.admission.reset(peers.values()), own),
                              admitted=event.set)
            for rules, event in zip(self.rules, admitted, strict=True)))
        # One pass of the loop first: the rules' processes start now, and run while the
        # data plane plans (which takes the loop for as long: ~0.1 s at 5,000 peers).
        await asyncio.sleep(0)
        try:
            await self.backend.sync(peers, ready=asyncio.gather(*(e.wait() for e in admitted)))
        finally:
            await syncs

    async def peers_changed(self, changes: PeerChanges, peers: Peers, own: OwnLease, *,
                            full: bool, started: float) -> None:
        """Program `changes` (`full`: the whole set again, after a listing)."""
        async with self.lock:
            if full:
                await self.program_all(peers, own)
            elif not changes.added and not changes.changed:
                # Only removals (a mass expiry): the kernel's objects first, then the peer
                # filter's retirement (admitting before the routes is what matters; a
                # gone peer's traffic has nowhere to go either way). Its thousands of
                # address lookups, and a rules check holding the keeper, are not ahead
                # of the kernel's work.
                try:
                    await self.backend.update(changes, peers)
                finally:
                    await asyncio.gather(*(
                        rules.keeper.update_peers(*rules.admission.apply(changes))
                        for rules in self.rules))
                self._metrics.peer_programming_seconds.observe(time.perf_counter() - started)
            else:
                # The peer filter admits a new peer before its routes exist: never a
                # window where its VXLAN traffic is dropped. Both families at once, their
                # processes running while the data plane plans (`ready`).
                await self.backend.update(changes, peers, ready=asyncio.gather(*(
                    rules.keeper.update_peers(*rules.admission.apply(changes))
                    for rules in self.rules)))
                self._metrics.peer_programming_seconds.observe(time.perf_counter() - started)

    async def replace_rules(self, rules: list[FamilyRules]) -> None:
        """Keep `rules`: a keeper no longer wanted is stopped and its rules removed (IPv6
        turned off, nftables for iptables, alloc), a new one started. Under `lock`."""
        for old in self.rules:
            if old not in rules:
                await self._tasks.stop(f"rules-ipv{old.family}")
                try:
                    await old.keeper.fw.remove()
                except (ConfigError, DataPlaneError) as exc:
                    log.warning("could not remove the %s%s traffic rules: %s",
                                old.keeper.fw.family.shown, old.keeper.fw.name, exc)
        started = [r for r in rules if r not in self.rules]
        self.install_rules(rules)
        self.spawn_rules(started)

    # --- a rebuild's roll-out ------------------------------------------------------------

    async def follow_rollout(self) -> None:
        """After peers changed: say how a rebuild's roll-out goes, end it when it is over."""
        self.report_rollout()
        await self.finish_rollout()

    def report_rollout(self) -> None:
        """Say when peers start or stop running another backend type than this host (a
        rebuild rolling out: they are not programmed meanwhile, what the kernel has for
        them is kept; the data plane names each one and counts them,
        `DataPlaneStatus.foreign_peers`)."""
        foreign = self.backend.status.foreign_peers
        if (foreign > 0) == (self._foreign > 0):
            self._foreign = foreign
            return
        if foreign:
            log.info("backend roll-out: %d peer(s) run another backend type (or VNI) than "
                     "this host's %s: reached the old way, where this host had programmed "
                     "them, until they switch", foreign, self.network.backend_type)
        else:
            log.info("backend roll-out over: every peer runs %s", self.network.backend_type)
        self._foreign = foreign

    async def finish_rollout(self) -> None:
        """Remove the devices of the backend a rebuild replaced once no peer runs another
        type than ours, --peer-hold-time later: every route of ours through them has been
        replaced by then, and a peer that has not yet read our new lease (or its VNI) goes
        on sending through them meanwhile."""
        if (self.leaving is not None and not self.backend.status.foreign_peers
                and self._leaving_timer is None):
            self._leaving_timer = asyncio.ensure_future(self._drop_leaving_later(self.leaving))

    async def stop_leaving_timer(self) -> None:
        timer, self._leaving_timer = self._leaving_timer, None
        if timer is not None:
            timer.cancel()
            await asyncio.gather(timer, return_exceptions=True)

    async def _drop_leaving_later(self, leaving: DataPlane | KeptDevices) -> None:
        try:
            await asyncio.sleep(self._cfg.peer_hold_time)
            async with self.lock:
                if self.leaving is leaving and not self.backend.status.foreign_peers:
                    await self.drop_leaving()
                    await self._guard_ports()  # its port's rule goes with it
        except (ConfigError, DataPlaneError) as exc:
            log.warning("could not remove the replaced backend's devices: %s", exc)
        finally:
            if self._leaving_timer is asyncio.current_task():
                self._leaving_timer = None

    async def drop_leaving(self) -> None:
        """The replaced backend's devices removed (what is on them goes with them)."""
        leaving, self.leaving = self.leaving, None
        if leaving is None:
            return
        try:
            if not device_names(leaving) & device_names(self.backend):
                await leaving.remove(objects=False)
        finally:
            await leaving.close()

    async def _guard_ports(self) -> None:
        """The rules again when the ports the peer filter guards changed (a kept device
        removed: its port's rule goes), the peers as admitted. Not within a config
        change (it drops a kept device before its new one is made: its `program_all`
        follows, no rules written in between)."""
        own = self._own
        if own is None:
            return
        for rules in self.rules:
            held = rules.keeper.wanted
            wanted = self._ruleset(rules, rules.admission.addresses(), own)
            if held is not None and held.rules != wanted.rules:
                await rules.keeper.sync(wanted)

    async def retire(self, old: DataPlane, *, rebuild: bool) -> None:
        """Done with `old` (a stopped data plane `backend` replaces): for a rebuild its
        kernel objects and devices removed first (a device of the same name the new one
        wants is put back by the new one's prepare)."""
        if rebuild:
            await old.remove()
            if device_names(old) & device_names(self.backend):
                await self.backend.prepare()
        await old.close()

    async def close(self) -> None:
        """Stop without touching kernel state (the backend and a replaced one closed)."""
        await self.stop_leaving_timer()
        for backend in (self.backend, self.leaving):
            if backend is not None:
                with contextlib.suppress(Exception):  # stopping goes on
                    await backend.close()
