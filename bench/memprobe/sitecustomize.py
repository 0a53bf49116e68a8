"""Where an agent's memory is, read from inside it while a benchmark runs (measurement
only; docs/benchmarks.md, "Memory at 5,000 peers" and "Soak (no leak)").

Python imports `sitecustomize` at start when it is on the path, so

    MEMPROBE_DIR=/tmp/probe PYTHONPATH=bench/memprobe python -m bench.soak ...

makes every agent the benchmark starts (`python -m leaseagent.agent`, which inherits
the environment; other interpreters are left alone) write, every
MEMPROBE_EVERY seconds (default 60), into that directory, as PID-N.*: its
/proc status and smaps_rollup with the gc's object count (.txt), pymalloc's arenas and
blocks (`sys._debugmallocstats()`, .malloc), glibc's arenas (`malloc_info`, .minfo) and
its mappings by resident size (.smaps). Nothing of the agent is changed; the probe's
thread and reads add ~1 MiB of their own. With MEMPROBE_TRACE=N the agent runs under
tracemalloc (N frames; slower and larger) and each sample also writes its live Python
allocations (a `tracemalloc` snapshot, .trace): two agents' snapshots compared line by
line say where the bytes a peer costs are. With MEMPROBE_DROP_TEXT=S the agent's
libraries' code pages leave its RSS once, S seconds after its start (`drop_text`): what
comes back after that is the code it still runs (docs/benchmarks.md, "Issue 25, second
round").
"""

from __future__ import annotations

import os
import sys

_DIR = os.environ.get("MEMPROBE_DIR")


def _probe(out: str, every: float) -> None:
    import ctypes
    import gc
    import time
    import tracemalloc

    libc = ctypes.CDLL(None)
    libc.fopen.restype = ctypes.c_void_p
    n = 0
    while True:
        time.sleep(every)
        n += 1
        base = f"{out}/{os.getpid()}-{n:04d}"
        with open("/proc/self/status") as f:
            status = f.read()
        with open("/proc/self/smaps_rollup") as f:
            rollup = f.read()
        if tracemalloc.is_tracing():
            tracemalloc.take_snapshot().dump(base + ".trace")
        with open(base + ".txt", "w") as f:
            f.write(f"time {time.time()}\nobjects {len(gc.get_objects())}\n{status}{rollup}")
        saved = os.dup(2)  # _debugmallocstats writes to the C stderr
        try:
            with open(base + ".malloc", "w") as f:
                os.dup2(f.fileno(), 2)
                sys._debugmallocstats()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        fp = libc.fopen((base + ".minfo").encode(), b"w")
        if fp:
            libc.malloc_info(0, ctypes.c_void_p(fp))
            libc.fclose(ctypes.c_void_p(fp))
        mappings: list[tuple[int, str, str]] = []
        with open("/proc/self/smaps") as f:
            for line in f:
                parts = line.split()
                if parts and "-" in parts[0] and not parts[0].endswith(":"):
                    name = parts[5] if len(parts) >= 6 else "[anon]"
                    mappings.append((0, name, parts[0]))
                elif parts and parts[0] == "Rss:" and mappings:
                    _, name, span = mappings[-1]
                    mappings[-1] = (int(parts[1]), name, span)
        with open(base + ".smaps", "w") as f:
            f.writelines(f"{kib:8d} {name} {span}\n"
                         for kib, name, span in sorted(mappings, reverse=True) if kib)


def drop_text(out: str, after: float) -> None:
    """Drop the pages of the process's code mappings (private, read and execute, of a
    file, none of their pages copied: `Anonymous: 0 kB`) from its page table, once:
    MADV_DONTNEED on such a mapping discards nothing, its pages stay in the page cache
    and come back on the next use. For a measurement only."""
    import ctypes
    import time

    time.sleep(after)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madv_dontneed = 4

    def rss_file() -> str:
        with open("/proc/self/status") as f:
            return next(line.split()[1] for line in f if line.startswith("RssFile:"))

    code: list[tuple[int, int]] = []
    span: str | None = None  # the current mapping's range, if it is a file's code
    with open("/proc/self/smaps") as f:
        for line in f:
            parts = line.split()
            if parts and "-" in parts[0] and not parts[0].endswith(":"):
                is_code = len(parts) >= 6 and parts[1] == "r-xp" and parts[5].startswith("/")
                span = parts[0] if is_code else None
            elif span is not None and parts[:1] == ["Anonymous:"] and parts[1] == "0":
                start, end = span.split("-")
                code.append((int(start, 16), int(end, 16)))
    before = rss_file()
    dropped = sum(libc.madvise(a, b - a, madv_dontneed) == 0 for a, b in code)
    with open(f"{out}/{os.getpid()}-droptext.txt", "w") as f:
        f.write(f"time {time.time()}\ncode mappings {len(code)}, dropped {dropped}\n"
                f"RssFile {before} -> {rss_file()} kB\n")


if _DIR and "leaseagent.agent" in sys.orig_argv:
    import threading

    if os.environ.get("MEMPROBE_TRACE"):
        import tracemalloc

        tracemalloc.start(int(os.environ["MEMPROBE_TRACE"]))

    threading.Thread(target=_probe, name="memprobe", daemon=True,
                     args=(_DIR, float(os.environ.get("MEMPROBE_EVERY", "60")))).start()
    if os.environ.get("MEMPROBE_DROP_TEXT"):
        threading.Thread(target=drop_text, name="memprobe-text", daemon=True,
                         args=(_DIR, float(os.environ["MEMPROBE_DROP_TEXT"]))).start()
