"""Leasing against the in-memory store: acquisition order, races, exhaustion, reclaim."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

import pytest

from leaseagent.agent.leasing import CANDIDATES_PER_TXN, Leasing, OwnLease
from leaseagent.core.leases import KeyLayout, LeaseValue, decode_lease_value
from leaseagent.core.network import NetworkConfig, parse_network_config
from leaseagent.errors import LeaseLost, SubnetsExhausted
from leaseagent.metrics import Metrics
from leaseagent.store.base import KeyValue, Listing
from leaseagent.store.memory import MemoryStore

PREFIX = "/coreos.com/network"
SUBNETS = f"{PREFIX}/subnets/"
NETWORK = parse_network_config(b'{"Network": "10.5.0.0/16"}')
OUR_IP = "192.168.64.2"
TTL = 60


def lease_value(ip: str = OUR_IP, node: str | None = "node-a", mac: str = "c6:d2:32:6f:8f:02") -> LeaseValue:
    return LeaseValue(
        public_ip=IPv4Address(ip),
        backend_type="vxlan",
        backend_data={"VNI": 1, "VtepMAC": mac},
        node_id=node,
    )


def key(subnet: str) -> str:
    return SUBNETS + subnet.replace("/", "-")


def make_leasing(
    store: MemoryStore,
    *,
    value: LeaseValue | None = None,
    network: NetworkConfig = NETWORK,
    metrics: Metrics | None = None,
    seed: int = 1,
    candidates_per_txn: int = CANDIDATES_PER_TXN,
) -> Leasing:
    return Leasing(
        store,
        candidates_per_txn=candidates_per_txn,
        layout=KeyLayout(PREFIX),
        network=network,
        value=value or lease_value(),
        ttl=TTL,
        metrics=metrics or Metrics(),
        rng=random.Random(seed),
    )


async def held_by(store: MemoryStore, subnet: str) -> KeyValue:
    kv = await store.get(key(subnet))
    assert kv is not None, f"{subnet} is not leased"
    return kv


async def assert_holds(store: MemoryStore, own: OwnLease, leasing: Leasing) -> None:
    kv = await held_by(store, str(own.subnet))
    assert kv.value == leasing.value_bytes
    assert kv.lease == own.lease_id
    assert kv.mod_revision == own.mod_revision


def network(subnet_min: str, subnet_max: str) -> NetworkConfig:
    return parse_network_config(
        f'{{"Network": "10.5.0.0/16", "SubnetMin": "{subnet_min}", "SubnetMax": "{subnet_max}"}}'
    )


# --- 1. takeover of this host's own lease ----------------------------------------


async def test_takes_over_a_lease_with_same_public_ip_and_node_id_and_revokes_the_old_etcd_lease(
) -> None:
    store = MemoryStore()
    old_lease, _ = await store.grant(TTL)
    await store.create(key("10.5.9.0/24"), lease_value(mac="c6:d2:32:6f:8f:99").encode(), lease=old_lease)
    leasing = make_leasing(store)

    own = await leasing.acquire(previous=IPv4Network("10.5.77.0/24"))

    assert own.subnet == IPv4Network("10.5.9.0/24")
    assert own.how == "took over this host's lease"
    assert own.lease_id not in (0, old_lease)
    await assert_holds(store, own, leasing)
    assert await store.time_to_live(old_lease) == -1
    assert await store.time_to_live(own.lease_id) > 0


async def test_flanneld_lease_of_this_host_is_taken_over_so_a_switch_keeps_the_subnet() -> None:
    """flanneld wrote this host's lease (its PublicIP, no NodeID) before the switch."""
    store = MemoryStore()
    flannel_lease, _ = await store.grant(TTL)
    flanneld = (b'{"PublicIP":"192.168.64.2","PublicIPv6":null,"BackendType":"vxlan",'
                b'"BackendData":{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:99"}}')
    await store.create(key("10.5.9.0/24"), flanneld, lease=flannel_lease)
    leasing = make_leasing(store)

    own = await leasing.acquire(previous=IPv4Network("10.5.9.0/24"))

    assert (own.subnet, own.how) == (IPv4Network("10.5.9.0/24"), "took over this host's lease")
    await assert_holds(store, own, leasing)


