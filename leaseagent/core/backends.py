"""The backend types a network config may name: their options and what their leases carry.

Pure: no I/O. Everything that depends on the backend type but not on the
kernel lives in one registry, `BACKEND_TYPES`:

- which types exist (`vxlan`, `host-gw`, `wireguard`, `alloc`);
- how the `Backend` object of the network config is read and checked
  (`parse_options`, raising NetworkConfigError naming the field and value);
- what a peer's `BackendData` must hold for the peer to be programmed
  (`parse_lease_data`, raising InvalidLease with a short reason);
- which `Backend` keys its options come from (`option_keys`) and which of
  them a running agent applies in place (`in_place`); a change of any other
  option rebuilds the backend (leaseagent.core.configchange;
  docs/architecture.md, "Config changes");
- what FLANNEL_MTU it gives for an underlay MTU (`mtu`), so `leasectl config
  set` can tell whether a change makes Docker restart;
- what its options demand of the rest of the config (`check_network`: today
  only wireguard's Mode against EnableIPv6).

The data plane (leaseagent.dataplane.BACKENDS) registers one implementation
per type under the same names; a unit test checks that the two registries
name the same types. Adding a backend type: its options and lease data
here, its implementation in leaseagent.dataplane, one line in each registry.

vxlan (flannel's pkg/backend/vxlan, VXLANConfig): `{"Type": "vxlan", "VNI": 1,
"Port": 8472, "MTU": n, "GBP": false, "Learning": false, "DirectRouting": false}`.
VNI 0 is VNI 0 (flannel.0: flannel's default of 1 applies only when VNI is absent
or null); Port 0 is the kernel's default port, 8472. MTU is flannel's: the MTU of
the path the encapsulated packets take (default: the underlay's), from which the
VXLAN overhead is subtracted for the device (so Backend.MTU 1500 makes a 1450
device and FLANNEL_MTU=1450, as flanneld does). GBP and Learning are the kernel
device's flags (IFLA_VXLAN_GBP, IFLA_VXLAN_LEARNING) as flannel sets them.
Its lease data is `{"VNI": 1, "VtepMAC": "c6:d2:32:6f:8f:44"}`; a peer needs a
unicast, non-zero VtepMAC (the VNI is not checked: flannel does not either).

wireguard (flannel's pkg/backend/wireguard): `{"Type": "wireguard", "ListenPort":
51820, "ListenPortV6": 51821, "PSK": "<base64>", "PersistentKeepaliveInterval": 0,
"MTU": n, "Mode": "separate"}`, flannel's names and defaults. Its lease data is
`{"PublicKey": "<base64>", "Port": 51820}` (BackendV6Data likewise, with the IPv6
device's port); a missing or 0 Port means the receiving host's own ListenPort
(ListenPortV6), flannel's rule for leases of flannel versions before Port. A peer
needs a PublicKey that is standard base64 of 32 bytes (wgtypes.ParseKey's rule).
MTU is flannel's: the MTU of the path the tunnel's packets take (default: the
underlay's), from which WireGuard's overhead is subtracted for each device, as for vxlan.

Every Backend object is read as Go reads it into the type's struct (leaseagent.core
.gojson, leaseagent.core.network): field names ignoring case, null as "not given".
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from leaseagent.errors import InvalidLease, NetworkConfigError

DEFAULT_BACKEND = "vxlan"

VXLAN_OVERHEAD = 50  # outer IPv4 20 + UDP 8 + VXLAN 8 + inner Ethernet 14
VXLAN6_OVERHEAD = 70  # outer IPv6 40 + UDP 8 + VXLAN 8 + inner Ethernet 14 (not flannel's 50: #1781)
DEFAULT_VNI = 1
DEFAULT_PORT = 8472  # flannel's default, the Linux kernel's original VXLAN port

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

_MAC = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")  # used with fullmatch: `$` admits a "\n"


def unicast_mac(text: object) -> str | None:
    """`text` as a lowercase unicast, non-zero MAC address, or None if it is not one."""
    if not isinstance(text, str):
        return None
    mac = text.lower()
    if not _MAC.fullmatch(mac):
        return None
    value = int(mac.replace(":", ""), 16)
    if value == 0 or value & (1 << 40):  # zero, or the multicast bit of the first octet
        return None
    return mac


# ------------------------------------------------------------------ options


@dataclass(frozen=True, slots=True)
class NoOptions:
    """A backend type with nothing to configure (host-gw, alloc)."""


@dataclass(frozen=True, slots=True)
class VxlanOptions:
    """The vxlan part of the network config's Backend object."""

    vni: int = DEFAULT_VNI
    port: int = DEFAULT_PORT
    mtu: int | None = None  # flannel's MTU: the path's, before the overhead
    direct_routing: bool = False
    gbp: bool = False  # VXLAN Group Based Policy extension (IFLA_VXLAN_GBP)
    learning: bool = False  # the device learns source MACs (IFLA_VXLAN_LEARNING)

    @property
    def device_name(self) -> str:
        return f"flannel.{self.vni}"

    @property
    def device_name6(self) -> str:
        """The IPv6 device of a dual-stack network (flannel's name)."""
        return f"flannel-v6.{self.vni}"


    def mtu_for(self, underlay_mtu: int, *, ipv6: bool = False) -> int:
        """The device MTU: Backend.MTU (else the underlay's) less what VXLAN over that
        family's outer header adds (flannel: MTU - 50 for both devices)."""
        path = self.mtu if self.mtu is not None else underlay_mtu
        return path - (VXLAN6_OVERHEAD if ipv6 else VXLAN_OVERHEAD)


