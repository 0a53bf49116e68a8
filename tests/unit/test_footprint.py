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
