"""The backend type registry (core) and the implementations (data plane) agree."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address
from pathlib import Path

import pytest

from leaseagent.core.network import network_config_from_dict
from leaseagent.core.profiles import BACKEND_TYPES, backend_type
from leaseagent.core.rules import receive_ports
from leaseagent.dataplane import BACKENDS
from leaseagent.dataplane.base import DataPlaneSettings, DataPlaneStatus, HostInfo
from leaseagent.errors import NetworkConfigError


def test_every_backend_type_has_an_implementation_and_the_reverse() -> None:
    assert set(BACKEND_TYPES) == set(BACKENDS)


def test_an_unknown_type_names_the_supported_ones() -> None:
    with pytest.raises(NetworkConfigError) as err:
        backend_type("udp")
    assert str(err.value) == "Backend.Type='udp': not supported (supported: alloc, host-gw, vxlan, wireguard)"


def test_every_registered_backend_builds_a_data_plane_of_its_type(tmp_path: Path) -> None:
    for name in BACKENDS:
        network = network_config_from_dict({"Network": "10.5.0.0/16", "Backend": {"Type": name}})
        settings = DataPlaneSettings(network=network, host=HostInfo(IPv4Address("127.0.0.1")),
                                     state_dir=tmp_path)
        backend = BACKENDS[name](settings)
        # Each name builds its own backend (VxlanBackend for "vxlan", HostGwBackend ...).
        assert type(backend).__name__.lower() == name.replace("-", "") + "backend", name
        assert isinstance(backend.status, DataPlaneStatus), name


@pytest.mark.parametrize(("backend", "ports"), [
    ({"Type": "vxlan"}, (8472,)),
    ({"Type": "vxlan", "Port": 0}, (8472,)),
    ({"Type": "vxlan", "Port": 4789}, (4789,)),
    ({"Type": "host-gw"}, ()),
    ({"Type": "wireguard"}, ()),
    ({"Type": "alloc"}, ()),
])
def test_only_vxlan_needs_a_peer_filter(backend: dict[str, object], ports: tuple[int, ...],
                                        tmp_path: Path) -> None:
    """The ports the peer filter guards are those of the backend's devices (the agent's
    Plane.filter_ports, doctor's check), dual-stack's second device on the same one."""
    network = network_config_from_dict({"Network": "10.5.0.0/16", "IPv6Network": "fd05::/48",
                                        "Backend": backend})
    settings = DataPlaneSettings(network=network, host=HostInfo(
        IPv4Address("127.0.0.1"), public_ipv6=IPv6Address("fd00::1")), state_dir=tmp_path)
    assert receive_ports(BACKENDS[network.backend_type](settings).spec(None, {}).devices) == ports
