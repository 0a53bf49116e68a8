"""The writers of subnet.env, docker_opts.env and state refuse to replace anything that is
not a regular file (or absent). The device nodes here are the test's own, made in a temp
dir, so a broken check replaces only them."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from leaseagent.errors import ConfigError
from leaseagent.files import refuse_non_regular, write_atomic, write_if_changed


def test_a_regular_file_and_an_absent_path_are_written(tmp_path: Path) -> None:
    write_atomic(tmp_path / "new.env", b"A=1\n")
    assert (tmp_path / "new.env").read_bytes() == b"A=1\n"
    assert write_if_changed(tmp_path / "new.env", b"A=2\n")
    assert not write_if_changed(tmp_path / "new.env", b"A=2\n")
    assert (tmp_path / "new.env").read_bytes() == b"A=2\n"


@pytest.mark.parametrize("kind", ["fifo", "directory", "symlink", "chardev"])
def test_anything_but_a_regular_file_is_refused_with_its_path(tmp_path: Path, kind: str) -> None:
    target = tmp_path / "subnet.env"
    if kind == "fifo":
        os.mkfifo(target)
    elif kind == "directory":
        target.mkdir()
    elif kind == "symlink":
        (tmp_path / "elsewhere").write_text("keep\n")
        target.symlink_to(tmp_path / "elsewhere")
    else:
        if os.geteuid() != 0:
            pytest.skip("making a device node needs root")
        os.mknod(target, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    before = os.lstat(target)
    for writer in (write_atomic, write_if_changed):
        with pytest.raises(ConfigError) as err:
            writer(target, b"A=1\n")
        message = str(err.value)
        assert str(target) in message and "\n" not in message
    after = os.lstat(target)
    assert (after.st_mode, after.st_ino) == (before.st_mode, before.st_ino)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".subnet.env.")] == []
    if kind == "symlink":
        assert (tmp_path / "elsewhere").read_text() == "keep\n"


def test_refusal_names_what_is_there(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(ConfigError, match="is a FIFO, not a regular file"):
        refuse_non_regular(tmp_path / "pipe")
