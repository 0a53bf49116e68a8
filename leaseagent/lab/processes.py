"""Long-lived processes by PID and start time: spawn, record, find, signal, stop.

A process is known by its PID *and* its start time (field 22 of
/proc/<pid>/stat), so a PID the kernel recycled for someone else's process is
never signalled. `spawn` records the pair as "<pid> <start time>" in a pid file
(when given one) before anything waits on the process; `running(pid_file)`
reads it back, in this Python process or another one (`down` after a crash).

Stopping (`stop`, `Process.stop`): SIGCONT first (a SIGSTOPped process acts on
nothing else), then the first signal (SIGTERM unless told), then SIGKILL for
what is left after the grace period. Children of this Python process are
reaped as they go, and keep their exit status.

Used by the lab (etcd, agents), the etcd launcher (leaseagent.lab.etcd), the
tests' agent processes and the bench.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from leaseagent.files import write_atomic
from leaseagent.lab import netns

log = logging.getLogger("leaseagent.lab")

# Children of this Python process, by PID, with their start time: reaped by `alive`
# and `stop`, and the source of their exit status.
_children: dict[int, tuple[subprocess.Popen[bytes], int]] = {}


def start_time(pid: int) -> int | None:
    """Field 22 of /proc/<pid>/stat (start time in clock ticks), or None if gone/zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    rest = stat[stat.rindex(")") + 2 :].split()
    if rest[0] == "Z":
        return None
    return int(rest[19])


def cmdline(pid: int) -> list[str]:
    """The command line of `pid` (empty if it is gone)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def log_tail(path: Path, lines: int = 15) -> str:
    """The last `lines` lines of a log file, indented (for error messages)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "    (no log)"
    return "\n".join("    " + line for line in text.splitlines()[-lines:])


@dataclass(frozen=True)
class Process:
    """One process: its PID and its start time (0: not known, the PID alone counts)."""

    pid: int
    start: int

    def _child(self) -> subprocess.Popen[bytes] | None:
        entry = _children.get(self.pid)
        if entry is None or (self.start and entry[1] and entry[1] != self.start):
            return None
        return entry[0]

    @property
    def alive(self) -> bool:
        """Still running (not a zombie) and still the very process that was recorded."""
        child = self._child()
        if child is not None and child.poll() is not None:
            return False
        now = start_time(self.pid)
        return now is not None and (self.start == 0 or now == self.start)

    @property
    def returncode(self) -> int | None:
        """Exit status, for a child of this Python process that has exited."""
        child = self._child()
        return child.poll() if child is not None else None

    def send(self, sig: int) -> bool:
        """Send `sig` if the process is still this one; False if it is gone."""
        if not self.alive:
            return False
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, sig)
            return True
        return False

    def wait(self, timeout: float) -> int | None:
        """Wait for it to exit; its exit status if it is our child. TimeoutError if not
        gone within `timeout` s."""
        child = self._child()
        if child is not None:
            try:
                return child.wait(timeout)
            except subprocess.TimeoutExpired as exc:
                raise TimeoutError(f"pid {self.pid} still running after {timeout}s") from exc
        deadline = time.monotonic() + timeout
        while self.alive:
            if time.monotonic() > deadline:
                raise TimeoutError(f"pid {self.pid} still running after {timeout}s")
            time.sleep(0.02)
        return None

    def stop(self, *, first: int = signal.SIGTERM, grace: float = 10.0) -> None:
        stop([self], first=first, grace=grace)

    def write(self, pid_file: Path) -> None:
        write_atomic(pid_file, f"{self.pid} {self.start}\n".encode())

    @classmethod
    def read(cls, pid_file: Path) -> Process | None:
        """The process a pid file records (running or not); None if there is none."""
        try:
            pid_s, start_s = pid_file.read_text().split()
            return cls(int(pid_s), int(start_s))
        except (OSError, ValueError):
            return None


def running(pid_file: Path) -> Process | None:
    """The process `pid_file` records, if that very process is still running."""
    proc = Process.read(pid_file)
    return proc if proc is not None and proc.alive else None


def spawn(argv: Sequence[str], *, log_file: Path, ns: str | None = None,
          env: Mapping[str, str] | None = None, pid_file: Path | None = None,
          new_session: bool = True) -> Process:
    """Start `argv` (inside namespace `ns` if given) with stdout and stderr appended to
    `log_file`; record it in `pid_file` before returning.

    In a new session by default: the program outlives a CLI that started it and
    misses a Ctrl-C at its terminal; it is stopped by PID instead.
    """
    full = netns.exec_argv(ns, argv) if ns is not None else list(argv)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with log_file.open("ab") as out:
        popen = subprocess.Popen(
            full, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            env=None if env is None else dict(env), start_new_session=new_session,
        )
    started = None
    for _ in range(100):  # /proc/<pid>/stat exists as soon as fork returns
        started = start_time(popen.pid)
        if started is not None:
            break
        time.sleep(0.001)
    proc = Process(popen.pid, started or 0)
    _children[popen.pid] = (popen, proc.start)
    if pid_file is not None:
        proc.write(pid_file)
    return proc


def stop(procs: Iterable[Process], *, first: int = signal.SIGTERM, grace: float = 10.0) -> None:
    """SIGCONT and `first` to each process still running, SIGKILL to what is left after
    `grace` s; returns once all are gone (children reaped)."""
    procs = list(procs)
    live = [p for p in procs if p.alive]
    for p in live:
        p.send(signal.SIGCONT)
        p.send(first)
    deadline = time.monotonic() + grace
    while live and time.monotonic() < deadline:
        live = [p for p in live if p.alive]
        if live:
            time.sleep(0.02)
    for p in live:
        log.warning("pid %d did not exit within %.0fs: SIGKILL", p.pid, grace)
        p.send(signal.SIGKILL)
    for p in procs:
        with contextlib.suppress(TimeoutError):
            p.wait(10)
