"""The kernel's WireGuard, driven through its generic netlink family (`wireguard`).

Where the kernel has the module (Linux 5.6 and later, or the backport), the
device is a link of kind `wireguard` (made with rtnetlink, as `ip link add
flannel-wg type wireguard` makes it) and configured with the family's two
commands (include/uapi/linux/wireguard.h): WG_CMD_GET_DEVICE, a dump whose
messages each carry part of the peers (a peer's allowed IPs may continue in
the next message under the same public key), and WG_CMD_SET_DEVICE. The
messages are packed with leaseagent.dataplane.rtnl's attribute codec (one
for rtnetlink and generic netlink: `attribute`, `nest`, `attributes`) and sent on the
same kind of raw socket (NETLINK_GENERIC), so a set of many peers is a few
messages, not one request per peer.

The family is found by name: a CTRL_CMD_GETFAMILY request carrying
CTRL_ATTR_FAMILY_NAME "wireguard", not a dump. Only that form makes the kernel
load the module when it is installed but not loaded yet (genetlink's
ctrl_getfamily calls request_module("net-pf-16-proto-16-family-wireguard"),
which the module's alias answers; a dump lists the families already there and
loads nothing: on a stock Debian kernel the agent then fell back to
wireguard-go). The kernel runs modprobe itself, so the unit's
ProtectKernelModules= does not stop it. ENOENT (no such family, none
installed) is how the agent knows to use wireguard-go instead.

Where this was run: the encoding is checked by the unit tests against
pyroute2's own WireGuard message classes, an independent reading of the same
header (tests/unit/test_wireguard_units.py); the machine this backend was
written on has no WireGuard module, so no kernel device was ever configured
by it (README, "WireGuard").
"""

from __future__ import annotations

import base64
import hashlib
import os
import socket
import struct
from collections.abc import Awaitable, Callable, Iterable
from ipaddress import IPv4Address, IPv6Address, ip_network

from leaseagent.core.network import Address, Network
from leaseagent.core.plan import Endpoint, WgPeer
from leaseagent.core.profiles.wireguard import DEVICE_KIND, PresharedKey
from leaseagent.dataplane.rtnl import Request, RtnlSocket, attribute, attributes, nest
from leaseagent.dataplane.wgdevice import (
    DeviceConfig,
    DeviceWrite,
    PeerState,
    PeerUpdate,
    Snapshot,
)
from leaseagent.dataplane.wgkeys import public_key_of
from leaseagent.dataplane.wguapi import key_base64
from leaseagent.errors import DataPlaneError

NETLINK_GENERIC = 16
GENL_ID_CTRL = 0x10
CTRL_CMD_GETFAMILY = 3
CTRL_ATTR_FAMILY_ID, CTRL_ATTR_FAMILY_NAME = 1, 2
WG_GENL_NAME = "wireguard"
WG_GENL_VERSION = 1
WG_CMD_GET_DEVICE, WG_CMD_SET_DEVICE = 0, 1
(WGDEVICE_A_IFINDEX, WGDEVICE_A_IFNAME, WGDEVICE_A_PRIVATE_KEY, WGDEVICE_A_PUBLIC_KEY,
 WGDEVICE_A_FLAGS, WGDEVICE_A_LISTEN_PORT, WGDEVICE_A_FWMARK, WGDEVICE_A_PEERS) = range(1, 9)
(WGPEER_A_PUBLIC_KEY, WGPEER_A_PRESHARED_KEY, WGPEER_A_FLAGS, WGPEER_A_ENDPOINT,
 WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL, WGPEER_A_LAST_HANDSHAKE_TIME, WGPEER_A_RX_BYTES,
 WGPEER_A_TX_BYTES, WGPEER_A_ALLOWEDIPS, WGPEER_A_PROTOCOL_VERSION) = range(1, 11)
