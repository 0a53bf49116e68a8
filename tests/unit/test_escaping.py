"""Showing text from etcd: one line, nothing a terminal acts on, what is stored visible."""

from __future__ import annotations

import io
import logging

from hypothesis import given
from hypothesis import strategies as st

from leaseagent.agent.logs import TextFormatter
from leaseagent.cli.presenting import format_table, format_watch_line
from leaseagent.core.escaping import escaped, escaped_lines


def test_controls_are_escaped_and_printable_text_is_kept() -> None:
    assert escaped("host-1.example") == "host-1.example"
    assert escaped("nœud-Ω") == "nœud-Ω"  # a host name in any script stays readable
    assert escaped("a\nb\r\tc") == "a\\nb\\r\\tc"
    assert escaped("\x1b[2J\x07\x7f\x9b") == "\\x1b[2J\\x07\\x7f\\x9b"
    assert escaped("abc\u202edef\u2028") == "abc\\u202edef\\u2028"
    assert escaped("back\\n") == "back\\\\n"  # never mistaken for an escaped newline
    assert escaped(42) == "42"
    assert escaped_lines("{\n \"a\": \"\x1b\"\n}") == "{\n \"a\": \"\\x1b\"\n}"


@given(st.text())
def test_anything_comes_out_as_one_printable_line(text: str) -> None:
    out = escaped(text)
    assert out.isprintable()
    assert len(out.splitlines()) <= 1


def test_a_text_log_line_is_one_line_whatever_the_message_holds() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(TextFormatter("%(levelname)s %(message)s"))
    logger = logging.getLogger("test_escaping")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("skipping invalid lease %s: %s", "/k/10.5.1.0-24\nERROR forged\x1b[2J", "x")
    finally:
        logger.removeHandler(handler)
    assert stream.getvalue() == "WARNING skipping invalid lease /k/10.5.1.0-24\\nERROR forged\\x1b[2J: x\n"


def test_leasectl_tables_and_watch_lines_escape_every_cell() -> None:
    row = {"subnet": "10.5.1.0-24\nforged", "ipv6_subnet": None, "public_ip": "10.0.0.1",
           "public_ipv6": None, "backend": "vxlan\x1b[31m", "vtep_mac": None, "public_key": None,
           "node_id": "n\x1b]0;t\x07", "expires_in": 5, "reservation": False, "status": "invalid",
           "valid": False, "error": "key name '10.5.1.0-24\nforged' is bad"}
    table = format_table([row], wide=True)
    assert len(table.splitlines()) == 2
    assert "\x1b" not in table and "10.5.1.0-24\\nforged" in table and "n\\x1b]0;t\\x07" in table
    line = format_watch_line("added", row, when=0)
    assert "\n" not in line and "\x1b" not in line and "\x07" not in line
