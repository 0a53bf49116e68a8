"""`leasectl config set [--dry-run]`'s summary (leaseagent.cli.leasectl.change_summary)
for a change of a backend option that rebuilds: what each host does, said truthfully."""

from __future__ import annotations

import json

from leaseagent.cli.leasectl import change_summary
from leaseagent.core.leases.keys import KeyLayout
from leaseagent.core.network import network_config_from_dict
from leaseagent.store.base import KeyValue

LAYOUT = KeyLayout("/coreos.com/network")
VXLAN = {"Network": "10.6.0.0/16", "Backend": {"Type": "vxlan"}}


def entry(key: str, doc: object) -> KeyValue:
    return KeyValue(key, json.dumps(doc).encode(), 1, 1, 1)


def test_a_vxlan_port_change_rebuilds_each_host_beside_its_old_device() -> None:
    lease = {"PublicIP": "10.200.0.1", "BackendType": "vxlan",
             "BackendData": {"VNI": 1, "VtepMAC": "02:00:00:00:00:01"}}
    listing = [entry(f"{LAYOUT.subnets_prefix}10.6.5.0-24", lease)]
    new = network_config_from_dict({**VXLAN, "Backend": {"Type": "vxlan", "Port": 4789}})
    lines = change_summary(entry(LAYOUT.config_key, VXLAN), new, listing, LAYOUT)
    assert lines == [
        "change: rebuild",
        "  Backend.Port 8472 -> 4789 (rebuild)",
        "  10.6.5.0/24 (10.200.0.1): rebuilds its data plane (vxlan: new devices beside the "
        "old ones)",
        "hosts: 1, 1 affected as above, the others keep their subnet and Docker's options",
    ]
