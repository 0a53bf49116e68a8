"""The files the agent writes (subnet.env, Docker's options) on broken disks, and kept.

Real agent processes on a real etcd; real file systems the test mounts (a small
tmpfs, a read-only bind mount of a temp dir) and unmounts in a finalizer:

- a read-only subnet.env directory, a full state dir: exit 2 at start, one line
  naming the flag, the path and the OS error; no lease taken in etcd;
- subnet.env deleted and the disk full while running: the write is retried and
  reported (metrics, STATUS=, one log line, `leasectl doctor`), the lease is renewed meanwhile; once
  there is room the file is back within the resync period;
- subnet.env and docker_opts.env deleted (docker_opts.env with its directory) or
  changed: put back within the resync period; never written when unchanged (same
  inode across several periods).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from etcd_server import PREFIX, put_config
from leasectl_run import leasectl
from polling import wait_for as _wait_for

pytestmark = pytest.mark.root

ALLOC = {"Network": "10.6.0.0/16", "Backend": {"Type": "alloc"}}
RESYNC = 1.0  # --resync-interval of these agents
EXIT_BOUND = 15.0


@contextlib.contextmanager
def mounted(target: Path, *args: str) -> Iterator[Path]:
    target.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", *args, str(target)], check=True)
    try:
        yield target
    finally:
        subprocess.run(["umount", "-l", str(target)], check=False)


@contextlib.contextmanager
def read_only(target: Path) -> Iterator[Path]:
    """A read-only bind mount of `target` on itself."""
    target.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "--bind", str(target), str(target)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(target)], check=True)
        yield target
    finally:
        subprocess.run(["umount", "-l", str(target)], check=False)


def fill(directory: Path) -> Path:
    """Fill the file system of `directory` up; the filler file (remove it for room)."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with contextlib.suppress(OSError):
            while True:
                os.write(fd, bytes(4096))
    finally:
        os.close(fd)
    return filler


def one_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    assert "Traceback" not in text and len(lines) == 1, text
    return lines[0]


def lease_keys(etcd) -> str:  # type: ignore[no-untyped-def]
    return etcd.etcdctl("get", "--prefix", "--keys-only", f"{PREFIX}/subnets/").strip()


def wait_for(what: str, cond: Callable[[], bool], timeout: float) -> float:
    return _wait_for(cond, timeout=timeout, what=what, every=0.05)


@pytest.mark.parametrize("where", ["subnet_dir_read_only", "state_dir_full"])
def test_a_broken_disk_at_start_is_exit_2_with_the_path_and_no_lease(etcd, agents, workdir,
                                                                      where):
    put_config(etcd, ALLOC)
    broken = workdir / "broken"
    if where == "subnet_dir_read_only":
        ctx = read_only(broken)
        extra = ["--subnet-file", str(broken / "subnet.env")]
        expect = ("--subnet-file", str(broken), "Read-only file system")
    else:
        ctx = mounted(broken, "-t", "tmpfs", "-o", "size=64k", "tmpfs")
        extra = ["--state-dir", str(broken)]
        expect = ("--state-dir", str(broken), "No space left on device")
    with ctx:
        if where == "state_dir_full":
            fill(broken)
        a = agents("a", "10.200.0.1", extra=extra)
        started = time.monotonic()
        a.start()
        code = a.wait_exit(EXIT_BOUND)
        took = time.monotonic() - started
    assert code == 2, a.log()
    line = one_line(a.log())
    assert all(part in line for part in expect), line
    assert lease_keys(etcd) == "", "a lease was taken although the agent cannot run"
    print(f"\nfiles: {where}: exit 2 in {took:.2f}s, no lease taken: {line}")


