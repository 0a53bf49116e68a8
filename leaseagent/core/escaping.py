"""Showing text that came from outside (etcd key names, NodeIDs, lease values) safely.

Anyone with write access to the prefix chooses key names and values. Printed
raw, a newline in a NodeID starts a forged log line, an ESC starts a terminal
control sequence (clear the screen, retitle the window, hide what follows), a
right-to-left override reorders what the operator reads. `escaped` makes
every such character visible as a backslash escape, in one line, so what is
shown is what is stored, and nothing stored can act on the reader.

Escaped: every character `str.isprintable` refuses (C0 and C1 controls, DEL,
line and paragraph separators, format characters such as U+202E, unassigned
and surrogate code points) as `\\n`, `\\r`, `\\t`, `\\xNN`, `\\uNNNN` or
`\\UNNNNNNNN`, and the backslash itself as `\\\\`, so an escape shown is never
ambiguous with text that looks like one. A key that is not UTF-8 is read with
surrogateescape (leaseagent.store.etcd): its odd bytes show as `\\udcNN`.
Long text can be cut (`limit`): a log line or a table cell stays readable
whatever length a key name has. Printable non-ASCII letters are kept
(a NodeID may be a host name in any script).

Used at every place such text reaches a person: the agent's text log lines
(the whole message, leaseagent.agent.logs) and its STATUS= line to systemd,
and leasectl's tables, watch lines, doctor's findings and error messages.
JSON output needs none: json.dumps escapes control characters itself.

Pure: no I/O.
"""

from __future__ import annotations

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\\": "\\\\"}


def _escape_char(char: str) -> str:
    named = _NAMED.get(char)
    if named is not None:
        return named
    if char.isprintable():
        return char
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def escaped(text: object, *, limit: int | None = None) -> str:
    """`text` (str() of it) in one line with nothing a terminal or a log reader acts on;
    with `limit`, at most that many characters of it and a note of how many more (a key
    name may be a megabyte long)."""
    string = text if isinstance(text, str) else str(text)
    more = 0
    if limit is not None and len(string) > limit:
        string, more = string[:limit], len(string) - limit
    if not (string.isprintable() and "\\" not in string):
        string = "".join(_escape_char(char) for char in string)
    return f"{string}... ({more} more characters)" if more else string


def escaped_lines(text: str) -> str:
    """Each line of `text` escaped, the line breaks kept: for a document of several
    lines (a stored config as it was written)."""
    return "\n".join(escaped(line) for line in text.split("\n"))
