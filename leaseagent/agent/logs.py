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

Under journald (systemd connected stderr to the journal: $JOURNAL_STREAM names
stderr's device and inode), a text line carries no time of its own: the journal
stamps every line, and two timestamps per line were noise. Every line then
starts with its syslog priority, `<3>` for ERROR, `<4>` WARNING, `<6>` INFO,
`<7>` DEBUG (sd-daemon(3)): journald strips it and files the line at that
level, so `journalctl -p warning` works. JSON lines keep their `ts` field (a
field, which pipelines read) and get the prefix too.

JSON lines carry this host's identity as fields (`public_ip`, `node_id`,
`subnet`) once known (`set_context`), so a log pipeline can select a host
without parsing messages.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Callable, Mapping
from typing import IO, Any

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


# Characters of a message shown in a text line: a key name from etcd may be a megabyte.
MESSAGE_LIMIT = 4096


class TextFormatter(logging.Formatter):
    """`time LEVEL message`, the message escaped (a traceback, ours, follows as is)."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = escaped(record.message, limit=MESSAGE_LIMIT)
        return super().formatMessage(record)


# Python's levels as syslog priorities (what journald reads from a `<N>` prefix).
SYSLOG_PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4,
                   logging.INFO: 6, logging.DEBUG: 7}


def under_journald(stream: IO[str], environ: Mapping[str, str]) -> bool:
    """True if `stream` is the journal's: $JOURNAL_STREAM is "<device>:<inode>" of the
    stream systemd connected (a stderr redirected elsewhere since does not match)."""
    device, _, inode = environ.get("JOURNAL_STREAM", "").partition(":")
    if not device.isdigit() or not inode.isdigit():
        return False
    try:
        stat = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return (stat.st_dev, stat.st_ino) == (int(device), int(inode))


class JournalFormatter(logging.Formatter):
    """Another formatter's lines, each with the record's syslog priority in front (every
    line of a traceback too: journald files each line as an entry of its own)."""

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self._inner = inner

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{SYSLOG_PRIORITY.get(record.levelno, 6)}>"
        return "\n".join(prefix + line for line in self._inner.format(record).split("\n"))


def setup_logging(level: str, fmt: str, *, stream: IO[str] | None = None,
                  environ: Mapping[str, str] | None = None) -> None:
    """The root logger to `stream` (stderr): text or JSON lines, in the journal's form
    under journald (see the module's docstring)."""
    stream = sys.stderr if stream is None else stream
    journal = under_journald(stream, os.environ if environ is None else environ)
    handler = logging.StreamHandler(stream)
    formatter: logging.Formatter
    if fmt == "json":
        formatter = JsonFormatter()
    elif journal:
        formatter = TextFormatter("%(levelname)s %(message)s")
    else:
        formatter = TextFormatter("%(asctime)s %(levelname)s %(message)s")
    handler.setFormatter(JournalFormatter(formatter) if journal else formatter)
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
