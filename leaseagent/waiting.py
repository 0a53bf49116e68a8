"""Waiting: `within`, the one way the package bounds an await, and `first_to_end`, the
one way it runs several things at once until the first of them ends.

`asyncio.wait_for` in Python 3.11 (which the package supports) loses a
cancellation that arrives in the loop iteration where the awaited thing
completes: it returns the result instead of raising CancelledError
(python/cpython gh-86296, fixed in 3.12 by building wait_for on
asyncio.timeout). A loop that waits with it (an event, a queue) and is
cancelled then carries on as if nothing happened, and whoever cancelled it
waits for it forever: an agent told to stop at the moment its own lease
event arrived never finished stopping. `asyncio.timeout` keeps the
cancellation. ruff bans asyncio.wait_for in the package (pyproject.toml).

`first_to_end` is structured: the tasks it starts never outlive the call, whether
one ends, one fails or the caller is cancelled; each left over is cancelled once
(a second cancel would cut short its own ending, e.g. reaping a child process) and
awaited. An error is never dropped for a result that ended in the same step.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any, TypeVar

T = TypeVar("T")


async def within(awaitable: Awaitable[T], seconds: float | None) -> T:
    """`await awaitable`, raising TimeoutError after `seconds` (None: no deadline);
    a cancellation is never lost."""
    async with asyncio.timeout(seconds):
        return await awaitable


async def first_to_end(*awaitables: Awaitable[Any]) -> tuple[int, Any]:
    """Run `awaitables` at once until the first ends: its position and its result, or
    its error raised. The others are cancelled and awaited before this returns; when
    several end in one step, an error wins over a result, then the earlier position.
    Cancelling the caller cancels them all (and waits for them)."""
    tasks = [asyncio.ensure_future(a) for a in awaitables]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        ended = [(i, t) for i, t in enumerate(tasks) if t.done()]
        failed = [(i, t) for i, t in ended if t.cancelled() or t.exception() is not None]
        index, task = (failed or ended)[0]
        return index, task.result()
    finally:
        for task in tasks:
            if not task.done():
                task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
