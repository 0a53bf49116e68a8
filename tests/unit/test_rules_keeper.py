"""The rules keeper (leaseagent.dataplane.firewall.RulesKeeper) against an in-memory
firewall that behaves like the real adapters: rules and peer set written whole by
apply, the set changed by element, read back in full or (iptables' shallow read)
counted. The real adapters are exercised in tests/e2e/test_traffic_rules.py."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from ipaddress import IPv4Address, IPv4Network

from leaseagent.core.rules import ObservedRules, Ruleset, TrafficSettings, compare, ruleset
from leaseagent.dataplane.firewall import RETIRE_DELAY_SECONDS, RulesKeeper, foreign_change

NET = IPv4Network("10.5.0.0/16")
POD = IPv4Network("10.5.34.0/24")


def addresses(n: int, first: int = 10) -> frozenset[IPv4Address]:
    return frozenset(IPv4Address(f"10.250.{(first + i) // 250}.{(first + i) % 250 + 1}")
                     for i in range(n))


def wanted(peers: Iterable[IPv4Address]) -> Ruleset:
    return ruleset(TrafficSettings(ip_masq=True), network=NET, own_subnet=POD, vxlan_port=8472,
                   peers=peers)


class MemoryFirewall:
    """What a firewall holds, and every call made to it."""

    name = "memory"

    def __init__(self) -> None:
        self.held: Ruleset | None = None
        self.members: set[str] | None = None
        self.calls: list[str] = []

    def watches(self) -> bool:
        return False

    async def apply(self, want: Ruleset) -> None:
        self.calls.append("apply")
        self.held = want
        self.members = set(want.peer_texts) if want.peer_port is not None else None

    async def set_peers(self, add: Iterable[IPv4Address], remove: Iterable[IPv4Address]) -> None:
        add, remove = list(add), list(remove)
        if not add and not remove:
            return
        self.calls.append(f"set_peers +{len(add)} -{len(remove)}")
        assert self.members is not None, "no set to change (like ipset/nft: an error)"
        self.members |= {str(a) for a in add}
        self.members -= {str(r) for r in remove}

    async def observe(self, *, deep: bool = True) -> ObservedRules:
        self.calls.append("observe deep" if deep else "observe shallow")
        if self.held is None:
            return ObservedRules()
        chains: dict[str, list[str | None]] = {
            c: [r.tag for r in self.held.chain(c)] for c in self.held.chains}
        hooked = dict.fromkeys(chains, True)
        if self.members is None:
            return ObservedRules(chains=chains, hooked=hooked)
        if deep:
            return ObservedRules(chains=chains, hooked=hooked, peers=frozenset(self.members),
                                 peer_count=len(self.members))
        return ObservedRules(chains=chains, hooked=hooked, peer_count=len(self.members))

    async def dropped(self) -> int:
        return 0

    async def remove(self) -> None:
        self.held, self.members = None, None


@asynccontextmanager
async def running(keeper: RulesKeeper) -> AsyncIterator[None]:
    task = asyncio.create_task(keeper.run())
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_a_new_peer_is_in_the_set_when_update_peers_returns() -> None:
    fw = MemoryFirewall()
    keeper = RulesKeeper(fw)
    before = addresses(3)
    await keeper.sync(wanted(before))
    newcomer = IPv4Address("10.250.9.9")
    await keeper.update_peers({newcomer}, set())
    assert fw.members is not None and str(newcomer) in fw.members
    assert fw.calls[-1] == "set_peers +1 -0"  # one element, not a rewrite


async def test_departed_peers_leave_in_one_batch_not_one_call_each() -> None:
    fw = MemoryFirewall()
    keeper = RulesKeeper(fw, check_seconds=3600)
    everyone = addresses(1000)
    await keeper.sync(wanted(everyone))
    async with running(keeper):
        left = set(everyone)
        for peer in sorted(everyone)[:900]:  # 900 leases expire together, one event each
            left.discard(peer)
            await keeper.update_peers(set(), {peer})
        assert fw.members is not None and len(fw.members) == 1000  # not yet: batched
        await asyncio.sleep(RETIRE_DELAY_SECONDS * 4)
        assert fw.members == {str(p) for p in left}
        removals = [c for c in fw.calls if c.startswith("set_peers")]
        assert removals == ["set_peers +0 -900"]


async def test_a_peer_that_returns_before_its_removal_stays_admitted() -> None:
    fw = MemoryFirewall()
    keeper = RulesKeeper(fw, check_seconds=3600)
    everyone = addresses(5)
    await keeper.sync(wanted(everyone))
    async with running(keeper):
        back = min(everyone)
        await keeper.update_peers(set(), {back})
        await keeper.update_peers({back}, set())  # back before the batch went out
        await asyncio.sleep(RETIRE_DELAY_SECONDS * 4)
        assert fw.members == {str(p) for p in everyone}
        assert not await keeper.sync(wanted(everyone), repair=True)
        assert keeper.status.repairs == {}


async def test_a_check_before_the_batch_neither_sees_drift_nor_counts_a_repair() -> None:
    fw = MemoryFirewall()
    keeper = RulesKeeper(fw, check_seconds=3600)
    everyone = addresses(10)
    await keeper.sync(wanted(everyone))
    fewer = frozenset(sorted(everyone)[5:])
    await keeper.update_peers(set(), everyone - fewer)  # no run(): the batch is pending
    assert await keeper.sync(wanted(fewer), repair=True, deep=False) == []
    assert fw.members == {str(p) for p in fewer}
    assert keeper.status.repairs == {}


async def test_a_shallow_check_counts_the_set_and_a_full_one_lists_it() -> None:
    fw = MemoryFirewall()
    keeper = RulesKeeper(fw)
    everyone = addresses(50)
    await keeper.sync(wanted(everyone))
    assert fw.members is not None
    fw.calls.clear()
    # Someone swaps a member for another: the count stays, a shallow check cannot tell.
    fw.members.remove(str(min(everyone)))
    fw.members.add("192.0.2.1")
    assert await keeper.sync(wanted(everyone), repair=True, deep=False) == []
    assert fw.calls == ["observe shallow"]
    found = await keeper.sync(wanted(everyone), repair=True)
    assert [d.kind for d in found] == ["peers"]
    assert fw.members == {str(p) for p in everyone}  # put right
    # Someone deletes one: the count differs, a shallow check finds it.
    fw.members.remove(str(max(everyone)))
    found = await keeper.sync(wanted(everyone), repair=True, deep=False)
    assert [d.kind for d in found] == ["peers"]
    assert keeper.status.repairs["peers"] == 2
    assert compare(wanted(everyone), await fw.observe()) == []


async def test_a_full_read_is_made_anyway_once_it_is_due() -> None:
    fw = MemoryFirewall()
    keeper = RulesKeeper(fw)
    await keeper.sync(wanted(addresses(3)))
    fw.calls.clear()
    keeper._deep_due = 0.0  # the deep interval has passed
    await keeper.sync(wanted(addresses(3)), repair=True, deep=False)
    await keeper.sync(wanted(addresses(3)), repair=True, deep=False)
    assert fw.calls == ["observe deep", "observe shallow"]


def test_nft_monitor_our_own_transactions_are_ignored_others_wake_the_keeper() -> None:
    changes: list[str] = []
    ours = {4242}
    lines = ["add element ip leaseagent vxlan_peers { 10.250.0.3 }",
             "# new generation 7 by process 4242 (nft)"]
    assert [foreign_change(changes, line, ours) for line in lines] == [None, None]
    # Someone else flushes a chain of ours: a check, no full read of the set.
    lines = ["delete rule ip leaseagent postrouting handle 4",
             "# new generation 8 by process 99 (nft)"]
    assert [foreign_change(changes, line, ours) for line in lines] == [None, False]
    # Someone else deletes a member: a full read of the set.
    lines = ["delete element ip leaseagent vxlan_peers { 10.250.0.3 }",
             "# new generation 9 by process 99 (nft)"]
    assert [foreign_change(changes, line, ours) for line in lines] == [None, True]
    # A transaction with nothing in it (e.g. a flush of an empty chain): nothing to do.
    assert foreign_change(changes, "# new generation 10 by process 99 (nft)", ours) is None
