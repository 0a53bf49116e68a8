"""The README's "Install on a real host", step by step, on a throw-away root.

What a host would have is given to it here: `install.sh --wheelhouse` installs
offline into a temporary root (a real venv with the package, from a wheelhouse
made as "Installing offline" says, with the package index pointed at a port
where nothing answers and pip's config files ignored, so a fetch would fail), the
"host" is a network namespace with an underlay link to a namespace running
etcd, and the agent runs as the installed unit says (its Environment= lines,
then /etc/default/leaseagent, then ExecStart=) in a private mount namespace
whose /run/leaseagent, /run/flannel and /var/lib/leaseagent are tmpfs and whose
/etc/default and /etc/systemd/system hold the installed files, so nothing is
written to this machine's own. leasectl runs there as from a new root shell:
no LEASEAGENT_* variable set, it finds the unit's. systemd itself is not
running here: READY=1 is read from a NOTIFY_SOCKET the test listens on, as
systemd would.
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from leaseagent.cli.unitenv import unit_environment
from leaseagent.core.subnetenv import parse_environment_file
from leaseagent.lab import etcd as lab_etcd
from leaseagent.lab import netns, processes, rootfs
from leaseagent.lab.errors import LabError

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root (namespaces, mounts)")]

REPO = Path(__file__).parents[2]
PRIVATE_DIRS = ("/run/leaseagent", "/run/flannel", "/var/lib/leaseagent")
# Hidden by tmpfs in the private mount namespace, then given the installed root's files.
INSTALLED_DIRS = ("/etc/default", "/etc/systemd/system")
NETWORK_CONFIG = '{"Network": "10.5.0.0/16", "Backend": {"Type": "vxlan"}}'
SHELL_PATH = "PATH=/usr/sbin:/usr/bin:/sbin:/bin"
# No package index: nothing answers on port 9 of the loopback, and pip reads no config file.
OFFLINE = {"PIP_CONFIG_FILE": os.devnull, "PIP_INDEX_URL": "http://127.0.0.1:9/simple",
           "PIP_RETRIES": "0"}


@pytest.fixture(scope="module")
def wheelhouse() -> Path:
    """The wheelhouse "Installing offline" makes (with this machine's own pip settings:
    its index, or its mirror): the systemd lab's (leaseagent.lab.rootfs.wheelhouse), made
    by the same command and kept while pyproject.toml and the constraints stay the same,
    so the suite makes it once, not once per module that installs offline."""
    try:
        return rootfs.wheelhouse(REPO)
    except LabError as exc:
        pytest.skip(f"cannot make a wheelhouse here (no package index?): {str(exc)[-300:]}")


def install(*args: str | Path, tmp: Path | None = None) -> subprocess.CompletedProcess[str]:
    """install.sh offline, from a shell with nothing of ours set (`tmp`: its TMPDIR, where
    a failed pip's words are kept)."""
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root", **OFFLINE}
    if tmp is not None:
        env["TMPDIR"] = str(tmp)
    return subprocess.run(["bash", str(REPO / "deploy/install.sh"), *map(str, args)],
                          capture_output=True, text=True, timeout=600, check=False, env=env)


@pytest.fixture
def world(tmp_path: Path) -> Iterator[dict[str, object]]:
    """An etcd namespace, a host namespace, and a private mount namespace."""
    tag = f"ip{os.getpid() % 100000}"
    made = netns.Namespaces()
    created_dirs = [d for d in PRIVATE_DIRS if not Path(d).exists()]
    holder = None
    etcd = None
    try:
        etcd_ns, host_ns = made.add(f"{tag}e"), made.add(f"{tag}h")
        netns.veth(host_ns, "eth0", "eth0", peer_ns=etcd_ns)
        netns.address(etcd_ns, "eth0", "10.98.0.1/24")
        netns.address(host_ns, "eth0", "10.98.0.2/24")
        netns.link_up(etcd_ns, "eth0")
        netns.link_up(host_ns, "eth0")
        etcd = lab_etcd.Etcd(tmp_path / "etcd", 1, ns=etcd_ns, host="10.98.0.1").start()
        for d in created_dirs:
            Path(d).mkdir(parents=True)
        holder = subprocess.Popen(["unshare", "--mount", "--propagation", "private",
                                   "sleep", "3600"])
        mnt = f"/proc/{holder.pid}/ns/mnt"
        # Until unshare has run, the new process is still in our mount namespace: a
        # mount made then would land on this machine's own /run.
        deadline = time.monotonic() + 10
        while os.stat(mnt).st_ino == os.stat("/proc/self/ns/mnt").st_ino:
            assert time.monotonic() < deadline, "unshare --mount did not take effect"
            time.sleep(0.01)
        for d in (*PRIVATE_DIRS, *INSTALLED_DIRS):
            # The modes the unit gives them (StateDirectoryMode=0700, RuntimeDirectoryMode=
            # 0755): a bare tmpfs is 1777, which the agent refuses for its state dir.
            mode = "0700" if d == "/var/lib/leaseagent" else "0755"
            subprocess.run(["nsenter", f"--mount={mnt}", "mount", "-t", "tmpfs", "-o",
                            f"mode={mode}", "tmpfs", d], check=True)
        yield {"host_ns": host_ns, "etcd": etcd, "mnt": mnt}
    finally:
        if holder is not None:
            holder.kill()
            holder.wait()
        if etcd is not None:
            etcd.close()
        made.close()
        for d in reversed(created_dirs):
            Path(d).rmdir()


def test_an_offline_install_says_in_one_line_what_is_missing(tmp_path: Path) -> None:
    empty = tmp_path / "wheels"
    empty.mkdir()
    step = install("--root", tmp_path, "--wheelhouse", empty, tmp=tmp_path)
    assert step.returncode == 1
    assert step.stderr.startswith(f"install.sh: setuptools>=68 is not in the wheelhouse {empty} ")
    assert len(step.stderr.strip().splitlines()) == 1, step.stderr
    kept = list(tmp_path.glob("leaseagent-install-pip.*"))  # pip's words, named in the line
    assert len(kept) == 1 and str(kept[0]) in step.stderr
    step = install("--root", tmp_path, "--no-venv", "--wheelhouse", tmp_path / "none")
    assert step.stderr == f"install.sh: --wheelhouse {tmp_path / 'none'}: no such directory\n"


def test_the_readme_install_path_works_as_written(world: dict[str, object], tmp_path: Path,
                                                  wheelhouse: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    host_ns, mnt = str(world["host_ns"]), str(world["mnt"])
    etcd = world["etcd"]
    assert isinstance(etcd, lab_etcd.Etcd)

    # 1. The package (a real venv: what `install.sh --docker --wheelhouse DIR` does on a
    # host with no package index).
    step = install("--docker", "--wheelhouse", wheelhouse, "--root", root)
    assert step.returncode == 0, step.stderr
    bindir = root / "opt/leaseagent/bin"
    version = subprocess.run([bindir / "leaseagent", "--version"], capture_output=True, text=True,
                             check=True)
    assert version.stdout.startswith("leaseagent ")

    # 2. The settings, appended as the README does.
    default_file = root / "etc/default/leaseagent"
    with default_file.open("a") as f:
        f.write(f"LEASEAGENT_ETCD_ENDPOINTS={etcd.url}\nLEASEAGENT_IFACE=eth0\n")

    # The host's /etc as install.sh left it (in the private mount namespace only).
    for d in INSTALLED_DIRS:
        for path in (root / d.lstrip("/")).iterdir():
            target = f"{d}/{path.name}"
            subprocess.run(["nsenter", f"--mount={mnt}", "cp", "-a", str(path), target], check=True)

    def on_host(*argv: str | Path, **kw: object) -> subprocess.CompletedProcess[str]:
        """A command in a new root shell on the host: nothing of ours in its environment."""
        cmd = ["nsenter", f"--mount={mnt}", f"--net=/run/netns/{host_ns}", *map(str, argv)]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False,
                              env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root"},
                              **kw)  # type: ignore[call-overload, no-any-return]

    # 3. The network config, once per cluster: leasectl finds etcd in /etc/default/leaseagent.
    step = on_host(bindir / "leasectl", "config", "set", "-", input=NETWORK_CONFIG)
    assert step.returncode == 0, step.stderr
    # Before the start, doctor looks for the agent where the unit puts it (its default
    # LEASEAGENT_METRICS_ADDR, which no shell variable gave leasectl) and says it is not there.
    early = on_host(bindir / "leasectl", "doctor")
    assert early.returncode == 1
    assert ("agent: http://127.0.0.1:9643/readyz: Connection refused (is leaseagent running?)"
            in early.stdout.splitlines()), early.stdout + early.stderr

    # 4. Start: the unit's command with the unit's environment; ready when READY=1 comes.
    unit = root / "etc/systemd/system/leaseagent.service"
    exec_start = next(line.removeprefix("ExecStart=") for line in unit.read_text().splitlines()
                      if line.startswith("ExecStart="))
    argv = shlex.split(exec_start)
    assert argv == ["/usr/local/bin/leaseagent"]  # every setting from the environment
    notify = tmp_path / "notify.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(notify))
    listener.settimeout(60)
    # What systemd gives it: the unit's Environment=, then its EnvironmentFile= (the one
    # the root holds: this process is outside the mount namespace that has it at /etc).
    env = {**unit_environment([unit]), **parse_environment_file(default_file.read_text()),
           "NOTIFY_SOCKET": str(notify)}
    agent = processes.spawn(
        ["nsenter", f"--mount={mnt}", f"--net=/run/netns/{host_ns}", "env", "-i",
         SHELL_PATH, *(f"{k}={v}" for k, v in env.items()), str(bindir / "leaseagent")],
        log_file=tmp_path / "agent.log", env=dict(os.environ), new_session=False)
    try:
        messages: list[str] = []
        while not any(m.startswith("STATUS=ready: lease 10.5.") for m in messages):
            try:
                messages += listener.recv(4096).decode().splitlines()
            except TimeoutError:
                pytest.fail(f"not ready within 60 s ({messages}): "
                            + (tmp_path / "agent.log").read_text())
        assert "READY=1" in messages

        listed = on_host(bindir / "leasectl", "list")
        assert listed.returncode == 0, listed.stderr
        assert "10.98.0.2" in listed.stdout and " ok" in listed.stdout, listed.stdout
        # doctor also asks the agent's /readyz at the unit's LEASEAGENT_METRICS_ADDR.
        doctor = on_host(bindir / "leasectl", "doctor")
        assert doctor.returncode == 0, doctor.stdout + doctor.stderr
        assert doctor.stdout.startswith("ok: lease 10.5."), doctor.stdout
        # Docker's options are where the drop-in reads them, under the variable it names.
        opts = on_host("cat", "/run/leaseagent/docker_opts.env")
        assert "DOCKER_NETWORK_OPTIONS=" in opts.stdout
        dropin = (root / "etc/systemd/system/docker.service.d/leaseagent.conf").read_text()
        assert "$DOCKER_NETWORK_OPTIONS" in dropin
    finally:
        agent.stop(first=signal.SIGTERM)
        listener.close()

    # Uninstall: the operator's settings stay.
    step = subprocess.run(["bash", str(REPO / "deploy/install.sh"), "--uninstall", "--root", str(root)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert step.returncode == 0, step.stderr
    left = sorted(str(p.relative_to(root)) for p in root.rglob("*") if "leaseagent" in p.name)
    assert left == ["etc/default/leaseagent", "etc/leaseagent"], left