async def test_takeover_is_fenced_on_mod_revision() -> None:
    """Another host writes the key between our list and our txn: we must not overwrite it."""

    class Interfering(MemoryStore):
        interfered = False

        async def list_prefix(self, prefix: str) -> Listing:
            listing = await super().list_prefix(prefix)
            if not self.interfered:
                self.interfered = True
                await self.put(key("10.5.9.0/24"), lease_value("192.168.64.9", "node-z").encode())
            return listing

    store = Interfering()
    old_lease, _ = await store.grant(TTL)
    await store.create(key("10.5.9.0/24"), lease_value().encode(), lease=old_lease)

    own = await make_leasing(store).acquire()

    assert own.subnet != IPv4Network("10.5.9.0/24")
    other = decode_lease_value((await held_by(store, "10.5.9.0/24")).value)
    assert other.node_id == "node-z"


async def test_a_lease_with_our_public_ip_but_another_node_id_is_not_taken_over() -> None:
    store = MemoryStore()
    their_lease, _ = await store.grant(TTL)
    theirs = lease_value(node="node-b").encode()
    await store.create(key("10.5.9.0/24"), theirs, lease=their_lease)

    own = await make_leasing(store).acquire()

    assert own.subnet != IPv4Network("10.5.9.0/24")
    assert own.how == "allocated"
    assert (await held_by(store, "10.5.9.0/24")).value == theirs


# --- 2. reservations ------------------------------------------------------------


async def test_a_reservation_for_our_public_ip_is_used_without_a_ttl() -> None:
    store = MemoryStore()
    reserved = b'{"PublicIP":"192.168.64.2","BackendType":"vxlan"}'  # as leasectl reserve writes it
    await store.put(key("10.5.200.0/24"), reserved)
    leasing = make_leasing(store)

    own = await leasing.acquire(previous=IPv4Network("10.5.77.0/24"))

    assert own.subnet == IPv4Network("10.5.200.0/24")
    assert own.reservation and own.lease_id == 0
    assert own.how == "reservation"
    await assert_holds(store, own, leasing)  # our BackendData published, still lease 0
    assert len((await store.list_prefix(SUBNETS)).items) == 1


async def test_a_reservation_is_still_used_without_a_ttl_after_a_restart() -> None:
    store = MemoryStore()
    await store.put(key("10.5.200.0/24"), b'{"PublicIP":"192.168.64.2","BackendType":"vxlan"}')
    first = await make_leasing(store).acquire()
    revision = store.revision

    restarted = make_leasing(store, seed=99)
    again = await restarted.acquire(previous=first.subnet)

    assert again.subnet == first.subnet
    assert again.lease_id == 0
    await assert_holds(store, again, restarted)
    assert store.revision == revision  # nothing rewritten, the granted etcd lease unused


async def test_a_reservation_for_another_public_ip_is_never_taken() -> None:
    store = MemoryStore()
    await store.put(key("10.5.1.0/24"), b'{"PublicIP":"192.168.64.50","BackendType":"vxlan"}')
    own = await make_leasing(store, network=network("10.5.1.0", "10.5.2.0")).acquire(
        previous=IPv4Network("10.5.1.0/24")
    )
    assert own.subnet == IPv4Network("10.5.2.0/24")


async def test_takeover_comes_before_a_reservation() -> None:
    store = MemoryStore()
    await store.put(key("10.5.200.0/24"), b'{"PublicIP":"192.168.64.2","BackendType":"vxlan"}')
    old_lease, _ = await store.grant(TTL)
    await store.create(key("10.5.9.0/24"), lease_value().encode(), lease=old_lease)

    own = await make_leasing(store).acquire()

    assert own.subnet == IPv4Network("10.5.9.0/24")
    assert own.lease_id != 0


