"""What the agent imports: only what it runs.

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
         "import leaseagent.dataplane.vxlan\n")


def test_a_vxlan_agent_does_not_import_the_other_backends() -> None:
    loaded = _modules_after(AGENT)
    assert "leaseagent.dataplane.vxlan" in loaded
    assert "leaseagent.dataplane.wireguard" not in loaded
    assert not any(m.split(".")[0] == "cryptography" for m in loaded)


def test_importing_the_package_imports_no_library_and_patches_no_import() -> None:
    """The package's `__init__` only says its version: the lab imports it on a bare python3."""
    loaded = _modules_after("import sys\nfinders = list(sys.meta_path)\nimport leaseagent\n"
                            "assert sys.meta_path == finders, sys.meta_path\n")
    for library in ("pyroute2", "prometheus_client", "etcd3aio", "grpc", "tenacity"):
        assert library not in loaded, library


def test_a_vxlan_agent_imports_no_netlink_library() -> None:
    """Links and addresses go through the project's own codec (dataplane/rtnl.py):
    pyroute2's import alone is ~10 MiB of the agent's memory (docs/benchmarks.md)."""
    loaded = _modules_after(AGENT + "import leaseagent.agent.http, leaseagent.store.etcd\n")
    assert not any(m.split(".")[0] == "pyroute2" for m in loaded)