# Any VNI's device of either family, as device_name and device_name6 make them.
VXLAN_DEVICE_NAME = re.compile(r"flannel(-v6)?\.\d+")

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


@dataclass(frozen=True, slots=True)
class WireguardOptions:
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


BackendOptions = NoOptions | VxlanOptions | WireguardOptions


def _shown(value: object) -> str:
    return json.dumps(value)


def _int_option(backend: Mapping[str, Any], name: str, default: int, lo: int, hi: int) -> int:
    """An integer field; absent or null: `default` (Go leaves the field as it was)."""
    value = backend.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise NetworkConfigError(f"Backend.{name}={_shown(value)}: must be a whole JSON "
                                 f"number in {lo}..{hi} (not a string)")
    return value


def _bool_option(backend: Mapping[str, Any], name: str) -> bool:
    value = backend.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise NetworkConfigError(f"Backend.{name}={_shown(value)}: must be true or false "
                                 "(not a string)")
    return value


def _string_option(backend: Mapping[str, Any], name: str, default: str) -> str:
    value = backend.get(name)
    if value is None:
        return default
    if not isinstance(value, str):
        raise NetworkConfigError(f"Backend.{name}={_shown(value)}: must be a string")
    return value


def _no_options(backend: Mapping[str, Any]) -> NoOptions:
    return NoOptions()


VXLAN_MIN_MTU = 68 + VXLAN_OVERHEAD  # the device keeps IPv4's minimum, 68


def vxlan_options(backend: Mapping[str, Any]) -> VxlanOptions:
    """VNI, Port, MTU, GBP, Learning, DirectRouting from Backend (flannel's VXLANConfig,
    keys by their flannel names); NetworkConfigError names a bad field."""
    direct = _bool_option(backend, "DirectRouting")
    mtu = None
    if backend.get("MTU") is not None:
        # flanneld takes any int: 0 gives FLANNEL_MTU=-50, 100 a device below IPv4's minimum.
        mtu = _int_option(backend, "MTU", 0, 0, 65535)
        if mtu < VXLAN_MIN_MTU:
            raise NetworkConfigError(f"Backend.MTU={mtu}: must be at least {VXLAN_MIN_MTU} "
                                     f"(the path's MTU; the device gets {VXLAN_OVERHEAD} less)")
    return VxlanOptions(
        # VNI 0 is VNI 0 (flanneld makes flannel.0); absent or null is flannel's 1.
        vni=_int_option(backend, "VNI", DEFAULT_VNI, 0, (1 << 24) - 1),
        # Port 0: flanneld leaves IFLA_VXLAN_PORT out and the kernel uses 8472.
        port=_int_option(backend, "Port", DEFAULT_PORT, 0, 65535) or DEFAULT_PORT,
        mtu=mtu,
        direct_routing=direct,
        gbp=_bool_option(backend, "GBP"),
        learning=_bool_option(backend, "Learning"),
    )


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


