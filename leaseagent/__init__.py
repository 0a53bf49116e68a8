"""leaseagent: per-host subnet leases in etcd, and the data plane that wires hosts together.

A flannel-compatible agent: same etcd layout, same subnet.env, same kernel
objects; see the README and docs/architecture.md.
"""

from leaseagent.imports import installed_version, lean_package

# Their submodules without their whole library (leaseagent.imports): before any
# module of ours imports them.
lean_package("pyroute2")
lean_package("prometheus_client")
lean_package("etcd3aio")

# pyproject.toml says it, once; "0+unknown" when run from a source tree not installed.
__version__ = installed_version("leaseagent") or "0+unknown"
