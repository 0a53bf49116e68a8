"""leaseagent: per-host subnet leases in etcd, and the data plane that wires hosts together.

A flannel-compatible agent: same etcd layout, same subnet.env, same kernel
objects; see the README and docs/ for what it does better.
"""

__version__ = "0.1.0"
