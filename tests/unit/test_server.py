"""The HTTP endpoints (docs/endpoints.md) and the exposition (docs/metrics.md), on a real loopback
server."""

from __future__ import annotations

import gzip
import re
import socket
import threading
from collections.abc import Iterator
from dataclasses import replace

import pytest
import requests

from exporter import __version__
from exporter.catchup import Progress
from exporter.config import ListenAddress
from exporter.logs import redact
from exporter.metrics import build_registry
from exporter.server import ExporterServer, _landing
from exporter.views import CounterState, ProjectView, RecentSummary, SettledTotals, StartNote
from tests.helpers import parse_metrics, select

STATUS = ProjectView(
    name="production",
    polled=True,
    up=True,
    last_success=1_800_000_000.0,
    last_duration=0.25,
    last_error=None,
    cursor=1_799_999_940.0,
    totals={
        ("outbound-api", "sms", "delivered", ""): SettledTotals(10, 12, 41_500_000),
        ("outbound-api", "sms", "undelivered", "30007"): SettledTotals(2, 2, 8_300_000),
    },
    by_country={
        ("outbound-api", "sms", "delivered", "CA"): SettledTotals(10, 12, 41_500_000),
        ("outbound-api", "sms", "undelivered", "unknown"): SettledTotals(2, 2, 8_300_000),
    },
    by_group={
        ("outbound-api", "sms", "delivered", "otp"): SettledTotals(10, 12, 41_500_000),
        ("outbound-api", "sms", "undelivered", "ungrouped"): SettledTotals(2, 2, 8_300_000),
    },
    pending={("outbound-api", "sms", "sent"): 3},
    pending_oldest={("outbound-api", "sms", "sent"): 1_799_990_000.0},
    failure_ratios={("outbound-api", "sms"): 2 / 12},
    error_info={"30007": "Carrier <filtering>"},
)
DOWN = ProjectView(
    name="staging",
    polled=True,
    up=False,
    last_error="SignalWire API: 503 <b>",
    catch_up=Progress(began=0.0, cursor=21_600.0, target=86_400.0, messages=50_000, elapsed=20.0),
)


class Fixture:
    def __init__(self, demo: bool = False) -> None:
        self.views = [STATUS, DOWN]
        self.is_ready = False
        counts = CounterState({("production", "200"): 2, ("staging", "error"): 1}, {}, {}, {})
        registry = build_registry(lambda: self.views, lambda: counts)
        self.server = ExporterServer(
            ListenAddress("127.0.0.1", 0),
            registry,
            lambda: self.views,
            lambda: self.is_ready,
            demo=demo,
        )
        self.server.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"


@pytest.fixture
def web() -> Iterator[Fixture]:
    fixture = Fixture()
    yield fixture
    fixture.server.stop()


def test_metrics_exposes_the_documented_names_and_labels(web: Fixture) -> None:
    response = requests.get(f"{web.url}/metrics", timeout=5)
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    samples = parse_metrics(response.text)
    labels = {
        "project": "production",
        "direction": "outbound-api",
        "kind": "sms",
        "status": "undelivered",
        "error_code": "30007",
    }
    key = frozenset(labels.items())
    assert samples[("signalwire_messages_total", key)] == 2
    assert samples[("signalwire_message_segments_total", key)] == 2
    assert samples[("signalwire_message_charge_usd_total", key)] == pytest.approx(0.0083)
    pending_labels = {k: v for k, v in labels.items() if k != "error_code"} | {"status": "sent"}
    pending_key = frozenset(pending_labels.items())
    assert samples[("signalwire_messages_pending", pending_key)] == 3
    ratio = select(samples, "signalwire_message_failure_ratio", project="production")
    assert list(ratio.values()) == [pytest.approx(2 / 12)]
    assert select(samples, "signalwire_message_failure_ratio", project="staging") == {}
    info = select(samples, "signalwire_message_error_info", error_code="30007")
    assert dict(next(iter(info)))["error_message"] == "Carrier <filtering>"
    assert dict(next(iter(info)))["category"] == "carrier_filtering"
    country = labels | {"status": "delivered", "country": "CA"}
    del country["error_code"]
    assert samples[("signalwire_messages_by_country_total", frozenset(country.items()))] == 10
    by_country = ("signalwire_message_charge_usd_by_country_total", frozenset(country.items()))
    assert samples[by_country] == pytest.approx(0.0415)
    group = {k: v for k, v in country.items() if k != "country"} | {"number_group": "otp"}
    assert samples[("signalwire_messages_by_number_group_total", frozenset(group.items()))] == 10
    by_group = ("signalwire_message_charge_usd_by_number_group_total", frozenset(group.items()))
    assert samples[by_group] == pytest.approx(0.0415)
    oldest = ("signalwire_messages_pending_oldest_created_timestamp_seconds", pending_key)
    assert samples[oldest] == 1_799_990_000.0
    assert select(samples, "signalwire_up", project="production").popitem()[1] == 1
    assert select(samples, "signalwire_up", project="staging").popitem()[1] == 0
    assert select(samples, "signalwire_cursor_timestamp_seconds", project="production")
    assert select(samples, "signalwire_poll_duration_seconds", project="production")
    assert (
        select(
            samples, "signalwire_last_successful_poll_timestamp_seconds", project="production"
        ).popitem()[1]
        == 1_800_000_000.0
    )
    assert select(samples, "signalwire_api_requests_total", project="production", code="200")
    assert select(samples, "signalwire_invalid_records_total", project="staging").popitem()[1] == 0
    assert select(samples, "signalwire_late_records_total", project="staging").popitem()[1] == 0
    # Every reason of failed polls is there from the start, at 0 until it happens.
    errors = select(samples, "signalwire_poll_errors_total", project="production")
    assert {dict(k)["reason"]: v for k, v in errors.items()} == {
        "api": 0,
        "auth": 0,
        "state": 0,
        "internal": 0,
    }
    assert select(samples, "signalwire_exporter_build_info", version=__version__)
    assert not re.search(r"_created[{ ]", response.text)  # no _created series
    assert "# TYPE signalwire_messages_total counter" in response.text


