"""Logging set-up (text or JSON lines) and a helper that logs state changes only once.

The agent logs one line per state change (lease acquired/lost, etcd up/down,
peer added/removed, drift repaired), never one per retry attempt:
`StateLog.set(topic, state, msg)` logs only when `state` differs from the
last state logged for `topic`, and hands the line to `on_change` (the agent
sends it to systemd as STATUS=, so `systemctl status` says what it waits for).

Every text line is one line whatever it holds: the message is escaped
(leaseagent.core.escaping), so a key name or NodeID from etcd with a newline
or an ESC in it cannot forge a line or drive the reader's terminal. JSON
lines are escaped by json.dumps.

JSON lines carry this host's identity as fields (`public_ip`, `node_id`,
`subnet`) once known (`set_context`), so a log pipeline can select a host
without parsing messages.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable
from typing import Any

from leaseagent.core.escaping import escaped

# Fields every JSON line carries once known (this host's identity and subnet).
_CONTEXT: dict[str, str] = {}


def set_context(**fields: object) -> None:
    """Add (or, with None, remove) fields every JSON log line carries."""
    for name, value in fields.items():
        if value is None:
            _CONTEXT.pop(name, None)
        else:
            _CONTEXT[name] = str(value)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            **_CONTEXT,
        }
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc)


class TextFormatter(logging.Formatter):
    """`time LEVEL message`, the message escaped (a traceback, ours, follows as is)."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = escaped(record.message)
        return super().formatMessage(record)


def setup_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter("%(asctime)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # etcd3aio logs a warning with a traceback per failed attempt; we report state changes.
    logging.getLogger("etcd3aio").setLevel(logging.CRITICAL)
    logging.getLogger("pyroute2").setLevel(logging.ERROR)


class StateLog:
    def __init__(self, logger: logging.Logger,
                 on_change: Callable[[str], object] | None = None) -> None:
        self._logger = logger
        self._on_change = on_change
        self._last: dict[str, object] = {}

    def get(self, topic: str) -> object:
        """The state last logged for `topic` (None if none was)."""
        return self._last.get(topic)

    def set(self, topic: str, state: object, msg: str, *args: object,
            level: int = logging.INFO) -> bool:
        if self._last.get(topic, object()) == state:
            return False
        self._last[topic] = state
        self._logger.log(level, msg, *args)
        if self._on_change is not None:
            self._on_change(msg % args if args else msg)
        return True
