"""The rules keeper (leaseagent.dataplane.firewall.RulesKeeper) against an in-memory
firewall that behaves like the real adapters: rules and peer set written whole by
apply, the set changed by element, read back in full or (iptables' shallow read)
counted. The real adapters are exercised in tests/e2e/test_traffic_rules.py."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

import pytest

from leaseagent.core.rules import (
    FAMILIES,
    Ruleset,
    TrafficSettings,
    compare,
    ruleset,
)
from leaseagent.dataplane import firewall
from leaseagent.dataplane.fakefirewall import MemoryFirewall
from leaseagent.dataplane.firewall import (
    DEFAULT_CHECK_SECONDS,
    RETIRE_DELAY_SECONDS,
    RulesKeeper,
    foreign_change,
)
from leaseagent.errors import DataPlaneError

NET = IPv4Network("10.5.0.0/16")
POD = IPv4Network("10.5.34.0/24")


def addresses(n: int, first: int = 10) -> frozenset[IPv4Address]:
    return frozenset(IPv4Address(f"10.250.{(first + i) // 250}.{(first + i) % 250 + 1}")
                     for i in range(n))


def wanted(peers: Iterable[IPv4Address]) -> Ruleset:
    return ruleset(TrafficSettings(ip_masq=True), network=NET, own_subnet=POD, vxlan_ports=(8472,),
                   peers=peers)


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

    def follow(*lines: str) -> list[bool | None]:
        return [foreign_change(changes, line, ours, table="ip leaseagent") for line in lines]

    assert follow("add element ip leaseagent vxlan_peers { 10.250.0.3 }",
                  "# new generation 7 by process 4242 (nft)") == [None, None]
    # Someone else flushes a chain of ours: a check, no full read of the set.
    assert follow("delete rule ip leaseagent postrouting handle 4",
                  "# new generation 8 by process 99 (nft)") == [None, False]
    # Someone else deletes a member: a full read of the set.
    assert follow("delete element ip leaseagent vxlan_peers { 10.250.0.3 }",
                  "# new generation 9 by process 99 (nft)") == [None, True]
    # A transaction with nothing in it (e.g. a flush of an empty chain): nothing to do.
    assert follow("# new generation 10 by process 99 (nft)") == [None]
    # `nft flush ruleset` deletes every table by name, ours among them.
    assert follow("delete rule ip6 leaseagent input handle 6",
                  "delete table ip6 leaseagent",
                  "delete chain ip leaseagent forward",
                  "delete table ip leaseagent",
                  "# new generation 11 by process 99 (nft)")[-1] is False


def test_nft_monitor_the_other_familys_table_and_others_tables_are_not_ours() -> None:
    """The IPv6 keeper's writes (another PID) and Docker's changes leave the IPv4 keeper
    asleep; and the other way round."""
    changes: list[str] = []
    lines = ["add element ip6 leaseagent vxlan_peers { fd00::3 }",
             "delete rule ip6 leaseagent postrouting handle 4",
             "add rule ip filter DOCKER-USER counter return",
             "add table inet leaseagent",
             "# new generation 12 by process 99 (nft)"]
    assert [foreign_change(changes, line, set(), table="ip leaseagent")
            for line in lines] == [None] * 5
    assert [foreign_change(changes, line, set(), table="ip6 leaseagent")
            for line in lines][-1] is True


V6_NET = IPv6Network("fd10::/48")
V6_POD = IPv6Network("fd10:0:0:22::/64")


def addresses6(n: int) -> frozenset[IPv6Address]:
    return frozenset(IPv6Address(f"fd00:99::{i + 1:x}") for i in range(n))


async def test_an_ipv6_keeper_holds_its_ruleset_and_its_peer_set_like_ipv4s() -> None:
    fw = MemoryFirewall(6)
    keeper = RulesKeeper(fw, check_seconds=3600)
    want = ruleset(TrafficSettings(ip_masq=True), network=V6_NET, own_subnet=V6_POD,
                   vxlan_ports=(8472,), peers=addresses6(4))
    assert await keeper.sync(want) != []  # nothing there yet: written
    assert keeper.wanted is not None and keeper.wanted.family == FAMILIES[6]
    async with running(keeper):
        await keeper.update_peers({IPv6Address("fd00:99::99")}, {IPv6Address("fd00:99::1")})
        assert fw.members is not None and "fd00:99::99" in fw.members
        await asyncio.sleep(RETIRE_DELAY_SECONDS * 4)
        assert "fd00:99::1" not in fw.members
    assert await keeper.sync(repair=True) == []
    assert keeper.wanted.family == FAMILIES[6]  # the peers changed, the family stayed
    assert keeper.status.repairs == {}


def test_the_rules_metrics_keep_their_series_and_sum_the_families() -> None:
    """With a keeper per family: no new series (no family label), in sync only when both
    are, repairs and drops added up."""
    from collections import Counter

    from leaseagent.dataplane.firewall import RulesStatus
    from leaseagent.metrics import Metrics

    metrics = Metrics()
    v4 = RulesStatus(in_sync=True, repairs=Counter(missing=2), dropped=5)
    v6 = RulesStatus(in_sync=True, repairs=Counter(missing=1, peers=4), dropped=7)
    metrics.export_rules(v4)
    metrics.export_rules(v6, family=6)

    def value(name: str, **labels: str) -> float | None:
        return metrics.registry.get_sample_value(name, labels)

    assert value("leaseagent_rules_in_sync") == 1
    assert value("leaseagent_rules_repairs_total", kind="missing") == 3
    assert value("leaseagent_rules_repairs_total", kind="peers") == 4
    assert value("leaseagent_vxlan_peer_filter_dropped_packets_total") == 12
    v6.in_sync = False
    assert value("leaseagent_rules_in_sync") == 0
    assert value("leaseagent_rules_in_sync", family="6") is None


async def test_rules_that_cannot_be_written_are_an_error_naming_the_command_not_a_repair(
        caplog: pytest.LogCaptureFixture) -> None:
    """A write the tool refuses: not in sync, its message kept for /readyz and STATUS=, one
    ERROR line however often it is retried, and the differences it leaves are neither
    counted as repairs nor blamed on someone else; once the write works, it is said once."""
    fw = MemoryFirewall()
    fw.refuse = ("iptables-restore --noflush: iptables-restore v1.8.9 (nf_tables): "
                 "Can't open socket to ipset.")
    keeper = RulesKeeper(fw)
    with caplog.at_level(logging.INFO, logger="leaseagent.dataplane.firewall"):
        await keeper.sync(wanted(addresses(2)))
        for _ in range(3):
            await keeper.sync(repair=True)
        assert not keeper.status.in_sync
        assert keeper.status.last_error == fw.refuse
        assert not keeper.status.repairs
        assert keeper.retry_seconds <= DEFAULT_CHECK_SECONDS
        lines = [r.getMessage() for r in caplog.records]
        assert [m for m in lines if "cannot be applied" in m] == [
            f"traffic rules cannot be applied: {fw.refuse} (retrying every {DEFAULT_CHECK_SECONDS:g}s)"]
        assert not [m for m in lines if "someone else" in m]

        caplog.clear()
        fw.refuse = None
        await keeper.sync(repair=True)
        assert keeper.status.in_sync and keeper.status.last_error is None
        assert not keeper.status.repairs
        assert [r.getMessage() for r in caplog.records] == ["traffic rules in place again"]

        await fw.remove()  # now someone else's doing: a repair, and said so
        await keeper.sync(repair=True)
        assert keeper.status.repairs and keeper.status.in_sync
        assert any("changed by someone else" in r.getMessage() for r in caplog.records)


async def test_a_reading_started_ahead_is_what_the_first_sync_compares_with() -> None:
    """The agent starts reading the rules while it acquires its lease: the first sync
    compares with that reading (one read in all), and writes what it lacked."""
    fw = MemoryFirewall()
    keeper = RulesKeeper(fw)
    keeper.read_ahead()
    await asyncio.sleep(0)  # the reading runs meanwhile
    assert fw.calls == ["observe deep"]
    await keeper.sync(wanted(addresses(3)))
    assert fw.calls == ["observe deep", "apply"]
    assert fw.members == {str(p) for p in addresses(3)}
    await keeper.sync(wanted(addresses(3)))  # the next sync reads again
    assert fw.calls == ["observe deep", "apply", "observe deep"]


async def test_a_reading_started_too_long_ago_is_read_again(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A reading older than READ_AHEAD_SECONDS (a lease acquisition that took long) may
    miss what changed since: the first sync reads the firewall again."""
    fw = MemoryFirewall()
    keeper = RulesKeeper(fw)
    await keeper.sync(wanted(addresses(2)))
    keeper.read_ahead()
    await asyncio.sleep(0)
    monkeypatch.setattr(firewall, "READ_AHEAD_SECONDS", 0.0)
    await asyncio.sleep(0.01)
    fw.members = set()  # someone flushed the set after the reading
    calls = len(fw.calls)
    await keeper.sync(wanted(addresses(2)))
    assert fw.calls[calls:] == ["observe deep", "apply"]
    assert fw.members == {str(p) for p in addresses(2)}


