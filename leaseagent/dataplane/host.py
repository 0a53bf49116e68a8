"""Resolve this host's underlay interface, PublicIP and PublicIPv6 (`--iface`,
`--public-ip`, `--public-ipv6`).

flannel's rules, with clear errors instead of its fallbacks:

- `--iface` names an interface, or is an IPv4 address of one (then that
  address is also the PublicIP unless `--public-ip` says otherwise). Given
  several times, each is tried in order and the first that matches wins (an
  interface that exists and has an IPv4 address, or the PublicIP is given),
  as flanneld does; then each `--iface-regex` (Python's `re.search`, the
  same as Go's RE2 for the patterns RE2 accepts), first against every
  interface's IPv4 addresses in index order (a matching address is the
  default PublicIP), then against their names; then `--iface-can-reach`:
  the interface the kernel routes that address through, its preferred
  source address the default PublicIP (`ip route get`). None of them
  given: the interface of the IPv4 default route (main table).
- `--public-ip` defaults to the first IPv4 address of the interface. A
  given one is not required to be local (a host behind 1:1 NAT advertises
  its outside address, as with flannel); host-gw checks that itself.
- On a dual-stack network (`want_ipv6`), `--public-ipv6` likewise defaults
  to the interface's first global IPv6 address: not link-local (peers
  cannot reach it through a router, and flannel's lease cannot say which
  link), and not still in duplicate address detection or failed it. A given
  `--public-ipv6` is checked to be an IPv6 address even on an IPv4-only
  network (a typo is an error either way) but used only on a dual-stack one.

Every failure is a one-line ConfigError naming the flag and the value.
Talks to the kernel only through leaseagent.dataplane.netlink.
"""

from __future__ import annotations

import re
import socket
from dataclasses import replace
from ipaddress import IPv4Address, IPv6Address, ip_address

from leaseagent.dataplane.base import HostInfo, InterfaceChoice
from leaseagent.dataplane.netlink import RT_SCOPE_UNIVERSE, Link, Netlink
from leaseagent.errors import ConfigError


def _parse_ip(flag: str, value: str) -> IPv4Address | None:
    try:
        return IPv4Address(value)
    except ValueError:
        if flag == "--public-ip":
            raise ConfigError(f"--public-ip {value!r}: not an IPv4 address") from None
        return None


def _parse_ipv6(value: str) -> IPv6Address:
    try:
        return IPv6Address(value)
    except ValueError:
        raise ConfigError(f"--public-ipv6 {value!r}: not an IPv6 address") from None


async def resolve_host(
    iface: InterfaceChoice | str | None,
    public_ip: str | None,
    *,
    public_ipv6: str | None = None,
    want_ipv6: bool = False,
    netns: str | None = None,
) -> HostInfo:
    """HostInfo from the flags; raise ConfigError with a one-line message. With
    `want_ipv6` (the network is dual-stack) it has a PublicIPv6, or this fails."""
    given_ipv6 = _parse_ipv6(public_ipv6) if public_ipv6 is not None else None
    choice = InterfaceChoice(names=(iface,)) if isinstance(iface, str) else iface
    nl = await Netlink.open(netns)
    try:
        host = await _choose(nl, choice or InterfaceChoice(), public_ip)
        if not want_ipv6:
            return host
        return replace(host, public_ipv6=given_ipv6 or await _first_global_ipv6(nl, host))
    finally:
        nl.close()


async def _first_global_ipv6(nl: Netlink, host: HostInfo) -> IPv6Address:
    """The underlay's first usable global-scope IPv6 address."""
    for addr in await nl.addresses(socket.AF_INET6, index=host.iface_index):
        if addr.scope == RT_SCOPE_UNIVERSE and addr.usable:
            assert isinstance(addr.interface.ip, IPv6Address)
            return addr.interface.ip
    raise ConfigError(
        f"interface {host.iface} has no global IPv6 address; add one or pass --public-ipv6")


async def _choose(nl: Netlink, choice: InterfaceChoice, public_ip: str | None) -> HostInfo:
    """The first interface `choice` matches, in flanneld's order; one ConfigError
    naming every flag tried and why each did not match."""
    if not choice:
        return await _resolve(nl, None, public_ip)
    misses: list[str] = []
    for name in choice.names:
        try:
            return await _resolve(nl, name, public_ip)
        except ConfigError as exc:
            misses.append(str(exc))
    links = sorted(await nl.links(), key=lambda link: link.index)
    for pattern in choice.regexes:
        regex = re.compile(pattern)
        for link in links:
            for _, addr in await nl.ipv4_addresses(link.index):
                if regex.search(str(addr.ip)):
                    return await _resolve(nl, str(addr.ip), public_ip)
        for link in links:
            if regex.search(link.name):
                try:
                    return await _resolve(nl, link.name, public_ip)
                except ConfigError as exc:
                    misses.append(str(exc))
                    break
        else:
            misses.append(f"--iface-regex {pattern}: matches no interface's IPv4 address "
                          "or name")
    if choice.can_reach:
        found = await nl.route_to(ip_address(choice.can_reach))
        if found is None:
            misses.append(f"--iface-can-reach {choice.can_reach}: no route to it")
        else:
            index, src = found
            routed = await nl.link_by_index(index)
            if routed is not None:
                host = await _resolve(nl, routed.name, public_ip)
                if public_ip is None and isinstance(src, IPv4Address):
                    host = replace(host, public_ip=src)
                return host
            misses.append(f"--iface-can-reach {choice.can_reach}: its interface vanished")
    if len(misses) == 1:
        raise ConfigError(misses[0])
    raise ConfigError("no interface matches " + "; ".join(misses))


async def _resolve(nl: Netlink, iface: str | None, public_ip: str | None) -> HostInfo:
    where = f" in netns {nl.netns}" if nl.netns else ""
    link: Link | None
    iface_ip: IPv4Address | None = None
    if iface is None:
        index = await nl.default_route_ifindex()
        if index is None:
            raise ConfigError(f"no IPv4 default route{where} to pick the interface; pass --iface")
        link = await nl.link_by_index(index)
        if link is None:
            raise ConfigError(f"the default route's interface (index {index}) vanished; retry")
    else:
        iface_ip = _parse_ip("--iface", iface)
        if iface_ip is not None:
            owners = [idx for idx, addr in await nl.ipv4_addresses() if addr.ip == iface_ip]
            if not owners:
                raise ConfigError(f"--iface {iface}: no interface{where} has this address")
            link = await nl.link_by_index(owners[0])
        else:
            link = await nl.link_by_name(iface)
        if link is None:
            raise ConfigError(f"--iface {iface}: no such interface{where}")

    if public_ip is not None:
        ip = _parse_ip("--public-ip", public_ip)
        assert ip is not None
    elif iface_ip is not None:
        ip = iface_ip
    else:
        addresses = await nl.ipv4_addresses(link.index)
        if not addresses:
            raise ConfigError(
                f"interface {link.name} has no IPv4 address; add one or pass --public-ip"
            )
        ip = addresses[0][1].ip
    underlay = tuple(a.interface for a in await nl.addresses(index=link.index))
    return HostInfo(public_ip=ip, iface=link.name, iface_index=link.index, iface_mtu=link.mtu,
                    underlay=underlay)
