"""Subnets a test plants by hand (a lease, a route, an address) in a cluster whose agents
allocate at random in the same Network, between SubnetMin and SubnetMax.

A fixed choice (say 10.244.250.0/24) fails the run in which an agent happens to draw
it: with three hosts, about one run in 85. So a test takes the subnets it plants from
here: ones no host holds now.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from ipaddress import IPv4Network, IPv6Network
from typing import TypeVar

from leaseagent.lab import Lab
from leaseagent.lab.topology import CONTAINER_NETWORK, CONTAINER_NETWORK6

N = TypeVar("N", IPv4Network, IPv6Network)


def free_subnets(network: N, held: Iterable[N | None], count: int = 1, *,
                 prefix: int = 24, first: int = 250) -> list[N]:
    """`count` subnets (/`prefix`) of `network` that are not in `held`, from the
    `first`-th one on (wrapping round, skipping the network's own first subnet)."""
    taken = {n for n in held if n is not None}
    total = 2 ** (prefix - network.prefixlen)

    def candidates() -> Iterator[N]:
        for i in itertools.chain(range(first, total), range(1, first)):
            yield type(network)((int(network.network_address) + (i << (network.max_prefixlen
                                                                        - prefix)), prefix))

    chosen = list(itertools.islice((n for n in candidates() if n not in taken), count))
    assert len(chosen) == count, f"no {count} free /{prefix} in {network}"
    return chosen


def free_subnet(network: N, held: Iterable[N | None], **where: int) -> N:
    """One subnet of `network` nobody in `held` holds (see `free_subnets`)."""
    return free_subnets(network, held, 1, **where)[0]



def lab_free(lab: Lab, count: int = 1, *, first: int = 250) -> list[IPv4Network]:
    """`count` /24s of the lab's cluster Network that none of its hosts holds."""
    return free_subnets(CONTAINER_NETWORK, [h.subnet.network if h.subnet else None
                                            for h in lab.hosts.values()], count, first=first)


def lab_free6(lab: Lab, count: int = 1, *, first: int = 250) -> list[IPv6Network]:
    """`count` /64s of a dual-stack lab's IPv6Network that none of its hosts holds."""
    return free_subnets(CONTAINER_NETWORK6, [h.subnet6.network if h.subnet6 else None
                                             for h in lab.hosts.values()], count, prefix=64,
                        first=first)
