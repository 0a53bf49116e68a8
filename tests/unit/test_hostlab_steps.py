"""The systemd lab runs the README's "Install on a real host" commands as they stand: what
it reads from README.md, what it leaves to itself, what it substitutes (pure: no hosts)."""

from __future__ import annotations

from pathlib import Path

import pytest

from leaseagent.lab import rootfs
from leaseagent.lab.errors import LabError
from leaseagent.lab.hostlab import (
    ETCD_URL,
    SUBSTITUTIONS,
    HostLab,
    apt_packages,
    check_packages,
    install_steps,
    wheelhouse_dir,
)
from leaseagent.lab.machines import Machine

README = Path(__file__).resolve().parents[2] / "README.md"


def test_the_lab_runs_every_line_of_the_readme_but_apt_get_and_git_clone():
    """Skipped: `apt-get` and `git clone` lines, and, where the README has an offline
    install (`install.sh --wheelhouse DIR`), the online install's block. install.sh
    runs exactly once, every other line as the README has it but for the lab's values."""
    steps = install_steps(README)
    assert len(steps) >= 5
    installs = []
    for step in steps:
        ran = step.script.splitlines()
        assert len(ran) == len(step.text.splitlines())
        online_block = "install.sh" in step.text and "--wheelhouse" not in step.text
        for line, original in zip(ran, step.text.splitlines(), strict=True):
            if original in step.skipped:
                assert line.startswith("#")
                assert original.split()[0] in ("apt-get", "git") or online_block, original
            else:
                assert line == _substituted(original)
                if "deploy/install.sh" in line:
                    installs.append(line)
    assert len(installs) == 1, installs


def test_the_offline_install_names_where_the_wheelhouse_goes(tmp_path: Path):
    readme = tmp_path / "README.md"
    readme.write_text("## Install on a real host\n\n```\napt-get install -y python3\n"
                      "/usr/src/leaseagent/deploy/install.sh --docker\nleaseagent --version\n```\n\n"
                      "offline:\n\n```\n/usr/src/leaseagent/deploy/install.sh --docker "
                      "--wheelhouse /srv/wheels\nleaseagent --version\n```\n")
    steps = install_steps(readme)
    assert steps[0].skipped == steps[0].text.splitlines()
    assert steps[1].skipped == []
    assert wheelhouse_dir(steps) == "/srv/wheels"
    # Without an offline install the lab cannot install its hosts: it says so.
    readme.write_text("## Install on a real host\n\n```\n/usr/src/leaseagent/deploy/install.sh\n```\n")
    with pytest.raises(LabError, match="no offline install"):
        wheelhouse_dir(install_steps(readme))


def _substituted(line: str) -> str:
    for example, ours in SUBSTITUTIONS:
        line = line.replace(example, ours)
    return line


def test_each_substitution_meets_its_example_in_the_readme():
    """A README edit that drops an example value would leave the lab on the README's
    placeholder silently: each one must occur."""
    text = "\n".join(s.text for s in install_steps(README))
    for example, _ in SUBSTITUTIONS:
        assert example in text, example
    script = "\n".join(s.script for s in install_steps(README))
    assert f"LEASEAGENT_ETCD_ENDPOINTS={ETCD_URL}" in script


def test_only_the_network_config_runs_once_per_cluster():
    once = [s for s in install_steps(README) if s.once]
    assert len(once) == 1 and "leasectl config set" in once[0].text


def test_the_root_filesystem_has_every_package_the_readme_installs():
    steps = install_steps(README)
    assert {"python3", "python3-venv", "iptables", "ipset"} <= set(apt_packages(steps))
    check_packages(steps)


def test_a_package_the_root_filesystem_lacks_is_named(tmp_path: Path):
    readme = tmp_path / "README.md"
    readme.write_text("## Install on a real host\n\n```\napt-get install -y nftables frobnicate\n"
                      "install.sh\n```\n\n### Next\n\n```\nnot this\n```\n")
    steps = install_steps(readme)
    assert [s.text for s in steps] == ["apt-get install -y nftables frobnicate\ninstall.sh"]
    with pytest.raises(LabError, match="nftables, frobnicate"):
        check_packages(steps)


def test_a_readme_without_the_section_is_an_error(tmp_path: Path):
    readme = tmp_path / "README.md"
    readme.write_text("# nothing\n")
    with pytest.raises(LabError, match="no section"):
        install_steps(readme)


def test_the_cluster_network_is_the_readmes():
    lab = HostLab.__new__(HostLab)
    lab.steps = install_steps(README)
    assert str(lab.network()) == "10.5.0.0/16"


def test_apt_mirror_from_one_line_and_deb822_sources(tmp_path: Path):
    one = tmp_path / "sources.list"
    one.write_text("# x\ndeb [arch=amd64] http://mirror.example/debian bookworm main\n")
    assert rootfs.apt_mirror([one]) == "http://mirror.example/debian"
    d = tmp_path / "sources.list.d"
    d.mkdir()
    (d / "debian.sources").write_text(
        "Types: deb\nURIs: http://deb.example/debian/\nSuites: bookworm bookworm-updates\n")
    assert rootfs.apt_mirror([tmp_path / "none", d]) == "http://deb.example/debian"
    assert rootfs.apt_mirror([tmp_path / "none"]) == rootfs.DEFAULT_MIRROR


def test_the_root_filesystems_cache_key_follows_what_goes_in():
    key = rootfs.rootfs_key("http://a/debian")
    assert rootfs.rootfs_key("http://a/debian") == key
    assert rootfs.rootfs_key("http://b/debian") != key
    assert rootfs.rootfs_key("http://a/debian", (*rootfs.PACKAGES, "nftables")) != key


def test_nspawn_gets_what_a_host_needs_here(tmp_path: Path):
    m = Machine(name="hosts-h1", ns="la-hosts-h1", dir=tmp_path / "h1", rootfs=tmp_path / "fs",
                binds_ro=[(tmp_path / "wheels", "/var/cache/leaseagent/wheels")])
    argv = m.argv()
    for flag in ("--boot", "--capability=all", "--system-call-filter=add_key keyctl bpf",
                 "--register=no", "--keep-unit", "--network-namespace-path=/run/netns/la-hosts-h1",
                 f"--directory={tmp_path / 'h1' / 'root'}",
                 f"--bind={tmp_path / 'h1' / 'var-lib-docker'}:/var/lib/docker",
                 f"--bind-ro={tmp_path / 'wheels'}:/var/cache/leaseagent/wheels"):
        assert flag in argv, flag
    # Its own machine id (the agent's node id), the same after a reboot, another host's
    # differs.
    again = Machine(name="hosts-h1", ns="x", dir=tmp_path, rootfs=tmp_path)
    other = Machine(name="hosts-h2", ns="x", dir=tmp_path, rootfs=tmp_path)
    assert f"--uuid={m.uuid}" in argv and again.uuid == m.uuid != other.uuid
    assert m.root_upper("/etc/hostname") == tmp_path / "h1" / "upper" / "etc" / "hostname"


def test_an_unreachable_mirror_is_one_line_before_debootstrap_runs(tmp_path: Path):
    cache = tmp_path / "cache"
    with pytest.raises(LabError, match=r"Debian mirror http://127\.0\.0\.1:9/debian not reachable"):
        rootfs.rootfs(cache=cache, mirror="http://127.0.0.1:9/debian")
    assert not cache.exists()