WGALLOWEDIP_A_FAMILY, WGALLOWEDIP_A_IPADDR, WGALLOWEDIP_A_CIDR_MASK = 1, 2, 3
WGPEER_F_REMOVE_ME, WGPEER_F_REPLACE_ALLOWEDIPS, WGPEER_F_UPDATE_ONLY = 0x1, 0x2, 0x4
# Peers per WG_CMD_SET_DEVICE message: ~160 bytes each keeps a message near 16 KiB.
PEERS_PER_MESSAGE = 100

_GENL = struct.Struct("=BBH")  # cmd, version, reserved
_U16, _U32, _U64 = struct.Struct("=H"), struct.Struct("=I"), struct.Struct("=Q")
_SOCKADDR_IN = struct.Struct("=H2s4s8x")  # family, port (network order), address
_SOCKADDR_IN6 = struct.Struct("=H2sI16sI")  # family, port, flowinfo, address, scope id
_TIMESPEC = struct.Struct("=qq")
_ZERO_KEY = bytes(32)


def _key(base64_key: str) -> bytes:
    return base64.b64decode(base64_key)


# -- encoding ------------------------------------------------------------------------


def sockaddr(endpoint: Endpoint) -> bytes:
    ip, port = endpoint
    if ip.version == 4:
        return _SOCKADDR_IN.pack(socket.AF_INET, port.to_bytes(2, "big"), ip.packed)
    return _SOCKADDR_IN6.pack(socket.AF_INET6, port.to_bytes(2, "big"), 0, ip.packed, 0)


def _allowed_ip(net: Network) -> bytes:
    family = socket.AF_INET if net.version == 4 else socket.AF_INET6
    return nest(0, attribute(WGALLOWEDIP_A_FAMILY, _U16.pack(family))
                   + attribute(WGALLOWEDIP_A_IPADDR, net.network_address.packed)
                   + attribute(WGALLOWEDIP_A_CIDR_MASK, bytes([net.prefixlen])))


def encode_peer(update: PeerUpdate) -> bytes:
    """One peer of a WG_CMD_SET_DEVICE (nested, type 0 as wg(8) sends it)."""
    body = attribute(WGPEER_A_PUBLIC_KEY, _key(update.public_key))
    flags = (WGPEER_F_REMOVE_ME if update.remove else 0) | (
        WGPEER_F_REPLACE_ALLOWEDIPS if update.replace_allowed_ips else 0) | (
        WGPEER_F_UPDATE_ONLY if update.peer is None and not update.remove else 0)
    body += attribute(WGPEER_A_FLAGS, _U32.pack(flags))
    peer = update.peer
    if peer is not None and not update.remove:
        body += attribute(WGPEER_A_PRESHARED_KEY, peer.psk.raw if peer.psk else _ZERO_KEY)
        if peer.endpoint is not None:
            body += attribute(WGPEER_A_ENDPOINT, sockaddr(peer.endpoint))
        keepalive = update.keepalive if update.keepalive is not None else peer.keepalive
        body += attribute(WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL, _U16.pack(keepalive))
    if update.allowed_ips and not update.remove:
        body += nest(WGPEER_A_ALLOWEDIPS, b"".join(_allowed_ip(n) for n in update.allowed_ips))
    return nest(0, body)


def encode_set(device: str, change: DeviceWrite) -> list[bytes]:
    """WG_CMD_SET_DEVICE bodies (genlmsghdr and attributes) for `change`: the device's
    settings in the first, at most PEERS_PER_MESSAGE peers in each."""
    head = _GENL.pack(WG_CMD_SET_DEVICE, WG_GENL_VERSION, 0)
    head += attribute(WGDEVICE_A_IFNAME, device.encode() + b"\0")
    first = head
    if change.private_key is not None:
        first += attribute(WGDEVICE_A_PRIVATE_KEY, change.private_key)
    if change.listen_port is not None:
        first += attribute(WGDEVICE_A_LISTEN_PORT, _U16.pack(change.listen_port))
    peers = [encode_peer(u) for u in change.peers]
    bodies = []
    for start in range(0, max(len(peers), 1), PEERS_PER_MESSAGE):
        chunk = peers[start:start + PEERS_PER_MESSAGE]
        body = first if start == 0 else head
        if chunk:
            body += nest(WGDEVICE_A_PEERS, b"".join(chunk))
        bodies.append(body)
    return bodies


