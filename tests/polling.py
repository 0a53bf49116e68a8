"""Waiting for a condition in tests, and timing how long it took."""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_for(check: Callable[[], bool], *, timeout: float, what: str,
             every: float = 0.02) -> float:
    """Seconds until check() holds, polled every `every` s; AssertionError after `timeout`."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if check():
            return time.monotonic() - started
        time.sleep(every)
    raise AssertionError(f"not within {timeout}s: {what}")
