"""The HTTP endpoints (contract §5) and the exposition (contract §4), on a real loopback server."""

from __future__ import annotations

import gzip
import re
import socket
import threading
from collections.abc import Iterator

import pytest
import requests

from exporter import __version__
from exporter.catchup import Progress
from exporter.config import ListenAddress
from exporter.ledger import Totals
from exporter.metrics import build_registry
from exporter.poller import Counters, ProjectStatus
from exporter.server import ExporterServer
from tests.helpers import parse_metrics, select

STATUS = ProjectStatus(
    name="production",
    polled=True,
    up=True,
    last_success=1_800_000_000.0,
    last_duration=0.25,
    last_error=None,
    cursor=1_799_999_940.0,
    totals={
        ("outbound-api", "sms", "delivered", ""): Totals(10, 12, 41_500_000),
        ("outbound-api", "sms", "undelivered", "30007"): Totals(2, 2, 8_300_000),
    },
    by_country={
        ("outbound-api", "sms", "delivered", "CA"): Totals(10, 12, 41_500_000),
        ("outbound-api", "sms", "undelivered", "unknown"): Totals(2, 2, 8_300_000),
    },
    by_group={
        ("outbound-api", "sms", "delivered", "otp"): Totals(10, 12, 41_500_000),
        ("outbound-api", "sms", "undelivered", "ungrouped"): Totals(2, 2, 8_300_000),
    },
    pending={("outbound-api", "sms", "sent"): 3},
    pending_oldest={("outbound-api", "sms", "sent"): 1_799_990_000.0},
    failure_ratios={("outbound-api", "sms"): 2 / 12},
    error_info={"30007": "Carrier <filtering>"},
)
DOWN = ProjectStatus(
    name="staging",
    polled=True,
    up=False,
    last_error="SignalWire API: 503 <b>",
    catch_up=Progress(began=0.0, cursor=21_600.0, target=86_400.0, messages=50_000, elapsed=20.0),
)


class Fixture:
    def __init__(self) -> None:
        self.statuses = [STATUS, DOWN]
        self.is_ready = False
        self.counters = Counters()
        self.counters.request("production", "200")
        self.counters.request("production", "200")
        self.counters.request("staging", "error")
        registry = build_registry(lambda: self.statuses, self.counters)
        self.server = ExporterServer(
            ListenAddress("127.0.0.1", 0), registry, lambda: self.statuses, lambda: self.is_ready
        )
        self.server.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"


@pytest.fixture
def web() -> Iterator[Fixture]:
    fixture = Fixture()
    yield fixture
    fixture.server.stop()


def test_metrics_exposes_the_contract_names_and_labels(web: Fixture) -> None:
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
