"""The firewall adapters and the keeper that holds the traffic rules in place.

The rules themselves are pure data (leaseagent.core.rules). Two adapters
write and read them, each through the program made for it, in one atomic
step per change:

- `NftFirewall` (the network config says `"EnableNFTables": true`): one table
  of our own, `table ip leaseagent`, written whole with `nft -f -` (its own
  transaction: "add table; delete table; table {...}" replaces it atomically,
  the peer set's elements included); the peer set updated with `add/delete
  element` as peers come and go; read back with `nft -j list table`. `nft
  monitor` tells of every ruleset change, so a flushed or deleted chain, a
  rule inserted into ours, or `nft flush ruleset` (what firewalld does on a
  reload) is seen at once.
- `IptablesFirewall` (otherwise): our own chains LEASEAGENT-POSTROUTING (nat),
  LEASEAGENT-FORWARD and LEASEAGENT-INPUT (filter), each jumped to from the
  first rule of its built-in chain, written per table with `iptables-restore
  --noflush` (declaring a chain flushes it, so the whole table's part is one
  commit); the peer set is an ipset (`ipset restore`). iptables has no event
  stream: `iptables-save` and `ipset list` are read every `check_seconds`.

Why these tools and not a library: both are the kernel projects' own
userspace, present wherever the rules can work at all, atomic per call, and
what an operator uses to look; the Python bindings (python3-nftables,
python-iptables) are not on PyPI in a maintained form or wrap the same
programs. We call them a few times per change, never per packet or per peer
of a listing.

Nothing but our table, our chains, our jumps and our ipset is ever written.
Commands run in the agent's network namespace (or `netns`, for tests).

`RulesKeeper` is level-triggered like the routes: `sync(wanted)` reads what is
there, compares (core.rules.compare) and rewrites all of ours when anything
differs; `update_peers` changes the peer set by element; `run` repairs drift
(on nft events, and every check interval). It never removes rules when it
stops: traffic keeps flowing across a restart.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import shutil
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from typing import Protocol

from leaseagent.core.leases import Peer
from leaseagent.core.rules import (
    CHAINS,
    IPSET,
    PEER_SET,
    TABLE,
    ObservedRules,
    RuleDifference,
    Ruleset,
    compare,
    iptables_chain,
)
from leaseagent.errors import ConfigError, DataPlaneError
from leaseagent.retrying import Backoff

log = logging.getLogger(__name__)

DEFAULT_CHECK_SECONDS = 2.0  # iptables: how often the chains are read back
_JUMP = "leaseagent:jump"


async def _run(argv: list[str], *, netns: str | None, input: str | None = None,
               check: bool = True) -> tuple[int, str, str]:
    full = ["ip", "netns", "exec", netns, *argv] if netns else argv
    try:
        proc = await asyncio.create_subprocess_exec(
            *full, stdin=asyncio.subprocess.PIPE if input is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    except OSError as exc:
        raise DataPlaneError(f"cannot run {argv[0]}: {exc}") from exc
    out, err = await proc.communicate(input.encode() if input is not None else None)
    code = proc.returncode if proc.returncode is not None else -1
    if check and code != 0:
        raise DataPlaneError(f"{' '.join(argv[:3])}: {err.decode().strip() or f'exit {code}'}")
    return code, out.decode(), err.decode()


class Firewall(Protocol):
    name: str

    async def apply(self, wanted: Ruleset) -> None: ...

    async def set_peers(self, add: Iterable[IPv4Address], remove: Iterable[IPv4Address]) -> None: ...

    async def observe(self) -> ObservedRules: ...

    async def remove(self) -> None: ...

    def watches(self) -> bool:
        """True if `events()` tells of changes (no need to poll)."""
        ...


# ------------------------------------------------------------------ nftables


class NftFirewall:
    name = "nftables"

    def __init__(self, *, netns: str | None = None) -> None:
        self._netns = netns

    def watches(self) -> bool:
        return True

    def render(self, wanted: Ruleset) -> str:
        """The whole table in nft syntax (what `nft list table` shows, too)."""
        lines = [f"table ip {TABLE} {{"]
        if wanted.peer_port is not None:
            lines += [f"\tset {PEER_SET} {{", "\t\ttype ipv4_addr"]
            if wanted.peers:
                lines.append(f"\t\telements = {{ {', '.join(map(str, sorted(wanted.peers)))} }}")
            lines.append("\t}")
        for chain in wanted.chains:
            hook, kind, priority, _, _ = CHAINS[chain]
            lines += [f"\tchain {chain} {{",
                      f"\t\ttype {kind} hook {hook} priority {priority}; policy accept;"]
            lines += [f'\t\t{rule.nft} comment "{rule.tag}"' for rule in wanted.chain(chain)]
            lines.append("\t}")
        lines.append("}")
        return "\n".join(lines) + "\n"

    async def apply(self, wanted: Ruleset) -> None:
        script = f"table ip {TABLE}\ndelete table ip {TABLE}\n"
        if wanted.rules:
            script += self.render(wanted)
        await _run(["nft", "-f", "-"], netns=self._netns, input=script)

    async def set_peers(self, add: Iterable[IPv4Address], remove: Iterable[IPv4Address]) -> None:
        add, remove = sorted(add), sorted(remove)
        script = ""
        if add:
            script += f"add element ip {TABLE} {PEER_SET} {{ {', '.join(map(str, add))} }}\n"
        if remove:
            script += f"delete element ip {TABLE} {PEER_SET} {{ {', '.join(map(str, remove))} }}\n"
        if script:
            await _run(["nft", "-f", "-"], netns=self._netns, input=script)

    async def observe(self) -> ObservedRules:
        code, out, _ = await _run(["nft", "-j", "list", "table", "ip", TABLE], netns=self._netns,
                                  check=False)
        if code != 0:
            return ObservedRules()  # no table (flushed, never made)
        items = json.loads(out).get("nftables", [])
        chains: dict[str, list[str | None]] = {}
        hooked: dict[str, bool] = {}
        peers: frozenset[IPv4Address] | None = None
        dropped = 0
        for item in items:
            if "chain" in item:
                c = item["chain"]
                name = c.get("name")
                if name in CHAINS:
                    hook, kind, _, _, _ = CHAINS[name]
                    hooked[name] = (c.get("hook") == hook and c.get("type") == kind
                                    and c.get("policy", "accept") == "accept")
                    chains.setdefault(name, [])
            elif "set" in item and item["set"].get("name") == PEER_SET:
                elems = item["set"].get("elem", [])
                peers = frozenset(IPv4Address(e) for e in elems if isinstance(e, str))
            elif "rule" in item:
                rule = item["rule"]
                chains.setdefault(rule.get("chain", ""), []).append(rule.get("comment"))
                for expr in rule.get("expr", []):
                    if "counter" in expr and str(rule.get("comment", "")).startswith(
                            "leaseagent:vxlan-peers"):
                        dropped = int(expr["counter"].get("packets", 0))
        return ObservedRules(chains=chains, hooked=hooked, peers=peers, dropped=dropped)

    async def remove(self) -> None:
        await _run(["nft", "-f", "-"], netns=self._netns,
                   input=f"table ip {TABLE}\ndelete table ip {TABLE}\n")

    async def events(self) -> asyncio.subprocess.Process:
        """`nft monitor`, whose every line is a ruleset change somewhere."""
        argv = ["nft", "monitor"]
        full = ["ip", "netns", "exec", self._netns, *argv] if self._netns else argv
        return await asyncio.create_subprocess_exec(
            *full, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL)


# ------------------------------------------------------------------ iptables

_COMMENT = re.compile(r'--comment "?([^" ]+)"?')
_COUNTS = re.compile(r"^\[(\d+):(\d+)\] ")


@dataclass
class _Saved:
    """One table of `iptables-save -c`: rules per chain, in order (counters stripped)."""

    rules: dict[str, list[str]] = field(default_factory=dict)
    counts: dict[str, list[int]] = field(default_factory=dict)


def _parse_save(text: str) -> _Saved:
    saved = _Saved()
    for line in text.splitlines():
        packets = 0
        m = _COUNTS.match(line)
        if m:
            packets = int(m.group(1))
            line = line[m.end():]
        if line.startswith(":"):
            saved.rules.setdefault(line[1:].split()[0], [])
        elif line.startswith("-A "):
            chain = line.split()[1]
            saved.rules.setdefault(chain, []).append(line)
            saved.counts.setdefault(chain, []).append(packets)
    return saved


def _comment(line: str) -> str | None:
    m = _COMMENT.search(line)
    return m.group(1) if m and m.group(1).startswith("leaseagent:") else None


class IptablesFirewall:
    name = "iptables"

    def __init__(self, *, netns: str | None = None) -> None:
        self._netns = netns

    def watches(self) -> bool:
        return False

    async def _save(self, table: str) -> _Saved:
        _, out, _ = await _run(["iptables-save", "-c", "-t", table], netns=self._netns)
        return _parse_save(out)

    async def _ipset_members(self) -> frozenset[IPv4Address] | None:
        code, out, _ = await _run(["ipset", "list", "-o", "save", IPSET], netns=self._netns,
                                  check=False)
        if code != 0:
            return None
        return frozenset(IPv4Address(line.split()[2]) for line in out.splitlines()
                         if line.startswith(f"add {IPSET} "))

    async def apply(self, wanted: Ruleset) -> None:
        if wanted.peer_port is not None:
            await _run(["ipset", "create", IPSET, "hash:ip", "-exist"], netns=self._netns)
            have = await self._ipset_members() or frozenset()
            await self.set_peers(wanted.peers - have, have - wanted.peers)
        for table in ("nat", "filter"):
            saved = await self._save(table)
            lines = [f"*{table}"]
            for chain, (_, _, _, ipt_table, builtin) in CHAINS.items():
                if ipt_table != table:
                    continue
                ours = iptables_chain(chain)
                rules = wanted.chain(chain)
                exists = ours in saved.rules
                if rules or exists:
                    lines.append(f":{ours} - [0:0]")  # declared: created, or flushed
                for rule in rules:
                    lines.append(f'-A {ours} -m comment --comment "{rule.tag}" {rule.iptables}')
                for line in saved.rules.get(builtin, []):
                    if line.endswith(f"-j {ours}"):
                        lines.append("-D" + line[2:])
                if rules:
                    lines.append(f'-I {builtin} 1 -m comment --comment "{_JUMP}:{chain}" -j {ours}')
                elif exists:
                    lines.append(f"-X {ours}")
            lines.append("COMMIT")
            await _run(["iptables-restore", "--noflush"], netns=self._netns,
                       input="\n".join(lines) + "\n")
        if wanted.peer_port is None:
            await _run(["ipset", "destroy", IPSET], netns=self._netns, check=False)

    async def set_peers(self, add: Iterable[IPv4Address], remove: Iterable[IPv4Address]) -> None:
        script = "".join(f"add {IPSET} {ip} -exist\n" for ip in sorted(add))
        script += "".join(f"del {IPSET} {ip} -exist\n" for ip in sorted(remove))
        if script:
            await _run(["ipset", "restore"], netns=self._netns, input=script)

    async def observe(self) -> ObservedRules:
        chains: dict[str, list[str | None]] = {}
        hooked: dict[str, bool] = {}
        dropped = 0
        for table in ("nat", "filter"):
            saved = await self._save(table)
            for chain, (_, _, _, ipt_table, builtin) in CHAINS.items():
                if ipt_table != table:
                    continue
                ours = iptables_chain(chain)
                if ours not in saved.rules:
                    continue
                chains[chain] = [_comment(line) for line in saved.rules[ours]]
                jumps = [i for i, line in enumerate(saved.rules.get(builtin, []))
                         if line.endswith(f"-j {ours}")]
                hooked[chain] = jumps == [0]
                if chain == "input":
                    dropped = sum(n for line, n in zip(saved.rules[ours], saved.counts.get(ours, []),
                                                       strict=False)
                                  if (_comment(line) or "").startswith("leaseagent:vxlan-peers"))
        return ObservedRules(chains=chains, hooked=hooked, peers=await self._ipset_members(),
                             dropped=dropped)

    async def remove(self) -> None:
        await self.apply(Ruleset())


def firewall(*, nftables: bool, netns: str | None = None) -> Firewall:
    """The adapter for the network config's choice; ConfigError if its program is missing."""
    programs = ("nft",) if nftables else ("iptables-restore", "iptables-save", "ipset")
    for program in programs:
        if shutil.which(program, path="/usr/sbin:/usr/bin:/sbin:/bin") is None:
            package = {"nft": "nftables", "ipset": "ipset"}.get(program, "iptables")
            raise ConfigError(f"traffic rules need {program} (apt-get install "
                              f"--no-install-recommends {package})")
    return NftFirewall(netns=netns) if nftables else IptablesFirewall(netns=netns)


