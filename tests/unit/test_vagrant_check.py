"""deploy/vagrant/check.sh fails loudly: one line naming what failed and why, exit 1.

It once exited 127 without a word when a command in a VM failed. The real lab
(deploy/vagrant/lab.sh check) needs VMs; these cases need none: the failures
happen before any VM is reached, with a `vagrant` and an `ssh` on PATH that
fail the way the real ones do when the lab is down or a command in a VM fails.
"""

import subprocess
from pathlib import Path

REPO = Path(__file__).parents[2]
CHECK = REPO / "deploy" / "vagrant" / "check.sh"


def run_check(tmp_path: Path, tools: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in tools.items():
        tool = bin_dir / name
        tool.write_text("#!/bin/sh\n" + body + "\n")
        tool.chmod(0o755)
    # The stand-ins first; the system's tools (bash, coreutils, python3) after them.
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path), "LANG": "C.UTF-8"}
    return subprocess.run(["bash", str(CHECK), *args], capture_output=True, text=True,
                          env=env, timeout=60, check=False)


def test_a_lab_that_is_not_up_is_named(tmp_path: Path):
    vagrant = ('echo "The machine with the name \'host1\' was not found configured for'
               ' this Vagrant environment." >&2; exit 1')
    result = run_check(tmp_path, {"vagrant": vagrant})
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("check: FAILED: vagrant ssh-config host1 host2 host3:")
    assert "not found configured" in lines[0]
    assert "vagrant status" in lines[0]


def test_a_command_failing_in_a_vm_names_the_host_the_step_and_what_it_said(tmp_path: Path):
    # ssh-config works; in the VM `systemctl is-active leaseagent.service` says
    # "failed" with exit 3, as systemctl does for a failed unit.
    ssh = 'echo failed; echo "Job for leaseagent.service failed." >&2; exit 3'
    result = run_check(tmp_path, {"vagrant": "echo Host host1", "ssh": ssh})
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0] == ("check: FAILED: host1: leaseagent.service is not active (exit 3): "
                        "failed Job for leaseagent.service failed.")


def test_bad_arguments_exit_2_with_the_usage(tmp_path: Path):
    result = run_check(tmp_path, {}, "--backend", "udp")
    assert result.returncode == 2
    assert result.stderr.strip() == "check: --backend udp: vxlan, host-gw or wireguard"