# --- 3. previous subnet.env, 4. random ------------------------------------------


async def test_the_previous_subnet_is_taken_when_free() -> None:
    store = MemoryStore()
    leasing = make_leasing(store)
    own = await leasing.acquire(previous=IPv4Network("10.5.77.0/24"))
    assert own.subnet == IPv4Network("10.5.77.0/24")
    assert own.how == "previous subnet.env"
    await assert_holds(store, own, leasing)
    assert await store.time_to_live(own.lease_id) > 0


async def test_a_previous_subnet_held_by_another_host_is_left_alone() -> None:
    store = MemoryStore()
    theirs = lease_value("192.168.64.7", "node-b").encode()
    their_lease, _ = await store.grant(TTL)
    await store.create(key("10.5.77.0/24"), theirs, lease=their_lease)

    own = await make_leasing(store).acquire(previous=IPv4Network("10.5.77.0/24"))

    assert own.subnet != IPv4Network("10.5.77.0/24")
    assert own.how == "allocated"
    assert (await held_by(store, "10.5.77.0/24")).value == theirs


@pytest.mark.parametrize("previous", ["10.5.0.0/24", "10.6.1.0/24", "10.5.77.0/25"])
async def test_a_previous_subnet_outside_the_range_is_ignored(previous: str) -> None:
    own = await make_leasing(MemoryStore()).acquire(previous=IPv4Network(previous))
    assert own.how == "allocated"
    assert NETWORK.in_range(own.subnet)


async def test_random_allocation_is_in_range_and_driven_by_the_rng() -> None:
    a = await make_leasing(MemoryStore(), seed=5).acquire()
    b = await make_leasing(MemoryStore(), seed=5).acquire()
    c = await make_leasing(MemoryStore(), seed=6).acquire()
    assert a.how == "allocated"
    assert NETWORK.in_range(a.subnet)
    assert a.subnet == b.subnet
    assert a.subnet != c.subnet


# --- exhaustion and concurrency --------------------------------------------------


async def test_exhaustion_raises_naming_the_network_and_the_count() -> None:
    store = MemoryStore()
    small = network("10.5.1.0", "10.5.2.0")
    for i, subnet in enumerate(small.subnets()):
        await store.put(key(str(subnet)), lease_value(f"192.168.64.{10 + i}", f"n{i}").encode())
    leases_before = (await store.list_prefix(SUBNETS)).revision

    with pytest.raises(SubnetsExhausted) as err:
        await make_leasing(store, network=small).acquire()

    assert "10.5.0.0/16" in str(err.value)
    assert "all 2 subnets are taken" in str(err.value)
    assert store.revision == leases_before  # nothing written


class Latency(MemoryStore):
    """Every call yields to the event loop first, as a network round trip does,
    so concurrent Leasing instances really interleave between list and create."""

    async def list_prefix(self, prefix: str) -> Listing:
        await asyncio.sleep(0)
        return await super().list_prefix(prefix)

    async def create(self, key: str, value: bytes, *, lease: int, guard: str | None = None
                     ) -> tuple[bool, KeyValue | None]:
        await asyncio.sleep(0)
        return await super().create(key, value, lease=lease, guard=guard)

    async def create_first(self, keys: Sequence[str], value: bytes, *, lease: int,
                           guards: Sequence[str] | None = None) -> KeyValue | None:
        await asyncio.sleep(0)
        return await super().create_first(keys, value, lease=lease, guards=guards)


