"""No file of the repository keeps a merge's conflict markers.

A conflict resolved by hand in a page nobody imports (docs/architecture.md once
kept both sides for several sessions) breaks no other test, so this one looks.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PLACES = ("leaseagent", "docs", "tests", "bench", "deploy", "systemd", ".ci",
          "README.md", "pyproject.toml")
TEXT = {".py", ".md", ".toml", ".yml", ".yaml", ".sh", ".service", ".cfg", ".txt", ".json", ""}
MARKER = re.compile(r"^(?:<{7}|>{7})(?: |$)", re.M)


def files() -> list[Path]:
    found: list[Path] = []
    for place in PLACES:
        path = ROOT / place
        candidates = [path] if path.is_file() else sorted(path.rglob("*"))
        found += [p for p in candidates if p.is_file() and p.suffix in TEXT
                  and "__pycache__" not in p.parts]
    return found


def markers(text: str) -> list[int]:
    return [text.count("\n", 0, m.start()) + 1 for m in MARKER.finditer(text)]


def test_no_file_keeps_conflict_markers() -> None:
    found = {str(p.relative_to(ROOT)): lines for p in files()
             if (lines := markers(p.read_text(errors="replace")))}
    assert found == {}


def test_the_check_finds_markers() -> None:
    side = "<" * 7 + " HEAD\nours\n" + "=" * 7 + "\ntheirs\n" + ">" * 7 + " main\n"
    assert markers("intro\n" + side) == [2, 6]
    assert markers("a heading\n" + "=" * 7 + "\n") == []
