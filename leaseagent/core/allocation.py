"""Choosing a free subnet.

Pure: the taken subnets and the random generator are arguments, so the
policy is tested without etcd.

Policy: uniformly at random among *all* free subnets of [SubnetMin,
SubnetMax]. flannel picks among the first 100 free ones, which makes
concurrent starters collide far more often; with all free subnets as the
pool, two of k concurrent starters collide with probability ~k^2/(2F).
Candidates are drawn, not listed: an acquisition costs the same in a /16 of
/24s and in a /9 (`range_candidates`).
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
    """Free IPv4 subnets in random order (each at most once)."""
    return range_candidates(network.ipv4, taken, rng)  # type: ignore[return-value]


# A range of at most this many subnets may be listed whole when most of it is taken;
# a larger one (IPv6: a /48 holds 65,535 /64s, a /32 four billion) is only drawn from.
_ENUMERABLE = 1 << 16
# Consecutive draws that hit a taken (or already drawn) subnet before the free ones
# are listed instead (or, in a range too large to list, before giving up).
_MISSES = 8
_MISSES_UNLISTABLE = 1000


def range_candidates(
    subnets: SubnetRange, taken: Collection[Network], rng: random.Random
) -> Iterator[Network]:
    """Free subnets of any range (IPv4 or IPv6) in random order, each at most once.

    Drawn at random, a draw that hits a taken or drawn subnet thrown back, which
    costs a draw or two per candidate while the range is mostly free: the work
    follows the candidates asked for (a few), not the size of the range (32,767
    /24s in a /9). When draws keep missing (a range nearly full), the free subnets
    left are listed and shuffled. Either way every order of the free subnets is
    equally likely. Only subnet numbers are handled; a network object is made for
    each subnet yielded."""
    capacity = subnets.capacity
    base, size = int(subnets.subnet_min), subnets.subnet_size
    used = {(int(s.network_address) - base) // size for s in taken if subnets.in_range(s)}
    left = capacity - len(used)
    misses = 0
    limit = _MISSES if capacity <= _ENUMERABLE else _MISSES_UNLISTABLE
    while left > 0 and misses < limit:
        index = rng.randrange(capacity)
        if index in used:
            misses += 1
            continue
        used.add(index)
        left -= 1
        misses = 0
        yield subnets.subnet_at(index)
    if left > 0 and capacity <= _ENUMERABLE:
        rest = [i for i in range(capacity) if i not in used]
        rng.shuffle(rest)
        yield from map(subnets.subnet_at, rest)
