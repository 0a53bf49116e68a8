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


def _run(args: list[str], out: Path, **extra: str) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "bench" / "memprobe"), MEMPROBE_DIR=str(out),
               MEMPROBE_EVERY="0.02", **extra)
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
    assert re.search(r"^mallinfo2 uordblks \d+ hblkhd \d+ fordblks \d+ arena \d+$",
                     texts[0].read_text(), re.M)


def test_object_types_on_request(tmp_path: Path) -> None:
    _run(["-m", "leaseagent.agent", "--etcd-endpoints", ""], tmp_path, MEMPROBE_TYPES="1")
    last = sorted(tmp_path.glob("*.types"))[-1].read_text().splitlines()
    assert any(line.split()[1:] == ["dict"] and int(line.split()[0]) > 0 for line in last), last


def test_holders_counted_by_kind_and_container(tmp_path: Path) -> None:
    # Five objects in one list that a dict holds, one more in a set: the holders say so.
    code = ("import sys, sitecustomize\n"
            "class Thing: pass\n"
            "things = {'five': [Thing() for _ in range(5)], 'one': {Thing()}}\n"
            "sitecustomize._owners(sys.argv[1], 'Thing')\n")
    path = tmp_path / "owners"
    env = dict(os.environ, PYTHONPATH=str(ROOT / "bench" / "memprobe"))
    done = subprocess.run([sys.executable, "-c", code, str(path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    lines = path.read_text().splitlines()
    assert lines[0] == "6 of Thing, 0 unheld"
    assert "     5 held by ('list',)" in lines and "     1 held by ('set',)" in lines
    assert "     5 in a container of 5 held by [\"dict['five', 'one']\"]" in lines


def test_another_interpreter_writes_none(tmp_path: Path) -> None:
    _run(["-c", "import time; time.sleep(0.3)"], tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_code_pages_leave_the_rss_and_come_back_on_use(tmp_path: Path) -> None:
    # An interpreter that imported ssl (libcrypto's code) drops its code pages; it
    # runs on (its code read again from the page cache) and says its RssFile after.
    code = ("import hashlib, sys, sitecustomize; sitecustomize.drop_text(sys.argv[1], 0); "
            "print(hashlib.sha256(b'x').hexdigest()[:8], flush=True)")
    env = dict(os.environ, PYTHONPATH=str(ROOT / "bench" / "memprobe"))
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout == "2d711642\n", done.stderr
    (written,) = tmp_path.glob("*-droptext.txt")
    dropped = re.search(r"dropped (\d+)", written.read_text())
    rss = re.search(r"RssFile (\d+) -> (\d+) kB", written.read_text())
    assert dropped and int(dropped[1]) > 0
    assert rss and int(rss[2]) < int(rss[1]) - 1024  # at least 1 MiB of code pages left


def test_a_full_collection_and_what_it_found_on_request(tmp_path: Path) -> None:
    # 50 objects in reference cycles, the automatic collector off, then the probe (it
    # starts by itself in an agent only): its collection finds them, counts them by type
    # and names the largest containers.
    code = ("import gc, sys, threading, time, sitecustomize\ngc.disable()\n"
            "class Knot:\n    def __init__(self):\n        self.me = [self]\n"
            "for _ in range(50):\n    Knot()\nthreading.Thread(target=sitecustomize._probe, "
            "args=(sys.argv[1], 0.02), daemon=True).start()\ntime.sleep(0.5)\n")
    _run(["-c", code, str(tmp_path)], tmp_path, MEMPROBE_COLLECT="save")
    found = [f.read_text().splitlines() for f in sorted(tmp_path.glob("*.collected"))]
    assert found, "no collection written"
    knots = [lines for lines in found if "      50 Knot" in lines]
    assert knots, found[-1]
    assert int(knots[0][0]) >= 100  # the 50 knots and their 50 lists
    assert "      50 list" in knots[0]
    assert any(line.startswith("largest: [") and "(1, 'list')" in line for line in knots[0])
