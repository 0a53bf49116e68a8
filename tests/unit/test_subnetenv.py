"""subnet.env: flanneld's exact bytes, and reading the subnet back after a restart."""

from __future__ import annotations

from ipaddress import IPv4Network

import pytest

from leaseagent.core.subnetenv import SubnetEnv, parse_subnet_env, previous_subnet

FLANNEL_FILE = (
    "FLANNEL_NETWORK=10.5.0.0/16\n"
    "FLANNEL_SUBNET=10.5.34.1/24\n"
    "FLANNEL_MTU=1450\n"
    "FLANNEL_IPMASQ=false\n"
)


def test_render_is_byte_for_byte_flannels_format() -> None:
    env = SubnetEnv(network=IPv4Network("10.5.0.0/16"), subnet=IPv4Network("10.5.34.0/24"), mtu=1450)
    assert env.render() == FLANNEL_FILE


def test_render_uses_the_first_usable_address_and_the_subnet_length() -> None:
    env = SubnetEnv(
        network=IPv4Network("10.5.0.0/24"), subnet=IPv4Network("10.5.0.192/26"), mtu=1500, ipmasq=True
    )
    assert env.render() == (
        "FLANNEL_NETWORK=10.5.0.0/24\n"
        "FLANNEL_SUBNET=10.5.0.193/26\n"
        "FLANNEL_MTU=1500\n"
        "FLANNEL_IPMASQ=true\n"
    )


def test_previous_subnet_reads_back_what_render_wrote() -> None:
    subnet = IPv4Network("10.5.34.0/24")
    env = SubnetEnv(network=IPv4Network("10.5.0.0/16"), subnet=subnet, mtu=1450)
    assert previous_subnet(env.render()) == subnet


def test_previous_subnet_reads_a_flanneld_file_with_comments_and_ipv6_lines() -> None:
    text = (
        "# written by flanneld\n"
        "\n"
        "FLANNEL_NETWORK=10.5.0.0/16\n"
        "FLANNEL_SUBNET=10.5.7.1/24\n"
        "FLANNEL_IPV6_NETWORK=fd00:5::/48\n"
        "FLANNEL_IPV6_SUBNET=fd00:5:7::1/64\n"
        "FLANNEL_MTU=1450\n"
    )
    assert previous_subnet(text) == IPv4Network("10.5.7.0/24")


@pytest.mark.parametrize(
    "text",
    [
        "",
        "FLANNEL_NETWORK=10.5.0.0/16\n",
        "FLANNEL_SUBNET=\n",
        "FLANNEL_SUBNET=garbage\n",
        "FLANNEL_SUBNET=10.5.34.1/33\n",
        "FLANNEL_SUBNET=fd00::1/64\n",
        "\x00\x01binary",
    ],
)
def test_previous_subnet_is_none_when_absent_or_unreadable(text: str) -> None:
    assert previous_subnet(text) is None


def test_parse_subnet_env_skips_blank_comment_and_malformed_lines() -> None:
    text = "# c\n\nA=1\n  B = two words \nno equals sign\nC=x=y\n"
    assert parse_subnet_env(text) == {"A": "1", "B": "two words", "C": "x=y"}
