"""Where an agent's memory is, read from inside it while a benchmark runs (measurement
only; docs/benchmarks.md, "Memory at 5,000 peers" and "Soak (no leak)").

Python imports `sitecustomize` at start when it is on the path, so

    MEMPROBE_DIR=/tmp/probe PYTHONPATH=bench/memprobe python -m bench.soak ...

makes every agent the benchmark starts (`python -m leaseagent.agent`, which inherits
the environment, or the soak's bare watch, `bench.soakwatch`; other interpreters are
left alone) write, every
MEMPROBE_EVERY seconds (default 60), into that directory, as PID-N.*: its
/proc status and smaps_rollup with the gc's object count (.txt), pymalloc's arenas and
blocks (`sys._debugmallocstats()`, .malloc), glibc's arenas (`malloc_info`, .minfo) and
its mappings by resident size (.smaps). Nothing of the agent is changed; the probe's
thread and reads add ~1 MiB of their own. With MEMPROBE_TRACE=N the agent runs under
tracemalloc (N frames; slower and larger) and each sample also writes its live Python
allocations (a `tracemalloc` snapshot, .trace): two agents' snapshots compared line by
line say where the bytes a peer costs are. Each .txt also has glibc's
`mallinfo2` (bytes in use in its heaps, small and mmapped, and free in them). With
MEMPROBE_TYPES=1 each sample counts the gc's objects by type (.types); with
MEMPROBE_OWNERS=TYPE it says who holds that type's live objects (.owners, `_owners`); with
MEMPROBE_COLLECT=1 it runs a full collection first (.collected: what it freed; this
changes the agent's memory, for a measurement of what is garbage only). With
MEMPROBE_DROP_TEXT=S the agent's
libraries' code pages leave its RSS once, S seconds after its start (`drop_text`): what
comes back after that is the code it still runs (docs/benchmarks.md, "Issue 25, second
round").
"""

from __future__ import annotations

import os
import sys

_DIR = os.environ.get("MEMPROBE_DIR")


def _mallinfo2() -> type:
    import ctypes

    class Mallinfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
            "uordblks", "fordblks", "keepcost")]

    return Mallinfo2


def _owners(path: str, type_name: str) -> None:
    """Who holds the live objects of type `type_name`: each one's holders' types (the
    objects that refer to it), counted; then the containers holding the most of them,
    with their size and their own holders' types."""
    import collections
    import gc

    def name(o: object) -> str:
        return type(o).__qualname__

    everything = gc.get_objects()
    wanted = {id(o) for o in everything if name(o) == type_name}
    holders: dict[int, list[object]] = collections.defaultdict(list)
    for x in everything:
        for r in gc.get_referents(x):
            if id(r) in wanted:
                holders[id(r)].append(x)
    shapes = collections.Counter(tuple(sorted(name(h) for h in hs)) for hs in holders.values())
    per_container = collections.Counter(id(h) for hs in holders.values() for h in hs
                                        if isinstance(h, dict | list | tuple | set | frozenset))
    top = {i for i, _ in per_container.most_common(12)}
    up: dict[int, list[str]] = collections.defaultdict(list)
    sizes: dict[int, int] = {}
    for x in everything:
        if id(x) in top:
            sizes[id(x)] = len(x)  # type: ignore[arg-type]
        for r in gc.get_referents(x):
            if id(r) in top:
                up[id(r)].append(name(x) if not isinstance(x, dict) else
                                 f"dict{sorted(k for k in x if isinstance(k, str))[:4]}")
    with open(path, "w") as f:
        f.write(f"{len(wanted)} of {type_name}, {len(wanted) - len(holders)} unheld\n")
        f.writelines(f"{n:6d} held by {shape}\n" for shape, n in shapes.most_common(15))
        f.writelines(f"{n:6d} in a container of {sizes.get(i)} held by {up.get(i)}\n"
                     for i, n in per_container.most_common(12))
    del everything


def _probe(out: str, every: float) -> None:
    import ctypes
    import gc
    import time
    import tracemalloc

    Mallinfo2 = _mallinfo2()
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
        if os.environ.get("MEMPROBE_COLLECT"):
            # =save: what the collection finds is kept (gc.DEBUG_SAVEALL) and its objects
            # counted by type, the largest containers first, then freed.
            save = os.environ["MEMPROBE_COLLECT"] == "save"
            if save:
                gc.set_debug(gc.DEBUG_SAVEALL)
            collected = gc.collect()
            with open(base + ".collected", "w") as f:
                f.write(f"{collected}\n")
                if save:
                    import collections

                    found = collections.Counter(type(o).__qualname__ for o in gc.garbage)
                    f.writelines(f"{n:8d} {name}\n" for name, n in found.most_common(25))
                    sized = sorted(((len(o), type(o).__qualname__) for o in gc.garbage
                                    if isinstance(o, dict | list | set | tuple)), reverse=True)
                    f.write(f"largest: {sized[:10]}\n")
                    frames = collections.Counter(
                        f"{o.f_code.co_filename}:{o.f_code.co_name}" for o in gc.garbage
                        if type(o).__name__ == "frame")
                    f.writelines(f"{n:8d} frame {name}\n" for name, n in frames.most_common(15))
                    gc.garbage.clear()
                    gc.set_debug(0)
        if os.environ.get("MEMPROBE_TYPES"):
            import collections

            counts = collections.Counter(type(o).__qualname__ for o in gc.get_objects())
            with open(base + ".types", "w") as f:
                f.writelines(f"{n:8d} {name}\n" for name, n in counts.most_common())
        if os.environ.get("MEMPROBE_OWNERS"):
            _owners(base + ".owners", os.environ["MEMPROBE_OWNERS"])
        if tracemalloc.is_tracing():
            tracemalloc.take_snapshot().dump(base + ".trace")
        libc.mallinfo2.restype = Mallinfo2
        info = libc.mallinfo2()
        with open(base + ".txt", "w") as f:
            f.write(f"time {time.time()}\nobjects {len(gc.get_objects())}\n"
                    # glibc's heaps: bytes in use (small + mmapped), free in them, their size
                    f"mallinfo2 uordblks {info.uordblks} hblkhd {info.hblkhd} "
                    f"fordblks {info.fordblks} arena {info.arena}\n{status}{rollup}")
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


if _DIR and ("leaseagent.agent" in sys.orig_argv or "bench.soakwatch" in sys.orig_argv):
    import threading

    if os.environ.get("MEMPROBE_TRACE"):
        import tracemalloc

        tracemalloc.start(int(os.environ["MEMPROBE_TRACE"]))

    threading.Thread(target=_probe, name="memprobe", daemon=True,
                     args=(_DIR, float(os.environ.get("MEMPROBE_EVERY", "60")))).start()
    if os.environ.get("MEMPROBE_DROP_TEXT"):
        threading.Thread(target=drop_text, name="memprobe-text", daemon=True,
                         args=(_DIR, float(os.environ["MEMPROBE_DROP_TEXT"]))).start()