def encode_get(device: str) -> bytes:
    return _GENL.pack(WG_CMD_GET_DEVICE, WG_GENL_VERSION, 0) + attribute(
        WGDEVICE_A_IFNAME, device.encode() + b"\0")


def encode_family_request(name: str) -> bytes:
    """CTRL_CMD_GETFAMILY for one family by name (which loads its module on demand)."""
    return _GENL.pack(CTRL_CMD_GETFAMILY, 1, 0) + attribute(CTRL_ATTR_FAMILY_NAME,
                                                        name.encode() + b"\0")


# -- decoding ------------------------------------------------------------------------


def _endpoint(raw: bytes) -> Endpoint | None:
    family = _U16.unpack_from(raw)[0]
    ip: Address
    if family == socket.AF_INET and len(raw) >= _SOCKADDR_IN.size:
        _, port, addr = _SOCKADDR_IN.unpack_from(raw)
        ip = IPv4Address(addr)
    elif family == socket.AF_INET6 and len(raw) >= _SOCKADDR_IN6.size:
        _, port, _, addr, _ = _SOCKADDR_IN6.unpack_from(raw)
        ip = IPv6Address(addr)
    else:
        return None
    return ip, int.from_bytes(port, "big")


def _allowed_ips(raw: bytes) -> list[Network]:
    out: list[Network] = []
    for _, members in attributes(raw):
        fields = dict(attributes(members))
        addr, mask = fields.get(WGALLOWEDIP_A_IPADDR), fields.get(WGALLOWEDIP_A_CIDR_MASK)
        if addr is None or not mask or len(addr) not in (4, 16):
            continue
        ip: Address = IPv4Address(addr) if len(addr) == 4 else IPv6Address(addr)
        out.append(ip_network((ip, mask[0])))
    return out


def decode_device(device: str, bodies: Iterable[bytes]) -> DeviceConfig:
    """The messages of a WG_CMD_GET_DEVICE dump as one DeviceConfig."""
    public_key: str | None = None
    listen_port = 0
    peers: dict[str, dict[str, object]] = {}
    for body in bodies:
        for kind, value in attributes(body, _GENL.size):
            if kind == WGDEVICE_A_PRIVATE_KEY and value != _ZERO_KEY:
                public_key = public_key_of(value)
            elif kind == WGDEVICE_A_LISTEN_PORT:
                listen_port = _U16.unpack(value)[0]
            elif kind == WGDEVICE_A_PEERS:
                for _, members in attributes(value):
                    _merge_peer(peers, dict(attributes(members)))
    states = tuple(_peer_state(device, key, fields) for key, fields in peers.items())
    return DeviceConfig(public_key, listen_port, states)


def _merge_peer(peers: dict[str, dict[str, object]], attrs: dict[int, bytes]) -> None:
    raw_key = attrs.get(WGPEER_A_PUBLIC_KEY)
    if raw_key is None:
        return
    key = key_base64(raw_key.hex())
    fields = peers.setdefault(key, {"allowed_ips": []})
    for kind, value in attrs.items():
        if kind == WGPEER_A_ALLOWEDIPS:
            fields["allowed_ips"] += _allowed_ips(value)  # type: ignore[operator]
        else:
            fields[str(kind)] = value


