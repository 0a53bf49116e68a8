"""An in-memory firewall that behaves like the real adapters (leaseagent.dataplane.firewall):
rules and peer set written whole by apply, the set changed by element, read back in
full or (iptables' shallow read) counted; every call recorded. For the keeper's unit
tests, for agents a test runs in its own process, which must not write rules into
the machine's own firewall, and for the cluster bench's simulated hosts (beside the
fake kernel, leaseagent.dataplane.fakenetlink)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from leaseagent.core.network import Address
from leaseagent.core.rules import FAMILIES, ObservedRules, Ruleset
from leaseagent.errors import DataPlaneError


class MemoryFirewall:
    """What a firewall holds, and every call made to it."""

    name = "memory"

    def __init__(self, family: int = 4) -> None:
        self.family = FAMILIES[family]
        self.held: Ruleset | None = None
        self.members: set[str] | None = None
        self.calls: list[str] = []
        # While set, a write fails with this (the real adapters' DataPlaneError: the command
        # and what the tool said) and changes nothing, as one iptables-restore commit.
        self.refuse: str | None = None

    def watches(self) -> bool:
        return False

    async def apply(self, want: Ruleset, seen: ObservedRules | None = None,
                    admitted: Callable[[], None] | None = None) -> None:
        self.calls.append("apply")
        if self.refuse is not None:
            raise DataPlaneError(self.refuse)
        self.held = want
        self.members = set(want.peer_texts) if want.peer_ports else None

    async def set_peers(self, add: Iterable[Address], remove: Iterable[Address]) -> None:
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
