"""The backend type registry (core) and the implementations (data plane) agree."""

from __future__ import annotations

import pytest

from leaseagent.core.backends import BACKEND_TYPES, backend_type
from leaseagent.dataplane import BACKENDS
from leaseagent.errors import NetworkConfigError


def test_every_backend_type_has_an_implementation_and_the_reverse() -> None:
    assert set(BACKEND_TYPES) == set(BACKENDS)


def test_an_unknown_type_names_the_supported_ones() -> None:
    with pytest.raises(NetworkConfigError) as err:
        backend_type("udp")
    assert str(err.value) == "Backend.Type='udp': not supported (supported: alloc, host-gw, vxlan, wireguard)"


def test_every_registered_backend_resolves_to_its_class() -> None:
    for name in BACKENDS:
        assert callable(BACKENDS[name]), name
