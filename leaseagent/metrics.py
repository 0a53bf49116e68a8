"""Every Prometheus metric of the agent, in one place.

One `Metrics` object per agent, each with its own CollectorRegistry, so
several agents in one test process do not collide. Names follow Prometheus
conventions: `leaseagent_` prefix, base units in the name, `_total` on
counters (prometheus-client adds it).

Metrics are exported from state, never read back as state. The agent's own
events are counted here directly; the data plane's are read at scrape time
from the backend's `status` (leaseagent.dataplane.base.DataPlaneStatus), which
the agent hands to `export_dataplane`.

No `_created` series (they double the series count and nobody queries them),
and every labelled counter starts at 0 for each label value it can take
(`zero`), so `rate()` and `absent()` work before the first event.
`leaseagent_build_info{version}` and `leaseagent_lease_info{subnet, public_ip,
node_id, backend}` say which agent and which lease a series belongs to.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Iterator, Mapping

from prometheus_client.metrics import (
    Counter,
    Gauge,
    Histogram,
    Info,
    disable_created_metrics,
)
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.registry import Collector, CollectorRegistry

from leaseagent.core.rules import KINDS
from leaseagent.dataplane.base import DataPlaneStatus
from leaseagent.dataplane.firewall import RulesStatus

OBJECT_KINDS = ("route", "neighbour", "fdb", "peer", "allowed-ip")  # peer: WireGuard's


class _DataPlaneCollector(Collector):
    """The data plane's status as metric families, read at each scrape."""

    def __init__(self, status: Callable[[], DataPlaneStatus | None]) -> None:
        self._status = status

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily | HistogramMetricFamily]:
        status = self._status()
        if status is None:
            return
        yield GaugeMetricFamily("leaseagent_dataplane_in_sync",
                                "1 when the kernel has this host's own objects and those of "
                                "every peer it accepts (refused peers are counted apart)",
                                value=1 if status.in_sync else 0)
        yield GaugeMetricFamily("leaseagent_dataplane_refused_peers",
                                "Peers some of whose kernel objects the kernel refused (host-gw: "
                                "a PublicIP that is no gateway on the link): unreachable from "
                                "this host, retried at every resync",
                                value=len(status.refused_peers))
        yield GaugeMetricFamily("leaseagent_dataplane_foreign_peers",
                                "Peers of another backend type: not programmed, unreachable "
                                "from this host", value=status.foreign_peers)
        yield GaugeMetricFamily("leaseagent_dataplane_conflicting_peers",
                                "Peers not programmed here: their subnet overlaps a route or "
                                "address of this host that is not the agent's, or they claim "
                                "this host's or another peer's VtepMAC",
                                value=len(status.conflicting_peers))
        for name, doc, counts, kinds in (
            ("leaseagent_dataplane_objects_added", "Kernel objects added", status.added,
             OBJECT_KINDS),
            ("leaseagent_dataplane_objects_removed", "Kernel objects removed", status.removed,
             OBJECT_KINDS),
            ("leaseagent_dataplane_drift_repairs",
             "Kernel objects restored after something else removed or changed them",
             status.repairs, (*OBJECT_KINDS, "device")),
        ):
            family = CounterMetricFamily(name, doc, labels=["kind"])
            for kind in sorted({*kinds, *counts}):
                family.add_metric([kind], counts.get(kind, 0))
            yield family
        durations = status.reconciles
        buckets = [(str(bound), count) for bound, count in zip(durations.buckets, durations.counts,
                                                                 strict=True)]
        buckets.append(("+Inf", durations.count))
        yield HistogramMetricFamily("leaseagent_reconcile_duration_seconds",
                                    "Duration of a full data-plane reconcile",
                                    buckets=buckets, sum_value=durations.total)


def zero(metric: Counter | Gauge | Histogram, label: str, values: Iterable[str]) -> None:
    """Create the series of each label value now, at 0, so it exists before its first event."""
    for value in values:
        metric.labels(**{label: value})


