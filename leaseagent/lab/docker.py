"""Real Docker in the lab: one dockerd per host, started on the options its agent wrote.

A host's dockerd runs inside the host's namespace, entered with `nsenter
--net=/run/netns/<host>` (not `ip netns exec`: that remounts /sys and hides
the cgroup mounts, and dockerd then fails with "Devices cgroup isn't
mounted"). Each has its own data root, exec root (under the host's state
dir), pid file, and API socket `/run/leaseagent-lab/<lab>/<host>/docker.sock`,
so `docker -H unix://<that> ps` works from the root namespace. Storage: vfs.

Its network options reach it the way they reach dockerd on a host: the agent
writes `--docker-opts-file` (DOCKER_NETWORK_OPTIONS), the docker.service
drop-in reads that file with EnvironmentFile= and puts `$DOCKER_NETWORK_OPTIONS`
on dockerd's command line (systemd splits an unquoted `$VAR` into words).
`network_options` does exactly that with the file; the lab never derives
--bip or --mtu itself. A dual-stack agent's file adds `--ipv6
--fixed-cidr-v6=<FLANNEL_IPV6_SUBNET>`: docker0 then gets the subnet's first
address and each container one Docker derives from its MAC, which the lab
reads from `docker inspect` (GlobalIPv6Address). The host forwards IPv6
before dockerd starts, so dockerd does not set ip6tables' FORWARD policy.

The image is Debian's busybox-static (sh, ping, ip, nc, sleep, ...) in a
tarball made once and cached in /var/cache/leaseagent-lab/, then `docker
import`ed into each host's dockerd. Containers run with `--restart always`, so
a dockerd restart brings them back (on its new options).

Docker's FORWARD policy is DROP, which would drop container traffic arriving
over the overlay; the lab adds what the README tells an operator to add, an
accept rule for the cluster network in DOCKER-USER.

The restart hook: on a host, `leaseagent-docker-restart.path` (systemd/) restarts
docker when the agent rewrites the options file (its subnet changed). The lab
runs the same hook as a small process per host (`python -m
leaseagent.lab.docker hook ...`) that restarts that host's dockerd when the file's
content changes.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path

from leaseagent.core.dockeropts import DOCKER_OPTIONS_KEY
from leaseagent.core.subnetenv import parse_environment_file
from leaseagent.lab import processes
from leaseagent.lab.commands import run, tool
from leaseagent.lab.errors import DockerError, LabError
from leaseagent.lab.state import CACHE_ROOT

IMAGE = "leaseagent-lab/busybox"
IMAGE_CACHE = CACHE_ROOT
APPLETS = ("sh", "ping", "ip", "nc", "sleep", "cat", "ls", "hostname", "wget")
# Debian's docker.io client matches its dockerd (20.10); another `docker` on PATH may not.
DOCKER_CLIENTS = ("/usr/bin/docker",)


def unavailable() -> str | None:
    """Why dockerd cannot run in the lab here, or None: the first check that failed."""
    for program in ("dockerd", "containerd", "busybox", "iptables", "nsenter"):
        if shutil.which(program, path="/usr/sbin:/usr/bin:/sbin:/bin") is None:
            return (f"{program} not found (apt-get install --no-install-recommends docker.io "
                    "busybox-static iptables)")
    if not Path("/sys/fs/cgroup/cgroup.controllers").exists() and \
            not Path("/sys/fs/cgroup/devices").is_dir():
        return "no cgroup hierarchy mounted at /sys/fs/cgroup (dockerd needs one)"
    return None


def network_options(options_file: Path) -> list[str]:
    """The words `$DOCKER_NETWORK_OPTIONS` puts on dockerd's command line."""
    return parse_environment_file(options_file.read_text()).get(DOCKER_OPTIONS_KEY, "").split()


def docker_client() -> str:
    for candidate in DOCKER_CLIENTS:
        if Path(candidate).exists():
            return candidate
    return tool("docker")


