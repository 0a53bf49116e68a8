"""leaseagent: per-host subnet leases in etcd, and the data plane that wires hosts together.

A flannel-compatible agent: same etcd layout, same subnet.env, same kernel
objects; see the README and docs/architecture.md.
"""

from importlib.metadata import PackageNotFoundError, version

# pyproject.toml says it, once; "0+unknown" when run from a source tree not installed.
try:
    __version__ = version("leaseagent")
except PackageNotFoundError:
    __version__ = "0+unknown"
