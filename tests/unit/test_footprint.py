"""What the agent imports: only what it runs (docs/benchmarks.md, "Memory").

Each check imports in a fresh interpreter, so what this test process has
imported already does not count.
"""

from __future__ import annotations

import json
import subprocess
import sys


def _modules_after(code: str) -> set[str]:
    probe = code + "\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True)
    return set(json.loads(out.stdout.splitlines()[-1]))


AGENT = ("import leaseagent.agent.main\n"
         "from leaseagent.dataplane import BACKENDS\n"
         "BACKENDS['vxlan']\n")


def test_a_vxlan_agent_does_not_import_the_other_backends() -> None:
    loaded = _modules_after(AGENT)
    assert "leaseagent.dataplane.vxlan" in loaded
    assert "leaseagent.dataplane.wireguard" not in loaded
    assert not any(m.split(".")[0] == "cryptography" for m in loaded)


def test_the_agent_imports_parts_of_pyroute2_and_prometheus_client_not_all() -> None:
    loaded = _modules_after(AGENT + "import leaseagent.agent.http\n")
    assert "pyroute2.iproute.linux" in loaded and "prometheus_client.metrics" in loaded
    for whole_library in ("pyroute2.ndb", "pyroute2.ipdb", "sqlite3", "prometheus_client.gc_collector",
                          "prometheus_client.bridge"):
        assert not any(m == whole_library or m.startswith(whole_library + ".") for m in loaded), \
            whole_library


def test_the_agent_does_not_import_importlib_metadata() -> None:
    # Its version is read from METADATA (leaseagent.imports.installed_version), and
    # etcd3aio's __init__, which asks importlib.metadata for its own, does not run.
    loaded = _modules_after(AGENT + "import leaseagent.store.etcd\n")
    assert "etcd3aio.client" in loaded
    assert "importlib.metadata" not in loaded and "zipfile" not in loaded


def test_installed_version_answers_as_importlib_metadata() -> None:
    from importlib.metadata import version

    from leaseagent.imports import installed_version

    for name in ("leaseagent", "grpcio", "prometheus-client", "prometheus_client", "etcd3aio"):
        assert installed_version(name) == version(name)
    assert installed_version("no-such-distribution-here") is None


def test_a_lean_package_is_whole_again_when_asked_for_what_its_init_defines() -> None:
    loaded = _modules_after("import leaseagent\n"
                            "from pyroute2 import IPRoute, AsyncIPRoute\n"
                            "from prometheus_client import REGISTRY, generate_latest\n"
                            "from etcd3aio import Lock\n"
                            "import pyroute2, prometheus_client, etcd3aio\n"
                            "assert pyroute2.__version__ and prometheus_client.Counter\n"
                            "assert etcd3aio.__version__\n")
    assert "pyroute2.ndb" in loaded and "prometheus_client.gc_collector" in loaded
    assert "etcd3aio.concurrency" in loaded
