"""How leasectl shows leases: rows, statuses, tables, watch lines; and SUBNET arguments.

A row is a key as the lease layer judged it (leaseagent.core.leases), so
leasectl shows what the agents do. Its `status` is one of

    ok          a valid lease (the agents program it)
    reserved    a reservation (no etcd lease): claimed by its host, or not yet
    expired     its etcd lease is gone; etcd deletes the key any moment
    duplicate   another, older key holds its subnet (not programmed), or names
                its PublicIP (both programmed: a leftover, or two agents with one
                identity)
    released    its agent gave it up (--release-on-exit); gone any moment
    conflict    valid, but its subnet covers a route or address of the host leasectl
                runs on that is not the agent's: that host's agent does not program it
    invalid     cannot be used; `error` says why

and `valid` says whether the agents accept it. Rows hold what etcd holds; the
text forms (tables, watch lines) show every cell escaped (leaseagent.core.
escaping): a key name or NodeID cannot break a line or drive the terminal. Rows sort by subnet address
(numerically), then key; keys that name no subnet come last.

SUBNET arguments (`subnet_of`) accept `10.5.34.0/24`, `10.5.34.1/24` (the
form of FLANNEL_SUBNET), a key name `10.5.34.0-24` (or flannel's dual-stack
`10.5.34.0-24&fd00::-64`) and, given the network config, `10.5.34.0` with
the network's subnet length: all name the same subnet. A dual-stack lease
may also be named by its IPv6 subnet (`fd00:5:0:22::/64`,
`fd00:5:0:22::1/64`).
"""

from __future__ import annotations

import time
from collections.abc import Collection, Sequence
from ipaddress import IPv4Interface, IPv4Network, IPv6Interface, IPv6Network
from typing import Any

from leaseagent.core.escaping import escaped
from leaseagent.core.leases import (
    DUPLICATE,
    INVALID,
    RESERVED,
    KeyLayout,
    Verdict,
    judge,
    parse_key_name,
)
from leaseagent.core.network import NetworkConfig
from leaseagent.core.plan import HostRoute, host_conflict
from leaseagent.errors import LeaseagentError
from leaseagent.store.base import KeyValue

LIST_FIELDS = ("subnet", "ipv6_subnet", "public_ip", "public_ipv6", "backend", "vtep_mac",
               "public_key", "node_id", "expires_in", "reservation", "status", "valid", "error")
WATCH_FIELDS = ("subnet", "ipv6_subnet", "public_ip", "public_ipv6", "backend", "node_id",
                "status", "valid", "error")


class UsageError(LeaseagentError):
    """Bad arguments: exit status 2."""


def status_of(verdict: Verdict, *, expires_in: int | None, same_ip_as: str | None) -> str:
    if verdict.reason == "released":
        return "released"
    if verdict.status == DUPLICATE:
        return "duplicate"
    if verdict.status == INVALID or verdict.reason is not None:
        return "invalid"
    if same_ip_as is not None:
        return "duplicate"
    if verdict.status == RESERVED or verdict.reservation:
        return "reserved"
    if expires_in is not None and expires_in <= 0:
        return "expired"
    return "ok"


def row_of(verdict: Verdict, layout: KeyLayout, *, expires_in: int | None,
           same_ip_as: str | None = None) -> dict[str, Any]:
    """One row of `list` (and `show`, `watch`): a key as the lease layer judged it.
    `expires_in` is the etcd lease's TimeToLive (None: not asked); `same_ip_as` the older
    key naming the same PublicIP."""
    value = verdict.value
    status = status_of(verdict, expires_in=expires_in if verdict.lease else None,
                       same_ip_as=same_ip_as)
    error = verdict.detail
    if status == "expired":
        error = "its etcd lease has expired; etcd deletes the key any moment"
    elif error is None and same_ip_as is not None and value is not None:
        error = f"duplicate: PublicIP {value.public_ip} also holds key {same_ip_as} (older)"
    elif verdict.status == RESERVED and value is not None:
        error = f"reserved for {value.public_ip}; not claimed yet"
    return {
        "subnet": str(verdict.subnet) if verdict.subnet is not None else layout.name_of(verdict.key),
        "ipv6_subnet": str(verdict.ipv6_subnet) if verdict.ipv6_subnet is not None else None,
        "public_ip": str(value.public_ip) if value is not None else None,
        "public_ipv6": (str(value.public_ipv6) if value is not None and value.public_ipv6
                        else None),
        "backend": (value.backend_type or None) if value is not None else None,
        "vtep_mac": value.vtep_mac if value is not None else None,
        "public_key": value.public_key if value is not None else None,
        "node_id": value.node_id if value is not None else None,
        "expires_in": max(expires_in, 0) if verdict.lease and expires_in is not None else None,
        "reservation": verdict.reservation,
        "status": status,
        "valid": verdict.valid,
        "error": error,
    }


def rows_of(items: Sequence[KeyValue], layout: KeyLayout, network: NetworkConfig | None,
            ttl_of: dict[int, int], *, host_routes: Collection[HostRoute] = (),
            host_addresses: Collection[object] = ()) -> list[dict[str, Any]]:
    """Every key of a listing, judged as one, in subnet order. `host_routes`: the routes
    and addresses of the host leasectl runs on (not the agent's): a valid lease over one
    is shown `conflict` (its agent here does not program it; core.plan.host_conflict),
    unless it is this host's own lease (its PublicIP is one of `host_addresses`), whose
    subnet is on this host's own devices by design."""
    result = judge(items, layout=layout, network=network)

    def order(kv: KeyValue) -> tuple[int, int, int, str]:
        subnet = result.verdicts[kv.key].subnet
        if subnet is None:
            return (1, 0, 0, kv.key)
        return (0, int(subnet.network_address), subnet.prefixlen, kv.key)

    rows = []
    for kv in sorted(items, key=order):
        verdict = result.verdicts[kv.key]
        row = row_of(verdict, layout, expires_in=ttl_of.get(kv.lease, -1),
                     same_ip_as=result.same_ip.get(kv.key))
        peer = verdict.peer
        own = peer is not None and (peer.public_ip in host_addresses
                                    or peer.public_ipv6 in host_addresses)
        conflict = host_conflict(peer, host_routes) if peer and not own else None
        if conflict is not None and row["status"] in ("ok", "reserved"):
            row["status"] = "conflict"
            row["error"] = (f"overlaps this host's {conflict.text}, not the agent's: not "
                            "programmed on this host")
        rows.append(row)
    return rows


