"""Retry policy for store calls: capped, jittered exponential backoff (tenacity).

Only the errors named in `retry_on` (by default StoreUnavailable) are retried;
everything else (LeaseLost, StoreAuthError, ...) propagates at once. `on_retry` is told of
every failed attempt so the caller can keep metrics and log a state change
once, never a line per attempt.
"""

from __future__ import annotations

from collections.abc import Callable

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, wait_random_exponential

from leaseagent.errors import StoreUnavailable


def store_retrying(
    *,
    cap: float = 5.0,
    first: float = 0.1,
    on_retry: Callable[[BaseException], None] | None = None,
    retry_on: tuple[type[BaseException], ...] = (StoreUnavailable,),
) -> AsyncRetrying:
    """Retry `retry_on` errors forever with jittered backoff from ~first up to cap seconds."""

    def before_sleep(state: RetryCallState) -> None:
        if on_retry is not None and state.outcome is not None:
            exc = state.outcome.exception()
            if exc is not None:
                on_retry(exc)

    return AsyncRetrying(
        retry=retry_if_exception_type(retry_on),
        wait=wait_random_exponential(multiplier=first, max=cap),
        before_sleep=before_sleep,
        reraise=True,
    )
