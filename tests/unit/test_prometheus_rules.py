"""deploy/prometheus: the alert and recording rules pass `promtool check rules` and their
unit tests (`promtool test rules`); every alert has a test that makes it fire and is
quiet in the healthy-cluster and normal-restart tests; every agent metric the rules
name is one the agent exports; the scrape config passes `promtool check config`."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from leaseagent.dataplane.base import DataPlaneStatus
from leaseagent.dataplane.firewall import RulesStatus
from leaseagent.metrics import Metrics

DIR = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"
RULES = DIR / "leaseagent-rules.yml"
TESTS = DIR / "leaseagent-rules.test.yml"
SCRAPE = DIR / "prometheus.yml"
QUIET_TESTS = ("a healthy cluster fires nothing",
               "a normal restart (two scrapes missed, counters reset) fires nothing")
SEVERITIES = {"critical", "warning", "info"}

needs_promtool = pytest.mark.skipif(shutil.which("promtool") is None,
                                    reason="promtool (Debian: prometheus) missing")


# Read without a YAML library (the venv has none): the rules file's layout is fixed, each
# rule a `- record:` or `- alert:` item with `expr:`, `labels:` and `annotations:` keys.
_ITEM = re.compile(r"^      - (record|alert): (\S+)\n(.*?)(?=^      - |^  - name|\Z)", re.M | re.S)


def _rules() -> list[dict[str, Any]]:
    rules = []
    for kind, name, body in _ITEM.findall(RULES.read_text()):
        expr = re.search(r"^        expr: (?:>-\n((?:          .*\n?)+)|(.*)$)", body, re.M)
        severity = re.search(r"^          severity: (\S+)$", body, re.M)
        summary = re.search(r'^          summary: "(.*)"$', body, re.M)
        description = re.search(r"^          description: >-\n((?:            .*\n?)+)", body,
                                re.M)
        rules.append({
            kind: name, "expr": " ".join((expr.group(1) or expr.group(2)).split()) if expr else "",
            "severity": severity.group(1) if severity else None,
            "summary": summary.group(1) if summary else "",
            "description": " ".join(description.group(1).split()) if description else "",
        })
    return rules


def _alerts() -> list[dict[str, Any]]:
    return [rule for rule in _rules() if "alert" in rule]


def _cases() -> list[tuple[str, str, bool]]:
    """(test name, alert name, fires) for each `alert_rule_test` case of the unit tests."""
    cases = []
    test = ""
    alertname = ""
    for line in TESTS.read_text().splitlines():
        if m := re.match(r"^- name: (.*)$", line):
            test = m.group(1)
        elif m := re.match(r"^\s+alertname: (\S+)$", line):
            alertname = m.group(1)
        elif m := re.match(r"^\s+exp_alerts:(.*)$", line):
            cases.append((test, alertname, m.group(1).strip() != "[]"))
    return cases


def _promtool(*args: str, cwd: Path = DIR) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["promtool", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120, check=False)


@needs_promtool
def test_promtool_checks_the_rules() -> None:
    result = _promtool("check", "rules", RULES.name)
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_promtool_unit_tests_pass() -> None:
    result = _promtool("test", "rules", TESTS.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@needs_promtool
def test_promtool_finds_a_broken_expectation(tmp_path: Path) -> None:
    """The unit tests can fail: LeaseagentDown's own test fails against rules whose
    LeaseagentDown waits ten minutes."""
    rules = RULES.read_text()
    broken = rules.replace('expr: up{job="leaseagent"} == 0\n        for: 30s',
                           'expr: up{job="leaseagent"} == 0\n        for: 10m')
    assert broken != rules
    (tmp_path / RULES.name).write_text(broken)
    text = TESTS.read_text()
    header = text[:text.index("tests:\n") + len("tests:\n")]
    start = text.index("- name: an agent that stays down\n")
    end = text.index("\n- name: ", start + 1)
    (tmp_path / TESTS.name).write_text(header + text[start:end] + "\n")
    result = _promtool("test", "rules", TESTS.name, cwd=tmp_path)
    assert result.returncode != 0
    assert "LeaseagentDown" in result.stdout + result.stderr
    (tmp_path / RULES.name).write_text(rules)  # and the same test passes on the real rules
    result = _promtool("test", "rules", TESTS.name, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_is_tested_firing_and_quiet() -> None:
    fired: set[str] = set()
    quiet: dict[str, set[str]] = {name: set() for name in QUIET_TESTS}
    for test, alertname, fires in _cases():
        if fires:
            assert test not in QUIET_TESTS
            fired.add(alertname)
        elif test in quiet:
            quiet[test].add(alertname)
    names = {a["alert"] for a in _alerts()}
    assert len(names) == len(_alerts()) >= 15
    assert names - fired == set(), "alerts no test makes fire"
    for name, seen in quiet.items():
        assert names - seen == set(), f"alerts not checked quiet in {name!r}"


def test_every_alert_has_a_severity_and_says_where_and_what_to_do() -> None:
    for alert in _alerts():
        assert alert["severity"] in SEVERITIES, alert["alert"]
        summary, description = alert["summary"], alert["description"]
        # The host: its target (and node) or, for a cluster-wide alert, what collides.
        assert re.search(r"\$labels\.(instance|node_id|subnet)|no leaseagent target",
                         summary), alert["alert"]
        # ... and, after a colon, what to do (the description says more).
        what, _, action = summary.rpartition(": ")
        assert what and len(action.split()) >= 3, alert["alert"]
        assert len(description) > 60, alert["alert"]


def _exported_names() -> set[str]:
    metrics = Metrics()
    metrics.export_dataplane(DataPlaneStatus())
    metrics.export_rules(RulesStatus())
    metrics.export_readiness(lambda: True)
    names = set()
    for family in metrics.registry.collect():  # labelled ones too, before any label value
        suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"),
                    "info": ("_info",)}.get(family.type, ("",))
        names |= {family.name + suffix for suffix in suffixes}
        names |= {sample.name for sample in family.samples}
    return names


def test_the_rules_name_only_metrics_the_agent_exports() -> None:
    exported = _exported_names()
    used = set()
    for rule in _rules():
        used |= set(re.findall(r"\bleaseagent_[a-z0-9_]+", rule["expr"]))
    assert used, "no agent metric found in the rules"
    assert used - exported == set()


@needs_promtool
def test_the_scrape_config_is_valid(tmp_path: Path) -> None:
    """prometheus.yml with its two paths pointed at a scratch copy of the rules and an
    (empty) targets file."""
    shutil.copy(RULES, tmp_path / RULES.name)
    (tmp_path / "targets.json").write_text("[]\n")
    config = (SCRAPE.read_text()
              .replace("/etc/prometheus/leaseagent-rules.yml", str(tmp_path / RULES.name))
              .replace("/var/lib/prometheus/leaseagent-targets.json",
                       str(tmp_path / "targets.json")))
    (tmp_path / "prometheus.yml").write_text(config)
    result = _promtool("check", "config", "prometheus.yml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_the_targets_service_verifies_and_writes_the_file_the_scrape_job_reads(tmp_path: Path
                                                                               ) -> None:
    unit = (DIR / "leasectl-prometheus-targets.service").read_text()
    exec_start = next(line for line in unit.splitlines() if line.startswith("ExecStart="))
    targets_file = re.search(r"- files:\n\s+- (\S+)", SCRAPE.read_text())
    assert targets_file is not None and exec_start.endswith(f" {targets_file.group(1)}")
    bindir = Path(sys.executable).parent
    target = tmp_path / "leasectl-prometheus-targets.service"
    target.write_text(unit.replace("/usr/local/bin/", f"{bindir}/")
                      .replace("WantedBy=multi-user.target", ""))
    result = subprocess.run(["systemd-analyze", "verify", str(target)], capture_output=True,
                            text=True, check=False)
    problems = [line for line in result.stderr.splitlines() if target.name in line]
    assert not problems, result.stderr


DASHBOARD = DIR.parent / "grafana" / "leaseagent-dashboard.json"


def test_the_dashboard_is_laid_out_and_asks_only_for_what_exists() -> None:
    """Every panel on the Prometheus data source variable, with a query; no two panels
    overlap; every agent metric a query names is exported, every recorded series is
    recorded by the rules. (That each query parses and returns data: the lab's
    Prometheus, tests/e2e/test_prometheus_lab.py.)"""
    dashboard = json.loads(DASHBOARD.read_text())
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    cells: set[tuple[int, int]] = set()
    for panel in panels:
        pos = panel["gridPos"]
        assert 0 <= pos["x"] and pos["x"] + pos["w"] <= 24, panel["title"]
        mine = {(x, y) for x in range(pos["x"], pos["x"] + pos["w"])
                for y in range(pos["y"], pos["y"] + pos["h"])}
        assert not mine & cells, f"{panel['title']} overlaps another panel"
        cells |= mine
    exported = _exported_names()
    recorded = {rule["record"] for rule in _rules() if "record" in rule}
    exprs = [t["expr"] for p in panels if p["type"] != "row" for t in p["targets"]]
    for panel in (p for p in panels if p["type"] != "row"):
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"] and all(t["expr"] for t in panel["targets"]), panel["title"]
    names = {n for e in exprs for n in re.findall(r"\bleaseagent_[a-z0-9_]+", e)}
    records = {n for e in exprs for n in re.findall(r"\bleaseagent:[a-z0-9_:]+", e)}
    assert names - exported == set()
    assert records and records - recorded == set()
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["node"]["definition"] == 'label_values(up{job="leaseagent"}, node)'


def test_every_recorded_series_is_read_by_an_alert_or_the_dashboard() -> None:
    readers = " ".join(rule["expr"] for rule in _alerts()) + DASHBOARD.read_text()
    recorded = [rule["record"] for rule in _rules() if "record" in rule]
    assert recorded
    assert [name for name in recorded if name not in readers] == []