def wireguard_options(backend: Mapping[str, Any]) -> WireguardOptions:
    """ListenPort, ListenPortV6, PSK, PersistentKeepaliveInterval, MTU, Mode from Backend;
    NetworkConfigError names a bad field (never the PSK's value)."""
    psk_text = _string_option(backend, "PSK", "")
    psk = None
    if psk_text != "":  # flannel: an empty PSK is none
        raw = wireguard_key(psk_text)
        if raw is None:
            raise NetworkConfigError("Backend.PSK: must be a WireGuard key, 32 bytes in "
                                     "base64 (`wg genpsk` makes one)")
        psk = PresharedKey(raw)
    mode = _string_option(backend, "Mode", "separate")
    if mode not in WIREGUARD_MODES:
        raise NetworkConfigError(f"Backend.Mode={_shown(mode)}: must be one of "
                                 f"{', '.join(WIREGUARD_MODES)}")
    mtu = None
    if backend.get("MTU") is not None:
        mtu = _int_option(backend, "MTU", 0, 0, 65535)
        if mtu < 68 + WIREGUARD6_OVERHEAD:
            raise NetworkConfigError(f"Backend.MTU={mtu}: must be at least "
                                     f"{68 + WIREGUARD6_OVERHEAD} (68 inside the tunnel)")
    return WireguardOptions(
        # 0 would make the kernel pick a port that no lease could name: refused.
        listen_port=_int_option(backend, "ListenPort", WIREGUARD_PORT, 1, 65535),
        listen_port_v6=_int_option(backend, "ListenPortV6", WIREGUARD_PORT6, 1, 65535),
        psk=psk,
        keepalive=_int_option(backend, "PersistentKeepaliveInterval", 0, 0, 65535),
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
class NoLeaseData:
    """A backend type whose peers need nothing beyond PublicIP (host-gw, alloc)."""


@dataclass(frozen=True, slots=True)
class VxlanLeaseData:
    vtep_mac: str  # lowercase, unicast


@dataclass(frozen=True, slots=True)
class WireguardLeaseData:
    public_key: str  # base64, as published
    port: int  # 0: the receiving host's ListenPort (ListenPortV6 for BackendV6Data)


LeaseData = NoLeaseData | VxlanLeaseData | WireguardLeaseData


def _no_lease_data(data: Mapping[str, Any]) -> NoLeaseData:
    return NoLeaseData()


def vxlan_lease_data(data: Mapping[str, Any]) -> VxlanLeaseData:
    raw = data.get("VtepMAC")
    mac = unicast_mac(raw)
    if mac is None:
        raise InvalidLease("bad_vtep_mac", f"VtepMAC {raw!r} is not a unicast, non-zero MAC address")
    return VxlanLeaseData(mac)


def wireguard_lease_data(data: Mapping[str, Any]) -> WireguardLeaseData:
    """PublicKey and Port from a wireguard BackendData (or BackendV6Data)."""
    key = data.get("PublicKey")
    if wireguard_key(key) is None:
        shown = key[:60] if isinstance(key, str) else key
        raise InvalidLease("bad_backend_data",
                           f"PublicKey {shown!r} is not a WireGuard key (base64 of 32 bytes)")
    port = data.get("Port", 0)
    if port is None:
        port = 0
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise InvalidLease("bad_backend_data", f"Port {port!r} is not a UDP port")
    assert isinstance(key, str)
    return WireguardLeaseData(key, port)


# ------------------------------------------------------------------ the registry


def _underlay_mtu(options: BackendOptions, underlay_mtu: int, ipv6: bool) -> int:
    """FLANNEL_MTU of a backend without encapsulation: the underlay's."""
    return underlay_mtu


def _smallest_device_mtu(options: BackendOptions, underlay_mtu: int, ipv6: bool) -> int:
    """FLANNEL_MTU of a backend with a device per family (vxlan, wireguard): the smaller
    MTU of the devices in use (the IPv6 one only with `ipv6`)."""
    assert isinstance(options, VxlanOptions | WireguardOptions)
    return min(options.mtu_for(underlay_mtu, ipv6=six) for six in ((False, True) if ipv6
                                                                     else (False,)))


@dataclass(frozen=True)
class BackendType:
    name: str
    parse_options: Callable[[Mapping[str, Any]], BackendOptions]
    parse_lease_data: Callable[[Mapping[str, Any]], LeaseData]
    # Backend key -> the attribute of the parsed options it sets ("MTU" -> "mtu").
    option_keys: Mapping[str, str] = field(default_factory=dict)
    # The keys a running agent applies in place: the backend reconciles to the new
    # spec with its lease and devices kept. Any other option's change is a rebuild.
    in_place: frozenset[str] = frozenset()
    # FLANNEL_MTU for (options, underlay MTU, IPv6 devices too); None: not known here.
    mtu: Callable[[BackendOptions, int, bool], int] | None = _underlay_mtu
    # A check of the options against the rest of the config, given whether it enables
    # IPv6: NetworkConfigError if they do not go together. None: nothing to check.
    check_network: Callable[[BackendOptions, bool], None] | None = None


BACKEND_TYPES: dict[str, BackendType] = {
    "vxlan": BackendType(
        "vxlan", vxlan_options, vxlan_lease_data,
        option_keys={"VNI": "vni", "Port": "port", "MTU": "mtu", "DirectRouting": "direct_routing",
                     "GBP": "gbp", "Learning": "learning"},
        # VNI names the devices (flannel.<VNI>) and is published in BackendData: a rebuild.
        # GBP and Learning are fixed at the device's creation: it is made again in place.
        in_place=frozenset({"Port", "MTU", "DirectRouting", "GBP", "Learning"}),
        mtu=_smallest_device_mtu),
    "host-gw": BackendType("host-gw", _no_options, _no_lease_data),
    "wireguard": BackendType(
        "wireguard", wireguard_options, wireguard_lease_data,
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
        mtu=_smallest_device_mtu, check_network=check_wireguard_mode),
    "alloc": BackendType("alloc", _no_options, _no_lease_data),
}


def backend_type(name: str) -> BackendType:
    """The registered type `name`; NetworkConfigError naming the supported ones if unknown."""
    found = BACKEND_TYPES.get(name)
    if found is None:
        raise NetworkConfigError(
            f"Backend.Type={name!r}: not supported (supported: {', '.join(sorted(BACKEND_TYPES))})")
    return found
