"""The systemd lab's cached pieces: a Debian root filesystem and a wheelhouse.

Both are built once and kept under /var/cache/leaseagent-lab/ (outside the
repository), each in a directory named by a hash of what goes into it, so a
second run reuses them and a change of recipe builds a new one beside the old.

- The root filesystem (`rootfs()`): Debian bookworm by `debootstrap
  --variant=minbase`, with systemd as init and what the README's install steps
  and Docker need (`PACKAGES`), from the mirror of the machine's own apt
  source. /etc/machine-id is left empty, so each host booted from it gets its
  own (systemd-nspawn hands the container its --uuid). Built in a
  `<dir>.partial` directory and renamed when complete: an interrupted build is
  started over, never used. Hosts never write to it: each boots an overlay of
  it (leaseagent.lab.machines).
- The wheelhouse (`wheelhouse(source)`): every wheel `pip install` of the
  source tree needs (its dependencies at the versions of
  deploy/constraints.txt, and the build backend), made as the README makes
  one ("Installing offline": `pip wheel -c <constraints> <source> <build
  requires> wheel`), so a host installs from it with no network (`install.sh
  --wheelhouse DIR`). Keyed by the hash of pyproject.toml and the
  constraints (the source tree's own wheel in it may be older than the tree:
  install.sh builds the tree itself, it never takes that wheel).

`python -m leaseagent.lab.rootfs` builds both and prints their paths and the
time each took.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import re
import shutil
import sys
import time
import tomllib
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from leaseagent.lab.commands import run, tool
from leaseagent.lab.errors import LabError
from leaseagent.lab.state import CACHE_ROOT

log = logging.getLogger("leaseagent.lab")

CACHE = CACHE_ROOT
SUITE = "bookworm"
# systemd as PID 1, what the README's install steps need (python3-venv, iptables,
# ipset, ca-certificates), Docker as Debian ships it, busybox-static for the
# containers' image, iputils-ping and procps for the checks.
PACKAGES = ("systemd", "systemd-sysv", "dbus", "iproute2", "iputils-ping", "procps",
            "python3", "python3-venv", "ca-certificates", "iptables", "ipset", "kmod",
            "docker.io", "busybox-static")
# Bump when the build steps below change what ends up in the tree.
RECIPE = "3"
DEFAULT_MIRROR = "http://deb.debian.org/debian"


def apt_mirror(sources: Sequence[Path] = (Path("/etc/apt/sources.list"),
                                          Path("/etc/apt/sources.list.d"))) -> str:
    """The first Debian mirror apt is configured with (one-line or deb822 sources), else
    deb.debian.org."""
    files: list[Path] = []
    for path in sources:
        files += sorted(path.glob("*")) if path.is_dir() else [path]
    for path in files:
        try:
            text = path.read_text()
        except OSError:
            continue
        for url, suites in _sources(text):
            if SUITE in suites and "security" not in url and url.startswith("http"):
                return url.rstrip("/")
    return DEFAULT_MIRROR


def _sources(text: str) -> list[tuple[str, list[str]]]:
    """(URL, suites) of each deb source: one-line `deb [options] URL suite ...` entries
    and deb822 paragraphs (Types: deb, URIs:, Suites:)."""
    found = []
    for line in text.splitlines():
        words = re.sub(r"\[[^\]]*\]", "", line.split("#")[0]).split()
        if len(words) >= 3 and words[0] == "deb":
            found.append((words[1], [words[2]]))
    for paragraph in re.split(r"\n\s*\n", text):
        fields = dict(re.findall(r"^(\w[\w-]*):\s*(.*)$", paragraph, flags=re.M))
        if "deb" in fields.get("Types", "").split():
            for url in fields.get("URIs", "").split():
                found.append((url, fields.get("Suites", "").split()))
    return found


def rootfs_key(mirror: str, packages: Sequence[str] = PACKAGES) -> str:
    """What names a built root filesystem: the recipe, suite, mirror and packages."""
    return hashlib.sha256(
        "\n".join([RECIPE, SUITE, mirror, *packages]).encode()).hexdigest()[:16]


def rootfs(*, cache: Path = CACHE, mirror: str | None = None) -> Path:
    """The cached root filesystem, built first if there is none (several minutes)."""
    mirror = mirror or apt_mirror()
    target = cache / f"rootfs-{SUITE}-{rootfs_key(mirror)}"
    if (target / "etc" / "os-release").exists():
        return target
    _check_mirror(mirror)
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    cache.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    log.info("building the hosts' root filesystem (debootstrap %s from %s) in %s",
             SUITE, mirror, target)
    try:
        run([tool("debootstrap"), "--variant=minbase", f"--include={','.join(PACKAGES)}",
             SUITE, str(partial), mirror], timeout=900)
    except LabError as exc:
        shutil.rmtree(partial, ignore_errors=True)
        raise LabError(f"debootstrap failed (is {mirror} reachable?): "
                       f"{str(exc).splitlines()[-1][-300:]}") from exc
    _prepare(partial)
    partial.rename(target)
    log.info("root filesystem built in %.0fs", time.monotonic() - started)
    return target


def _check_mirror(mirror: str, *, timeout: float = 15) -> None:
    """LabError unless the mirror serves the suite's Release file within `timeout` s:
    debootstrap on a machine that cannot reach it may hang for many minutes."""
    url = f"{mirror}/dists/{SUITE}/Release"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as answer:
            answer.read(1)
    except (OSError, ValueError) as exc:
        raise LabError(f"Debian mirror {mirror} not reachable ({url}: {exc})") from exc


def _prepare(tree: Path) -> None:
    """What every host's first boot needs from the image, the same for all of them."""
    # Empty: systemd takes the container's --uuid as this boot's machine id and keeps it.
    (tree / "etc" / "machine-id").write_text("")
    (tree / "var" / "lib" / "dbus" / "machine-id").unlink(missing_ok=True)
    # Nothing talks to a package mirror from a lab host.
    for unit in ("apt-daily.timer", "apt-daily-upgrade.timer"):
        link = tree / "etc" / "systemd" / "system" / "timers.target.wants" / unit
        link.unlink(missing_ok=True)
    # The lab writes the host's network setup itself; no getty on the console.
    (tree / "etc" / "systemd" / "system" / "console-getty.service").symlink_to("/dev/null")
    shutil.rmtree(tree / "var" / "cache" / "apt" / "archives", ignore_errors=True)
    (tree / "var" / "cache" / "apt" / "archives" / "partial").mkdir(parents=True)


