"""The --peer-hold-time a lab's agents run with (tests that wait a removal out)."""

from __future__ import annotations

from leaseagent.config import DEFAULT_PEER_HOLD_SECONDS
from leaseagent.lab import Lab


def peer_hold(lab: Lab) -> float:
    """The last --peer-hold-time in the lab's agent arguments, else the agent's default."""
    args = lab.agent_args
    values = [args[i + 1] for i, a in enumerate(args[:-1]) if a == "--peer-hold-time"]
    return float(values[-1]) if values else DEFAULT_PEER_HOLD_SECONDS
