"""Acquiring this host's subnet lease and taking it back when it is lost.

Order of acquisition (first that works wins):
 1. a lease that already names this host (same PublicIP and NodeID, or same
    PublicIP and no NodeID: flanneld's, from before this host switched), attached
    to an etcd lease: taken over by a transaction fenced on its mod_revision,
    re-attached to our new etcd lease; the old etcd lease is then revoked;
 2. a reservation for this PublicIP (a key with no etcd lease): used as is,
    never given a TTL (its value is updated, fenced, to publish our
    BackendData);
 3. the subnet of a previous subnet.env, with create-if-absent;
 4. a random free subnet (among all free ones): CANDIDATES_PER_TXN random free
    subnets go into one transaction that creates the first of them still
    absent, so a host that loses the race for its first pick usually wins its
    second in the same round trip; if all are gone it lists again after a
    short jitter and picks anew; it never exits because of a race.
An empty range raises SubnetsExhausted naming the network and the count.

Dual-stack (the network config has IPv6): a lease's key names both subnets
(`10.5.34.0-24&fd00:5:0:22::-64`). A new lease's IPv6 subnet is the one at
the same position in the IPv6 range as its IPv4 subnet in the IPv4 range, so
two hosts that won different IPv4 subnets in etcd (which only guards whole
key names) can never take the same IPv6 subnet; if that one is taken (a
flanneld lease picks its IPv6 subnet at random), or the IPv6 range is the
smaller, a random free one. A lease of this host (rules 1 and 2) whose key
does not fit the config (no IPv6 part though IPv6 is on, or one though it is
off) keeps its IPv4 subnet: it is *moved* to the right key in one
transaction (delete the old key if unchanged + create the new one if absent,
LeaseStore.move), so no moment exists in which another host could take the
IPv4 subnet, and nobody is renumbered (flannel deletes such a lease and
allocates a new IPv4 subnet; pkg/subnet/etcd/local_manager.go,
isIPv6SubnetConfigCompat).

When the network config changes while the agent runs (`reconfigure`, then
`refit`; docs/architecture.md, "Config changes"), the same rules decide: a
lease whose IPv4 subnet the new network still holds (`NetworkConfig.keeps`)
is kept, rewritten or moved to the fitting key; one whose subnet it no
longer holds is replaced by a new subnet (rules 2 to 4: create-if-absent),
and only then is the old key given up (deleted, fenced; its etcd lease
revoked), so the host is never without a lease.

A second agent with this host's identity (same PublicIP and NodeID: a cloned
machine, or the agent started twice) takes the lease over by rule 1 when it
starts; the first then finds its key held by another etcd lease under its
own identity and `reclaim` raises IdentityConflict instead of taking it
back (which would make the two fight, a write each per round trip). The
agent steps back (leaseagent.agent.holder) and only reads until the key is
free again.

Every write is a transaction: create-if-absent, or fenced on the mod_revision
we read. Because etcd3aio retries a txn on UNAVAILABLE, a "lost" txn may in
fact be our own earlier success: `_is_ours` compares the key as it is now
with exactly what we wrote (our value, which carries our NodeID, and our
etcd lease id).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable
from dataclasses import dataclass, replace
from ipaddress import IPv4Network, IPv6Network
from typing import Any

from leaseagent.agent.placement import Placement, Survey
from leaseagent.core.allocation import Chooser, candidates
from leaseagent.core.leases import (
    KeyLayout,
    LeaseValue,
    SubnetKey,
    Verdict,
    decode_lease_value,
    judge,
)
from leaseagent.core.network import NetworkConfig
from leaseagent.errors import IdentityConflict, InvalidLease, LeaseLost
from leaseagent.metrics import Metrics
from leaseagent.store.base import KeyValue, LeaseStore, Listing

log = logging.getLogger("leaseagent.leasing")

# Upper bound of the pause before listing again after a lost allocation race.
RETRY_JITTER_SECONDS = 0.1
# How a lease was come by (OwnLease.how) when the acquisition created its key.
ALLOCATED, PREVIOUS = "allocated", "previous subnet.env"
MADE = frozenset({ALLOCATED, PREVIOUS})
CANDIDATES_PER_TXN = 8


@dataclass(frozen=True)
class OwnLease:
    subnet: IPv4Network
    key: str
    value: bytes
    lease_id: int  # 0 for a reservation
    ttl: int
    mod_revision: int
    how: str
    create_revision: int = 0
    ipv6_subnet: IPv6Network | None = None

    @property
    def reservation(self) -> bool:
        return self.lease_id == 0

    @property
    def made(self) -> bool:
        """Created by this acquisition (not a lease of this host's taken over)."""
        return self.how in MADE


class Leasing:
    def __init__(
        self,
        store: LeaseStore,
        *,
        layout: KeyLayout,
        network: NetworkConfig,
        value: LeaseValue,
        ttl: int,
        metrics: Metrics,
        rng: random.Random | None = None,
        choose: Chooser = candidates,
        candidates_per_txn: int = CANDIDATES_PER_TXN,
    ) -> None:
        self._store = store
        self.layout = layout
        self._rng = rng or random.Random()
        self._place = Placement(layout=layout, network=network, value=value, rng=self._rng,
                                choose=choose, candidates_per_txn=candidates_per_txn)
        self.value_bytes = value.encode()
        self._ttl = ttl
        self._metrics = metrics
        self.transactions = 0  # create/replace txns sent, for the efficiency figures
        self._listing: Listing | None = None  # see take_listing
        self._parsed: dict[str, SubnetKey] = {}  # what each of its keys names
        self._listing_names: set[str] = set()  # its keys that name this host

    @property
    def network(self) -> NetworkConfig:
        """The network config leased under (`reconfigure` changes it)."""
        return self._place.network

    @property
    def value(self) -> LeaseValue:
        """What this host publishes in its lease."""
        return self._place.value

    def reconfigure(self, network: NetworkConfig, value: LeaseValue) -> None:
        """From now on, lease under `network` and publish `value` (a config change)."""
        self._place.network = network
        self._place.value = value
        self.value_bytes = value.encode()

    def key_for(self, subnet: IPv4Network, ipv6: IPv6Network | None = None) -> str:
        return self._place.key_for(subnet, ipv6)

    def _own(self, current: KeyValue, lease_id: int, ttl: int, how: str) -> OwnLease:
        """Our lease as `current` (the key as etcd has it now) shows it."""
        named = self.layout.parse_lease_key(current.key)
        return OwnLease(named.ipv4, current.key, current.value, lease_id, ttl,
                        current.mod_revision, how, current.create_revision, named.ipv6)

    async def _rekey(self, kv: KeyValue, new_key: str, lease_id: int) -> KeyValue | None:
        """Write our value over `kv` (fenced), under `new_key` if it differs (moved in one
        transaction); the key as it is now if we won (or had already won), else None."""
        self.transactions += 1
        if new_key == kv.key:
            won, current = await self._store.replace(
                kv.key, self.value_bytes, mod_revision=kv.mod_revision, lease=lease_id)
        else:
            won, current = await self._store.move(
                kv.key, mod_revision=kv.mod_revision, new_key=new_key, value=self.value_bytes,
                lease=lease_id)
            if won:
                log.info("lease %s moved to %s (same IPv4 subnet; the network config's IPv6 "
                         "changed)", self.layout.name_of(kv.key), self.layout.name_of(new_key))
        if current is not None and (won or self._is_ours(current, lease_id)):
            return current
        return None

    def _is_ours(self, kv: KeyValue | None, lease_id: int) -> bool:
        return kv is not None and kv.value == self.value_bytes and kv.lease == lease_id

    async def _grant(self) -> tuple[int, int]:
        return await self._store.grant(self._ttl)

    async def _revoke_quietly(self, lease_id: int) -> None:
        try:
            await self._store.revoke(lease_id)
        except Exception as exc:
            log.debug("could not revoke etcd lease %x: %s", lease_id, exc)

    def _guard(self, key: str) -> str:
        """What no other key may start with for `key` to be created: its IPv4 part, so a
        subnet is never leased twice under keys with different IPv6 parts (etcd itself
        only guards whole key names)."""
        return self.key_for(self.layout.parse_lease_key(key).ipv4)

    async def _create(self, key: str, lease_id: int, ttl: int, how: str) -> OwnLease | None:
        self._metrics.allocation_attempts.inc()
        self.transactions += 1
        won, current = await self._store.create(key, self.value_bytes, lease=lease_id,
                                                guard=self._guard(key))
        if current is not None and (won or self._is_ours(current, lease_id)):
            return self._own(current, lease_id, ttl, how)
        self._metrics.allocation_conflicts.inc()
        return None

    async def _create_first(self, keys: list[str], lease_id: int, ttl: int) -> OwnLease | None:
        if len(keys) == 1:
            return await self._create(keys[0], lease_id, ttl, ALLOCATED)
        self._metrics.allocation_attempts.inc()
        self.transactions += 1
        created = await self._store.create_first(keys, self.value_bytes, lease=lease_id,
                                                 guards=[self._guard(k) for k in keys])
        if created is None or created.key not in keys:
            self._metrics.allocation_conflicts.inc()
            return None
        return self._own(created, lease_id, ttl, ALLOCATED)

    async def acquire(self, *, previous: IPv4Network | None = None,
                      previous_ipv6: IPv6Network | None = None,
                      keep_listing: bool = False) -> OwnLease:
        """Take a subnet for this host (see the module docstring for the order).
        `keep_listing`: keep the listing it chose by, for `take_listing`."""
        # The first listing is asked for with the grant, not after it: one round trip
        # to etcd less (neither depends on the other).
        listing = asyncio.ensure_future(self._store.list_prefix(self.layout.subnets_prefix))
        try:
            lease_id, ttl = await self._grant()
        except BaseException:
            await _cancel(listing)
            raise
        try:
            own = await self._acquire_with(lease_id, ttl, previous, previous_ipv6, keep_listing,
                                           listing)
        except BaseException:
            await _cancel(listing)
            self._listing, self._parsed = None, {}
            await self._revoke_quietly(lease_id)
            raise
        if self._listing_names - {own.key}:
            # A key of ours it names was moved or another is a twin's: what the listing
            # says of it is stale now, so the watcher lists afresh.
            self._listing, self._parsed = None, {}
        if own.reservation:
            await self._revoke_quietly(lease_id)
        return own

    def take_listing(self) -> tuple[Listing | None, dict[str, SubnetKey]]:
        """The listing the last `acquire(keep_listing=True)` chose by, once, with what
        each of its keys names (parsed for the survey): the lease watcher starts from it,
        so start-up lists the prefix once and parses each key once (its own key, created
        after, comes as the watch's first event). None and nothing parsed when the
        acquisition moved a key of this host's or the listing holds another key naming it
        (what it says of those is stale, and a key naming this host is judged a
        twin's)."""
        listing, parsed = self._listing, self._parsed
        self._listing, self._parsed = None, {}
        return listing, parsed

    async def _acquire_with(self, lease_id: int, ttl: int, previous: IPv4Network | None,
                            previous_ipv6: IPv6Network | None, keep_listing: bool,
                            first: Awaitable[Listing] | None) -> OwnLease:
        """`first`: the first listing, asked for already; each retry lists again."""
        place = self._place
        while True:
            listing = await first if first is not None else await self._store.list_prefix(
                self.layout.subnets_prefix)
            first = None
            survey = place.survey(listing.items)
            self._listing = listing if keep_listing else None
            self._parsed = survey.names if keep_listing else {}
            self._listing_names = {v.key for v in survey.verdicts if v.value is not None
                                   and v.value.public_ip == self.value.public_ip}
            own = await self._take_ours(survey, {kv.key: kv for kv in listing.items},
                                        lease_id, ttl)
            if own is not None:
                return own
            taken, taken6 = survey.taken, survey.taken6
            if previous is not None and self.network.in_range(previous) and previous not in taken:
                wanted = self.key_for(previous, place.ipv6_for(previous, taken6, previous_ipv6))
                own = await self._create(wanted, lease_id, ttl, PREVIOUS)
                if own is not None:
                    return own
                taken.add(previous)
            previous = None
            own = await self._create_first(place.candidate_keys(taken, taken6), lease_id, ttl)
            if own is not None:
                return own
            # Lost a race: others start now too. The other candidates of this
            # listing are stale (a starter's next pick is likely taken by one
            # of its rivals), so list again (a read, no transaction) after a
            # jitter that spreads the losers out so they see each other's picks.
            await asyncio.sleep(self._rng.uniform(0, RETRY_JITTER_SECONDS))

    async def _take_ours(self, survey: Survey, by_key: dict[str, KeyValue], lease_id: int,
                         ttl: int) -> OwnLease | None:
        """A lease of this host's taken over (rule 1), else a reservation for it (rule 2)."""
        for verdict, subnet in _with_subnets(survey.named):
            kv = by_key[verdict.key]
            fitting = self._place.fitting_key(verdict, subnet, survey.taken6)
            current = await self._rekey(kv, fitting, lease_id)
            if current is not None:
                if kv.lease != lease_id:
                    await self._revoke_quietly(kv.lease)
                return self._own(current, lease_id, ttl, "took over this host's lease")
        for verdict, subnet in _with_subnets(survey.reserved):
            kv = by_key[verdict.key]
            fitting = self._place.fitting_key(verdict, subnet, survey.taken6)
            if kv.value == self.value_bytes and fitting == kv.key:
                return self._own(kv, 0, 0, "reservation")
            current = await self._rekey(kv, fitting, 0)
            if current is not None:
                return self._own(current, 0, 0, "reservation")
        return None

    async def reclaim(self, own: OwnLease, why: str) -> OwnLease:
        """Our lease or key is gone: take the same subnet back, else a new one.

        Never overwrites a key someone else holds: create-if-absent only.
        """
        if own.reservation:
            current = await self._store.get(own.key)
            if current is not None and current.lease == 0 and self._is_ours(current, 0):
                return replace(own, mod_revision=current.mod_revision)
            log.error("reservation %s is gone (%s); acquiring a subnet anew", own.subnet, why)
            return await self.acquire()
        lease_id, ttl = await self._grant()
        try:
            taken_back = await self._create(own.key, lease_id, ttl, "taken back")
        except BaseException:
            await self._revoke_quietly(lease_id)
            raise
        if taken_back is not None:
            if own.lease_id != lease_id:
                await self._revoke_quietly(own.lease_id)
            return taken_back
        await self._revoke_quietly(lease_id)
        holder = await self._store.get(own.key)
        who, other = _holder(holder)
        if holder is not None:
            if holder.lease == own.lease_id and holder.value == own.value:
                # Still ours (a false alarm, e.g. a keepalive that failed while the etcd
                # lease lived on): acquire takes it over onto a fresh lease, fenced.
                log.warning("lease on %s is still this host's (%s); taking it over",
                            own.subnet, why)
                return await self.acquire(previous=own.subnet, previous_ipv6=own.ipv6_subnet)
            if other is not None and self.is_twin(other):
                raise IdentityConflict(own.key, (
                    f"another agent with this host's identity (node id {other.node_id}, "
                    f"PublicIP {other.public_ip}) holds {own.key} under its own etcd lease "
                    f"{holder.lease:x}"))
        log.error(
            "SUBNET LOST: our lease on %s was lost (%s) and %s holds it now; "
            "taking a new subnet", own.subnet, why, who)
        self._metrics.lease_changes.inc()
        return await self.acquire()

    def is_twin(self, value: LeaseValue) -> bool:
        """Whether `value` names this host's identity (PublicIP and NodeID)."""
        return (value.public_ip == self.value.public_ip and value.node_id is not None
                and value.node_id == self.value.node_id)

    async def refit(self, own: OwnLease) -> OwnLease:
        """Our lease under the network config and value in force (`reconfigure`): `own`
        as it is if it fits; rewritten, or moved to the fitting key (its IPv4 subnet
        kept), fenced, in one transaction; or, when the network no longer holds its IPv4
        subnet, a new subnet acquired and then `own` given up. A fenced write that loses
        leaves `own` as it is: someone changed our key, and the holder sees that and
        takes it back as after any loss."""
        if not self.network.keeps(own.subnet):
            new = await self.acquire()
            await self.give_up(own)
            return new
        listing = await self._store.list_prefix(self.layout.subnets_prefix)
        verdicts = judge(listing.items, layout=self.layout, network=None).verdicts
        kv = next((kv for kv in listing.items if kv.key == own.key), None)
        if kv is None or kv.value != own.value or kv.lease != own.lease_id:
            return own
        taken6 = {v.ipv6_subnet for v in verdicts.values() if v.ipv6_subnet is not None}
        fitting = self._place.fitting_key(verdicts[own.key], own.subnet, taken6)
        if fitting == own.key and kv.value == self.value_bytes:
            return own
        current = await self._rekey(kv, fitting, own.lease_id)
        if current is None:
            return own
        return self._own(current, own.lease_id, own.ttl, "fitted to the new network config")

    async def give_up(self, own: OwnLease) -> None:
        """Give our key up: delete it (fenced), revoke its etcd lease. To an older twin, or
        after a config change gave this host a new subnet."""
        await self._store.delete(own.key, mod_revision=own.mod_revision)
        if not own.reservation:
            await self._revoke_quietly(own.lease_id)

    async def release(self, own: OwnLease) -> None:
        """Give the lease up on purpose (--release-on-exit): mark the value released (fenced),
        so peers remove this host at once instead of holding its entries, then revoke."""
        released = replace(self.value, released=True).encode()
        await self._store.replace(own.key, released, mod_revision=own.mod_revision,
                                  lease=own.lease_id)
        await self._store.revoke(own.lease_id)

    async def keepalive(self, own: OwnLease) -> int:
        """Renew; the remaining TTL. Raises LeaseLost when the etcd lease is gone."""
        ttl = await self._store.keepalive(own.lease_id)
        if ttl <= 0:
            raise LeaseLost(f"etcd lease {own.lease_id:x} expired or was revoked")
        return ttl


async def _cancel(task: asyncio.Future[Any]) -> None:
    """Cancel `task` and wait until it has ended (whatever it ended with is dropped)."""
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def _holder(kv: KeyValue | None) -> tuple[str, LeaseValue | None]:
    """Who holds a key, for the log ("unknown" when no one), and its value if valid."""
    if kv is None:
        return "unknown", None
    try:
        other = decode_lease_value(kv.value)
    except InvalidLease:
        return "an invalid lease value", None
    return f"PublicIP {other.public_ip} (node {other.node_id or '?'})", other


def _with_subnets(verdicts: list[Verdict]) -> list[tuple[Verdict, IPv4Network]]:
    """`verdicts` with the IPv4 subnet each names (those that name none left out)."""
    return [(v, v.subnet) for v in verdicts if v.subnet is not None]
