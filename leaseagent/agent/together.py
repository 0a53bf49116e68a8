"""Running a component's loops as one task: the first to end ends them all."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any


async def run_together(*loops: Coroutine[Any, Any, None]) -> None:
    """Run `loops` until one of them ends; its error (if any) is raised, the others are
    cancelled and awaited. Being cancelled cancels them all."""
    tasks = [asyncio.ensure_future(loop) for loop in loops]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            task.result()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
