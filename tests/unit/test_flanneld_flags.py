"""flanneld's command line and FLANNELD_* variables start leaseagent with the same meaning.

flanneld's flags are those of its main.go (a Go flag.FlagSet, FLANNELD_<NAME>
applied by coreos/pkg/flagutil.SetFlagsFromEnv to each flag the command line
did not set). Each is accepted with flanneld's meaning and default, or refused in
one line naming it (leaseagent.config.FLANNEL_FLAGS says which; docs/flannel.md
is rendered from it).
"""

from __future__ import annotations

import re
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from leaseagent.config import (
    FLANNEL_FLAGS,
    AgentConfig,
    agent_parser,
    flannel_env_name,
    parse_agent_config,
    unknown_variables,
)
from leaseagent.dataplane.base import InterfaceChoice
from leaseagent.errors import ConfigError

BASE = ["--node-id", "node-a"]
TESTS = Path(__file__).parents[1]

# flanneld's flags, read from its main.go (flannelFlags.*Var, and the klog flags it copies).
FLANNELD_FLAGS = {
    "etcd-endpoints", "etcd-prefix", "etcd-keyfile", "etcd-certfile", "etcd-cafile",
    "etcd-username", "etcd-password", "iface", "iface-regex", "iface-can-reach", "subnet-file",
    "public-ip", "public-ipv6", "subnet-lease-renew-margin", "ip-masq",
    "ip-masq-fully-random-disable", "kube-subnet-mgr", "kube-api-url", "kube-annotation-prefix",
    "kubeconfig-file", "version", "healthz-ip", "healthz-port", "iptables-resync",
    "iptables-forward-rules", "ip-blackhole-route", "net-config-path",
    "set-node-network-unavailable", "v", "vmodule", "log_backtrace_at",
}


def parse(*argv: str, env: dict[str, str] | None = None) -> AgentConfig:
    return parse_agent_config([*BASE, *argv], env or {})