class _RulesCollector(Collector):
    """The traffic rules' keepers' status as metric families, read at each scrape. With
    IPv6 there is a keeper per family; the series are those of one keeper before
    dual-stack (no family label, which would start new series): in sync when every
    family is, repairs and drops summed."""

    def __init__(self, statuses: Callable[[], Mapping[int, RulesStatus]]) -> None:
        self._statuses = statuses

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        statuses = list(self._statuses().values())
        if not statuses:
            return
        yield GaugeMetricFamily("leaseagent_rules_in_sync",
                                "1 when the traffic rules (masquerade, forward, peer filter) "
                                "are in place, for every family",
                                value=1 if all(s.in_sync for s in statuses) else 0)
        repairs = CounterMetricFamily("leaseagent_rules_repairs",
                                      "Traffic rules restored after something else changed them",
                                      labels=["kind"])
        for kind in KINDS:
            repairs.add_metric([kind], sum(s.repairs.get(kind, 0) for s in statuses))
        yield repairs
        yield CounterMetricFamily("leaseagent_vxlan_peer_filter_dropped_packets",
                                  "VXLAN packets dropped because they came from no peer",
                                  value=sum(s.dropped for s in statuses))


class _AsyncioCollector(Collector):
    """How many asyncio tasks the scraping event loop holds, counted at each scrape (the
    agent scrapes from its own loop: leaseagent.agent.http). A count that only grows
    is a leak; the soak benchmark (bench/soak.py) watches it. Nothing when scraped
    outside a running loop."""

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            tasks = asyncio.all_tasks()
        except RuntimeError:  # no running loop
            return
        yield GaugeMetricFamily("leaseagent_asyncio_tasks",
                                "asyncio tasks alive in the agent's event loop (the scrape's "
                                "own included)", value=len(tasks))


