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

from leaseagent.core.network import NetworkConfig

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