def refused(*argv: str, env: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as err:
        parse(*argv, env=env)
    assert "\n" not in str(err.value)
    return str(err.value)


def test_the_table_has_every_flanneld_flag_and_each_names_a_test_that_exists() -> None:
    assert {f.name for f in FLANNEL_FLAGS} == FLANNELD_FLAGS
    for flag in FLANNEL_FLAGS:
        path, _, name = flag.test.rpartition("::")
        source = (TESTS.parent / path if path else Path(__file__)).read_text()
        assert re.search(rf"^(async )?def {name}\(", source, re.M), flag


def test_every_flanneld_flag_is_accepted_or_refused_by_name() -> None:
    """No flag of flanneld's is "unrecognized": each is an option or refused by name."""
    options = {opt for a in agent_parser({})._actions for opt in a.option_strings}
    for flag in FLANNEL_FLAGS:
        if f"--{flag.name}" not in options:
            assert flag.name == "etcd-password"
            assert refused(f"--{flag.name}=x").startswith(f"--{flag.name}:")


def test_flannel_flags_in_go_syntax() -> None:
    """One dash or two, `-flag value` and `-flag=value`, booleans as -flag=false."""
    cfg = parse("-public-ip", "10.1.1.1", "--subnet-file=/tmp/f/subnet.env", "-ip-masq",
                "--ip-masq-fully-random-disable=true", "-iptables-forward-rules=false",
                "-iptables-resync", "9", "--public-ipv6=fd00::1")
    assert cfg.public_ip == IPv4Address("10.1.1.1")
    assert cfg.subnet_file == Path("/tmp/f/subnet.env")
    assert (cfg.traffic.ip_masq, cfg.traffic.random_fully, cfg.traffic.forward) == (
        True, False, False)
    assert cfg.iptables_resync == 9
    assert str(cfg.public_ipv6) == "fd00::1"
    for false in ("0", "f", "F", "FALSE", "false", "False"):
        assert parse(f"--ip-masq={false}").traffic.ip_masq is False
    for true in ("1", "t", "T", "TRUE", "true", "True"):
        assert parse(f"-ip-masq={true}").traffic.ip_masq is True
    assert refused("--ip-masq=yes") == "--ip-masq='yes': must be true or false"


def test_flannel_defaults() -> None:
    cfg = parse()
    assert cfg.iptables_resync == 5  # flanneld's --iptables-resync default
    assert cfg.traffic.forward is True and cfg.traffic.ip_masq is False
    assert cfg.iface == InterfaceChoice() and cfg.renew_margin is None


def test_a_value_starting_with_a_dash_is_the_flags_value_as_in_go() -> None:
    assert refused("--etcd-prefix", "-odd").startswith("--etcd-prefix='-odd'")


def test_repeated_iface_keeps_flannels_order() -> None:
    cfg = parse("--iface", "eth9", "-iface=10.0.0.1", "--iface", "eth0",
                "--iface-regex", "^10\\.", "-iface-regex=^eth", "--iface-can-reach", "10.9.9.9")
    assert cfg.iface == InterfaceChoice(names=("eth9", "10.0.0.1", "eth0"),
                                        regexes=("^10\\.", "^eth"), can_reach="10.9.9.9")


def test_flanneld_variables_set_flags_the_command_line_does_not() -> None:
    env = {"FLANNELD_IFACE": "eth1", "FLANNELD_ETCD_PREFIX": "/env/net",
           "FLANNELD_IP_MASQ": "t", "FLANNELD_PUBLIC_IP": "10.2.2.2",
           "FLANNELD_IPTABLES_RESYNC": "11", "FLANNELD_IFACE_REGEX": "^en"}
    cfg = parse(env=env)
    assert cfg.iface == InterfaceChoice(names=("eth1",), regexes=("^en",))
    assert (cfg.prefix, cfg.traffic.ip_masq, str(cfg.public_ip), cfg.iptables_resync) == (
        "/env/net", True, "10.2.2.2", 11)
    # The command line wins, and replaces a variable's --iface rather than adding to it.
    cfg = parse("--iface", "eth2", "--no-ip-masq", env=env)
    assert cfg.iface.names == ("eth2",) and cfg.traffic.ip_masq is False
    # LEASEAGENT_* wins over FLANNELD_*.
    assert parse(env={**env, "LEASEAGENT_ETCD_PREFIX": "/ours"}).prefix == "/ours"


def test_a_bad_flanneld_variable_is_refused_naming_it() -> None:
    # flanneld logs "invalid value" and goes on without it; leaseagent stops (exit 2).
    assert refused(env={"FLANNELD_IP_MASQ": "yes"}) == "FLANNELD_IP_MASQ='yes': must be true or false"
    assert refused(env={"FLANNELD_IPTABLES_RESYNC": "x"}).startswith("FLANNELD_IPTABLES_RESYNC=")


def test_an_unknown_flanneld_variable_is_reported() -> None:
    assert unknown_variables({"FLANNELD_IFACES": "eth0", "FLANNELD_IFACE": "eth0"}) == [
        "ignoring FLANNELD_IFACES: no such setting (did you mean FLANNELD_IFACE?)"]


def test_every_flag_has_its_flanneld_variable() -> None:
    assert not unknown_variables({flannel_env_name(f.name): "" for f in FLANNEL_FLAGS})


def test_etcd_flags_by_flannel_names() -> None:
    cfg = parse("-etcd-endpoints=https://10.0.0.1:2379", "-etcd-prefix", "/x",
                "--etcd-cafile=/ca", "--etcd-certfile", "/cert", "-etcd-keyfile=/key",
                "-etcd-username", "u", "--etcd-password-file", "/pw")
    assert (cfg.etcd.endpoints, cfg.prefix, cfg.etcd.cafile, cfg.etcd.certfile,
            cfg.etcd.keyfile, cfg.etcd.username) == (
        "https://10.0.0.1:2379", "/x", Path("/ca"), Path("/cert"), Path("/key"), "u")


def test_etcd_password_is_refused_without_echoing_it() -> None:
    for argv in (["--etcd-password", "hunter2"], ["-etcd-password=hunter2"]):
        message = refused(*argv)
        assert message.startswith("--etcd-password: ") and "hunter2" not in message
    message = refused(env={"FLANNELD_ETCD_PASSWORD": "hunter2"})
    assert message.startswith("FLANNELD_ETCD_PASSWORD: ") and "hunter2" not in message


def test_renew_margin_in_minutes() -> None:
    assert parse("--subnet-lease-renew-margin=90").renew_margin == 90 * 60
    assert parse(env={"FLANNELD_SUBNET_LEASE_RENEW_MARGIN": "1"}).renew_margin == 60
    for bad in ("0", "1440", "-5"):
        assert refused(f"--subnet-lease-renew-margin={bad}") == (
            f"--subnet-lease-renew-margin={int(bad)}: must be 1 to 1439 minutes")
    assert refused("--subnet-lease-renew-margin=1.5").startswith(
        "--subnet-lease-renew-margin='1.5': not a whole number")


def test_kubernetes_flags() -> None:
    cfg = parse("--kube-subnet-mgr=false", "--kube-api-url", "https://k", "-kubeconfig-file=/k",
                "--kube-annotation-prefix=x", "--net-config-path", "/n",
                "--set-node-network-unavailable=false")
    assert cfg == parse()
    assert refused("--kube-subnet-mgr").startswith("--kube-subnet-mgr: leaseagent keeps leases "
                                                   "in etcd only")
    assert refused(env={"FLANNELD_KUBE_SUBNET_MGR": "true"}).startswith(
        "FLANNELD_KUBE_SUBNET_MGR: ")


def test_version_and_help_in_go_syntax(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["-version"], ["--version=true"], ["-h"], ["-help"]):
        with pytest.raises(SystemExit) as done:
            parse(*argv)
        assert done.value.code == 0
    out = capsys.readouterr().out
    assert "leaseagent" in out and "flanneld's flags" in out
    assert parse("--version=false") == parse()
    assert parse(env={"FLANNELD_VERSION": "true"}) == parse()  # flanneld: no effect either


def test_healthz_flags_serve_our_endpoints() -> None:
    assert parse("--healthz-port=9643").metrics_addr == ("0.0.0.0", 9643)
    assert parse("-healthz-ip", "127.0.0.1", "-healthz-port", "8471").metrics_addr == (
        "127.0.0.1", 8471)
    assert parse("--healthz-port=0").metrics_addr is None
    assert parse("--healthz-port=9643", "--metrics-addr=0.0.0.0:9643").metrics_addr == (
        "0.0.0.0", 9643)
    assert "one HTTP server" in refused("--healthz-port=1", "--metrics-addr=127.0.0.1:2")
    assert refused("--healthz-port=70000") == "--healthz-port=70000: not a TCP port"


def test_blackhole_route_is_refused_when_true() -> None:
    assert parse("--ip-blackhole-route=false") == parse()
    assert refused("-ip-blackhole-route").startswith("--ip-blackhole-route: not implemented")


def test_klog_flags() -> None:
    assert parse("-v=2").log_level == "debug"
    assert parse("--v", "0").log_level == "info"
    assert parse("-v=3", "--log-level=warning").log_level == "warning"
    assert parse("--vmodule=", "--log_backtrace_at=:0") == parse()
    assert refused("-vmodule=main=5").startswith("--vmodule='main=5': per-file log levels")
    assert refused("--log_backtrace_at=main.go:10").startswith("--log_backtrace_at=")


def test_an_unknown_flag_in_go_syntax_is_refused_naming_it(
        capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        parse("-no-such-flag=secret")
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert "--no-such-flag" in err and "secret" not in err and err.count("\n") == 1


def test_leasectl_refuses_flanneld_password_variable_too() -> None:
    from leaseagent.cli.leasectl import build_parser

    with pytest.raises(ConfigError, match=r"^FLANNELD_ETCD_PASSWORD: leaseagent reads"):
        build_parser({"FLANNELD_ETCD_PASSWORD": "hunter2"})