@pytest.mark.parametrize("per_txn", [1, CANDIDATES_PER_TXN])
async def test_fifty_concurrent_hosts_on_fifty_subnets_get_distinct_subnets_then_exhaustion(
        per_txn: int) -> None:
    store = Latency()
    metrics = Metrics()
    fifty = network("10.5.1.0", "10.5.50.0")
    assert fifty.capacity == 50
    hosts = [
        make_leasing(store, network=fifty, seed=i, metrics=metrics, candidates_per_txn=per_txn,
                     value=lease_value(f"192.168.65.{i + 1}", f"node-{i}"))
        for i in range(50)
    ]

    owns = await asyncio.gather(*(h.acquire() for h in hosts))

    assert len({own.subnet for own in owns}) == 50
    for host, own in zip(hosts, owns, strict=True):
        await assert_holds(store, own, host)
    # The races were real: all 50 listed an empty range before anyone created, so
    # with one candidate per txn some lost; with several, fewer txns were needed.
    conflicts = metrics.registry.get_sample_value("leaseagent_allocation_conflicts_total") or 0
    txns = sum(h.transactions for h in hosts)
    if per_txn == 1:
        assert conflicts > 0 and txns == 50 + conflicts
    else:
        assert txns < 50 * 1.3
    late = make_leasing(store, network=fifty, value=lease_value("192.168.65.200", "node-late"))
    with pytest.raises(SubnetsExhausted, match="all 50 subnets"):
        await late.acquire()


# --- reclaim --------------------------------------------------------------------


async def test_reclaim_after_the_lease_is_revoked_takes_the_same_subnet_back() -> None:
    store = MemoryStore()
    metrics = Metrics()
    leasing = make_leasing(store, metrics=metrics)
    own = await leasing.acquire()
    await store.revoke(own.lease_id)
    assert await store.get(own.key) is None

    back = await leasing.reclaim(own, "etcd lease expired")

    assert back.subnet == own.subnet
    assert back.lease_id != own.lease_id
    await assert_holds(store, back, leasing)
    assert metrics.registry.get_sample_value("leaseagent_lease_subnet_changes_total") == 0


async def test_reclaim_when_another_host_took_the_key_takes_a_new_subnet_and_counts_it() -> None:
    store = MemoryStore()
    metrics = Metrics()
    leasing = make_leasing(store, metrics=metrics)
    own = await leasing.acquire()
    await store.revoke(own.lease_id)
    theirs = lease_value("192.168.64.7", "node-b").encode()
    their_lease, _ = await store.grant(TTL)
    won, _ = await store.create(own.key, theirs, lease=their_lease)
    assert won

    new = await leasing.reclaim(own, "etcd lease expired")

    assert new.subnet != own.subnet
    await assert_holds(store, new, leasing)
    assert (await store.get(own.key)) is not None
    assert (await held_by(store, str(own.subnet))).value == theirs
    assert metrics.registry.get_sample_value("leaseagent_lease_subnet_changes_total") == 1


async def test_reclaim_of_a_key_that_is_still_ours_takes_it_over_without_counting_a_change(
) -> None:
    """A false alarm (e.g. a keepalive that failed while the etcd lease lived on)."""
    store = MemoryStore()
    metrics = Metrics()
    leasing = make_leasing(store, metrics=metrics)
    own = await leasing.acquire()

    back = await leasing.reclaim(own, "keepalive failed")

    assert back.subnet == own.subnet
    assert back.lease_id != own.lease_id
    await assert_holds(store, back, leasing)
    assert await store.time_to_live(own.lease_id) == -1
    assert metrics.registry.get_sample_value("leaseagent_lease_subnet_changes_total") == 0


async def test_keepalive_raises_lease_lost_once_the_etcd_lease_is_gone() -> None:
    store = MemoryStore()
    leasing = make_leasing(store)
    own = await leasing.acquire()
    assert await leasing.keepalive(own) == TTL
    await store.revoke(own.lease_id)
    with pytest.raises(LeaseLost):
        await leasing.keepalive(own)


# --- etcd3aio's retried txn: our own success reported as a loss -------------------


