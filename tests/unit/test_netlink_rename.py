"""`Netlink.rename_link` on a kernel before 6.2, which renames only a device that is down
(EBUSY for a running one): set down, renamed, set up again. The kernel's side is a
recorder of the requests (the real rename of a running device is in
tests/contract/test_reconciler_contract.py)."""

from __future__ import annotations

import errno
import os

import pytest

from leaseagent.dataplane import rtnl
from leaseagent.dataplane.netlink import Netlink
from leaseagent.errors import DataPlaneError


class Kernel:
    """Answers RTM_NEWLINK renames with `refuse` while the link is up, records all."""

    def __init__(self, refuse: int = 0) -> None:
        self.refuse = refuse
        self.up = True
        self.done: list[str] = []

    async def _call(self, kind: int, flags: int, body: bytes) -> None:
        assert kind == rtnl.RTM_NEWLINK and body == rtnl.link_request(index=7, name="flaside.1")
        if self.refuse and (self.up or self.refuse != errno.EBUSY):
            self.done.append("refused")
            raise OSError(self.refuse, os.strerror(self.refuse))
        self.done.append("renamed")

    async def set_link(self, index: int, *, up: bool | None = None) -> None:
        assert index == 7 and up is not None
        self.up = up
        self.done.append("up" if up else "down")


async def test_a_running_device_is_renamed_in_one_request() -> None:
    kernel = Kernel()
    await Netlink.rename_link(kernel, 7, "flaside.1")  # type: ignore[arg-type]
    assert kernel.done == ["renamed"]


async def test_a_kernel_that_renames_only_a_device_down_has_it_down_for_the_rename(
        caplog: pytest.LogCaptureFixture) -> None:
    kernel = Kernel(refuse=errno.EBUSY)
    await Netlink.rename_link(kernel, 7, "flaside.1")  # type: ignore[arg-type]
    assert kernel.done == ["refused", "down", "renamed", "up"]
    assert "renames only a device that is down" in caplog.text


async def test_another_refusal_is_an_error_and_leaves_the_device_up() -> None:
    kernel = Kernel(refuse=errno.EEXIST)
    with pytest.raises(DataPlaneError, match=os.strerror(errno.EEXIST)):
        await Netlink.rename_link(kernel, 7, "flaside.1")  # type: ignore[arg-type]
    assert kernel.done == ["refused"] and kernel.up