def test_a_full_disk_while_running_keeps_the_lease_retries_and_reports(etcd, agents, workdir,
                                                                       tmp_path):
    put_config(etcd, ALLOC)
    disk = workdir / "disk"
    notify = tmp_path / "notify.sock"
    with mounted(disk, "-t", "tmpfs", "-o", "size=64k", "tmpfs"), \
            socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(notify))
        sock.settimeout(0.2)
        subnet_env = disk / "subnet.env"
        a = agents("a", "10.200.0.1", ttl=3, env={"NOTIFY_SOCKET": str(notify)},
                   extra=["--subnet-file", str(subnet_env), "--resync-interval", f"{RESYNC:g}"])
        a.start(metrics=True)
        a.wait_log("ready:")
        want = subnet_env.read_bytes()
        key_before = lease_keys(etcd)
        subnet_env.unlink()
        filler = fill(disk)
        failing = wait_for("a failed write counted", lambda: (a.metric(
            "leaseagent_file_write_failures_total", 'file="subnet.env"') or 0) >= 1, 3 * RESYNC + 2)
        assert a.metric("leaseagent_files_in_sync") == 0
        renewals = a.metric("leaseagent_lease_renewals_total") or 0
        time.sleep(3)  # a few renewals (every ttl/3 = 1 s) while the disk is full
        assert (a.metric("leaseagent_lease_renewals_total") or 0) >= renewals + 2
        assert a.metric("leaseagent_lease_held") == 1
        assert lease_keys(etcd) == key_before
        statuses = []
        with contextlib.suppress(TimeoutError):
            while True:
                statuses.append(sock.recv(4096).decode())
        assert any("STATUS=" in m and "No space left on device" in m and str(subnet_env) in m
                   for m in statuses), statuses
        assert a.log().count("No space left on device") == 1, a.log()
        doctor = leasectl(etcd, "doctor", "--public-ip", "10.200.0.1", "--subnet-file",
                          str(subnet_env), "--state-dir", str(workdir / "a.state"))
        assert doctor.returncode == 1, doctor.stdout + doctor.stderr
        assert f"subnet.env directory {disk} cannot be written: No space left on device" in (
            doctor.stdout), doctor.stdout
        filler.unlink()
        back = wait_for("subnet.env back", subnet_env.exists, 2 * RESYNC + 2)
        assert subnet_env.read_bytes() == want
        wait_for("files_in_sync 1", lambda: a.metric("leaseagent_files_in_sync") == 1, 3)
        assert a.proc is not None and a.proc.alive
        a.stop()
    print(f"\nfiles: disk full while running: failure reported {failing:.2f}s after, lease "
          f"renewed meanwhile, subnet.env back {back:.2f}s after room was made")


def test_deleted_or_changed_files_are_put_back_and_unchanged_ones_never_written(
        etcd, agents, workdir):
    put_config(etcd, ALLOC)
    opts = workdir / "docker" / "docker_opts.env"
    a = agents("a", "10.200.0.1", extra=["--docker-opts-file", str(opts),
                                         "--resync-interval", f"{RESYNC:g}"])
    a.start(metrics=True)
    a.wait_log("ready:")
    files = (a.subnet_file, opts)
    want = {p: p.read_bytes() for p in files}
    inodes = {p: os.stat(p).st_ino for p in files}
    time.sleep(3 * RESYNC)
    assert {p: os.stat(p).st_ino for p in files} == inodes, "an unchanged file was written"
    took = []
    for p in files:
        p.unlink()
        took.append(wait_for(f"{p.name} put back", p.exists, RESYNC + 2))
        assert p.read_bytes() == want[p]
    shutil.rmtree(opts.parent)  # its directory too (a cleanup of /run gone wrong)
    took.append(wait_for("docker_opts.env and its directory put back", opts.exists, RESYNC + 2))
    assert opts.read_bytes() == want[opts]
    a.subnet_file.write_text("FLANNEL_SUBNET=10.99.0.1/24\n")
    took.append(wait_for("subnet.env corrected", lambda: a.subnet_file.read_bytes()
                         == want[a.subnet_file], RESYNC + 2))
    assert a.metric("leaseagent_file_repairs_total", 'file="subnet.env"') == 2
    assert a.metric("leaseagent_file_repairs_total", 'file="docker_opts.env"') == 2
    assert a.metric("leaseagent_files_in_sync") == 1
    print(f"\nfiles: deleted subnet.env, docker_opts.env, its directory and a changed "
          f"subnet.env put back "
          f"{', '.join(f'{t:.2f}' for t in took)} s after (resync {RESYNC:g} s); unchanged "
          f"files kept their inode over {3 * RESYNC:g} s")