def test_metrics_speaks_openmetrics_when_asked(web: Fixture) -> None:
    response = requests.get(
        f"{web.url}/metrics",
        headers={"Accept": "application/openmetrics-text; version=1.0.0"},
        timeout=5,
    )
    assert response.headers["Content-Type"].startswith("application/openmetrics-text")
    assert response.text.rstrip().endswith("# EOF")
    assert not re.search(r"_created[{ ]", response.text)
    assert "signalwire_messages_total{" in response.text


def test_metrics_is_gzipped_when_accepted(web: Fixture) -> None:
    raw = requests.get(
        f"{web.url}/metrics", headers={"Accept-Encoding": "gzip"}, timeout=5, stream=True
    )
    assert raw.headers["Content-Encoding"] == "gzip"
    body = gzip.decompress(raw.raw.read())
    assert b"signalwire_up" in body


def test_landing_page_shows_each_project_without_secrets_and_escaped(web: Fixture) -> None:
    response = requests.get(f"{web.url}/", timeout=5)
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/html")
    page = response.text
    assert __version__ in page and 'href="metrics"' in page
    assert "production" in page and "staging" in page
    assert ">up<" in page and ">down<" in page
    assert "503 &lt;b&gt;" in page and "<b>" not in page
    assert ">3<" in page  # pending messages
    assert ">none<" in page  # production is not catching up; staging is:
    assert "catching up: 25% of 1d, 2,500 messages/s, about 1m left" in page


NOW = 1_800_000_012.0
BUSY = ProjectView(
    name="production",
    polled=True,
    up=True,
    last_success=NOW - 12,
    cursor=NOW - 20,
    pending={("outbound-api", "sms", "sent"): 3, ("outbound-api", "mms", "queued"): 4},
    recent=RecentSummary(
        since=NOW - 7200,
        settled_hour=1234,
        settled_day=20_345,
        outbound_hour=24,
        outbound_failed_hour=2,
        charge_nano_today=41_500_000,
        charge_nano_day=12_345_678_900,
    ),
)
NEW = ProjectView(name="new", recent=RecentSummary(since=NOW - 7200))
HOSTILE = "<script>alert(1)</script>"


def cells(page: str, project: str) -> list[str]:
    """The cells of a project's row, as HTML."""
    row = re.search(rf'<tr class="\w+"><td>{project}</td>(.*?)</tr>', page)
    assert row is not None, page
    return [f"<td>{project}</td>", *re.findall(r"<td[^>]*>.*?</td>", row.group(1))]


