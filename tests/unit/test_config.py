"""Agent settings from flags and LEASEAGENT_* variables; errors name the flag."""

from __future__ import annotations

from ipaddress import IPv4Address
from pathlib import Path

import pytest

from leaseagent.config import (
    DEFAULT_LEASE_TTL,
    DEFAULT_PREFIX,
    DEFAULT_SUBNET_FILE,
    AgentConfig,
    agent_parser,
    env_name,
    parse_agent_config,
)
from leaseagent.errors import ConfigError

# A node id is always given so the tests never depend on /etc/machine-id.
BASE = ["--node-id", "node-a"]


def parse(*argv: str, env: dict[str, str] | None = None) -> AgentConfig:
    return parse_agent_config([*BASE, *argv], env or {})


def config_error(*argv: str, env: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as err:
        parse(*argv, env=env)
    return str(err.value)


def test_defaults() -> None:
    cfg = parse()
    assert cfg.prefix == DEFAULT_PREFIX == "/coreos.com/network"
    assert cfg.etcd.endpoints == "http://127.0.0.1:2379"
    assert cfg.lease_ttl == DEFAULT_LEASE_TTL == 24 * 3600
    assert cfg.subnet_file == DEFAULT_SUBNET_FILE
    assert cfg.public_ip is None
    assert cfg.metrics_addr is None
    assert cfg.release_on_exit is False
    assert cfg.node_id == "node-a"


def test_flags_are_parsed() -> None:
    cfg = parse(
        "--etcd-endpoints", "http://10.0.0.1:2379,http://10.0.0.2:2379",
        "--etcd-prefix", "/my/net",
        "--public-ip", "192.168.64.3",
        "--lease-ttl", "600",
        "--subnet-file", "/tmp/x/subnet.env",
        "--metrics-addr", "127.0.0.1:9100",
        "--release-on-exit",
    )
    assert cfg.etcd.endpoints == "http://10.0.0.1:2379,http://10.0.0.2:2379"
    assert cfg.prefix == "/my/net"
    assert cfg.public_ip == IPv4Address("192.168.64.3")
    assert cfg.lease_ttl == 600
    assert cfg.subnet_file == Path("/tmp/x/subnet.env")
    assert cfg.metrics_addr == ("127.0.0.1", 9100)
    assert cfg.release_on_exit is True


def test_environment_variables_set_flags() -> None:
    env = {
        "LEASEAGENT_LEASE_TTL": "300",
        "LEASEAGENT_PUBLIC_IP": "10.1.1.1",
        "LEASEAGENT_ETCD_PREFIX": "/env/net",
        "LEASEAGENT_RELEASE_ON_EXIT": "yes",
        "LEASEAGENT_METRICS_ADDR": ":9100",
    }
    cfg = parse(env=env)
    assert cfg.lease_ttl == 300
    assert cfg.public_ip == IPv4Address("10.1.1.1")
    assert cfg.prefix == "/env/net"
    assert cfg.release_on_exit is True
    assert cfg.metrics_addr == ("0.0.0.0", 9100)


def test_a_flag_wins_over_the_environment() -> None:
    env = {"LEASEAGENT_LEASE_TTL": "300", "LEASEAGENT_PUBLIC_IP": "10.1.1.1",
           "LEASEAGENT_RELEASE_ON_EXIT": "true"}
    cfg = parse("--lease-ttl", "900", "--public-ip", "10.2.2.2", "--no-release-on-exit", env=env)
    assert cfg.lease_ttl == 900
    assert cfg.public_ip == IPv4Address("10.2.2.2")
    assert cfg.release_on_exit is False


def test_env_name() -> None:
    assert env_name("--etcd-password-file") == "LEASEAGENT_ETCD_PASSWORD_FILE"


@pytest.mark.parametrize("ttl", ["abc", "1.5", ""])
def test_bad_lease_ttl_is_refused_naming_the_flag(ttl: str) -> None:
    message = config_error("--lease-ttl", ttl)
    assert message.startswith("--lease-ttl=")
    assert repr(ttl) in message


@pytest.mark.parametrize("ttl", ["1", "0", "-5"])
def test_lease_ttl_below_etcds_floor_is_refused(ttl: str) -> None:
    message = config_error("--lease-ttl", ttl)
    assert message.startswith(f"--lease-ttl={ttl}:")
    assert "at least 2" in message


def test_bad_lease_ttl_from_the_environment_is_refused() -> None:
    # The error names what the operator wrote: the variable.
    assert "LEASEAGENT_LEASE_TTL='soon'" in config_error(env={"LEASEAGENT_LEASE_TTL": "soon"})
    assert "--lease-ttl='2s'" in config_error("--lease-ttl", "2s", env={"LEASEAGENT_LEASE_TTL": "soon"})


@pytest.mark.parametrize("ip", ["192.168.64.300", "fd00::1", "host.example", "192.168.64.3/24"])
def test_bad_public_ip_is_refused_naming_the_flag(ip: str) -> None:
    message = config_error("--public-ip", ip)
    assert message.startswith("--public-ip=")
    assert repr(ip) in message


@pytest.mark.parametrize(
    "endpoints",
    ["ftp://10.0.0.1:2379", "http://10.0.0.1:notaport", ",", "http://a:2379,https://b:2379", "http://"],
)
def test_bad_etcd_endpoints_are_refused_naming_the_flag(endpoints: str) -> None:
    assert config_error("--etcd-endpoints", endpoints).startswith("--etcd-endpoints")


def test_password_file_without_username_is_refused() -> None:
    message = config_error("--etcd-password-file", "/etc/leaseagent/etcd-password")
    assert "--etcd-password-file" in message
    assert "--etcd-username" in message


def test_password_file_with_username_is_accepted() -> None:
    cfg = parse("--etcd-username", "agent", "--etcd-password-file", "/etc/leaseagent/pw")
    assert cfg.etcd.username == "agent"
    assert cfg.etcd.password_file == Path("/etc/leaseagent/pw")


@pytest.mark.parametrize("addr", ["9100", "localhost", "127.0.0.1:0", "127.0.0.1:70000", "h:p"])
def test_bad_metrics_addr_is_refused_naming_the_flag(addr: str) -> None:
    message = config_error("--metrics-addr", addr)
    assert message.startswith("--metrics-addr=")
    assert repr(addr) in message


@pytest.mark.parametrize("prefix", ["coreos.com/network", "/coreos.com/network/"])
def test_bad_etcd_prefix_is_refused_naming_the_flag(prefix: str) -> None:
    assert config_error("--etcd-prefix", prefix).startswith("--etcd-prefix=")


def test_bad_boolean_environment_variable_is_refused_naming_it() -> None:
    with pytest.raises(ConfigError, match="LEASEAGENT_RELEASE_ON_EXIT='maybe'"):
        parse(env={"LEASEAGENT_RELEASE_ON_EXIT": "maybe"})


def test_no_flag_takes_a_password() -> None:
    options = [opt for action in agent_parser({})._actions for opt in action.option_strings]
    assert "--etcd-password-file" in options
    assert [opt for opt in options if "password" in opt] == ["--etcd-password-file"]


def test_a_password_flag_is_not_taken_as_an_abbreviation_of_the_password_file_flag() -> None:
    """flanneld's --etcd-password is refused in one line, its value not shown."""
    for argv in (["--etcd-password", "hunter2"], ["-etcd-password=hunter2"]):
        message = config_error(*argv)
        assert message.startswith("--etcd-password: leaseagent reads the etcd password only "
                                  "from a file") and "hunter2" not in message


def test_a_password_in_the_environment_is_not_picked_up() -> None:
    cfg = parse(env={"LEASEAGENT_ETCD_PASSWORD": "hunter2"})
    assert "hunter2" not in repr(cfg)
    assert cfg.etcd.password_file is None


def test_an_environment_value_outside_a_flags_choices_is_refused_naming_the_variable() -> None:
    with pytest.raises(ConfigError, match="LEASEAGENT_LOG_LEVEL='verbose': must be one of debug"):
        parse_agent_config([], {"LEASEAGENT_LOG_LEVEL": "verbose"})