CELL_LIMIT = 300  # characters of a table cell (a key name may be a megabyte; JSON has it all)


def format_table(rows: list[dict[str, Any]], *, wide: bool) -> str:
    """A table; the IPv6 columns only when some lease has an IPv6 part, the public key
    (wide) only when some lease is a WireGuard one."""
    six = any(r["ipv6_subnet"] for r in rows)
    keys = any(r.get("public_key") for r in rows)
    cols = ["subnet", *(["ipv6_subnet"] if six else []), "public_ip", "backend", "expires_in",
            "status"]
    if wide:
        cols = ["subnet", *(["ipv6_subnet"] if six else []), "public_ip",
                *(["public_ipv6"] if six else []), "backend", "vtep_mac",
                *(["public_key"] if keys else []), "node_id", "expires_in", "status"]
    heads = {c: c.upper().replace("_", " ") for c in cols}
    lines = []
    for row in rows:
        cells = dict(row)
        if row["reservation"]:
            cells["expires_in"] = "never"
        elif row["expires_in"] is not None:
            cells["expires_in"] = f"{row['expires_in']}s"
        cells["status"] = row["status"] + (f": {row['error']}" if row["error"] else "")
        lines.append({c: "-" if cells.get(c) is None else escaped(cells[c], limit=CELL_LIMIT)
                      for c in cols})
    widths = {c: max([len(heads[c])] + [len(line[c]) for line in lines]) for c in cols}
    out = ["  ".join(heads[c].ljust(widths[c]) for c in cols).rstrip()]
    out += ["  ".join(line[c].ljust(widths[c]) for c in cols).rstrip() for line in lines]
    return "\n".join(out)


WATCH_WIDTHS = (10, 9, 20, 17, 9, 24, 0)
WATCH_HEADS = ("TIME", "EVENT", "SUBNET", "PUBLIC IP", "BACKEND", "NODE ID", "STATUS")


def watch_header() -> str:
    return "".join(h.ljust(w) for h, w in zip(WATCH_HEADS, WATCH_WIDTHS, strict=True)).rstrip()


def format_watch_line(event: str, row: dict[str, Any], *, when: float) -> str:
    status = row["status"] + (f": {row['error']}" if row["error"] else "")
    cells = [time.strftime("%H:%M:%S", time.localtime(when)), event]
    cells += ["-" if row[k] is None else escaped(row[k], limit=CELL_LIMIT)
              for k in ("subnet", "public_ip", "backend", "node_id")]
    cells.append(escaped(status, limit=CELL_LIMIT))
    return "".join(c.ljust(w) for c, w in zip(cells, WATCH_WIDTHS, strict=False)).rstrip()


class SeenKeys:
    """The keys `watch` has seen, so each event's key is judged among the keys naming
    the same subnet (the oldest holds it), as `list` and the agents judge it."""

    def __init__(self, layout: KeyLayout) -> None:
        self._layout = layout
        self._kvs: dict[str, KeyValue] = {}
        self._by_subnet: dict[IPv4Network, set[str]] = {}

    def _subnet(self, key: str) -> IPv4Network | None:
        try:
            return self._layout.parse_lease_key(key).ipv4
        except ValueError:
            return None

    def verdict(self, kv: KeyValue, network: NetworkConfig | None) -> Verdict:
        subnet = self._subnet(kv.key)
        rivals = [self._kvs[k] for k in self._by_subnet.get(subnet, ()) if k != kv.key] \
            if subnet is not None else []
        return judge([*rivals, kv], layout=self._layout, network=network).verdicts[kv.key]

    def put(self, kv: KeyValue) -> None:
        self._kvs[kv.key] = kv
        subnet = self._subnet(kv.key)
        if subnet is not None:
            self._by_subnet.setdefault(subnet, set()).add(kv.key)

    def forget(self, key: str) -> None:
        self._kvs.pop(key, None)
        subnet = self._subnet(key)
        if subnet is not None:
            self._by_subnet.get(subnet, set()).discard(key)


def subnet_of(text: str, network: NetworkConfig | None) -> IPv4Network | IPv6Network:
    """The subnet a SUBNET argument names (see the module docstring); UsageError if none."""
    try:
        if "/" in text and ":" in text and "&" not in text:
            return IPv6Interface(text).network  # a dual-stack lease's IPv6 part
        if "/" in text:
            return IPv4Interface(text).network  # 10.5.34.1/24, FLANNEL_SUBNET's form, too
        if "-" in text:
            return parse_key_name(text).ipv4
        if network is None:
            raise UsageError(f"SUBNET {text!r}: give its length (10.5.34.0/24); the network "
                             "config that would say it is missing")
        return IPv4Interface(f"{text}/{network.subnet_len}").network
    except ValueError as exc:
        raise UsageError(f"SUBNET {text!r} is not a subnet ({exc}); write 10.5.34.0/24, "
                         "10.5.34.1/24 or 10.5.34.0-24") from None