def wheelhouse(source: Path, *, cache: Path = CACHE) -> Path:
    """A directory of wheels from which `pip install <source>` runs with no index."""
    pyproject = (source / "pyproject.toml").read_bytes()
    constraints_file = source / "deploy" / "constraints.txt"
    constraints = constraints_file.read_bytes()
    key = hashlib.sha256(pyproject + b"\0" + constraints).hexdigest()[:16]
    target = cache / f"wheels-{key}"
    if (target / ".complete").exists():
        return target
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    started = time.monotonic()
    if importlib.util.find_spec("pip") is None:
        raise LabError(f"{sys.executable} has no pip to make the wheelhouse with (run the lab "
                       "from the repository's .venv: bash deploy/setup.sh)")
    # As the README makes one ("Installing offline"): the source tree's wheel with its
    # dependencies, and what building the source tree needs (its build-system requires,
    # and wheel).
    build = tomllib.loads(pyproject.decode())["build-system"]["requires"]
    argv = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", "wheel",
            "-w", str(target), "-c", str(constraints_file), str(source), *build, "wheel"]
    try:
        run(argv, timeout=600)
    except LabError:
        shutil.rmtree(target, ignore_errors=True)
        raise
    (target / ".complete").write_text("")
    log.info("wheelhouse built in %.0fs", time.monotonic() - started)
    return target


def main(argv: Sequence[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="lab: %(message)s")
    if os.geteuid() != 0:
        print("lab: needs root (debootstrap)", file=sys.stderr)
        return 2
    source = Path(argv[0]) if argv else Path(__file__).resolve().parents[2]
    try:
        started = time.monotonic()
        print(rootfs(), f"({time.monotonic() - started:.0f}s)")
        started = time.monotonic()
        print(wheelhouse(source), f"({time.monotonic() - started:.0f}s)")
    except LabError as exc:
        print(f"lab: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
