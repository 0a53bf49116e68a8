"""bench/memprobe (docs/benchmarks.md, "Memory at 5,000 peers"): an agent started with
it on PYTHONPATH writes its memory samples; any other interpreter writes none. The
agent here is given no etcd endpoint, so it stops after its imports (exit status 2);
a sample every 20 ms is taken meanwhile."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run(args: list[str], out: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "bench" / "memprobe"), MEMPROBE_DIR=str(out),
               MEMPROBE_EVERY="0.02")
    subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, timeout=60)


def test_an_agent_writes_its_samples(tmp_path: Path) -> None:
    _run(["-m", "leaseagent.agent", "--etcd-endpoints", ""], tmp_path)
    texts = sorted(tmp_path.glob("*.txt"))
    assert texts, "no sample written"
    first = texts[0].with_suffix("")
    assert re.search(r"^VmRSS:\s+\d+ kB$", texts[0].read_text(), re.M)
    assert "# arenas allocated current" in first.with_suffix(".malloc").read_text()
    assert "<malloc version=" in first.with_suffix(".minfo").read_text()
    assert re.search(r"^\s*\d+ \S+ [0-9a-f]+-[0-9a-f]+$", first.with_suffix(".smaps").read_text(),
                     re.M)


def test_another_interpreter_writes_none(tmp_path: Path) -> None:
    _run(["-c", "import time; time.sleep(0.3)"], tmp_path)
    assert list(tmp_path.iterdir()) == []
