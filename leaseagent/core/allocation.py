"""Choosing a free subnet.

Pure: the taken subnets and the random generator are arguments, so the
policy is tested without etcd.

Policy: uniformly at random among *all* free subnets of [SubnetMin,
SubnetMax]. flannel picks among the first 100 free ones, which makes
concurrent starters collide far more often; with all free subnets as the
pool, two of k concurrent starters collide with probability ~k^2/(2F).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Collection, Iterator
from ipaddress import IPv4Network

from leaseagent.core.network import Network, NetworkConfig, SubnetRange

# (network, taken subnets, rng) -> free subnets in the order to try them.
Chooser = Callable[[NetworkConfig, Collection[IPv4Network], random.Random], Iterator[IPv4Network]]


def free_subnets(network: NetworkConfig, taken: Collection[IPv4Network]) -> list[IPv4Network]:
    """Every subnet of the range that is not in `taken`, in address order."""
    taken_set = set(taken)
    return [s for s in network.subnets() if s not in taken_set]


def candidates(
    network: NetworkConfig, taken: Collection[IPv4Network], rng: random.Random
) -> Iterator[IPv4Network]:
    """Free subnets in random order (each at most once)."""
    free = free_subnets(network, taken)
    rng.shuffle(free)
    return iter(free)


# Up to this many subnets a range's free ones are listed and shuffled; above it
# (IPv6: a /48 holds 65,535 /64s, a /32 four billion) random ones are drawn and
# the taken ones skipped, which costs a few draws since leases are few.
_ENUMERABLE = 1 << 16


def range_candidates(
    subnets: SubnetRange, taken: Collection[Network], rng: random.Random
) -> Iterator[Network]:
    """Free subnets of any range (IPv6 too) in random order, each at most once."""
    if subnets.capacity <= _ENUMERABLE:
        taken_set = set(taken)
        free = [s for s in subnets.subnets() if s not in taken_set]
        rng.shuffle(free)
        yield from free
        return
    seen = set(taken)
    misses = 0
    while misses < 1000:  # a range nearly full of leases: give up rather than spin
        subnet = subnets.subnet_at(rng.randrange(subnets.capacity))
        if subnet in seen:
            misses += 1
            continue
        seen.add(subnet)
        misses = 0
        yield subnet
