"""A real Prometheus (Debian's) scraping a real lab: targets found through etcd, the
shipped rules loaded, quiet while the cluster is healthy and through a normal restart,
LeaseagentDown firing within its documented time when an agent stops and resolving when
it is back; every query of the Grafana dashboard parses and returns data.

Timings (leaseagent.lab.prometheus): scrape and evaluation every 2 s. The lab loads a
copy of the shipped rules that differs in one line: LeaseagentDown's `for: 30s` is
`for: 12s` (DOWN_FOR), so it fires 12-16 s after the agent stops (asserted: not before
DOWN_FOR, and with 15 s of margin for a busy machine) and resolves within 4 s of the agent
being back. The shipped 30 s is what promtool's unit tests check against the shipped file
(tests/unit/test_prometheus_rules.py); 12 s is still well past a lab agent's restart, which
must fire nothing. LEASEAGENT_FULL=1 loads the shipped rules themselves (fires 30-34 s
after the stop).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from lengths import FULL
from polling import wait_value

from leaseagent.lab import Lab
from leaseagent.lab.prometheus import RULES, SCRAPE_SECONDS

T = TypeVar("T")
DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "leaseagent-dashboard.json"
SHIPPED_DOWN = 'expr: up{job="leaseagent"} == 0\n        for: 30s\n'  # LeaseagentDown's
DOWN_FOR = 30.0 if FULL else 12.0  # LeaseagentDown's for: in the rules the lab loads
MARGIN = 15.0
# A healthy cluster watched with nothing pending: 5 evaluations of every rule in full, 3 in CI
# (a rule whose condition holds is pending from the first evaluation that sees it).
QUIET_SECONDS = 5 * SCRAPE_SECONDS if FULL else 3 * SCRAPE_SECONDS


def _wait(what: str, check: Callable[[], T | None], timeout: float) -> T:
    return wait_value(check, timeout=timeout, what=what, every=0.2)


@pytest.fixture(scope="module")
def prometheus_rules(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped rules with LeaseagentDown's `for:` at DOWN_FOR: the one line changed
    (the lab's prometheus_lab fixture loads this file)."""
    shipped = RULES.read_text()
    assert shipped.count(SHIPPED_DOWN) == 1, "LeaseagentDown's for: is no longer 30s"
    if FULL:
        return RULES  # the shipped file itself
    copy = tmp_path_factory.mktemp("prometheus") / RULES.name
    copy.write_text(shipped.replace(SHIPPED_DOWN, SHIPPED_DOWN.replace(
        "for: 30s", f"for: {DOWN_FOR:g}s")))
    return copy


@pytest.fixture(scope="module")
def lab(prometheus_lab: Lab) -> Lab:
    return prometheus_lab


def _all_up_and_ready(lab: Lab) -> bool:
    prom = lab.prometheus_server
    targets = prom.targets()
    ready = prom.query('leaseagent_ready{job="leaseagent"} == 1')
    return (len(targets) == len(lab.hosts) and all(t["health"] == "up" for t in targets)
            and len(ready) == len(lab.hosts))


def _firing(lab: Lab, alertname: str, node: str) -> bool:
    return any(a["alertname"] == alertname and a.get("node") == node
               for a in lab.prometheus_server.firing())


@pytest.mark.root
def test_every_host_is_discovered_and_up(lab: Lab) -> None:
    prom = lab.prometheus_server
    _wait("every target up and ready", lambda: _all_up_and_ready(lab), timeout=30)
    targets = {t["labels"]["instance"]: t["labels"] for t in prom.targets()}
    assert targets == {
        f"{h.public_ip}:9464": {"instance": f"{h.public_ip}:9464", "job": "leaseagent",
                                "node": lab.node_id(h), "public_ip": str(h.public_ip)}
        for h in lab.hosts.values()}
    groups = {g["name"]: g for g in prom.api("rules")["groups"]}
    rules = groups["leaseagent"]["rules"]
    assert len([r for r in rules if r["type"] == "alerting"]) >= 15
    assert len([r for r in rules if r["type"] == "recording"]) >= 5
    assert all(r["health"] == "ok" for r in rules), [r for r in rules if r["health"] != "ok"]


@pytest.mark.root
def test_a_healthy_cluster_has_not_even_a_pending_alert(lab: Lab) -> None:
    """QUIET_SECONDS (three evaluations of every rule; five with LEASEAGENT_FULL=1) with no
    alert firing or pending: no rule's condition holds for a healthy cluster, whatever its
    `for:`."""
    _wait("every target up and ready", lambda: _all_up_and_ready(lab), timeout=30)
    time.sleep(2 * SCRAPE_SECONDS)  # the first ready scrape is evaluated
    since = time.time()
    time.sleep(QUIET_SECONDS)
    window = max(1, int(time.time() - since))
    left = lab.prometheus_server.query(
        f"min(min_over_time(leaseagent:lease_remaining_seconds[{window}s]))")
    print(f"least lease time left seen: {float(left[0]['value'][1]):.1f} s of {lab.lease_ttl}")
    assert lab.prometheus_server.query(f"count_over_time(ALERTS[{window}s])") == []


