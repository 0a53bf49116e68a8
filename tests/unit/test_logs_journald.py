"""Log lines under journald: no time of their own (the journal stamps each line), the
syslog priority in front so journald files each line at its level; elsewhere the
usual `time LEVEL message`. "Under journald" is what systemd says: $JOURNAL_STREAM
holds the device and inode of the stderr it connected, checked against the stream."""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest

from leaseagent.agent.logs import setup_logging, under_journald

TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d")


@pytest.fixture
def stream(tmp_path: Path) -> Iterator[IO[str]]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    with (tmp_path / "stderr").open("w+") as f:
        yield f
    root.handlers[:] = handlers
    root.setLevel(level)


def journal_stream_of(stream: IO[str]) -> str:
    st = os.fstat(stream.fileno())
    return f"{st.st_dev}:{st.st_ino}"


def logged(stream: IO[str]) -> list[str]:
    log = logging.getLogger("leaseagent.test")
    log.debug("debug line")
    log.info("lease held: %s", "10.5.34.0/24")
    log.warning("etcd unreachable")
    log.error("traffic rules cannot be applied")
    stream.flush()
    stream.seek(0)
    return stream.read().splitlines()


def test_under_journald_one_timestamp_per_line_and_the_syslog_priority(stream: IO[str]) -> None:
    setup_logging("debug", "text", stream=stream,
                  environ={"JOURNAL_STREAM": journal_stream_of(stream)})
    assert logged(stream) == ["<7>DEBUG debug line", "<6>INFO lease held: 10.5.34.0/24",
                              "<4>WARNING etcd unreachable",
                              "<3>ERROR traffic rules cannot be applied"]


def test_a_traceback_under_journald_has_the_priority_on_every_line(stream: IO[str]) -> None:
    setup_logging("info", "text", stream=stream,
                  environ={"JOURNAL_STREAM": journal_stream_of(stream)})
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("leaseagent.test").error("failed", exc_info=True)
    stream.seek(0)
    lines = stream.read().splitlines()
    assert len(lines) > 2 and all(line.startswith("<3>") for line in lines), lines


def test_json_under_journald_keeps_its_fields_behind_the_priority(stream: IO[str]) -> None:
    setup_logging("info", "json", stream=stream,
                  environ={"JOURNAL_STREAM": journal_stream_of(stream)})
    lines = logged(stream)
    assert [line[:3] for line in lines] == ["<6>", "<4>", "<3>"]
    assert json.loads(lines[0][3:])["msg"] == "lease held: 10.5.34.0/24"


@pytest.mark.parametrize("environ", [{}, {"JOURNAL_STREAM": "1:2"}, {"JOURNAL_STREAM": "junk"}],
                         ids=["not-set", "another-stream", "malformed"])
def test_elsewhere_the_line_carries_its_time(stream: IO[str], environ: dict[str, str]) -> None:
    """Not under journald, or stderr redirected away from the journal's stream since."""
    assert not under_journald(stream, environ)
    setup_logging("info", "text", stream=stream, environ=environ)
    lines = logged(stream)
    assert len(lines) == 3
    for line, level in zip(lines, ("INFO", "WARNING", "ERROR"), strict=True):
        assert TIMESTAMP.match(line) and f" {level} " in line and not line.startswith("<"), line
