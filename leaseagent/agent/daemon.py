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
import math
import random
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from leaseagent import __version__
from leaseagent.agent.leasing import CANDIDATES_PER_TXN, Leasing, OwnLease
from leaseagent.agent.logs import StateLog, set_context
from leaseagent.agent.netconfig import (
    IGNORED_REASONS,
    ConfigFollower,
    wait_for_network_config,
)
from leaseagent.agent.notify import sd_notify, watchdog_interval
from leaseagent.agent.watching import RELIST_REASONS, LeaseWatcher
from leaseagent.config import AgentConfig
from leaseagent.core.allocation import Chooser, candidates
from leaseagent.core.configchange import CLASSES, REBUILD, ConfigChange, classify
from leaseagent.core.dockeropts import DOCKER_OPTIONS_KEY, render_docker_env
from leaseagent.core.escaping import escaped
from leaseagent.core.leases import (
    REASONS,
    KeyLayout,
    LeaseValue,
    Peer,
    PeerChanges,
    Verdict,
    decode_lease_value,
    unusable_ip_reason,
)
from leaseagent.core.monitoring import MetricsTarget, published_address
from leaseagent.core.network import NetworkConfig, host_overlap
from leaseagent.core.profiles import BACKEND_TYPES
from leaseagent.core.rules import PeerAdmission, Ruleset, ruleset
from leaseagent.core.subnetenv import (
    SubnetEnv,
    parse_subnet_env,
    previous_ipv6_subnet,
    previous_subnet,
)
from leaseagent.dataplane import BACKENDS
from leaseagent.dataplane.base import BackendAttrs, DataPlane, DataPlaneSettings, HostInfo
from leaseagent.dataplane.firewall import Firewall, RulesKeeper, firewall
from leaseagent.errors import (
    ConfigError,
    DataPlaneError,
    IdentityConflict,
    InvalidLease,
    LeaseagentError,
    LeaseLost,
    StoreAuthError,
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
    write_if_changed,
)
from leaseagent.metrics import Metrics, zero
from leaseagent.retrying import Backoff, retrying
from leaseagent.store.base import OPERATIONS, EventType, KeyValue, LeaseStore
from leaseagent.store.settings import check_credential_files
from leaseagent.waiting import first_to_end, within

log = logging.getLogger("leaseagent")

@dataclass(frozen=True)
class FamilyRules:
    """One address family's traffic rules: their keeper, and which peers the peer filter
    admits (leaseagent.core.rules.PeerAdmission, kept per change)."""

    family: int
    keeper: RulesKeeper
    admission: PeerAdmission
    nftables: bool = False  # which tool the keeper writes with


# The files the agent writes (the `file` label of their metrics) and the flag naming each.
FILES = {"subnet.env": "--subnet-file", "docker_opts.env": "--docker-opts-file"}
RELEASE_SECONDS = 10.0  # how long --release-on-exit keeps trying to release the lease
# How often readiness is looked at once started (STATUS=, READY=1): it is cheap (state only).
READINESS_SECONDS = 0.5
# While another agent has this host's identity, its key is read at most this far apart.
CONFLICT_CHECK_SECONDS = 60.0


@dataclass(frozen=True)
class Refit:
    """A request to the lease holder: fit our lease to the network config in force
    (`Leasing.refit`) and adopt it; `done` gets the lease, or the error."""

    done: asyncio.Future[OwnLease]


# What the lease holder is told: (the key it was about, as seen or None if absent, the
# revision it was seen at), a key of a twin, or a refit.
OwnEvent = tuple[str | None, KeyValue | None, int] | Verdict | Refit


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



