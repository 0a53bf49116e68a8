"""The lab's exceptions: every failure of a lab step, a program it runs or etcd it starts.

`LabError` is a RuntimeError, so the tests that drive the shared etcd launcher
and namespace helper can treat it as any other harness failure.
"""

from __future__ import annotations


class LabError(RuntimeError):
    """The lab could not be built, queried or taken down; the message says which step."""


class LabExists(LabError):
    """`up` found namespaces or a state dir of a lab with the same name."""


class DockerError(LabError):
    """A host's dockerd would not start or answer; the message says why (its log's tail)."""
