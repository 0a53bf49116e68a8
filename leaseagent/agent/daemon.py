"""The daemon: a straight start-up line, then a few supervised tasks; the parts that do
the work are composed here (docs/architecture.md, "The agent's parts").

    connect to etcd -> wait for a valid <prefix>/config -> resolve this host
    -> backend.prepare() (VtepMAC, MTU; a device there adopted, one not there left
       to the first sync; devices of ours it does not use kept,
       leaseagent.dataplane.kept) -> acquire the lease
    -> write subnet.env -> backend.start(subnet) -> first complete list judged
    -> backend.sync(peers) (the devices made, then the peers) -> READY=1
    then tasks: hold (the lease holder: keepalive, take back a lost lease),
    watch (peers), backend.run (resync, drift repair), the traffic rules'
    keepers, files (kept like the routes), config (follow <prefix>/config and
    apply its changes), readiness, watchdog; the first task to fail stops the
    agent with a clear message and exit status 1.

The parts: this host checked (`agent/preflight.py`), etcd's reachability
(`agent/etcdhealth.py`), the lease holder (`agent/holder.py`), the files
(`agent/filewriting.py`), the data plane and traffic rules (`agent/plane.py`),
a config change (`agent/switching.py`), readiness (`agent/readiness.py`) and
the supervised tasks (`agent/supervision.py`).

Faults (docs/architecture.md, "Fault rules"): etcd unreachable leaves the
kernel as it is and is retried with capped jittered backoff
(leaseagent.retrying), logged once per state change; stopping never removes
kernel state; --release-on-exit revokes the lease.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from leaseagent import __version__
from leaseagent.agent.etcdhealth import EtcdHealth
from leaseagent.agent.filewriting import FILES, FileWriter
from leaseagent.agent.holder import LeaseHolder
from leaseagent.agent.leasing import CANDIDATES_PER_TXN, Leasing, OwnLease
from leaseagent.agent.logs import StateLog, set_context
from leaseagent.agent.metricstarget import publish_metrics_target, withdraw_metrics_target
from leaseagent.agent.netconfig import IGNORED_REASONS, ConfigFollower, wait_for_network_config
from leaseagent.agent.notify import sd_notify, watchdog_interval
from leaseagent.agent.plane import FamilyRules, Plane
from leaseagent.agent.preflight import preflight, resolve_host
from leaseagent.agent.readiness import Readiness, not_ready_reason
from leaseagent.agent.supervision import Tasks
from leaseagent.agent.switching import ConfigSwitch
from leaseagent.agent.watching import RELIST_REASONS, LeaseWatcher
from leaseagent.config import AgentConfig
from leaseagent.core.allocation import Chooser, candidates
from leaseagent.core.configchange import CLASSES
from leaseagent.core.leases import REASONS, KeyLayout, LeaseValue, PeerChanges, unusable_ip_reason
from leaseagent.core.network import NetworkConfig
from leaseagent.core.profiles import BACKEND_TYPES
from leaseagent.core.subnetenv import previous_ipv6_subnet, previous_subnet
from leaseagent.dataplane import BACKENDS
from leaseagent.dataplane.base import BackendAttrs, DataPlane, DataPlaneSettings, HostInfo
from leaseagent.dataplane.firewall import Firewall, firewall
from leaseagent.errors import ConfigError
from leaseagent.files import read_text_if_exists
from leaseagent.metrics import Metrics, zero
from leaseagent.retrying import retrying
from leaseagent.store.base import OPERATIONS, EventType, LeaseStore
from leaseagent.waiting import first_to_end, within

__all__ = ["Agent", "preflight", "resolve_host"]

log = logging.getLogger("leaseagent")

RELEASE_SECONDS = 10.0  # how long --release-on-exit keeps trying to release the lease


@dataclass(frozen=True)
class Started:
    """What the start-up line made, for `Agent.run` to set going."""

    holder: LeaseHolder
    watcher: LeaseWatcher
    plane: Plane
    switch: ConfigSwitch
    # Where this agent's /metrics is, being written to etcd meanwhile (done before READY).
    publishing: asyncio.Future[None]


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
        self._zero_metrics()
        self._notify = notify
        self._host = host  # this host, as given or resolved under the config in force
        self._rng = rng or random.Random()
        self.readiness = Readiness(self, notify)
        self.states = StateLog(log, on_change=self.readiness.on_state_change)
        self.files = FileWriter(cfg, metrics=self.metrics, states=self.states)
        self.layout = KeyLayout(cfg.prefix)
        self.etcd = EtcdHealth(store, probe_key=self.layout.config_key, states=self.states,
                               metrics=self.metrics, on_recovered=self._etcd_recovered)
        self.tasks = Tasks()  # the supervised tasks; a config change replaces some
        self.mtu = 0  # FLANNEL_MTU under the config in force
        # The parts the start-up line makes, in this order (None before).
        self.plane: Plane | None = None
        self.holder: LeaseHolder | None = None
        self.watcher: LeaseWatcher | None = None
        self.switch: ConfigSwitch | None = None
        # A lease this start made and never programmed (`run`): given back at stop.
        self._unused_lease = False

    def _zero_metrics(self) -> None:
        """Every labelled series at 0 from the start (a rate() needs the first sample)."""
        m = self.metrics
        m.export_readiness(lambda: self.not_ready_reason() is None)
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

    # --- the parts' state, as readiness, /readyz, tests and benchmarks read it ----------

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
    def network(self) -> NetworkConfig | None:
        """The network config in force (None before the data plane is made)."""
        return self.plane.network if self.plane is not None else None

    @property
    def backend(self) -> DataPlane | None:
        return self.plane.backend if self.plane is not None else None

    @property
    def rules(self) -> list[FamilyRules]:
        return self.plane.rules if self.plane is not None else []

    @property
    def subnet_env_written(self) -> bool:
        return self.files.written

    def not_ready_reason(self) -> str | None:
        """Why the agent is not ready (None: it is; leaseagent.agent.readiness)."""
        return not_ready_reason(self)

    def _etcd_recovered(self) -> None:
        if self.watcher is not None:
            # A stream that lived through the outage may be half-open (ViewCheck).
            self.watcher.relist_after_outage(self.etcd.down_since)

    # --- start-up ---------------------------------------------------------------------

    async def start(self) -> Started:
        """The start-up line (see the module's docstring), up to the lease watcher."""
        cfg = self.cfg
        # Before anything is taken in etcd (preflight ran before etcd was asked anything
        # when started by main; tests may start an Agent directly).
        self.files.refuse_planted_paths()
        network, revision = await wait_for_network_config(
            self.store, self.layout, self.states, backends=self._backends)
        self.metrics.config_revision.set(revision)
        log.info("network %s, /%d subnets in %s-%s, backend %s", network.network,
                 network.subnet_len, network.subnet_min, network.subnet_max, network.backend_type)
        host = await self._identify(network)
        self.plane = plane = Plane(cfg, network, host, metrics=self.metrics, tasks=self.tasks,
                                   backends=self._backends, firewalls=self._firewalls)
        plane.read_rules_ahead()
        attrs = await plane.prepare()  # and the devices a stop within a hold left, kept
        self.mtu = attrs.mtu
        leasing = Leasing(
            self.store, layout=self.layout, network=network,
            value=self._lease_value(network, host, attrs), ttl=cfg.lease_ttl,
            metrics=self.metrics, rng=self._rng, choose=self._choose,
            candidates_per_txn=self._per_txn)
        self.holder = holder = await self._acquire(leasing, plane)
        first, parsed = leasing.take_listing()
        self.watcher = watcher = LeaseWatcher(
            self.store, layout=self.layout, network=network,
            own_public_ip=host.public_ip, own_key=lambda: holder.own.key,
            metrics=self.metrics,
            on_peers=functools.partial(self._on_peers, plane, holder),
            # The watch is often the first to find etcd gone (renewals may be hours apart).
            on_unavailable=self.etcd.down, on_listed=lambda: self.etcd.up(listed=True),
            on_own=holder.own_key_seen, node_id=cfg.node_id, on_twin=holder.twin_seen,
            hold_seconds=cfg.peer_hold_time, first=first, parsed=parsed,
            check_seconds=cfg.lease_check_interval)
        self.switch = switch = ConfigSwitch(
            plane, holder, watcher, revision=revision, metrics=self.metrics,
            resolve=lambda network: resolve_host(cfg, network, self._host),
            adopt=functools.partial(self._use, leasing))
        # Its round trips to etcd run while the first listing is judged and programmed
        # (no await from here to the return: nothing is left running if start is cut short).
        publishing = asyncio.ensure_future(
            publish_metrics_target(self.store, self.layout, cfg, host, etcd=self.etcd))
        return Started(holder, watcher, plane, switch, publishing)

    async def _identify(self, network: NetworkConfig) -> HostInfo:
        """This host under `network`: checked, logged, in the metrics' labels."""
        cfg = self.cfg
        host = await resolve_host(cfg, network, self._host)
        why = unusable_ip_reason(host.public_ip)
        if network.profile.data_path and why:
            raise ConfigError(f"PublicIP {host.public_ip} is {why}: peers would refuse it "
                              f"(--allow-any-public-ip is for alloc only)")
        log.info("leaseagent %s: backend %s, interface %s, PublicIP %s%s, node id %s, etcd %s",
                 __version__, network.backend_type, host.iface or "-", host.public_ip,
                 f", PublicIPv6 {host.public_ipv6}" if network.ipv6 is not None else "",
                 cfg.node_id, cfg.etcd.endpoints)
        set_context(public_ip=host.public_ip, node_id=cfg.node_id)
        self.metrics.set_identity(public_ip=str(host.public_ip), node_id=cfg.node_id,
                                  backend=network.backend_type)
        self._host = host
        return host

    async def _acquire(self, leasing: Leasing, plane: Plane) -> LeaseHolder:
        """Our lease (the subnet of subnet.env again if it is free), held and adopted."""
        old_env = read_text_if_exists(self.cfg.subnet_file) or ""
        self.readiness.status(f"acquiring a lease in {plane.network.network}")
        own: OwnLease = await retrying(on_retry=self.etcd.down)(
            leasing.acquire, keep_listing=True, previous=previous_subnet(old_env),
            previous_ipv6=previous_ipv6_subnet(old_env))
        self.etcd.up()
        holder = LeaseHolder(
            own, leasing, self.store, etcd=self.etcd, metrics=self.metrics, states=self.states,
            adopt=functools.partial(self._adopt, plane), status=self.readiness.status,
            renew_margin=self.cfg.renew_margin)
        await holder.take(own, first=True)
        return holder

    def _lease_value(self, network: NetworkConfig, host: HostInfo, attrs: BackendAttrs
                     ) -> LeaseValue:
        """What this host publishes in its lease under `network`."""
        return LeaseValue(public_ip=host.public_ip, backend_type=attrs.backend_type,
                          backend_data=dict(attrs.backend_data), node_id=self.cfg.node_id,
                          public_ipv6=host.public_ipv6 if network.ipv6 is not None else None,
                          backend_v6_data=dict(attrs.backend_v6_data))

    def _use(self, leasing: Leasing, network: NetworkConfig, host: HostInfo,
             attrs: BackendAttrs) -> None:
        """Work with `host` and a backend's `attrs` under `network` (a config change)."""
        self._host, self.mtu = host, attrs.mtu
        leasing.reconfigure(network, self._lease_value(network, host, attrs))
        self.metrics.set_identity(public_ip=str(host.public_ip), node_id=self.cfg.node_id,
                                  backend=network.backend_type)

    async def _adopt(self, plane: Plane, own: OwnLease, first: bool, changed: bool) -> None:
        """Adopt the lease the holder took: subnet.env, the backend's own address,
        metrics, one log line (`first`: at start; `changed`: another key than before)."""
        self.files.lease(plane.network, own, self.mtu, first=first)
        await plane.backend.start(own.subnet, own_ipv6=own.ipv6_subnet)
        set_context(subnet=own.subnet)
        self.metrics.set_lease(subnet=str(own.subnet))
        if first or changed:
            log.info("lease held: %s%s (%s)%s; subnet.env written to %s", own.subnet,
                     f" and {own.ipv6_subnet}" if own.ipv6_subnet else "", own.how,
                     "" if own.reservation else f", ttl {own.ttl}s", self.cfg.subnet_file)
        if changed and self.watcher is not None:
            self.watcher.request_relist("own_subnet_changed")

    # --- peers --------------------------------------------------------------------------

    async def _on_peers(self, plane: Plane, holder: LeaseHolder, changes: PeerChanges,
                        full: bool, started: float) -> None:
        """The watcher's news: programmed, logged, the roll-out followed, STATUS= told."""
        peers = self.watcher.peers if self.watcher is not None else {}
        await plane.peers_changed(changes, peers, holder.own, full=full, started=started)
        _log_peer_changes(changes, len(peers))
        await plane.follow_rollout()
        if self.readiness.reporting:
            self.readiness.report()  # the peer count in STATUS= at once

    # --- the supervised run ---------------------------------------------------------------

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
        holder, watcher, plane, switch = (started.holder, started.watcher, started.plane,
                                          started.switch)
        tasks = self.tasks
        try:
            tasks.spawn("watch", watcher.run())
            tasks.spawn("hold", holder.run())
            tasks.spawn("watchdog", self._watchdog())
            tasks.spawn("files", self.files.keep())
            which, _ = await first_to_end(
                asyncio.gather(watcher.synced.wait(), started.publishing), stop.wait(),
                tasks.failure())
            if which == 0:
                plane.spawn(lambda: watcher.peers)
                plane.spawn_rules(plane.rules)
                tasks.spawn("config", ConfigFollower(
                    self.store, self.layout.config_key, current=lambda: switch.network,
                    revision=switch.revision, apply=switch.apply, backends=self._backends,
                    metrics=self.metrics, on_unavailable=self.etcd.down).run())
                tasks.spawn("readiness", self.readiness.run())  # READY=1 once all holds
                await first_to_end(stop.wait(), tasks.failure())
        except Exception:
            # Failed before the first sync, which makes the devices a fresh start lacks
            # (one that cannot be made, say): a lease this start made names a VtepMAC no
            # device has, and routes peers to nothing; `shutdown` gives it back. (The
            # MAC stays stored: the next start makes the device with it.)
            self._unused_lease = not watcher.synced.is_set() and holder.own.made
            raise
        finally:
            started.publishing.cancel()
            await asyncio.gather(started.publishing, return_exceptions=True)
            await tasks.cancel_all()

    async def shutdown(self) -> None:
        """Stop without touching kernel state; revoke the lease only if asked to."""
        self._notify("STOPPING=1")
        await self.etcd.close()
        if self.plane is not None:
            await self.plane.close()
        holder = self.holder
        if holder is None:
            return
        own = holder.own
        if ((self.cfg.release_on_exit or self._unused_lease) and not own.reservation
                and holder.conflict is None):
            try:
                # Retried for a few seconds: a revoke sent during a leader election or to a
                # member that just died times out, and one try would leave the lease behind.
                await within(holder.release(), RELEASE_SECONDS)
                log.info("lease on %s released", own.subnet)
                await within(withdraw_metrics_target(self.store, self.layout, self.cfg.node_id),
                             RELEASE_SECONDS)
            except Exception as exc:
                log.warning("could not release the lease on %s: %s", own.subnet,
                            exc or "etcd did not answer in time")
        else:
            log.info("stopping; keeping the lease on %s for the restart", own.subnet)


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
