"""The wireguard backend's profile: flannel's pkg/backend/wireguard, everything but the kernel.

Config: `{"Type": "wireguard", "ListenPort": 51820, "ListenPortV6": 51821, "PSK":
"<base64>", "PersistentKeepaliveInterval": 0, "MTU": n, "Mode": "separate"}`,
flannel's names and defaults. MTU is flannel's: the MTU of the path the tunnel's
packets take (default: the underlay's), from which WireGuard's overhead is
subtracted for each device, as for vxlan.

Devices: `flannel-wg` and, on a dual-stack network, `flannel-wg-v6` (kind
wireguard, or tun when wireguard-go serves them).

Lease data: `{"PublicKey": "<base64>", "Port": 51820}` (BackendV6Data likewise, with
the IPv6 device's port); a missing or 0 Port means the receiving host's own
ListenPort (ListenPortV6), flannel's rule for leases of flannel versions before
Port. A peer needs a PublicKey that is standard base64 of 32 bytes
(wgtypes.ParseKey's rule).

Kernel objects per peer and family (`plan_peer`): WgPeer(its PublicKey on the
family's device, endpoint <public address>:<Port>, the config's PSK and keepalive)
and AllowedIP(<subnet> -> that key). Traffic rules: masquerade and forward (the
tunnel authenticates its peers: no peer filter). Doctor: the public key three
ways, which WireGuard drives the devices, peers without a handshake
(leaseagent.dataplane.wireguard). Cleanup: its two devices.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from leaseagent.core.plan import AllowedIP, KernelObject, WgPeer, ipv6_part
from leaseagent.core.profiles.base import (
    BackendOptions,
    BackendProfile,
    LeaseData,
    int_option,
    path_mtu_notes,
    shown,
    smallest_device_mtu,
    string_option,
)
from leaseagent.errors import InvalidLease, NetworkConfigError

if TYPE_CHECKING:
    from leaseagent.core.leases import Peer
    from leaseagent.core.network import Address, Network

NAME = "wireguard"
DEVICE_KIND = "wireguard"  # the link kind of a device the kernel module serves
USERSPACE_DEVICE_KIND = "tun"  # of one wireguard-go serves

# WireGuard's overhead per packet on the wire: the outer IP header (20 or 40) + UDP 8 +
# the data message header 16 (type 4, receiver index 4, counter 8) + the Poly1305 tag 16.
# Padding (the plaintext is padded to a multiple of 16, but never past the device MTU)
# costs up to 15 bytes of bandwidth and nothing of the MTU. flannel subtracts 80 for both.
WIREGUARD_OVERHEAD = 60
WIREGUARD6_OVERHEAD = 80
WIREGUARD_PORT = 51820  # flannel's ListenPort default
WIREGUARD_PORT6 = 51821  # flannel's ListenPortV6 default
WIREGUARD_DEVICE = "flannel-wg"  # flannel's device names (one per family in Mode separate)
WIREGUARD_DEVICE6 = "flannel-wg-v6"
WIREGUARD_MODES = ("separate", "auto", "ipv4", "ipv6")  # flannel's Mode values
WIREGUARD_KEY_BYTES = 32


@dataclass(frozen=True, slots=True)
class PresharedKey:
    """A WireGuard preshared key. Shown (str, repr, in a config change's summary or a
    doctor line) only as a fingerprint: 32 bits of its SHA-256, enough to tell two
    apart, nothing to recover it from."""

    raw: bytes = field(repr=False)

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(self.raw).hexdigest()[:8]

    def __str__(self) -> str:
        return f"psk:{self.fingerprint}"

    def __repr__(self) -> str:
        return f"PresharedKey({self.fingerprint})"


def wireguard_key(text: object) -> bytes | None:
    """A WireGuard key from its base64 text (standard alphabet, padded, 32 bytes, as
    flannel's wgtypes.ParseKey takes it), or None if `text` is not one."""
    if not isinstance(text, str) or len(text) != 44:
        return None
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw if len(raw) == WIREGUARD_KEY_BYTES else None


# ------------------------------------------------------------------ options


@dataclass(frozen=True, slots=True)
class WireguardOptions(BackendOptions):
    """The wireguard part of the network config's Backend object."""

    listen_port: int = WIREGUARD_PORT
    listen_port_v6: int = WIREGUARD_PORT6
    psk: PresharedKey | None = None
    keepalive: int = 0  # PersistentKeepaliveInterval, seconds (0: off)
    mtu: int | None = None  # flannel's MTU: the path's, before the overhead
    mode: str = "separate"

    @staticmethod
    def device_name_for(*, ipv6: bool) -> str:
        return WIREGUARD_DEVICE6 if ipv6 else WIREGUARD_DEVICE

    def port_for(self, *, ipv6: bool) -> int:
        """The ListenPort of one family's device."""
        return self.listen_port_v6 if ipv6 else self.listen_port

    def mtu_for(self, underlay_mtu: int, *, ipv6: bool = False) -> int:
        """A device's MTU: Backend.MTU (else the underlay's) less what WireGuard adds
        over that family's outer header (60 over IPv4, 80 over IPv6)."""
        path = self.mtu if self.mtu is not None else underlay_mtu
        return path - (WIREGUARD6_OVERHEAD if ipv6 else WIREGUARD_OVERHEAD)


def wireguard_options(backend: Mapping[str, Any]) -> WireguardOptions:
    """ListenPort, ListenPortV6, PSK, PersistentKeepaliveInterval, MTU, Mode from Backend;
    NetworkConfigError names a bad field (never the PSK's value)."""
    psk_text = string_option(backend, "PSK", "")
    psk = None
    if psk_text != "":  # flannel: an empty PSK is none
        raw = wireguard_key(psk_text)
        if raw is None:
            raise NetworkConfigError("Backend.PSK: must be a WireGuard key, 32 bytes in "
                                     "base64 (`wg genpsk` makes one)")
        psk = PresharedKey(raw)
    mode = string_option(backend, "Mode", "separate")
    if mode not in WIREGUARD_MODES:
        raise NetworkConfigError(f"Backend.Mode={shown(mode)}: must be one of "
                                 f"{', '.join(WIREGUARD_MODES)}")
    mtu = None
    if backend.get("MTU") is not None:
        mtu = int_option(backend, "MTU", 0, 0, 65535)
        if mtu < 68 + WIREGUARD6_OVERHEAD:
            raise NetworkConfigError(f"Backend.MTU={mtu}: must be at least "
                                     f"{68 + WIREGUARD6_OVERHEAD} (68 inside the tunnel)")
    return WireguardOptions(
        # 0 would make the kernel pick a port that no lease could name: refused.
        listen_port=int_option(backend, "ListenPort", WIREGUARD_PORT, 1, 65535),
        listen_port_v6=int_option(backend, "ListenPortV6", WIREGUARD_PORT6, 1, 65535),
        psk=psk,
        keepalive=int_option(backend, "PersistentKeepaliveInterval", 0, 0, 65535),
        mtu=mtu,
        mode=mode,
    )


def check_wireguard_mode(options: BackendOptions, ipv6: bool) -> None:
    """Mode against EnableIPv6. On an IPv4-only network every mode is flannel's one
    device, flannel-wg, to each peer's PublicIP, except `ipv6` (flannel would aim at
    PublicIPv6, which such a network has not). On a dual-stack network only
    `separate` (one device per family) is run here: auto/ipv4/ipv6 put both families
    on one device, which leaseagent does not implement."""
    assert isinstance(options, WireguardOptions)
    if not ipv6 and options.mode == "ipv6":
        raise NetworkConfigError('Backend.Mode="ipv6" needs "EnableIPv6": true (it reaches '
                                 'peers at their PublicIPv6)')
    if ipv6 and options.mode != "separate":
        raise NetworkConfigError(f"Backend.Mode={options.mode!r} with EnableIPv6: leaseagent "
                                 'runs only Mode "separate" on a dual-stack network (a device '
                                 "per family, flannel's default)")


# ------------------------------------------------------------------ lease data


@dataclass(frozen=True, slots=True)
class WireguardLeaseData(LeaseData):
    public_key: str  # base64, as published
    port: int  # 0: the receiving host's ListenPort (ListenPortV6 for BackendV6Data)


def wireguard_lease_data(data: Mapping[str, Any]) -> WireguardLeaseData:
    """PublicKey and Port from a wireguard BackendData (or BackendV6Data)."""
    key = data.get("PublicKey")
    if wireguard_key(key) is None:
        text = key[:60] if isinstance(key, str) else key
        raise InvalidLease("bad_backend_data",
                           f"PublicKey {text!r} is not a WireGuard key (base64 of 32 bytes)")
    port = data.get("Port", 0)
    if port is None:
        port = 0
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise InvalidLease("bad_backend_data", f"Port {port!r} is not a UDP port")
    assert isinstance(key, str)
    return WireguardLeaseData(key, port)


# ------------------------------------------------------------------ kernel objects per peer


def plan_peer(peer: Peer, options: WireguardOptions, *, ipv4: bool = True,
              ipv6: bool = False) -> frozenset[KernelObject]:
    """A wireguard peer's objects on the devices this host has (`ipv4`: flannel-wg,
    `ipv6`: flannel-wg-v6): per family, the peer with its endpoint <public address>:
    <Port> (0: our own ListenPort of that family, flannel's rule) and its subnet as
    an allowed IP. Empty for a peer of another backend."""
    if peer.backend_type != NAME:
        return frozenset()
    families: list[tuple[bool, Network, Address, LeaseData]] = []
    if ipv4:
        families.append((False, peer.subnet, peer.public_ip, peer.data))
    v6 = ipv6_part(peer)
    if ipv6 and v6 is not None:
        families.append((True, v6.subnet, v6.public_ip, v6.data))
    objects: set[KernelObject] = set()
    for six, subnet, public_ip, data in families:
        if not isinstance(data, WireguardLeaseData):
            continue
        device = options.device_name_for(ipv6=six)
        port = data.port or options.port_for(ipv6=six)
        objects.add(WgPeer(device, data.public_key, (public_ip, port), options.psk,
                           options.keepalive))
        objects.add(AllowedIP(device, subnet, data.public_key))
    return frozenset(objects)


# ------------------------------------------------------------------ the profile


def _device_mtu(options: WireguardOptions, underlay: int, ipv6: bool) -> int:
    return options.mtu_for(underlay, ipv6=ipv6)


def _device_name(options: WireguardOptions, ipv6: bool) -> str:
    return options.device_name_for(ipv6=ipv6)


def _owns_link(kind: str | None, name: str) -> bool:
    return kind in (DEVICE_KIND, USERSPACE_DEVICE_KIND) and name in (WIREGUARD_DEVICE, WIREGUARD_DEVICE6)


PROFILE = BackendProfile(
    NAME, wireguard_options, wireguard_lease_data,
    option_keys={"ListenPort": "listen_port", "ListenPortV6": "listen_port_v6",
                 "PSK": "psk", "PersistentKeepaliveInterval": "keepalive", "MTU": "mtu",
                 "Mode": "mode"},
    # All in place: the PSK, keepalive and MTU are the peers' and devices' settings;
    # a port is set on the running device (`wg set ... listen-port`: its peers and
    # sessions kept) and published in BackendData, peers moving their endpoint when
    # they read it (or at once, by WireGuard's roaming, on our next packet). Mode
    # changes no device in any config `check_wireguard_mode` lets run (IPv4-only:
    # every mode is flannel's one; dual-stack: only "separate").
    in_place=frozenset({"PSK", "PersistentKeepaliveInterval", "MTU", "ListenPort",
                        "ListenPortV6", "Mode"}),
    mtu=smallest_device_mtu(_device_mtu),
    mtu_notes=path_mtu_notes(_device_name, (WIREGUARD_OVERHEAD, WIREGUARD6_OVERHEAD),
                             lambda mtu, overhead: f"Backend.MTU {mtu} - {overhead}"),
    check_network=check_wireguard_mode,
    owns_link=_owns_link,
)