def _peers(count: int) -> str:
    """'1 peer', '2 peers': the count as STATUS= and the log say it."""
    return f"{count} peer" if count == 1 else f"{count} peers"

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
        self.states = StateLog(log, on_change=self._on_state_change)
        self.layout = KeyLayout(cfg.prefix)
        self.own: OwnLease | None = None
        self.lease_held = False  # False while a lost lease is being taken back
        # When our etcd lease runs out unless renewed, by this host's clock (loop time), and
        # whether it has: etcd unreachable past it (leaseagent_lease_held drops to 0).
        self._lease_runs_out = math.inf
        self._lease_ran_out = False
        self.network: NetworkConfig | None = None
        self.backend: DataPlane | None = None
        # Traffic rules per address family in use (leaseagent.dataplane.firewall).
        self.rules: list[FamilyRules] = []
        self.traffic = cfg.traffic
        self.vxlan_port: int | None = None
        self.leasing: Leasing | None = None
        self.watcher: LeaseWatcher | None = None
        self.mtu = 0
        self.subnet_env_written = False
        # What each file the agent writes must hold (FILES' names -> path, content), kept
        # there by `_keep_files`; why the last write of them failed, if it did.
        self._files: dict[str, tuple[Path, bytes]] = {}
        self.files_error: str | None = None
        # (our key as seen, or None if absent; the revision it was seen at), or a key of a
        # twin: another agent with this host's identity.
        self._own_events: asyncio.Queue[OwnEvent] = asyncio.Queue()
        self.conflict: str | None = None  # set while another agent has this host's identity
        self.etcd_reachable = True  # as last found (leaseagent_etcd_up)
        self.etcd_refusal: str | None = None  # why etcd refuses to list the leases, if it does
        self._probe: asyncio.Future[None] | None = None  # asks etcd while it is down
        # Keys this agent gave up on purpose (a config change moved it to a new subnet):
        # news of them as a twin's is stale.
        self._given_up: set[str] = set()
        # Held while the backend or the traffic rules are programmed or replaced.
        self._plane = asyncio.Lock()
        # The supervised tasks by name (run); a config change replaces some of them.
        self._tasks: dict[asyncio.Task[None], str] = {}
        self._tasks_changed = asyncio.Event()
        self.config_revision = 0  # etcd revision of the network config in force
        self._foreign = 0  # peers of another backend type, as last reported
        # The backend a rebuild replaced, its devices kept while peers still run its type
        # (make before break: `_switch`, `_finish_rollout`).
        self._leaving: DataPlane | None = None
        self._leaving_timer: asyncio.Future[None] | None = None  # its removal, when due
        self.ready_sent = False  # READY=1 went to systemd (once: the start is over)
        self._reporting = False  # the start-up line is done: `_report` owns STATUS=
        self._status_text = ""  # the last STATUS= sent
        self._not_ready: str | None = "starting"  # the reason last reported

    # --- readiness, for /readyz --------------------------------------------------

    def not_ready_reason(self) -> str | None:
        if self.conflict is not None:
            return f"identity conflict: {self.conflict}"
        if self.own is None:
            return "no lease held yet"
        if not self.subnet_env_written:
            return "subnet.env not written yet"
        if self.watcher is None or not self.watcher.synced.is_set():
            return "peer list not complete yet"
        if not self.lease_held:
            return "lease not held (lost; taking it back)"
        if self.backend is None or not self.backend.status.in_sync:
            error = self.backend.status.last_error if self.backend is not None else None
            return "data plane not in sync" + (f": {error}" if error else "")
        for rules in self.rules:
            if not rules.keeper.status.in_sync:
                error = rules.keeper.status.last_error
                return (f"{rules.keeper.fw.family.shown}traffic rules not in place"
                        + (f": {error}" if error else ""))
        return None

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

    def _status(self, text: str) -> None:
        """What the agent is doing, for `systemctl status` (STATUS=, one line: escaped, so
        a name from etcd cannot add a line such as READY=1 or MAINPID= to the message)."""
        text = escaped(text)[:200]
        self._status_text = text
        self._notify("STATUS=" + text)

    def _on_state_change(self, text: str) -> None:
        """A state change StateLog logged: STATUS= says it during the start-up; after it,
        the summary (which holds etcd's state as well) says what is."""
        if self._reporting:
            self._report()
        else:
            self._status(text)

    def summary(self) -> str:
        """One line for STATUS=: ready or why not, the lease, the current peer count."""
        reason = self.not_ready_reason()
        peers = len(self.watcher.peers) if self.watcher is not None else 0
        lease = f"lease {self.own.subnet}" if self.own is not None else "no lease"
        etcd = "; etcd unreachable (retrying)" if self.states.get("etcd") == "down" else ""
        if self.files_error is not None:
            etcd += f"; {self.files_error} (retrying)"
        if self.etcd_refusal is not None:
            etcd += f"; {self.etcd_refusal} (retrying)"
        refused = len(self.backend.status.refused_peers) if self.backend is not None else 0
        if refused:
            etcd += f"; {_peers(refused)} refused by the kernel (unreachable)"
        if reason is None:
            return f"ready: {lease}, {_peers(peers)}{etcd}"
        return f"not ready: {reason} ({lease}, {_peers(peers)}){etcd}"

    def _report(self) -> None:
        """Readiness to systemd and the log, from state: READY=1 the first time the agent
        is ready; a line when it stops or starts being ready; STATUS= when it changes."""
        reason = self.not_ready_reason()
        if reason != self._not_ready:
            peers = len(self.watcher.peers) if self.watcher is not None else 0
            refused = len(self.backend.status.refused_peers) if self.backend is not None else 0
            if reason is None and refused:
                log.info("ready: %s programmed, %d refused by the kernel (see the "
                         "warnings above: unreachable from this host)", _peers(peers - refused),
                         refused)
            elif reason is None:
                log.info("ready: %s programmed", _peers(peers))
            else:
                log.warning("not ready: %s", reason)
            self._not_ready = reason
        if reason is None and not self.ready_sent:
            self._notify("READY=1")
            self.ready_sent = True
        text = self.summary()
        if escaped(text)[:200] != self._status_text:  # as `_status` sends it
            self._status(text)

    async def _readiness(self) -> None:
        """Report readiness (`_report`) every READINESS_SECONDS: the data plane's and the
        rules' keepers change their state in their own tasks."""
        self._reporting = True
        while True:
            self._report()
            await asyncio.sleep(READINESS_SECONDS)

    def _set_lease_held(self, held: bool) -> None:
        self.lease_held = held
        self._show_lease_held()

    def _show_lease_held(self) -> None:
        """leaseagent_lease_held: 1 while the lease is held, also by its TTL (an etcd
        outage longer than the TTL since the last renewal: it can no longer be held)."""
        self.metrics.lease_held.set(1 if self.lease_held and not self._lease_ran_out else 0)

    def _lease_renewed(self, own: OwnLease, *, at: float, ttl: int) -> None:
        """Our etcd lease holds for `ttl` seconds from loop time `at` (a grant or renewal
        sent then)."""
        self._lease_runs_out = math.inf if own.reservation else at + ttl
        self._lease_ran_out = False
        self._show_lease_held()

    def _ran_out(self, own: OwnLease) -> None:
        """No renewal reached etcd within the TTL: the lease is gone by our clock (etcd
        may hand the subnet to another host). The kernel stays as it is; the holder takes
        the lease back when etcd answers."""
        self._lease_ran_out = True
        self._show_lease_held()
        log.warning("lease on %s ran out by this host's clock (not renewed within its %ds "
                    "TTL); keeping the data plane, taking it back when etcd answers",
                    own.subnet, own.ttl)

    # --- start-up ------------------------------------------------------------------

    async def start(self) -> None:
        cfg = self.cfg
        # Before anything is taken in etcd (preflight ran before etcd was asked anything
        # when started by main; tests may start an Agent directly): a symlink planted at a
        # path we write as root is refused (write_atomic checks again at each write).
        for path in (cfg.subnet_file.parent, cfg.state_dir):
            refuse_symlink(path)
        for path in (cfg.subnet_file, *((cfg.docker_opts_file,) if cfg.docker_opts_file else ())):
            refuse_non_regular(path)
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
        self.leasing = leasing = Leasing(
            self.store, layout=self.layout, network=network,
            value=self._lease_value(network, host, attrs), ttl=cfg.lease_ttl,
            metrics=self.metrics, rng=self._rng, choose=self._choose,
            candidates_per_txn=self._per_txn)
        old_env = read_text_if_exists(cfg.subnet_file) or ""
        own = None
        self._status(f"acquiring a lease in {network.network}")
        async for attempt in retrying(on_retry=self._etcd_down):
            with attempt:
                own = await leasing.acquire(keep_listing=True, previous=previous_subnet(old_env),
                                            previous_ipv6=previous_ipv6_subnet(old_env))
        assert own is not None
        self._etcd_up()
        await self._take(own, first=True)
        await self._publish_metrics_target(host)
        self.watcher = LeaseWatcher(
            self.store, layout=self.layout, network=network,
            own_public_ip=host.public_ip, own_key=lambda: self.own.key if self.own else None,
            metrics=self.metrics, on_peers=self._on_peers,
            # The watch is often the first to find etcd gone (renewals may be hours apart).
            on_unavailable=self._etcd_down, on_listed=lambda: self._etcd_up(listed=True),
            # With the key it is about: the holder may have moved our key since.
            on_own=lambda kv, rev: self._own_events.put_nowait(
                (self.own.key if self.own else None, kv, rev)),
            node_id=cfg.node_id, on_twin=self._own_events.put_nowait,
            hold_seconds=cfg.peer_hold_time, first=leasing.take_listing())

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
            async for attempt in retrying(on_retry=self._etcd_down):
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

    async def _take(self, own: OwnLease, *, first: bool) -> None:
        """Adopt `own`: subnet.env, the backend's own address, metrics, one log line."""
        assert self.network is not None and self.backend is not None
        changed = self.own is not None and self.own.key != own.key
        self.own = own
        self._set_lease_held(True)
        self._lease_renewed(own, at=asyncio.get_running_loop().time(), ttl=own.ttl)
        self.metrics.lease_expiry.set(math.inf if own.reservation else time.time() + own.ttl)
        self.metrics.lease_ttl.set(math.inf if own.reservation else own.ttl)
        env = SubnetEnv(network=self.network.network, subnet=own.subnet, mtu=self.mtu,
                        ipmasq=self.cfg.traffic.ip_masq, ipv6_network=self.network.ipv6_network,
                        ipv6_subnet=own.ipv6_subnet).render()
        files = {"subnet.env": (self.cfg.subnet_file, env.encode())}
        if self.cfg.docker_opts_file is not None:
            # Kept with subnet.env, so a changed subnet reaches Docker's next start too.
            docker_env = render_docker_env(parse_subnet_env(env), combined_key=DOCKER_OPTIONS_KEY)
            files["docker_opts.env"] = (self.cfg.docker_opts_file, docker_env.encode())
        self._files = files
        self._write_files(start=first)
        self.subnet_env_written = True
        await self.backend.start(own.subnet, own_ipv6=own.ipv6_subnet)
        set_context(subnet=own.subnet)
        self.metrics.set_lease(subnet=str(own.subnet))
        if first or changed:
            log.info("lease held: %s%s (%s)%s; subnet.env written to %s", own.subnet,
                     f" and {own.ipv6_subnet}" if own.ipv6_subnet else "", own.how,
                     "" if own.reservation else f", ttl {own.ttl}s", self.cfg.subnet_file)
        if changed and self.watcher is not None:
            self.watcher.request_relist("own_subnet_changed")

    def _write_files(self, *, start: bool = False, repair: bool = False) -> None:
        """Make each file hold what it must, written only when it does not (a restart hook
        watching them, systemd's leaseagent-docker-restart.path, restarts Docker for a
        real change only). At start a failure is a ConfigError (exit 2) naming the path
        and the OS error; later it is reported (log once, metrics, STATUS=) and retried
        by `_keep_files`: the lease and the data plane are kept. `repair`: a write puts
        back what something else removed or changed."""
        errors = []
        for name, (path, data) in self._files.items():
            try:
                written = write_if_changed(path, data, mode=0o644)
            except (OSError, ConfigError) as exc:
                why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
                if start:
                    raise ConfigError(f"{FILES[name]}: cannot write {path}: {why}") from None
                self.metrics.file_write_failures.labels(file=name).inc()
                errors.append(f"cannot write {path}: {why}")
                continue
            if written and repair:
                self.metrics.file_repairs.labels(file=name).inc()
                log.warning("%s %s was missing or changed; written again", name, path)
        error = "; ".join(errors) or None
        if error is not None:
            self.states.set("files", error, "%s (retrying; the lease and the data plane are kept)",
                            error, level=logging.WARNING)
        elif self.files_error is not None:
            self.states.set("files", None, "%s written again", ", ".join(
                str(path) for path, _ in self._files.values()))
        self.files_error = error
        self.metrics.files_in_sync.set(0 if error else 1)

    async def _keep_files(self) -> None:
        """Level-triggered like the routes: every resync period each file is checked and
        put back if it was removed or changed; a failed write is retried sooner (capped,
        jittered backoff up to the resync period)."""
        period = self.cfg.resync_interval
        backoff = Backoff(cap=period)
        while True:
            if self.files_error is None:
                backoff.reset()
                await asyncio.sleep(period)
            else:
                await backoff.sleep()
            self._write_files(repair=self.files_error is None)

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
        if self._reporting:
            self._report()  # the peer count in STATUS= at once

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

    def _etcd_down(self, exc: BaseException) -> None:
        if isinstance(exc, StoreAuthError):
            # etcd answers but refuses (a permission revoked): not an outage. The lease
            # watcher retries its listing; what is programmed stays.
            self.etcd_refusal = str(exc)
            self.states.set("etcd-refusal", "refused", "%s (retrying; the data plane "
                            "is kept as it is)", exc, level=logging.WARNING)
            return
        self.etcd_reachable = False
        self.metrics.etcd_up.set(0)
        self.states.set("etcd", "down", "etcd unreachable: %s (retrying)", exc,
                        level=logging.WARNING)
        if self._probe is None or self._probe.done():
            self._probe = asyncio.ensure_future(self._probe_etcd())

    async def _probe_etcd(self) -> None:
        """While etcd is down, ask it (one key, capped jittered backoff) until it answers:
        whoever found it down may not ask again soon (a watch resumed in the adapter, a
        renewal hours away), and etcd_up must say when it is back."""
        backoff = Backoff()
        while not self.etcd_reachable:
            await backoff.sleep()
            try:
                await self.store.get(self.layout.config_key)
            except LeaseagentError:
                continue  # also a refusal (StoreAuthError): the supervised tasks report it
            self._etcd_up()

    def _etcd_up(self, *, listed: bool = False) -> None:
        """etcd answered; `listed`: with a complete listing of the leases (nothing to
        list again)."""
        self.etcd_reachable = True
        self.metrics.etcd_up.set(1)
        if listed and self.etcd_refusal is not None:
            self.etcd_refusal = None
            self.states.set("etcd-refusal", None, "etcd lists the leases again")
        if (self.states.set("etcd", "up", "etcd reachable") and self.watcher is not None
                and not listed):
            # A stream that lived through the outage may be half-open: list again.
            self.watcher.request_relist("etcd_recovered")

    # --- holding the lease ----------------------------------------------------------

    def _own_event_says_lost(self, key: str | None, kv: KeyValue | None,
                             revision: int) -> str | None:
        own = self.own
        if own is None or key != own.key:
            return None  # news of a key we held before (a config change moved us)
        if revision < own.mod_revision:
            # Seen before our latest write of the key (a watch catching up after an
            # outage, the expiry we already took the key back from): stale news. Acting
            # on it would take the key over again, and the echo of that write would
            # arrive stale in turn: a loop.
            return None
        if kv is None:
            return "our key was deleted"
        if kv.value != own.value or kv.lease != own.lease_id:
            return "our key was overwritten"
        self.own = replace(own, mod_revision=kv.mod_revision)
        return None

    async def hold(self) -> None:
        assert self.leasing is not None
        last_renewal = time.monotonic()
        while True:
            own = self.own
            assert own is not None
            # Renew every TTL/3 counted from the last renewal, however many
            # events about our own key arrive in between; with flanneld's
            # --subnet-lease-renew-margin, also at least that long before expiry.
            wait = None
            if not own.reservation:
                interval = own.ttl / 3
                if self.cfg.renew_margin is not None:
                    interval = min(interval, own.ttl - self.cfg.renew_margin)
                wait = max(0.0, last_renewal + max(0.5, interval) - time.monotonic())
            why: str | None = None
            try:
                event = await within(self._own_events.get(), wait)
                if isinstance(event, Verdict):
                    await self._twin_seen(own, event)
                    continue
                if isinstance(event, Refit):
                    if await self._refit(own, event.done):
                        last_renewal = time.monotonic()
                    continue
                why = self._own_event_says_lost(*event)
            except TimeoutError:
                try:
                    await self._renew(own)
                    last_renewal = time.monotonic()
                except LeaseLost as exc:
                    why = str(exc)
            if why is None:
                continue
            self._set_lease_held(False)
            log.warning("lease on %s lost: %s; taking it back", own.subnet, why)
            new = None
            try:
                async for attempt in retrying(on_retry=self._etcd_down):
                    with attempt:
                        new = await self.leasing.reclaim(own, why)
            except IdentityConflict as conflict:
                await self._sit_out(conflict)
                continue  # the key is free again: take it back (create-if-absent)
            assert new is not None
            self._etcd_up()
            await self._take(new, first=False)
            last_renewal = time.monotonic()
            if new.subnet == own.subnet:
                log.info("lease on %s taken back", new.subnet)

    async def _refit(self, own: OwnLease, done: asyncio.Future[OwnLease]) -> bool:
        """Fit our lease to the network config in force and adopt it (subnet.env, the
        backend's own addresses); `done` gets the lease or the error. True if the lease
        is another one now (a new etcd lease: renewals count from now)."""
        assert self.leasing is not None and self.network is not None
        try:
            new = None
            async for attempt in retrying(on_retry=self._etcd_down):
                with attempt:
                    new = await self.leasing.refit(own)
            assert new is not None
            self._etcd_up()
            if new.subnet != own.subnet:
                self._given_up.add(own.key)
                self.metrics.lease_changes.inc()
                log.error("SUBNET MOVED: %s (a network config change); took %s and gave %s "
                          "up (restart Docker to use the new subnet)",
                          self.network.check_subnet(own.subnet), new.subnet, own.subnet)
            await self._take(new, first=False)
        except Exception as exc:  # the lease is as it was (SubnetsExhausted, ...)
            done.set_exception(exc)
            return False
        done.set_result(new)
        return new.lease_id != own.lease_id

    async def _fitted_lease(self) -> OwnLease:
        """Have the lease holder (the one writer of our key) fit our lease to the network
        config in force; the lease once it has."""
        done: asyncio.Future[OwnLease] = asyncio.get_running_loop().create_future()
        self._own_events.put_nowait(Refit(done))
        return await done

    # --- two agents with one identity ------------------------------------------------

    async def _twin_seen(self, own: OwnLease, twin: Verdict) -> None:
        """Another key names this host's PublicIP and node id (both agents started at once
        and took a subnet each): the younger key steps back, the older stays."""
        assert self.leasing is not None
        value = twin.value
        if (value is None or self.conflict is not None or twin.key == own.key
                or twin.key in self._given_up):
            return  # judged before our key changed (a config change): stale
        what = (f"another agent with this host's identity (node id {value.node_id}, "
                f"PublicIP {value.public_ip}) holds {twin.key}")
        if (twin.create_revision, twin.key) > (own.create_revision, own.key):
            self.states.set("twin", twin.key, "%s (younger than our %s); it steps back",
                            what, own.key, level=logging.WARNING)
            return
        try:
            await self.leasing.give_up(own)
        except StoreUnavailable:
            pass  # our etcd lease runs out by itself; peers see it go
        self._set_lease_held(False)
        await self._sit_out(IdentityConflict(twin.key, f"{what} (older than our {own.key}, "
                                                       f"which was given up)"))

    async def _sit_out(self, conflict: IdentityConflict) -> None:
        """Another agent has this host's identity: say so once, stay out of its way, and only
        read (with a growing, jittered pause, at most CONFLICT_CHECK_SECONDS) until the
        key it holds is free. The data plane is left as it is."""
        self.conflict = str(conflict)
        self._status(f"identity conflict: {conflict}")
        self.metrics.identity_conflict.set(1)
        self.metrics.identity_conflicts.inc()
        log.error("IDENTITY CONFLICT: %s. This agent steps back and changes nothing in etcd "
                  "until that key is gone. Check whether this machine is a clone of another "
                  "(same /etc/machine-id: give each host its own --node-id) or whether "
                  "leaseagent runs twice on this host.", conflict)
        backoff = Backoff(cap=CONFLICT_CHECK_SECONDS)
        while True:
            await backoff.sleep()
            try:
                kv = await self.store.get(conflict.key)
            except StoreUnavailable as exc:
                self._etcd_down(exc)
                continue
            self._etcd_up()
            if kv is None:
                break
            try:
                if not (self.leasing is not None
                        and self.leasing.is_twin(decode_lease_value(kv.value))):
                    break
            except InvalidLease:
                break
        log.warning("identity conflict over: %s is no longer held by a twin; taking our "
                    "lease back", conflict.key)
        refits = []
        while not self._own_events.empty():
            event = self._own_events.get_nowait()  # what happened meanwhile is stale ...
            if isinstance(event, Refit):
                refits.append(event)  # ... but a config change still waits to be applied
        for refit in refits:
            self._own_events.put_nowait(refit)
        self.conflict = None
        self.metrics.identity_conflict.set(0)

    async def _renew(self, own: OwnLease) -> None:
        assert self.leasing is not None
        failed = False

        def on_retry(exc: BaseException) -> None:
            nonlocal failed
            failed = True
            self.metrics.renewal_failures.inc()
            self._etcd_down(exc)

        # Retry faster than the TTL runs out; keep trying past it (etcd then tells us it is gone).
        ttl = 0
        loop = asyncio.get_running_loop()
        sent = loop.time()
        runs_out = (loop.call_at(self._lease_runs_out, self._ran_out, own)
                    if math.isfinite(self._lease_runs_out) else None)
        try:
            async for attempt in retrying(cap=max(0.5, min(5.0, own.ttl / 6)), on_retry=on_retry):
                with attempt:
                    sent = loop.time()
                    ttl = await self.leasing.keepalive(own)
        finally:
            if runs_out is not None:
                runs_out.cancel()
        self.metrics.renewals.inc()
        self._lease_renewed(own, at=sent, ttl=ttl)
        self.metrics.lease_expiry.set(time.time() + ttl)
        self._etcd_up()
        if failed:
            log.info("lease on %s renewed after failures", own.subnet)

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
        which, _ = await first_to_end(self.start(), stop.wait())
        if which == 1:
            return
        assert self.watcher is not None
        watcher = self.watcher
        self._spawn("watch", watcher.run())
        self._spawn("hold", self.hold())
        self._spawn("watchdog", self._watchdog())
        self._spawn("files", self._keep_files())
        synced = asyncio.ensure_future(watcher.synced.wait())
        stopping = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({synced, stopping, *self._tasks},
                               return_when=asyncio.FIRST_COMPLETED)
            self._check_tasks()
            if synced.done():
                self._spawn_dataplane()
                for rules in self.rules:
                    self._spawn(f"rules-ipv{rules.family}", rules.keeper.run())
                self._spawn("config", self._config_follower().run())
                self._spawn("readiness", self._readiness())  # READY=1 once all holds
                await self._supervise(stopping)
        finally:
            tasks = [synced, stopping, *self._tasks]
            self._tasks.clear()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def _spawn(self, name: str, coro: Awaitable[None]) -> None:
        """Run `coro` as a supervised task named `name` (see `run`)."""
        self._tasks[asyncio.ensure_future(coro)] = name
        self._tasks_changed.set()

    def _spawn_dataplane(self) -> None:
        assert self.backend is not None and self.watcher is not None
        watcher = self.watcher
        self._spawn("dataplane", self.backend.run(lambda: watcher.peers))

    async def _stop_task(self, name: str) -> None:
        """Stop the supervised task `name` (if it runs) on purpose: no failure."""
        for task, task_name in list(self._tasks.items()):
            if task_name == name:
                del self._tasks[task]
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    async def _supervise(self, stopping: asyncio.Future[Literal[True]]) -> None:
        """Until `stopping`: raise as soon as a task fails or ends (the set of tasks may
        change meanwhile: a config change replaces the data plane's and the rules')."""
        while not stopping.done():
            self._tasks_changed.clear()
            changed = asyncio.ensure_future(self._tasks_changed.wait())
            waiting: set[asyncio.Future[Any]] = {stopping, changed, *self._tasks}
            try:
                await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            finally:
                changed.cancel()
            self._check_tasks()

    def _check_tasks(self) -> None:
        for task, name in self._tasks.items():
            if task.done() and not task.cancelled():
                exc = task.exception()
                if isinstance(exc, ConfigError):
                    raise exc  # a setting to fix (a password changed in etcd): exit 2
                if exc is not None:
                    raise RuntimeError(f"task {name} failed: {exc}") from exc
                raise RuntimeError(f"task {name} ended unexpectedly")

    # --- network config changes ------------------------------------------------------

    def _config_follower(self) -> ConfigFollower:
        def current() -> NetworkConfig:
            assert self.network is not None
            return self.network

        return ConfigFollower(
            self.store, self.layout.config_key, current=current,
            revision=self.config_revision, apply=self.apply_config, backends=self._backends,
            metrics=self.metrics, on_unavailable=self._etcd_down)

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
        assert self.watcher is not None and self.leasing is not None
        host = await resolve_host(self.cfg, network, self._host)
        rules = self._traffic_rules(network, running=self.rules)
        async with self.watcher.gate:  # no lease event is judged while our key may change
            async with self._plane:
                await self._stop_task("dataplane")
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
                self.leasing.reconfigure(network, self._lease_value(network, host, attrs))
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
            await self._fitted_lease()  # subnet.env, Docker's options, the backend's addresses
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
                await self._stop_task(f"rules-ipv{old.family}")
                try:
                    await old.keeper.fw.remove()
                except (ConfigError, DataPlaneError) as exc:
                    log.warning("could not remove the %s%s traffic rules: %s",
                                old.keeper.fw.family.shown, old.keeper.fw.name, exc)
        started = [r for r in rules if r not in self.rules]
        self._install_rules(rules)
        for new in started:
            self._spawn(f"rules-ipv{new.family}", new.keeper.run())

    async def _release_retrying(self, own: OwnLease) -> None:
        assert self.leasing is not None
        async for attempt in retrying(cap=1.0):
            with attempt:
                await self.leasing.release(own)

    async def shutdown(self) -> None:
        """Stop without touching kernel state; revoke the lease only if asked to."""
        self._notify("STOPPING=1")
        if self._probe is not None:
            self._probe.cancel()
            await asyncio.gather(self._probe, return_exceptions=True)
        await self._stop_leaving_timer()
        for backend in (self.backend, self._leaving):
            if backend is not None:
                with contextlib.suppress(Exception):
                    await backend.close()
        own = self.own
        if (self.cfg.release_on_exit and own is not None and not own.reservation
                and self.conflict is None):
            try:
                # Retried for a few seconds: a revoke sent during a leader election or to a
                # member that just died times out, and one try would leave the lease behind.
                await within(self._release_retrying(own), RELEASE_SECONDS)
                log.info("lease on %s released", own.subnet)
                await within(self._withdraw_metrics_target(), RELEASE_SECONDS)
            except Exception as exc:
                log.warning("could not release the lease on %s: %s", own.subnet,
                            exc or "etcd did not answer in time")
        elif own is not None:
            log.info("stopping; keeping the lease on %s for the restart", own.subnet)
