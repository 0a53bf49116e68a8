"""What every backend profile is made of, and the readers its config fields share.

Pure: no I/O. A `BackendProfile` says everything about one backend type that
does not need the kernel (docs/architecture.md, "Backend profiles"); the rest
of the code asks it and never compares the backend's name:

- which `Backend` keys it has (`option_keys`), how flannel decodes them
  (`parse_options`, raising NetworkConfigError naming the field and value) and
  which of them a running agent applies in place (`in_place`); a change of any
  other option rebuilds the backend (leaseagent.core.configchange);
- what its options demand of the rest of the config (`check_network`);
- what a peer's `BackendData` must hold for the peer to be programmed
  (`parse_lease_data`, raising InvalidLease with a short reason);
- its FLANNEL_MTU for an underlay MTU (`mtu`) and, for doctor, where each of
  its devices' MTU comes from (`mtu_notes`);
- whether it has a data path at all (`data_path`: devices, routes, traffic
  rules, a PublicIP peers can reach), and which links are its devices
  (`owns_link`, for `leasectl cleanup`, and the ports doctor's peer filter
  check guards).

The kernel objects per peer are each profile module's own function (their
arguments differ: vxlan's device indexes, wireguard's options), called by its
data-plane backend (leaseagent.dataplane.<type>), which also runs its doctor
checks that need the kernel or the state directory (`doctor_problems`).

Every Backend object is read as Go reads it into the type's struct
(leaseagent.core.gojson, leaseagent.core.network): field names ignoring case,
null as "not given"; the readers below are the field rules of Go's
encoding/json for the struct's field types.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from leaseagent.errors import NetworkConfigError

if TYPE_CHECKING:
    from leaseagent.core.leases import Peer


@dataclass(frozen=True, slots=True)
class BackendOptions:
    """The parsed Backend object of a network config (each profile has its own)."""

    def other_variant(self, data: LeaseData) -> str | None:
        """What a peer of this backend type runs, by its lease data, that this host's
        backend cannot serve (vxlan: "VNI 2"); None when it can, or the data does not
        say (`runs_other`)."""
        return None


@dataclass(frozen=True, slots=True)
class NoOptions(BackendOptions):
    """A backend type with nothing to configure (host-gw, alloc)."""


@dataclass(frozen=True, slots=True)
class LeaseData:
    """What a profile reads from a peer's BackendData (each profile has its own)."""


@dataclass(frozen=True, slots=True)
class NoLeaseData(LeaseData):
    """A backend type whose peers need nothing beyond PublicIP (host-gw, alloc)."""


def runs_other(peer: Peer, backend_type: str, options: BackendOptions) -> str | None:
    """What `peer` runs instead of this host's backend (`backend_type` with `options`):
    "the host-gw backend", "vxlan VNI 2"; None when this host's backend serves it. The
    one rule of a peer's profile identity: such a peer is planned nothing, and what the
    kernel has for it is kept, until its lease says ours (a roll-out; leaseagent.dataplane
    .reconciling)."""
    if peer.backend_type != backend_type:
        return f"the {peer.backend_type} backend"
    for data in (peer.data, peer.data6):
        other = options.other_variant(data) if data is not None else None
        if other is not None:
            return f"{backend_type} {other}"
    return None


def no_options(backend: Mapping[str, Any]) -> NoOptions:
    return NoOptions()


def no_lease_data(data: Mapping[str, Any]) -> NoLeaseData:
    return NoLeaseData()


# ------------------------------------------------------------------ Go's field rules


def shown(value: object) -> str:
    return json.dumps(value)


def int_option(backend: Mapping[str, Any], name: str, default: int, lo: int, hi: int) -> int:
    """An integer field; absent or null: `default` (Go leaves the field as it was)."""
    value = backend.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise NetworkConfigError(f"Backend.{name}={shown(value)}: must be a whole JSON "
                                 f"number in {lo}..{hi} (not a string)")
    return value


def bool_option(backend: Mapping[str, Any], name: str) -> bool:
    value = backend.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise NetworkConfigError(f"Backend.{name}={shown(value)}: must be true or false "
                                 "(not a string)")
    return value


