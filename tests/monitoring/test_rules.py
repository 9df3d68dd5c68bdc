"""The Prometheus rules, alerts and Alertmanager example in deploy/, checked by the real tools.

promtool validates the rule files and the Prometheus configuration and runs the unit tests in
deploy/prometheus/tests/; amtool validates the Alertmanager configuration and its routing; a real
Alertmanager shows the inhibitions at work. The static checks keep the files honest: every alert
has a promtool test that sees it fire and one that sees it quiet, and a runbook entry where its
runbook_url points; every metric the rules read is one the exporter exports (docs: the table in
docs/metrics.md) or a rule defined here.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from tests.helpers import DOCUMENTED_METRICS, ROOT, free_port, wait_for

PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
RULES = PROMETHEUS_DIR / "signalwire.rules.yml"
ALERTS = PROMETHEUS_DIR / "signalwire.alerts.yml"
PROMETHEUS_CONFIG = PROMETHEUS_DIR / "prometheus.yml"
RULE_TESTS = sorted((PROMETHEUS_DIR / "tests").glob("*.yml"))
ALERTMANAGER_CONFIG = ROOT / "deploy" / "alertmanager" / "alertmanager.yml"

# runbook_url is RUNBOOK_BASE + one of RUNBOOK_DOCUMENTS + "#" + the alert's name in lower case (the
# anchor GitHub gives a `### AlertName` heading).
RUNBOOK_BASE = "https://github.com/signalwire-exporter/signalwire-exporter/blob/main/"
RUNBOOK_DOCUMENTS = ("docs/runbooks.md",)
SEVERITIES = {"critical", "warning", "info"}

# The exporter's metrics, plus Prometheus's own `up`.
EXPORTED_METRICS = DOCUMENTED_METRICS | {"up"}

# PromQL words that look like identifiers but are not metric names.
PROMQL_KEYWORDS = {
    "and",
    "or",
    "unless",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "offset",
    "bool",
    "inf",
    "nan",
}


# --- helpers -------------------------------------------------------------------------------------


def tool(*names: str) -> str:
    """The path of the first of `names` on PATH; fails (never skips) when none is installed."""
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    pytest.fail(
        f"{' or '.join(names)} not found on PATH: run `make tools` (installs Prometheus, promtool, "
        "Alertmanager and amtool)"
    )


def run(*argv: str | Path) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [str(a) for a in argv], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, (
        f"{' '.join(str(a) for a in argv)} exited with {result.returncode}:\n"
        f"{result.stdout}\n{result.stderr}"
    )
    return result


def load(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def rules(path: Path) -> list[dict[str, Any]]:
    return [rule for group in load(path)["groups"] for rule in group["rules"]]


def alerts() -> list[dict[str, Any]]:
    return [rule for rule in rules(ALERTS) if "alert" in rule]


def recording_rule_names() -> set[str]:
    return {rule["record"] for path in (RULES, ALERTS) for rule in rules(path) if "record" in rule}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (no parser needed for what rule files hold)."""
    expr = re.sub(r"#[^\n]*", "", expr)  # comments
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # range selectors
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    names = set()
    for match in re.finditer(r"(?<![\w.:])[a-zA-Z_:][a-zA-Z0-9_:]*", expr):
        followed_by_call = expr[match.end() :].lstrip().startswith("(")
        if not followed_by_call and match.group() not in PROMQL_KEYWORDS:
            names.add(match.group())
    return names


def template_queries(text: str) -> list[str]:
    """The PromQL queries in an annotation's `printf "..." | query` templates."""
    literals = re.findall(r'printf\s+"((?:[^"\\]|\\.)*)"', text)
    return [literal.replace('\\"', '"') for literal in literals]


def runbook_entries(document: str) -> set[str]:
    """The alerts a document has a runbook for: its `### SignalWire...` headings."""
    text = (ROOT / document).read_text(encoding="utf-8")
    return set(re.findall(r"(?m)^### (SignalWire\w+)[ \t]*$", text))


def rule_tests() -> Iterator[tuple[Path, dict[str, Any]]]:
    for path in RULE_TESTS:
        for test in load(path)["tests"]:
            yield path, test


# --- the tools -----------------------------------------------------------------------------------


def test_rule_files_are_valid() -> None:
    run(tool("promtool"), "check", "rules", RULES, ALERTS)


def test_prometheus_config_is_valid() -> None:
    # Rule files are resolved relative to prometheus.yml, and checked too.
    output = run(tool("promtool"), "check", "config", PROMETHEUS_CONFIG).stdout
    assert "2 rule files found" in output


def test_rule_unit_tests_pass() -> None:
    assert RULE_TESTS, "no promtool tests in deploy/prometheus/tests/"
    run(tool("promtool"), "test", "rules", *RULE_TESTS)


