"""leaseagent.prometheus renders what prometheus-client renders for the same metrics,
byte for byte (the format Prometheus, the lab and the tests parse), and answers
get_sample_value alike."""

from __future__ import annotations

import prometheus_client
import prometheus_client.metrics_core as pc_core
from prometheus_client.exposition import generate_latest as pc_latest

from leaseagent import prometheus as ours


def _build(lib: object, core: object, registry: object) -> None:
    """The same metrics and collectors through either library (`lib`: the module with
    Counter, Gauge, Histogram, Info; `core`: the one with the metric families)."""
    r = registry
    lib.Info("t_build", "Build \\ info\nsecond line", registry=r).info(  # type: ignore[attr-defined]
        {"version": 'a"b\\c'})
    lib.Info("t_lease", "Nothing said yet", registry=r)  # type: ignore[attr-defined]
    g = lib.Gauge("t_gauge", "A gauge", registry=r)  # type: ignore[attr-defined]
    g.set(float("inf"))
    lib.Gauge("t_big", "Go's exponent", registry=r).set(12345678.5)  # type: ignore[attr-defined]
    lib.Gauge("t_unset", "Never set", registry=r)  # type: ignore[attr-defined]
    c = lib.Counter("t_events", "Events", ["type", "a_first"], registry=r)  # type: ignore[attr-defined]
    c.labels(type="put", a_first="x").inc()
    c.labels("delete", "y").inc(2.5)
    lib.Counter("t_empty", "No series yet", ["reason"], registry=r)  # type: ignore[attr-defined]
    lib.Counter("t_plain", "Unlabelled", registry=r).inc(3)  # type: ignore[attr-defined]
    h = lib.Histogram("t_seconds", "Latency", ["operation"],  # type: ignore[attr-defined]
                      buckets=(0.001, 0.01, 1, 2.5), registry=r)
    h.labels(operation="get").observe(0.003)
    h.labels(operation="get").observe(7)
    h.labels(operation="put").observe(0.0005)
    lib.Histogram("t_plain_seconds", "Unlabelled", buckets=(0.5,),  # type: ignore[attr-defined]
                  registry=r).observe(0.25)

    class Families:
        def collect(self):  # type: ignore[no-untyped-def]
            yield core.GaugeMetricFamily("t_in_sync", "In sync", value=1)  # type: ignore[attr-defined]
            family = core.CounterMetricFamily("t_added", "Added", labels=["kind"])  # type: ignore[attr-defined]
            family.add_metric(["fdb"], 3)
            family.add_metric(["route"], 0)
            yield family
            yield core.CounterMetricFamily("t_dropped_total", "Dropped", value=4)  # type: ignore[attr-defined]
            yield core.HistogramMetricFamily(  # type: ignore[attr-defined]
                "t_reconcile_seconds", "Reconciles", buckets=[("0.1", 1), ("1.0", 2), ("+Inf", 3)],
                sum_value=4.5)

    r.register(Families())  # type: ignore[attr-defined]


def test_the_text_is_prometheus_clients_byte_for_byte() -> None:
    theirs = prometheus_client.CollectorRegistry()
    prometheus_client.disable_created_metrics()
    _build(prometheus_client, pc_core, theirs)
    mine = ours.CollectorRegistry()
    _build(ours, ours, mine)
    assert ours.generate_latest(mine).decode() == pc_latest(theirs).decode()


def test_sample_values_are_read_as_prometheus_client_reads_them() -> None:
    theirs = prometheus_client.CollectorRegistry()
    prometheus_client.disable_created_metrics()
    _build(prometheus_client, pc_core, theirs)
    mine = ours.CollectorRegistry()
    _build(ours, ours, mine)
    for name, labels in (("t_events_total", {"type": "put", "a_first": "x"}),
                         ("t_events_total", {"type": "nope", "a_first": "x"}),
                         ("t_plain_total", None), ("t_seconds_count", {"operation": "get"}),
                         ("t_seconds_bucket", {"operation": "get", "le": "0.01"}),
                         ("t_added_total", {"kind": "fdb"}), ("t_gauge", None),
                         ("t_unset", None), ("t_missing", None)):
        assert mine.get_sample_value(name, labels) == theirs.get_sample_value(name, labels), name