class Dockerd:
    """The dockerd of one lab host: its paths, command line, start, stop and client."""

    def __init__(self, ns: str, host_dir: Path) -> None:
        self.ns = ns
        self.dir = host_dir / "docker"
        self.socket = host_dir / "docker.sock"
        self.options_file = host_dir / "docker_opts.env"
        self.pid_file = host_dir / "dockerd.pid"  # ours: pid and start time
        self.log_file = host_dir / "dockerd.log"

    @property
    def data_root(self) -> Path:
        return self.dir / "data"

    @property
    def exec_root(self) -> Path:
        return self.dir / "exec"

    def argv(self) -> list[str]:
        return ["nsenter", f"--net=/run/netns/{self.ns}", tool("dockerd"),
                "--data-root", str(self.data_root), "--exec-root", str(self.exec_root),
                "--pidfile", str(self.dir / "dockerd.pid"), "-H", f"unix://{self.socket}",
                "--storage-driver", "vfs", *network_options(self.options_file)]

    def docker(self, *args: str, timeout: float = 60, check: bool = True) -> str:
        return run([docker_client(), "-H", f"unix://{self.socket}", *args], timeout=timeout,
                   check=check)

    def exec_prefix(self, container: str) -> list[str]:
        """How to run a command inside `container`."""
        return [docker_client(), "-H", f"unix://{self.socket}", "exec", container]

    def running(self) -> processes.Process | None:
        return processes.running(self.pid_file)

    def start(self, *, timeout: float = 60) -> None:
        if not self.options_file.exists():
            raise LabError(f"{self.options_file}: the agent has not written Docker's options")
        self.dir.mkdir(parents=True, exist_ok=True)
        processes.spawn(self.argv(), log_file=self.log_file, pid_file=self.pid_file)
        deadline = time.monotonic() + timeout
        while True:
            if self.socket.exists() and self.docker("info", "--format", "{{.ID}}",
                                                    timeout=10, check=False).strip():
                return
            if self.running() is None:
                raise DockerError(f"dockerd in {self.ns} exited:\n"
                                  + processes.log_tail(self.log_file))
            if time.monotonic() > deadline:
                raise DockerError(f"dockerd in {self.ns} did not answer within {timeout}s:\n"
                                  + processes.log_tail(self.log_file))
            time.sleep(0.2)

    def stop(self) -> None:
        """SIGTERM (dockerd stops its containers and its containerd), SIGKILL if it must."""
        proc = self.running()
        if proc is not None:
            proc.stop(first=signal.SIGTERM, grace=30)
        self.pid_file.unlink(missing_ok=True)

    def restart(self) -> None:
        self.stop()
        self.start()

    # ---------------------------------------------------------------- containers

    def load_image(self) -> None:
        tarball = image_tarball()
        self.docker("import", str(tarball), IMAGE)

    def run_container(self, name: str) -> IPv4Address:
        """A container sleeping forever, restarted with dockerd; its eth0 address."""
        # `sleep` as PID 1 ignores SIGTERM: a stop (dockerd's restart, `down`) is a
        # second's wait, not docker's ten.
        self.docker("run", "-d", "--restart", "always", "--stop-timeout", "1", "--name", name,
                    "--hostname", name, IMAGE, "sleep", "1000000000")
        return self.container_ip(name)

    def container_ip(self, name: str, *, timeout: float = 30) -> IPv4Address:
        return IPv4Address(self._bridge_address(name, "IPAddress", timeout=timeout))

    def container_ip6(self, name: str, *, timeout: float = 30) -> IPv6Address:
        """Its address in --fixed-cidr-v6 (dockerd on the options of a dual-stack agent)."""
        return IPv6Address(self._bridge_address(name, "GlobalIPv6Address", timeout=timeout))

    def _bridge_address(self, name: str, key: str, *, timeout: float) -> str:
        """The container's `key` on Docker's bridge network, as `docker inspect` has it."""
        deadline = time.monotonic() + timeout
        while True:
            out = self.docker("inspect", "-f", "{{json .NetworkSettings.Networks}}", name,
                              check=False)
            try:
                address = json.loads(out)["bridge"][key]
                if address:
                    return str(address)
            except (ValueError, KeyError, TypeError):
                pass
            if time.monotonic() > deadline:
                raise LabError(f"container {name} in {self.ns} has no {key} after {timeout}s")
            time.sleep(0.1)


