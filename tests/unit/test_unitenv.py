"""leasectl's settings on a host: the installed unit's environment (Environment=, then
EnvironmentFile=, drop-ins after the unit) under the shell's own variables."""

from __future__ import annotations

from pathlib import Path

from leaseagent.cli.unitenv import host_environment, unit_environment, unit_files
from leaseagent.core.subnetenv import parse_environment_file

REPO = Path(__file__).parents[2]


def installed(tmp_path: Path, default_text: str) -> Path:
    """The shipped unit as install.sh puts it, its EnvironmentFile= pointed into tmp_path."""
    default = tmp_path / "default-leaseagent"
    default.write_text(default_text)
    unit = tmp_path / "system" / "leaseagent.service"
    unit.parent.mkdir()
    unit.write_text((REPO / "systemd" / "leaseagent.service").read_text()
                    .replace("/etc/default/leaseagent", str(default)))
    return unit


def test_the_units_defaults_then_the_operators_file_then_the_shell(tmp_path: Path) -> None:
    shipped = (REPO / "deploy" / "leaseagent.default").read_text()
    unit = installed(tmp_path, shipped + "LEASEAGENT_ETCD_ENDPOINTS=http://10.0.0.10:2379\n"
                     "LEASEAGENT_IFACE=eth1\nLEASEAGENT_METRICS_ADDR=127.0.0.1:9700\n")
    env = host_environment({"LEASEAGENT_IFACE": "eth2", "HOME": "/root"}, unit)
    assert env["LEASEAGENT_ETCD_ENDPOINTS"] == "http://10.0.0.10:2379"  # the operator's file
    assert env["LEASEAGENT_METRICS_ADDR"] == "127.0.0.1:9700"  # the file wins over the unit
    assert env["LEASEAGENT_DOCKER_OPTS_FILE"] == "/run/leaseagent/docker_opts.env"  # the unit's
    assert env["LEASEAGENT_IFACE"] == "eth2"  # the shell wins over both
    assert env["HOME"] == "/root"


def test_the_shipped_unit_and_defaults_file_give_the_units_defaults_only(tmp_path: Path) -> None:
    unit = installed(tmp_path, (REPO / "deploy" / "leaseagent.default").read_text())
    assert unit_environment(unit_files(unit)) == {
        "LEASEAGENT_METRICS_ADDR": "127.0.0.1:9643",
        "LEASEAGENT_DOCKER_OPTS_FILE": "/run/leaseagent/docker_opts.env"}


def test_drop_ins_come_after_the_unit_in_name_order(tmp_path: Path) -> None:
    unit = installed(tmp_path, "")
    dropins = unit.parent / "leaseagent.service.d"
    dropins.mkdir()
    (dropins / "20-b.conf").write_text('[Service]\nEnvironment="LEASEAGENT_LOG_LEVEL=debug"\n')
    (dropins / "10-a.conf").write_text("[Service]\nEnvironment=LEASEAGENT_LOG_LEVEL=warning "
                                       "LEASEAGENT_METRICS_ADDR=127.0.0.1:9800\n")
    (dropins / "notes.txt").write_text("Environment=LEASEAGENT_LOG_LEVEL=error\n")
    env = unit_environment(unit_files(unit))
    assert env["LEASEAGENT_LOG_LEVEL"] == "debug"
    assert env["LEASEAGENT_METRICS_ADDR"] == "127.0.0.1:9800"


def test_no_unit_installed_gives_the_shell_alone(tmp_path: Path) -> None:
    assert host_environment({"A": "1"}, tmp_path / "none.service") == {"A": "1"}


def test_environment_file_syntax() -> None:
    text = ('# comment\n; another\n\nA=1\n B = two words \nC="quoted value"\n'
            "D='single'\nnot a setting\nE=\n")
    assert parse_environment_file(text) == {"A": "1", "B": "two words", "C": "quoted value",
                                           "D": "single", "E": ""}
