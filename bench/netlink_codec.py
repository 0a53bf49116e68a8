"""The netlink codec, ours against pyroute2's, for the same messages: `python -m bench.netlink_codec`.

No kernel and no root: messages are encoded and decoded in memory. For each
kind the agent sends in bulk (a route, a neighbour and a vxlan FDB entry per
peer: leaseagent.dataplane.rtnl) and for a table dump of them, the same
messages go through our codec and through pyroute2's message classes
(`rtmsg`, `ndmsg`, `MarshalRtnl`); for WireGuard (leaseagent.dataplane.wgnetlink),
a WG_CMD_SET_DEVICE of every peer and the decoding of a WG_CMD_GET_DEVICE dump,
against pyroute2's `wgmsg`. Before timing, the bench checks that both sides
produce the same bytes (rtnetlink encoding) or the same fields (decoding; a
WireGuard set, which pyroute2 sends one peer a message, read back by our
decoder), so the figures compare the same work. Each figure is the best of --repeats runs (messages per
second, and the ratio ours / pyroute2's). docs/benchmarks.md, "Netlink codec".
"""

from __future__ import annotations

import argparse
import base64
import socket
import struct
import sys
import time
from collections.abc import Callable
from ipaddress import IPv4Address, IPv4Network
from typing import Any

from leaseagent.core.plan import Fdb, KernelObject, Neighbour, Route, WgPeer
from leaseagent.dataplane import rtnl, wgnetlink
from leaseagent.dataplane.wgdevice import DeviceWrite, PeerUpdate

HDR = struct.Struct("=IHHII")  # nlmsghdr, as the kernel and rtnl.RtnlSocket.batch lay it out
NLM_F_REQUEST, NLM_F_MULTI, NLM_F_ACK = 0x1, 0x2, 0x4
PROTOCOL = 76
IFINDEX = 5
DUMP_DATAGRAM = 32 * 1024  # the kernel fills a dump's skbs up to this (rtnl._RECV_SIZE's note)


def mac(i: int) -> str:
    return "02:" + ":".join(f"{b:02x}" for b in (i + 1).to_bytes(5, "big"))


def objects(n: int) -> dict[str, list[KernelObject]]:
    """A vxlan host's objects for `n` peers: per peer a route, a neighbour, an FDB entry."""
    nets = [IPv4Network((0x0A000000 + (i << 8), 24)) for i in range(n)]
    return {
        "route": [Route(net, net.network_address, IFINDEX, onlink=True) for net in nets],
        "neighbour": [Neighbour(IFINDEX, net.network_address, mac(i)) for i, net in enumerate(nets)],
        "fdb": [Fdb(IFINDEX, mac(i), IPv4Address(0xC0A80000 + i + 1)) for i in range(n)],
    }


# -- encoding: ours ------------------------------------------------------------------


def ours_encode(objs: list[KernelObject]) -> list[bytes]:
    out = []
    for seq, obj in enumerate(objs, 1):
        kind, flags, body = rtnl.encode_object(obj, remove=False, protocol=PROTOCOL)
        out.append(HDR.pack(16 + len(body), kind, flags | NLM_F_REQUEST | NLM_F_ACK, seq, 0)
                   + body)
    return out


# -- encoding: pyroute2's ------------------------------------------------------------


def pyroute2_encode(objs: list[KernelObject]) -> list[bytes]:
    from pyroute2.netlink.rtnl.ndmsg import ndmsg
    from pyroute2.netlink.rtnl.rtmsg import rtmsg

    out = []
    for seq, obj in enumerate(objs, 1):
        msg: Any
        kind, flags, _ = rtnl.encode_object(obj, remove=False, protocol=PROTOCOL)
        if isinstance(obj, Route):
            msg = rtmsg()
            msg["family"], msg["dst_len"] = socket.AF_INET, obj.dst.prefixlen
            msg["table"], msg["proto"], msg["scope"] = 254, PROTOCOL, obj.scope
            msg["type"], msg["flags"] = 1, 4 if obj.onlink else 0
            msg["attrs"] = [("RTA_DST", str(obj.dst.network_address)),
                            ("RTA_GATEWAY", str(obj.gateway)), ("RTA_OIF", obj.ifindex)]
        elif isinstance(obj, Neighbour):
            msg = ndmsg()
            msg["family"], msg["ifindex"], msg["state"] = socket.AF_INET, obj.ifindex, 0x80
            msg["attrs"] = [("NDA_DST", str(obj.dst)), ("NDA_LLADDR", obj.lladdr)]
        else:
            assert isinstance(obj, Fdb)
            msg = ndmsg()
            msg["family"], msg["ifindex"], msg["state"] = rtnl.AF_BRIDGE, obj.ifindex, 0x80 | 0x40
            msg["flags"] = rtnl.NTF_SELF
            msg["attrs"] = [("NDA_LLADDR", obj.lladdr), ("NDA_DST", str(obj.dst))]
        msg["header"]["type"] = kind
        msg["header"]["flags"] = flags | NLM_F_REQUEST | NLM_F_ACK
        msg["header"]["sequence_number"] = seq
        msg.encode()
        out.append(bytes(msg.data))
    return out


