"""The WireGuard family lookup against the real kernel, in a namespace made here: a
CTRL_CMD_GETFAMILY by name is answered with the family's id (the controller's own,
"nlctrl", id 16, which every kernel has), a family that does not exist is ENOENT and
None, and "wireguard" is found exactly when the kernel has (or, asked so, loads) the
module; where it has none, as on the machine this was written on, None: the backend
then runs wireguard-go (tests/e2e/test_wireguard.py runs it end to end)."""

from __future__ import annotations

import asyncio
import os
import secrets
import subprocess
from collections.abc import Iterator

import pytest

from leaseagent.dataplane.wgnetlink import GENL_ID_CTRL, find_family
from leaseagent.lab import netns

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)")]


@pytest.fixture
def ns() -> Iterator[str]:
    made = netns.Namespaces()
    try:
        yield made.add(f"wgf{secrets.token_hex(3)}")
    finally:
        made.close()


def test_a_family_is_found_by_name(ns: str) -> None:
    assert asyncio.run(find_family(ns, name="nlctrl")) == GENL_ID_CTRL


def test_a_family_the_kernel_does_not_have_is_none(ns: str) -> None:
    assert asyncio.run(find_family(ns, name="leaseagent-none")) is None


def test_wireguard_is_found_exactly_when_the_kernel_has_the_module(ns: str) -> None:
    found = asyncio.run(find_family(ns))
    # Asked first: by name, the lookup itself loads an installed module. Then the
    # kernel's word on whether it has WireGuard at all: can a device of that kind be made
    # (rtnetlink would load the module too, so this cannot be what loaded it)?
    made = subprocess.run(["ip", "-n", ns, "link", "add", "wgprobe", "type", "wireguard"],
                          capture_output=True, text=True, check=False)
    assert (found is not None) == (made.returncode == 0), made.stderr
