"""Lab fixtures for the end-to-end tests: real namespaces, real etcd, real agents.

Each fixture builds a lab named after this pytest process (so two runs, or a
developer's own `deploy/lab up`, never collide) and always takes it down,
also when the build or a test fails. Skips, rather than fails, when not root,
when the data plane backend under test is not registered yet, or (Docker
labs) when dockerd cannot run here.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest

from leaseagent.lab import Lab
from leaseagent.lab.docker import unavailable as docker_unavailable


def require(backend: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces)")
    try:
        from leaseagent.dataplane import BACKENDS
    except ImportError as exc:  # the data plane package itself is still being written
        pytest.skip(f"leaseagent.dataplane not importable: {exc}")
    if backend not in BACKENDS:
        pytest.skip(f"data plane backend {backend!r} not registered yet")


def _built(backend: str, *, tag: str, hosts: int, containers: int, ipv6: bool = False,
           docker: bool = False, prometheus: bool = False) -> Iterator[Lab]:
    require(backend)
    if docker and (why := docker_unavailable()):
        pytest.skip(f"dockerd cannot run here: {why}")
    if prometheus and shutil.which("prometheus") is None:
        pytest.skip("prometheus (Debian: prometheus) missing")
    lab = Lab(f"e2e{tag}{os.getpid() % 100000}", backend=backend, ipv6=ipv6, docker=docker,
              prometheus=prometheus)
    try:
        lab.up(hosts, containers)
        yield lab
    finally:
        warnings = lab.down()
        assert not warnings, warnings


@pytest.fixture(scope="module")
def vxlan_lab() -> Iterator[Lab]:
    """3 hosts x 2 containers on vxlan, shared by the tests of a module: each test
    leaves it with the same 3 healthy hosts it found."""
    yield from _built("vxlan", tag="v", hosts=3, containers=2)


@pytest.fixture(scope="module")
def prometheus_lab() -> Iterator[Lab]:
    """3 hosts x 1 container on vxlan with the lab's Prometheus (`up --prometheus`)."""
    yield from _built("vxlan", tag="p", hosts=3, containers=1, prometheus=True)


@pytest.fixture
def hostgw_lab() -> Iterator[Lab]:
    yield from _built("host-gw", tag="g", hosts=3, containers=2)


@pytest.fixture(scope="module")
def vxlan_lab6() -> Iterator[Lab]:
    """A dual-stack lab (`up --ipv6`): 3 hosts x 2 containers on vxlan."""
    yield from _built("vxlan", tag="6v", hosts=3, containers=2, ipv6=True)


@pytest.fixture(scope="module")
def hostgw_lab6() -> Iterator[Lab]:
    """A dual-stack lab (`up --ipv6`): 3 hosts x 2 containers on host-gw."""
    yield from _built("host-gw", tag="6g", hosts=3, containers=2, ipv6=True)


@pytest.fixture(scope="module")
def docker_lab6() -> Iterator[Lab]:
    """A dual-stack lab with a real dockerd per host (`up --ipv6 --docker`): 2 hosts x 2
    containers on vxlan."""
    yield from _built("vxlan", tag="6d", hosts=2, containers=2, ipv6=True, docker=True)