@pytest.mark.root
def test_every_dashboard_query_parses_and_returns_data(lab: Lab) -> None:
    """The dashboard's template variables stand for what Grafana puts there: all hosts,
    and a rate window of a minute."""
    _wait("every target up and ready", lambda: _all_up_and_ready(lab), timeout=30)
    dashboard = json.loads(DASHBOARD.read_text())
    queries = [(panel["title"], target["expr"]) for panel in dashboard["panels"]
               for target in panel.get("targets", [])]
    assert len(queries) >= 20

    def empty() -> list[Any]:
        without: list[Any] = []
        for title, expr in queries:
            concrete = expr.replace("$__rate_interval", "1m").replace("$node", ".*")
            assert "$" not in concrete, (title, expr)
            if not lab.prometheus_server.query(concrete):  # a parse error raises LabError
                without.append((title, concrete))
        return without

    # rate() needs two samples in its window: within 3 scrapes of the targets being up
    # (at once when earlier tests ran that long).
    left = empty()
    deadline = time.monotonic() + 3 * SCRAPE_SECONDS
    while left and time.monotonic() < deadline:
        time.sleep(0.5)
        left = empty()
    assert left == []
    # The host variable's label_values(up{job="leaseagent"}, node), as Grafana asks for it.
    nodes = lab.prometheus_server.api("label/node/values", **{"match[]": 'up{job="leaseagent"}'})
    assert sorted(nodes) == sorted(lab.node_id(h) for h in lab.hosts.values())


@pytest.mark.root
def test_a_host_that_joins_is_scraped_and_one_removed_is_not(lab: Lab) -> None:
    """Discovery follows etcd: a new host's agent publishes its address and is scraped
    within seconds; a host removed from the cluster (its key deleted, as an operator
    would) leaves the targets."""
    prom = lab.prometheus_server
    joined = time.monotonic()
    host = lab.add_host(containers=0)
    instance = f"{host.public_ip}:9464"
    try:
        _wait("the new host scraped", lambda: any(
            t["labels"]["instance"] == instance and t["health"] == "up"
            for t in prom.targets()), timeout=30)
        print(f"a new host scraped {time.monotonic() - joined:.1f} s after add_host began")
    finally:
        lab.remove_host(host)
    _wait("the removed host no longer a target", lambda: all(
        t["labels"]["instance"] != instance for t in prom.targets()), timeout=30)


@pytest.mark.root
def test_a_normal_restart_fires_nothing(lab: Lab) -> None:
    host = lab.hosts[2]
    since = time.time()
    lab.stop_agent(host)
    lab.start_agent(host)
    lab.wait_ready(host)
    _wait("the restarted agent scraped and ready", lambda: _all_up_and_ready(lab), timeout=30)
    time.sleep(3 * SCRAPE_SECONDS)
    window = max(1, int(time.time() - since) + 1)
    assert lab.prometheus_server.query(f'count_over_time(ALERTS{{alertstate="firing"}}[{window}s])'
                                       ) == []


@pytest.mark.root
def test_a_stopped_agent_fires_its_alert_in_time_and_resolves_when_back(lab: Lab) -> None:
    host = lab.hosts[3]
    node = lab.node_id(host)
    _wait("every target up and ready", lambda: _all_up_and_ready(lab), timeout=30)
    stopped = time.monotonic()  # before: the scrapes may fail while it stops
    lab.stop_agent(host)
    try:
        _wait("LeaseagentDown firing", lambda: _firing(lab, "LeaseagentDown", node),
              timeout=DOWN_FOR + 2 * SCRAPE_SECONDS + MARGIN)
        fired = time.monotonic() - stopped
        print(f"LeaseagentDown fired {fired:.1f} s after the agent stopped")
        assert fired >= DOWN_FOR - 0.5, fired  # its for: is honoured
        others = [a for a in lab.prometheus_server.firing() if a.get("node") != node]
        assert others == []
    finally:
        lab.start_agent(host)
    lab.wait_ready(host)
    back = time.monotonic()
    _wait("LeaseagentDown resolved", lambda: not _firing(lab, "LeaseagentDown", node) or None,
          timeout=2 * SCRAPE_SECONDS + MARGIN)
    print(f"resolved {time.monotonic() - back:.1f} s after the agent was ready again")
