"""The daemon: a straight start-up line, then a few supervised tasks.

    connect to etcd -> wait for a valid <prefix>/config -> resolve this host
    -> backend.prepare() (device, VtepMAC, MTU) -> acquire the lease
    -> write subnet.env -> backend.start(subnet) -> first complete list
    -> backend.sync(peers) -> READY=1
    then tasks: hold (keepalive, take back a lost lease), watch (peers),
    backend.run (resync, drift repair), the traffic rules' keepers, config
    (follow <prefix>/config and apply its changes), watchdog; the first task
    to fail stops the agent with a clear message and exit status 1.

A network config change is applied by `apply_config` (docs/architecture.md,
"Config changes"): a new backend instance on the new settings (for a rebuild
built beside the old one, whose devices go once no peer runs its type; the old
one's objects removed first only if the two share a device), the lease fitted by the holder
task (the one writer of our key), subnet.env, the traffic rules' keepers,
then every lease judged again under the new config. What this host cannot
run is refused and the last good config put back.

Faults (docs/architecture.md, "Fault rules"): etcd unreachable leaves the
kernel as it is and is retried with capped jittered backoff
(leaseagent.retrying), logged once per state change; stopping never removes
kernel state; --release-on-exit revokes the lease.

Readiness (/readyz, READY=1, STATUS=) is decided from state, in one place
(`not_ready_reason`): the lease held, subnet.env written, the first complete
listing applied, the data plane's own status (`backend.status.in_sync`) and
every family's traffic rules in place (a rule that cannot be written names
the command and what the tool or kernel said). READY=1 is sent the first
time all of that holds, not merely once the start-up line is done; from then
on STATUS= tells the current state and peer count (`_report`). Metrics are
exported from the same state.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace

from leaseagent import __version__
from leaseagent.agent.etcdhealth import EtcdHealth
from leaseagent.agent.filewriting import FILES, FileWriter
from leaseagent.agent.holder import LeaseHolder
from leaseagent.agent.leasing import CANDIDATES_PER_TXN, Leasing, OwnLease
from leaseagent.agent.logs import StateLog, set_context
from leaseagent.agent.netconfig import (
    IGNORED_REASONS,
    ConfigFollower,
    wait_for_network_config,
)
from leaseagent.agent.notify import sd_notify, watchdog_interval
from leaseagent.agent.readiness import FamilyRules, Readiness, not_ready_reason
from leaseagent.agent.supervision import Tasks
from leaseagent.agent.watching import RELIST_REASONS, LeaseWatcher
from leaseagent.config import AgentConfig
from leaseagent.core.allocation import Chooser, candidates
from leaseagent.core.configchange import CLASSES, REBUILD, ConfigChange, classify
from leaseagent.core.leases import (
    REASONS,
    KeyLayout,
    LeaseValue,
    Peer,
    PeerChanges,
    unusable_ip_reason,
)
from leaseagent.core.monitoring import MetricsTarget, published_address
from leaseagent.core.network import NetworkConfig, host_overlap
from leaseagent.core.profiles import BACKEND_TYPES
from leaseagent.core.rules import PeerAdmission, Ruleset, ruleset
from leaseagent.core.subnetenv import (
    previous_ipv6_subnet,
    previous_subnet,
)
from leaseagent.dataplane import BACKENDS
from leaseagent.dataplane.base import BackendAttrs, DataPlane, DataPlaneSettings, HostInfo
from leaseagent.dataplane.firewall import Firewall, RulesKeeper, firewall
from leaseagent.errors import (
    ConfigError,
    DataPlaneError,
    StoreError,
    StoreUnavailable,
    SubnetsExhausted,
)
from leaseagent.files import (
    check_writable,
    exposure,
    read_text_if_exists,
    refuse_non_regular,
    refuse_symlink,
)
from leaseagent.metrics import Metrics, zero
from leaseagent.retrying import retrying
from leaseagent.store.base import OPERATIONS, EventType, LeaseStore
from leaseagent.store.settings import check_credential_files
from leaseagent.waiting import first_to_end, within

log = logging.getLogger("leaseagent")

RELEASE_SECONDS = 10.0  # how long --release-on-exit keeps trying to release the lease


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


def _device_names(backend: DataPlane) -> set[str]:
    """The names of the devices `backend` wants (none for host-gw and alloc)."""
    return {device.name for device in backend.spec(None, {}).devices}


class Agent:
    def __init__(
        self,
        cfg: AgentConfig,
        store: LeaseStore,
        *,
        metrics: Metrics | None = None,
        notify: Callable[[str], object] = sd_notify,
        host: HostInfo | None = None,
        rng: random.Random | None = None,
        backends: Mapping[str, Callable[[DataPlaneSettings], DataPlane]] | None = None,
        firewalls: Callable[[bool, int], Firewall] | None = None,
        choose: Chooser = candidates,
        candidates_per_txn: int = CANDIDATES_PER_TXN,
    ) -> None:
        self.cfg = cfg
        # The allocation policy (Leasing's): the cluster benchmark swaps in flannel's.
        self._choose, self._per_txn = choose, candidates_per_txn
        # Backend type -> constructor; tests inject e.g. a recording data plane.
        self._backends = BACKENDS if backends is None else backends
        # (nftables, family) -> a firewall; tests that run agents in their own process,
        # outside any namespace of theirs, inject one that keeps the rules in memory.
        self._firewalls = firewalls or (
            lambda nftables, family: firewall(nftables=nftables, family=family))
        self.store = store
        self.metrics = metrics or Metrics()
        self.metrics.export_readiness(lambda: self.not_ready_reason() is None)
        m = self.metrics
        zero(m.watch_events, "type", (t.value for t in EventType))
        zero(m.relists, "reason", RELIST_REASONS)
        zero(m.invalid_leases, "reason", (r for r in REASONS if r != "released"))
        zero(m.etcd_request_seconds, "operation", OPERATIONS)
        zero(m.config_changes, "class", CLASSES)
        zero(m.config_ignored, "reason", IGNORED_REASONS)
        zero(m.file_write_failures, "file", FILES)
        zero(m.file_repairs, "file", FILES)
        for backend_name in BACKEND_TYPES:
            m.peers.labels(backend=backend_name).set(0)
        self._notify = notify
        self._host = host
        self._rng = rng or random.Random()
        self.readiness = Readiness(self, notify)
        self.states = StateLog(log, on_change=self.readiness.on_state_change)
        self.files = FileWriter(cfg, metrics=self.metrics, states=self.states)
        self.layout = KeyLayout(cfg.prefix)
        self.holder: LeaseHolder | None = None  # once a lease is acquired
        self.etcd = EtcdHealth(store, probe_key=self.layout.config_key, states=self.states,
                               metrics=self.metrics, on_recovered=self._etcd_recovered)
        self.network: NetworkConfig | None = None
        self.backend: DataPlane | None = None
        # Traffic rules per address family in use (leaseagent.dataplane.firewall).
        self.rules: list[FamilyRules] = []
        self.traffic = cfg.traffic
        self.vxlan_port: int | None = None
        self.watcher: LeaseWatcher | None = None
        self.mtu = 0
        # Held while the backend or the traffic rules are programmed or replaced.
        self._plane = asyncio.Lock()
        # The supervised tasks (run); a config change replaces some of them.
        self.tasks = Tasks()
        self.config_revision = 0  # etcd revision of the network config in force
        self._foreign = 0  # peers of another backend type, as last reported
        # The backend a rebuild replaced, its devices kept while peers still run its type
        # (make before break: `_switch`, `_finish_rollout`).
        self._leaving: DataPlane | None = None
        self._leaving_timer: asyncio.Future[None] | None = None  # its removal, when due

    # --- the lease holder's state, as the rest of the agent reads it -------------

    @property
    def own(self) -> OwnLease | None:
        return self.holder.own if self.holder is not None else None

    @property
    def leasing(self) -> Leasing | None:
        return self.holder.leasing if self.holder is not None else None

    @property
    def lease_held(self) -> bool:
        return self.holder is not None and self.holder.held

    @property
    def conflict(self) -> str | None:
        """Why the lease is given up, while another agent has this host's identity."""
        return self.holder.conflict if self.holder is not None else None

    @property
    def subnet_env_written(self) -> bool:
        return self.files.written

    def not_ready_reason(self) -> str | None:
        """Why the agent is not ready (None: it is; leaseagent.agent.readiness)."""
        return not_ready_reason(self)

    def _etcd_recovered(self) -> None:
        if self.watcher is not None:
            # A stream that lived through the outage may be half-open: list again.
            self.watcher.request_relist("etcd_recovered")

    # --- readiness, for /readyz --------------------------------------------------

    def _traffic_rules(self, network: NetworkConfig,
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
                    fw, check_seconds=None if fw.watches() else self.cfg.iptables_resync)
                rules = FamilyRules(family, keeper, PeerAdmission(family), nftables)
            out.append(rules)
        return out

    def _use_network(self, network: NetworkConfig) -> None:
        """Make `network` the config the agent works with, and what depends on it alone."""
        self.network = network
        self.traffic = replace(self.cfg.traffic, nftables=network.enable_nftables)
        self.vxlan_port = network.profile.peer_filter_port(network.options)

    def _ruleset(self, rules: FamilyRules, peers: Iterable[Peer]) -> Ruleset:
        """Everything `rules`' family wants (the whole peer set counted again)."""
        assert self.network is not None and self.own is not None
        network, own_subnet = (
            (self.network.network, self.own.subnet) if rules.family == 4
            else (self.network.ipv6_network, self.own.ipv6_subnet))
        assert network is not None
        return ruleset(self.traffic, network=network, own_subnet=own_subnet,
                       vxlan_port=self.vxlan_port, peers=rules.admission.reset(peers))

    # --- start-up ------------------------------------------------------------------

    async def start(self) -> tuple[LeaseHolder, LeaseWatcher]:
        """The start-up line (see the module's docstring), up to the lease watcher: the
        lease holder and the watcher, for `run` to start."""
        cfg = self.cfg
        # Before anything is taken in etcd (preflight ran before etcd was asked anything
        # when started by main; tests may start an Agent directly).
        self.files.refuse_planted_paths()
        network, self.config_revision = await wait_for_network_config(
            self.store, self.layout, self.states, backends=self._backends)
        self._use_network(network)
        self.metrics.config_revision.set(self.config_revision)
        log.info("network %s, /%d subnets in %s-%s, backend %s", network.network,
                 network.subnet_len, network.subnet_min, network.subnet_max, network.backend_type)
        host = await resolve_host(cfg, network, self._host)
        if network.profile.data_path and unusable_ip_reason(host.public_ip):
            raise ConfigError(f"PublicIP {host.public_ip} is {unusable_ip_reason(host.public_ip)}: "
                              f"peers would refuse it (--allow-any-public-ip is for alloc only)")
        log.info("leaseagent %s: backend %s, interface %s, PublicIP %s%s, node id %s, etcd %s",
                 __version__, network.backend_type, host.iface or "-", host.public_ip,
                 f", PublicIPv6 {host.public_ipv6}" if network.ipv6 is not None else "",
                 cfg.node_id, cfg.etcd.endpoints)
        set_context(public_ip=host.public_ip, node_id=cfg.node_id)
        self.metrics.set_identity(public_ip=str(host.public_ip), node_id=cfg.node_id,
                                  backend=network.backend_type)
        self._host = host
        self.backend = backend = self._new_backend(network, host)
        self._install_rules(self._traffic_rules(network))
        attrs = await backend.prepare()
        self.mtu = attrs.mtu
        leasing = Leasing(
            self.store, layout=self.layout, network=network,
            value=self._lease_value(network, host, attrs), ttl=cfg.lease_ttl,
            metrics=self.metrics, rng=self._rng, choose=self._choose,
            candidates_per_txn=self._per_txn)
        old_env = read_text_if_exists(cfg.subnet_file) or ""
        self.readiness.status(f"acquiring a lease in {network.network}")
        own: OwnLease = await retrying(on_retry=self.etcd.down)(
            leasing.acquire, keep_listing=True, previous=previous_subnet(old_env),
            previous_ipv6=previous_ipv6_subnet(old_env))
        self.etcd.up()
        self.holder = holder = LeaseHolder(
            own, leasing, self.store, etcd=self.etcd, metrics=self.metrics, states=self.states,
            adopt=self._adopt, status=self.readiness.status, renew_margin=cfg.renew_margin)
        await holder.take(own, first=True)
        await self._publish_metrics_target(host)
        self.watcher = LeaseWatcher(
            self.store, layout=self.layout, network=network,
            own_public_ip=host.public_ip, own_key=lambda: holder.own.key,
            metrics=self.metrics, on_peers=self._on_peers,
            # The watch is often the first to find etcd gone (renewals may be hours apart).
            on_unavailable=self.etcd.down, on_listed=lambda: self.etcd.up(listed=True),
            on_own=holder.own_key_seen, node_id=cfg.node_id, on_twin=holder.twin_seen,
            hold_seconds=cfg.peer_hold_time, first=leasing.take_listing())
        return holder, self.watcher

    async def _publish_metrics_target(self, host: HostInfo) -> None:
        """Say in etcd where this agent's /metrics is, for `leasectl prometheus-targets`
        (leaseagent.core.monitoring): written only when it differs; a stale entry of
        this node is removed when the address is not one another host could scrape."""
        cfg = self.cfg
        key = self.layout.metrics_key(cfg.node_id)
        address = (published_address(*cfg.metrics_addr, host.public_ip)
                   if cfg.metrics_addr is not None else None)
        value = (MetricsTarget(node_id=cfg.node_id, address=address,
                               public_ip=str(host.public_ip)).encode()
                 if address is not None else None)
        try:
            async for attempt in retrying(on_retry=self.etcd.down):
                with attempt:
                    current = await self.store.get(key)
                    if value is not None and (current is None or current.value != value):
                        await self.store.put(key, value)
                        log.info("metrics address %s published at %s", address, key)
                    elif value is None and current is not None:
                        await self.store.delete(key, mod_revision=current.mod_revision)
                        log.info("metrics address no longer published (%s is not reachable "
                                 "from other hosts): %s deleted", "--metrics-addr", key)
        except StoreError as exc:  # e.g. an etcd role that only grants <prefix>/subnets/
            log.warning("metrics address not published at %s: %s (Prometheus discovery "
                        "will not find this host)", key, exc)

    async def _withdraw_metrics_target(self) -> None:
        """This host leaves on purpose (--release-on-exit): it is no longer a target."""
        with contextlib.suppress(StoreUnavailable):
            await self.store.delete(self.layout.metrics_key(self.cfg.node_id))

    def _new_backend(self, network: NetworkConfig, host: HostInfo) -> DataPlane:
        """A data plane of `network`'s backend type for `host`, its status exported."""
        cfg = self.cfg
        settings = DataPlaneSettings(
            network=network, host=host, state_dir=cfg.state_dir,
            route_protocol=cfg.route_protocol, resync_seconds=cfg.resync_interval)
        backend = self._backends[network.backend_type](settings)
        self.metrics.export_dataplane(backend.status)
        return backend

    def _lease_value(self, network: NetworkConfig, host: HostInfo, attrs: BackendAttrs
                     ) -> LeaseValue:
        """What this host publishes in its lease under `network`."""
        return LeaseValue(public_ip=host.public_ip, backend_type=attrs.backend_type,
                          backend_data=dict(attrs.backend_data), node_id=self.cfg.node_id,
                          public_ipv6=host.public_ipv6 if network.ipv6 is not None else None,
                          backend_v6_data=dict(attrs.backend_v6_data))

    def _install_rules(self, rules: list[FamilyRules]) -> None:
        """Keep `rules` from now on, their status exported (a family gone is no longer)."""
        for gone in {r.family for r in self.rules} - {r.family for r in rules}:
            self.metrics.drop_rules(gone)
        for r in rules:
            self.metrics.export_rules(r.keeper.status, family=r.family)
        self.rules = rules

    async def _adopt(self, own: OwnLease, first: bool, changed: bool) -> None:
        """Adopt the lease the holder took: subnet.env, the backend's own address,
        metrics, one log line (`first`: at start; `changed`: another key than before)."""
        assert self.network is not None and self.backend is not None
        self.files.lease(self.network, own, self.mtu, first=first)
        await self.backend.start(own.subnet, own_ipv6=own.ipv6_subnet)
        set_context(subnet=own.subnet)
        self.metrics.set_lease(subnet=str(own.subnet))
        if first or changed:
            log.info("lease held: %s%s (%s)%s; subnet.env written to %s", own.subnet,
                     f" and {own.ipv6_subnet}" if own.ipv6_subnet else "", own.how,
                     "" if own.reservation else f", ttl {own.ttl}s", self.cfg.subnet_file)
        if changed and self.watcher is not None:
            self.watcher.request_relist("own_subnet_changed")

    async def _on_peers(self, changes: PeerChanges, full: bool, started: float) -> None:
        assert self.backend is not None and self.watcher is not None
        peers = self.watcher.peers
        async with self._plane:
            if full:
                await self._program_all()
            else:
                # The peer filter admits a new peer before its routes exist: never a
                # window where its VXLAN traffic is dropped. Both families at once, their
                # processes running while the data plane plans (`ready`).
                await self.backend.update(changes, peers, ready=asyncio.gather(*(
                    rules.keeper.update_peers(*rules.admission.apply(changes))
                    for rules in self.rules)))
                self.metrics.peer_programming_seconds.observe(time.perf_counter() - started)
        self._log_peer_changes(changes, len(peers))
        self._report_rollout()
        await self._finish_rollout()
        if self.readiness.reporting:
            self.readiness.report()  # the peer count in STATUS= at once

    async def _program_all(self) -> None:
        """Every family's traffic rules and the data plane for the whole peer set, the
        rules first (their peer filter admits before routes exist): their processes run
        while the data plane plans and reads the kernel, and it changes nothing before
        they are done (`ready`). Under `_plane`."""
        assert self.backend is not None and self.watcher is not None
        peers = self.watcher.peers
        await self.backend.sync(peers, ready=asyncio.gather(*(
            rules.keeper.sync(self._ruleset(rules, peers.values())) for rules in self.rules)))

    def _report_rollout(self) -> None:
        """Say when peers start or stop running another backend type than this host (a
        rebuild rolling out: they are not programmed meanwhile, what the kernel has for
        them is kept; the data plane names each one and counts them,
        `DataPlaneStatus.foreign_peers`)."""
        assert self.network is not None and self.backend is not None
        foreign = self.backend.status.foreign_peers
        if (foreign > 0) == (self._foreign > 0):
            self._foreign = foreign
            return
        if foreign:
            log.info("backend roll-out: %d peer(s) run another backend type than this host's "
                     "%s: reached the old way, where this host had programmed them, until "
                     "they switch", foreign, self.network.backend_type)
        else:
            log.info("backend roll-out over: every peer runs %s", self.network.backend_type)
        self._foreign = foreign

    @staticmethod
    def _log_peer_changes(changes: PeerChanges, count: int) -> None:
        total = len(changes.added) + len(changes.changed) + len(changes.removed)
        if total > 20:
            log.info("peers: %d added, %d changed, %d removed (%d in all)", len(changes.added),
                     len(changes.changed), len(changes.removed), count)
        else:
            for p in changes.added:
                log.info("peer added: %s at %s", p.subnet, p.public_ip)
            for p in changes.changed:
                log.info("peer changed: %s at %s", p.subnet, p.public_ip)
            for p in changes.removed:
                log.info("peer removed: %s", p.subnet)

    # --- the supervised run ---------------------------------------------------------

    async def _watchdog(self) -> None:
        interval = watchdog_interval()
        if interval is None:
            await asyncio.Event().wait()
            return
        while True:
            self._notify("WATCHDOG=1")
            await asyncio.sleep(interval)

    async def run(self, stop: asyncio.Event) -> None:
        """Start up, serve until `stop` is set; raise if a task fails."""
        # A stop during start-up (etcd unreachable, config missing) must not wait for it.
        which, started = await first_to_end(self.start(), stop.wait())
        if which == 1:
            return
        holder, watcher = started
        tasks = self.tasks
        try:
            tasks.spawn("watch", watcher.run())
            tasks.spawn("hold", holder.run())
            tasks.spawn("watchdog", self._watchdog())
            tasks.spawn("files", self.files.keep())
            which, _ = await first_to_end(watcher.synced.wait(), stop.wait(), tasks.failure())
            if which == 0:
                self._spawn_dataplane()
                for rules in self.rules:
                    tasks.spawn(f"rules-ipv{rules.family}", rules.keeper.run())
                tasks.spawn("config", self._config_follower().run())
                tasks.spawn("readiness", self.readiness.run())  # READY=1 once all holds
                await first_to_end(stop.wait(), tasks.failure())
        finally:
            await tasks.cancel_all()

    def _spawn_dataplane(self) -> None:
        assert self.backend is not None and self.watcher is not None
        watcher = self.watcher
        self.tasks.spawn("dataplane", self.backend.run(lambda: watcher.peers))

    # --- network config changes ------------------------------------------------------

    def _config_follower(self) -> ConfigFollower:
        def current() -> NetworkConfig:
            assert self.network is not None
            return self.network

        return ConfigFollower(
            self.store, self.layout.config_key, current=current,
            revision=self.config_revision, apply=self.apply_config, backends=self._backends,
            metrics=self.metrics, on_unavailable=self.etcd.down)

    async def apply_config(self, network: NetworkConfig, change: ConfigChange,
                           revision: int) -> bool:
        """Bring this host to `network` (docs/architecture.md, "Config changes"); True once
        it is in force. One this host cannot run (no PublicIPv6, host-gw off the segment,
        no free subnet, a missing program) is refused with one ERROR line and the last
        good config put back."""
        assert self.network is not None
        good = self.network
        try:
            await self._switch(network, change)
        except (ConfigError, DataPlaneError, SubnetsExhausted) as exc:
            self.metrics.config_ignored.labels(reason="unusable").inc()
            log.error("network config revision %d ignored: this host cannot run it: %s; going "
                      "back to the last good one", revision, exc)
            if self.network != good:
                await self._switch(good, classify(self.network, good))
            return False
        self.config_revision = revision
        self.metrics.config_revision.set(revision)
        self.metrics.config_changes.labels(change.kind).inc()
        return True

    async def _switch(self, network: NetworkConfig, change: ConfigChange) -> None:
        """The steps of a config change (see `apply_config`). Everything that can refuse
        (PublicIPv6, the programs of the traffic rules, the new backend's prepare) comes
        before anything is changed; once the new backend is prepared the agent works with
        the new config, and a later failure is undone by switching back."""
        assert self.watcher is not None and self.holder is not None
        host = await resolve_host(self.cfg, network, self._host)
        rules = self._traffic_rules(network, running=self.rules)
        async with self.watcher.gate:  # no lease event is judged while our key may change
            async with self._plane:
                await self.tasks.stop("dataplane")
                old = self.backend
                assert old is not None
                try:
                    new, attrs = await self._prepared(network, host)
                except Exception:
                    self._spawn_dataplane()  # the old one goes on (not when stopping)
                    raise
                self.backend = new
                self._use_network(network)
                self._host, self.mtu = host, attrs.mtu
                self.holder.leasing.reconfigure(network, self._lease_value(network, host, attrs))
                self.metrics.set_identity(public_ip=str(host.public_ip),
                                          node_id=self.cfg.node_id, backend=network.backend_type)
                # A rebuild whose devices are not shared: make before break. The new
                # backend is built beside the old one and its first pass replaces the
                # old routes (and keeps those of peers still on the old type); the old
                # devices go once no peer runs the old type (`_finish_rollout`).
                beside = (change.kind == REBUILD
                          and not _device_names(old) & _device_names(new))
                try:
                    if beside:
                        await self._stop_leaving_timer()
                        await self._drop_leaving()  # a roll-out replaced before it ended
                        self._leaving = old
                    else:
                        await self._retire(old, rebuild=change.kind == REBUILD)
                except Exception:
                    self._spawn_dataplane()  # the new one runs; apply_config switches back
                    raise
                self._spawn_dataplane()
            await self.holder.refit()  # subnet.env, Docker's options, the backend's addresses
            async with self._plane:
                await self._replace_rules(rules)
                self.watcher.set_network(network)
                await self._program_all()  # the peers as known: traffic back at once
            self._report_rollout()
            await self._finish_rollout()
        await self.watcher.relist("config_changed")  # then every lease judged anew

    async def _prepared(self, network: NetworkConfig, host: HostInfo
                        ) -> tuple[DataPlane, BackendAttrs]:
        """A data plane on `network`, prepared (it adopts the devices it shares with the
        running one, and may refuse to run: then nothing has changed)."""
        new = self._new_backend(network, host)
        try:
            return new, await new.prepare()
        except BaseException:
            assert self.backend is not None
            self.metrics.export_dataplane(self.backend.status)
            await new.close()
            raise

    async def _finish_rollout(self) -> None:
        """Remove the devices of the backend a rebuild replaced once no peer runs another
        type than ours, --peer-hold-time later: every route of ours through them has been
        replaced by then, and a peer that has not yet read our new lease (or its VNI) goes
        on sending through them meanwhile."""
        assert self.backend is not None
        if (self._leaving is not None and not self.backend.status.foreign_peers
                and self._leaving_timer is None):
            self._leaving_timer = asyncio.ensure_future(self._drop_leaving_later(self._leaving))

    async def _stop_leaving_timer(self) -> None:
        timer, self._leaving_timer = self._leaving_timer, None
        if timer is not None:
            timer.cancel()
            await asyncio.gather(timer, return_exceptions=True)

    async def _drop_leaving_later(self, leaving: DataPlane) -> None:
        try:
            await asyncio.sleep(self.cfg.peer_hold_time)
            async with self._plane:
                assert self.backend is not None
                if self._leaving is leaving and not self.backend.status.foreign_peers:
                    await self._drop_leaving()
        except (ConfigError, DataPlaneError) as exc:
            log.warning("could not remove the replaced backend's devices: %s", exc)
        finally:
            if self._leaving_timer is asyncio.current_task():
                self._leaving_timer = None

    async def _drop_leaving(self) -> None:
        """The replaced backend's devices removed (what is on them goes with them)."""
        leaving, self._leaving = self._leaving, None
        if leaving is None:
            return
        assert self.backend is not None
        try:
            if not _device_names(leaving) & _device_names(self.backend):
                await leaving.remove(objects=False)
        finally:
            await leaving.close()

    async def _retire(self, old: DataPlane, *, rebuild: bool) -> None:
        """Done with `old` (a stopped data plane the new one replaces): for a rebuild its
        kernel objects and devices removed first (a device of the same name the new one
        wants is put back by the new one's prepare)."""
        assert self.backend is not None
        if rebuild:
            await old.remove()
            if _device_names(old) & _device_names(self.backend):
                await self.backend.prepare()
        await old.close()

    async def _replace_rules(self, rules: list[FamilyRules]) -> None:
        """Keep `rules`: a keeper no longer wanted is stopped and its rules removed (IPv6
        turned off, nftables for iptables, alloc), a new one started. Under `_plane`."""
        for old in self.rules:
            if old not in rules:
                await self.tasks.stop(f"rules-ipv{old.family}")
                try:
                    await old.keeper.fw.remove()
                except (ConfigError, DataPlaneError) as exc:
                    log.warning("could not remove the %s%s traffic rules: %s",
                                old.keeper.fw.family.shown, old.keeper.fw.name, exc)
        started = [r for r in rules if r not in self.rules]
        self._install_rules(rules)
        for new in started:
            self.tasks.spawn(f"rules-ipv{new.family}", new.keeper.run())

    async def shutdown(self) -> None:
        """Stop without touching kernel state; revoke the lease only if asked to."""
        self._notify("STOPPING=1")
        await self.etcd.close()
        await self._stop_leaving_timer()
        for backend in (self.backend, self._leaving):
            if backend is not None:
                with contextlib.suppress(Exception):
                    await backend.close()
        holder = self.holder
        own = holder.own if holder is not None else None
        if (self.cfg.release_on_exit and holder is not None and own is not None
                and not own.reservation and holder.conflict is None):
            try:
                # Retried for a few seconds: a revoke sent during a leader election or to a
                # member that just died times out, and one try would leave the lease behind.
                await within(holder.release(), RELEASE_SECONDS)
                log.info("lease on %s released", own.subnet)
                await within(self._withdraw_metrics_target(), RELEASE_SECONDS)
            except Exception as exc:
                log.warning("could not release the lease on %s: %s", own.subnet,
                            exc or "etcd did not answer in time")
        elif own is not None:
            log.info("stopping; keeping the lease on %s for the restart", own.subnet)