class RetriedAfterSuccess(MemoryStore):
    """The txn is applied, then etcd3aio's retry on UNAVAILABLE reports it failed."""

    async def create(self, key: str, value: bytes, *, lease: int, guard: str | None = None
                     ) -> tuple[bool, KeyValue | None]:
        won, current = await super().create(key, value, lease=lease, guard=guard)
        assert won
        return False, current

    async def replace(
        self, key: str, value: bytes, *, mod_revision: int, lease: int
    ) -> tuple[bool, KeyValue | None]:
        won, current = await super().replace(key, value, mod_revision=mod_revision, lease=lease)
        assert won
        return False, current

    async def move(
        self, key: str, *, mod_revision: int, new_key: str, value: bytes, lease: int
    ) -> tuple[bool, KeyValue | None]:
        won, current = await super().move(key, mod_revision=mod_revision, new_key=new_key,
                                           value=value, lease=lease)
        assert won
        return False, current


async def test_a_create_retried_after_success_is_treated_as_won() -> None:
    store = RetriedAfterSuccess()
    metrics = Metrics()
    leasing = make_leasing(store, metrics=metrics)

    own = await leasing.acquire(previous=IPv4Network("10.5.77.0/24"))

    assert own.subnet == IPv4Network("10.5.77.0/24")
    await assert_holds(store, own, leasing)
    assert len((await store.list_prefix(SUBNETS)).items) == 1  # did not go on to take a second
    assert metrics.registry.get_sample_value("leaseagent_allocation_conflicts_total") == 0


async def test_a_random_create_retried_after_success_is_treated_as_won() -> None:
    store = RetriedAfterSuccess()
    leasing = make_leasing(store)
    own = await leasing.acquire()
    await assert_holds(store, own, leasing)
    assert len((await store.list_prefix(SUBNETS)).items) == 1


async def test_a_takeover_retried_after_success_is_treated_as_won() -> None:
    store = RetriedAfterSuccess()
    old_lease, _ = await MemoryStore.grant(store, TTL)
    await MemoryStore.create(store, key("10.5.9.0/24"), lease_value().encode(), lease=old_lease)
    leasing = make_leasing(store)

    own = await leasing.acquire()

    assert own.subnet == IPv4Network("10.5.9.0/24")
    await assert_holds(store, own, leasing)
    assert await store.time_to_live(old_lease) == -1
    assert len((await store.list_prefix(SUBNETS)).items) == 1


# --- dual-stack -------------------------------------------------------------------

DUAL = parse_network_config(b'{"Network": "10.5.0.0/16", "EnableIPv6": true, '
                            b'"IPv6Network": "fd00:5::/48"}')
V4_ONLY_VALUE = lease_value()


def dual_value(ip: str = OUR_IP, node: str | None = "node-a") -> LeaseValue:
    return LeaseValue(public_ip=IPv4Address(ip), backend_type="vxlan",
                      backend_data={"VNI": 1, "VtepMAC": "c6:d2:32:6f:8f:02"}, node_id=node,
                      public_ipv6=IPv6Address(f"fd00:250::{ip.rsplit('.', 1)[1]}"),
                      backend_v6_data={"VNI": 1, "VtepMAC": "c6:d2:32:6f:8f:06"})


async def test_a_dual_stack_lease_pairs_the_ipv6_subnet_at_the_same_position() -> None:
    store = MemoryStore()
    leasing = make_leasing(store, network=DUAL, value=dual_value())

    own = await leasing.acquire()

    index = (int(own.subnet.network_address) - int(DUAL.subnet_min)) // DUAL.subnet_size
    assert DUAL.ipv6 is not None
    assert own.ipv6_subnet == DUAL.ipv6.subnet_at(index)
    assert own.key == SUBNETS + f"{own.subnet.network_address}-24&{own.ipv6_subnet.network_address}-64"
    kv = await store.get(own.key)
    assert kv is not None and kv.value == leasing.value_bytes
    assert decode_lease_value(kv.value).public_ipv6 == IPv6Address("fd00:250::2")


