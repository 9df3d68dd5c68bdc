"""End to end with the real tools: exporter -> Prometheus (rules) -> Alertmanager -> webhook.

The exporter runs on the simulator with live traffic. A real Prometheus scrapes it with the shipped
recording and alert rules (a copy whose `for:` durations are shortened); a real Alertmanager sends
to a webhook receiver inside this test. Every recording rule and every dashboard query must return
data, and an alert driven by a failure spike in the simulator must arrive with its labels and
annotations. Renaming a metric in a rule, a panel or the exporter makes this test fail.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from exporter.simulator import Simulator, SimulatorServer, TrafficGenerator, TrafficProfile
from tests.helpers import ROOT, Daemon, free_port, wait_for, write_config
from tests.monitoring.test_dashboard import dashboard_queries, render_query

PROM_DIR = ROOT / "deploy" / "prometheus"
RULE_FILES = ("signalwire.rules.yml", "signalwire.alerts.yml")
PROJECT_ID, TOKEN = "e2e-project", "PTe2e-token"
CALM = TrafficProfile(max_delay=1.0, failed=0.02, undelivered=0.03, never_receipted=0.05)
SPIKE = TrafficProfile(max_delay=1.0, failed=0.6, undelivered=0.2, never_receipted=0.0)


def tool(*names: str) -> str:
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    pytest.fail(f"{names[0]} is not installed: run `make test` (it installs it)")


class Webhook(ThreadingHTTPServer):
    """Collects Alertmanager's webhook notifications."""

    def __init__(self) -> None:
        self.alerts: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _WebhookHandler)

    def received(self) -> list[dict[str, Any]]:
        with self.lock:
            return list(self.alerts)


class _WebhookHandler(BaseHTTPRequestHandler):
    server: Webhook

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        with self.server.lock:
            self.server.alerts.extend(json.loads(body).get("alerts", []))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