def test_landing_page_shows_each_figure_of_a_project_with_data() -> None:
    page = _landing([BUSY, DOWN, NEW], now=NOW).decode()
    row = [re.sub(r"<[^>]+>", "", c) for c in cells(page, "production")]
    assert row == [
        "production",
        "up",
        "12s ago",  # how fresh
        "1,234",  # settled, last hour
        "20,345",  # settled, last 24 h
        "8.3% (2 of 24)",  # outbound failed or undelivered, last hour
        "$0.0415",  # spend today (UTC)
        "$12.35",  # spend, last 24 h
        "7",  # pending
        "none",  # catch-up
    ]
    headings = [re.sub(r"<[^>]+>", " ", h).strip() for h in re.findall(r"<th.*?</th>", page)]
    assert headings[3:8] == [
        "settled last hour*",
        "settled last 24 h*",
        "outbound failed last hour*",
        "spend (USD) today, UTC*",
        "spend (USD) last 24 h*",
    ]
    assert "since the exporter started, up to 24 h (started 2027-01-15 06:00 UTC)" in page
    assert re.sub(r"<[^>]+>", "", cells(page, "new")[1]) == "not polled yet"
    assert [re.sub(r"<[^>]+>", "", c) for c in cells(page, "new")[3:8]] == [
        "0",
        "0",
        "no outbound",
        "$0.00",
        "$0.00",
    ]
    assert [re.sub(r"<[^>]+>", "", c) for c in cells(page, "staging")[3:8]] == ["n/a"] * 5
    assert "last error:</span> SignalWire API: 503 &lt;b&gt;" in page
    for link in ("metrics", "-/healthy", "-/ready"):
        assert f'href="{link}"' in page
    docs = '<a href="https://github.com/signalwire-exporter/signalwire-exporter#readme">'
    assert docs + "documentation</a>" in page


def test_landing_page_escapes_hostile_text_and_never_shows_a_token() -> None:
    token = "PTlanding-secret-token"
    redact(token)
    hostile = ProjectView(
        name="production",
        polled=True,
        last_error=f"SignalWire API: {HOSTILE} echoed {token}",
        start_note=StartNote(
            start_from=86400.0,
            wanted=NOW - 86400,
            start_point=NOW - 60,
            command=f"signalwire-exporter backfill --config.file '{HOSTILE}.yaml'",
        ),
    )
    page = _landing([hostile], now=NOW).decode()
    assert "<script" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert token not in page and "&lt;redacted&gt;" in page


def test_landing_page_shows_a_start_from_before_the_recorded_start_point() -> None:
    note = StartNote(
        start_from=86400.0,
        wanted=NOW - 86400,
        start_point=NOW - 3600,
        command="signalwire-exporter backfill --from 2027-01-14T08:00:12Z "
        "--to 2027-01-15T07:00:12Z --output history.om",
    )
    page = _landing([replace(BUSY, start_note=note), DOWN], now=NOW).decode()
    assert page.count('<tr class="detail note">') == 1
    assert "start_from (1d) would start counting at 2027-01-14T08:00:12Z" in page
    assert "recorded at the first start, 2027-01-15T07:00:12Z" in page
    assert f"<code>{note.command}</code>" in page


def test_landing_page_marks_the_demo_only_and_refreshes_itself(web: Fixture) -> None:
    page = requests.get(f"{web.url}/", timeout=5).text
    assert '<meta http-equiv="refresh" content="30">' in page
    assert "simulated" not in page.lower()
    demo = Fixture(demo=True)
    try:
        page = requests.get(f"{demo.url}/", timeout=5).text
    finally:
        demo.server.stop()
    assert '<p class="demo">Demo: simulated data' in page
    assert '<meta http-equiv="refresh" content="30">' in page


def test_health_readiness_and_404(web: Fixture) -> None:
    assert requests.get(f"{web.url}/-/healthy", timeout=5).status_code == 200
    assert requests.get(f"{web.url}/-/ready", timeout=5).status_code == 503
    web.is_ready = True
    assert requests.get(f"{web.url}/-/ready", timeout=5).status_code == 200
    for path in ("/nope", "/metrics/extra", "/-/other", "/index.html"):
        assert requests.get(f"{web.url}{path}", timeout=5).status_code == 404
    assert requests.head(f"{web.url}/metrics", timeout=5).status_code == 200


def test_scrapes_are_served_concurrently_while_one_client_stalls(web: Fixture) -> None:
    stalled = socket.create_connection(("127.0.0.1", web.server.server_address[1]))
    stalled.sendall(b"GET /metrics HTTP/1.1\r\n")  # never finishes its request
    try:
        results: list[int] = []

        def scrape() -> None:
            results.append(requests.get(f"{web.url}/metrics", timeout=5).status_code)

        threads = [threading.Thread(target=scrape) for _ in range(10)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert results == [200] * 10
    finally:
        stalled.close()


def test_the_address_really_bound_is_told_apart_from_the_link() -> None:
    registry = build_registry(lambda: [], CounterState.zero)
    server = ExporterServer(ListenAddress("0.0.0.0", 0), registry, list, lambda: True)
    try:
        port = server.server_address[1]
        assert server.bound == f"0.0.0.0:{port}"  # every interface, as it is
        assert server.url == f"http://localhost:{port}"  # a link that opens
    finally:
        server.server_close()
