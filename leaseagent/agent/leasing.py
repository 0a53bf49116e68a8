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
agent steps back (leaseagent.agent.daemon) and only reads until the key is
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
from dataclasses import dataclass, replace
from ipaddress import IPv4Network, IPv6Network

from leaseagent.core.allocation import Chooser, candidates, range_candidates
from leaseagent.core.leases import (
    DUPLICATE,
    KeyLayout,
    LeaseValue,
    Verdict,
    decode_lease_value,
    judge,
)
from leaseagent.core.network import NetworkConfig
from leaseagent.errors import IdentityConflict, InvalidLease, LeaseLost, SubnetsExhausted
from leaseagent.metrics import Metrics
from leaseagent.store.base import KeyValue, LeaseStore, Listing

log = logging.getLogger("leaseagent.leasing")

# Upper bound of the pause before listing again after a lost allocation race.
RETRY_JITTER_SECONDS = 0.1
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
        self._network = network
        self._value = value
        self.value_bytes = value.encode()
        self._ttl = ttl
        self._metrics = metrics
        self._rng = rng or random.Random()
        self._choose = choose  # the allocation policy (the benchmark swaps in flannel's)
        self._per_txn = max(1, candidates_per_txn)
        self.transactions = 0  # create/replace txns sent, for the efficiency figures
        self._listing: Listing | None = None  # see take_listing
        self._listing_names: set[str] = set()  # its keys that name this host

    @property
    def network(self) -> NetworkConfig:
        """The network config leased under (`reconfigure` changes it)."""
        return self._network

    def reconfigure(self, network: NetworkConfig, value: LeaseValue) -> None:
        """From now on, lease under `network` and publish `value` (a config change)."""
        self._network = network
        self._value = value
        self.value_bytes = value.encode()

    def key_for(self, subnet: IPv4Network, ipv6: IPv6Network | None = None) -> str:
        return self.layout.lease_key(subnet, ipv6)

    def _own(self, current: KeyValue, lease_id: int, ttl: int, how: str) -> OwnLease:
        """Our lease as `current` (the key as etcd has it now) shows it."""
        named = self.layout.parse_lease_key(current.key)
        return OwnLease(named.ipv4, current.key, current.value, lease_id, ttl,
                        current.mod_revision, how, current.create_revision, named.ipv6)

    def _ipv6_for(self, subnet: IPv4Network, taken6: set[IPv6Network],
                  previous: IPv6Network | None = None) -> IPv6Network | None:
        """The IPv6 subnet to pair with `subnet` (None without IPv6): `previous` if it fits
        and is free, else the one at the same position (see the module docstring), else a
        random free one. SubnetsExhausted when the IPv6 range is full."""
        six = self._network.ipv6
        if six is None:
            return None
        if previous is not None and six.in_range(previous) and previous not in taken6:
            return previous
        v4 = self._network.ipv4
        index = (int(subnet.network_address) - int(v4.subnet_min)) // v4.subnet_size
        if six.capacity >= v4.capacity and 0 <= index < six.capacity:
            paired = six.subnet_at(index)
            if paired not in taken6:
                assert isinstance(paired, IPv6Network)
                return paired
        for pick in range_candidates(six, taken6, self._rng):
            assert isinstance(pick, IPv6Network)
            return pick
        raise SubnetsExhausted(
            f"no free IPv6 subnet in {six.network} (range {six.subnet_min}-{six.subnet_max}): "
            f"all {six.capacity} are taken")

    def _fitting_key(self, verdict: Verdict, taken6: set[IPv6Network]) -> str:
        """The key this host's lease should have under the config: the same IPv4 subnet,
        its IPv6 subnet kept if it fits (a new one when IPv6 is on and it has none or a
        misfit, none when IPv6 is off)."""
        assert verdict.subnet is not None
        six = self._network.ipv6
        if six is None:
            return self.key_for(verdict.subnet)
        kept = verdict.ipv6_subnet
        if self._network.ipv6_part_fits(kept):
            return self.key_for(verdict.subnet, kept)
        return self.key_for(verdict.subnet, self._ipv6_for(verdict.subnet, taken6 - {kept}
                                                           if kept else taken6))

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
        if won or self._is_ours(current, lease_id):
            assert current is not None
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
        if won or self._is_ours(current, lease_id):
            assert current is not None
            return self._own(current, lease_id, ttl, how)
        self._metrics.allocation_conflicts.inc()
        return None

    async def _create_first(self, keys: list[str], lease_id: int, ttl: int) -> OwnLease | None:
        if len(keys) == 1:
            return await self._create(keys[0], lease_id, ttl, "allocated")
        self._metrics.allocation_attempts.inc()
        self.transactions += 1
        created = await self._store.create_first(keys, self.value_bytes, lease=lease_id,
                                                 guards=[self._guard(k) for k in keys])
        if created is None or created.key not in keys:
            self._metrics.allocation_conflicts.inc()
            return None
        return self._own(created, lease_id, ttl, "allocated")

    async def acquire(self, *, previous: IPv4Network | None = None,
                      previous_ipv6: IPv6Network | None = None,
                      keep_listing: bool = False) -> OwnLease:
        """Take a subnet for this host (see the module docstring for the order).
        `keep_listing`: keep the listing it chose by, for `take_listing`."""
        lease_id, ttl = await self._grant()
        try:
            own = await self._acquire_with(lease_id, ttl, previous, previous_ipv6, keep_listing)
        except BaseException:
            self._listing = None
            await self._revoke_quietly(lease_id)
            raise
        if self._listing_names - {own.key}:
            # A key of ours it names was moved or another is a twin's: what the listing
            # says of it is stale now, so the watcher lists afresh.
            self._listing = None
        if own.reservation:
            await self._revoke_quietly(lease_id)
        return own

    def take_listing(self) -> Listing | None:
        """The listing the last `acquire(keep_listing=True)` chose by, once: the lease
        watcher starts from it, so start-up lists the prefix once (its own key, created
        after, comes as the watch's first event). None when the acquisition moved a key
        of this host's or the listing holds another key naming it (what it says of those
        is stale, and a key naming this host is judged a twin's)."""
        listing, self._listing = self._listing, None
        return listing

    def _survey(self, items: list[KeyValue]
                ) -> tuple[set[IPv4Network], set[IPv6Network], list[Verdict]]:
        """The subnets the keys name (IPv4, IPv6), and the verdicts, oldest first, on the
        keys whose value may name this host's PublicIP: only those are decoded (by the
        lease layer, with no network: a reservation carries no backend data yet, so it
        would not pass as a peer; it only has to fit the network). A value names our
        PublicIP only if its text does, unless JSON escapes spell it out."""
        needle = str(self._value.public_ip).encode()
        taken: set[IPv4Network] = set()
        taken6: set[IPv6Network] = set()
        ours = []
        for kv in items:
            try:
                named = self.layout.parse_lease_key(kv.key)
            except ValueError:
                continue
            taken.add(named.ipv4)
            if named.ipv6 is not None:
                taken6.add(named.ipv6)
            if needle in kv.value or b"\\u" in kv.value:
                ours.append(kv)
        verdicts = judge(ours, layout=self.layout, network=None).verdicts
        return taken, taken6, list(verdicts.values())

    def _reservation_usable(self, verdict: Verdict, items: list[KeyValue]) -> bool:
        """Whether a reservation naming this host is one the lease layer calls valid
        among the keys naming its subnet (it may overlap another host's lease:
        core.leases.judging, rule 5). Scans the listing: only for a reservation of ours."""
        rivals = [kv for kv in items if kv.key != verdict.key and self._names(kv, verdict.subnet)]
        if not rivals:
            return True
        kv = next(kv for kv in items if kv.key == verdict.key)
        judged = judge([kv, *rivals], layout=self.layout, network=self._network).verdicts[kv.key]
        if judged.status == DUPLICATE:
            log.error("reservation %s for this host overlaps a lease (%s): not taken",
                      verdict.key, judged.detail)
            return False
        return True

    def _names(self, kv: KeyValue, subnet: IPv4Network | None) -> bool:
        try:
            return self.layout.parse_lease_key(kv.key).ipv4 == subnet
        except ValueError:
            return False

    async def _acquire_with(self, lease_id: int, ttl: int, previous: IPv4Network | None,
                            previous_ipv6: IPv6Network | None, keep_listing: bool) -> OwnLease:
        while True:
            listing = await self._store.list_prefix(self.layout.subnets_prefix)
            taken, taken6, verdicts = self._survey(listing.items)
            self._listing = listing if keep_listing else None
            self._listing_names = {v.key for v in verdicts if v.value is not None
                                   and v.value.public_ip == self._value.public_ip}
            by_key = {kv.key: kv for kv in listing.items}
            named: list[Verdict] = []
            reserved: list[Verdict] = []
            for verdict in verdicts:
                value, subnet = verdict.value, verdict.subnet
                if value is None or subnet is None or value.public_ip != self._value.public_ip:
                    continue
                if not self._network.keeps(subnet):
                    continue
                if verdict.reservation:
                    if self._reservation_usable(verdict, listing.items):
                        reserved.append(verdict)
                elif value.node_id in (None, self._value.node_id):
                    named.append(verdict)

            for verdict in named:
                kv = by_key[verdict.key]
                current = await self._rekey(kv, self._fitting_key(verdict, taken6), lease_id)
                if current is not None:
                    if kv.lease != lease_id:
                        await self._revoke_quietly(kv.lease)
                    return self._own(current, lease_id, ttl, "took over this host's lease")

            for verdict in reserved:
                kv = by_key[verdict.key]
                fitting = self._fitting_key(verdict, taken6)
                if kv.value == self.value_bytes and fitting == kv.key:
                    return self._own(kv, 0, 0, "reservation")
                current = await self._rekey(kv, fitting, 0)
                if current is not None:
                    return self._own(current, 0, 0, "reservation")

            if previous is not None and self._network.in_range(previous) and previous not in taken:
                wanted = self.key_for(previous, self._ipv6_for(previous, taken6, previous_ipv6))
                own = await self._create(wanted, lease_id, ttl, "previous subnet.env")
                if own is not None:
                    return own
                taken.add(previous)
            previous = None

            in_range = sum(1 for s in taken if self._network.in_range(s))
            pool = self._choose(self._network, taken, self._rng)
            picks = [s for _, s in zip(range(self._per_txn), pool, strict=False)]
            if not picks:
                raise SubnetsExhausted(
                    f"no free subnet in network {self._network.network} "
                    f"(range {self._network.subnet_min}-{self._network.subnet_max}): "
                    f"all {self._network.capacity} subnets are taken ({in_range} leases)"
                )
            keys = []
            for pick in picks:
                ipv6 = self._ipv6_for(pick, taken6)
                keys.append(self.key_for(pick, ipv6))
                if ipv6 is not None:
                    taken6.add(ipv6)  # two candidates of one transaction never share one
            own = await self._create_first(keys, lease_id, ttl)
            if own is not None:
                return own
            # Lost a race: others start now too. The other candidates of this
            # listing are stale (a starter's next pick is likely taken by one
            # of its rivals), so list again (a read, no transaction) after a
            # jitter that spreads the losers out so they see each other's picks.
            await asyncio.sleep(self._rng.uniform(0, RETRY_JITTER_SECONDS))

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
        who = "unknown"
        if holder is not None:
            try:
                other = decode_lease_value(holder.value)
                who = f"PublicIP {other.public_ip} (node {other.node_id or '?'})"
            except InvalidLease:
                who = "an invalid lease value"
                other = None
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
        return (value.public_ip == self._value.public_ip and value.node_id is not None
                and value.node_id == self._value.node_id)

    async def refit(self, own: OwnLease) -> OwnLease:
        """Our lease under the network config and value in force (`reconfigure`): `own`
        as it is if it fits; rewritten, or moved to the fitting key (its IPv4 subnet
        kept), fenced, in one transaction; or, when the network no longer holds its IPv4
        subnet, a new subnet acquired and then `own` given up. A fenced write that loses
        leaves `own` as it is: someone changed our key, and the holder sees that and
        takes it back as after any loss."""
        if not self._network.keeps(own.subnet):
            new = await self.acquire()
            await self.give_up(own)
            return new
        listing = await self._store.list_prefix(self.layout.subnets_prefix)
        verdicts = judge(listing.items, layout=self.layout, network=None).verdicts
        kv = next((kv for kv in listing.items if kv.key == own.key), None)
        if kv is None or kv.value != own.value or kv.lease != own.lease_id:
            return own
        taken6 = {v.ipv6_subnet for v in verdicts.values() if v.ipv6_subnet is not None}
        fitting = self._fitting_key(verdicts[own.key], taken6)
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
        released = replace(self._value, released=True).encode()
        await self._store.replace(own.key, released, mod_revision=own.mod_revision,
                                  lease=own.lease_id)
        await self._store.revoke(own.lease_id)

    async def keepalive(self, own: OwnLease) -> int:
        """Renew; the remaining TTL. Raises LeaseLost when the etcd lease is gone."""
        ttl = await self._store.keepalive(own.lease_id)
        if ttl <= 0:
            raise LeaseLost(f"etcd lease {own.lease_id:x} expired or was revoked")
        return ttl
