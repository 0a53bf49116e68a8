"""Data-plane backends, registered explicitly in BACKENDS (no import side effects)."""

from __future__ import annotations

from collections.abc import Callable

from leaseagent.dataplane.alloc import AllocBackend
from leaseagent.dataplane.base import DataPlane, DataPlaneSettings

BACKENDS: dict[str, Callable[[DataPlaneSettings], DataPlane]] = {
    "alloc": AllocBackend,
}