def string_option(backend: Mapping[str, Any], name: str, default: str) -> str:
    value = backend.get(name)
    if value is None:
        return default
    if not isinstance(value, str):
        raise NetworkConfigError(f"Backend.{name}={shown(value)}: must be a string")
    return value


# ------------------------------------------------------------------ MTU rules


def underlay_mtu(options: BackendOptions, underlay_mtu: int, ipv6: bool) -> int:
    """FLANNEL_MTU of a backend without encapsulation: the underlay's."""
    return underlay_mtu


def smallest_device_mtu(mtu_for: Callable[[Any, int, bool], int]
                        ) -> Callable[[BackendOptions, int, bool], int]:
    """FLANNEL_MTU of a backend with a device per family (vxlan, wireguard): the smaller
    MTU of the devices in use (the IPv6 one only with `ipv6`); `mtu_for(options,
    underlay MTU, ipv6)` is one device's."""
    def rule(options: BackendOptions, underlay: int, ipv6: bool) -> int:
        return min(mtu_for(options, underlay, six) for six in ((False, True) if ipv6
                                                                else (False,)))
    return rule


def path_mtu_notes(devices: Callable[[Any, bool], str], overheads: tuple[int, int],
                   backend_mtu_note: Callable[[int, int], str]
                   ) -> Callable[[BackendOptions, int, bool], dict[str, str]]:
    """`mtu_notes` of a backend whose devices get the path MTU (Backend.MTU, else the
    underlay's) less their family's overhead: per device name (`devices(options, ipv6)`),
    where its MTU comes from. `backend_mtu_note(Backend.MTU, overhead)` words it when
    Backend.MTU is set."""
    def notes(options: BackendOptions, underlay: int, ipv6: bool) -> dict[str, str]:
        out = {}
        for six in (False, True) if ipv6 else (False,):
            overhead = overheads[six]
            mtu = getattr(options, "mtu", None)
            out[devices(options, six)] = (f"underlay MTU {underlay} - {overhead}" if mtu is None
                                          else backend_mtu_note(mtu, overhead))
        return out
    return notes


# ------------------------------------------------------------------ the profile


def _no_link(kind: str | None, name: str) -> bool:
    return False


def _no_notes(options: BackendOptions, underlay: int, ipv6: bool) -> dict[str, str]:
    return {}


@dataclass(frozen=True)
class BackendProfile:
    name: str
    parse_options: Callable[[Mapping[str, Any]], BackendOptions]
    parse_lease_data: Callable[[Mapping[str, Any]], LeaseData]
    # Backend key -> the attribute of the parsed options it sets ("MTU" -> "mtu").
    option_keys: Mapping[str, str] = field(default_factory=dict)
    # The keys a running agent applies in place: the backend reconciles to the new
    # spec with its lease and devices kept. Any other option's change is a rebuild.
    in_place: frozenset[str] = frozenset()
    # A rebuild option's own account of what a running agent does (the README's table,
    # core.configchange.fields_table), where it differs from every rebuild's.
    rebuild_effects: Mapping[str, str] = field(default_factory=dict)
    # FLANNEL_MTU for (options, underlay MTU, IPv6 devices too).
    mtu: Callable[[BackendOptions, int, bool], int] = underlay_mtu
    # Doctor: per device, where its MTU comes from (options, underlay MTU, IPv6 too).
    mtu_notes: Callable[[BackendOptions, int, bool], dict[str, str]] = _no_notes
    # A check of the options against the rest of the config, given whether it enables
    # IPv6: NetworkConfigError if they do not go together. None: nothing to check.
    check_network: Callable[[BackendOptions, bool], None] | None = None
    # False: no data path at all (alloc): no device, route or traffic rule; the host
    # needs no interface when given its PublicIP, and any PublicIP will do.
    data_path: bool = True
    # Whether a link (its kind, its name) is one of this backend's devices, of any
    # config: what `leasectl cleanup` removes. The peer filter (core.rules) guards the
    # port of each vxlan device among them (VXLAN has no authentication).
    owns_link: Callable[[str | None, str], bool] = _no_link
