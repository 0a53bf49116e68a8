"""The agent's supervised tasks: each runs for ever; the first to fail or end stops the
agent (its error says which), and a config change replaces some of them meanwhile."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any, NoReturn

from leaseagent.errors import ConfigError


class Tasks:
    def __init__(self) -> None:
        self._tasks: dict[asyncio.Task[None], str] = {}  # the running ones, by name
        self._changed = asyncio.Event()

    def spawn(self, name: str, coro: Awaitable[None]) -> None:
        """Run `coro` as the supervised task `name`."""
        self._tasks[asyncio.ensure_future(coro)] = name
        self._changed.set()

    async def stop(self, name: str) -> None:
        """Stop the task `name` (if it runs) on purpose: no failure."""
        for task, task_name in list(self._tasks.items()):
            if task_name == name:
                del self._tasks[task]
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    async def failure(self) -> NoReturn:
        """Raise as soon as a task fails or ends (the set of tasks may change meanwhile):
        a ConfigError as it is (a setting to fix: exit 2), anything else as a
        RuntimeError that names the task."""
        while True:
            self._changed.clear()
            changed = asyncio.ensure_future(self._changed.wait())
            waiting: set[asyncio.Future[Any]] = {changed, *self._tasks}
            try:
                await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            finally:
                changed.cancel()
            self._check()

    def _check(self) -> None:
        for task, name in self._tasks.items():
            if task.done() and not task.cancelled():
                exc = task.exception()
                if isinstance(exc, ConfigError):
                    raise exc  # a setting to fix (a password changed in etcd): exit 2
                if exc is not None:
                    raise RuntimeError(f"task {name} failed: {exc}") from exc
                raise RuntimeError(f"task {name} ended unexpectedly")

    async def cancel_all(self) -> None:
        """Stop every task (the agent stops)."""
        tasks = list(self._tasks)
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
