"""`leasectl list` on a host: a valid lease over a route or address of that host that is
not the agent's is shown `conflict`, but the host's own lease is not (its subnet sits on
the host's own devices, flannel.1 and docker0, by design)."""

from __future__ import annotations

import json
from ipaddress import IPv4Network, ip_address

from leaseagent.cli.presenting import rows_of
from leaseagent.core.leases import KeyLayout
from leaseagent.core.network import parse_network_config
from leaseagent.core.plan import HostRoute
from leaseagent.store.base import KeyValue

LAYOUT = KeyLayout()
NETWORK = parse_network_config(json.dumps({"Network": "10.5.0.0/16",
                                           "Backend": {"Type": "vxlan"}}))
VALUE = {"BackendType": "vxlan", "BackendData": {"VtepMAC": "02:00:00:00:00:01"}}


def _lease(subnet: str, public_ip: str, revision: int) -> KeyValue:
    key = f"{LAYOUT.subnets_prefix}{subnet.replace('/', '-')}"
    value = json.dumps({**VALUE, "PublicIP": public_ip}).encode()
    return KeyValue(key, value, revision, revision, 1, lease=revision)


def _status(rows: list[dict[str, object]], subnet: str) -> object:
    return next(r["status"] for r in rows if r["subnet"] == subnet)


def test_own_lease_is_not_a_conflict_but_anothers_over_the_same_address_is() -> None:
    own = _lease("10.5.106.0/24", "10.98.0.2", 5)
    other = _lease("10.5.7.0/24", "10.98.0.3", 6)
    # This host: the agent's flannel.1 address and docker0's connected route for its own
    # lease, and a foreign address inside the other host's subnet.
    routes = (HostRoute(IPv4Network("10.5.106.0/32"), address=True),
              HostRoute(IPv4Network("10.5.106.0/24"), connected=True),
              HostRoute(IPv4Network("10.5.7.9/32"), address=True))
    rows = rows_of([own, other], LAYOUT, NETWORK, {5: 100, 6: 100}, host_routes=routes,
                   host_addresses=frozenset({ip_address("10.98.0.2"), ip_address("10.5.106.0")}))
    assert _status(rows, "10.5.106.0/24") == "ok"
    assert _status(rows, "10.5.7.0/24") == "conflict"
    # Run from another host, the same lease over the same routes is a conflict.
    rows = rows_of([own], LAYOUT, NETWORK, {5: 100}, host_routes=routes,
                   host_addresses=frozenset({ip_address("10.98.0.3")}))
    assert _status(rows, "10.5.106.0/24") == "conflict"
