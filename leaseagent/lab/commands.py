"""Running programs: `run` (a command, its stdout, LabError on failure) and `tool` (where a
program is, with a hint for installing it when it is missing).

Everything the lab, the tests' harness and the bench start synchronously goes
through `run`; long-lived processes go through `leaseagent.lab.processes`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from leaseagent.lab.errors import LabError

_INSTALL_HINTS = {
    "etcd": "apt-get install --no-install-recommends etcd-server",
    "etcdctl": "apt-get install --no-install-recommends etcd-client",
    "ping": "apt-get install --no-install-recommends iputils-ping",
    "leaseagent": "pip install -e . in the venv that runs the lab",
    "leasectl": "pip install -e . in the venv that runs the lab",
}


def run(argv: Sequence[str], *, check: bool = True, timeout: float | None = 30,
        input: str | None = None) -> str:
    """Run a command, return stdout; LabError with its stderr when it fails."""
    try:
        proc = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=timeout, check=False,
            input=input, stdin=None if input is not None else subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired as exc:
        raise LabError(f"{' '.join(argv)}: no answer within {timeout}s") from exc
    if check and proc.returncode != 0:
        raise LabError(f"{' '.join(argv)}: exit {proc.returncode}: {proc.stderr.strip()}")
    return proc.stdout


def tool(name: str) -> str:
    """Path of a program: leaseagent/leasectl from the running venv, others from PATH."""
    if name in ("leaseagent", "leasectl"):
        # The venv's bin dir, without resolving symlinks (the venv python is usually
        # a symlink to the system one, whose bin dir has no leaseagent).
        candidate = Path(sys.executable).parent / name
        if candidate.exists():
            return str(candidate)
    # sudo resets PATH; the Debian packages put everything in /usr/bin or /usr/sbin.
    found = shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/usr/bin")
    if not found:
        raise LabError(f"{name} not found; {_INSTALL_HINTS.get(name, 'install it')}")
    return found