async def test_concurrent_dual_stack_hosts_never_share_an_ipv6_subnet() -> None:
    """etcd guards whole key names only: pairing by position keeps IPv6 subnets apart
    even though 50 hosts pick at once; a flanneld lease's random IPv6 one is avoided."""
    store = Latency()
    flanneld_v6 = "fd00:5:0:7::-64"  # sits where 10.5.7.0/24's pair would be
    await store.put(SUBNETS + "10.5.200.0-24&" + flanneld_v6, dual_value("192.168.66.1").encode())
    fifty = parse_network_config(b'{"Network": "10.5.0.0/16", "SubnetMin": "10.5.1.0", '
                                 b'"SubnetMax": "10.5.50.0", "EnableIPv6": true, '
                                 b'"IPv6Network": "fd00:5::/48"}')
    hosts = [make_leasing(store, network=fifty, seed=i,
                          value=dual_value(f"192.168.65.{i + 1}", f"node-{i}")) for i in range(50)]
    owns = await asyncio.gather(*(h.acquire() for h in hosts))
    assert len({own.subnet for own in owns}) == 50
    six = [own.ipv6_subnet for own in owns]
    assert None not in six and len(set(six)) == 50
    assert IPv6Network("fd00:5:0:7::/64") not in six


@pytest.mark.parametrize("node", ["node-a", None])  # ours, or flanneld's (no NodeID)
async def test_turning_ipv6_on_moves_this_hosts_lease_keeping_its_ipv4_subnet(
        node: str | None) -> None:
    store = MemoryStore()
    old_lease, _ = await store.grant(TTL)
    _, old = await store.create(key("10.5.9.0/24"), lease_value(node=node).encode(),
                                lease=old_lease)
    assert old is not None
    leasing = make_leasing(store, network=DUAL, value=dual_value())

    own = await leasing.acquire()

    assert own.subnet == IPv4Network("10.5.9.0/24")
    assert own.ipv6_subnet == IPv6Network("fd00:5:0:9::/64")  # 10.5.9.0 is index 8 from .1
    assert own.how == "took over this host's lease"
    assert await store.get(old.key) is None
    kv = await store.get(own.key)
    assert kv is not None and kv.lease == own.lease_id
    assert kv.mod_revision == old.mod_revision + 1  # delete + create: one revision
    assert leasing.transactions == 1


async def test_turning_ipv6_off_moves_the_lease_to_its_ipv4_only_key() -> None:
    store = MemoryStore()
    old_lease, _ = await store.grant(TTL)
    dual_key = SUBNETS + "10.5.9.0-24&fd00:5:0:9::-64"
    await store.create(dual_key, dual_value().encode(), lease=old_lease)
    leasing = make_leasing(store)  # an IPv4-only config

    own = await leasing.acquire()

    assert (own.subnet, own.ipv6_subnet, own.key) == (IPv4Network("10.5.9.0/24"), None,
                                                      key("10.5.9.0/24"))
    assert await store.get(dual_key) is None


async def test_a_dual_stack_lease_that_fits_is_kept_as_it_is() -> None:
    store = MemoryStore()
    old_lease, _ = await store.grant(TTL)
    dual_key = SUBNETS + "10.5.9.0-24&fd00:5:0:77::-64"  # not the paired one: kept anyway
    await store.create(dual_key, dual_value().encode(), lease=old_lease)

    own = await make_leasing(store, network=DUAL, value=dual_value()).acquire()

    assert own.key == dual_key and own.ipv6_subnet == IPv6Network("fd00:5:0:77::/64")


async def test_a_reservation_gains_an_ipv6_subnet_and_stays_a_reservation() -> None:
    store = MemoryStore()
    await store.put(key("10.5.40.0/24"), b'{"PublicIP":"192.168.64.2","PublicIPv6":null,'
                                         b'"BackendType":"vxlan"}')
    own = await make_leasing(store, network=DUAL, value=dual_value()).acquire()
    assert (own.subnet, own.reservation) == (IPv4Network("10.5.40.0/24"), True)
    assert own.ipv6_subnet is not None
    kv = await store.get(own.key)
    assert kv is not None and kv.lease == 0
    assert await store.get(key("10.5.40.0/24")) is None


