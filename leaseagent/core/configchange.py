"""What a change of the network config asks of a running agent: one rule for all who ask.

Pure: no I/O. The agent applies a new `<prefix>/config` by the class
`classify` gives it, and `leasectl config set` (with `--dry-run` too) prints
the same class and, per lease, what `lease_impact` says; the README's table
of fields is `fields_table()` (a test keeps the two equal).
docs/architecture.md, "Config changes", tells the sequences.

The classes, from the least to the most disruptive (a change has the class
of its most disruptive field):

- `in-place`: the backend reconciles to the new spec (a fresh instance of the
  same backend adopts the devices: MTU set, a device remade with its MAC,
  per-peer objects replaced); subnet.env and Docker's options are rewritten
  if their content changes (FLANNEL_MTU). Lease and subnet are kept.
- `re-lease`: the subnet ranges changed. A host whose subnet still fits
  (`NetworkConfig.keeps`) keeps it (its key moved to the fitting one in one
  transaction if its IPv6 part changes); one whose subnet no longer fits
  takes a new one and gives the old up.
- `rebuild`: the backend changed identity (its type, or an option its type
  does not apply in place, such as vxlan's VNI and Port): the new backend is
  built beside the old one and takes its routes over, the old one's devices go
  --peer-hold-time after no peer runs the old type (a device of the name the
  new one wants is renamed aside first, vxlan's on a new Port; were one
  shared, the old one's objects would be removed first).

Which backend options are in place is the backend type's to say
(`BackendProfile.in_place` in leaseagent.core.profiles); an option change the
registry does not name is a rebuild, the safe side.

Values are compared as the agents read them (flannel's defaults applied), so
writing `"SubnetLen": 24` where 24 is the default changes nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network

from leaseagent.core.network import NetworkConfig, SubnetRange
from leaseagent.core.profiles import BACKEND_TYPES

NONE = "none"
IN_PLACE = "in-place"
RELEASE = "re-lease"
REBUILD = "rebuild"
CLASSES = (IN_PLACE, RELEASE, REBUILD)  # what a change can be (the metric's label values)
_RANK = {NONE: 0, IN_PLACE: 1, RELEASE: 2, REBUILD: 3}

# Underlay MTUs at which FLANNEL_MTU is compared (it depends on each host's underlay).
_SAMPLE_MTUS = (1500, 9000)


@dataclass(frozen=True)
class Field:
    """A top-level config field: its class and what a running agent does about it."""

    name: str
    kind: str
    value: Callable[[NetworkConfig], object]  # its value as the agents read it
    effect: str


def _v6(get: Callable[[SubnetRange], object]) -> Callable[[NetworkConfig], object]:
    """An IPv6 range field's value: unset (None) without EnableIPv6."""
    return lambda c: get(c.ipv6) if c.ipv6 is not None else None


_MOVES = "a host whose subnet is outside the new range takes a new one; the others keep theirs"
FIELDS: tuple[Field, ...] = (
    Field("Network", RELEASE, lambda c: c.ipv4.network, _MOVES),
    Field("SubnetLen", RELEASE, lambda c: c.ipv4.subnet_len, _MOVES),
    Field("SubnetMin", RELEASE, lambda c: c.ipv4.subnet_min,
          "bounds new leases; a held subnet inside Network is kept (as at start)"),
    Field("SubnetMax", RELEASE, lambda c: c.ipv4.subnet_max,
          "bounds new leases; a held subnet inside Network is kept (as at start)"),
    Field("EnableIPv4", NONE, lambda c: True, "must stay true (IPv6-only is refused)"),
    Field("EnableIPv6", RELEASE, lambda c: c.ipv6 is not None,
          "each key moves to the dual-stack key (or back) with its IPv4 subnet kept; the "
          "IPv6 device and IPv6 traffic rules come or go; Docker restarts (--ipv6)"),
    Field("IPv6Network", RELEASE, _v6(lambda r: r.network),
          "an IPv6 subnet outside the new range is replaced, the IPv4 subnet kept"),
    Field("IPv6SubnetLen", RELEASE, _v6(lambda r: r.subnet_len),
          "an IPv6 subnet outside the new range is replaced, the IPv4 subnet kept"),
    Field("IPv6SubnetMin", RELEASE, _v6(lambda r: r.subnet_min),
          "an IPv6 subnet outside the new range is replaced, the IPv4 subnet kept"),
    Field("IPv6SubnetMax", RELEASE, _v6(lambda r: r.subnet_max),
          "an IPv6 subnet outside the new range is replaced, the IPv4 subnet kept"),
    Field("EnableNFTables", IN_PLACE, lambda c: c.enable_nftables,
          "the traffic rules are removed from one tool and written with the other"),
    Field("Backend.Type", REBUILD, lambda c: c.backend_type,
          "the new backend is built beside the old one and takes its routes over; the lease "
          "value is rewritten; hosts on different types reach each other the old way until "
          "both have switched, then the old devices are removed"),
)

_OPTION_EFFECT = {
    IN_PLACE: "the backend reconciles to it (devices and per-peer objects); FLANNEL_MTU "
              "rewritten if it changes",
    REBUILD: "the backend is rebuilt: the new devices made beside the old ones (a device of "
             "the same name renamed aside first) take the routes over; the old ones are "
             "removed --peer-hold-time later",
}


