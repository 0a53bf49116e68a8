"""The files the agent writes for others: subnet.env and, with --docker-opts-file,
Docker's options; kept like the routes (level-triggered).

`FileWriter.lease` says what they must hold for a lease (rendered from the
network config, the subnet and FLANNEL_MTU); `write` makes each file hold it,
written only when it does not (a restart hook watching them restarts Docker
for a real change only); `keep` checks them every resync period and puts back
what something else removed or changed. At start a failed write is a
ConfigError (exit 2) naming the flag, the path and the OS error; later it is
reported (log once, metrics, STATUS=) and retried, the lease and the data
plane kept.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from leaseagent.agent.leasing import OwnLease
from leaseagent.agent.logs import StateLog
from leaseagent.config import AgentConfig
from leaseagent.core.dockeropts import DOCKER_OPTIONS_KEY, render_docker_env
from leaseagent.core.network import NetworkConfig
from leaseagent.core.subnetenv import SubnetEnv, parse_environment_file
from leaseagent.errors import ConfigError
from leaseagent.files import refuse_non_regular, refuse_symlink, write_if_changed
from leaseagent.metrics import Metrics
from leaseagent.retrying import Backoff

log = logging.getLogger("leaseagent")

# The files the agent writes (the `file` label of their metrics) and the flag naming each.
FILES = {"subnet.env": "--subnet-file", "docker_opts.env": "--docker-opts-file"}


class FileWriter:
    def __init__(self, cfg: AgentConfig, *, metrics: Metrics, states: StateLog) -> None:
        self._cfg = cfg
        self._metrics = metrics
        self._states = states
        # What each file must hold (FILES' names -> path, content), set by `lease`.
        self._files: dict[str, tuple[Path, bytes]] = {}
        self.written = False  # subnet.env was written once (readiness)
        self.error: str | None = None  # why the last write of them failed, if it did

    def refuse_planted_paths(self) -> None:
        """A symlink planted at a path we write as root is refused, before anything is
        taken in etcd (write_atomic checks again at each write)."""
        cfg = self._cfg
        for path in (cfg.subnet_file.parent, cfg.state_dir):
            refuse_symlink(path)
        for path in (cfg.subnet_file, *((cfg.docker_opts_file,) if cfg.docker_opts_file else ())):
            refuse_non_regular(path)

    def lease(self, network: NetworkConfig, own: OwnLease, mtu: int, *, first: bool) -> None:
        """The files for `own` under `network`, written now (`first`: at start, where a
        failure is a ConfigError)."""
        cfg = self._cfg
        env = SubnetEnv(network=network.network, subnet=own.subnet, mtu=mtu,
                        ipmasq=cfg.traffic.ip_masq, ipv6_network=network.ipv6_network,
                        ipv6_subnet=own.ipv6_subnet).render()
        files = {"subnet.env": (cfg.subnet_file, env.encode())}
        if cfg.docker_opts_file is not None:
            # Kept with subnet.env, so a changed subnet reaches Docker's next start too.
            docker_env = render_docker_env(parse_environment_file(env), combined_key=DOCKER_OPTIONS_KEY)
            files["docker_opts.env"] = (cfg.docker_opts_file, docker_env.encode())
        self._files = files
        self.write(start=first)
        self.written = True

    def write(self, *, start: bool = False, repair: bool = False) -> None:
        """Make each file hold what it must, written only when it does not. `repair`: a
        write puts back what something else removed or changed."""
        errors = []
        for name, (path, data) in self._files.items():
            try:
                written = write_if_changed(path, data, mode=0o644)
            except (OSError, ConfigError) as exc:
                why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
                if start:
                    raise ConfigError(f"{FILES[name]}: cannot write {path}: {why}") from None
                self._metrics.file_write_failures.labels(file=name).inc()
                errors.append(f"cannot write {path}: {why}")
                continue
            if written and repair:
                self._metrics.file_repairs.labels(file=name).inc()
                log.warning("%s %s was missing or changed; written again", name, path)
        error = "; ".join(errors) or None
        if error is not None:
            self._states.set("files", error, "%s (retrying; the lease and the data plane are "
                             "kept)", error, level=logging.WARNING)
        elif self.error is not None:
            self._states.set("files", None, "%s written again", ", ".join(
                str(path) for path, _ in self._files.values()))
        self.error = error
        self._metrics.files_in_sync.set(0 if error else 1)

    async def keep(self) -> None:
        """Level-triggered like the routes: every resync period each file is checked and
        put back if it was removed or changed; a failed write is retried sooner (capped,
        jittered backoff up to the resync period)."""
        period = self._cfg.resync_interval
        backoff = Backoff(cap=period)
        while True:
            if self.error is None:
                backoff.reset()
                await asyncio.sleep(period)
            else:
                await backoff.sleep()
            self.write(repair=self.error is None)
