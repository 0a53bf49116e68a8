"""The README's "Install on a real host", step by step, on a throw-away root.

What a host would have is given to it here: `install.sh` installs into a
temporary root (a real venv with the package), the "host" is a network
namespace with an underlay link to a namespace running etcd, and the agent
runs as the installed unit says (its Environment= lines, then
/etc/default/leaseagent, then ExecStart=) in a private mount namespace whose
/run/leaseagent, /run/flannel and /var/lib/leaseagent are tmpfs, so nothing
is written to this machine's own. systemd itself is not running here: READY=1
is read from a NOTIFY_SOCKET the test listens on, as systemd would.
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

from leaseagent.lab import etcd as lab_etcd
from leaseagent.lab import netns, processes

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root (namespaces, mounts)")]

REPO = Path(__file__).parents[2]
PRIVATE_DIRS = ("/run/leaseagent", "/run/flannel", "/var/lib/leaseagent")
NETWORK_CONFIG = '{"Network": "10.5.0.0/16", "Backend": {"Type": "vxlan"}}'


def unit_environment(unit: Path, default_file: Path) -> dict[str, str]:
    """What systemd gives ExecStart=: the unit's Environment=, then the EnvironmentFile=."""
    env: dict[str, str] = {}
    for line in unit.read_text().splitlines():
        if line.startswith("Environment="):
            name, _, value = line.removeprefix("Environment=").partition("=")
            env[name] = value
    for line in default_file.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            name, _, value = line.partition("=")
            env[name] = value
    return env


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
        for d in PRIVATE_DIRS:
            subprocess.run(["nsenter", f"--mount={mnt}", "mount", "-t", "tmpfs", "tmpfs", d],
                           check=True)
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


def test_the_readme_install_path_works_as_written(world: dict[str, object], tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    host_ns, mnt = str(world["host_ns"]), str(world["mnt"])
    etcd = world["etcd"]
    assert isinstance(etcd, lab_etcd.Etcd)

    # 1. The package (a real venv: what `install.sh --docker` does on a host).
    step = subprocess.run(["bash", str(REPO / "deploy/install.sh"), "--docker", "--root", str(root)],
                          capture_output=True, text=True, timeout=600, check=False)
    assert step.returncode == 0, step.stderr
    bindir = root / "opt/leaseagent/bin"
    version = subprocess.run([bindir / "leaseagent", "--version"], capture_output=True, text=True,
                             check=True)
    assert version.stdout.startswith("leaseagent ")

    # 2. The settings, appended as the README does.
    default_file = root / "etc/default/leaseagent"
    with default_file.open("a") as f:
        f.write(f"LEASEAGENT_ETCD_ENDPOINTS={etcd.url}\nLEASEAGENT_IFACE=eth0\n")

    def on_host(*argv: str | Path, env: dict[str, str], **kw: object) -> subprocess.CompletedProcess[str]:
        cmd = ["nsenter", f"--mount={mnt}", f"--net=/run/netns/{host_ns}", *map(str, argv)]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False,
                              env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", **env}, **kw)  # type: ignore[call-overload, no-any-return]

    # `set -a; . /etc/default/leaseagent; set +a`: the same variables for leasectl.
    settings = unit_environment(Path("/dev/null"), default_file)
    # 3. The network config, once per cluster.
    step = on_host(bindir / "leasectl", "config", "set", "-", env=settings, input=NETWORK_CONFIG)
    assert step.returncode == 0, step.stderr

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
    env = {**unit_environment(unit, default_file), "NOTIFY_SOCKET": str(notify)}
    agent = processes.spawn(
        ["nsenter", f"--mount={mnt}", f"--net=/run/netns/{host_ns}", "env", "-i",
         "PATH=/usr/sbin:/usr/bin:/sbin:/bin", *(f"{k}={v}" for k, v in env.items()),
         str(bindir / "leaseagent")],
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

        listed = on_host(bindir / "leasectl", "list", env=settings)
        assert listed.returncode == 0, listed.stderr
        assert "10.98.0.2" in listed.stdout and " ok" in listed.stdout, listed.stdout
        doctor = on_host(bindir / "leasectl", "doctor", env=settings)
        assert doctor.returncode == 0, doctor.stdout + doctor.stderr
        assert doctor.stdout.startswith("ok: lease 10.5."), doctor.stdout
        # Docker's options are where the drop-in reads them, under the variable it names.
        opts = on_host("cat", "/run/leaseagent/docker_opts.env", env={})
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
