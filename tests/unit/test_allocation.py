"""Picking a free subnet: the free set, and a random order driven by the injected RNG."""

from __future__ import annotations

import itertools
import random
from ipaddress import IPv4Network

from leaseagent.core.allocation import candidates, free_subnets
from leaseagent.core.network import parse_network_config

NETWORK = parse_network_config(
    b'{"Network": "10.5.0.0/16", "SubnetMin": "10.5.1.0", "SubnetMax": "10.5.20.0"}'
)
ALL = list(NETWORK.subnets())
TAKEN = {IPv4Network("10.5.1.0/24"), IPv4Network("10.5.7.0/24"), IPv4Network("10.5.20.0/24")}


def test_free_subnets_exclude_taken_and_keep_address_order() -> None:
    free = free_subnets(NETWORK, TAKEN)
    assert free == [s for s in ALL if s not in TAKEN]
    assert len(free) == NETWORK.capacity - 3


def test_taken_subnets_outside_the_range_change_nothing() -> None:
    assert free_subnets(NETWORK, {IPv4Network("10.5.200.0/24"), IPv4Network("10.9.0.0/24")}) == ALL


def test_free_subnets_is_empty_when_all_are_taken() -> None:
    assert free_subnets(NETWORK, ALL) == []
    assert list(candidates(NETWORK, ALL, random.Random(1))) == []


def test_candidates_are_a_permutation_of_the_free_subnets() -> None:
    picked = list(candidates(NETWORK, TAKEN, random.Random(7)))
    assert sorted(picked) == free_subnets(NETWORK, TAKEN)
    assert len(set(picked)) == len(picked)


def test_candidates_order_is_driven_by_the_injected_random() -> None:
    first = list(candidates(NETWORK, TAKEN, random.Random(7)))
    again = list(candidates(NETWORK, TAKEN, random.Random(7)))
    other = list(candidates(NETWORK, TAKEN, random.Random(8)))
    assert first == again
    assert first != other
    assert first != free_subnets(NETWORK, TAKEN)  # not simply address order


def test_every_free_subnet_can_come_first() -> None:
    """The pool is all free subnets, not flannel's first 100."""
    big = parse_network_config(b'{"Network": "10.0.0.0/14"}')  # 1023 subnets
    rng = random.Random(3)
    firsts = [next(candidates(big, (), rng)) for _ in range(10)]
    assert any(int(s.network_address) > int(big.subnet_at(100).network_address) for s in firsts)


class CountingRandom(random.Random):
    draws = 0

    def randrange(self, *args: int) -> int:  # type: ignore[override]
        self.draws += 1
        return super().randrange(*args)


def test_candidates_of_a_large_range_are_drawn_not_listed() -> None:
    """A /9 of /24s (32,767 subnets) with 5,000 taken: the first candidates cost a draw
    or two each, not a walk over the range; each is free and comes once."""
    big = parse_network_config(b'{"Network": "10.0.0.0/9", "SubnetLen": 24}')
    taken = {big.subnet_at(i) for i in range(0, 10_000, 2)}
    rng = CountingRandom(5)
    picked = list(itertools.islice(candidates(big, taken, rng), 8))
    assert len(set(picked)) == 8 and not set(picked) & taken
    assert rng.draws < 40


def test_a_nearly_full_range_still_yields_every_free_subnet_once() -> None:
    """Draws that keep missing give way to listing what is left."""
    taken = set(ALL) - {ALL[3], ALL[10], ALL[-1]}
    picked = list(candidates(NETWORK, taken, random.Random(2)))
    assert sorted(picked) == sorted([ALL[3], ALL[10], ALL[-1]])
