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
thread and reads add ~1 MiB of their own.
"""

from __future__ import annotations

import os
import sys

_DIR = os.environ.get("MEMPROBE_DIR")


def _probe(out: str, every: float) -> None:
    import ctypes
    import gc
    import time

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


if _DIR and "leaseagent.agent" in sys.orig_argv:
    import threading

    threading.Thread(target=_probe, name="memprobe", daemon=True,
                     args=(_DIR, float(os.environ.get("MEMPROBE_EVERY", "60")))).start()
