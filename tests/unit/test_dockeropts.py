"""Docker options from subnet.env, byte for byte as flannel's mk-docker-opts.sh writes them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from leaseagent.core.dockeropts import docker_options, render_daemon_json, render_docker_env
from leaseagent.core.subnetenv import parse_environment_file

ENV = {"FLANNEL_NETWORK": "10.5.0.0/16", "FLANNEL_SUBNET": "10.5.34.1/24",
       "FLANNEL_MTU": "1450", "FLANNEL_IPMASQ": "false"}
MASQ = {**ENV, "FLANNEL_IPMASQ": "true"}


# Expected bytes: flannel's dist/mk-docker-opts.sh (the current /bin/sh script) run
# under dash on the same subnet.env with each option, its output copied here.


def test_default_is_individual_and_combined_exactly_as_mk_docker_opts():
    assert render_docker_env(ENV) == (
        'DOCKER_OPT_BIP="--bip=10.5.34.1/24"\n'
        'DOCKER_OPT_IPMASQ="--ip-masq=true"\n'
        'DOCKER_OPT_MTU="--mtu=1450"\n'
        'DOCKER_OPTS=" --bip=10.5.34.1/24 --ip-masq=true --mtu=1450"\n'
    )


def test_ipmasq_true_adds_ip_masq_false_in_name_order():
    assert render_docker_env(MASQ) == (
        'DOCKER_OPT_BIP="--bip=10.5.34.1/24"\n'
        'DOCKER_OPT_IPMASQ="--ip-masq=false"\n'
        'DOCKER_OPT_MTU="--mtu=1450"\n'
        'DOCKER_OPTS=" --bip=10.5.34.1/24 --ip-masq=false --mtu=1450"\n'
    )
    assert list(docker_options(MASQ)) == ["DOCKER_OPT_BIP", "DOCKER_OPT_IPMASQ", "DOCKER_OPT_MTU"]


def test_no_ipmasq_in_subnet_env_gives_no_ip_masq_option():
    env = {k: v for k, v in ENV.items() if k != "FLANNEL_IPMASQ"}
    assert render_docker_env(env) == (
        'DOCKER_OPT_BIP="--bip=10.5.34.1/24"\n'
        'DOCKER_OPT_MTU="--mtu=1450"\n'
        'DOCKER_OPTS=" --bip=10.5.34.1/24 --mtu=1450"\n'
    )


def test_an_ipmasq_value_other_than_true_or_false_is_the_scripts_error_unless_m():
    with pytest.raises(ValueError, match=r"^Invalid value of FLANNEL_IPMASQ: yes$"):
        render_docker_env({**ENV, "FLANNEL_IPMASQ": "yes"})
    assert render_docker_env({**ENV, "FLANNEL_IPMASQ": "yes"}, ipmasq=False) == (
        'DOCKER_OPT_BIP="--bip=10.5.34.1/24"\n'
        'DOCKER_OPT_MTU="--mtu=1450"\n'
        'DOCKER_OPTS=" --bip=10.5.34.1/24 --mtu=1450"\n'
    )


def test_no_ipmasq_flag_drops_it():  # -m
    for env in (ENV, MASQ):
        assert render_docker_env(env, ipmasq=False) == (
            'DOCKER_OPT_BIP="--bip=10.5.34.1/24"\n'
            'DOCKER_OPT_MTU="--mtu=1450"\n'
            'DOCKER_OPTS=" --bip=10.5.34.1/24 --mtu=1450"\n'
        )


def test_individual_only():  # -i
    assert render_docker_env(ENV, individual=True, combined=False) == (
        'DOCKER_OPT_BIP="--bip=10.5.34.1/24"\n'
        'DOCKER_OPT_IPMASQ="--ip-masq=true"\n'
        'DOCKER_OPT_MTU="--mtu=1450"\n'
    )


def test_combined_only_with_own_key_and_existing_value():  # -c, -k
    assert render_docker_env(ENV, individual=False, combined=True) == (
        'DOCKER_OPTS=" --bip=10.5.34.1/24 --ip-masq=true --mtu=1450"\n')
    assert render_docker_env(MASQ, individual=False, combined=True, combined_key="X",
                             ipmasq=False) == 'X=" --bip=10.5.34.1/24 --mtu=1450"\n'
    assert render_docker_env(ENV, individual=True, combined=True,
                             combined_key="DOCKER_NETWORK_OPTIONS").endswith(
        'DOCKER_NETWORK_OPTIONS=" --bip=10.5.34.1/24 --ip-masq=true --mtu=1450"\n')
    # An existing value (the environment's): it, a space, then the options each after one.
    assert render_docker_env(ENV, existing="--debug").endswith(
        'DOCKER_OPTS="--debug  --bip=10.5.34.1/24 --ip-masq=true --mtu=1450"\n')
    # subnet.env's own value of the key wins: the script sources the file.
    env = {"FLANNEL_SUBNET": "10.5.34.1/24", "FLANNEL_MTU": "1450",
           "DOCKER_OPTS": '"--log-level=warn"'}
    assert render_docker_env(env, individual=False, existing="--debug") == (
        'DOCKER_OPTS="--log-level=warn  --bip=10.5.34.1/24 --mtu=1450"\n')


def test_an_empty_subnet_env_gives_an_empty_combined_value():
    assert render_docker_env({}) == 'DOCKER_OPTS=""\n'


DUAL = {**ENV, "FLANNEL_IPV6_NETWORK": "fd00:5::/48", "FLANNEL_IPV6_SUBNET": "fd00:5:0:22::1/64"}


def test_ipv6_adds_ipv6_and_fixed_cidr_v6_in_name_order():
    assert render_docker_env(DUAL) == (
        'DOCKER_OPT_BIP="--bip=10.5.34.1/24"\n'
        'DOCKER_OPT_FIXED_CIDR_V6="--fixed-cidr-v6=fd00:5:0:22::1/64"\n'
        'DOCKER_OPT_IPMASQ="--ip-masq=true"\n'
        'DOCKER_OPT_IPV6="--ipv6"\n'
        'DOCKER_OPT_MTU="--mtu=1450"\n'
        'DOCKER_OPTS=" --bip=10.5.34.1/24 --fixed-cidr-v6=fd00:5:0:22::1/64 --ip-masq=true '
        '--ipv6 --mtu=1450"\n'
    )
    assert json.loads(render_daemon_json(DUAL)) == {
        "bip": "10.5.34.1/24", "mtu": 1450, "ip-masq": True, "ipv6": True,
        "fixed-cidr-v6": "fd00:5:0:22::1/64"}


def test_daemon_json():
    assert json.loads(render_daemon_json(ENV)) == {"bip": "10.5.34.1/24", "mtu": 1450,
                                                   "ip-masq": True}
    assert json.loads(render_daemon_json(MASQ)) == {"bip": "10.5.34.1/24", "mtu": 1450,
                                                    "ip-masq": False}


def test_subnet_env_as_the_agent_writes_it_round_trips():
    text = "FLANNEL_NETWORK=10.5.0.0/16\nFLANNEL_SUBNET=10.5.34.1/24\nFLANNEL_MTU=1450\n" \
           "FLANNEL_IPMASQ=false\n"
    assert parse_environment_file(text) == ENV


def _leasectl(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "leaseagent.cli.leasectl", *args],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})


def test_leasectl_docker_opts_as_a_process(tmp_path: Path):
    subnet_env = tmp_path / "subnet.env"
    subnet_env.write_text("FLANNEL_NETWORK=10.5.0.0/16\nFLANNEL_SUBNET=10.5.34.1/24\n"
                          "FLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n")
    out = tmp_path / "docker_opts.env"
    result = _leasectl("docker-opts", "-f", str(subnet_env), "-d", str(out))
    assert result.returncode == 0, result.stderr
    assert out.read_text() == render_docker_env(parse_environment_file(subnet_env.read_text()))
    assert out.stat().st_mode & 0o777 == 0o644
    stdout = _leasectl("docker-opts", "-f", str(subnet_env), "-d", "-", "-c", "-k", "OPTS", "-m")
    assert stdout.stdout == 'OPTS=" --bip=10.5.34.1/24 --mtu=1450"\n'


def test_leasectl_docker_opts_missing_file_is_one_line(tmp_path: Path):
    result = _leasectl("docker-opts", "-f", str(tmp_path / "nope.env"), "-d", "-")
    assert result.returncode == 1
    assert result.stderr.startswith("leasectl: error: cannot read ")
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_leasectl_docker_opts_bad_ipmasq_is_one_line_exit_1(tmp_path: Path):
    subnet_env = tmp_path / "subnet.env"
    subnet_env.write_text("FLANNEL_SUBNET=10.5.34.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=yes\n")
    result = _leasectl("docker-opts", "-f", str(subnet_env), "-d", "-")
    assert result.returncode == 1
    assert result.stderr == (f"leasectl: error: {subnet_env}: Invalid value of FLANNEL_IPMASQ: "
                             "yes\n")
    assert _leasectl("docker-opts", "-f", str(subnet_env), "-d", "-", "-m").returncode == 0
