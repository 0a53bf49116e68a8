"""A real Prometheus for the lab: scraping every host's agent, with the shipped rules.

With `Lab(prometheus=True)` (`deploy/lab up --prometheus`, the default when
Debian's `prometheus` is installed) the lab starts, in a namespace of its own
on the underlay (la-<name>-prom, 10.250.0.3):

- `leasectl prometheus-targets` writing the file_sd file from what the agents
  publish in etcd (leaseagent.core.monitoring), as on a real cluster: the lab
  writes no host list;
- Debian's `prometheus` on 10.250.0.3:9090 with its own data dir under the
  lab's state dir, the job `leaseagent` reading that file, and the rules
  shipped in deploy/prometheus/leaseagent-rules.yml loaded unchanged;
- a forwarder (leaseagent.lab.forward) from 127.0.0.1:<free port> on this
  machine to it: the URL `deploy/lab up` prints.

Intervals: scrape and rule evaluation every 2 s (SCRAPE_SECONDS; the scrape
timeout as long, so a machine busy for a second does not make a target look
down), so an alert fires one scrape plus one evaluation (4 s at most) after its
`for:` has passed; the rules' `for:` stay as shipped (LeaseagentDown: 30 s; the
test suite's Prometheus lab passes `rules=` a copy with a shorter one). Everything
lives in <state dir>/prometheus/ (config, targets, data, logs, pid files) and
goes with `down`.
"""

from __future__ import annotations

import json
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from leaseagent.files import write_atomic
from leaseagent.lab import processes
from leaseagent.lab.commands import tool
from leaseagent.lab.errors import LabError
from leaseagent.lab.processes import log_tail
from leaseagent.lab.state import PROMETHEUS_PID_FILES
from leaseagent.lab.topology import PROMETHEUS_IP

PORT = 9090  # alone in its namespace: free
SCRAPE_SECONDS = 2
JOB = "leaseagent"
RULES = Path(__file__).resolve().parents[2] / "deploy" / "prometheus" / "leaseagent-rules.yml"


def config(*, rules: Path, targets: Path) -> str:
    """prometheus.yml for the lab: the shipped job, with the lab's short intervals."""
    doc = {
        "global": {"scrape_interval": f"{SCRAPE_SECONDS}s",
                   "evaluation_interval": f"{SCRAPE_SECONDS}s",
                   "scrape_timeout": f"{SCRAPE_SECONDS}s"},
        "rule_files": [str(rules)],
        "scrape_configs": [{"job_name": JOB,
                            "file_sd_configs": [{"files": [str(targets)],
                                                 "refresh_interval": "5s"}]}],
    }
    return json.dumps(doc, indent=2) + "\n"  # JSON is YAML


class LabPrometheus:
    """The lab's Prometheus, its target writer and its forwarder, by their pid files."""

    def __init__(self, dir: Path, *, ns: str, endpoints: str, prefix: str,
                 rules: Path = RULES) -> None:
        self.dir = dir
        self.rules = rules
        self.ns = ns
        self.endpoints = endpoints
        self.prefix = prefix

    @property
    def targets_file(self) -> Path:
        return self.dir / "targets.json"

    @property
    def url(self) -> str:
        """http://127.0.0.1:<port>, where the forwarder listens."""
        try:
            return f"http://127.0.0.1:{int((self.dir / 'port').read_text())}"
        except (OSError, ValueError):
            raise LabError(f"the lab's Prometheus has no forwarder ({self.dir / 'port'})") from None

    def start(self, *, timeout: float = 30) -> None:
        if not self.rules.is_file():
            raise LabError(f"no rules at {self.rules} (the lab runs from the source tree)")
        self.dir.mkdir(parents=True, exist_ok=True)
        write_atomic(self.dir / "prometheus.yml",
                     config(rules=self.rules, targets=self.targets_file).encode())
        processes.spawn(
            [tool("leasectl"), "--etcd-endpoints", self.endpoints, "--etcd-prefix", self.prefix,
             "prometheus-targets", str(self.targets_file)],
            ns=self.ns, log_file=self.dir / "targets.log", pid_file=self.dir / "targets.pid")
        processes.spawn(
            [tool("prometheus"), f"--config.file={self.dir / 'prometheus.yml'}",
             f"--storage.tsdb.path={self.dir / 'data'}",
             f"--web.listen-address={PROMETHEUS_IP}:{PORT}", "--log.level=warn"],
            ns=self.ns, log_file=self.dir / "prometheus.log",
            pid_file=self.dir / "prometheus.pid")
        processes.spawn(
            [sys.executable, "-m", "leaseagent.lab.forward", "--netns", self.ns,
             "--to", f"{PROMETHEUS_IP}:{PORT}", "--port-file", str(self.dir / "port")],
            log_file=self.dir / "forward.log", pid_file=self.dir / "forward.pid")
        self.wait_ready(timeout=timeout)

    def wait_ready(self, *, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as r:
                    if r.status == 200:
                        return
            except (LabError, OSError):
                pass
            for name in ("prometheus", "forward", "targets"):
                if processes.running(self.dir / f"{name}.pid") is None:
                    raise LabError(f"the lab's {name} exited:\n"
                                   + log_tail(self.dir / f"{name}.log"))
            if time.monotonic() > deadline:
                raise LabError(f"the lab's Prometheus not ready after {timeout}s:\n"
                               + log_tail(self.dir / "prometheus.log"))
            time.sleep(0.1)

    def api(self, path: str, **params: str) -> Any:
        """GET /api/v1/<path>?params: its `data`; LabError with Prometheus's error."""
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                doc = json.load(r)
        except urllib.error.HTTPError as exc:
            doc = json.load(exc)
        if doc.get("status") != "success":
            raise LabError(f"Prometheus: {doc.get('errorType')}: {doc.get('error')} ({url})")
        return doc["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """The instant vector of `expr` now (a scalar as one sample with no labels)."""
        data = self.api("query", query=expr)
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        result: list[dict[str, Any]] = data["result"]
        return result

    def firing(self) -> list[dict[str, str]]:
        """The labels of every alert firing now."""
        return [a["labels"] for a in self.api("alerts")["alerts"] if a["state"] == "firing"]

    def targets(self) -> list[dict[str, Any]]:
        """The job's active targets, with their health."""
        active: list[dict[str, Any]] = self.api("targets", state="active")["activeTargets"]
        return [t for t in active if t["labels"].get("job") == JOB]

    def stop(self) -> None:
        for name in PROMETHEUS_PID_FILES:
            proc = processes.running(self.dir / name)
            if proc is not None:
                proc.stop(grace=10)
            (self.dir / name).unlink(missing_ok=True)
