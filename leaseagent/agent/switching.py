"""A network config change, applied as one transaction (docs/architecture.md, "Config
changes"): `ConfigSwitch.apply`.

Everything that can refuse (the PublicIPv6, the programs of the traffic rules,
the new backend's prepare) comes before anything is changed. Then a new backend
instance on the new settings (for a rebuild built beside the old one, whose
devices go once no peer runs its type and --peer-hold-time after; a device of
the same name renamed aside first when the old one can, vxlan on a new Port;
the old one's objects removed first only if the two still share a device),
the lease fitted by the lease holder (the one writer of our key), subnet.env,
the traffic rules' keepers, then every lease judged again under the new config.
What this host cannot run is refused and the last good config put back.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from leaseagent.agent.holder import LeaseHolder
from leaseagent.agent.plane import Plane, device_names
from leaseagent.agent.watching import LeaseWatcher
from leaseagent.core.configchange import REBUILD, ConfigChange, classify
from leaseagent.core.network import NetworkConfig
from leaseagent.dataplane.base import BackendAttrs, DataPlane, HostInfo
from leaseagent.errors import ConfigError, DataPlaneError, SubnetsExhausted
from leaseagent.metrics import Metrics

log = logging.getLogger("leaseagent")


class ConfigSwitch:
    def __init__(self, plane: Plane, holder: LeaseHolder, watcher: LeaseWatcher, *,
                 revision: int, metrics: Metrics,
                 resolve: Callable[[NetworkConfig], Awaitable[HostInfo]],
                 adopt: Callable[[NetworkConfig, HostInfo, BackendAttrs], None]) -> None:
        self._plane = plane
        self._holder = holder
        self._watcher = watcher
        self.revision = revision  # etcd revision of the network config in force
        self._metrics = metrics
        self._resolve = resolve  # this host under a config (ConfigError: it cannot run it)
        # Work with (network, host, the new backend's attributes) from now on: the lease
        # value, FLANNEL_MTU, the metrics' identity.
        self._adopt = adopt

    @property
    def network(self) -> NetworkConfig:
        """The network config in force."""
        return self._plane.network

    async def apply(self, network: NetworkConfig, change: ConfigChange, revision: int) -> bool:
        """Bring this host to `network`; True once it is in force. One this host cannot
        run (no PublicIPv6, host-gw off the segment, no free subnet, a missing program)
        is refused with one ERROR line and the last good config put back."""
        good = self.network
        try:
            await self._switch(network, change)
        except (ConfigError, DataPlaneError, SubnetsExhausted) as exc:
            self._metrics.config_ignored.labels(reason="unusable").inc()
            log.error("network config revision %d ignored: this host cannot run it: %s; going "
                      "back to the last good one", revision, exc)
            if self.network != good:
                await self._switch(good, classify(self.network, good))
            return False
        self.revision = revision
        self._metrics.config_revision.set(revision)
        self._metrics.config_changes.labels(change.kind).inc()
        return True

    async def _switch(self, network: NetworkConfig, change: ConfigChange) -> None:
        """The steps of a config change: once the new backend is prepared the agent works
        with the new config, and a later failure is undone by switching back."""
        plane, watcher = self._plane, self._watcher
        host = await self._resolve(network)
        rules = plane.traffic_rules(network, running=plane.rules)
        async with watcher.gate:  # no lease event is judged while our key may change
            async with plane.lock:
                await self._replace_backend(network, host, change)
            await self._holder.refit()  # subnet.env, Docker's options, the backend's addresses
            async with plane.lock:
                await plane.replace_rules(rules)
                watcher.set_network(network)
                await plane.program_all(watcher.peers, self._holder.own)  # traffic back at once
            await plane.follow_rollout()
        await watcher.relist("config_changed")  # then every lease judged anew

    async def _replace_backend(self, network: NetworkConfig, host: HostInfo,
                               change: ConfigChange) -> None:
        """A new backend on `network` in place of the running one. Under the plane's lock."""
        plane, watcher = self._plane, self._watcher
        await plane.stop()
        old = plane.backend
        new = plane.new_backend(network, host)
        # A rebuild wanting the old one's device names (vxlan: a Port change): the old
        # devices renamed aside, in use, so the new ones are made beside them.
        aside = False
        try:
            if change.kind == REBUILD and device_names(old) & device_names(new):
                await plane.stop_leaving_timer()
                # A device an earlier Port change put aside takes flannel's name back
                # (the new one adopts it if it is on the port wanted again): the earlier
                # roll-out's backend then goes without removing it (its names are the
                # old one's now); any other is removed.
                aside = await old.step_aside()
                await plane.drop_leaving()
            attrs = await self._prepared(new)
        except Exception:
            try:
                if aside:
                    await old.step_back()
            finally:
                plane.spawn(lambda: watcher.peers)  # the old one goes on (not when stopping)
            raise
        plane.backend = new
        plane.use_network(network)
        self._adopt(network, host, attrs)
        # A rebuild whose devices are not shared: make before break. The new backend is
        # built beside the old one and its first pass replaces the old routes (and keeps
        # those of peers still on the old type); the old devices go once no peer runs
        # the old type (`Plane.finish_rollout`).
        beside = change.kind == REBUILD and not device_names(old) & device_names(new)
        try:
            if beside:
                await plane.stop_leaving_timer()
                await plane.drop_leaving()  # a roll-out replaced before it ended
                plane.leaving = old
            else:
                await plane.retire(old, rebuild=change.kind == REBUILD)
        except Exception:
            plane.spawn(lambda: watcher.peers)  # the new one runs; `apply` switches back
            raise
        plane.spawn(lambda: watcher.peers)

    async def _prepared(self, new: DataPlane) -> BackendAttrs:
        """`new` prepared (it adopts the devices it shares with the running one, and may
        refuse to run: then it is closed)."""
        try:
            return await new.prepare()
        except BaseException:
            self._metrics.export_dataplane(self._plane.backend.status)
            await new.close()
            raise
