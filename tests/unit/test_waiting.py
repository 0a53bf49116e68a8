"""leaseagent.waiting: a deadline that never loses a cancellation; the first to end wins."""

from __future__ import annotations

import asyncio

import pytest

from leaseagent.waiting import first_to_end, within


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


class Loop:
    """A task body that records whether it was cancelled and finished its cleanup."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.cancelled = False
        self.cleaned_up = False

    async def forever(self) -> None:
        self.started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        finally:
            await asyncio.sleep(0)  # a cleanup that itself awaits (e.g. reaping a process)
            self.cleaned_up = True


async def test_first_to_end_returns_the_winner_after_the_others_are_cancelled_and_awaited() -> None:
    a, b = Loop(), Loop()

    async def answer() -> str:
        await a.started.wait()
        await b.started.wait()
        return "done"

    assert await first_to_end(a.forever(), answer(), b.forever()) == (1, "done")
    assert a.cancelled and a.cleaned_up
    assert b.cancelled and b.cleaned_up


async def test_first_to_end_raises_the_first_error_and_cancels_the_rest() -> None:
    other = Loop()

    async def fails() -> None:
        await other.started.wait()
        raise ValueError("broken")

    with pytest.raises(ValueError, match="broken"):
        await first_to_end(other.forever(), fails())
    assert other.cancelled and other.cleaned_up


async def test_first_to_end_prefers_an_error_and_then_the_earlier_position_in_one_step() -> None:
    async def value(v: int) -> int:
        return v

    async def fails() -> int:
        raise ValueError("lost?")

    assert await first_to_end(value(1), value(2)) == (0, 1)
    with pytest.raises(ValueError, match="lost"):
        await first_to_end(value(1), fails())


async def test_cancelling_the_caller_cancels_and_awaits_every_task() -> None:
    loops = [Loop(), Loop(), Loop()]
    caller = asyncio.ensure_future(first_to_end(*(lp.forever() for lp in loops)))
    for lp in loops:
        await lp.started.wait()
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    assert all(lp.cancelled and lp.cleaned_up for lp in loops)