def _peer_state(device: str, key: str, fields: dict[str, object]) -> PeerState:
    def raw(kind: int) -> bytes | None:
        value = fields.get(str(kind))
        return value if isinstance(value, bytes) else None

    psk = raw(WGPEER_A_PRESHARED_KEY)
    endpoint = raw(WGPEER_A_ENDPOINT)
    keepalive = raw(WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL)
    handshake = raw(WGPEER_A_LAST_HANDSHAKE_TIME)
    seconds, nanos = _TIMESPEC.unpack(handshake) if handshake else (0, 0)
    rx, tx = raw(WGPEER_A_RX_BYTES), raw(WGPEER_A_TX_BYTES)
    peer = WgPeer(device, key, _endpoint(endpoint) if endpoint else None,
                  PresharedKey(psk) if psk and psk != _ZERO_KEY else None,
                  _U16.unpack(keepalive)[0] if keepalive else 0)
    nets: list[Network] = fields["allowed_ips"]  # type: ignore[assignment]
    return PeerState(peer, tuple(nets), seconds + nanos / 1e9 if seconds else 0.0,
                     _U64.unpack(rx)[0] if rx else 0, _U64.unpack(tx)[0] if tx else 0)


def family_id(body: bytes, name: str = WG_GENL_NAME) -> int | None:
    """The id in the controller's answer about family `name`, None if it is not that."""
    fields = dict(attributes(body, _GENL.size))
    if fields.get(CTRL_ATTR_FAMILY_NAME, b"").rstrip(b"\0") != name.encode():
        return None
    ident = fields.get(CTRL_ATTR_FAMILY_ID)
    return _U16.unpack(ident)[0] if ident else None


# -- the driver ----------------------------------------------------------------------


async def find_family(netns: str | None = None, *, name: str = WG_GENL_NAME) -> int | None:
    """The id of the generic netlink family `name` (WireGuard's unless told), its module
    loaded by the kernel on the way if installed; None when the kernel has no such
    family (ENOENT) or no generic netlink."""
    try:
        sock = RtnlSocket.open(netns, protocol=NETLINK_GENERIC)
    except OSError:
        return None
    try:
        return family_id(await sock.get(GENL_ID_CTRL, encode_family_request(name)), name)
    except OSError:
        return None
    finally:
        sock.close()


class KernelWireguard:
    """The `WireguardControl` of kernel devices (leaseagent.dataplane.wgdevice).
    `create_link` makes a link of kind wireguard (rtnetlink, the backend's socket)."""

    name = "kernel"
    link_kind = DEVICE_KIND

    def __init__(self, family: int, create_link: Callable[[str], Awaitable[None]], *,
                 netns: str | None = None) -> None:
        self._family = family
        self._create_link = create_link
        self._netns = netns
        self._sock: RtnlSocket | None = None

    def _socket(self) -> RtnlSocket:
        if self._sock is None:
            try:
                self._sock = RtnlSocket.open(self._netns, protocol=NETLINK_GENERIC)
            except OSError as exc:
                raise DataPlaneError(f"cannot open a generic netlink socket: {exc}") from None
        return self._sock

    async def read(self, device: str) -> DeviceConfig | None:
        try:
            dumped = await self._socket().dump(self._family, encode_get(device))
        except OSError:
            return None  # no such device, or not a WireGuard one
        return decode_device(device, (body for _, body in dumped))

    async def snapshot(self, device: str) -> Snapshot | None:
        """The counters sit inside each peer's attributes: the fingerprint is taken from
        the decoded configuration (a parse per poll, unlike wireguard-go's)."""
        config = await self.read(device)
        if config is None:
            return None
        stable = repr(sorted((p.peer._ident, p.allowed_ips) for p in config.peers))
        fingerprint = hashlib.sha256(
            f"{config.public_key} {config.listen_port} {stable}".encode()).digest()
        return Snapshot(fingerprint, lambda: config)

    async def write(self, device: str, change: DeviceWrite) -> None:
        bodies = encode_set(device, change)
        try:
            codes = await self._socket().batch([Request(self._family, 0, b) for b in bodies])
        except OSError as exc:
            raise DataPlaneError(f"cannot configure {device}: {exc}") from None
        failed = [c for c in codes if c]
        if failed:
            raise DataPlaneError(f"the kernel refused a change of {device} ({len(change.peers)} "
                                 f"peer operations): {os.strerror(failed[0])}")

    async def create(self, device: str) -> None:
        await self._create_link(device)

    async def dispose(self, device: str) -> None:
        return None

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