async def test_a_failed_reading_ahead_is_read_again() -> None:
    fw = MemoryFirewall()
    keeper = RulesKeeper(fw)

    async def broken(*, deep: bool = True) -> object:
        raise DataPlaneError("iptables-save: cannot read")

    real = fw.observe
    fw.observe = broken  # type: ignore[method-assign]
    keeper.read_ahead()
    await asyncio.sleep(0)
    fw.observe = real  # type: ignore[method-assign]
    await keeper.sync(wanted(addresses(2)))
    assert fw.calls == ["observe deep", "apply"]
    assert keeper.status.in_sync and keeper.status.last_error is None


class _Started(set[int]):
    """The PIDs `firewall._run` started, with an event set at the first."""

    def __init__(self) -> None:
        super().__init__()
        self.event = asyncio.Event()

    def add(self, pid: int) -> None:
        super().add(pid)
        self.event.set()


def _hold_the_loop_until_it_ends(pid: int, seconds: float = 20) -> None:
    """Block (the event loop with it) until process `pid` has ended."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT | os.WNOHANG) is not None:
                return
        except ChildProcessError:
            return  # ended, and reaped already (asyncio's child watcher thread)
        assert time.monotonic() < deadline, "the program did not end while the loop was held"
        time.sleep(0.01)


async def test_a_tool_reads_its_input_whole_while_the_loop_is_busy() -> None:
    """firewall._run gives a program its input from a file written before the start (an
    ipset script of 5,000 peers is more than a pipe holds): the program runs to its end
    while the event loop is held by other work (the data plane's plan at a join)."""
    text = "".join(f"add leaseagent-peers 10.{i >> 8 & 255}.{i & 255}.1 -exist\n"
                   for i in range(5000))
    assert len(text) > 64 * 1024
    started = _Started()
    run = asyncio.ensure_future(firewall._run(["wc", "-c"], netns=None, input=text,
                                              started=started))
    await started.event.wait()
    # The loop held: a pipe fed by the loop would leave the program waiting for the rest.
    _hold_the_loop_until_it_ends(next(iter(started)))
    code, out, _ = await run
    assert code == 0 and int(out) == len(text.encode())