# -- decoding a dump -----------------------------------------------------------------


def dump(objs: list[KernelObject]) -> list[bytes]:
    """The kernel's answer to a dump of `objs`: NLM_F_MULTI messages in datagrams."""
    datagrams, current = [], b""
    for obj in objs:
        kind, _, body = rtnl.encode_object(obj, remove=False, protocol=PROTOCOL)
        message = HDR.pack(16 + len(body), kind, NLM_F_MULTI, 1, 0) + body
        if len(current) + len(message) > DUMP_DATAGRAM:
            datagrams.append(current)
            current = b""
        current += message
    return [*datagrams, current]


def ours_decode(datagrams: list[bytes]) -> list[tuple[object, ...]]:
    """Each entry as (destination, gateway or MAC, ifindex), as the data plane reads it."""
    out: list[tuple[object, ...]] = []
    for data in datagrams:
        for kind, _, _, _, start, end in rtnl.messages(data):
            if kind == rtnl.RTM_NEWROUTE:
                route, _, _ = rtnl.decode_route(data, start, end)
                assert route is not None
                out.append((route.dst, route.gateway, route.ifindex))
            else:
                n = rtnl.decode_neighbour(data, start, end)
                out.append((n.dst, n.lladdr, n.ifindex))
    return out


def ours_identities(datagrams: list[bytes]) -> list[object]:
    """What a full sync does with a dump: an identity per entry, no object."""
    out: list[object] = []
    for data in datagrams:
        for kind, _, _, _, start, end in rtnl.messages(data):
            if kind == rtnl.RTM_NEWROUTE:
                out.append(rtnl.route_identity(data, start, end)[0])
            else:
                out.append(rtnl.neighbour_identity(data, start, end)[1])
    return out


def pyroute2_decode(datagrams: list[bytes]) -> list[tuple[object, ...]]:
    from pyroute2.netlink.rtnl.marshal import MarshalRtnl

    marshal = MarshalRtnl()
    out: list[tuple[object, ...]] = []
    for data in datagrams:
        for msg in marshal.parse(data):
            if msg["header"]["type"] == rtnl.RTM_NEWROUTE:
                out.append((IPv4Network(f"{msg.get_attr('RTA_DST')}/{msg['dst_len']}"),
                            IPv4Address(msg.get_attr("RTA_GATEWAY")), msg.get_attr("RTA_OIF")))
            else:
                out.append((IPv4Address(msg.get_attr("NDA_DST")), msg.get_attr("NDA_LLADDR"),
                            msg["ifindex"]))
    return out


def pyroute2_parse(datagrams: list[bytes]) -> int:
    """pyroute2's parse alone (every attribute decoded, none read after)."""
    from pyroute2.netlink.rtnl.marshal import MarshalRtnl

    marshal = MarshalRtnl()
    return sum(len(list(marshal.parse(data))) for data in datagrams)


# -- WireGuard (generic netlink) -------------------------------------------------------


def wg_write(n: int) -> DeviceWrite:
    keys = [base64.b64encode((i + 1).to_bytes(32, "big")).decode() for i in range(n)]
    return DeviceWrite(private_key=bytes(range(32)), listen_port=51820, peers=tuple(
        PeerUpdate(k, WgPeer("flannel-wg", k, (IPv4Address(0xC0A80000 + i + 1), 51820), None, 0),
                   (IPv4Network((0x0A000000 + (i << 8), 24)),), replace_allowed_ips=True)
        for i, k in enumerate(keys)))


def wg_dump(n: int) -> list[bytes]:
    """A WG_CMD_GET_DEVICE dump's bodies for `n` peers (our encoding of the same attributes
    the kernel sends: the SET message's layout is the GET answer's, counters aside)."""
    return wgnetlink.encode_set("flannel-wg", wg_write(n))


def ours_wg_decode(bodies: list[bytes]) -> list[tuple[object, ...]]:
    config = wgnetlink.decode_device("flannel-wg", bodies)
    return [(p.peer.public_key, p.peer.endpoint, p.allowed_ips) for p in config.peers]


