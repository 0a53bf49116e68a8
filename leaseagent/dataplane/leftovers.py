"""What flanneld leaves on a host that ran it: found (`leasectl doctor`) and removed
(`leasectl cleanup --flannel`).

flanneld (pkg/trafficmngr, pkg/backend) keeps, and leaves when it stops:

- iptables and ip6tables: the chains FLANNEL-POSTRTG (nat: its masquerade rules)
  and FLANNEL-FWD (filter: accept to and from its network), jumped to from
  POSTROUTING and FORWARD by rules commented "flanneld masq" and "flanneld
  forward" (older flanneld versions put those rules straight into POSTROUTING
  and FORWARD, with the same comments);
- nftables: the tables `ip flannel-ipv4` and `ip6 flannel-ipv6`;
- devices: flannel.<VNI> and flannel-v6.<VNI> (vxlan), flannel-wg and
  flannel-wg-v6 (wireguard), flannel.ipip (ipip), flannel0 (udp);
- routes to the other hosts' subnets, with the kernel's default protocol
  (boot, 3): flanneld sets none.

A device of those names that a backend profile owns (its kind too: leaseagent
names its devices as flanneld does and adopts flanneld's device, MAC and all; one
its backend does not use it takes over at start and removes --peer-hold-time
later, leaseagent.dataplane.kept) is not a leftover (doctor's `ours`); nor is a
route to the subnet of a host that holds a valid lease (the agent replaces it
with its own as it programs that peer). The rest is: a stale
flanneld masquerade rule rewrites container traffic beside the agent's rules.

Removal never cuts traffic the agent carries: run it with the agent running and
ready (its rules, devices and routes in place). flanneld's chains go in one
iptables-restore commit per table (jumps, then the chains), its tables in one nft
command each. Only what is listed here is touched.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection, Iterable
from dataclasses import dataclass

from leaseagent.core.network import Network
from leaseagent.core.plan import Route
from leaseagent.dataplane.firewall import iptables_save, run_tool
from leaseagent.dataplane.netlink import Action, Netlink
from leaseagent.errors import DataPlaneError

RTPROT_BOOT = 3  # the kernel's protocol for a route that names none (flanneld's)

# (iptables table, flanneld's chain, the built-in chain jumping to it, its comment)
FLANNEL_CHAINS = (("nat", "FLANNEL-POSTRTG", "POSTROUTING", "flanneld masq"),
                  ("filter", "FLANNEL-FWD", "FORWARD", "flanneld forward"))
FLANNEL_NFT_TABLES = (("ip", "flannel-ipv4"), ("ip6", "flannel-ipv6"))
FLANNEL_DEVICE = re.compile(r"flannel(\.\d+|-v6\.\d+|-wg|-wg-v6|\.ipip|0)")


@dataclass(frozen=True)
class Leftover:
    """One thing flanneld left: `kind` (iptables, ip6tables, nftables, device, route),
    `name` as an operator would look for it, and what it does."""

    kind: str
    name: str
    what: str
    table: str = ""  # iptables: the table; nftables: the family
    chain: str = ""  # iptables: flanneld's chain, or "" for a rule in a built-in chain
    rule: str = ""  # iptables: a rule in a built-in chain, as iptables-save shows it
    route: Route | None = None
    ifindex: int = 0

    @property
    def text(self) -> str:
        return f"flanneld leftover: {self.kind} {self.name} ({self.what})"


async def find(*, ours: Collection[str], networks: Iterable[Network],
               leased: Collection[Network], netns: str | None = None) -> list[Leftover]:
    """flanneld's leftovers here. `ours`: the names of the devices the agent owns;
    `networks`: the cluster networks (IPv4, and IPv6 if any); `leased`: the subnets
    that hold a valid lease (their flanneld routes are the agent's to replace)."""
    found: list[Leftover] = []
    for program in ("iptables", "ip6tables"):
        found += await _iptables(program, netns)
    found += await _nftables(netns)
    nl = await Netlink.open(netns)
    try:
        names = {}
        for link in await nl.links():
            names[link.index] = link.name
            if FLANNEL_DEVICE.fullmatch(link.name) and link.name not in ours:
                found.append(Leftover("device", link.name, f"{link.kind or 'device'} device "
                                      "of flanneld's that the agent does not use",
                                      ifindex=link.index))
        nets = list(networks)
        for route in sorted(await nl.routes(protocol=RTPROT_BOOT), key=lambda r: str(r.dst)):
            inside = any(route.dst.version == n.version and route.dst.subnet_of(n)  # type: ignore[arg-type]
                         for n in nets)
            if inside and route.dst not in leased and names.get(route.ifindex) is not None:
                via = f" via {route.gateway}" if route.gateway else ""
                found.append(Leftover("route", f"{route.dst}{via} dev {names[route.ifindex]}",
                                      "flanneld's route to a subnet no host holds",
                                      route=route))
    finally:
        nl.close()
    return found


async def _iptables(program: str, netns: str | None) -> list[Leftover]:
    out: list[Leftover] = []
    for table, chain, builtin, comment in FLANNEL_CHAINS:
        try:
            saved = await iptables_save(program, table, netns=netns)
        except DataPlaneError:
            return out  # the tool is missing or the family is off: nothing of flanneld's there
        for line in saved.get(builtin, []):
            if f'--comment "{comment}"' in line or line.endswith(f"-j {chain}"):
                out.append(Leftover(program, f"{table} {line}", f"flanneld's rule in {builtin}",
                                    table=table, rule=line))
        if chain in saved:
            out.append(Leftover(program, f"{table} chain {chain}",
                                f"{len(saved[chain])} rules of flanneld's "
                                + ("masquerading" if table == "nat" else "forward accepts"),
                                table=table, chain=chain))
    return out


async def _nftables(netns: str | None) -> list[Leftover]:
    try:
        code, text, _ = await run_tool(["nft", "-j", "list", "tables"], netns=netns, check=False)
    except DataPlaneError:
        return []
    if code != 0:
        return []
    have = {(item["table"]["family"], item["table"]["name"])
            for item in json.loads(text).get("nftables", []) if "table" in item}
    return [Leftover("nftables", f"table {family} {name}", "flanneld's nftables rules",
                     table=family, chain=name)
            for family, name in FLANNEL_NFT_TABLES if (family, name) in have]


async def remove(leftovers: Iterable[Leftover], *, netns: str | None = None) -> list[str]:
    """Remove each leftover; one line per thing removed (or not)."""
    done: list[str] = []
    items = list(leftovers)
    for program in ("iptables", "ip6tables"):
        for table in ("nat", "filter"):
            mine = [x for x in items if x.kind == program and x.table == table]
            if not mine:
                continue
            lines = [f"*{table}"]
            lines += ["-D" + x.rule[2:] for x in mine if x.rule]
            lines += [f"-F {x.chain}" for x in mine if x.chain]
            lines += [f"-X {x.chain}" for x in mine if x.chain]
            lines.append("COMMIT")
            try:
                await run_tool([f"{program}-restore", "--noflush"], netns=netns,
                               input="\n".join(lines) + "\n")
                done += [f"removed {x.kind} {x.name}" for x in mine]
            except DataPlaneError as exc:
                done.append(f"could not remove flanneld's {program} {table} rules: {exc}")
    for x in items:
        if x.kind == "nftables":
            try:
                await run_tool(["nft", "delete", "table", x.table, x.chain], netns=netns)
                done.append(f"removed nftables {x.name}")
            except DataPlaneError as exc:
                done.append(f"could not remove nftables {x.name}: {exc}")
    nl = await Netlink.open(netns)
    try:
        routes = [x for x in items if x.kind == "route" and x.route is not None]
        if routes:
            removed, failed = await nl.apply(Action.REMOVE, [x.route for x in routes
                                                             if x.route is not None],
                                             protocol=RTPROT_BOOT)
            done += [f"removed route {x.name}" for x in routes if x.route in removed]
            done += [f"could not remove route {f.obj}: {f.error}" for f in failed]
        for x in items:
            if x.kind == "device":
                try:
                    await nl.delete_link(x.ifindex)
                    done.append(f"removed device {x.name}")
                except DataPlaneError as exc:
                    done.append(f"could not remove device {x.name}: {exc}")
    finally:
        nl.close()
    return done
