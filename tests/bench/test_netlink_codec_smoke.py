"""bench.netlink_codec at reduced size: both codecs agree on every message (the bench
checks bytes and fields before timing, and exits non-zero if they differ) and it
prints a rate for each row. Run as `python -m bench.netlink_codec`, as documented.

No timing is asserted; docs/benchmarks.md, "Netlink codec", has the figures.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_codec_bench_runs_and_both_sides_agree() -> None:
    done = subprocess.run([sys.executable, "-m", "bench.netlink_codec", "--peers", "300",
                           "--repeats", "1"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stdout.splitlines() if re.search(r" x[\d.]+$", line)]
    assert len(rows) == 7, done.stdout
    for row in rows:
        rates = re.findall(r"(?:ours|pyroute2)\s+([\d,]+)", row)
        assert len(rates) == 2 and all(int(r.replace(",", "")) > 0 for r in rates), row
