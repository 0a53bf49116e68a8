"""The one retry policy: capped, jittered exponential backoff (tenacity), bounds named once.

Every wait after a failure in the project comes from here: a store call
retried while etcd is away (`retrying`), a watch stream resumed, a lost
listing taken again, a data-plane resync or a netlink socket retried
(`Backoff`, for loops that are not one call). The delay before attempt n is
uniform in [0, min(CAP, FIRST * 2^n)] (tenacity's wait_random_exponential,
"full jitter"): hosts that lost etcd together do not come back in step.

Only the errors named in `retry_on` (by default StoreUnavailable) are
retried; everything else (LeaseLost, StoreAuthError, ...) propagates at
once. `on_retry` is told of every failed attempt so the caller can keep
metrics and log a state change once, never a line per attempt.

A caller with a deadline of its own (the lease renewal: the TTL) names the
errors after which the next attempt goes at once (`at_once_after`: a
StoreTimeout has waited the timeout already). gRPC balances requests round
robin over the members, and a member paused with its connection open keeps
its turn: an attempt sent at once takes the next member's turn, where one
sent after the wait found what the failure set off meanwhile (etcd's health
probe, the listing when it answers) had taken the healthy members' turns,
and went back to the paused one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, wait_random_exponential

from leaseagent.errors import StoreUnavailable

FIRST_SECONDS = 0.1  # the scale of the first delay
CAP_SECONDS = 5.0  # no wait is longer


def retrying(
    *,
    cap: float = CAP_SECONDS,
    on_retry: Callable[[BaseException], None] | None = None,
    retry_on: tuple[type[BaseException], ...] = (StoreUnavailable,),
    at_once_after: tuple[type[BaseException], ...] = (),
) -> AsyncRetrying:
    """Retry `retry_on` errors forever (`async for attempt in retrying(): with attempt: ...`);
    after an error of `at_once_after` without a wait."""
    jitter = wait_random_exponential(multiplier=FIRST_SECONDS, max=cap)

    def wait(state: RetryCallState) -> float:
        if at_once_after and state.outcome is not None and isinstance(
                state.outcome.exception(), at_once_after):
            return 0.0
        return float(jitter(state))

    def before_sleep(state: RetryCallState) -> None:
        if on_retry is not None and state.outcome is not None:
            exc = state.outcome.exception()
            if exc is not None:
                on_retry(exc)

    return AsyncRetrying(
        retry=retry_if_exception_type(retry_on),
        wait=wait,
        before_sleep=before_sleep,
        reraise=True,
    )


@dataclass
class _Attempt:
    """What tenacity's wait strategies read of a retry state."""

    attempt_number: int


class Backoff:
    """The same policy for a loop that is not one call: `await backoff.sleep()` after
    each failure, `backoff.reset()` after a success."""

    def __init__(self, *, cap: float = CAP_SECONDS) -> None:
        self._wait = wait_random_exponential(multiplier=FIRST_SECONDS, max=cap)
        self.failures = 0

    def next_delay(self) -> float:
        self.failures += 1
        return float(self._wait(_Attempt(self.failures)))  # type: ignore[arg-type]

    async def sleep(self) -> float:
        delay = self.next_delay()
        await asyncio.sleep(delay)
        return delay

    def reset(self) -> None:
        self.failures = 0