# ------------------------------------------------------------------ the keeper


@dataclass
class RulesStatus:
    in_sync: bool = False
    last_error: str | None = None
    repairs: Counter[str] = field(default_factory=Counter)  # by difference kind
    dropped: int = 0  # packets the peer filter dropped (its counter, last read)


class RulesKeeper:
    """Holds `wanted` in place through a Firewall: level-triggered, repaired on drift."""

    def __init__(self, fw: Firewall, *, check_seconds: float = DEFAULT_CHECK_SECONDS) -> None:
        self.fw = fw
        self.status = RulesStatus()
        self.wanted: Ruleset | None = None
        self._check_seconds = check_seconds
        self._counted = 0  # the peer filter's counter as last read (it restarts on a rewrite)
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()

    async def sync(self, wanted: Ruleset, *, repair: bool = False) -> list[RuleDifference]:
        """Make the firewall hold `wanted`; the differences found (and fixed)."""
        async with self._lock:
            self.wanted = wanted
            try:
                observed = await self.fw.observe()
                # A rewrite restarts the firewall's counter: add what it grew by.
                grew = observed.dropped - self._counted
                self.status.dropped += grew if grew >= 0 else observed.dropped
                self._counted = observed.dropped
                found = compare(wanted, observed)
                if found:
                    if repair:
                        for kind in {d.kind for d in found}:
                            self.status.repairs[kind] += 1
                        log.warning("traffic rules changed by someone else (%s); restoring them",
                                    "; ".join(d.text for d in found[:3]))
                    await self.fw.apply(wanted)
                    self._counted = 0
                self.status.in_sync, self.status.last_error = True, None
                return found
            except DataPlaneError as exc:
                self.status.in_sync, self.status.last_error = False, str(exc)
                log.warning("traffic rules: %s", exc)
                return []

    async def update_peers(self, peers: frozenset[IPv4Address]) -> None:
        """The peer filter's set, element by element (called before routes are added)."""
        async with self._lock:
            wanted = self.wanted
            if wanted is None or wanted.peer_port is None or peers == wanted.peers:
                return
            self.wanted = Ruleset(wanted.rules, wanted.peer_port, peers)
            try:
                await self.fw.set_peers(peers - wanted.peers, wanted.peers - peers)
            except DataPlaneError as exc:
                self.status.in_sync, self.status.last_error = False, str(exc)
                self._wake.set()  # a full sync puts the set right

    async def run(self) -> None:
        """Repair drift: at once on nft events, else every check interval."""
        tasks = [asyncio.create_task(self._poll())]
        if isinstance(self.fw, NftFirewall):
            tasks.append(asyncio.create_task(self._monitor(self.fw)))
        try:
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _poll(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), self._check_seconds)
                await asyncio.sleep(0.02)  # a burst of events, one check
            except TimeoutError:
                pass
            self._wake.clear()
            if self.wanted is not None:
                await self.sync(self.wanted, repair=True)

    async def _monitor(self, fw: NftFirewall) -> None:
        backoff = Backoff()
        while True:
            try:
                proc = await fw.events()
            except OSError as exc:
                log.warning("cannot follow nftables events (%s); checking every %gs",
                            exc, self._check_seconds)
                return
            assert proc.stdout is not None
            try:
                while await proc.stdout.readline():
                    self._wake.set()
                    backoff.reset()
            finally:
                if proc.returncode is None:
                    proc.kill()
                await proc.wait()
            await backoff.sleep()  # nft monitor ended: start it again


def peer_addresses(peers: Iterable[Peer]) -> frozenset[IPv4Address]:
    """The PublicIPs the peer filter admits: every vxlan peer's."""
    return frozenset(p.public_ip for p in peers if p.backend_type == "vxlan")