async def test_the_previous_subnet_env_gives_both_subnets_back() -> None:
    store = MemoryStore()
    own = await make_leasing(store, network=DUAL, value=dual_value()).acquire(
        previous=IPv4Network("10.5.77.0/24"), previous_ipv6=IPv6Network("fd00:5:0:abc::/64"))
    assert (own.subnet, own.ipv6_subnet, own.how) == (
        IPv4Network("10.5.77.0/24"), IPv6Network("fd00:5:0:abc::/64"), "previous subnet.env")


async def test_a_move_retried_after_success_is_treated_as_won() -> None:
    store = RetriedAfterSuccess()
    old_lease, _ = await MemoryStore.grant(store, TTL)
    await MemoryStore.create(store, key("10.5.9.0/24"), lease_value().encode(), lease=old_lease)
    own = await make_leasing(store, network=DUAL, value=dual_value()).acquire()
    assert own.subnet == IPv4Network("10.5.9.0/24") and own.ipv6_subnet is not None
    assert len((await store.list_prefix(SUBNETS)).items) == 1


# --- the listing the lease watcher starts from ------------------------------------------


async def test_the_listing_an_acquisition_chose_by_is_kept_once_for_the_watcher() -> None:
    store = MemoryStore()
    await store.put(key("10.5.3.0/24"), lease_value("192.168.64.3", "node-b").encode())
    leasing = make_leasing(store)
    own = await leasing.acquire(keep_listing=True)
    listing, parsed = leasing.take_listing()
    assert listing is not None and [kv.key for kv in listing.items] == [key("10.5.3.0/24")]
    assert (await held_by(store, str(own.subnet))).mod_revision > listing.revision
    # What its keys name, as the survey parsed them: the watcher does not parse them again.
    assert parsed == {key("10.5.3.0/24"): KeyLayout(PREFIX).parse_lease_key(key("10.5.3.0/24"))}
    assert leasing.take_listing() == (None, {})
    await leasing.acquire()
    assert leasing.take_listing() == (None, {})  # only when asked for


async def test_a_taken_over_key_keeps_the_listing_a_moved_one_drops_it() -> None:
    store = MemoryStore()
    old_lease, _ = await store.grant(TTL)
    await store.create(key("10.5.9.0/24"), lease_value().encode(), lease=old_lease)
    same = make_leasing(store)
    assert (await same.acquire(keep_listing=True)).key == key("10.5.9.0/24")
    assert same.take_listing()[0] is not None  # its own key is left out of the listing
    # IPv6 turned on: the key moves; the listing still has the old one, which names this
    # host and would be judged a twin's.
    moved = make_leasing(store, network=DUAL, value=dual_value())
    own = await moved.acquire(keep_listing=True)
    assert own.key != key("10.5.9.0/24")
    assert moved.take_listing() == (None, {})


async def test_a_lease_naming_this_host_with_json_escapes_is_still_found() -> None:
    """Only values whose text holds our PublicIP are decoded; one spelling it with \\u
    escapes is decoded too, and taken over as any lease of this host."""
    store = MemoryStore()
    old_lease, _ = await store.grant(TTL)
    escaped = "".join(f"\\u{ord(c):04x}" for c in OUR_IP)
    value = ('{"PublicIP":"' + escaped + '","BackendType":"vxlan",'
             '"BackendData":{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:02"},"NodeID":"node-a"}')
    await store.create(key("10.5.9.0/24"), value.encode(), lease=old_lease)
    own = await make_leasing(store).acquire()
    assert own.subnet == IPv4Network("10.5.9.0/24")
    assert own.how == "took over this host's lease"