def test_alertmanager_config_is_valid() -> None:
    run(tool("amtool"), "check-config", ALERTMANAGER_CONFIG)


@pytest.mark.parametrize(
    ("severity", "receiver"), [("critical", "pager"), ("warning", "chat"), ("info", "null")]
)
def test_alertmanager_routes_by_severity(severity: str, receiver: str) -> None:
    result = run(
        tool("amtool"),
        "config",
        "routes",
        "test",
        f"--config.file={ALERTMANAGER_CONFIG}",
        f"--verify.receivers={receiver}",
        "alertname=SignalWireAnything",
        "project=demo",
        f"severity={severity}",
    )
    assert result.stdout.strip() == receiver


# --- the files' own consistency ------------------------------------------------------------------


def test_every_alert_has_a_test_that_fires_it_and_one_that_keeps_it_quiet() -> None:
    fired: set[str] = set()
    quiet: set[str] = set()
    for _, test in rule_tests():
        for case in test.get("alert_rule_test", []):
            (fired if case.get("exp_alerts") else quiet).add(case["alertname"])
    names = {rule["alert"] for rule in alerts()}
    assert names - fired == set(), "alerts no promtool test expects to fire"
    assert names - quiet == set(), "alerts no promtool test expects to stay quiet"
    assert (fired | quiet) - names == set(), "promtool tests of alerts that do not exist"


def test_rule_tests_load_the_rule_files() -> None:
    for path in RULE_TESTS:
        for rule_file in load(path)["rule_files"]:
            assert (path.parent / rule_file).resolve() in {RULES, ALERTS}, (path, rule_file)


def test_rules_read_only_exported_metrics_and_recording_rules() -> None:
    known = EXPORTED_METRICS | recording_rule_names()
    for path in (RULES, ALERTS):
        for rule in rules(path):
            name = rule.get("record") or rule["alert"]
            queries = [rule["expr"]]
            for text in rule.get("annotations", {}).values():
                queries += template_queries(text)
            for query in queries:
                unknown = metric_names(query) - known
                assert not unknown, f"{path.name}: {name} reads unknown metrics {sorted(unknown)}"


def test_metric_name_extraction() -> None:
    expr = """
      sum without (status, error_code) (rate(signalwire_messages_total{status=~"a|b"}[5m]))
        > on (project) group_left () project:signalwire_alert_threshold_x:constant  # a comment
      or label_replace(vector(0.5e1), "project", "demo", "", "") and time() - up offset 1h
      unless typo_metric
    """
    assert metric_names(expr) == {
        "signalwire_messages_total",
        "project:signalwire_alert_threshold_x:constant",
        "up",
        "typo_metric",
    }
    assert template_queries('{{ with printf "sum(x{a=\\"b\\",c=%q})" $labels.c | query }}') == [
        'sum(x{a="b",c=%q})'
    ]


def test_recording_rule_names_follow_level_metric_operations() -> None:
    for name in recording_rule_names():
        assert re.fullmatch(r"[a-z_]+:[a-z0-9_]+:[a-z0-9_]+", name), name


def test_alerts_follow_the_conventions() -> None:
    for rule in alerts():
        name = rule["alert"]
        assert re.fullmatch(r"SignalWire(?:[A-Z][a-z0-9]*)+", name), name
        assert rule["labels"]["severity"] in SEVERITIES, name
        annotations = rule["annotations"]
        assert {"summary", "description", "runbook_url"} <= set(annotations), name
        urls = {f"{RUNBOOK_BASE}{document}#{name.lower()}" for document in RUNBOOK_DOCUMENTS}
        assert annotations["runbook_url"] in urls, name


def test_every_alert_has_one_runbook_entry_where_its_url_points() -> None:
    entries = {document: runbook_entries(document) for document in RUNBOOK_DOCUMENTS}
    names = {rule["alert"] for rule in alerts()}
    for rule in alerts():
        name = rule["alert"]
        document = rule["annotations"]["runbook_url"].removeprefix(RUNBOOK_BASE).split("#")[0]
        assert name in entries.get(document, set()), f"{name}: no '### {name}' in {document}"
        holders = [document for document, found in entries.items() if name in found]
        assert len(holders) == 1, f"{name}: a runbook entry in each of {holders}"
    documented = set().union(*entries.values())
    assert documented - names == set(), "runbook entries of alerts that do not exist"


def test_alertmanager_inhibitions_name_existing_alerts() -> None:
    names = {rule["alert"] for rule in alerts()}
    config = load(ALERTMANAGER_CONFIG)
    for inhibit in config["inhibit_rules"]:
        for matcher in inhibit["source_matchers"] + inhibit["target_matchers"]:
            found = re.fullmatch(r'alertname=~?"SignalWire(?:\(([\w|]+)\)|(\w+))"', matcher)
            assert found, matcher
            mentioned = {f"SignalWire{n}" for n in (found[1] or found[2]).split("|")}
            assert mentioned <= names, f"{matcher}: no such alerts {sorted(mentioned - names)}"


