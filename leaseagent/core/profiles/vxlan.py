"""The vxlan backend's profile: flannel's pkg/backend/vxlan, everything but the kernel.

Config (flannel's VXLANConfig): `{"Type": "vxlan", "VNI": 1, "Port": 8472, "MTU": n,
"GBP": false, "Learning": false, "DirectRouting": false}`. VNI 0 is VNI 0
(flannel.0: flannel's default of 1 applies only when VNI is absent or null); Port 0
is the kernel's default port, 8472. MTU is flannel's: the MTU of the path the
encapsulated packets take (default: the underlay's), from which the VXLAN overhead
is subtracted for the device (so Backend.MTU 1500 makes a 1450 device and
FLANNEL_MTU=1450, as flanneld does). GBP and Learning are the kernel device's flags
(IFLA_VXLAN_GBP, IFLA_VXLAN_LEARNING) as flannel sets them.

Devices: `flannel.<VNI>` (IPv4) and, on a dual-stack network, `flannel-v6.<VNI>`.

Lease data: `{"VNI": 1, "VtepMAC": "c6:d2:32:6f:8f:44"}`; a peer needs a unicast,
non-zero VtepMAC. A peer whose lease names another VNI than ours (in BackendData or
BackendV6Data) runs another variant of the backend (`VxlanOptions.other_variant`,
`base.runs_other`): during a VNI change's roll-out it is served like a peer of another
type, the old way, until its lease says our VNI. A lease without a VNI (older
flanneld wrote none) or with a non-integer one matches any VNI; flanneld writes
it as a uint16, so VNI 65537 publishes 1.

Kernel objects per peer and family (`plan_peer`; docs/architecture.md, "Kernel
objects"): Neighbour(<subnet base> -> VtepMAC), Fdb(VtepMAC -> public address),
Route(<subnet> via <subnet base> dev <device> onlink); with DirectRouting and the
peer's public address on a directly connected network, only Route(<subnet> via
<public address> dev underlay).

Traffic rules: the peer filter on the VXLAN port (VXLAN has no authentication).
Doctor: the VtepMAC three ways (leaseagent.dataplane.vxlan). Cleanup: its devices
of any VNI, and those a Port change put aside (`aside_name`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from leaseagent.core.plan import Fdb, KernelObject, Neighbour, Route, ipv6_part
from leaseagent.core.profiles.base import (
    BackendOptions,
    BackendProfile,
    LeaseData,
    bool_option,
    int_option,
    path_mtu_notes,
    smallest_device_mtu,
)
from leaseagent.errors import InvalidLease, NetworkConfigError

if TYPE_CHECKING:
    from leaseagent.core.leases import Peer
    from leaseagent.core.network import Address, Network

NAME = "vxlan"
DEVICE_KIND = "vxlan"  # the kernel's link kind of its devices

VXLAN_OVERHEAD = 50  # outer IPv4 20 + UDP 8 + VXLAN 8 + inner Ethernet 14
VXLAN6_OVERHEAD = 70  # outer IPv6 40 + UDP 8 + VXLAN 8 + inner Ethernet 14 (not flannel's 50: #1781)
DEFAULT_VNI = 1
DEFAULT_PORT = 8472  # flannel's default, the Linux kernel's original VXLAN port
VXLAN_MIN_MTU = 68 + VXLAN_OVERHEAD  # the device keeps IPv4's minimum, 68

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
class VxlanOptions(BackendOptions):
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

    def other_variant(self, data: LeaseData) -> str | None:
        vni = data.vni if isinstance(data, VxlanLeaseData) else None
        # flanneld publishes its VNI as a uint16 (vxlanLeaseAttrs.VNI).
        if vni is None or vni in (self.vni, self.vni & 0xFFFF):
            return None
        return f"VNI {vni}"

    @property
    def device_name6(self) -> str:
        """The IPv6 device of a dual-stack network (flannel's name)."""
        return f"flannel-v6.{self.vni}"

    def device_name_for(self, *, ipv6: bool) -> str:
        return self.device_name6 if ipv6 else self.device_name

    def mtu_for(self, underlay_mtu: int, *, ipv6: bool = False) -> int:
        """The device MTU: Backend.MTU (else the underlay's) less what VXLAN over that
        family's outer header adds (flannel: MTU - 50 for both devices)."""
        path = self.mtu if self.mtu is not None else underlay_mtu
        return path - (VXLAN6_OVERHEAD if ipv6 else VXLAN_OVERHEAD)


@dataclass(frozen=True, slots=True)
class DeviceFlag:
    """A vxlan option that is a flag of the kernel device, set at its creation (a
    device whose flag differs is made again, with its MAC)."""

    attribute: str  # the VxlanOptions field that holds it
    shown: str  # its name in the device's VxlanAttrs.flags, as a difference shows it
    ifla: int  # its IFLA_VXLAN_* attribute (linux/if_link.h)
    presence: bool = False  # True: a flag attribute, there when on; False: a u8, 0 or 1


# The device's flags, as flannel sets them (the kernel's default for any not given: off).
DEVICE_FLAGS = (
    DeviceFlag("learning", "learning", 7),  # IFLA_VXLAN_LEARNING
    DeviceFlag("gbp", "GBP", 23, presence=True),  # IFLA_VXLAN_GBP
)


def device_flags(options: VxlanOptions) -> frozenset[str]:
    """The device's flags (VxlanAttrs.flags) that `options` turn on."""
    return frozenset(flag.shown for flag in DEVICE_FLAGS if getattr(options, flag.attribute))


# A device put aside by a Port change (`aside_name`), kept --peer-hold-time beside the
# new one of flannel's name: "flannel.<VNI>" -> "flaside.<VNI>", "flannel-v6.<VNI>" ->
# "flaside6.<VNI>".
_ASIDE = {"flannel.": "flaside.", "flannel-v6.": "flaside6."}
IFNAMSIZ = 16  # a link name's bytes with its NUL (linux/if.h)
# The name a device put aside has for a moment while it takes flannel's name back (a
# change back within the hold, `VxlanBackend.step_aside`): "flaside." -> "flback.".
_BACK = ("flaside", "flback")

# Any VNI's device of either family, as device_name and device_name6 make them, and
# those devices put aside (or taking their name back).
VXLAN_DEVICE_NAME = re.compile(r"(flannel(-v6)?|flaside6?|flback6?)\.\d+")


def aside_name(name: str) -> str | None:
    """The name a device of flannel's name (`name`) takes while a new one of its
    name is made beside it (a Port change); None when it would not fit a link name."""
    for prefix, aside in _ASIDE.items():
        if name.startswith(prefix):
            renamed = aside + name[len(prefix):]
            return renamed if len(renamed) < IFNAMSIZ else None
    return None


def back_name(aside: str) -> str:
    """The name the device put aside as `aside` has while it takes flannel's name back
    (shorter than `aside`: it fits wherever `aside` does)."""
    return _BACK[1] + aside.removeprefix(_BACK[0])


def vxlan_options(backend: Mapping[str, Any]) -> VxlanOptions:
    """VNI, Port, MTU, GBP, Learning, DirectRouting from Backend (flannel's VXLANConfig,
    keys by their flannel names); NetworkConfigError names a bad field."""
    direct = bool_option(backend, "DirectRouting")
    mtu = None
    if backend.get("MTU") is not None:
        # flanneld takes any int: 0 gives FLANNEL_MTU=-50, 100 a device below IPv4's minimum.
        mtu = int_option(backend, "MTU", 0, 0, 65535)
        if mtu < VXLAN_MIN_MTU:
            raise NetworkConfigError(f"Backend.MTU={mtu}: must be at least {VXLAN_MIN_MTU} "
                                     f"(the path's MTU; the device gets {VXLAN_OVERHEAD} less)")
    return VxlanOptions(
        # VNI 0 is VNI 0 (flanneld makes flannel.0); absent or null is flannel's 1.
        vni=int_option(backend, "VNI", DEFAULT_VNI, 0, (1 << 24) - 1),
        # Port 0: flanneld leaves IFLA_VXLAN_PORT out and the kernel uses 8472.
        port=int_option(backend, "Port", DEFAULT_PORT, 0, 65535) or DEFAULT_PORT,
        mtu=mtu,
        direct_routing=direct,
        gbp=bool_option(backend, "GBP"),
        learning=bool_option(backend, "Learning"),
    )


# ------------------------------------------------------------------ lease data


@dataclass(frozen=True, slots=True)
class VxlanLeaseData(LeaseData):
    vtep_mac: str  # lowercase, unicast
    vni: int | None = None  # the VNI it publishes; None: it names none (any)


def vxlan_lease_data(data: Mapping[str, Any]) -> VxlanLeaseData:
    raw = data.get("VtepMAC")
    mac = unicast_mac(raw)
    if mac is None:
        raise InvalidLease("bad_vtep_mac", f"VtepMAC {raw!r} is not a unicast, non-zero MAC address")
    vni = data.get("VNI")
    return VxlanLeaseData(mac, vni if type(vni) is int else None)  # not a bool, float or string


# ------------------------------------------------------------------ kernel objects per peer


def _family(
    subnet: Network,
    public_ip: Address,
    data: LeaseData,
    device_index: int,
    *,
    underlay_index: int,
    direct_routing: bool,
    is_direct: Callable[[Address], bool],
) -> tuple[KernelObject, ...]:
    """One family's objects of a vxlan peer, on that family's device (flannel's
    layout, the same for both families)."""
    if not isinstance(data, VxlanLeaseData):
        return ()
    if direct_routing and is_direct(public_ip):
        return (Route(subnet, public_ip, underlay_index),)
    gateway = subnet.network_address
    return (
        Neighbour(device_index, gateway, data.vtep_mac),
        Fdb(device_index, data.vtep_mac, public_ip),
        Route(subnet, gateway, device_index, onlink=True),
    )


def plan_peer(
    peer: Peer,
    vxlan_index: int,
    *,
    underlay_index: int,
    direct_routing: bool,
    is_direct: Callable[[Address], bool],
    vxlan6_index: int = 0,
) -> frozenset[KernelObject]:
    """The objects one vxlan peer needs (empty if it cannot be served by vxlan):
    its IPv4 objects, and its IPv6 ones when it is dual-stack and this host has an
    IPv6 device (`vxlan6_index`, 0: none)."""
    if peer.backend_type != NAME:
        return frozenset()
    objects = _family(peer.subnet, peer.public_ip, peer.data, vxlan_index,
                      underlay_index=underlay_index, direct_routing=direct_routing,
                      is_direct=is_direct)
    if not objects:
        return frozenset()
    v6 = ipv6_part(peer) if vxlan6_index else None
    if v6 is not None:
        objects += _family(v6.subnet, v6.public_ip, v6.data, vxlan6_index,
                           underlay_index=underlay_index, direct_routing=direct_routing,
                           is_direct=is_direct)
    return frozenset(objects)


# ------------------------------------------------------------------ the profile


def _device_mtu(options: VxlanOptions, underlay: int, ipv6: bool) -> int:
    return options.mtu_for(underlay, ipv6=ipv6)


def _device_name(options: VxlanOptions, ipv6: bool) -> str:
    return options.device_name_for(ipv6=ipv6)


def _owns_link(kind: str | None, name: str) -> bool:
    return kind == DEVICE_KIND and VXLAN_DEVICE_NAME.fullmatch(name) is not None


PROFILE = BackendProfile(
    NAME, vxlan_options, vxlan_lease_data,
    option_keys={"VNI": "vni", "Port": "port", "MTU": "mtu", "DirectRouting": "direct_routing",
                 "GBP": "gbp", "Learning": "learning"},
    # VNI names the devices (flannel.<VNI>) and is published in BackendData: a rebuild.
    # Port is fixed at the device's creation: a rebuild too, the new device made beside
    # the old one, put aside under another name (VxlanBackend.step_aside). GBP and
    # Learning are fixed at creation too, but a device of the same VNI and port with
    # other flags cannot stand beside the old one: it is made again in place.
    in_place=frozenset({"MTU", "DirectRouting", "GBP", "Learning"}),
    # The lease names its VNI (base.runs_other): each peer is moved when it has switched.
    rebuild_effects={"VNI": "the backend is rebuilt: the new devices made beside the old "
                            "ones (a device of the same name renamed aside first) take over "
                            "the routes of the peers whose lease says the new VNI, each other "
                            "peer's when its lease does (until then it is reached through the "
                            "old device); the old ones are removed --peer-hold-time after no "
                            "peer is on another VNI"},
    mtu=smallest_device_mtu(_device_mtu),
    mtu_notes=path_mtu_notes(_device_name, (VXLAN_OVERHEAD, VXLAN6_OVERHEAD),
                             lambda _mtu, _overhead: "Backend.MTU"),
    owns_link=_owns_link,
)
