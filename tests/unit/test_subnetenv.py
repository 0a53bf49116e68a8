"""subnet.env: flanneld's exact bytes, and reading the subnet back after a restart."""

from __future__ import annotations

from ipaddress import IPv4Network, IPv6Network

import pytest

from leaseagent.core.subnetenv import (
    SubnetEnv,
    parse_environment_file,
    previous_ipv6_subnet,
    previous_subnet,
)

FLANNEL_FILE = (
    "FLANNEL_NETWORK=10.5.0.0/16\n"
    "FLANNEL_SUBNET=10.5.34.1/24\n"
    "FLANNEL_MTU=1450\n"
    "FLANNEL_IPMASQ=false\n"
)


def test_render_is_byte_for_byte_flannels_format() -> None:
    env = SubnetEnv(network=IPv4Network("10.5.0.0/16"), subnet=IPv4Network("10.5.34.0/24"), mtu=1450)
    assert env.render() == FLANNEL_FILE


# flannel's own dual-stack example (Documentation/configuration.md, "Dual-stack").
FLANNEL_DUAL_STACK_FILE = (
    "FLANNEL_NETWORK=10.42.0.0/16\n"
    "FLANNEL_SUBNET=10.42.0.1/24\n"
    "FLANNEL_IPV6_NETWORK=2001:cafe:42::/56\n"
    "FLANNEL_IPV6_SUBNET=2001:cafe:42::1/64\n"
    "FLANNEL_MTU=1450\n"
    "FLANNEL_IPMASQ=true\n"
)


def test_dual_stack_render_is_byte_for_byte_flannels_example() -> None:
    env = SubnetEnv(network=IPv4Network("10.42.0.0/16"), subnet=IPv4Network("10.42.0.0/24"),
                    mtu=1450, ipmasq=True, ipv6_network=IPv6Network("2001:cafe:42::/56"),
                    ipv6_subnet=IPv6Network("2001:cafe:42::/64"))
    assert env.render() == FLANNEL_DUAL_STACK_FILE
    assert previous_subnet(env.render()) == IPv4Network("10.42.0.0/24")
    assert previous_ipv6_subnet(env.render()) == IPv6Network("2001:cafe:42::/64")


def test_ipv6_text_is_gos_compressed_form() -> None:
    """Go's IP.String (RFC 5952): the longest run of two or more zero groups becomes
    "::", a single zero group stays "0", hex in lowercase."""
    env = SubnetEnv(network=IPv4Network("10.42.0.0/16"), subnet=IPv4Network("10.42.3.0/24"),
                    mtu=1430, ipv6_network=IPv6Network("FD00:0:5::/48"),
                    ipv6_subnet=IPv6Network("fd00:0:5:A::/64"))
    lines = env.render().splitlines()
    assert lines[2:4] == ["FLANNEL_IPV6_NETWORK=fd00:0:5::/48",
                          "FLANNEL_IPV6_SUBNET=fd00:0:5:a::1/64"]


def test_previous_ipv6_subnet_is_none_without_one() -> None:
    assert previous_ipv6_subnet(FLANNEL_FILE) is None
    assert previous_ipv6_subnet("FLANNEL_IPV6_SUBNET=10.5.0.1/24\n") is None


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


def test_parse_environment_file_skips_blank_comment_and_malformed_lines() -> None:
    text = "# c\n\nA=1\n  B = two words \nno equals sign\nC=x=y\n"
    assert parse_environment_file(text) == {"A": "1", "B": "two words", "C": "x=y"}
