"""The systemd lab, shortened: 2 hosts booted by systemd-nspawn, installed by the README's
own steps (install.sh --docker offline from the wheelhouse, /etc/default/leaseagent, the
docker drop-in), each running the shipped unit and a real dockerd with 2 containers.

Each check of `deploy/lab hosts check` is a test here, in its order, on one lab
(the full form: `deploy/lab hosts run`, 3 hosts). Docker's FORWARD policy is
DROP on every host, so the agent's own rules carry the overlay's traffic.

Skipped, with the reason, where the machine cannot: not root, no
systemd-nspawn or debootstrap, no cgroup hierarchy, or no Debian mirror to build
the root filesystem from (built once, ~1 minute here, then cached in
/var/cache/leaseagent-lab/). With a cached root filesystem the module takes
1-2 minutes here.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from leaseagent.lab import machines, rootfs
from leaseagent.lab.errors import LabError
from leaseagent.lab.hostlab import CHECKS, WATCHDOG_SEC, HostLab, check

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root (nspawn, namespaces)")]


@pytest.fixture(scope="module")
def host_lab() -> Iterator[HostLab]:
    why = machines.unavailable()
    if why:
        pytest.skip(f"systemd lab cannot run here: {why}")
    try:
        rootfs.rootfs()
    except LabError as exc:
        pytest.skip(f"systemd lab: no root filesystem for its hosts: {exc}")
    lab = HostLab(f"sd{os.getpid() % 100000}")
    try:
        lab.up(2)
        yield lab
    finally:
        warnings = lab.down()
        assert not warnings, warnings
        assert not lab.topology.present() and not lab.state.exists()


def run_check(lab: HostLab, name: str) -> str:
    [result] = check(lab, [name])
    assert result.ok, f"{name}: {result.detail}"
    return result.detail


def test_checks_are_all_here():
    assert [name for name, _ in CHECKS] == [
        "forward policy", "cross-host pings", "status line", "journal", "restart, 0 pings lost",
        "watchdog",
        "config error", "docker without the agent", "reboot"]


def test_hosts_are_installed_by_the_readme(host_lab: HostLab):
    """Each host runs the shipped unit (the lab's watchdog drop-in aside) and Docker under
    the shipped drop-in, on the subnet its agent leased."""
    for i, m in host_lab.machines.items():
        unit = host_lab.unit(i, "leaseagent", "ActiveState", "DropInPaths", "FragmentPath",
                             "WatchdogUSec")
        assert unit["ActiveState"] == "active"
        assert unit["FragmentPath"] == "/etc/systemd/system/leaseagent.service"
        assert unit["WatchdogUSec"] == f"{WATCHDOG_SEC}s"
        assert "docker.service.d/leaseagent.conf" in host_lab.unit(
            i, "docker", "DropInPaths")["DropInPaths"]
        docker0 = m.exec(["ip", "-4", "-o", "addr", "show", "docker0"]).stdout.split()[3]
        assert docker0 == str(host_lab.subnet(i))
        assert host_lab.subnet(i).network.subnet_of(host_lab.network())


def test_forward_policy_is_drop(host_lab: HostLab):
    run_check(host_lab, "forward policy")


def test_containers_reach_across_hosts(host_lab: HostLab):
    run_check(host_lab, "cross-host pings")


def test_status_line_counts_every_peer(host_lab: HostLab):
    run_check(host_lab, "status line")


def test_journal_lines_carry_one_timestamp(host_lab: HostLab):
    run_check(host_lab, "journal")


def test_agent_restart_loses_no_ping_and_stops_no_container(host_lab: HostLab):
    run_check(host_lab, "restart, 0 pings lost")


def test_sigstopped_agent_is_restarted_by_the_watchdog(host_lab: HostLab):
    run_check(host_lab, "watchdog")


def test_config_error_exits_2_and_docker_keeps_running(host_lab: HostLab):
    run_check(host_lab, "config error")


def test_docker_restarts_without_the_agent(host_lab: HostLab):
    run_check(host_lab, "docker without the agent")


def test_reboot_takes_back_its_subnet(host_lab: HostLab):
    run_check(host_lab, "reboot")
