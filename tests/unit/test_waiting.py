"""leaseagent.waiting.within: a deadline that never loses a cancellation."""

from __future__ import annotations

import asyncio

import pytest

from leaseagent.waiting import within


async def test_a_cancel_in_the_iteration_the_wait_completes_stops_the_loop() -> None:
    """The agent's stop hung this way: its lease-holding loop was cancelled just as its
    own event arrived, and asyncio.wait_for (Python 3.11) returned the event instead."""
    woken = asyncio.Event()
    rounds = 0

    async def loop() -> None:
        nonlocal rounds
        while True:
            await within(woken.wait(), 10)
            woken.clear()
            rounds += 1

    task = asyncio.ensure_future(loop())
    await asyncio.sleep(0)  # the loop waits
    woken.set()             # its wait completes in the next iteration ...
    task.cancel()           # ... which is also where the cancellation arrives
    done, _ = await asyncio.wait([task], timeout=2)
    assert done, "the cancelled loop is still running"
    assert task.cancelled()


async def test_the_result_or_a_timeout() -> None:
    async def answer() -> int:
        await asyncio.sleep(0)
        return 42

    assert await within(answer(), 1) == 42
    assert await within(answer(), None) == 42
    with pytest.raises(TimeoutError):
        await within(asyncio.Event().wait(), 0.01)
