"""The `leaseagent_asyncio_tasks` gauge: the tasks of the loop that scrapes, counted at
each scrape (the soak benchmark watches it for leaks); absent outside a running loop."""

from __future__ import annotations

import asyncio

from prometheus_client.exposition import generate_latest

from leaseagent.metrics import Metrics


def _tasks(metrics: Metrics) -> float | None:
    for line in generate_latest(metrics.registry).decode().splitlines():
        if line.startswith("leaseagent_asyncio_tasks "):
            return float(line.split()[1])
    return None


def test_counts_the_running_loops_tasks() -> None:
    metrics = Metrics()

    async def scrape() -> tuple[float | None, float | None]:
        before = _tasks(metrics)
        parked = [asyncio.ensure_future(asyncio.Event().wait()) for _ in range(3)]
        await asyncio.sleep(0)
        during = _tasks(metrics)
        for task in parked:
            task.cancel()
        await asyncio.gather(*parked, return_exceptions=True)
        return before, during

    before, during = asyncio.run(scrape())
    assert before is not None and during == before + 3


def test_absent_outside_a_loop() -> None:
    assert _tasks(Metrics()) is None
