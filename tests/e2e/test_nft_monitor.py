"""The agent's `nft monitor` child dies with the agent: an agent killed with SIGKILL (a
crash, the lab's host removal) left it running for ever, one per killed agent."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from leaseagent.lab import netns

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(not Path("/usr/sbin/nft").exists() and not Path("/usr/bin/nft").exists(),
                                 reason="nft not installed")]

CHILD = """
import asyncio, sys
from leaseagent.dataplane.firewall import NftFirewall

async def main():
    proc = await NftFirewall(netns=sys.argv[1]).events()
    print(proc.pid, flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except (FileNotFoundError, ProcessLookupError):
        return ""


def test_nft_monitor_dies_with_the_agent_that_started_it() -> None:
    with netns.Namespaces() as made:
        ns = made.add(f"lanft{secrets.token_hex(3)}")
        agent = subprocess.Popen([sys.executable, "-c", CHILD, ns], stdout=subprocess.PIPE,
                                 text=True)
        monitor = 0
        try:
            assert agent.stdout is not None
            monitor = int(agent.stdout.readline())
            assert _alive(monitor)
            # Kill the agent once the child is `nft` itself: before that it is still `ip
            # netns exec` / setpriv, and a parent that dies before setpriv's prctl sends no
            # signal (a window of milliseconds at the agent's start; the test hit it on a
            # loaded machine by killing at once).
            deadline = time.monotonic() + 10
            while _comm(monitor) != "nft" and time.monotonic() < deadline:
                time.sleep(0.02)
            assert _comm(monitor) == "nft", _comm(monitor)
            agent.send_signal(signal.SIGKILL)
            agent.wait(timeout=10)
            deadline = time.monotonic() + 5
            while _alive(monitor) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert not _alive(monitor), "nft monitor outlived the agent killed with SIGKILL"
        finally:
            if agent.poll() is None:
                agent.kill()
                agent.wait(timeout=10)
            if monitor and _alive(monitor):
                os.kill(monitor, signal.SIGKILL)
