"""leaseagent.core.monitoring: the published metrics target, what an agent publishes for
its --metrics-addr, and the file_sd JSON Prometheus reads."""

from __future__ import annotations

import json
from ipaddress import IPv4Address

import pytest

from leaseagent.core.leases import KeyLayout
from leaseagent.core.monitoring import MetricsTarget, decode_target, file_sd, published_address

IP = IPv4Address("10.0.0.11")


def test_a_target_round_trips_through_its_value() -> None:
    target = MetricsTarget(node_id="host1", address="10.0.0.11:9643", public_ip="10.0.0.11")
    assert json.loads(target.encode()) == {"Address": "10.0.0.11:9643", "NodeID": "host1",
                                           "PublicIP": "10.0.0.11"}
    assert decode_target(target.encode()) == target


@pytest.mark.parametrize("raw, why", [
    (b"garbage", "not valid JSON"),
    (b"[1]", "not a JSON object"),
    (b'{"Address": "10.0.0.11:9643", "NodeID": "h"}', "PublicIP None"),
    (b'{"Address": "10.0.0.11", "NodeID": "h", "PublicIP": "10.0.0.11"}', "not IP:PORT"),
    (b'{"Address": "evil.example:80", "NodeID": "h", "PublicIP": "10.0.0.11"}', "not IP:PORT"),
    (b'{"Address": "10.0.0.11:0", "NodeID": "h", "PublicIP": "10.0.0.11"}', "not IP:PORT"),
    (b'{"Address": "10.0.0.11:9643", "NodeID": "a\\nb", "PublicIP": "10.0.0.11"}',
     "not a printable string"),
    (b" " * 5000, "limit"),
])
def test_anything_else_is_refused_with_the_reason(raw: bytes, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        decode_target(raw)


def test_an_ipv6_target_keeps_its_brackets() -> None:
    raw = b'{"Address": "[fd00::11]:9643", "NodeID": "h", "PublicIP": "10.0.0.11"}'
    assert decode_target(raw).address == "[fd00::11]:9643"


@pytest.mark.parametrize("host, published", [
    ("0.0.0.0", "10.0.0.11:9643"),  # every address: the one peers know the host by
    ("::", "10.0.0.11:9643"),
    ("10.0.0.99", "10.0.0.99:9643"),
    ("fd00::11", "[fd00::11]:9643"),
    ("127.0.0.1", None),  # the unit's default: no other host can scrape it
    ("::1", None),
    ("localhost", None),
    ("metrics.example", None),  # a target is IP:PORT
])
def test_what_an_agent_publishes_for_its_metrics_address(host: str, published: str | None
                                                          ) -> None:
    assert published_address(host, 9643, IP) == published


def test_file_sd_is_one_group_per_host_sorted_with_node_and_public_ip_labels() -> None:
    b = MetricsTarget(node_id="b", address="10.0.0.12:9643", public_ip="10.0.0.12")
    a = MetricsTarget(node_id="a", address="10.0.0.11:9643", public_ip="10.0.0.11")
    assert json.loads(file_sd([b, a, b])) == [
        {"targets": ["10.0.0.11:9643"], "labels": {"node": "a", "public_ip": "10.0.0.11"}},
        {"targets": ["10.0.0.12:9643"], "labels": {"node": "b", "public_ip": "10.0.0.12"}},
    ]
    assert json.loads(file_sd([])) == []


def test_the_metrics_keys_are_beside_the_subnets_not_under_them() -> None:
    layout = KeyLayout("/coreos.com/network")
    key = layout.metrics_key("host1")
    assert key == "/coreos.com/network/metrics/host1"
    # flanneld ranges over <prefix>/subnets (no trailing slash) and gets <prefix>/config.
    assert not key.startswith("/coreos.com/network/subnets")
    assert not key.startswith(layout.config_key)
    assert not layout.is_lease_key(key)