def pyroute2_wg_decode(bodies: list[bytes]) -> list[tuple[object, ...]]:
    from pyroute2.netlink.generic.wireguard import wgmsg

    out: list[tuple[object, ...]] = []
    for body in bodies:
        msg = wgmsg(HDR.pack(16 + len(body), 30, NLM_F_MULTI, 1, 0) + body)
        msg.decode()
        for peer in msg.get_attr("WGDEVICE_A_PEERS") or ():
            attrs = dict(peer["attrs"])
            ep = attrs["WGPEER_A_ENDPOINT"]
            out.append((attrs["WGPEER_A_PUBLIC_KEY"].decode(),
                        (IPv4Address(ep["addr"]), ep["port"]),
                        tuple(IPv4Network(a["addr"]) for a in attrs["WGPEER_A_ALLOWEDIPS"])))
    return out


def pyroute2_wg_encode(write: DeviceWrite) -> list[bytes]:
    """The same peers through pyroute2's `wgmsg`, one message per peer as its
    `WireGuard.set(peer=...)` sends them (it takes one peer a call)."""
    from pyroute2.netlink.generic.wireguard import wgmsg

    out = []
    for update in write.peers:
        assert update.peer is not None and update.peer.endpoint is not None
        ip, port = update.peer.endpoint
        allowed = [{"attrs": [["WGALLOWEDIP_A_FAMILY", socket.AF_INET],
                              ["WGALLOWEDIP_A_IPADDR", net.network_address.packed],
                              ["WGALLOWEDIP_A_CIDR_MASK", net.prefixlen]]}
                   for net in update.allowed_ips]
        msg = wgmsg()
        msg["attrs"].append(["WGDEVICE_A_IFNAME", "flannel-wg"])
        msg["attrs"].append(["WGDEVICE_A_PEERS", [{"attrs": [
            ["WGPEER_A_PUBLIC_KEY", update.public_key],
            ["WGPEER_A_ENDPOINT", {"addr": str(ip), "port": port}],
            ["WGPEER_A_FLAGS", 0x2],  # WGPEER_F_REPLACE_ALLOWEDIPS
            ["WGPEER_A_ALLOWEDIPS", allowed]]}]])
        msg["cmd"], msg["version"] = wgnetlink.WG_CMD_SET_DEVICE, wgnetlink.WG_GENL_VERSION
        msg["header"]["type"], msg["header"]["flags"] = 30, NLM_F_REQUEST | NLM_F_ACK
        msg.encode()
        out.append(bytes(msg.data)[16:])  # the body, as encode_set returns them
    return out


# -- timing ---------------------------------------------------------------------------


def best(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Netlink encode/decode rate: ours vs pyroute2's.")
    p.add_argument("--peers", type=int, default=5000, help="peers (messages of each kind)")
    p.add_argument("--repeats", type=int, default=5, help="runs of each measurement (best kept)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    n, repeats = args.peers, args.repeats
    objs = objects(n)
    everything = [o for kind in ("neighbour", "fdb", "route") for o in objs[kind]]
    rows: list[tuple[str, int, Callable[[], object], Callable[[], object]]] = []
    for kind, items in objs.items():
        assert ours_encode(items) == pyroute2_encode(items), f"{kind}: the encodings differ"
        rows.append((f"encode {kind}s", len(items), lambda i=items: ours_encode(i),
                     lambda i=items: pyroute2_encode(i)))
    datagrams = dump(everything)
    assert ours_decode(datagrams) == pyroute2_decode(datagrams), "the decodings differ"
    rows.append(("decode a dump (route, neighbour, FDB; fields read)", len(everything),
                 lambda: ours_decode(datagrams), lambda: pyroute2_decode(datagrams)))
    rows.append(("  ours as a full sync reads it (identities) / pyroute2's parse alone",
                 len(everything), lambda: ours_identities(datagrams),
                 lambda: pyroute2_parse(datagrams)))
    bodies = wg_dump(n)
    assert ours_wg_decode(bodies) == pyroute2_wg_decode(bodies), "WireGuard: decodings differ"
    rows.append(("WireGuard: decode a device dump (peers)", n, lambda: ours_wg_decode(bodies),
                 lambda: pyroute2_wg_decode(bodies)))
    write = wg_write(n)
    assert ours_wg_decode(pyroute2_wg_encode(write)) == ours_wg_decode(bodies), \
        "WireGuard: the encodings say different things"
    rows.append(("WireGuard: encode a set of every peer (peers; pyroute2 one a message)", n,
                 lambda: wgnetlink.encode_set("flannel-wg", write),
                 lambda: pyroute2_wg_encode(write)))

    print(f"netlink codec, {n} peers, best of {repeats} (messages/s; ratio ours / pyroute2's)")
    results: dict[str, Any] = {}
    for label, count, ours, theirs in rows:
        t_ours, t_theirs = best(ours, repeats), best(theirs, repeats)
        results[label] = (count / t_ours, count / t_theirs)
        print(f"{label:<72} ours {count / t_ours:>11,.0f}  pyroute2 {count / t_theirs:>9,.0f}"
              f"  x{t_theirs / t_ours:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
