"""The lease holder: the one writer of this host's lease key, and its state machine.

    HELD --renewal due, renewed--------------------------------> HELD
    HELD --renewal: the etcd lease is gone (LeaseLost)---------> LOST
    HELD --our key deleted or overwritten (watch)--------------> LOST
    HELD --news of our key: an echo of our write, stale news---> HELD
    HELD --a twin (this host's identity) with a younger key----> HELD (it steps back)
    HELD --a twin with an older key: ours given up-------------> CONFLICT
    HELD --refit (a config change)-----------------------------> HELD (fitted or as it was)
    LOST --taken back (the same subnet, else a new one)--------> HELD
    LOST --a twin holds our key--------------------------------> CONFLICT
    CONFLICT --the twin's key is gone--------------------------> LOST

etcd unreachable past the TTL since the last renewal leaves the state as it is
but marks the lease as run out by this host's clock (leaseagent_lease_held 0);
the renewal goes on and the next answer from etcd decides. The kernel is
never touched here: what the holder takes is handed to `adopt` (subnet.env,
the backend's own addresses).

Events come from the lease watcher (news of our key, a twin) and from the
config change (`refit`); `run` waits for the next one or the renewal due,
and `step` handles one: tests drive `step` with a clock of their own.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace

from leaseagent.agent.etcdhealth import EtcdHealth
from leaseagent.agent.leasing import Leasing, OwnLease
from leaseagent.agent.logs import StateLog
from leaseagent.core.leases import Verdict, decode_lease_value
from leaseagent.errors import IdentityConflict, InvalidLease, LeaseLost, StoreTimeout, StoreUnavailable
from leaseagent.metrics import Metrics
from leaseagent.retrying import Backoff, retrying
from leaseagent.store.base import KeyValue, LeaseStore
from leaseagent.waiting import within

log = logging.getLogger("leaseagent")

# While another agent has this host's identity, its key is read at most this far apart.
CONFLICT_CHECK_SECONDS = 60.0


class HolderState(enum.Enum):
    HELD = "held"
    LOST = "lost"  # being taken back
    CONFLICT = "conflict"  # another agent has this host's identity: sitting out


@dataclass(frozen=True)
class OwnKeySeen:
    """The watcher's news of our key: `key` (ours when it was seen), as it is (None if
    absent), at `revision`."""

    key: str | None
    kv: KeyValue | None
    revision: int


@dataclass(frozen=True)
class Refit:
    """A request: fit our lease to the network config in force (`Leasing.refit`) and
    adopt it; `done` gets the lease, or the error."""

    done: asyncio.Future[OwnLease]


@dataclass(frozen=True)
class RenewalDue:
    """No event came before the renewal was due."""


# What the holder is told: news of our key, a key of a twin, a refit, or the time.
HolderEvent = OwnKeySeen | Verdict | Refit | RenewalDue

# How a lease is adopted: (the lease, first: at start, changed: another key than before).
Adopt = Callable[[OwnLease, bool, bool], Awaitable[None]]


class LeaseHolder:
    def __init__(self, own: OwnLease, leasing: Leasing, store: LeaseStore, *,
                 etcd: EtcdHealth, metrics: Metrics, states: StateLog, adopt: Adopt,
                 status: Callable[[str], object], renew_margin: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.own = own
        self.leasing = leasing
        self._store = store
        self._etcd = etcd
        self._metrics = metrics
        self._states = states
        self._adopt = adopt
        self._status = status  # STATUS= while in conflict
        self._renew_margin = renew_margin  # flanneld's --subnet-lease-renew-margin
        self._clock = clock
        self.state = HolderState.HELD
        self.conflict: str | None = None  # while another agent has this host's identity
        self._events: asyncio.Queue[HolderEvent] = asyncio.Queue()
        # Keys given up on purpose (a config change moved us): news of them as a twin's
        # is stale.
        self._given_up: set[str] = set()
        self._last_renewal = clock()
        # When our etcd lease runs out unless renewed, by this host's clock (`clock`), and
        # whether it has: etcd unreachable past it.
        self._runs_out = math.inf
        self.ran_out = False

    # --- what others tell it ---------------------------------------------------------

    @property
    def held(self) -> bool:
        """The lease is held (not lost, not given up to a twin)."""
        return self.state is HolderState.HELD

    def own_key_seen(self, kv: KeyValue | None, revision: int) -> None:
        """The watcher's news of our key (with the key: the holder may move it meanwhile)."""
        self._events.put_nowait(OwnKeySeen(self.own.key, kv, revision))

    def twin_seen(self, twin: Verdict) -> None:
        """A key that names this host's identity (the watcher's verdict on it)."""
        self._events.put_nowait(twin)

    async def refit(self) -> OwnLease:
        """Our lease fitted to the network config in force (`Leasing.reconfigure` was
        told it), by the holder's task: the one writer of our key."""
        done: asyncio.Future[OwnLease] = asyncio.get_running_loop().create_future()
        self._events.put_nowait(Refit(done))
        return await done

    # --- adopting a lease --------------------------------------------------------------

    async def take(self, own: OwnLease, *, first: bool) -> None:
        """Hold `own` from now on and adopt it (`adopt`: subnet.env, the backend)."""
        changed = self.own.key != own.key
        self.own = own
        self._set_state(HolderState.HELD)
        self._renewed(own, at=self._clock(), ttl=own.ttl)
        self._metrics.lease_expiry.set(math.inf if own.reservation else time.time() + own.ttl)
        self._metrics.lease_ttl.set(math.inf if own.reservation else own.ttl)
        await self._adopt(own, first, changed)

    def _set_state(self, state: HolderState) -> None:
        self.state = state
        self._show_held()

    def _show_held(self) -> None:
        """leaseagent_lease_held: 1 while the lease is held, also by its TTL (an etcd
        outage longer than the TTL since the last renewal: it can no longer be held)."""
        self._metrics.lease_held.set(1 if self.held and not self.ran_out else 0)

    def _renewed(self, own: OwnLease, *, at: float, ttl: int) -> None:
        """Our etcd lease holds for `ttl` seconds from `at` (the holder's clock: a grant or
        renewal sent then)."""
        self._runs_out = math.inf if own.reservation else at + ttl
        self.ran_out = False
        self._show_held()

    def _run_out(self, own: OwnLease) -> None:
        """No renewal reached etcd within the TTL: the lease is gone by our clock (etcd
        may hand the subnet to another host). The kernel stays as it is; the holder takes
        the lease back when etcd answers."""
        self.ran_out = True
        self._show_held()
        log.warning("lease on %s ran out by this host's clock (not renewed within its %ds "
                    "TTL); keeping the data plane, taking it back when etcd answers",
                    own.subnet, own.ttl)

    # --- the state machine -------------------------------------------------------------

    def renewal_due_in(self) -> float | None:
        """Seconds until the next renewal (None: a reservation is never renewed). Every
        TTL/3 counted from the last renewal, however many events about our key arrive in
        between; with --subnet-lease-renew-margin, also at least that long before expiry."""
        own = self.own
        if own.reservation:
            return None
        interval = own.ttl / 3
        if self._renew_margin is not None:
            interval = min(interval, own.ttl - self._renew_margin)
        return max(0.0, self._last_renewal + max(0.5, interval) - self._clock())

    async def run(self) -> None:
        """Hold the lease for ever: each event, or the renewal, in turn."""
        self._last_renewal = self._clock()
        while True:
            await self.step(await self.next_event())

    async def next_event(self) -> HolderEvent:
        try:
            return await within(self._events.get(), self.renewal_due_in())
        except TimeoutError:
            return RenewalDue()

    async def step(self, event: HolderEvent) -> None:
        """Handle one event (see the module's diagram)."""
        own = self.own
        if isinstance(event, Verdict):
            await self._twin_seen(own, event)
        elif isinstance(event, Refit):
            if await self._refit(own, event.done):
                self._last_renewal = self._clock()
        elif isinstance(event, OwnKeySeen):
            why = self._says_lost(event)
            if why is not None:
                await self._take_back(own, why)
        else:
            try:
                await self._renew(own)
                self._last_renewal = self._clock()
            except LeaseLost as exc:
                await self._take_back(own, str(exc))

    def _says_lost(self, seen: OwnKeySeen) -> str | None:
        """Why news of our key means the lease is lost, if it does."""
        own = self.own
        if seen.key != own.key:
            return None  # news of a key we held before (a config change moved us)
        if seen.revision < own.mod_revision:
            # Seen before our latest write of the key (a watch catching up after an
            # outage, the expiry we already took the key back from): stale news. Acting
            # on it would take the key over again, and the echo of that write would
            # arrive stale in turn: a loop.
            return None
        if seen.kv is None:
            return "our key was deleted"
        if seen.kv.value != own.value or seen.kv.lease != own.lease_id:
            return "our key was overwritten"
        self.own = replace(own, mod_revision=seen.kv.mod_revision)
        return None

    async def _take_back(self, own: OwnLease, why: str) -> None:
        """LOST: take the lease back (create-if-absent: the same subnet, else a new one);
        while a twin holds our key, sit out (CONFLICT) and then try again."""
        self._set_state(HolderState.LOST)
        log.warning("lease on %s lost: %s; taking it back", own.subnet, why)
        while True:
            try:
                new: OwnLease = await retrying(on_retry=self._etcd.down)(self.leasing.reclaim, own, why)
                break
            except IdentityConflict as conflict:
                await self._sit_out(conflict)  # the key is free again: take it back
        self._etcd.up()
        await self.take(new, first=False)
        self._last_renewal = self._clock()
        if new.subnet == own.subnet:
            log.info("lease on %s taken back", new.subnet)

    async def _renew(self, own: OwnLease) -> None:
        failed = False

        def on_retry(exc: BaseException) -> None:
            nonlocal failed
            failed = True
            self._metrics.renewal_failures.inc()
            self._etcd.down(exc)

        # Retry faster than the TTL runs out; keep trying past it (etcd then tells us it
        # is gone). After a timeout at once: it waited the timeout already, and it then
        # takes the next member's turn (leaseagent.retrying).
        ttl = 0
        sent = self._clock()
        runs_out = (asyncio.get_running_loop().call_later(
            self._runs_out - sent, self._run_out, own)
                    if math.isfinite(self._runs_out) else None)
        try:
            async for attempt in retrying(cap=max(0.5, min(5.0, own.ttl / 6)), on_retry=on_retry,
                                          at_once_after=(StoreTimeout,)):
                with attempt:
                    sent = self._clock()
                    ttl = await self.leasing.keepalive(own)
        finally:
            if runs_out is not None:
                runs_out.cancel()
        self._metrics.renewals.inc()
        self._renewed(own, at=sent, ttl=ttl)
        self._metrics.lease_expiry.set(time.time() + ttl)
        self._etcd.up()
        if failed:
            log.info("lease on %s renewed after failures", own.subnet)

    async def _refit(self, own: OwnLease, done: asyncio.Future[OwnLease]) -> bool:
        """Fit our lease to the network config in force and adopt it; `done` gets the lease
        or the error. True if the lease is another one now (renewals count from now)."""
        try:
            new: OwnLease = await retrying(on_retry=self._etcd.down)(self.leasing.refit, own)
            self._etcd.up()
            if new.subnet != own.subnet:
                self._given_up.add(own.key)
                self._metrics.lease_changes.inc()
                log.error("SUBNET MOVED: %s (a network config change); took %s and gave %s "
                          "up (restart Docker to use the new subnet)",
                          self.leasing.network.check_subnet(own.subnet), new.subnet, own.subnet)
            await self.take(new, first=False)
        except Exception as exc:  # the lease is as it was (SubnetsExhausted, ...)
            done.set_exception(exc)
            return False
        done.set_result(new)
        return new.lease_id != own.lease_id

    # --- two agents with one identity --------------------------------------------------

    async def _twin_seen(self, own: OwnLease, twin: Verdict) -> None:
        """Another key names this host's PublicIP and node id (both agents started at once
        and took a subnet each): the younger key steps back, the older stays."""
        value = twin.value
        if (value is None or self.conflict is not None or twin.key == own.key
                or twin.key in self._given_up):
            return  # judged before our key changed (a config change): stale
        what = (f"another agent with this host's identity (node id {value.node_id}, "
                f"PublicIP {value.public_ip}) holds {twin.key}")
        if (twin.create_revision, twin.key) > (own.create_revision, own.key):
            self._states.set("twin", twin.key, "%s (younger than our %s); it steps back",
                             what, own.key, level=logging.WARNING)
            return
        try:
            await self.leasing.give_up(own)
        except StoreUnavailable:
            pass  # our etcd lease runs out by itself; peers see it go
        self._set_state(HolderState.CONFLICT)
        await self._sit_out(IdentityConflict(twin.key, f"{what} (older than our {own.key}, "
                                                       f"which was given up)"))
        await self._take_back(own, "given up to an agent with this host's identity")

    async def _sit_out(self, conflict: IdentityConflict) -> None:
        """CONFLICT: say so once, stay out of the twin's way, and only read (with a growing,
        jittered pause, at most CONFLICT_CHECK_SECONDS) until the key it holds is free.
        The data plane is left as it is."""
        self._set_state(HolderState.CONFLICT)
        self.conflict = str(conflict)
        self._status(f"identity conflict: {conflict}")
        self._metrics.identity_conflict.set(1)
        self._metrics.identity_conflicts.inc()
        log.error("IDENTITY CONFLICT: %s. This agent steps back and changes nothing in etcd "
                  "until that key is gone. Check whether this machine is a clone of another "
                  "(same /etc/machine-id: give each host its own --node-id) or whether "
                  "leaseagent runs twice on this host.", conflict)
        backoff = Backoff(cap=CONFLICT_CHECK_SECONDS)
        while True:
            await backoff.sleep()
            if await self._twin_gone(conflict.key):
                break
        log.warning("identity conflict over: %s is no longer held by a twin; taking our "
                    "lease back", conflict.key)
        refits = []
        while not self._events.empty():
            event = self._events.get_nowait()  # what happened meanwhile is stale ...
            if isinstance(event, Refit):
                refits.append(event)  # ... but a config change still waits to be applied
        for refit in refits:
            self._events.put_nowait(refit)
        self.conflict = None
        self._set_state(HolderState.LOST)
        self._metrics.identity_conflict.set(0)

    async def _twin_gone(self, key: str) -> bool:
        """Whether `key` no longer holds a twin's lease (False while etcd is unreachable)."""
        try:
            kv = await self._store.get(key)
        except StoreUnavailable as exc:
            self._etcd.down(exc)
            return False
        self._etcd.up()
        if kv is None:
            return True
        try:
            return not self.leasing.is_twin(decode_lease_value(kv.value))
        except InvalidLease:
            return True

    # --- leaving -------------------------------------------------------------------------

    async def release(self) -> None:
        """Give the lease up on purpose (--release-on-exit), retried while etcd is away."""
        await retrying(cap=1.0)(self.leasing.release, self.own)
