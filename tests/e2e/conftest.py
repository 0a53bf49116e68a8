"""Lab fixtures for the end-to-end tests: real namespaces, real etcd, real agents.

Each fixture builds a lab named after this pytest process (so two runs, or a
developer's own `deploy/lab up`, never collide) and always takes it down,
also when the build or a test fails. Skips, rather than fails, when not root,
when the data plane backend under test is not registered yet, or (Docker
labs) when dockerd cannot run here.

The plain labs (`vxlan_lab`, `hostgw_lab`, `vxlan_lab6`, `hostgw_lab6`) are shared
across modules: built once, on first use, with every agent ready; handed to each test
that names the fixture (or names it as a parameter, for `request.getfixturevalue`);
taken down after the last such test of the run. Each test leaves the lab as it found
it (the same hosts, every agent running, ready again if it was restarted, the same
network config): that is checked after each test, and a lab left otherwise is an error
of that test and is rebuilt for the next one, so one failure does not spread.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

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
           docker: bool = False, prometheus: bool = False,
           prometheus_rules: Path | None = None, agent_args: Sequence[str] = ()
           ) -> Iterator[Lab]:
    require(backend)
    if docker and (why := docker_unavailable()):
        pytest.skip(f"dockerd cannot run here: {why}")
    if prometheus and shutil.which("prometheus") is None:
        pytest.skip("prometheus (Debian: prometheus) missing")
    lab = Lab(f"e2e{tag}{os.getpid() % 100000}", backend=backend, ipv6=ipv6, docker=docker,
              prometheus=prometheus, agent_args=agent_args)
    if prometheus_rules is not None:
        lab.prometheus_server.rules = prometheus_rules
    try:
        lab.up(hosts, containers)
        yield lab
    finally:
        warnings = lab.down()
        assert not warnings, warnings


@pytest.fixture(scope="module")
def prometheus_rules() -> Path | None:
    """The rules file the lab's Prometheus loads: None, the shipped one. A module may
    override this fixture with a copy (tests/e2e/test_prometheus_lab.py does)."""
    return None


@pytest.fixture(scope="module")
def prometheus_lab(prometheus_rules: Path | None) -> Iterator[Lab]:
    """3 hosts x 1 container on vxlan with the lab's Prometheus (`up --prometheus`),
    loading `prometheus_rules`."""
    yield from _built("vxlan", tag="p", hosts=3, containers=1, prometheus=True,
                      prometheus_rules=prometheus_rules)


@pytest.fixture(scope="module")
def docker_lab6() -> Iterator[Lab]:
    """A dual-stack lab with a real dockerd per host (`up --ipv6 --docker`): 2 hosts x 2
    containers on vxlan."""
    yield from _built("vxlan", tag="6d", hosts=2, containers=2, ipv6=True, docker=True)


# -- the shared plain labs ---------------------------------------------------------

# fixture name -> (backend, tag, IPv6): 3 hosts x 2 containers each.
# Their agents hold a vanished peer 2 s (--peer-hold-time; the default is 5 s): tests that
# remove a host or a planted lease wait the hold out (tests/peerhold.py says how long).
SHARED_AGENT_ARGS = ("--peer-hold-time", "2")
SHARED = {"vxlan_lab": ("vxlan", "v", False), "hostgw_lab": ("host-gw", "g", False),
          "vxlan_lab6": ("vxlan", "6v", True), "hostgw_lab6": ("host-gw", "6g", True)}


@dataclass
class _Found:
    """What a test must leave as it was: the hosts (each agent's PID: one restarted
    must be ready again), the network config."""
    agents: dict[int, int | None]
    config: str


@dataclass
class _SharedLabs:
    labs: dict[str, Lab] = field(default_factory=dict)
    builders: dict[str, Iterator[Lab]] = field(default_factory=dict)  # _built(), to close
    last_user: dict[str, str] = field(default_factory=dict)  # fixture -> nodeid

    def get(self, name: str) -> Lab:
        if name not in self.labs:
            backend, tag, ipv6 = SHARED[name]
            built = _built(backend, tag=tag, hosts=3, containers=2, ipv6=ipv6,
                           agent_args=SHARED_AGENT_ARGS)
            lab = next(built)
            try:
                for host in lab.hosts.values():
                    lab.wait_ready(host, timeout=30)
            except BaseException:
                built.close()
                raise
            self.labs[name] = lab
            self.builders[name] = built
        return self.labs[name]

    def found(self, lab: Lab) -> _Found:
        return _Found({i: lab.agent_pid(h) for i, h in lab.hosts.items()},
                      lab.etcdctl("get", lab.keys.config_key, "--print-value-only"))

    def check(self, name: str, before: _Found) -> None:
        """Raise if the test left the lab otherwise than it found it (then take it down:
        the next test gets a new one). Cheap when nothing was restarted: PIDs and one
        etcdctl."""
        lab = self.labs[name]
        try:
            assert sorted(lab.hosts) == sorted(before.agents), \
                f"{name}: hosts {sorted(before.agents)} became {sorted(lab.hosts)}"
            for index, host in lab.hosts.items():
                pid = lab.agent_pid(host)
                assert pid is not None, f"{name}: {host.name}'s agent not running"
                if pid != before.agents[index]:
                    lab.wait_ready(host, timeout=30)
            config = lab.etcdctl("get", lab.keys.config_key, "--print-value-only")
            assert config == before.config, f"{name}: network config left changed: {config}"
        except BaseException:
            self.down(name)
            raise

    def down(self, name: str) -> None:
        self.labs.pop(name, None)
        built = self.builders.pop(name, None)
        if built is not None:
            built.close()  # _built's finally: lab.down(), warnings asserted

    def down_all(self) -> None:
        for name in list(self.labs):
            self.down(name)


_SHARED = _SharedLabs()


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Note each shared lab's last test in this run's order: its lab goes down after it."""
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        for name in SHARED:
            if name in getattr(item, "fixturenames", ()) or name in params.values():
                _SHARED.last_user[name] = item.nodeid


