"""The reconcile engine shared by the kernel backends (vxlan, host-gw, wireguard).

A backend subclasses `ReconcilingBackend` and supplies policy: how to plan
a peer (`_plan_peer`) and what it wants whatever the peers (`_own_objects`),
its devices (`_device_specs`, `_converge_devices`), what of the kernel it owns
(`_scan`, `_observe_devices`), how to make its devices ready
(`_ensure_ready`), which netlink events concern it (`_drift_kind`), how
objects that are not rtnetlink's are written (`_program`) and what else must
be watched (`_watchers`). This module supplies the mechanics, identical for
all, and the read-only `spec()`/`observe()` pair (leaseagent.dataplane.base).

Both address families go through the same mechanics: a dual-stack peer's
IPv6 objects are in its plan beside its IPv4 ones, routes of both families
are dumped and watched, and the IPv6 device (vxlan's flannel-v6.<VNI>) is
one more device. Nothing below depends on the family:

- `sync(peers)`: level-triggered. Plan the whole peer set, read what we own
  and apply the difference (`core.plan.diff`), make before break: additions
  first (neighbour -> FDB -> route, each a replace), then
  removals (route -> neighbour -> FDB), so a peer whose objects change
  (DirectRouting turned on, a new PublicIP) is never without a path in
  between. The tables are read as they stream in (`_scan`): each dumped entry
  is told by its identity, and only one the plan does not hold becomes an
  object; nothing of a dump is kept. Marks the backend synced; nothing is
  ever removed before the first sync.
- `update(changes, peers)`: incremental, no table dump. The last applied
  plan is kept small (`core.kerneldiff.AppliedPlan`: per peer subnet the
  peer it was planned from, the watcher's own object, and per object a count
  of the peers that want it). It converges to what `sync` would produce;
  `run` heals any divergence. The cyclic collector waits meanwhile (a mass
  expiry's thousands of objects; leaseagent.memory.collector_paused).
- `run(get_peers)`: two tasks. A netlink event watcher and a resync loop.
  The watcher looks at every broadcast: one of our routes or FDB entries
  deleted by someone else is queued for a *targeted* repair (exactly that
  object put back: no table dump, so it is back in milliseconds at any
  scale); a deleted neighbour entry (its notification no longer names its
  MAC) that is not one we are removing ourselves, an entry of ours changed by
  someone else, our device gone, down or changed, or the underlay changing,
  asks for a *full* resync (device first, then a level-triggered sync).
  Events caused by our own requests carry our socket's port id and are
  ignored. Bursts are debounced a few ms.
  A full resync also runs every resync_seconds +-20%, which catches what no
  event tells (and FDB changes, which the kernel broadcasts with port id 0).
  What a run-triggered pass puts back of the applied plan, or removes
  beyond it, is counted as a drift repair. The rest of its changes are peer
  changes the watcher has not handed to `update` yet (a pass reads the
  watcher's peers as they are now): under churn a pass often catches up with
  a few, and they are not drift.
- `close()`: closes sockets. Never removes peer state or the device (a
  restart must not break connectivity; docs/architecture.md, "Fault rules").
- `remove()`: for a rebuild onto another backend (docs/architecture.md,
  "Config changes"): every object of ours the kernel has (`current`), then
  the devices of `_device_specs`. The instance is done with afterwards.
  `remove(objects=False)`: only the devices (what is on them goes with them),
  once the new backend has taken the routes over (make before break).

Peers of another backend type are planned nothing (flannel does the same):
a vxlan host and a wireguard host cannot reach each other. Nor are vxlan peers
whose lease names another VNI (core.profiles.base.runs_other, the one rule of a
peer's profile identity). Each is logged once (a warning naming what it runs)
and counted in `status.foreign_peers`. What the
kernel already has for such a peer (`core.plan.serves`: its routes, neighbour
and FDB entries, made by the backend this host ran before a rebuild, or by this
one before the peer switched) is left in place, not removed as stale: during a
roll-out of another backend type the hosts still reach each other the old way
until both have switched, when the new objects replace the old ones (a route
replace is atomic). Once a foreign peer is gone, a full pass removes them.

One asyncio.Lock serialises sync, update and resync: a sync's dump and its
diff must not interleave with an update's changes.

Per-object refusals by the kernel never raise, and the next resync retries
them. A refused object of a peer's (host-gw: its PublicIP is no gateway on
the link) is that peer's problem: the peer goes to `status.refused_peers`
with what was refused and why, logged once per peer and reason, and the
data plane stays in sync for the others (one broken peer must not make every
host unready). A refused object of this host's own (or a stale one's
removal) is logged (one line per pass), turns `status.in_sync` false with
the error in `status.last_error`. DataPlaneError is raised
only when the data plane as a whole cannot work (no socket, device cannot be
created). Failed resyncs and a broken event socket are retried with the
project's backoff (leaseagent.retrying).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Collection, Coroutine, Iterable, Iterator, Mapping
from ipaddress import IPv4Network, IPv6Network
from itertools import chain
from typing import Any

from leaseagent import memory
from leaseagent.core.diagnosis import render_object
from leaseagent.core.kerneldiff import (
    Admission,
    AppliedPlan,
    Claims,
    FullPass,
    Work,
)
from leaseagent.core.leases import Peer, PeerChanges
from leaseagent.core.plan import (
    MAIN_TABLE,
    BackendSpec,
    DeviceSpec,
    DeviceState,
    HostRoute,
    KernelObject,
    Observation,
    PlanDiff,
    Route,
    cluster_relevant,
    diff,
    diff_found,
)
from leaseagent.core.profiles.base import runs_other
from leaseagent.dataplane import kept
from leaseagent.dataplane.base import BackendAttrs, DataPlaneSettings, DataPlaneStatus
from leaseagent.dataplane.kept import KeptDevices
from leaseagent.dataplane.kernelport import Kernel
from leaseagent.dataplane.netlink import (
    Action,
    Failure,
    Known,
    NetlinkEvent,
    nothing_known,
    objects_by_kind,
    read_again,
)
from leaseagent.errors import DataPlaneError
from leaseagent.retrying import Backoff
from leaseagent.waiting import first_to_end, within

log = logging.getLogger(__name__)

async def _done(ready: Awaitable[object] | None) -> None:
    """Wait for `ready` (see DataPlane.sync), if there is one."""
    if ready is not None:
        await ready


# Collect a burst of events (a device deletion brings several) into one resync.
DEBOUNCE_SECONDS = 0.01
RESYNC_JITTER = 0.2


class ReconcilingBackend:
    """Mechanics of a kernel backend; subclasses provide the policy hooks."""

    backend_type = ""

    def __init__(self, settings: DataPlaneSettings, *, rng: random.Random | None = None) -> None:
        self._settings = settings
        self.status = DataPlaneStatus()
        self._rng = rng or random.Random()
        self._nl: Kernel | None = None
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._own_subnet: IPv4Network | None = None
        self._own_ipv6: IPv6Network | None = None  # the lease's IPv6 part, when dual-stack
        self._synced = False
        # Devices `prepare(devices_at_sync=True)` left to make: the first sync makes them.
        self._make_at_sync = False
        self._applied = AppliedPlan()  # the last applied plan (core.kerneldiff)
        # Work the event watcher hands to the resync loop (core.kerneldiff.Work).
        self._work = Work()
        # Which peers may be planned (core.kerneldiff): not those of another backend
        # type, over the host's routes and addresses that are not ours, or claiming
        # what another holds. Each peer kept out is logged once per reason (`_logged`).
        self._admission = Admission()
        self._logged: set[tuple[IPv4Network, str]] = set()

    # -- policy hooks ----------------------------------------------------------

    async def prepare(self, *, devices_at_sync: bool = False) -> BackendAttrs:
        raise NotImplementedError

    def _plan_peer(self, peer: Peer) -> frozenset[KernelObject]:
        """The objects `peer` needs (using device indexes known right now)."""
        raise NotImplementedError

    def _own_objects(self) -> frozenset[KernelObject]:
        """Objects the backend wants whatever the peers (none by default; wireguard's
        routes to the network). They sit in the plan under the network's key, which no
        peer's subnet can equal."""
        return frozenset()

    def _device_specs(self, own_subnet: IPv4Network | None, own_ipv6: IPv6Network | None
                      ) -> tuple[DeviceSpec, ...]:
        """The devices the backend wants (none by default)."""
        return ()

    async def _converge_devices(self, nl: Kernel, *, repair: bool = False) -> bool:
        """Make the backend's devices what `_device_specs` says; True if anything changed."""
        return False

    async def _scan(self, nl: Kernel, known: Known) -> list[KernelObject]:
        """Read what the kernel has of ours: each entry's identity is told to `known`,
        and the entries it does not know are returned as objects (Netlink.scan_routes).
        DumpInterrupted: read again."""
        raise NotImplementedError

    async def _observe_devices(self, nl: Kernel) -> dict[str, DeviceState | None]:
        """The backend's devices as the kernel has them, by name (None: absent)."""
        return {}

    async def _ensure_ready(self, nl: Kernel) -> bool:
        """Repair the backend's device/address if needed; True if something was repaired."""
        return False

    async def _refresh(self, nl: Kernel) -> None:
        """Re-read host facts the plan depends on (called before each full sync)."""

    async def _program(self, nl: Kernel, changes: PlanDiff
                       ) -> tuple[list[KernelObject], list[KernelObject], list[Failure]]:
        """Make `changes` in the kernel: (removed, added, failures). By default all are
        rtnetlink objects, added first, then removed (each list already in order)."""
        protocol = self._settings.route_protocol
        added, failed_add = await nl.apply(Action.REPLACE, changes.to_add, protocol=protocol)
        removed, failed_rm = await nl.apply(Action.REMOVE, changes.to_remove, protocol=protocol)
        return removed, added, failed_add + failed_rm

    def _watchers(self) -> list[Coroutine[Any, Any, None]]:
        """Tasks `run` keeps beside the netlink watcher and the resync loop (none by
        default; wireguard polls its devices' peers, of which no event tells)."""
        return []

    def _drift_kind(self, event: NetlinkEvent) -> str | None:
        """The kind of drift `event` reveals (it is not ours), or None to ignore it."""
        host = self._settings.host
        if (
            event.kind == "route"
            and event.protocol == self._settings.route_protocol
            and event.table == MAIN_TABLE
            and (event.deleted or event.sender)  # a change by someone else, or any removal
        ):
            return "route"
        if event.kind == "link" and host.iface_index and event.ifindex == host.iface_index:
            # Underlay down/up or gone: the kernel drops routes through it silently.
            return "link"
        return None

    # -- the DataPlane protocol ------------------------------------------------

    async def start(self, own_subnet: IPv4Network, *, own_ipv6: IPv6Network | None = None
                    ) -> None:
        """The lease is held: its subnets give the devices their addresses. `own_ipv6`
        counts only when the data plane works in IPv6 (DataPlaneSettings.ipv6_enabled).
        Devices left to the first sync (`_make_at_sync`) get them there."""
        async with self._lock:
            self._own_subnet = own_subnet
            self._own_ipv6 = own_ipv6 if self._settings.ipv6_enabled else None
            if not self._make_at_sync:
                await self._converge_devices(await self._netlink())

    def spec(self, own_subnet: IPv4Network | None, peers: Mapping[IPv4Network, Peer], *,
             own_ipv6: IPv6Network | None = None) -> BackendSpec:
        skipped = self._conflicting(peers)
        allowed = {s: p for s, p in peers.items() if s not in skipped}
        return BackendSpec(
            devices=self._device_specs(
                own_subnet, own_ipv6 if self._settings.ipv6_enabled else None),
            objects=dict(self._peer_plans(own_subnet, allowed)),
            skipped=skipped,
        )

    # -- this host's own routes and addresses ------------------------------------
    async def _scan_routes(self, nl: Kernel, known: Known) -> list[Route]:
        """Our routes (see Netlink.scan_routes), and from the same dump the host's other
        routes and addresses that overlap the cluster network (`Admission.dumped`, for
        `host_conflict`): every backend's `_scan` reads routes through here."""
        seen: list[HostRoute] = []
        routes = await nl.scan_routes(known, protocol=self._settings.route_protocol,
                                      others=seen.append)
        self._admission.dumped = cluster_relevant(seen, self._networks())
        return routes

    def _networks(self) -> list[IPv4Network | IPv6Network]:
        networks: list[IPv4Network | IPv6Network] = [self._settings.network.network]
        if self._settings.ipv6_enabled and self._settings.network.ipv6_network is not None:
            networks.append(self._settings.network.ipv6_network)
        return networks

    def _note_host_route(self, route: HostRoute, *, deleted: bool) -> bool:
        """A route or address of someone else came or went (a netlink event): from now
        on peers are judged with it, at once (a lease arriving next must not replace a
        route just added), and a full pass plans them all again. True if it matters."""
        if not cluster_relevant((route,), self._networks()):
            return False
        return self._admission.note_host_route(route, deleted=deleted)

    async def _read_host_routes(self, nl: Kernel) -> None:
        """Read the host's routes once, before anything is planned (later passes use
        their own dump's)."""
        if self._admission.host_routes is None:
            await read_again(lambda: self._scan_routes(nl, lambda _ident: True))
            self._admission.host_routes = self._admission.dumped

    def _claims(self, peer: Peer) -> Claims:
        """What `peer` claims that only one host may hold, each with the address that
        holds it: (what, claim, holder; core.kerneldiff.Claims). Base: nothing; vxlan:
        its VtepMACs (a lease planted with another host's VtepMAC would route its subnet
        to that host's VTEP, and give that host an FDB entry for its own MAC)."""
        return ()

    def _own_claims(self) -> frozenset[str]:
        """The claimed values this host holds itself (vxlan: its devices' MACs)."""
        return frozenset()

    def _conflicting(self, peers: Mapping[IPv4Network, Peer]) -> dict[IPv4Network, str]:
        """The peers that must not be programmed here (Admission.judge), each logged
        once; `status.conflicting_peers` says them all."""
        out = self._admission.judge(peers, self._claims, self._own_claims())
        for subnet, why in out.items():
            self._log_conflict(peers[subnet], why)
        self.status.conflicting_peers = out
        return out

    def _log_conflict(self, peer: Peer, why: str) -> None:
        if (peer.subnet, why) in self._logged:
            return
        self._logged.add((peer.subnet, why))
        node = f", node {peer.node_id}" if peer.node_id else ""
        log.error("peer %s (%s%s) not programmed: %s; fix the lease or the host",
                  peer.subnet, peer.public_ip, node, why)

    def _peer_plans(self, own_subnet: IPv4Network | None, peers: Mapping[IPv4Network, Peer]
                    ) -> Iterator[tuple[IPv4Network, frozenset[KernelObject]]]:
        """The plan, a peer at a time: each peer's subnet (but ours) with its objects,
        then the backend's own objects under the network's key (if any)."""
        for subnet, peer in peers.items():
            if subnet != own_subnet:
                yield subnet, self._plan_peer(peer)
        own = self._own_objects()
        if own:
            yield self._settings.network.network, own

    def _planned_again(self, key: IPv4Network, peers: Mapping[IPv4Network, Peer]
                       ) -> frozenset[KernelObject]:
        """The objects `_peer_plans` gave under `key`."""
        if key == self._settings.network.network and key not in peers:
            return self._own_objects()
        peer = peers.get(key)
        return self._plan_peer(peer) if peer is not None else frozenset()

    async def current(self, nl: Kernel) -> set[KernelObject]:
        """Everything of ours the kernel has, as objects."""
        return set(await read_again(lambda: self._scan(nl, nothing_known)))

    async def observe(self) -> Observation:
        async with self._lock:
            nl = await self._netlink()
            devices = await self._observe_devices(nl)
            await self._refresh(nl)
            objects = frozenset(await self.current(nl))
            self._admission.host_routes = self._admission.dumped  # what `spec` judges peers by
            return Observation(devices=devices, objects=objects)

    async def sync(self, peers: Mapping[IPv4Network, Peer], *,
                   ready: Awaitable[object] | None = None) -> None:
        async with self._lock:
            started = time.monotonic()
            try:
                nl = await self._netlink()
            except BaseException:
                await _done(ready)
                raise
            await self._full_sync(nl, peers, repair=False, ready=ready, started=started)

    async def update(self, changes: PeerChanges, peers: Mapping[IPv4Network, Peer], *,
                     ready: Awaitable[object] | None = None) -> None:
        if not changes:
            await _done(ready)
            return
        async with self._lock:
            with memory.collector_paused():
                await self._update(changes, peers, ready)

    async def _update(self, changes: PeerChanges, peers: Mapping[IPv4Network, Peer],
                      ready: Awaitable[object] | None) -> None:
        try:
            nl = await self._netlink()
            await self._read_host_routes(nl)
            to_change = self._plan_update(changes, peers)
        finally:
            await _done(ready)
        affected = {p.subnet for p in chain(changes.added, changes.changed, changes.removed)}
        failures = await self._apply(nl, to_change, repair=False, peers={
            k: self._applied.peers[k] for k in affected if k in self._applied.peers},
            decided=affected)
        if failures:
            self.status.in_sync = False

    def _plan_update(self, changes: PeerChanges, peers: Mapping[IPv4Network, Peer]) -> PlanDiff:
        """What `update` changes in the kernel; `_applied` says the plan with the
        changes from now on."""
        if not changes.added and not changes.changed and not any(
                p.subnet in peers for p in changes.removed):
            return self._plan_removal(changes.removed, peers)
        affected = {p.subnet for p in chain(changes.added, changes.changed, changes.removed)}
        own = self._own_claims()
        was_foreign = self._admission.foreign & affected
        self._note_foreign(affected, peers)
        old: set[KernelObject] = set()
        new: set[KernelObject] = set()
        released: set[str] = set()  # the claims of peers gone or changed
        for subnet in affected:
            before, planned = self._applied.drop(subnet, self._plan_peer)
            peer = peers.get(subnet)
            if before is not None:
                held = self._claims(before)
                released.update(claim for _what, claim, _holder in held)
                self._admission.unclaim(before, held)
                if subnet not in self._admission.foreign:  # another type now: kept meanwhile
                    old |= planned
            if peer is None and subnet in was_foreign:
                # What was kept for it goes with a full pass (nothing here knows it).
                self._ask_full_pass()
            claims = self._claims(peer) if peer is not None else ()
            conflict = (self._admission.conflict(peer, claims, own) if peer is not None
                        else None)
            if conflict is not None:
                assert peer is not None
                self._log_conflict(peer, conflict)
                self.status.conflicting_peers[subnet] = conflict
            else:
                self.status.conflicting_peers.pop(subnet, None)
            if peer is not None and subnet != self._own_subnet and conflict is None:
                self._admission.claim(peer, claims)
                new |= self._applied.add(peer, self._plan_peer)
        self._reconsider_refused(released, peers, affected)
        return self._applied.change(old, new, synced=self._synced)

    def _plan_removal(self, removed: list[Peer], peers: Mapping[IPv4Network, Peer]
                      ) -> PlanDiff:
        """`_plan_update` of changes that only remove peers `peers` no longer has (a mass
        expiry), in fewer steps a peer (`AppliedPlan.drop_all`): the same bookkeeping
        and the same objects removed."""
        subnets = [p.subnet for p in removed]
        was_foreign = self._admission.foreign.intersection(subnets)
        self._note_foreign(subnets, peers)  # none of them is foreign now (not in `peers`)
        if was_foreign:
            # What was kept for them goes with a full pass (nothing here knows it).
            self._ask_full_pass()
        conflicting = self.status.conflicting_peers
        for subnet in subnets:
            conflicting.pop(subnet, None)
        gone, unwanted = self._applied.drop_all(subnets, self._plan_peer)
        released: set[str] = set()
        for before in gone:
            held = self._claims(before)
            released.update(claim for _what, claim, _holder in held)
            self._admission.unclaim(before, held)
        self._reconsider_refused(released, peers, ())
        return diff_found((), (), unwanted if self._synced else ())

    def _reconsider_refused(self, released: set[str], peers: Mapping[IPv4Network, Peer],
                            judged: Iterable[IPv4Network]) -> None:
        """A full pass if a peer refused for a claim (a VtepMAC another peer held) wants one
        of the `released` claims: it may have it now, at once rather than at the next
        periodic pass. Peers just `judged` are not asked about."""
        if not released:
            return
        skip = set(judged)
        for subnet in self.status.conflicting_peers.keys() - skip:
            peer = peers.get(subnet)
            if peer is not None and any(claim in released
                                        for _what, claim, _holder in self._claims(peer)):
                self._ask_full_pass()
                return

    def _ask_full_pass(self) -> None:
        """Queue a full pass (what an event or a plan cannot mend alone: a peer refused
        for a claim another held, once that one is gone or changed; `Admission`) and wake
        the loop."""
        self._work.full = True
        self._wake.set()

    async def run(self, get_peers: Callable[[], Mapping[IPv4Network, Peer]]) -> None:
        await first_to_end(self._watch_events(), self._resync_loop(get_peers),
                           *self._watchers())
        raise DataPlaneError("data-plane task ended unexpectedly")

    async def remove(self, *, objects: bool = True) -> None:
        async with self._lock:
            nl = await self._netlink()
            if objects:
                current = await self.current(nl)
                await self._apply(nl, diff((), current), repair=False)
            for spec in self._device_specs(self._own_subnet, self._own_ipv6):
                state = await nl.device_state(spec.name)
                if state is not None:
                    await nl.delete_link(state.index)
                    log.info("removed %s (the backend is rebuilt)", spec.name)
            self._applied.clear()
            self._synced = False
            self.status.in_sync = False

    async def step_aside(self) -> bool:
        return False  # a backend whose devices can stand beside themselves overrides these

    async def step_back(self) -> None:
        return None

    async def clear_the_way(self) -> None:
        return None  # only vxlan devices can be in another's way (VxlanBackend)

    async def take_over(self, in_use: Callable[[], Collection[str]]) -> KeptDevices | None:
        nl = await self._netlink()
        found = kept.unused(await nl.links(), {d.name for d in self.spec(None, {}).devices})
        for link in found:
            log.info("taking over %s, a device of ours the network config does not use (a "
                     "rebuild's, left by an agent stopped within its hold): kept, guarded, "
                     "until --peer-hold-time after no peer runs another type", kept.describe(link))
        return KeptDevices(self._settings, found, in_use) if found else None

    async def close(self) -> None:
        if self._nl is not None:
            self._nl.close()
            self._nl = None

    # -- mechanics ---------------------------------------------------------------

    async def _netlink(self) -> Kernel:
        if self._nl is None:
            self._nl = await self._settings.open_kernel()
        return self._nl

    async def _full_sync(self, nl: Kernel, peers: Mapping[IPv4Network, Peer], *,
                         repair: bool, ready: Awaitable[object] | None = None,
                         started: float | None = None) -> None:
        """Plan the whole peer set, compare with the kernel, then (once `ready` is done)
        make the changes; `started` is when the caller began (for the pass's duration)."""
        started = time.monotonic() if started is None else started
        # The peer set as it is now: the caller's mapping (the watcher's own) keeps
        # changing while the pass awaits, and what it gains meanwhile comes to `update`
        # after this pass, which must then find it not yet programmed.
        peers = {subnet: peer for subnet, peer in peers.items() if subnet != self._own_subnet}
        try:
            if self._make_at_sync:
                # The devices prepare left to make (the agent's start), with the MACs
                # the lease names; the peers' objects need their indexes.
                await self._converge_devices(nl)
                self._make_at_sync = False
            await self._read_host_routes(nl)
            skipped = self._conflicting(peers)
            peers = {subnet: peer for subnet, peer in peers.items() if subnet not in skipped}
            plan, changes = await self._full_plan(nl, peers)
        finally:
            await _done(ready)
        if self._admission.dumped != self._admission.host_routes:
            # The host's routes changed since the last pass: plan again with them (a peer
            # may conflict now, or no longer), level-triggered like everything else.
            self._admission.host_routes = self._admission.dumped
            self._ask_full_pass()
        await self._full_apply(nl, peers, plan, changes, repair=repair, started=started)
        # The pass's dumps, plan and changes were its peak: what glibc keeps of them
        # would stay in the RSS until the next pass (leaseagent.memory).
        del plan, changes
        memory.trim()

    async def _full_plan(self, nl: Kernel, peers: Mapping[IPv4Network, Peer]
                         ) -> tuple[dict[int, int], PlanDiff]:
        """A full sync's counts of wanting peers per object (`_applied` once applied), and how
        the kernel differs from the plan (nothing changed yet).

        The plan is made a peer at a time and only each object's identity is kept, with
        the key it was planned under: the objects the kernel lacks are planned again
        after the tables were read (usually none), and all of them only when the kernel
        holds some that are not planned. The first pass keeps the objects instead (at a
        join the kernel lacks them all). With 5,000 peers the 15,000
        objects, their per-peer sets and a second index of them were the largest part
        of every pass's peak, which the allocator keeps."""
        await self._refresh(nl)
        self._admission.foreign.clear()
        self._note_foreign(peers, peers)
        # The first pass (a join, or a start over a kernel already programmed) keeps
        # its objects: at a join the kernel lacks them all, and each would be planned
        # again (its peak is that of the objects to add, held either way).
        full = FullPass(self._peer_plans(self._own_subnet, peers), keep=not self._synced)
        self._work.removing.clear()  # echoes of earlier removals have come by now
        return full.uses, await read_again(lambda: self._compare(nl, peers, full))

    async def _full_apply(self, nl: Kernel, peers: Mapping[IPv4Network, Peer],
                          uses: dict[int, int], changes: PlanDiff, *, repair: bool,
                          started: float) -> None:
        """Make the changes of a full sync and keep its plan (its peers, `uses`)."""
        failures = await self._apply(nl, changes, repair=repair, peers=self._programmed_of(peers),
                                     decided=None)
        self._applied.replace(peers, uses)
        self._synced = True
        self.status.in_sync = not failures
        if not failures:
            self.status.last_error = None
        self.status.reconciles.observe(time.monotonic() - started)

    async def _compare(self, nl: Kernel, peers: Mapping[IPv4Network, Peer], full: FullPass
                       ) -> PlanDiff:
        """How the kernel differs from `full`'s plan, read as it streams in (`_scan`;
        core.kerneldiff.Reading)."""
        reading = full.reading()
        stale = await self._scan(nl, reading.known)  # read_again's retries come from in here
        stale = self._admission.not_kept(stale, peers)
        return reading.finish(
            stale, planned_again=lambda key: self._planned_again(key, peers),
            whole_plan=lambda: (obj for _key, objects in self._peer_plans(self._own_subnet, peers)
                                for obj in objects))

    def planned(self) -> Iterator[KernelObject]:
        """The objects of the last applied plan (planned again from its peers)."""
        yield from self._own_objects()
        yield from self._applied.objects(self._plan_peer)

    def _note_foreign(self, subnets: Iterable[IPv4Network],
                      peers: Mapping[IPv4Network, Peer]) -> None:
        """Keep `Admission.foreign` right for `subnets` (peers of another backend type);
        log each such peer once."""
        for peer, other in self._admission.note_foreign(subnets, peers, self._runs_other):
            if (peer.subnet, other) not in self._logged:
                self._logged.add((peer.subnet, other))
                node = f", node {peer.node_id}" if peer.node_id else ""
                log.warning("peer %s (%s%s) runs %s, which this host's %s backend does "
                            "not serve: not programmed (what the kernel has for it is kept "
                            "until it switches)", peer.subnet, peer.public_ip, node, other,
                            self.backend_type)
        self.status.foreign_peers = len(self._admission.foreign)

    def _runs_other(self, peer: Peer) -> str | None:
        """What `peer` runs instead of this backend (None: this backend serves it;
        core.profiles.base.runs_other, the one rule)."""
        return runs_other(peer, self.backend_type, self._settings.network.options)

    def _programmed_of(self, peers: Mapping[IPv4Network, Peer]) -> Mapping[IPv4Network, Peer]:
        """Of `peers`, those a plan gives objects (not our own subnet, not a peer of another
        backend type or one in conflict with this host's routes)."""
        return {k: p for k, p in peers.items()
                if k != self._own_subnet and k not in self._admission.foreign
                and k not in self.status.conflicting_peers}

    def _sort_refusals(self, failures: list[Failure], peers: Mapping[IPv4Network, Peer],
                       decided: Iterable[IPv4Network] | None) -> list[Failure]:
        """Put the refusals of `peers`' objects in `status.refused_peers` (which peer,
        what, why; logged once per peer and reason) and return the others (this host's
        own). `decided`: the peers this pass tried all of (None: every peer, so the
        others are not refused any more); the rest keep their entries."""
        by_peer: dict[IPv4Network, str] = {}
        own: list[Failure] = []
        if failures:
            owner: dict[KernelObject, IPv4Network] = {}
            for key, peer in peers.items():
                for obj in self._plan_peer(peer):
                    owner.setdefault(obj, key)
            for failure in failures:
                owned = owner.get(failure.obj)
                if owned is None:
                    own.append(failure)
                else:
                    key = owned
                    host = self._settings.host
                    shown = render_object(failure.obj, {host.iface_index: host.iface or "?"})
                    why = str(failure.error).rsplit(": ", 1)[-1]  # the kernel's strerror
                    by_peer.setdefault(key, f"{shown} ({why})")
        refused = self.status.refused_peers
        if decided is None:
            before = dict(refused)
            refused.clear()
        else:
            before = {key: refused.pop(key) for key in decided if key in refused}
        refused.update(by_peer)
        for key, why in by_peer.items():
            if before.get(key) != why:
                log.warning("peer %s (%s) cannot be programmed: the kernel refused %s; it is "
                            "unreachable from this host, retried at every resync (the other "
                            "peers are not affected)", key, peers[key].public_ip, why)
        for key in before.keys() - by_peer.keys():
            if key in peers:
                log.info("peer %s programmed now (the kernel took what it refused)", key)
        return own

    async def _apply(self, nl: Kernel, changes: PlanDiff, *, repair: bool,
                     peers: Mapping[IPv4Network, Peer] | None = None,
                     decided: Iterable[IPv4Network] | None = ()) -> list[Failure]:
        """Make `changes`; the refusals that are not a peer's (`_sort_refusals`, for the
        objects of `peers` in a pass that tried `decided`)."""
        self._work.removes(changes.to_remove)
        removed, added, failures = await self._program(nl, changes)
        self.status.removed.update(objects_by_kind(removed))
        self.status.added.update(objects_by_kind(added))
        if repair:
            # Still the plan before this pass: what it wanted and the kernel lost, or
            # what the kernel held beyond it (the module docstring).
            restored = [obj for obj in added if self._applied.wants(obj)]
            cleared = [obj for obj in removed if not self._applied.wants(obj)]
            self.status.repairs.update(objects_by_kind(chain(restored, cleared)))
            if restored or cleared:
                log.info(
                    "data plane drift repaired: %s restored, %s removed",
                    objects_by_kind(restored) or "nothing", objects_by_kind(cleared) or "nothing",
                )
        failures = self._sort_refusals(failures, peers or {}, decided)
        if failures:
            self.status.last_error = str(failures[0].error)
            log.warning(
                "data plane: %d of %d changes refused by the kernel (retried at next resync); "
                "first: %s",
                len(failures), len(changes.to_add) + len(changes.to_remove), failures[0].error,
            )
        return failures

    async def _resync(self, get_peers: Callable[[], Mapping[IPv4Network, Peer]]) -> None:
        async with self._lock:
            nl = await self._netlink()
            if await self._ensure_ready(nl):
                self.status.repairs["device"] += 1
            if self._synced:
                await self._full_sync(nl, get_peers(), repair=True)

    async def _repair(self, objects: set[KernelObject]) -> None:
        """Put back those of `objects` the last applied plan still holds (no dump)."""
        async with self._lock:
            objects = {obj for obj in objects if self._applied.wants(obj)}
            if not objects:
                return
            nl = await self._netlink()
            ordered = diff(objects, ()).to_add  # neighbour -> FDB -> route
            if await self._apply(nl, PlanDiff(ordered, ()), repair=True,
                                 peers=self._applied.peers, decided=()):
                self.status.in_sync = False

    async def _resync_loop(self, get_peers: Callable[[], Mapping[IPv4Network, Peer]]) -> None:
        backoff = Backoff()
        while True:
            period = self._settings.resync_seconds
            timeout = period * self._rng.uniform(1 - RESYNC_JITTER, 1 + RESYNC_JITTER)
            periodic = False
            try:
                await within(self._wake.wait(), timeout)
                await asyncio.sleep(DEBOUNCE_SECONDS)
            except TimeoutError:
                periodic = True
            # Cleared before the pass: an event during it triggers another one.
            self._wake.clear()
            full, repairs = self._work.take()
            full = full or periodic
            try:
                if full:
                    await self._resync(get_peers)
                else:
                    await self._repair(repairs)
            except DataPlaneError as exc:
                self.status.in_sync = False
                self.status.last_error = str(exc)
                delay = backoff.next_delay()
                log.warning("data plane resync failed (retrying in %.1fs): %s", delay, exc)
                await asyncio.sleep(delay)
                self._ask_full_pass()
            else:
                backoff.reset()

    def _note_event(self, event: NetlinkEvent) -> None:
        """Queue the work an event of someone else calls for, and wake the loop."""
        if (event.host_route is not None and event.protocol != self._settings.route_protocol
                and self._note_host_route(event.host_route, deleted=event.deleted)):
            self._ask_full_pass()
            return
        kind = self._drift_kind(event)
        if kind is None:
            return
        if not self._work.note(kind, deleted=event.deleted, obj=event.obj,
                               planned=self._applied):
            return
        log.debug("netlink event %s: %s drift", event, kind)
        self._wake.set()

    async def _watch_events(self) -> None:
        backoff = Backoff()
        first = True
        while True:
            try:
                events = await (await self._netlink()).events()
            except DataPlaneError as exc:
                delay = backoff.next_delay()
                log.warning("cannot watch netlink events (retrying in %.1fs): %s", delay, exc)
                await asyncio.sleep(delay)
                continue
            if not first:
                # Whatever happened while we were deaf is found by a full resync.
                self._ask_full_pass()
            first = False
            try:
                nl = await self._netlink()
                # Echoes of our own requests are dropped unparsed (by port id), and so
                # are neighbour and FDB additions told with port id 0 (every FDB echo of
                # a join): no `_drift_kind` takes an addition without a sender.
                own_ports = nl.port_ids
                while True:
                    for event in await events.receive(ignore=own_ports,
                                                      unsent_additions=False):
                        self._note_event(event)
                    backoff.reset()
            except DataPlaneError as exc:
                log.warning("netlink event socket lost, reopening: %s", exc)
            finally:
                events.close()
            await backoff.sleep()
