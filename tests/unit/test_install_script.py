"""deploy/install.sh: shellcheck-clean, idempotent, files where and as they should be.

Installs into a temporary --root with --no-venv (creating the venv would
download the dependencies); the real system is never touched.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).parents[2]
SCRIPT = REPO / "deploy" / "install.sh"
SCRIPTS = [SCRIPT, *(REPO / "deploy" / "vagrant" / name
                     for name in ("provision.sh", "check.sh", "lab.sh", "build-box.sh"))]


def snapshot(root: Path) -> dict[str, tuple[str, ...]]:
    """Every path under root: (mode, link target or content hash)."""
    out: dict[str, tuple[str, ...]] = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        mode = stat.filemode(st.st_mode)
        if path.is_symlink():
            out[str(path.relative_to(root))] = (mode, str(path.readlink()))
        elif path.is_file():
            out[str(path.relative_to(root))] = (mode, hashlib.sha256(path.read_bytes()).hexdigest())
        else:
            out[str(path.relative_to(root))] = (mode,)
    return out


def install(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(SCRIPT), "--root", str(root), "--no-venv", *args],
                          capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shellcheck_clean(script: Path):
    result = subprocess.run(["shellcheck", "-x", str(script)], capture_output=True, text=True,
                            check=False)
    assert result.returncode == 0, result.stdout


def test_twice_gives_the_same_tree_with_the_right_modes(tmp_path: Path):
    first = install(tmp_path, "--docker")
    assert first.returncode == 0, first.stderr
    tree = snapshot(tmp_path)
    second = install(tmp_path, "--docker")
    assert second.returncode == 0, second.stderr
    assert snapshot(tmp_path) == tree

    assert tree["etc/systemd/system/leaseagent.service"][0] == "-rw-r--r--"
    assert (tmp_path / "etc/systemd/system/leaseagent.service").read_bytes() == \
        (REPO / "systemd/leaseagent.service").read_bytes()
    assert tree["etc/systemd/system/docker.service.d/leaseagent.conf"][0] == "-rw-r--r--"
    assert tree["etc/default/leaseagent"][0] == "-rw-r--r--"
    assert tree["etc/leaseagent"] == ("drwx------",)
    assert tree["usr/local/bin/leaseagent"] == ("lrwxrwxrwx", "/opt/leaseagent/bin/leaseagent")
    assert tree["usr/local/bin/leasectl"] == ("lrwxrwxrwx", "/opt/leaseagent/bin/leasectl")
    assert "opt" not in {p.split("/")[0] for p in tree}  # --no-venv
    assert tree["usr/share/bash-completion/completions/leasectl"][0] == "-rw-r--r--"


def test_operator_settings_are_kept_and_credentials_dir_tightened(tmp_path: Path):
    assert install(tmp_path).returncode == 0
    default = tmp_path / "etc/default/leaseagent"
    default.write_text("LEASEAGENT_ETCD_ENDPOINTS=http://10.0.0.9:2379\n")
    (tmp_path / "etc/leaseagent").chmod(0o755)
    assert install(tmp_path).returncode == 0
    assert default.read_text() == "LEASEAGENT_ETCD_ENDPOINTS=http://10.0.0.9:2379\n"
    assert stat.S_IMODE((tmp_path / "etc/leaseagent").stat().st_mode) == 0o700


def test_docker_drop_in_only_with_the_flag(tmp_path: Path):
    assert install(tmp_path).returncode == 0
    assert not (tmp_path / "etc/systemd/system/docker.service.d").exists()


def test_bad_arguments_are_one_line(tmp_path: Path):
    bad = install(tmp_path, "--wheel", str(tmp_path / "nope.whl"))
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines() == [f"install.sh: --wheel {tmp_path}/nope.whl: no such file"]
    missing_root = install(tmp_path / "nowhere")
    assert missing_root.returncode == 1 and "no such directory" in missing_root.stderr
    unknown = install(tmp_path, "--frobnicate")
    assert unknown.returncode == 2 and "unknown argument: --frobnicate" in unknown.stderr
    helped = subprocess.run(["bash", str(SCRIPT), "--help"], capture_output=True, text=True,
                            check=False)
    assert helped.returncode == 0 and helped.stdout.startswith("usage: install.sh")


def test_uninstall_removes_what_it_installed_and_keeps_the_operators_files(tmp_path: Path):
    assert install(tmp_path, "--docker").returncode == 0
    (tmp_path / "etc/default/leaseagent").write_text("LEASEAGENT_IFACE=eth1\n")
    gone = install(tmp_path, "--uninstall")
    assert gone.returncode == 0, gone.stderr
    left = set(snapshot(tmp_path))
    assert {"etc/default/leaseagent", "etc/leaseagent"} <= left
    assert not [p for p in left if "leaseagent" in p and p not in
                {"etc/default/leaseagent", "etc/leaseagent"}], left
    assert install(tmp_path, "--uninstall", "--purge").returncode == 0
    assert not [p for p in snapshot(tmp_path) if "leaseagent" in p]


def test_docker_drop_in_keeps_the_installed_dockerd_command(tmp_path: Path):
    """docker-ce's unit runs /usr/bin/dockerd with its own flags: they all stay."""
    unit = tmp_path / "lib/systemd/system/docker.service"
    unit.parent.mkdir(parents=True)
    unit.write_text("[Service]\nExecStart=/usr/bin/dockerd -H fd:// --containerd=/run/c.sock "
                    "--log-level=warn\n")
    assert install(tmp_path, "--docker").returncode == 0
    dropin = (tmp_path / "etc/systemd/system/docker.service.d/leaseagent.conf").read_text()
    assert dropin.splitlines()[-2:] == [
        "ExecStart=",
        "ExecStart=/usr/bin/dockerd -H fd:// --containerd=/run/c.sock --log-level=warn "
        "$DOCKER_NETWORK_OPTIONS"]
    assert "EnvironmentFile=-/run/leaseagent/docker_opts.env" in dropin
    assert not [line for line in dropin.splitlines() if line.startswith("Requires=")]