class Stack:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: list[subprocess.Popen[bytes]] = []
        self.prom_url = ""
        self.am_url = ""

    def spawn(self, name: str, args: list[str]) -> None:
        log = (self.tmp / f"{name}.log").open("wb")
        self.procs.append(subprocess.Popen(args, stdout=log, stderr=log, cwd=self.tmp))

    def log(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()

    def query(self, expr: str) -> list[dict[str, Any]]:
        response = requests.get(f"{self.prom_url}/api/v1/query", params={"query": expr}, timeout=10)
        payload = response.json()
        assert payload.get("status") == "success", f"{expr}: {payload}"
        result = payload["data"]["result"]
        return result if isinstance(result, list) else [result]


def shortened_rules(tmp: Path) -> list[str]:
    """The shipped rule files with `for:` shortened to 2s, so alerts fire within the test."""
    names = []
    for name in RULE_FILES:
        text = (PROM_DIR / name).read_text()
        (tmp / name).write_text(re.sub(r"(?m)^(\s*)for:\s*\S+", r"\1for: 2s", text))
        names.append(name)
    return names


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[tuple[Stack, Simulator, TrafficGenerator, Webhook, Daemon]]:
    prometheus = tool("prometheus")
    alertmanager = tool("alertmanager", "prometheus-alertmanager")
    simulator = Simulator(seed=9)
    simulator.add_project(PROJECT_ID, TOKEN)
    traffic = TrafficGenerator(simulator, PROJECT_ID, rate=25, profile=CALM, seed=4)
    webhook = Webhook()
    threading.Thread(target=webhook.serve_forever, daemon=True).start()
    stack = Stack(tmp_path)
    with SimulatorServer(simulator) as api:
        config = write_config(
            tmp_path / "exporter.yaml",
            [{"name": "e2e", "space": api.base_url, "project_id": PROJECT_ID, "api_token": TOKEN}],
            poll_interval="1s",
            start_from="10m",
            settle={"timeout": "4s"},
            request={"timeout": "2s", "page_size": 200},
            # Four of the simulator's own numbers (exporter/simulator.py OWN_NUMBERS) in two
            # groups; the fifth shows as "ungrouped".
            number_groups={
                "otp": ["+15551230000", "+15551230001"],
                "marketing": ["+15557650000", "72345"],
            },
        )
        traffic.start()
        daemon = Daemon(config, tmp_path).start()
        try:
            am_port = free_port()
            stack.am_url = f"http://127.0.0.1:{am_port}"
            (tmp_path / "alertmanager.yml").write_text(
                yaml.safe_dump(
                    {
                        "route": {
                            "receiver": "test",
                            "group_by": ["alertname", "project"],
                            "group_wait": "1s",
                            "group_interval": "1s",
                            "repeat_interval": "1h",
                        },
                        "receivers": [
                            {
                                "name": "test",
                                "webhook_configs": [
                                    {"url": f"http://127.0.0.1:{webhook.server_port}/"}
                                ],
                            }
                        ],
                    }
                )
            )
            stack.spawn(
                "alertmanager",
                [
                    alertmanager,
                    f"--config.file={tmp_path / 'alertmanager.yml'}",
                    f"--storage.path={tmp_path / 'am-data'}",
                    f"--web.listen-address=127.0.0.1:{am_port}",
                    "--cluster.listen-address=",
                ],
            )
            prom_port = free_port()
            stack.prom_url = f"http://127.0.0.1:{prom_port}"
            rule_files = shortened_rules(tmp_path)
            (tmp_path / "prometheus.yml").write_text(
                yaml.safe_dump(
                    {
                        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                        "rule_files": rule_files,
                        "alerting": {
                            "alertmanagers": [
                                {"static_configs": [{"targets": [f"127.0.0.1:{am_port}"]}]}
                            ]
                        },
                        "scrape_configs": [
                            {
                                "job_name": "signalwire",
                                "static_configs": [{"targets": [f"127.0.0.1:{daemon.port}"]}],
                            }
                        ],
                    }
                )
            )
            stack.spawn(
                "prometheus",
                [
                    prometheus,
                    f"--config.file={tmp_path / 'prometheus.yml'}",
                    f"--storage.tsdb.path={tmp_path / 'prom-data'}",
                    f"--web.listen-address=127.0.0.1:{prom_port}",
                ],
            )
            wait_for(
                lambda: requests.get(f"{stack.prom_url}/-/ready", timeout=2).ok,
                60,
                f"Prometheus ready\n{stack.log('prometheus')}",
            )
            wait_for(
                lambda: requests.get(f"{stack.am_url}/-/ready", timeout=2).ok,
                60,
                f"Alertmanager ready\n{stack.log('alertmanager')}",
            )
            yield stack, simulator, traffic, webhook, daemon
        finally:
            traffic.stop()
            stack.stop()
            daemon.terminate()
            webhook.shutdown()


def recording_rules() -> list[str]:
    names = []
    for group in yaml.safe_load((PROM_DIR / "signalwire.rules.yml").read_text())["groups"]:
        names += [rule["record"] for rule in group["rules"] if "record" in rule]
    return names


def test_rules_dashboard_and_alerts_against_real_prometheus_and_alertmanager(
    stack: tuple[Stack, Simulator, TrafficGenerator, Webhook, Daemon],
) -> None:
    prom, _, traffic, webhook, _ = stack
    wait_for(
        lambda: prom.query('up{job="signalwire"} == 1'),
        60,
        f"the exporter target up\n{prom.log('prometheus')}",
    )
    # Enough history for rates and increases over the scrape interval.
    wait_for(
        lambda: prom.query("sum(increase(signalwire_messages_total[30s])) > 0"),
        60,
        "messages counted in Prometheus",
    )
    missing_rules = []
    for name in recording_rules():
        try:
            wait_for(lambda n=name: prom.query(n), 30, name, interval=0.5)
        except AssertionError:
            missing_rules.append(name)
    assert not missing_rules, f"recording rules without data: {missing_rules}"

    # The breakdowns carry the simulator's variety: its own numbers in both configured groups (the
    # fifth ungrouped), remote numbers in several countries and some that are not phone numbers.
    def values(metric: str, label: str) -> set[str]:
        return {s["metric"].get(label, "") for s in prom.query(f"group by ({label}) ({metric})")}

    wait_for(
        lambda: (
            values("signalwire_messages_by_number_group_total", "number_group")
            == {"otp", "marketing", "ungrouped"}
        ),
        30,
        "every number group counted",
        interval=0.5,
    )
    wait_for(
        lambda: (
            {"US", "CA", "GB", "unknown"}
            <= values("signalwire_messages_by_country_total", "country")
        ),
        30,
        "messages counted by country",
        interval=0.5,
    )
    missing_panels = []
    for expr in dashboard_queries():
        query = render_query(expr)
        try:
            wait_for(lambda q=query: prom.query(q), 20, query, interval=0.5)
        except AssertionError:
            missing_panels.append(query)
    assert not missing_panels, f"dashboard queries without data: {missing_panels}"

    traffic.profile = SPIKE
    alert = wait_for(
        lambda: next(
            (
                a
                for a in webhook.received()
                if "FailureRatio" in a["labels"].get("alertname", "") and a["status"] == "firing"
            ),
            None,
        ),
        180,
        f"a failure-ratio alert at the webhook\n{prom.log('prometheus')}",
        interval=0.5,
    )
    labels, annotations = alert["labels"], alert["annotations"]
    assert labels["project"] == "e2e"
    assert labels["severity"] in ("critical", "warning")
    assert labels["alertname"].startswith("SignalWire")
    assert "e2e" in annotations["summary"] + annotations["description"]
    assert re.search(r"\d", annotations["description"]), "the description carries the numbers"
    assert annotations["runbook_url"].startswith("https://")
