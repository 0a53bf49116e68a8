"""`leaseagent`: the command line entry point of the daemon.

Exit status: 0 after SIGTERM/SIGINT; 2 for a configuration error (flag,
variable, unreadable file); 1 for a fatal runtime error (range exhausted,
etcd refused our credentials, a task died). Errors are one line on stderr,
never a traceback.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import sys
from collections.abc import Callable

from leaseagent.agent.daemon import Agent, preflight
from leaseagent.agent.logs import setup_logging
from leaseagent.config import AgentConfig, parse_agent_config, unknown_variables
from leaseagent.errors import ConfigError, LeaseagentError
from leaseagent.metrics import Metrics
from leaseagent.store.etcd import EtcdStore

log = logging.getLogger("leaseagent")


async def serve(cfg: AgentConfig) -> None:
    host = await preflight(cfg)  # local checks first: a bad flag is exit 2 with etcd down too
    store = await EtcdStore.connect(cfg.etcd)
    agent = Agent(cfg, store, host=host)
    latency = agent.metrics.etcd_request_seconds
    store.observer = lambda op, seconds: latency.labels(operation=op).observe(seconds)
    store.on_member = _endpoint_tracker(store, agent.metrics)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    metrics_server = None
    try:
        if cfg.metrics_addr is not None:
            from leaseagent.agent.http import serve_metrics

            try:
                metrics_server = await serve_metrics(agent, *cfg.metrics_addr)
            except OSError as exc:
                address, port = cfg.metrics_addr
                raise ConfigError(f"--metrics-addr {address}:{port}: cannot listen: "
                                  f"{exc.strerror or exc}") from None
        settle_heap()
        await agent.run(stop)
    finally:
        await agent.shutdown()
        if metrics_server is not None:
            metrics_server.close()
        await store.close()


# The youngest generation's threshold (Python's default 700): a join or a mass removal of
# thousands of peers makes and keeps hundreds of thousands of objects in one burst, and
# each survivor was traversed again at every young collection (docs/benchmarks.md, "Join
# and mass removal at 500-5,000 peers"). Cyclic garbage waits for at most this many
# more allocations.
GC_YOUNG_THRESHOLD = 7000


def settle_heap() -> None:
    """Once started (modules imported, the store connected): what exists now lives as long
    as the process, so the cyclic collector stops traversing it (`gc.freeze`: it is still
    freed by its reference count), and young collections come ten times less often."""
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)


def _endpoint_tracker(store: EtcdStore, metrics: Metrics) -> Callable[[int], None]:
    """Keep leaseagent_etcd_endpoint_info on the member answering us (looked up once per change)."""
    names: dict[int, str] = {}
    pending: set[asyncio.Task[None]] = set()

    async def show(member: int) -> None:
        if member not in names:
            try:
                names.update(await store.member_endpoints())
            except LeaseagentError:
                return  # shown at the next change
        if store.member_id == member:
            metrics.etcd_endpoint.clear()
            metrics.etcd_endpoint.labels(endpoint=names.get(member, "?"),
                                         member=f"{member:x}").set(1)

    def changed(member: int) -> None:
        task = asyncio.get_running_loop().create_task(show(member))
        pending.add(task)
        task.add_done_callback(pending.discard)

    return changed


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    try:
        cfg = parse_agent_config(args)
    except ConfigError as exc:
        print(f"leaseagent: error: {exc}", file=sys.stderr)
        return 2
    for warning in unknown_variables(os.environ):
        print(f"leaseagent: warning: {warning}", file=sys.stderr)
    setup_logging(cfg.log_level, cfg.log_format)
    try:
        asyncio.run(serve(cfg))
    except ConfigError as exc:
        log.error("configuration error: %s", exc)
        return 2
    except LeaseagentError as exc:
        log.error("fatal: %s", exc)
        return 1
    except RuntimeError as exc:
        log.error("fatal: %s", exc)
        return 1
    except KeyboardInterrupt:
        return 0
    except Exception as exc:
        # Nothing should get here; if it does, one line (the traceback at debug level).
        log.error("fatal: unexpected %s: %s", type(exc).__name__, exc)
        log.debug("traceback", exc_info=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
