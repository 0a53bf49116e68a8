"""The backend types a network config may name: their options and what their leases carry.

Pure: no I/O. Everything that depends on the backend type but not on the
kernel lives in one registry, `BACKEND_TYPES`:

- which types exist (`vxlan`, `host-gw`, `alloc`);
- how the `Backend` object of the network config is read and checked
  (`parse_options`, raising NetworkConfigError naming the field and value);
- what a peer's `BackendData` must hold for the peer to be programmed
  (`parse_lease_data`, raising InvalidLease with a short reason);
- which `Backend` keys its options come from (`option_keys`) and which of
  them a running agent applies in place (`in_place`); a change of any other
  option rebuilds the backend (leaseagent.core.configchange;
  docs/architecture.md, "Config changes");
- what FLANNEL_MTU it gives for an underlay MTU (`mtu`), so `leasectl config
  set` can tell whether a change makes Docker restart.

The data plane (leaseagent.dataplane.BACKENDS) registers one implementation
per type under the same names; a unit test checks that the two registries
name the same types. Adding a backend type: its options and lease data
here, its implementation in leaseagent.dataplane, one line in each registry.

vxlan (flannel's pkg/backend/vxlan): `{"Type": "vxlan", "VNI": 1, "Port": 8472,
"MTU": n, "DirectRouting": false}`; flannel treats VNI 0 and Port 0 as unset.
Its lease data is `{"VNI": 1, "VtepMAC": "c6:d2:32:6f:8f:44"}`; a peer needs a
unicast, non-zero VtepMAC (the VNI is not checked: flannel does not either).
"""

from __future__ import annotations

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
    mtu: int | None = None
    direct_routing: bool = False

    @property
    def device_name(self) -> str:
        return f"flannel.{self.vni}"

    @property
    def device_name6(self) -> str:
        """The IPv6 device of a dual-stack network (flannel's name)."""
        return f"flannel-v6.{self.vni}"


    def mtu_for(self, underlay_mtu: int, *, ipv6: bool = False) -> int:
        """The device MTU: Backend.MTU for both devices when set (as flannel's), else
        the underlay's less what VXLAN over that family's outer header adds."""
        if self.mtu is not None:
            return self.mtu
        return underlay_mtu - (VXLAN6_OVERHEAD if ipv6 else VXLAN_OVERHEAD)


# Any VNI's device of either family, as device_name and device_name6 make them.
VXLAN_DEVICE_NAME = re.compile(r"flannel(-v6)?\.\d+")

BackendOptions = NoOptions | VxlanOptions


def _int_option(backend: Mapping[str, Any], name: str, default: int, lo: int, hi: int) -> int:
    value = backend.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise NetworkConfigError(f"Backend.{name}={value!r}: must be an integer in {lo}..{hi}")
    return value


def _bool_option(backend: Mapping[str, Any], name: str) -> bool:
    value = backend.get(name, False)
    if not isinstance(value, bool):
        raise NetworkConfigError(f"Backend.{name}={value!r}: must be true or false")
    return value


def _no_options(backend: Mapping[str, Any]) -> NoOptions:
    return NoOptions()


def vxlan_options(backend: Mapping[str, Any]) -> VxlanOptions:
    """VNI, Port, MTU, DirectRouting from Backend; NetworkConfigError names a bad field."""
    direct = _bool_option(backend, "DirectRouting")
    mtu = _int_option(backend, "MTU", 0, 0, 65535) if "MTU" in backend else None
    if mtu is not None and mtu < 68:
        raise NetworkConfigError(f"Backend.MTU={mtu}: must be at least 68 (IPv4 minimum)")
    return VxlanOptions(
        # VNI 0 is valid for the kernel but flannel treats 0 as "unset" -> 1.
        vni=_int_option(backend, "VNI", DEFAULT_VNI, 0, (1 << 24) - 1) or DEFAULT_VNI,
        port=_int_option(backend, "Port", DEFAULT_PORT, 0, 65535) or DEFAULT_PORT,
        mtu=mtu,
        direct_routing=direct,
    )


# ------------------------------------------------------------------ lease data


@dataclass(frozen=True, slots=True)
class NoLeaseData:
    """A backend type whose peers need nothing beyond PublicIP (host-gw, alloc)."""


@dataclass(frozen=True, slots=True)
class VxlanLeaseData:
    vtep_mac: str  # lowercase, unicast


LeaseData = NoLeaseData | VxlanLeaseData


def _no_lease_data(data: Mapping[str, Any]) -> NoLeaseData:
    return NoLeaseData()


def vxlan_lease_data(data: Mapping[str, Any]) -> VxlanLeaseData:
    raw = data.get("VtepMAC")
    mac = unicast_mac(raw)
    if mac is None:
        raise InvalidLease("bad_vtep_mac", f"VtepMAC {raw!r} is not a unicast, non-zero MAC address")
    return VxlanLeaseData(mac)


# ------------------------------------------------------------------ the registry


def _underlay_mtu(options: BackendOptions, underlay_mtu: int, ipv6: bool) -> int:
    """FLANNEL_MTU of a backend without encapsulation: the underlay's."""
    return underlay_mtu


def _vxlan_mtu(options: BackendOptions, underlay_mtu: int, ipv6: bool) -> int:
    """FLANNEL_MTU with vxlan: the smaller MTU of the devices in use."""
    assert isinstance(options, VxlanOptions)
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


BACKEND_TYPES: dict[str, BackendType] = {
    "vxlan": BackendType(
        "vxlan", vxlan_options, vxlan_lease_data,
        option_keys={"VNI": "vni", "Port": "port", "MTU": "mtu", "DirectRouting": "direct_routing"},
        # VNI names the devices (flannel.<VNI>) and is published in BackendData: a rebuild.
        in_place=frozenset({"Port", "MTU", "DirectRouting"}),
        mtu=_vxlan_mtu),
    "host-gw": BackendType("host-gw", _no_options, _no_lease_data),
    "alloc": BackendType("alloc", _no_options, _no_lease_data),
}


def backend_type(name: str) -> BackendType:
    """The registered type `name`; NetworkConfigError naming the supported ones if unknown."""
    found = BACKEND_TYPES.get(name)
    if found is None:
        raise NetworkConfigError(
            f"Backend.Type={name!r}: not supported (supported: {', '.join(sorted(BACKEND_TYPES))})")
    return found
