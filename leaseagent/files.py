"""Files the agent writes: subnet.env and state, atomically and never through a symlink.

Atomic: a temp file in the same directory, fsync, rename over the target,
fsync the directory. A symlink planted at the target path is refused (an
attacker with write access to the directory could otherwise point our
root-owned write elsewhere), and so is anything at the target that is not a
regular file: the rename would replace a device node such as /dev/null, a
directory or a socket with our file.
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

from leaseagent.errors import ConfigError


def exposure(path: Path, *, secret: bool) -> list[str]:
    """What lets a user other than root and us change `path` (its owner, write bits for
    its group or others) or, when `secret`, read it (read bits for others): each as a
    few words for a message, none when it is kept as it should be. Follows symlinks
    (what is read is the target). OSError if it cannot be examined."""
    st = path.stat()
    out = []
    if st.st_uid not in (0, os.geteuid()):
        out.append(f"owned by uid {st.st_uid}, not root")
    if st.st_mode & stat.S_IWOTH:
        out.append("writable by others")
    if st.st_mode & stat.S_IWGRP:
        out.append("writable by its group")
    if secret and st.st_mode & stat.S_IROTH:
        out.append("readable by others")
    return out


def refuse_symlink(path: Path) -> None:
    if path.is_symlink():
        raise ConfigError(f"{path} is a symlink; refusing to write through it")


def refuse_non_regular(path: Path) -> None:
    """ConfigError unless `path` is absent or a regular file (not a symlink, device node,
    directory, FIFO or socket): the one check before any file of ours is replaced."""
    refuse_symlink(path)
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"{path} is {_kind(st.st_mode)}, not a regular file; refusing to write over it")


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


PROBE_BYTES = 4096  # one block: what the smallest file we write takes on disk


def check_writable(directory: Path, flag: str) -> None:
    """ConfigError naming `flag`, `directory` and the OS error unless a file of
    PROBE_BYTES can be made, written, synced and removed there (a read-only file
    system, a full disk or quota, no permission): found before a lease is taken."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=".leaseagent-probe.", dir=directory)
    except OSError as exc:
        raise ConfigError(f"{flag}: cannot write in {directory}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(bytes(PROBE_BYTES))
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        raise ConfigError(f"{flag}: cannot write in {directory}: {exc.strerror or exc}") from None
    finally:
        try:
            os.unlink(tmp)
        except OSError:
            pass


def unwritable_reason(directory: Path) -> str | None:
    """Why a file could not be written in `directory` now (read-only file system, no
    space, no permission), read from the file system without writing; None if it could.
    For `leasectl doctor`, which changes nothing; the agent probes (`check_writable`)."""
    try:
        st = os.statvfs(directory)
    except OSError as exc:
        return exc.strerror or str(exc)
    if st.f_flag & os.ST_RDONLY:
        return "Read-only file system"
    if st.f_bavail * st.f_frsize < PROBE_BYTES:
        return "No space left on device"
    if st.f_files and not st.f_favail:
        return "No free inodes"
    if not os.access(directory, os.W_OK | os.X_OK):
        return "Permission denied"
    return None


def write_atomic(path: Path, data: bytes, *, mode: int = 0o644) -> None:
    """Replace `path` with `data` so that readers see the old or the new file, never a part."""
    refuse_non_regular(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.rename(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_if_changed(path: Path, data: bytes, *, mode: int = 0o644) -> bool:
    """`write_atomic` unless the file already holds exactly `data` (so a watcher of the
    file, systemd's PathChanged= say, hears of real changes only); True if written."""
    refuse_non_regular(path)
    try:
        if path.read_bytes() == data:
            return False
    except OSError:
        pass
    write_atomic(path, data, mode=mode)
    return True


def read_text_if_exists(path: Path) -> str | None:
    try:
        refuse_symlink(path)
        return path.read_text()
    except (OSError, UnicodeDecodeError):
        return None
