"""`bench.env.KernelProbe`'s reader wakes its loop after a burst, not for every batch:
decoding while a removal's thousands of notifications came took the GIL and a core from
the reader, and stamped the last object 9-95 ms after the agent's own last
acknowledgement (docs/benchmarks.md, "Round 7"). Only a device's creation (where the
join's span starts) or a large backlog wakes it at once.

Run in a child process from the repository's root (as `python -m bench` is: `bench`
here would be this directory)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

CHECK = r'''
import struct

from bench.env import PROBE_BACKLOG, tell_at_once
from leaseagent.dataplane import rtnl


def message(kind):
    return struct.pack("=IHHII", 16, kind, 0, 1, 0)


burst = [message(rtnl.RTM_DELROUTE), message(rtnl.RTM_DELNEIGH)] * 100
assert not tell_at_once(burst, 200)
assert not tell_at_once(burst, PROBE_BACKLOG - 1)
assert tell_at_once([message(rtnl.RTM_NEWNEIGH), message(rtnl.RTM_NEWLINK)], 2)
assert tell_at_once([message(rtnl.RTM_NEWNEIGH)], PROBE_BACKLOG)
print("ok")
'''


def test_a_burst_waits_for_the_quiet_and_a_new_device_is_told_at_once() -> None:
    out = subprocess.run([sys.executable, "-c", CHECK], cwd=ROOT, capture_output=True,
                         text=True, check=False, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