@pytest.fixture(scope="session")
def _shared_labs() -> Iterator[_SharedLabs]:
    try:
        yield _SHARED
    finally:
        _SHARED.down_all()


def _shared(name: str, request: pytest.FixtureRequest, labs: _SharedLabs) -> Iterator[Lab]:
    lab = labs.get(name)
    before = labs.found(lab)
    yield lab
    try:
        labs.check(name, before)
    finally:
        if labs.last_user.get(name) == request.node.nodeid:
            labs.down(name)


@pytest.fixture
def vxlan_lab(request: pytest.FixtureRequest, _shared_labs: _SharedLabs) -> Iterator[Lab]:
    """3 hosts x 2 containers on vxlan, every agent ready; shared (see the docstring)."""
    yield from _shared("vxlan_lab", request, _shared_labs)


@pytest.fixture
def hostgw_lab(request: pytest.FixtureRequest, _shared_labs: _SharedLabs) -> Iterator[Lab]:
    """3 hosts x 2 containers on host-gw, every agent ready; shared."""
    yield from _shared("hostgw_lab", request, _shared_labs)


@pytest.fixture
def vxlan_lab6(request: pytest.FixtureRequest, _shared_labs: _SharedLabs) -> Iterator[Lab]:
    """A dual-stack lab (`up --ipv6`): 3 hosts x 2 containers on vxlan; shared."""
    yield from _shared("vxlan_lab6", request, _shared_labs)


@pytest.fixture
def hostgw_lab6(request: pytest.FixtureRequest, _shared_labs: _SharedLabs) -> Iterator[Lab]:
    """A dual-stack lab (`up --ipv6`): 3 hosts x 2 containers on host-gw; shared."""
    yield from _shared("hostgw_lab6", request, _shared_labs)
