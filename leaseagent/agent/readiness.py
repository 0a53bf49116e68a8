"""Whether the agent is ready, and why not: one decision for /readyz, READY=1, STATUS=
and leaseagent_ready (docs/architecture.md, "Fault rules").

Ready means: no identity conflict, a lease held, subnet.env written, the
first complete listing applied, the data plane in sync (`DataPlaneStatus`)
and every family's traffic rules in place (a rule that cannot be written
names the command and what the tool or kernel said). READY=1 is sent the
first time all of that holds, not merely once the start-up line is done;
from then on STATUS= tells the current state and peer count.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Protocol

from leaseagent.agent.etcdhealth import EtcdHealth
from leaseagent.agent.filewriting import FileWriter
from leaseagent.agent.leasing import OwnLease
from leaseagent.agent.plane import FamilyRules
from leaseagent.agent.watching import LeaseWatcher
from leaseagent.core.escaping import escaped
from leaseagent.dataplane.base import DataPlane

log = logging.getLogger("leaseagent")

# How often readiness is looked at once started (STATUS=, READY=1): it is cheap (state only).
READINESS_SECONDS = 0.5
STATUS_LIMIT = 200  # STATUS= is one line of at most this many characters


class Observed(Protocol):
    """The agent's state readiness is decided from (`Agent` has it)."""

    @property
    def conflict(self) -> str | None: ...
    @property
    def own(self) -> OwnLease | None: ...
    @property
    def lease_held(self) -> bool: ...
    @property
    def files(self) -> FileWriter: ...
    @property
    def watcher(self) -> LeaseWatcher | None: ...
    @property
    def backend(self) -> DataPlane | None: ...
    @property
    def rules(self) -> Sequence[FamilyRules]: ...
    @property
    def etcd(self) -> EtcdHealth: ...


def peers_said(count: int) -> str:
    """'1 peer', '2 peers': the count as STATUS= and the log say it."""
    return f"{count} peer" if count == 1 else f"{count} peers"


def not_ready_reason(agent: Observed) -> str | None:
    """Why the agent is not ready (None: it is)."""
    if agent.conflict is not None:
        return f"identity conflict: {agent.conflict}"
    if agent.own is None:
        return "no lease held yet"
    if not agent.files.written:
        return "subnet.env not written yet"
    if agent.watcher is None or not agent.watcher.synced.is_set():
        return "peer list not complete yet"
    if not agent.lease_held:
        return "lease not held (lost; taking it back)"
    if agent.backend is None or not agent.backend.status.in_sync:
        error = agent.backend.status.last_error if agent.backend is not None else None
        return "data plane not in sync" + (f": {error}" if error else "")
    for rules in agent.rules:
        if not rules.keeper.status.in_sync:
            error = rules.keeper.status.last_error
            return (f"{rules.keeper.fw.family.shown}traffic rules not in place"
                    + (f": {error}" if error else ""))
    return None


class Readiness:
    """Readiness to systemd (READY=1, STATUS=) and the log, from `agent`'s state."""

    def __init__(self, agent: Observed, notify: Callable[[str], object]) -> None:
        self._agent = agent
        self._notify = notify
        self.reporting = False  # the start-up line is done: `report` owns STATUS=
        self._status_text = ""  # the last STATUS= sent
        self._not_ready: str | None = "starting"  # the reason last reported
        self.ready_sent = False  # READY=1 went to systemd (once: the start is over)

    def status(self, text: str) -> None:
        """What the agent is doing, for `systemctl status` (STATUS=, one line: escaped, so
        a name from etcd cannot add a line such as READY=1 or MAINPID= to the message)."""
        text = escaped(text)[:STATUS_LIMIT]
        self._status_text = text
        self._notify("STATUS=" + text)

    def on_state_change(self, text: str) -> None:
        """A state change StateLog logged: STATUS= says it during the start-up; after it,
        the summary (which holds etcd's state as well) says what is."""
        if self.reporting:
            self.report()
        else:
            self.status(text)

    def _counts(self) -> tuple[int, int]:
        """(peers known, peers the kernel refused)."""
        agent = self._agent
        peers = len(agent.watcher.peers) if agent.watcher is not None else 0
        refused = len(agent.backend.status.refused_peers) if agent.backend is not None else 0
        return peers, refused

    def summary(self) -> str:
        """One line for STATUS=: ready or why not, the lease, the current peer count."""
        agent = self._agent
        reason = not_ready_reason(agent)
        peers, refused = self._counts()
        lease = f"lease {agent.own.subnet}" if agent.own is not None else "no lease"
        etcd = "; etcd unreachable (retrying)" if agent.etcd.down_now else ""
        if agent.files.error is not None:
            etcd += f"; {agent.files.error} (retrying)"
        if agent.etcd.refusal is not None:
            etcd += f"; {agent.etcd.refusal} (retrying)"
        if refused:
            etcd += f"; {peers_said(refused)} refused by the kernel (unreachable)"
        if reason is None:
            return f"ready: {lease}, {peers_said(peers)}{etcd}"
        return f"not ready: {reason} ({lease}, {peers_said(peers)}){etcd}"

    def report(self) -> None:
        """READY=1 the first time the agent is ready; a line when it stops or starts being
        ready; STATUS= when it changes."""
        reason = not_ready_reason(self._agent)
        if reason != self._not_ready:
            peers, refused = self._counts()
            if reason is None and refused:
                log.info("ready: %s programmed, %d refused by the kernel (see the "
                         "warnings above: unreachable from this host)",
                         peers_said(peers - refused), refused)
            elif reason is None:
                log.info("ready: %s programmed", peers_said(peers))
            else:
                log.warning("not ready: %s", reason)
            self._not_ready = reason
        if reason is None and not self.ready_sent:
            self._notify("READY=1")
            self.ready_sent = True
        text = self.summary()
        if escaped(text)[:STATUS_LIMIT] != self._status_text:  # as `status` sends it
            self.status(text)

    async def run(self) -> None:
        """Report every READINESS_SECONDS: the data plane's and the rules' keepers change
        their state in their own tasks."""
        self.reporting = True
        while True:
            self.report()
            await asyncio.sleep(READINESS_SECONDS)
