"""JSON objects read the way Go's encoding/json fills a struct, as flanneld reads its config.

Pure: no I/O. flanneld decodes `<prefix>/config` with `json.Unmarshal` into
its `subnet.Config` struct, and each backend decodes the `Backend` object
into its own struct (pkg/subnet/config.go, pkg/backend/*). What that means
for a config, and what `struct_fields` reproduces:

- A key names a field when it equals the field's name (or its json tag)
  ignoring case: "vni", "VNI" and "Vni" all set VXLANConfig.VNI. Go folds
  case per rune (ToUpper of ToLower), so the Kelvin sign (U+212A) matches "k"
  and the long s (U+017F) matches "s".
- A key that names no field is ignored; a key given twice (or in two
  spellings) counts as the last one given.
- JSON null leaves a plain field (bool, number, string) as it was: its
  default. A field whose type has its own decoder (flannel's ip.IP4Net,
  ip.IP4) is handed "null" and refuses it; a pointer field becomes nil.
- Types are strict: a number given as a string, a string given as a number,
  a fraction or exponent for an integer field are decode errors, which stop
  flanneld; the callers (leaseagent.core.network, .backends) refuse them too.

`loads` keeps every object's members in order with duplicates
(`JsonObject`), which a Python dict would merge by exact spelling only.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any


class JsonObject(list[tuple[str, Any]]):
    """A JSON object's members, in the order given, duplicates kept."""


def loads(raw: bytes | str) -> Any:
    """`json.loads`, objects as JsonObject."""
    return json.loads(raw, object_pairs_hook=JsonObject)


def fold(name: str) -> str:
    """`name` as Go's encoding/json compares field names: each rune upper-cased after
    lower-casing (unicode.ToUpper(unicode.ToLower(r))), one rune for one."""
    out = []
    for char in name:
        if char.isascii():
            out.append(char.upper())
            continue
        low = char.lower()
        low = low if len(low) == 1 else char
        up = low.upper()
        out.append(up if len(up) == 1 else low)
    return "".join(out)


def is_object(value: object) -> bool:
    return isinstance(value, (JsonObject, Mapping))


def members(obj: JsonObject | Mapping[str, Any]) -> Iterable[tuple[str, Any]]:
    return obj if isinstance(obj, JsonObject) else obj.items()


def struct_fields(obj: JsonObject | Mapping[str, Any], names: Iterable[str]) -> dict[str, Any]:
    """The members of `obj` that set the fields `names` of a Go struct, under the
    field's own name: matched ignoring case, the last one given winning, any other
    key ignored. A null value is kept (None): what it does depends on the field."""
    by_fold = {fold(name): name for name in names}
    out: dict[str, Any] = {}
    for key, value in members(obj):
        name = by_fold.get(fold(key))
        if name is not None:
            out.pop(name, None)  # keep the order of the last one given
            out[name] = value
    return out


def plain(value: Any) -> Any:
    """`value` with every JsonObject made a dict (the last of duplicate keys kept)."""
    if isinstance(value, JsonObject):
        return {key: plain(item) for key, item in value}
    if isinstance(value, list):
        return [plain(item) for item in value]
    return value
