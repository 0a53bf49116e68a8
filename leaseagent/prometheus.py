"""The Prometheus metric types the agent uses, and their text exposition format.

Counter, Gauge, Histogram and Info, with or without labels; metric families made
at scrape time by collectors; a registry that renders them as the Prometheus text
format (version 0.0.4), byte for byte what prometheus-client's `generate_latest`
renders for the same metrics (tests/unit/test_prometheus_text.py), with no
`_created` series. Not prometheus-client itself: importing it costs the agent
~3 MiB (its exposition module brings http.server, wsgiref, urllib, email...;
docs/benchmarks.md, "Memory at 5,000 peers"), for a few hundred lines of what
the agent needs. Used from one event loop: no locks.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import NamedTuple, Protocol, Self

CONTENT_TYPE_LATEST = "text/plain; version=0.0.4; charset=utf-8"
INF = float("inf")


def go_float(value: float) -> str:
    """A sample value as Prometheus (Go) writes it: +Inf, -Inf, NaN, else Python's
    repr, with an exponent where Go switches to one sooner (prometheus-client's
    floatToGoString)."""
    d = float(value)
    if d == INF:
        return "+Inf"
    if d == -INF:
        return "-Inf"
    if math.isnan(d):
        return "NaN"
    s = repr(d)
    dot = s.find(".")
    if d > 0 and dot > 6:
        mantissa = f"{s[0]}.{s[1:dot]}{s[dot + 1:]}".rstrip("0.")
        return f"{mantissa}e+0{dot - 1}"
    return s


def _escape(text: str) -> str:
    return text.replace("\\", r"\\").replace("\n", r"\n")


def _label_value(text: str) -> str:
    return _escape(text).replace('"', r"\"")


class Sample(NamedTuple):
    name: str  # with its suffix (_total, _bucket, ...)
    labels: dict[str, str]
    value: float


class Family:
    """One metric family as a scrape renders it: its name (a counter's without
    `_total`), help, type, and samples."""

    type = "untyped"

    def __init__(self, name: str, documentation: str, labels: Sequence[str] = ()) -> None:
        self.name = name
        self.documentation = documentation
        self.labels = tuple(labels)
        self.samples: list[Sample] = []

    def _labelled(self, values: Sequence[str]) -> dict[str, str]:
        return dict(zip(self.labels, values, strict=True))


class GaugeMetricFamily(Family):
    type = "gauge"

    def __init__(self, name: str, documentation: str, value: float | None = None,
                 labels: Sequence[str] = ()) -> None:
        super().__init__(name, documentation, labels)
        if value is not None:
            self.samples.append(Sample(name, {}, value))

    def add_metric(self, labels: Sequence[str], value: float) -> None:
        self.samples.append(Sample(self.name, self._labelled(labels), value))


class CounterMetricFamily(Family):
    type = "counter"

    def __init__(self, name: str, documentation: str, value: float | None = None,
                 labels: Sequence[str] = ()) -> None:
        super().__init__(name.removesuffix("_total"), documentation, labels)
        if value is not None:
            self.samples.append(Sample(self.name + "_total", {}, value))

    def add_metric(self, labels: Sequence[str], value: float) -> None:
        self.samples.append(Sample(self.name + "_total", self._labelled(labels), value))


class HistogramMetricFamily(Family):
    type = "histogram"

    def __init__(self, name: str, documentation: str, *,
                 buckets: Sequence[tuple[str, float]], sum_value: float) -> None:
        """`buckets`: (upper bound as text, cumulative count), the last "+Inf"."""
        super().__init__(name, documentation)
        self._add({}, buckets, sum_value)

    def _add(self, labels: dict[str, str], buckets: Sequence[tuple[str, float]],
             sum_value: float) -> None:
        for bound, count in buckets:
            self.samples.append(Sample(self.name + "_bucket", {**labels, "le": bound}, count))
        self.samples.append(Sample(self.name + "_count", dict(labels), buckets[-1][1]))
        self.samples.append(Sample(self.name + "_sum", dict(labels), sum_value))


class Collector(Protocol):
    def collect(self) -> Iterable[Family]: ...


class CollectorRegistry:
    def __init__(self) -> None:
        self._collectors: list[Collector] = []

    def register(self, collector: Collector) -> None:
        self._collectors.append(collector)

    def collect(self) -> Iterator[Family]:
        for collector in self._collectors:
            yield from collector.collect()

    def get_sample_value(self, name: str, labels: Mapping[str, str] | None = None
                         ) -> float | None:
        """The value of the sample `name` with exactly `labels`, or None (as
        prometheus-client's registry answers; for tests and in-process harnesses)."""
        want = dict(labels or {})
        for family in self.collect():
            for sample, have, value in family.samples:
                if sample == name and have == want:
                    return value
        return None


def generate_latest(registry: CollectorRegistry) -> bytes:
    """Every family of `registry` in the text format."""
    out: list[str] = []
    for family in registry.collect():
        name, kind = family.name, family.type
        if kind == "counter":
            name += "_total"
        elif kind == "info":
            name, kind = name + "_info", "gauge"
        out.append(f"# HELP {name} {_escape(family.documentation)}\n# TYPE {name} {kind}\n")
        for sample, labels, value in family.samples:
            text = ",".join(f'{k}="{_label_value(v)}"' for k, v in sorted(labels.items()))
            out.append(f"{sample}{{{text}}} {go_float(value)}\n" if text
                       else f"{sample} {go_float(value)}\n")
    return "".join(out).encode()


# -- the metrics the agent updates ------------------------------------------------------


class _Metric:
    """A metric of one type; with label names, a parent whose `labels(...)` are its
    series (made at first use, kept until `clear`)."""

    kind: str

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = (), *,
                 registry: CollectorRegistry) -> None:
        self._name = name
        self._documentation = documentation
        self._labelnames = tuple(labelnames)
        self._children: dict[tuple[str, ...], Self] = {}
        registry.register(self)

    def _child(self) -> Self:
        raise NotImplementedError

    def labels(self, *values: str, **named: str) -> Self:
        if not self._labelnames:
            raise ValueError(f"{self._name} has no labels")
        if named:
            if values or set(named) != set(self._labelnames):
                raise ValueError(f"{self._name}: labels {sorted(named)}, "
                                 f"expected {list(self._labelnames)}")
            values = tuple(str(named[n]) for n in self._labelnames)
        elif len(values) != len(self._labelnames):
            raise ValueError(f"{self._name}: {len(values)} label values, "
                             f"expected {len(self._labelnames)}")
        key = tuple(str(v) for v in values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self._child()
        return child

    def clear(self) -> None:
        self._children.clear()

    def _check_unlabelled(self) -> None:
        if self._labelnames:
            raise ValueError(f"{self._name} has labels: use labels(...)")

    def _samples(self, labels: dict[str, str]) -> Iterator[Sample]:
        raise NotImplementedError

    def collect(self) -> Iterator[Family]:
        family = Family(self._name, self._documentation)
        family.type = self.kind
        if self._labelnames:
            for key, child in self._children.items():
                family.samples.extend(child._samples(dict(zip(self._labelnames, key,
                                                              strict=True))))
        else:
            family.samples.extend(self._samples({}))
        yield family


class _Nowhere(CollectorRegistry):
    """Where a labelled metric's series are made: registered nowhere (their parent
    collects them)."""

    def register(self, collector: Collector) -> None:
        pass


_NOWHERE = _Nowhere()


class Counter(_Metric):
    kind = "counter"

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = (), *,
                 registry: CollectorRegistry) -> None:
        super().__init__(name.removesuffix("_total"), documentation, labelnames,
                         registry=registry)
        self._value = 0.0

    def _child(self) -> Self:
        return type(self)(self._name, "", registry=_NOWHERE)

    def inc(self, amount: float = 1.0) -> None:
        self._check_unlabelled()
        if amount < 0:
            raise ValueError("a counter only goes up")
        self._value += amount

    def _samples(self, labels: dict[str, str]) -> Iterator[Sample]:
        yield Sample(self._name + "_total", labels, self._value)


