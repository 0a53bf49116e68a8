"""Where this host's lease may go, read from a listing: the subnets taken, the keys that
name this host (its own lease, a reservation for it), the IPv6 subnet paired with an
IPv4 one, the key a lease should have under the config, and the candidates of a new
subnet. No etcd writes: `Leasing` writes what this decides (see its module docstring
for the order of acquisition and the dual-stack rules).
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network

from leaseagent.core.allocation import Chooser, range_candidates
from leaseagent.core.leases import DUPLICATE, KeyLayout, LeaseValue, SubnetKey, Verdict, judge
from leaseagent.core.network import NetworkConfig
from leaseagent.errors import SubnetsExhausted
from leaseagent.store.base import KeyValue

log = logging.getLogger("leaseagent.leasing")


@dataclass
class Survey:
    """What a listing holds for this host."""

    taken: set[IPv4Network]  # the IPv4 subnets the keys name
    taken6: set[IPv6Network]  # the IPv6 subnets they name
    verdicts: list[Verdict]  # on the keys whose value may name our PublicIP, oldest first
    named: list[Verdict]  # this host's leases (attached to an etcd lease) that fit
    reserved: list[Verdict]  # reservations for this host that fit and are usable
    # Every key that parsed, with what it names: the lease watcher's first judging of
    # the same listing reads them here instead of parsing each key again.
    names: dict[str, SubnetKey]


class Placement:
    def __init__(self, *, layout: KeyLayout, network: NetworkConfig, value: LeaseValue,
                 rng: random.Random, choose: Chooser, candidates_per_txn: int) -> None:
        self.layout = layout
        self.network = network
        self.value = value
        self._rng = rng
        self._choose = choose  # the allocation policy (the benchmark swaps in flannel's)
        self._per_txn = max(1, candidates_per_txn)

    def key_for(self, subnet: IPv4Network, ipv6: IPv6Network | None = None) -> str:
        return self.layout.lease_key(subnet, ipv6)

    def survey(self, items: list[KeyValue]) -> Survey:
        """The subnets the keys name, and this host's keys among them. Only the keys whose
        value may name this host's PublicIP are decoded (by the lease layer, with no
        network: a reservation carries no backend data yet, so it would not pass as a
        peer; it only has to fit the network). A value names our PublicIP only if its
        text does, unless JSON escapes spell it out."""
        needle = str(self.value.public_ip).encode()
        taken: set[IPv4Network] = set()
        taken6: set[IPv6Network] = set()
        maybe_ours = []
        names: dict[str, SubnetKey] = {}
        for kv in items:
            try:
                named = self.layout.parse_lease_key(kv.key)
            except ValueError:
                continue
            names[kv.key] = named
            taken.add(named.ipv4)
            if named.ipv6 is not None:
                taken6.add(named.ipv6)
            if needle in kv.value or b"\\u" in kv.value:
                maybe_ours.append(kv)
        verdicts = list(judge(maybe_ours, layout=self.layout, network=None).verdicts.values())
        survey = Survey(taken, taken6, verdicts, [], [], names)
        for verdict in verdicts:
            value, subnet = verdict.value, verdict.subnet
            if value is None or subnet is None or value.public_ip != self.value.public_ip:
                continue
            if not self.network.keeps(subnet):
                continue
            if verdict.reservation:
                if self._reservation_usable(verdict, items):
                    survey.reserved.append(verdict)
            elif value.node_id in (None, self.value.node_id):
                survey.named.append(verdict)
        return survey

    def _reservation_usable(self, verdict: Verdict, items: list[KeyValue]) -> bool:
        """Whether a reservation naming this host is one the lease layer calls valid
        among the keys naming its subnet (it may overlap another host's lease:
        core.leases.judging, rule 5). Scans the listing: only for a reservation of ours."""
        rivals = [kv for kv in items if kv.key != verdict.key and self._names(kv, verdict.subnet)]
        if not rivals:
            return True
        kv = next(kv for kv in items if kv.key == verdict.key)
        judged = judge([kv, *rivals], layout=self.layout, network=self.network).verdicts[kv.key]
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

    def ipv6_for(self, subnet: IPv4Network, taken6: set[IPv6Network],
                 previous: IPv6Network | None = None) -> IPv6Network | None:
        """The IPv6 subnet to pair with `subnet` (None without IPv6): `previous` if it fits
        and is free, else the one at the same position (see Leasing's module docstring),
        else a random free one. SubnetsExhausted when the IPv6 range is full."""
        six = self.network.ipv6
        if six is None:
            return None
        if previous is not None and six.in_range(previous) and previous not in taken6:
            return previous
        v4 = self.network.ipv4
        index = (int(subnet.network_address) - int(v4.subnet_min)) // v4.subnet_size
        if six.capacity >= v4.capacity and 0 <= index < six.capacity:
            paired = six.subnet_at(index)
            if isinstance(paired, IPv6Network) and paired not in taken6:
                return paired
        for pick in range_candidates(six, taken6, self._rng):
            if isinstance(pick, IPv6Network):
                return pick
        raise SubnetsExhausted(
            f"no free IPv6 subnet in {six.network} (range {six.subnet_min}-{six.subnet_max}): "
            f"all {six.capacity} are taken")

    def fitting_key(self, verdict: Verdict, subnet: IPv4Network, taken6: set[IPv6Network]
                    ) -> str:
        """The key this host's lease on `subnet` (`verdict`'s) should have under the config:
        the same IPv4 subnet, its IPv6 subnet kept if it fits (a new one when IPv6 is on
        and it has none or a misfit, none when IPv6 is off)."""
        if self.network.ipv6 is None:
            return self.key_for(subnet)
        kept = verdict.ipv6_subnet
        if self.network.ipv6_part_fits(kept):
            return self.key_for(subnet, kept)
        return self.key_for(subnet, self.ipv6_for(subnet, taken6 - {kept} if kept else taken6))

    def candidate_keys(self, taken: set[IPv4Network], taken6: set[IPv6Network]) -> list[str]:
        """The keys of up to CANDIDATES_PER_TXN random free subnets, for one transaction
        that creates the first still absent; SubnetsExhausted when none is free."""
        network = self.network
        in_range = sum(1 for s in taken if network.in_range(s))
        pool = self._choose(network, taken, self._rng)
        picks = [s for _, s in zip(range(self._per_txn), pool, strict=False)]
        if not picks:
            raise SubnetsExhausted(
                f"no free subnet in network {network.network} "
                f"(range {network.subnet_min}-{network.subnet_max}): "
                f"all {network.capacity} subnets are taken ({in_range} leases)"
            )
        keys = []
        for pick in picks:
            ipv6 = self.ipv6_for(pick, taken6)
            keys.append(self.key_for(pick, ipv6))
            if ipv6 is not None:
                taken6.add(ipv6)  # two candidates of one transaction never share one
        return keys
