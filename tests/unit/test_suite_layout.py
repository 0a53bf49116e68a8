"""The suite's own layout: pytest (rootdir import mode) imports each test file
under its basename, so two files of one name in different folders stop the
whole run at collection ("import file mismatch") - after a clean checkout
only, since a stale __pycache__ hides it."""

from collections import defaultdict
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent


def test_test_file_basenames_are_unique():
    where: dict[str, list[str]] = defaultdict(list)
    for path in TESTS.rglob("test_*.py"):
        where[path.name].append(str(path.relative_to(TESTS)))
    twice = {name: paths for name, paths in where.items() if len(paths) > 1}
    assert not twice, f"test files sharing a basename: {twice}"
