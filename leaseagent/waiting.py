"""Waiting with a deadline: `within`, the one way the package bounds an await.

`asyncio.wait_for` in Python 3.11 (which the package supports) loses a
cancellation that arrives in the loop iteration where the awaited thing
completes: it returns the result instead of raising CancelledError
(python/cpython gh-86296, fixed in 3.12 by building wait_for on
asyncio.timeout). A loop that waits with it (an event, a queue) and is
cancelled then carries on as if nothing happened, and whoever cancelled it
waits for it forever: an agent told to stop at the moment its own lease
event arrived never finished stopping. `asyncio.timeout` keeps the
cancellation. ruff bans asyncio.wait_for in the package (pyproject.toml).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


async def within(awaitable: Awaitable[T], seconds: float | None) -> T:
    """`await awaitable`, raising TimeoutError after `seconds` (None: no deadline);
    a cancellation is never lost."""
    async with asyncio.timeout(seconds):
        return await awaitable
