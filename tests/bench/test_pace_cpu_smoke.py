"""bench.pace_cpu at reduced size: it judges the listing, joins and removes every peer on
the fake kernel (the bench itself checks the 3n objects, then none, and exits non-zero
otherwise) and prints a CPU figure per part and size. Run as `python -m bench.pace_cpu`,
as documented.

No timing is asserted; docs/benchmarks.md, "Join and mass removal at 500-5,000 peers",
has the figures.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_cpu_bench_runs_checks_and_prints_each_part() -> None:
    done = subprocess.run([sys.executable, "-m", "bench.pace_cpu", "--peers", "20,60",
                           "--repeats", "1"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    rows = [line.split() for line in done.stdout.splitlines() if re.match(r"\s*\d+\s", line)]
    assert [row[0] for row in rows] == ["20", "60"], done.stdout
    for row in rows:
        figures = re.findall(r"([\d.]+) us", " ".join(row))
        assert len(figures) == 4 and all(float(f) > 0 for f in figures), row


def test_the_cpu_bench_refuses_a_size_beyond_its_network() -> None:
    done = subprocess.run([sys.executable, "-m", "bench.pace_cpu", "--peers", "40000"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "--peers" in done.stderr