def test_the_installed_completion_is_what_leasectl_generates():
    from leaseagent.cli.completion import bash_completion

    assert (REPO / "deploy" / "leasectl.bash-completion").read_text() == bash_completion()


def test_vagrantfile_is_valid(tmp_path: Path):
    """`vagrant validate` when Vagrant is installed, else `ruby -c`, else skip.

    Runs on a copy, so Vagrant's .vagrant/ state lands in tmp_path, not in deploy/.
    """
    project = tmp_path / "deploy"
    project.mkdir()
    shutil.copy(REPO / "deploy" / "Vagrantfile", project / "Vagrantfile")
    shutil.copytree(REPO / "deploy" / "vagrant", project / "vagrant")
    if shutil.which("vagrant"):
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(tmp_path),
               "VAGRANT_HOME": str(tmp_path / "vagrant.d"), "VAGRANT_CHECKPOINT_DISABLE": "1"}
        for hosts in ("3", "5"):
            result = subprocess.run(["vagrant", "validate", "--ignore-provider"], cwd=project,
                                    env={**env, "LEASEAGENT_HOSTS": hosts},
                                    capture_output=True, text=True, timeout=300, check=False)
            assert result.returncode == 0, result.stdout + result.stderr
            assert f"host{hosts}:" in result.stdout
    elif shutil.which("ruby"):
        result = subprocess.run(["ruby", "-c", str(project / "Vagrantfile")],
                                capture_output=True, text=True, timeout=60, check=False)
        assert result.returncode == 0, result.stderr
    else:
        pytest.skip("neither vagrant nor ruby installed")


def test_docker_without_apparmor_parser_on_an_apparmor_kernel_is_warned(tmp_path: Path):
    """docker.io only recommends apparmor: with AppArmor on in the kernel and no
    apparmor_parser, every `docker run` fails (the Vagrant lab's VMs); install.sh says so."""
    flag = tmp_path / "enabled"
    root = tmp_path / "root"
    root.mkdir()

    def run(state: str) -> str:
        flag.write_text(f"{state}\n")
        out = subprocess.run(["bash", str(SCRIPT), "--root", str(root), "--no-venv", "--docker"],
                             capture_output=True, text=True, timeout=60, check=False,
                             env={**os.environ, "LEASEAGENT_APPARMOR_ENABLED": str(flag),
                                  "PATH": "/usr/bin:/bin"})
        assert out.returncode == 0, out.stderr
        return out.stderr

    if shutil.which("apparmor_parser", path="/usr/bin:/bin"):
        pytest.skip("apparmor_parser is installed on this machine")
    assert "AppArmor on but apparmor_parser is missing" in run("Y")
    assert "apparmor" not in run("N")
    parser = root / "usr/sbin/apparmor_parser"
    parser.parent.mkdir(parents=True, exist_ok=True)
    parser.write_text("#!/bin/sh\n")
    parser.chmod(0o755)
    assert "apparmor" not in run("Y")