class _ReadyCollector(Collector):
    """Whether /readyz would answer 200 now, asked of the agent at each scrape (the same
    decision, leaseagent.agent.daemon.Agent.not_ready_reason), so a Prometheus needs no
    probe of its own to alert on an agent that is up but not ready."""

    def __init__(self, ready: Callable[[], Callable[[], bool] | None]) -> None:
        self._ready = ready

    def collect(self) -> Iterator[GaugeMetricFamily]:
        ready = self._ready()
        if ready is None:
            return
        yield GaugeMetricFamily("leaseagent_ready",
                                "1 while /readyz answers 200 (lease held, subnet.env written, "
                                "data plane and traffic rules in place, no identity conflict)",
                                value=1 if ready() else 0)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        from leaseagent import __version__

        disable_created_metrics()
        self.registry = registry or CollectorRegistry()
        r = self.registry
        Info("leaseagent_build", "The running agent", registry=r).info({"version": __version__})
        self._lease_info = Info(
            "leaseagent_lease", "This host's identity and the subnet it holds", registry=r)
        self._identity: dict[str, str] = {}
        self.lease_held = Gauge(
            "leaseagent_lease_held", "1 while this host holds its subnet lease", registry=r)
        self.lease_expiry = Gauge(
            "leaseagent_lease_expiry_timestamp_seconds",
            "When this host's lease expires unless renewed, as a Unix time (+Inf: a reservation)",
            registry=r)
        self.lease_ttl = Gauge(
            "leaseagent_lease_ttl_seconds",
            "The TTL of this host's lease; it is renewed every TTL/3 (+Inf: a reservation)",
            registry=r)
        self.identity_conflict = Gauge(
            "leaseagent_identity_conflict",
            "1 while another agent with this host's node id and PublicIP holds its lease",
            registry=r)
        self.identity_conflicts = Counter(
            "leaseagent_identity_conflicts", "Times another agent with this host's identity was found",
            registry=r)
        self.lease_changes = Counter(
            "leaseagent_lease_subnet_changes",
            "Times this host had to take a different subnet than the one it held",
            registry=r)
        self.renewals = Counter(
            "leaseagent_lease_renewals", "Successful lease keepalives", registry=r)
        self.renewal_failures = Counter(
            "leaseagent_lease_renewal_failures", "Failed lease keepalives", registry=r)
        self.etcd_up = Gauge(
            "leaseagent_etcd_up", "1 while etcd answers, 0 while it does not", registry=r)
        self.etcd_endpoint = Gauge(
            "leaseagent_etcd_endpoint_info",
            "1 for the etcd member that answered the agent last (its client URL and id)",
            ["endpoint", "member"], registry=r)
        self.etcd_request_seconds = Histogram(
            "leaseagent_etcd_request_duration_seconds", "etcd request latency", ["operation"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=r)
        self.watch_events = Counter(
            "leaseagent_watch_events", "Lease watch events received", ["type"], registry=r)
        self.relists = Counter(
            "leaseagent_watch_relists", "Full re-lists of the lease prefix", ["reason"],
            registry=r)
        self.peers = Gauge(
            "leaseagent_peers", "Valid peer leases known", ["backend"], registry=r)
        self.invalid_leases = Counter(
            "leaseagent_invalid_leases_skipped", "Peer leases skipped as invalid", ["reason"],
            registry=r)
        self.allocation_attempts = Counter(
            "leaseagent_allocation_attempts", "Create-if-absent attempts to take a subnet",
            registry=r)
        self.allocation_conflicts = Counter(
            "leaseagent_allocation_conflicts", "Allocation attempts lost to another host",
            registry=r)
        self.peer_programming_seconds = Histogram(
            "leaseagent_peer_programming_seconds",
            "Time from a peer's lease event arriving to its kernel state being in place",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1),
            registry=r)
        # Network config changes (leaseagent.agent.netconfig; docs/architecture.md,
        # "Config changes").
        self.config_revision = Gauge(
            "leaseagent_network_config_revision",
            "The etcd revision of the network config in force on this host", registry=r)
        self.config_changes = Counter(
            "leaseagent_network_config_changes",
            "Network config changes applied while running, by class (in-place, re-lease, "
            "rebuild)", ["class"], registry=r)
        self.config_ignored = Counter(
            "leaseagent_network_config_ignored",
            "Network config versions ignored, the last good one kept: invalid, missing (the "
            "key deleted), unusable (valid, but this host cannot run it)", ["reason"],
            registry=r)
        self.config_coalesced = Counter(
            "leaseagent_network_config_coalesced",
            "Network config versions passed over for a later one written soon after",
            registry=r)
        # The files the agent writes (subnet.env, Docker's options; leaseagent.agent.daemon).
        self.files_in_sync = Gauge(
            "leaseagent_files_in_sync",
            "1 when every file the agent writes holds what it should (checked every resync "
            "period)", registry=r)
        self.file_write_failures = Counter(
            "leaseagent_file_write_failures", "Failed writes of a file the agent keeps "
            "(retried; the lease and the data plane are kept)", ["file"], registry=r)
        self.file_repairs = Counter(
            "leaseagent_file_repairs",
            "Files the agent keeps written again after something else removed or changed them",
            ["file"], registry=r)
        self._dataplane: DataPlaneStatus | None = None
        r.register(_DataPlaneCollector(lambda: self._dataplane))
        self._rules: dict[int, RulesStatus] = {}  # by family
        r.register(_RulesCollector(lambda: self._rules))
        r.register(_AsyncioCollector())
        self._ready: Callable[[], bool] | None = None
        r.register(_ReadyCollector(lambda: self._ready))

    def set_identity(self, *, public_ip: str, node_id: str, backend: str) -> None:
        self._identity = {"public_ip": public_ip, "node_id": node_id, "backend": backend}
        self._lease_info.info({"subnet": "", **self._identity})

    def set_lease(self, *, subnet: str) -> None:
        self._lease_info.info({"subnet": subnet, **self._identity})

    def export_rules(self, status: RulesStatus, *, family: int = 4) -> None:
        """Export one family's traffic rules' status (read at each scrape) from now on,
        in place of that family's earlier one."""
        self._rules[family] = status

    def drop_rules(self, family: int) -> None:
        """Stop exporting `family`'s traffic rules (that family is no longer in use)."""
        self._rules.pop(family, None)

    def export_readiness(self, ready: Callable[[], bool]) -> None:
        """Export `ready()` (asked at each scrape) as leaseagent_ready from now on."""
        self._ready = ready

    def export_dataplane(self, status: DataPlaneStatus) -> None:
        """Export the data plane's status (read at each scrape) from now on."""
        self._dataplane = status