class Gauge(_Metric):
    kind = "gauge"

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = (), *,
                 registry: CollectorRegistry) -> None:
        super().__init__(name, documentation, labelnames, registry=registry)
        self._value = 0.0

    def _child(self) -> Self:
        return type(self)(self._name, "", registry=_NOWHERE)

    def set(self, value: float) -> None:
        self._check_unlabelled()
        self._value = float(value)

    def inc(self, amount: float = 1.0) -> None:
        self._check_unlabelled()
        self._value += amount

    def dec(self, amount: float = 1.0) -> None:
        self.inc(-amount)

    def _samples(self, labels: dict[str, str]) -> Iterator[Sample]:
        yield Sample(self._name, labels, self._value)


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = (), *,
                 buckets: Sequence[float], registry: CollectorRegistry) -> None:
        super().__init__(name, documentation, labelnames, registry=registry)
        self._bounds = (*(float(b) for b in buckets if float(b) != INF), INF)
        self._counts = [0] * len(self._bounds)
        self._sum = 0.0

    def _child(self) -> Self:
        return type(self)(self._name, "", buckets=self._bounds, registry=_NOWHERE)

    def observe(self, value: float) -> None:
        self._check_unlabelled()
        self._sum += value
        for i, bound in enumerate(self._bounds):
            if value <= bound:
                self._counts[i] += 1
                break

    def _samples(self, labels: dict[str, str]) -> Iterator[Sample]:
        total = 0
        for bound, count in zip(self._bounds, self._counts, strict=True):
            total += count
            yield Sample(self._name + "_bucket", {**labels, "le": go_float(bound)}, float(total))
        yield Sample(self._name + "_count", labels, float(total))
        yield Sample(self._name + "_sum", labels, self._sum)

class Info(_Metric):
    """A constant 1 whose labels say something (`<name>_info{...} 1.0`)."""

    kind = "info"

    def __init__(self, name: str, documentation: str, *, registry: CollectorRegistry) -> None:
        super().__init__(name, documentation, registry=registry)
        self._value: dict[str, str] = {}

    def _child(self) -> Self:
        raise ValueError("an info has no labels")

    def info(self, value: Mapping[str, str]) -> None:
        self._value = dict(value)

    def _samples(self, labels: dict[str, str]) -> Iterator[Sample]:
        yield Sample(self._name + "_info", dict(self._value), 1.0)
