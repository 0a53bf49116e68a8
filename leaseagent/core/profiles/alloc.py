"""The alloc backend's profile: flannel's pkg/backend/alloc, a lease and nothing else.

Config: `{"Type": "alloc"}`. It takes a subnet and writes subnet.env; it keeps no
data path: no device, no route, no traffic rule. So it needs no interface when
the host's PublicIP is given (`--public-ip`), and takes any PublicIP (peers never
send to it). FLANNEL_MTU: the underlay's (or 1500 without an interface).
"""

from __future__ import annotations

from leaseagent.core.profiles.base import BackendProfile, no_lease_data, no_options

NAME = "alloc"

PROFILE = BackendProfile(NAME, no_options, no_lease_data, data_path=False)