def image_tarball() -> Path:
    """The busybox image as a tarball, made once from Debian's busybox-static."""
    busybox = shutil.which("busybox", path="/usr/bin:/bin:/usr/sbin")
    if busybox is None:
        raise LabError("busybox not found; apt-get install --no-install-recommends busybox-static")
    content = Path(busybox).read_bytes()
    tarball = IMAGE_CACHE / f"busybox-{hashlib.sha256(content).hexdigest()[:16]}.tar"
    if tarball.exists():
        return tarball
    IMAGE_CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="leaseagent-lab-image-") as d:
        bindir = Path(d) / "bin"
        bindir.mkdir()
        (bindir / "busybox").write_bytes(content)
        (bindir / "busybox").chmod(0o755)
        for applet in APPLETS:
            (bindir / applet).symlink_to("busybox")
        partial = tarball.with_suffix(".partial")
        run(["tar", "-C", d, "-cf", str(partial), "."])
        partial.rename(tarball)
    return tarball


def purge_image_cache() -> None:
    """Remove the image tarballs (the systemd lab's root filesystem beside them stays)."""
    for tarball in IMAGE_CACHE.glob("busybox-*"):
        tarball.unlink(missing_ok=True)


def forward_accept(ns: str, network: str) -> None:
    """What the README tells an operator to add where Docker's FORWARD policy is DROP
    (idempotent: added once)."""
    inside = ["nsenter", f"--net=/run/netns/{ns}", tool("iptables")]
    rule = ["DOCKER-USER", "-s", network, "-d", network, "-j", "ACCEPT"]
    present = subprocess.run([*inside, "-C", *rule], capture_output=True, check=False)
    if present.returncode != 0:
        run([*inside, "-I", *rule])


# ---------------------------------------------------------------- teardown


def leftover_container_processes(state_path: Path) -> list[processes.Process]:
    """Processes of the lab's Docker containers still running after their dockerd went
    (it was SIGKILLed, say): found by the container ids in the cgroup paths."""
    ids = {d.name for d in state_path.glob("h*/docker/data/containers/*") if d.is_dir()}
    if not ids:
        return []
    found = []
    for proc_dir in Path("/proc").iterdir():
        if not proc_dir.name.isdigit():
            continue
        try:
            cgroup = (proc_dir / "cgroup").read_text()
        except OSError:
            continue
        if any(container_id in cgroup for container_id in ids):
            pid = int(proc_dir.name)
            start = processes.start_time(pid)
            if start is not None:
                found.append(processes.Process(pid, start))
    return found


def mounted_under(path: Path) -> list[str]:
    """Mount points at or below `path`."""
    prefix = str(path).rstrip("/") + "/"
    mounts = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        target = line.split()[1].encode().decode("unicode_escape")
        if target.startswith(prefix):
            mounts.append(target)
    return sorted(set(mounts), key=len, reverse=True)


def unmount_under(path: Path) -> list[str]:
    """Unmount everything mounted at or below `path` (dockerd bind-mounts its data root,
    mounts each container's /dev/shm and network namespace file), deepest first."""
    warnings = []
    for target in mounted_under(path):
        done = subprocess.run(["umount", target], capture_output=True, text=True, check=False)
        if done.returncode != 0:
            lazy = subprocess.run(["umount", "-l", target], capture_output=True, text=True,
                                  check=False)
            if lazy.returncode != 0:
                warnings.append(f"cannot unmount {target}: {lazy.stderr.strip()}")
    return warnings


# ---------------------------------------------------------------- the restart hook


def hook_argv(ns: str, host_dir: Path) -> list[str]:
    return [sys.executable, "-m", "leaseagent.lab.docker", "hook", ns, str(host_dir)]


def hook(ns: str, host_dir: Path, *, interval: float = 0.2) -> None:
    """Restart the host's dockerd whenever the options file's content changes (what
    systemd's leaseagent-docker-restart.path does on a host)."""
    dockerd = Dockerd(ns, host_dir)
    seen = dockerd.options_file.read_bytes() if dockerd.options_file.exists() else b""
    while True:
        time.sleep(interval)
        try:
            now = dockerd.options_file.read_bytes()
        except OSError:
            continue
        if now != seen:
            seen = now
            print(f"hook: {dockerd.options_file} changed; restarting dockerd", flush=True)
            dockerd.restart()


def main(argv: Sequence[str]) -> int:
    if len(argv) == 3 and argv[0] == "hook":
        hook(argv[1], Path(argv[2]))
        return 0
    print("usage: python -m leaseagent.lab.docker hook NS HOST_DIR", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
