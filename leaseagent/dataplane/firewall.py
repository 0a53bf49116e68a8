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
  first rule of its built-in chain (in FORWARD, the first after Docker's
  DOCKER-USER jump, so the operator's rules there still apply:
  core.rules.jump_index), written by one `iptables-restore --noflush`, a
  commit per table (declaring a chain flushes it, so the whole table's part is
  one commit), after the peer set, an ipset (`ipset restore`, which makes it
  too); the reads of a check or a write run at once. iptables has no event
  stream: `iptables-save` and the ipset's header (how many members: `ipset list
  -t`) are read every check interval, every member every DEEP_CHECK_SECONDS:
  with thousands of peers the listing is most of a check's cost, and a member
  swapped for another, the count unchanged, is rare enough to wait that long.

Why these tools and not a library: both are the kernel projects' own
userspace, present wherever the rules can work at all, atomic per call, and
what an operator uses to look; the Python bindings (python3-nftables,
python-iptables) are not on PyPI in a maintained form or wrap the same
programs. We call them a few times per change, never per packet or per peer
of a listing.

Nothing but our table, our chains, our jumps and our ipset is ever written.
Commands run in the agent's network namespace (or `netns`, for tests).

Each adapter serves one family (core.rules.Family): IPv4 as before dual-stack
(`table ip leaseagent`; iptables, ipset leaseagent-vxlan-peers), IPv6 beside
it with the same chain names (`table ip6 leaseagent`; ip6tables, ipset
leaseagent-vxlan-peers6 of family inet6). The two never touch each other's
tables, so one keeper per family holds its own rules: a repair, a rewrite or
`leasectl cleanup` of one leaves the other as it is.

`RulesKeeper` is level-triggered like the routes: `sync(wanted)` reads what is
there, compares (core.rules.compare) and rewrites all of ours when anything
differs; `update_peers` changes the peer set by element; `run` repairs drift
(on nft events, and every check interval). It never removes rules when it
stops: traffic keeps flowing across a restart. Its `nft monitor` follows only
its own table: the other family's keeper writing (peers coming and going) is
no change of ours and starts no check.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from dataclasses import replace as replaced
from ipaddress import ip_address
from typing import Any, Protocol

from leaseagent import memory
from leaseagent.core.network import Address
from leaseagent.core.rules import (
    CHAINS,
    FAMILIES,
    PEER_SET,
    TABLE,
    Family,
    ObservedRules,
    RuleDifference,
    Ruleset,
    compare,
    iptables_chain,
    is_peer_filter,
    jump_index,
)
from leaseagent.errors import ConfigError, DataPlaneError
from leaseagent.retrying import Backoff
from leaseagent.waiting import within

log = logging.getLogger(__name__)

DEFAULT_CHECK_SECONDS = 5.0  # iptables: seconds between reads of the chains (--iptables-resync, flanneld's 5)
WATCHED_CHECK_SECONDS = 30.0  # nftables: events tell of changes; a check now and then anyway
DEEP_CHECK_SECONDS = 30.0  # how often a check reads every member of the peer set
RETIRE_DELAY_SECONDS = 0.05  # departed peers leave the filter in batches this far apart
# A reading started ahead of the first sync (`RulesKeeper.read_ahead`) is compared with
# only if it was started at most this long before; else the firewall is read again.
READ_AHEAD_SECONDS = 2.0
_JUMP = "leaseagent:jump"


async def _run(argv: list[str], *, netns: str | None, input: str | None = None,
               check: bool = True, started: set[int] | None = None) -> tuple[int, str, str]:
    """Run `argv` (in `netns`); its exit code and output. `started` collects its PID.
    `input` is read from a file written before the start, not a pipe the event loop
    feeds: the program runs to its end while the loop is busy (at a join the data
    plane plans 5,000 peers meanwhile; a pipe holds 64 KiB of their ipset script)."""
    full = ["ip", "netns", "exec", netns, *argv] if netns else argv
    try:
        stdin = _input_file(input) if input is not None else asyncio.subprocess.DEVNULL
    except OSError as exc:
        raise DataPlaneError(f"cannot run {argv[0]}: {exc}") from exc
    try:
        proc = await asyncio.create_subprocess_exec(
            *full, stdin=stdin, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    except OSError as exc:
        raise DataPlaneError(f"cannot run {argv[0]}: {exc}") from exc
    finally:
        if input is not None:
            os.close(stdin)
    if started is not None:
        started.add(proc.pid)  # `ip netns exec` execs the program: the PID stays
    out, err = await proc.communicate()
    code = proc.returncode if proc.returncode is not None else -1
    if check and code != 0:
        raise DataPlaneError(f"{' '.join(argv[:3])}: {err.decode().strip() or f'exit {code}'}")
    return code, out.decode(), err.decode()


def _input_file(text: str) -> int:
    """A descriptor of an unnamed file in memory holding `text`, read from its start."""
    fd = os.memfd_create("leaseagent-input", os.MFD_CLOEXEC)
    try:
        data = text.encode()
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd


run_tool = _run  # for the other adapters of this package that run the same tools


async def iptables_save(program: str, table: str, *, netns: str | None = None
                        ) -> dict[str, list[str]]:
    """`<program>-save -t <table>`: each chain's rules in order, as `-A CHAIN ...` lines."""
    _, out, _ = await _run([f"{program}-save", "-t", table], netns=netns)
    return _parse_save(out).rules


class Firewall(Protocol):
    name: str  # the tool: nftables | iptables (ip6tables for IPv6)
    family: Family  # which family's rules it holds

    async def apply(self, wanted: Ruleset, seen: ObservedRules | None = None,
                    admitted: Callable[[], None] | None = None) -> None:
        """Write `wanted`; `seen`: what `observe` read just before, if the caller has it
        (an adapter may write from that reading instead of reading again); `admitted`
        is called once the peer set holds `wanted`'s peers (iptables: before the chains
        are written; nftables: one transaction writes both)."""
        ...

    async def set_peers(self, add: Iterable[Address], remove: Iterable[Address]) -> None: ...

    async def observe(self, *, deep: bool = True) -> ObservedRules:
        """Ours as the firewall has it; not `deep`: the peer set counted, not listed."""
        ...

    async def dropped(self) -> int:
        """The peer filter's counter: packets dropped (0 with no filter)."""
        ...

    async def remove(self) -> None: ...

    def watches(self) -> bool:
        """True if `events()` tells of changes (no need to poll)."""
        ...


def _same_family(fw: Firewall, wanted: Ruleset) -> None:
    """Refuse a ruleset of the other family: its addresses cannot go into this table."""
    if wanted.family != fw.family:
        raise ValueError(f"an IPv{wanted.family.version} ruleset given to the "
                         f"IPv{fw.family.version} {fw.name} adapter")


async def _nothing() -> frozenset[str] | None:
    return None


def _sorted(addresses: Iterable[Address]) -> list[Address]:
    return sorted(addresses, key=int)  # one family: numeric order is address order


# ------------------------------------------------------------------ nftables


class NftFirewall:
    name = "nftables"

    def __init__(self, *, netns: str | None = None, family: int = 4) -> None:
        self._netns = netns
        self.family = FAMILIES[family]
        self.table = f"{self.family.nft} {TABLE}"  # ip leaseagent | ip6 leaseagent
        self.writers: set[int] = set()  # PIDs of our writing `nft`s, to know our own events

    def watches(self) -> bool:
        return True

    async def _write(self, script: str) -> None:
        if len(self.writers) > 64:
            self.writers.clear()
        await _run(["nft", "-f", "-"], netns=self._netns, input=script, started=self.writers)

    def render(self, wanted: Ruleset) -> str:
        """The whole table in nft syntax (what `nft list table` shows, too)."""
        lines = [f"table {self.table} {{"]
        if wanted.peer_ports:
            lines += [f"\tset {PEER_SET} {{", f"\t\ttype {self.family.address_type}"]
            if wanted.peers:
                lines.append(f"\t\telements = {{ {', '.join(map(str, _sorted(wanted.peers)))} }}")
            lines.append("\t}")
        for chain in wanted.chains:
            hook, kind, priority, _, _ = CHAINS[chain]
            lines += [f"\tchain {chain} {{",
                      f"\t\ttype {kind} hook {hook} priority {priority}; policy accept;"]
            lines += [f'\t\t{rule.nft} comment "{rule.tag}"' for rule in wanted.chain(chain)]
            lines.append("\t}")
        lines.append("}")
        return "\n".join(lines) + "\n"

    async def apply(self, wanted: Ruleset, seen: ObservedRules | None = None,
                    admitted: Callable[[], None] | None = None) -> None:
        _same_family(self, wanted)
        script = f"table {self.table}\ndelete table {self.table}\n"
        if wanted.rules:
            script += self.render(wanted)
        await self._write(script)

    async def set_peers(self, add: Iterable[Address], remove: Iterable[Address]) -> None:
        script = ""
        for verb, addresses in (("add", _sorted(add)), ("delete", _sorted(remove))):
            if addresses:
                script += (f"{verb} element {self.table} {PEER_SET} "
                           f"{{ {', '.join(map(str, addresses))} }}\n")
        if script:
            await self._write(script)

    async def observe(self, *, deep: bool = True) -> ObservedRules:
        # Always in full (`nft -t` would skip the elements but cannot count them): checks
        # come on others' changes and every WATCHED_CHECK_SECONDS, not every few seconds.
        code, out, _ = await _run(["nft", "-j", "list", "table", self.family.nft, TABLE],
                                  netns=self._netns, check=False)
        if code != 0:
            return ObservedRules()  # no table (flushed, never made)
        items = json.loads(out).get("nftables", [])
        chains: dict[str, list[str | None]] = {}
        hooked: dict[str, bool] = {}
        peers: frozenset[str] | None = None
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
                peers = frozenset(e for e in elems if isinstance(e, str))
            elif "rule" in item:
                rule = item["rule"]
                chains.setdefault(rule.get("chain", ""), []).append(rule.get("comment"))
                dropped += _nft_dropped(rule)
        return ObservedRules(chains=chains, hooked=hooked, peers=peers,
                             peer_count=None if peers is None else len(peers), dropped=dropped)

    async def dropped(self) -> int:
        code, out, _ = await _run(["nft", "-j", "list", "chain", self.family.nft, TABLE, "input"],
                                  netns=self._netns, check=False)
        if code != 0:
            return 0
        return sum(_nft_dropped(item["rule"]) for item in json.loads(out).get("nftables", [])
                   if "rule" in item)

    async def remove(self) -> None:
        await self.apply(Ruleset(family=self.family))

    async def events(self) -> asyncio.subprocess.Process:
        """`nft monitor`, whose every line is a ruleset change somewhere. It must not
        outlive the agent: one killed with SIGKILL (a crash, the lab's host removal) left
        it running for ever, so util-linux's setpriv gives it SIGTERM when its parent
        (this agent) dies (PR_SET_PDEATHSIG, kept across exec)."""
        argv = ["nft", "monitor"]
        if shutil.which("setpriv"):
            argv = ["setpriv", "--pdeathsig", "TERM", "--", *argv]
        full = ["ip", "netns", "exec", self._netns, *argv] if self._netns else argv
        return await asyncio.create_subprocess_exec(
            *full, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL)


def _nft_dropped(rule: dict[str, Any]) -> int:
    """The packets a rule of `nft -j list` counted, if it is the peer filter."""
    if not is_peer_filter(rule.get("comment")):
        return 0
    return sum(int(e["counter"].get("packets", 0)) for e in rule.get("expr", [])
               if isinstance(e, dict) and "counter" in e)


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


def _jump_target(line: str) -> str | None:
    """The chain an `iptables-save` rule jumps to (`-j X` or `-g X`), None if none."""
    words = line.split()
    for flag in ("-j", "-g"):
        if flag in words[:-1]:
            return words[words.index(flag) + 1]
    return None


def _comment(line: str) -> str | None:
    m = _COMMENT.search(line)
    return m.group(1) if m and m.group(1).startswith("leaseagent:") else None


@dataclass(frozen=True)
class _Reading:
    """What IptablesFirewall.observe read: both tables (nat, filter) and, if `listed`,
    the set's members (None: no set)."""

    saves: list[_Saved]
    members: frozenset[str] | None
    listed: bool


class IptablesFirewall:
    name = "iptables"

    def __init__(self, *, netns: str | None = None, family: int = 4) -> None:
        self._netns = netns
        self.family = FAMILIES[family]
        self.ipset = self.family.ipset

    def watches(self) -> bool:
        return False

    async def _save(self, table: str) -> _Saved:
        _, out, _ = await _run([f"{self.family.iptables}-save", "-c", "-t", table],
                               netns=self._netns)
        return _parse_save(out)

    async def _ipset_count(self) -> int | None:
        code, out, _ = await _run(["ipset", "list", "-t", self.ipset], netns=self._netns,
                                  check=False)
        if code != 0:
            return None
        for line in out.splitlines():
            if line.startswith("Number of entries:"):
                return int(line.split(":", 1)[1])
        raise DataPlaneError(f"ipset list -t {self.ipset}: no 'Number of entries' line")

    async def _ipset_members(self) -> frozenset[str] | None:
        code, out, _ = await _run(["ipset", "list", "-o", "save", self.ipset], netns=self._netns,
                                  check=False)
        if code != 0:
            return None
        prefix = f"add {self.ipset} "
        return frozenset(line[len(prefix):].split(" ", 1)[0] for line in out.splitlines()
                         if line.startswith(prefix))

    async def apply(self, wanted: Ruleset, seen: ObservedRules | None = None,
                    admitted: Callable[[], None] | None = None) -> None:
        # Two or three rounds of processes, not seven (at a join they are on the path to
        # the first route: the data plane waits for the rules, Plane.program_all): the
        # ipset's members and both tables read at once, unless `seen` (observe's reading
        # just before) has them; the set made and filled by one `ipset restore`; both
        # tables written by one `iptables-restore` (a commit per table, as before), after
        # the set, which the peer filter names and must admit first.
        _same_family(self, wanted)
        fill = bool(wanted.peer_ports)
        tables = ("nat", "filter")
        reading = seen.reading if seen is not None else None
        if isinstance(reading, _Reading) and (reading.listed or not fill):
            members, saves = reading.members, reading.saves
        else:
            members, saves = await asyncio.gather(
                self._ipset_members() if fill else _nothing(),
                asyncio.gather(*(self._save(t) for t in tables)))
        if fill:
            have = frozenset(ip_address(ip) for ip in members or ())
            await self._restore_set(wanted.peers - have, have - wanted.peers, create=True)
        if admitted is not None:
            admitted()  # the chains may follow beside the routes: the set admits already
        lines = []
        for table, saved in zip(tables, saves, strict=True):
            lines.append(f"*{table}")
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
                others: list[str | None] = []
                for line in saved.rules.get(builtin, []):
                    if line.endswith(f"-j {ours}"):
                        lines.append("-D" + line[2:])
                    else:
                        others.append(_jump_target(line))
                if rules:
                    at = jump_index(builtin, others) + 1
                    lines.append(f'-I {builtin} {at} -m comment --comment "{_JUMP}:{chain}" '
                                 f"-j {ours}")
                elif exists:
                    lines.append(f"-X {ours}")
            lines.append("COMMIT")
        await _run([f"{self.family.iptables}-restore", "--noflush"], netns=self._netns,
                   input="\n".join(lines) + "\n")
        if not fill:
            await _run(["ipset", "destroy", self.ipset], netns=self._netns, check=False)

    async def set_peers(self, add: Iterable[Address], remove: Iterable[Address]) -> None:
        await self._restore_set(add, remove)

    async def _restore_set(self, add: Iterable[Address], remove: Iterable[Address], *,
                           create: bool = False) -> None:
        """One `ipset restore`: the set made first if `create` (kept if it exists)."""
        script = (f"create {self.ipset} hash:ip family {self.family.ipset_family} -exist\n"
                  if create else "")
        script += "".join(f"add {self.ipset} {ip} -exist\n" for ip in _sorted(add))
        script += "".join(f"del {self.ipset} {ip} -exist\n" for ip in _sorted(remove))
        if script:
            await _run(["ipset", "restore"], netns=self._netns, input=script)

    async def observe(self, *, deep: bool = True) -> ObservedRules:
        chains: dict[str, list[str | None]] = {}
        hooked: dict[str, bool] = {}
        dropped = 0
        tables = ("nat", "filter")
        # Every read at once: one round of processes, not three.
        saving = asyncio.gather(*(self._save(t) for t in tables))
        peers: frozenset[str] | None = None
        if deep:
            peers, saves = await asyncio.gather(self._ipset_members(), saving)
            count = None if peers is None else len(peers)
        else:
            count, saves = await asyncio.gather(self._ipset_count(), saving)
        for table, saved in zip(tables, saves, strict=True):
            for chain, (_, _, _, ipt_table, builtin) in CHAINS.items():
                if ipt_table != table:
                    continue
                ours = iptables_chain(chain)
                if ours not in saved.rules:
                    continue
                chains[chain] = [_comment(line) for line in saved.rules[ours]]
                builtin_rules = saved.rules.get(builtin, [])
                jumps = [i for i, line in enumerate(builtin_rules) if line.endswith(f"-j {ours}")]
                others = [_jump_target(line) for line in builtin_rules
                          if not line.endswith(f"-j {ours}")]
                hooked[chain] = jumps == [jump_index(builtin, others)]
                if chain == "input":
                    dropped = sum(n for line, n in zip(saved.rules[ours], saved.counts.get(ours, []),
                                                       strict=False)
                                  if is_peer_filter(_comment(line)))
        return ObservedRules(chains=chains, hooked=hooked, peers=peers, peer_count=count,
                             dropped=dropped, reading=_Reading(saves, peers, deep))

    async def dropped(self) -> int:
        return (await self.observe(deep=False)).dropped  # what a check reads anyway

    async def remove(self) -> None:
        await self.apply(Ruleset(family=self.family))


def firewall(*, nftables: bool, family: int = 4, netns: str | None = None) -> Firewall:
    """The adapter for the network config's choice and `family` (4 | 6); ConfigError
    naming the program that is missing (ip6tables-restore for IPv6 with iptables)."""
    f = FAMILIES[family]
    programs = ("nft",) if nftables else (f"{f.iptables}-restore", f"{f.iptables}-save", "ipset")
    for program in programs:
        if shutil.which(program, path="/usr/sbin:/usr/bin:/sbin:/bin") is None:
            package = {"nft": "nftables", "ipset": "ipset"}.get(program, "iptables")
            raise ConfigError(f"{f.shown}traffic rules need {program} (apt-get install "
                              f"--no-install-recommends {package})")
    if nftables:
        return NftFirewall(netns=netns, family=family)
    return IptablesFirewall(netns=netns, family=family)


# ------------------------------------------------------------------ the keeper


@dataclass
class RulesStatus:
    in_sync: bool = False
    last_error: str | None = None
    repairs: Counter[str] = field(default_factory=Counter)  # by difference kind
    dropped: int = 0  # packets the peer filter dropped (its counter, last read)


def check_interval(fw: Firewall) -> float:
    """How often the keeper reads `fw` back when nothing told it of a change."""
    return WATCHED_CHECK_SECONDS if fw.watches() else DEFAULT_CHECK_SECONDS


class RulesKeeper:
    """Holds `wanted` in place through a Firewall: level-triggered, repaired on drift."""

    def __init__(self, fw: Firewall, *, check_seconds: float | None = None) -> None:
        self.fw = fw
        self.status = RulesStatus()
        # The rules and port of the last sync, without its peers: the peer set is kept
        # once, here, per change (`wanted` puts them together when asked for).
        self._base: Ruleset | None = None
        self._peers: set[Address] = set()
        self._check_seconds = check_interval(fw) if check_seconds is None else check_seconds
        self._counted = 0  # the peer filter's counter as last read (it restarts on a rewrite)
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._deep_due = 0.0  # monotonic time of the next full read of the peer set
        self._retiring: set[Address] = set()  # departed peers still in the set
        self._retire = asyncio.Event()
        self._deep_asked = False  # an event touched the peer set's elements
        self._ahead: tuple[float, asyncio.Future[ObservedRules]] | None = None  # read_ahead's

    def read_ahead(self) -> None:
        """Start reading the firewall now, for the next sync to compare with (the agent's
        start: the rules' processes run while the lease is acquired, not after it, when
        the data plane waits for the peer set). Used if that sync comes within
        READ_AHEAD_SECONDS; a failed reading is read again then."""
        task = asyncio.ensure_future(self.fw.observe(deep=True))
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # retrieved
        self._ahead = (time.monotonic(), task)

    async def _observe(self, *, deep: bool) -> ObservedRules:
        """The firewall as it is: the reading started ahead if there is a fresh one."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None:
            started, task = ahead
            if time.monotonic() - started <= READ_AHEAD_SECONDS:
                try:
                    return await task
                except DataPlaneError:
                    pass  # said by the reading made now, if it fails too
            else:
                task.cancel()
        return await self.fw.observe(deep=deep)

    async def sync(self, wanted: Ruleset | None = None, *, repair: bool = False,
                   deep: bool = True, admitted: Callable[[], None] | None = None
                   ) -> list[RuleDifference]:
        """Make the firewall hold `wanted` (None: what it holds now, with the peers
        changed since); the differences found (and fixed). Not `deep`: the peer set is
        counted, not listed, unless a full read is due. `admitted` is called once the
        peer set holds the peers (Firewall.apply), at the latest when the sync ends,
        whether it succeeded or not."""
        try:
            return await self._sync(wanted, repair=repair, deep=deep, admitted=admitted)
        finally:
            if admitted is not None:
                admitted()

    async def _sync(self, wanted: Ruleset | None, *, repair: bool, deep: bool,
                    admitted: Callable[[], None] | None) -> list[RuleDifference]:
        async with self._lock:
            if wanted is not None:
                self._base, self._peers = replaced(wanted, peers=frozenset()), set(wanted.peers)
            wanted = self.wanted
            if wanted is None:
                return []
            try:
                await self._retire_now()
                deep = deep or time.monotonic() >= self._deep_due or self._ahead is not None
                observed = await self._observe(deep=deep)
                if deep:
                    self._deep_due = time.monotonic() + DEEP_CHECK_SECONDS
                self._count_drops(observed.dropped)
                found = compare(wanted, observed)
                if found:
                    # After a failed write the differences are that failure's, not someone
                    # else's doing: neither a repair nor a warning of its own.
                    if repair and self.status.last_error is None:
                        for kind in {d.kind for d in found}:
                            self.status.repairs[kind] += 1
                        log.warning("%straffic rules changed by someone else (%s); restoring "
                                    "them", self.fw.family.shown,
                                    "; ".join(d.text for d in found[:3]))
                    await self.fw.apply(wanted, seen=observed, admitted=admitted)
                    self._counted = 0
                del observed
                if deep:
                    # A full read listed every peer of the set: its text, lines and set
                    # are freed now, and glibc would keep their pages (leaseagent.memory).
                    memory.trim()
                if self.status.last_error is not None:
                    log.info("%straffic rules in place again", self.fw.family.shown)
                self.status.in_sync, self.status.last_error = True, None
                return found
            except DataPlaneError as exc:
                self._failed(exc)
                return []

    def _failed(self, exc: DataPlaneError) -> None:
        """A write or read of the rules failed (`exc` names the command and what the tool
        or the kernel said): not in sync, and one ERROR line per new error, not one per
        retry."""
        if str(exc) != self.status.last_error:
            log.error("%straffic rules cannot be applied: %s (retrying every %gs)",
                      self.fw.family.shown, exc, self.retry_seconds)
        self.status.in_sync, self.status.last_error = False, str(exc)

    @property
    def retry_seconds(self) -> float:
        """How soon the next check comes: the check interval, or DEFAULT_CHECK_SECONDS at
        most while the rules are not in place (nftables checks rarely when all is well)."""
        if self.status.in_sync:
            return self._check_seconds
        return min(self._check_seconds, DEFAULT_CHECK_SECONDS)

    def _count_drops(self, counter: int) -> None:
        # A rewrite restarts the firewall's counter: add what it grew by.
        grew = counter - self._counted
        self.status.dropped += grew if grew >= 0 else counter
        self._counted = counter

    @property
    def wanted(self) -> Ruleset | None:
        """Everything to hold now: the last sync's rules with the current peer set (made
        anew at each call, not kept: a 5,000-peer set is ~0.3 ms to make, 256 KiB to keep;
        docs/benchmarks.md, "Memory at 5,000 peers")."""
        if self._base is None:
            return None
        return replaced(self._base, peers=frozenset(self._peers))

    async def update_peers(self, admit: Iterable[Address], retire: Iterable[Address]) -> None:
        """Change the peer filter's set by element (core.rules.PeerAdmission says which;
        the cost follows the change, not the number of peers). `admit` is in the set
        when this returns (it is called before their routes are added); `retire` leaves
        in one batch a moment later (`run`), so thousands of leases expiring together
        cost one call, not one each."""
        async with self._lock:
            if self._base is None or not self._base.peer_ports:
                return
            admit = set(admit) - self._peers
            retire = set(retire) & self._peers
            if not admit and not retire:
                return
            self._peers |= admit
            self._peers -= retire
            fresh = admit - self._retiring  # a retiring one is still in the firewall
            self._retiring = (self._retiring - admit) | retire
            if self._retiring:
                self._retire.set()
            try:
                await self.fw.set_peers(fresh, [])
            except DataPlaneError as exc:
                self._failed(exc)
                self._wake.set()  # a full sync puts the set right

    async def _retire_now(self) -> None:
        """Take the departed peers out of the set (under the lock)."""
        retiring, self._retiring = _sorted(self._retiring - self._peers), set()
        self._retire.clear()
        if retiring:
            await self.fw.set_peers([], retiring)

    async def _retire_loop(self) -> None:
        while True:
            await self._retire.wait()
            await asyncio.sleep(RETIRE_DELAY_SECONDS)  # the rest of a burst joins the batch
            async with self._lock:
                try:
                    await self._retire_now()
                except DataPlaneError as exc:
                    self._failed(exc)
                    self._wake.set()

    async def run(self) -> None:
        """Repair drift: at once on nft events, else every check interval."""
        tasks = [asyncio.create_task(self._poll()), asyncio.create_task(self._retire_loop())]
        if isinstance(self.fw, NftFirewall):
            tasks.append(asyncio.create_task(self._monitor(self.fw)))
        try:
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                # Once only: a second cancel would cut `_monitor`'s own ending short (the
                # `nft monitor` it kills would never be reaped).
                if not task.done() and not task.cancelling():
                    task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _poll(self) -> None:
        """A check when woken or every check interval; between checks, the drop counter
        is read every DEFAULT_CHECK_SECONDS (with nftables, where checks are rare)."""
        check_due = time.monotonic() + self.retry_seconds
        while True:
            woken = True
            try:
                wait = min(DEFAULT_CHECK_SECONDS, max(0.0, check_due - time.monotonic()))
                await within(self._wake.wait(), wait)
                await asyncio.sleep(0.02)  # a burst of events, one check
            except TimeoutError:
                woken = False
            if self._base is None:  # nothing to hold yet
                self._wake.clear()
                check_due = time.monotonic() + self.retry_seconds
                continue
            if woken or time.monotonic() >= check_due:
                self._wake.clear()
                deep, self._deep_asked = self._deep_asked, False
                await self.sync(repair=True, deep=deep)  # what is wanted then
                check_due = time.monotonic() + self.retry_seconds
                continue
            async with self._lock:
                try:
                    self._count_drops(await self.fw.dropped())
                except DataPlaneError as exc:
                    log.debug("%straffic rules: reading the drop counter: %s",
                          self.fw.family.shown, exc)

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
                changes: list[str] = []
                while line := await proc.stdout.readline():
                    backoff.reset()
                    verdict = foreign_change(changes, line.decode(errors="replace"), fw.writers,
                                             table=fw.table)
                    if verdict is not None:
                        self._deep_asked |= verdict
                        self._wake.set()
            finally:
                if proc.returncode is None:
                    proc.kill()
                await proc.wait()
            await backoff.sleep()  # nft monitor ended: start it again


def foreign_change(changes: list[str], line: str, ours: set[int], *, table: str) -> bool | None:
    """Follow `nft monitor`: each transaction's changes, then "# new generation N by
    process PID (nft)". `changes` collects a transaction's lines that concern `table`
    ("ip6 leaseagent": every line names its object's family and table after the verb
    and the kind, `nft flush ruleset` included, which deletes each table by name); what
    happens in other tables cannot change ours. At a transaction's end: None if it was
    ours (a PID in `ours`) or left `table` alone, else whether it touched set elements
    (the peer set then needs a full read)."""
    if not line.startswith("# new generation"):
        if " ".join(line.split()[2:4]) == table:
            changes.append(line)
        return None
    by = line.partition(" by process ")[2].split(" ", 1)[0]
    touched = [c for c in changes if c.strip()]
    changes.clear()
    if not touched or (by.isdigit() and int(by) in ours):
        return None
    return any(" element " in c for c in touched)
