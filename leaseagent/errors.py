"""The project's error hierarchy.

Library exceptions (etcd3aio/grpc, pyroute2, OS errors) are translated once,
at the adapter boundary, into one of these. Everything above the adapters
catches only these.

    LeaseagentError
     |-- ConfigError             bad flags/env/config file; not retryable
     |-- NetworkConfigError      <prefix>/config missing or invalid; retry (an operator may fix it)
     |-- StoreError
     |    |-- StoreUnavailable   etcd unreachable or timing out; retryable
     |    |-- StoreAuthError     TLS/credentials refused; not retryable
     |    |-- TooLarge           a watch response over gRPC's receive limit; list again
     |    |-- Behind             a watch too far behind to trust (behind a proxy); list again
     |    '-- Compacted          a watch asked for history etcd no longer has; re-list
     |-- SubnetsExhausted        no free subnet in [SubnetMin, SubnetMax]; not retryable
     |-- LeaseLost               our etcd lease or our key is gone
     |-- IdentityConflict        another agent with this host's node id and PublicIP holds its key
     '-- DataPlaneError          netlink refused what we asked; retryable unless said

    InvalidLease (a ValueError)  one lease in etcd cannot be used; never leaves the
                                 core: judging a listing turns it into a verdict
"""

from __future__ import annotations


class LeaseagentError(Exception):
    """Base of every error the project raises on purpose."""


class ConfigError(LeaseagentError):
    """A setting (flag, environment variable, file) is wrong. The message names it."""


class NetworkConfigError(LeaseagentError):
    """The cluster's network config in etcd is missing or invalid."""


class StoreError(LeaseagentError):
    """Base of lease store failures."""


class StoreUnavailable(StoreError):
    """The store cannot be reached or does not answer in time."""


class StoreTimeout(StoreUnavailable):
    """The store did not answer within the timeout: the request waited that long already
    (a paused member holds it while the connection stays open)."""


class StoreAuthError(StoreError):
    """The store refused our credentials or certificate."""


class TooLarge(StoreError):
    """A watch response too large to receive (a value over gRPC's 4 MiB limit): the
    stream cannot go on past it; a listing (which skips such a value) can."""


class Behind(StoreError):
    """A watch stream would start more revisions behind etcd than one catch-up response
    brings (etcd's gRPC proxy can then skip events): list again instead."""


class Missed(StoreError):
    """A silent watch stream is past a change of its range that it did not send (a
    shared watch of etcd's gRPC proxy that stopped delivering): list again."""


class Compacted(StoreError):
    """A watch asked for a revision the store has compacted away."""

    def __init__(self, compact_revision: int) -> None:
        super().__init__(f"revision compacted (compact revision {compact_revision})")
        self.compact_revision = compact_revision


class SubnetsExhausted(LeaseagentError):
    """No subnet is free in the configured range."""


class LeaseLost(LeaseagentError):
    """Our etcd lease expired or was revoked, or our key was deleted."""


class IdentityConflict(LeaseagentError):
    """Another agent with this host's node id and PublicIP holds the key we held: the machine
    was cloned (same /etc/machine-id) or the agent runs twice. Never fought over."""

    def __init__(self, key: str, detail: str) -> None:
        super().__init__(detail)
        self.key = key


class DataPlaneError(LeaseagentError):
    """The kernel refused a change, or a required object is missing."""


class InvalidLease(ValueError):
    """A lease key or value that cannot be used. `reason` is a short label (metrics,
    `leasectl list`), `detail` one line for a person."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
