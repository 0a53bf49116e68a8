"""Waiting for a condition in tests, and timing how long it took."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_value(check: Callable[[], T | None], *, timeout: float, what: str,
               every: float = 0.02) -> T:
    """check()'s first truthy value, polled every `every` s; AssertionError after `timeout`
    (check() is asked once more at the deadline, so a slow check still gets its last say)."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        time.sleep(every)


def wait_for(check: Callable[[], bool], *, timeout: float, what: str,
             every: float = 0.02) -> float:
    """Seconds until check() holds, polled every `every` s; AssertionError after `timeout`."""
    started = time.monotonic()
    wait_value(check, timeout=timeout, what=what, every=every)
    return time.monotonic() - started
