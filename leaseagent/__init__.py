"""leaseagent: per-host subnet leases in etcd, and the data plane that wires hosts together.

A flannel-compatible agent: same etcd layout, same subnet.env, same kernel
objects; see the README and docs/architecture.md.
"""

from importlib.metadata import PackageNotFoundError, version

from leaseagent.imports import lean_package

# Their submodules without their whole library (leaseagent.imports): before any
# module of ours imports them.
lean_package("pyroute2")
lean_package("prometheus_client")

try:
    __version__ = version("leaseagent")  # pyproject.toml says it, once
except PackageNotFoundError:  # run from a source tree that is not installed
    __version__ = "0+unknown"
