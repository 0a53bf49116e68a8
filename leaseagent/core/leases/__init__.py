"""The lease layer: what a prefix in etcd holds and what each key of it means.

- `keys`: the key layout of a prefix (config key, subnets prefix) and lease key
  names, flannel's dual-stack form included;
- `values`: lease values (flannel's LeaseAttrs JSON) and the checks a peer's
  lease must pass;
- `judging`: the one rule that judges a listing (which key holds a subnet,
  which are invalid or duplicates, which is this host's), and its incremental
  form for a watcher.

Everything that reads `<prefix>/subnets/` (the agent, leasectl, doctor, the lab)
goes through here. Pure: no I/O.
"""

from leaseagent.core.leases.judging import (
    DUPLICATE,
    INVALID,
    OWN,
    PEER,
    REASONS,
    RESERVED,
    Identity,
    Judgement,
    LeaseBook,
    PeerChanges,
    PendingChanges,
    RawLease,
    Verdict,
    judge,
)
from leaseagent.core.leases.keys import DEFAULT_PREFIX, KeyLayout, SubnetKey, key_name, parse_key_name
from leaseagent.core.leases.values import (
    MAX_VALUE_BYTES,
    LeaseValue,
    Peer,
    decode_lease_value,
    unusable_ip_reason,
    validate_peer,
)

__all__ = [
    "DEFAULT_PREFIX", "DUPLICATE", "INVALID", "MAX_VALUE_BYTES", "OWN", "PEER", "REASONS",
    "RESERVED", "Identity", "Judgement", "KeyLayout", "LeaseBook", "LeaseValue", "Peer",
    "PeerChanges", "PendingChanges", "RawLease", "SubnetKey", "Verdict", "decode_lease_value",
    "judge", "key_name", "parse_key_name", "unusable_ip_reason", "validate_peer",
]
