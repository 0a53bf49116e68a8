"""Hosts booted with a real systemd: systemd-nspawn in a lab host's network namespace.

One `Machine` per host of the systemd lab (leaseagent.lab.hostlab). What it
needs on a machine whose PID 1 is not systemd (no systemd-machined, cgroup v1
controllers with the unified hierarchy beside them), each measured:

- its own cgroup in every hierarchy mounted under /sys/fs/cgroup
  (`leaseagent-lab/<machine>`), which nspawn is moved into before it starts
  (a shell that writes its own PID to each, then execs nspawn): with
  `--keep-unit` nspawn hands the container the cgroup it runs in, and the
  container's systemd must own that subtree;
- SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1 (the container's systemd and its dockerd
  on cgroup v2), SYSTEMD_NSPAWN_API_VFS_WRITABLE=network (/proc/sys/net
  writable: dockerd and the agent set sysctls of their own namespace);
- `--capability=all` and `--system-call-filter='add_key keyctl bpf'` (dockerd
  and runc); `--register=no --keep-unit` (there is no machined to register
  with);
- `--network-namespace-path=/run/netns/<host ns>`: the host's underlay,
  built by the lab's topology before the boot;
- a root of its own: an overlay of the cached root filesystem
  (leaseagent.lab.rootfs) with the upper layer in the host's state dir, so
  hosts share nothing and the cache is never written; and a bind-mounted
  directory for /var/lib/docker (overlay2 cannot sit on an overlay);
- `--uuid`, a fixed one per lab and host: the root filesystem's machine-id is
  empty, so systemd takes it as the machine id, which stays across reboots
  (the agent's node id) and differs between hosts.

The process tree: nspawn (recorded in `machine.pid` with its start time) and
the container's init, its child, PID 1 inside. Commands run in the machine
through `nsenter --target <init> --all` (mount, UTS, IPC, network, PID and
cgroup namespaces, and its root), with a clean environment.

A reboot inside the machine (`systemctl reboot`) makes nspawn exit with
status 133; `Machine.reboot` starts it again on the same upper layer, as a
host's firmware would. `stop` sends nspawn SIGTERM, which it turns into an
orderly poweroff of the container, then SIGKILL after the grace period;
`remove` unmounts the root and deletes the cgroups (nothing must be running
in them by then).
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path

from leaseagent.lab import processes
from leaseagent.lab.commands import run, tool
from leaseagent.lab.errors import LabError
from leaseagent.lab.processes import Process, log_tail

CGROUP_ROOT = Path("/sys/fs/cgroup")
CGROUP_PARENT = "leaseagent-lab"
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
REBOOT_STATUS = 133  # nspawn's exit status when the container rebooted
# The propagation directory nspawn makes per machine and, /run being no tmpfs here,
# refuses to remove by itself.
PROPAGATE = Path("/run/systemd/nspawn/propagate")


def unavailable() -> str | None:
    """Why systemd-nspawn hosts cannot run here, or None."""
    for program, package in (("systemd-nspawn", "systemd-container"),
                              ("debootstrap", "debootstrap"), ("nsenter", "util-linux")):
        try:
            tool(program)
        except LabError:
            return f"{program} not found (apt-get install --no-install-recommends {package})"
    if not hierarchies():
        return f"no cgroup hierarchy mounted under {CGROUP_ROOT}"
    return None


def hierarchies() -> list[Path]:
    """Every cgroup hierarchy mounted under /sys/fs/cgroup (v1 ones and the unified one;
    on a pure v2 machine, /sys/fs/cgroup itself)."""
    if (CGROUP_ROOT / "cgroup.procs").exists():
        return [CGROUP_ROOT]
    return sorted(p for p in CGROUP_ROOT.iterdir()
                  if p.is_dir() and not p.is_symlink() and (p / "cgroup.procs").exists())


class Machine:
    """One systemd-booted host: its paths, nspawn command line, life cycle and commands."""

    def __init__(self, *, name: str, ns: str, dir: Path, rootfs: Path,
                 binds_ro: Sequence[tuple[Path, str]] = ()) -> None:
        self.name = name  # the machine's name: lab name and host, e.g. "hosts-h1"
        self.ns = ns
        self.dir = dir
        self.rootfs = rootfs
        self.binds_ro = list(binds_ro)  # (outside, inside): read-only in the machine
        self.uuid = uuid.uuid5(uuid.NAMESPACE_URL, f"leaseagent-lab:{name}")

    # ---------------------------------------------------------------- paths

    @property
    def root(self) -> Path:
        return self.dir / "root"

    @property
    def pid_file(self) -> Path:
        return self.dir / "machine.pid"

    @property
    def log_file(self) -> Path:
        return self.dir / "machine.log"

    @property
    def docker_dir(self) -> Path:
        return self.dir / "var-lib-docker"

    def root_upper(self, path: str) -> Path:
        """Where `path` of the machine is in its overlay's upper layer: a file put there
        before the first boot is the machine's own, the cached root stays untouched."""
        return self.dir / "upper" / path.lstrip("/")

    def cgroups(self) -> list[Path]:
        return [h / CGROUP_PARENT / self.name for h in hierarchies()]

    # ---------------------------------------------------------------- life cycle

    def argv(self) -> list[str]:
        return [
            tool("systemd-nspawn"), "--quiet", "--boot", f"--directory={self.root}",
            f"--machine={self.name}", f"--uuid={self.uuid}",
            f"--network-namespace-path=/run/netns/{self.ns}",
            "--capability=all", "--system-call-filter=add_key keyctl bpf",
            "--register=no", "--keep-unit", "--console=pipe",
            f"--bind={self.docker_dir}:/var/lib/docker",
            *(f"--bind-ro={outside}:{inside}" for outside, inside in self.binds_ro),
        ]

    def _mount_root(self) -> None:
        if self.root.is_mount():
            return
        upper, work = self.dir / "upper", self.dir / "work"
        for d in (upper, work, self.root, self.docker_dir):
            d.mkdir(parents=True, exist_ok=True)
        run(["mount", "-t", "overlay", "overlay", "-o",
             f"lowerdir={self.rootfs},upperdir={upper},workdir={work}", str(self.root)])

    def _make_cgroups(self) -> list[Path]:
        made = []
        for cg in self.cgroups():
            cg.mkdir(parents=True, exist_ok=True)
            # cpuset v1: a cgroup takes no process before it has CPUs and memory nodes.
            for knob in ("cpuset.cpus", "cpuset.mems"):
                mine, parent = cg / knob, cg.parent.parent / knob
                if mine.exists() and not mine.read_text().strip():
                    (cg.parent / knob).write_text(parent.read_text())
                    mine.write_text(parent.read_text())
            made.append(cg)
        return made

    def start(self) -> None:
        """Boot the machine (not waiting for it: `wait_booted`)."""
        if self.running() is not None:
            raise LabError(f"machine {self.name} already running")
        self._mount_root()
        cgroups = self._make_cgroups()
        join = "; ".join(f"echo $$ > {shlex.quote(str(cg / 'cgroup.procs'))}" for cg in cgroups)
        wrapper = ["sh", "-c", f"{join}; exec \"$@\"", "nspawn", *self.argv()]
        env = {"PATH": PATH, "SYSTEMD_NSPAWN_UNIFIED_HIERARCHY": "1",
               "SYSTEMD_NSPAWN_API_VFS_WRITABLE": "network"}
        processes.spawn(wrapper, log_file=self.log_file, pid_file=self.pid_file, env=env)

    def running(self) -> Process | None:
        return processes.running(self.pid_file)

    def leader(self) -> int:
        """The container's init (PID 1 inside)."""
        proc = self.running()
        if proc is None:
            raise LabError(f"machine {self.name} is not running; {self.log_file}:\n"
                           + log_tail(self.log_file))
        for child in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split():
            with contextlib.suppress(OSError):
                status = Path(f"/proc/{child}/status").read_text()
                nspid = next(line.split()[1:] for line in status.splitlines()
                             if line.startswith("NSpid:"))
                if nspid[-1] == "1":
                    return int(child)
        raise LabError(f"machine {self.name}: its init is not up yet")

    def wait_booted(self, *, timeout: float = 120) -> str:
        """Until systemd inside says the boot is over; its state ("running" or, with a
        failed unit, "degraded"). LabError if nspawn exits or the boot takes too long."""
        deadline = time.monotonic() + timeout
        while True:
            if self.running() is None:
                raise LabError(f"machine {self.name} exited while booting; {self.log_file}:\n"
                               + log_tail(self.log_file))
            try:
                r = self.exec(["systemctl", "is-system-running", "--wait"], check=False,
                              timeout=max(1.0, deadline - time.monotonic()))
                state = r.stdout.strip()
                if state in ("running", "degraded"):
                    return state
            except LabError:
                pass  # no init yet, or systemd's socket not there yet
            if time.monotonic() > deadline:
                raise LabError(f"machine {self.name} not booted after {timeout:.0f}s")
            time.sleep(0.2)

    def stop(self, *, grace: float = 60) -> None:
        """An orderly poweroff (nspawn turns SIGTERM into one), SIGKILL after `grace` s."""
        proc = self.running()
        if proc is not None:
            proc.stop(first=signal.SIGTERM, grace=grace)

    def reboot(self, *, timeout: float = 120) -> float:
        """`systemctl reboot` inside, then boot again as firmware would; seconds from the
        command to nspawn's exit (the shutdown)."""
        proc = self.running()
        if proc is None:
            raise LabError(f"machine {self.name} is not running")
        started = time.monotonic()
        self.exec(["systemctl", "reboot"])
        status = proc.wait(timeout)
        down = time.monotonic() - started
        if status not in (None, REBOOT_STATUS):
            raise LabError(f"machine {self.name}: nspawn exited {status} on a reboot, not "
                           f"{REBOOT_STATUS}; {self.log_file}:\n" + log_tail(self.log_file))
        self.start()
        return down

    def remove(self) -> list[str]:
        """Unmount the root, delete the cgroups and nspawn's leftovers; warnings."""
        return remove_leftovers(self.name, self.dir)

    # ---------------------------------------------------------------- commands

    def exec_argv(self, argv: Sequence[str], *, env: Mapping[str, str] | None = None) -> list[str]:
        return [tool("nsenter"), f"--target={self.leader()}", "--all", "env", "-i",
                f"PATH={PATH}", "LANG=C.UTF-8",
                *(f"{k}={v}" for k, v in (env or {}).items()), *argv]

    def exec(self, argv: Sequence[str], *, check: bool = True, timeout: float = 60,
             input: str | None = None,
             env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """Run `argv` in the machine; its result (LabError if it fails and `check`)."""
        full = self.exec_argv(argv, env=env)
        try:
            r = subprocess.run(full, capture_output=True, text=True, timeout=timeout,
                               input=input, check=False,
                               stdin=None if input is not None else subprocess.DEVNULL)
        except subprocess.TimeoutExpired as exc:
            raise LabError(f"{self.name}: {' '.join(argv)}: no answer within {timeout:.0f}s") \
                from exc
        if check and r.returncode != 0:
            raise LabError(f"{self.name}: {' '.join(argv)}: exit {r.returncode}: "
                           f"{(r.stdout + r.stderr).strip()[-2000:]}")
        return r

    def sh(self, script: str, *, check: bool = True, timeout: float = 60,
           env: Mapping[str, str] | None = None) -> str:
        """A bash script in the machine (`set -euo pipefail`); its stdout."""
        return self.exec(["bash", "-euo", "pipefail", "-c", script], check=check,
                         timeout=timeout, env=env).stdout

    def write(self, path: str, content: str, *, mode: int = 0o644) -> None:
        """A file in the machine, written through its root (before or after boot)."""
        target = self.root / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(content)
        os.chmod(target, mode)


def remove_leftovers(name: str, dir: Path) -> list[str]:
    """What a machine leaves once its nspawn is gone: its root's mount, its cgroups,
    nspawn's propagation directory. Safe to call when none of them exist."""
    warnings = []
    root = dir / "root"
    if root.is_mount():
        done = subprocess.run(["umount", str(root)], capture_output=True, text=True, check=False)
        if done.returncode != 0:
            done = subprocess.run(["umount", "-l", str(root)], capture_output=True, text=True,
                                  check=False)
            if done.returncode != 0:
                warnings.append(f"cannot unmount {root}: {done.stderr.strip()}")
    for hierarchy in hierarchies():
        cg = hierarchy / CGROUP_PARENT / name
        if cg.is_dir():
            # The container's systemd made cgroups below ours: deepest first.
            subs = sorted((p for p in cg.rglob("*") if p.is_dir()),
                          key=lambda p: len(p.parts), reverse=True)
            for sub in [*subs, cg]:
                try:
                    sub.rmdir()
                except OSError as exc:
                    warnings.append(f"cannot remove cgroup {sub}: {exc.strerror}")
                    break
        with contextlib.suppress(OSError):
            (hierarchy / CGROUP_PARENT).rmdir()  # only once no lab's machine is left
    propagate = PROPAGATE / name
    if propagate.is_dir():
        with contextlib.suppress(OSError):
            for f in propagate.iterdir():
                f.unlink()
            propagate.rmdir()
    return warnings


def inits(state_path: Path) -> list[Process]:
    """The inits of the machines whose nspawn a pid file under `state_path` records."""
    found = []
    for pid_file in sorted(state_path.glob("h*/machine.pid")):
        proc = processes.running(pid_file)
        if proc is None:
            continue
        with contextlib.suppress(OSError):
            for child in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split():
                start = processes.start_time(int(child))
                if start is not None:
                    found.append(Process(int(child), start))
    return found