# --- a real Alertmanager -------------------------------------------------------------------------


@pytest.fixture
def alertmanager() -> Iterator[str]:
    binary = tool("alertmanager", "prometheus-alertmanager")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as storage:
        log_path = Path(storage) / "alertmanager.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                [
                    binary,
                    f"--config.file={ALERTMANAGER_CONFIG}",
                    f"--storage.path={storage}",
                    f"--web.listen-address=127.0.0.1:{port}",
                    "--cluster.listen-address=",
                ],
                stdout=log,
                stderr=log,
            )
        try:

            def ready() -> bool:
                if proc.poll() is not None:
                    raise AssertionError(f"alertmanager exited:\n{log_path.read_text()}")
                return requests.get(f"{url}/-/ready", timeout=2).status_code == 200

            wait_for(ready, 30, "alertmanager ready")
            yield url
        finally:
            proc.terminate()
            proc.wait(timeout=10)


def test_alertmanager_inhibits_symptoms_of_a_blind_exporter(alertmanager: str) -> None:
    target = {"job": "signalwire", "instance": "exporter:9797"}
    other = {"job": "signalwire", "instance": "exporter-2:9797"}
    sent = {
        "down": {"alertname": "SignalWireExporterDown", "severity": "critical", **target},
        "ratio": {
            "alertname": "SignalWireOutboundFailureRatioHigh",
            "severity": "critical",
            "project": "demo",
            "direction": "outbound-api",
            "kind": "sms",
            **target,
        },
        "other_ratio": {
            "alertname": "SignalWireOutboundFailureRatioHigh",
            "severity": "critical",
            "project": "demo",
            "direction": "outbound-api",
            "kind": "sms",
            **other,
        },
        "polls": {
            "alertname": "SignalWirePollsFailing",
            "severity": "critical",
            "project": "billing",
            **other,
        },
        "stale": {
            "alertname": "SignalWireDataStale",
            "severity": "critical",
            "project": "billing",
            **other,
        },
        "other_stale": {
            "alertname": "SignalWireDataStale",
            "severity": "critical",
            "project": "support",
            **other,
        },
        "spend": {
            "alertname": "SignalWireSpendOverBudget",
            "severity": "warning",
            "project": "billing",
            **other,
        },
        "late": {
            "alertname": "SignalWireReceiptsLate",
            "severity": "warning",
            "project": "billing",
            "direction": "outbound-api",
            "kind": "sms",
            "status": "sent",
            **other,
        },
        "behind": {
            "alertname": "SignalWireExporterBehind",
            "severity": "warning",
            "project": "marketing",
            **other,
        },
        "volume": {
            "alertname": "SignalWireOutboundVolumeBelowLastWeek",
            "severity": "warning",
            "project": "marketing",
            "direction": "outbound-api",
            "kind": "sms",
            **other,
        },
        "country": {
            "alertname": "SignalWireCountryFailureRatioHigh",
            "severity": "warning",
            "project": "marketing",
            "country": "GB",
            **other,
        },
    }
    now = datetime.now(UTC)
    body = [
        {
            "labels": labels,
            "annotations": {"summary": "test"},
            "startsAt": now.isoformat(),
            "endsAt": (now + timedelta(hours=1)).isoformat(),
        }
        for labels in sent.values()
    ]
    requests.post(f"{alertmanager}/api/v2/alerts", json=body, timeout=5).raise_for_status()

    seen: dict[str, str] = {}

    def states() -> dict[str, str]:
        got = requests.get(f"{alertmanager}/api/v2/alerts", timeout=5).json()
        by_labels = {frozenset(a["labels"].items()): a["status"]["state"] for a in got}
        seen.clear()
        seen.update({key: by_labels.get(frozenset(lbl.items()), "") for key, lbl in sent.items()})
        return seen

    expected = {
        "down": "active",
        "ratio": "suppressed",  # same job and instance as the down exporter
        "other_ratio": "active",
        "polls": "active",
        "stale": "suppressed",  # polls of the same project fail
        "other_stale": "active",
        "spend": "active",  # real money, whatever the polls do
        "late": "suppressed",  # pending messages are not refreshed while polls fail
        "behind": "active",
        "volume": "suppressed",  # catching up: the hour's messages are counted late
        "country": "active",  # the counts are late, not wrong
    }
    try:
        wait_for(lambda: states() == expected, 15, "the expected inhibitions")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\nexpected {expected}\ngot      {seen}") from None