@dataclass(frozen=True)
class FieldChange:
    name: str
    kind: str
    old: object
    new: object

    @property
    def text(self) -> str:
        return f"{self.name} {_shown(self.old)} -> {_shown(self.new)}"


def _shown(value: object) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


@dataclass(frozen=True)
class ConfigChange:
    """What differs between two configs, field by field, each with its class."""

    fields: tuple[FieldChange, ...] = ()

    @property
    def kind(self) -> str:
        """The class of the change: its most disruptive field's (NONE: nothing differs)."""
        return max((f.kind for f in self.fields), key=_RANK.__getitem__, default=NONE)

    def __bool__(self) -> bool:
        return self.kind != NONE

    @property
    def summary(self) -> str:
        """`re-lease: Network 10.5.0.0/16 -> 10.5.0.0/17; ...`, or `no change`."""
        if not self:
            return "no change"
        return f"{self.kind}: " + "; ".join(f.text for f in self.fields)


def option_kind(backend_type: str, key: str) -> str:
    """The class of a change of Backend.`key` for a backend of `backend_type`."""
    return IN_PLACE if key in BACKEND_TYPES[backend_type].in_place else REBUILD


def _option_changes(old: NetworkConfig, new: NetworkConfig) -> Iterator[FieldChange]:
    """Backend option changes of one backend type, each by its type's class."""
    keys = BACKEND_TYPES[new.backend_type].option_keys
    found = False
    for key, attr in keys.items():
        before, after = getattr(old.options, attr), getattr(new.options, attr)
        if before != after:
            found = True
            yield FieldChange(f"Backend.{key}", option_kind(new.backend_type, key), before, after)
    if not found and old.options != new.options:
        # Options the registry does not map to keys: the safe side.
        yield FieldChange("Backend", REBUILD, old.options, new.options)


def classify(old: NetworkConfig, new: NetworkConfig) -> ConfigChange:
    """What differs from `old` to `new`, each field with its class."""
    out = [FieldChange(f.name, f.kind, f.value(old), f.value(new))
           for f in FIELDS if f.value(old) != f.value(new)]
    if old.backend_type == new.backend_type:
        out += _option_changes(old, new)
    return ConfigChange(tuple(out))


# ------------------------------------------------------------------ per lease


def flannel_mtu_changes(old: NetworkConfig, new: NetworkConfig) -> bool | None:
    """Whether FLANNEL_MTU changes on a host (None: the backend type does not say how
    it sets it). Compared at a few underlay MTUs: each host has its own."""
    rules = [(BACKEND_TYPES[c.backend_type].mtu, c) for c in (old, new)]
    if any(rule is None for rule, _ in rules):
        return None if classify(old, new).kind == REBUILD else False
    values = [[rule(c.options, mtu, c.ipv6 is not None) for mtu in _SAMPLE_MTUS]
              for rule, c in rules if rule is not None]
    return values[0] != values[1]


@dataclass(frozen=True)
class LeaseImpact:
    """What a config change does to one host's lease and Docker."""

    moves: str | None  # why its IPv4 subnet must be replaced (None: kept)
    rekeys: bool  # its key changes with the IPv4 subnet kept (the IPv6 part comes, goes, moves)
    docker: tuple[str, ...]  # the subnet.env values Docker uses that change

    @property
    def restart_docker(self) -> bool:
        return bool(self.docker)


def lease_impact(old: NetworkConfig, new: NetworkConfig, subnet: IPv4Network,
                 ipv6: IPv6Network | None) -> LeaseImpact:
    """What `new` does to a host holding `subnet` (and `ipv6`) under `old`."""
    moves = new.check_subnet(subnet)
    rekeys = moves is None and not new.ipv6_part_fits(ipv6)
    docker = ["FLANNEL_SUBNET"] if moves is not None else []
    if (moves is not None or rekeys) and (ipv6 is not None or new.ipv6 is not None):
        docker.append("FLANNEL_IPV6_SUBNET")  # a new one, or none (--ipv6 comes or goes)
    mtu = flannel_mtu_changes(old, new)
    if mtu is None:
        docker.append("FLANNEL_MTU (may change)")
    elif mtu:
        docker.append("FLANNEL_MTU")
    return LeaseImpact(moves, rekeys, tuple(docker))


# ------------------------------------------------------------------ the README's table


def fields_table() -> str:
    """The README's table of every config field and its class (a test keeps it there)."""
    rows = ["| field | class | what a running agent does |", "| --- | --- | --- |"]
    for f in FIELDS:
        rows.append(f"| `{f.name}` | {f.kind if f.kind != NONE else '-'} | {f.effect} |")
    for type_name, kind in sorted(BACKEND_TYPES.items()):
        for key in kind.option_keys:
            cls = option_kind(type_name, key)
            effect = kind.rebuild_effects.get(key, _OPTION_EFFECT[cls])
            rows.append(f"| `Backend.{key}` ({type_name}) | {cls} | {effect} |")
    return "\n".join(rows) + "\n"
