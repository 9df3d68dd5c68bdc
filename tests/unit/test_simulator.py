"""The SignalWire simulator must behave like the API spec, awkward parts included."""

from __future__ import annotations

import base64
import random
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

import pytest
import requests
from hypothesis import given, settings
from hypothesis import strategies as st

from exporter.simulator import (
    LIST_PATH,
    OWN_NUMBERS,
    SimMessage,
    Simulator,
    SimulatorServer,
    Step,
    TrafficGenerator,
    TrafficProfile,
    format_timestamp,
    random_message_args,
)

T0 = datetime(2026, 11, 22, 5, 57, tzinfo=UTC).timestamp()
PROJECT = "proj-1"
TOKEN = "PTsecret"
AUTH = (PROJECT, TOKEN)


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(T0)


@pytest.fixture
def sim(clock: FakeClock) -> Simulator:
    simulator = Simulator(clock=clock, seed=7)
    simulator.add_project(PROJECT, TOKEN)
    simulator.add_project("proj-noscope", "tok", messaging_scope=False)
    simulator.add_project("proj-2", "tok2")
    return simulator


@pytest.fixture
def server(sim: Simulator) -> Iterator[SimulatorServer]:
    with SimulatorServer(sim) as srv:
        yield srv


@pytest.fixture
def http() -> Iterator[requests.Session]:
    with requests.Session() as session:
        session.auth = AUTH
        yield session


def add(
    sim: Simulator,
    created_at: float,
    status: str = "delivered",
    *,
    project: str = PROJECT,
    kind: str = "sms",
    direction: str = "outbound-api",
    segments: int = 1,
) -> SimMessage:
    return sim.add_message(
        project,
        direction=direction,
        kind=kind,
        created_at=created_at,
        segments=segments,
        timeline=[Step(0, status)],
    )


def iso(epoch: float) -> str:
    return format_timestamp(epoch)


def list_url(server: SimulatorServer) -> str:
    return server.base_url + LIST_PATH


def walk(http: requests.Session, url: str, params: dict[str, Any] | None = None) -> list[Any]:
    """Pages of a listing, following links.next as given."""
    pages = []
    response = http.get(url, params=params, timeout=5)
    while True:
        assert response.status_code == 200, response.text
        body = response.json()
        pages.append(body)
        if "next" not in body["links"]:
            return pages
        assert len(pages) < 50
        response = http.get(body["links"]["next"], timeout=5)


def ids(page: dict[str, Any]) -> list[str]:
    return [record["id"] for record in page["data"]]


def assert_error(response: requests.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"] == "application/json"
    errors = response.json()["errors"]
    assert errors[0]["code"] == code
    assert set(errors[0]) == {"type", "code", "message", "attribute", "url"}
    return dict(errors[0])


def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.005)


# --------------------------------------------------------------------------- auth, routing


def test_auth(server: SimulatorServer, http: requests.Session) -> None:
    url = list_url(server)
    error = assert_error(requests.get(url, timeout=5), 401, "unauthorized")
    assert error["type"] == "authentication_error"
    assert_error(requests.get(url, auth=(PROJECT, "wrong"), timeout=5), 401, "unauthorized")
    assert_error(requests.get(url, auth=("nobody", TOKEN), timeout=5), 401, "unauthorized")
    assert_error(requests.get(url, auth=("proj-noscope", "tok"), timeout=5), 403, "forbidden")
    ok = http.get(url, timeout=5)
    assert ok.status_code == 200
    assert ok.headers["Content-Type"] == "application/json"
    assert parsedate_to_datetime(ok.headers["Date"]).timestamp() == T0  # the simulated clock


def test_unknown_paths_and_methods(server: SimulatorServer, http: requests.Session) -> None:
    assert_error(http.get(server.base_url + "/api/other", timeout=5), 404, "not_found")
    assert_error(http.post(list_url(server), data=b"x", timeout=5), 404, "not_found")


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("params", "code", "attribute"),
    [
        ({"created_before": "yesterday"}, "datetime_required", "created_before"),
        ({"created_after": "2026-13-01"}, "datetime_required", "created_after"),
        ({"created_after": ""}, "datetime_required", "created_after"),
        ({"created_on": "2026-11-22T00:00:00Z"}, "date_required", "created_on"),
        ({"page_size": "0"}, "invalid_parameter", "page_size"),
        ({"page_size": "1001"}, "invalid_parameter", "page_size"),
        ({"page_size": "ten"}, "invalid_parameter", "page_size"),
        ({"page_number": "-1"}, "invalid_parameter", "page_number"),
        ({"page_number": "1"}, "page_token_required", "page_token"),
        ({"page_number": "0", "page_token": "garbage"}, "page_token_is_invalid", "page_token"),
    ],
)
def test_invalid_parameters(
    server: SimulatorServer,
    http: requests.Session,
    params: dict[str, str],
    code: str,
    attribute: str,
) -> None:
    error = assert_error(http.get(list_url(server), params=params, timeout=5), 422, code)
    assert error["attribute"] == attribute
    assert error["type"] == "validation_error"


def test_max_page_size_is_accepted(server: SimulatorServer, http: requests.Session) -> None:
    assert http.get(list_url(server), params={"page_size": 1000}, timeout=5).status_code == 200


def test_invalidated_token(sim: Simulator, server: SimulatorServer, http: requests.Session) -> None:
    for i in range(5):
        add(sim, T0 - i)
    first = http.get(list_url(server), params={"page_size": 2}, timeout=5).json()
    sim.invalidate_page_tokens()
    assert_error(http.get(first["links"]["next"], timeout=5), 422, "page_token_is_invalid")
    # A fresh listing works again.
    assert len(walk(http, list_url(server), {"page_size": 2})) == 3


def test_token_of_another_project_is_rejected(
    sim: Simulator, server: SimulatorServer, http: requests.Session
) -> None:
    for i in range(3):
        add(sim, T0 - i, project="proj-2")
    other = requests.get(
        list_url(server), params={"page_size": 1}, auth=("proj-2", "tok2"), timeout=5
    )
    response = http.get(other.json()["links"]["next"], timeout=5)
    assert_error(response, 422, "page_token_is_invalid")


def test_history_limit(sim: Simulator, server: SimulatorServer, http: requests.Session) -> None:
    add(sim, T0 - 7200)
    recent = add(sim, T0 - 60)
    sim.history_limit = 3600
    response = http.get(list_url(server), params={"created_after": iso(T0 - 7201)}, timeout=5)
    assert_error(response, 422, "exceeds_history_logs_limit")
    assert ids(http.get(list_url(server), timeout=5).json()) == [recent.id]


# --------------------------------------------------------------------------- pagination


def test_pagination_covers_everything_newest_first(
    sim: Simulator, server: SimulatorServer, http: requests.Session
) -> None:
    messages = [add(sim, T0 - 100 + i) for i in range(25)]
    pages = walk(http, list_url(server), {"page_size": 10})
    assert [len(p["data"]) for p in pages] == [10, 10, 5]
    seen = [i for page in pages for i in ids(page)]
    assert seen == [m.id for m in reversed(messages)]
    links = pages[1]["links"]
    assert set(links) == {"self", "first", "next", "prev"}
    assert "page_number=1" in links["self"]
    assert "page_token=PA" in links["next"]
    assert "page_number" not in links["first"]
    assert set(pages[0]["links"]) == {"self", "first", "next"}
    assert set(pages[2]["links"]) == {"self", "first", "prev"}
    prev = http.get(links["prev"], timeout=5).json()
    assert ids(prev) == ids(pages[0])


def test_record_fields(sim: Simulator, server: SimulatorServer, http: requests.Session) -> None:
    laml = sim.add_message(
        PROJECT,
        direction="outbound-api",
        kind="sms",
        created_at=T0 - 1.7,
        segments=2,
        timeline=[Step(0, "queued"), Step(0.5, "sent", charge=0.0083)],
        source="laml",
    )
    sim.add_message(
        PROJECT,
        direction="inbound",
        kind="sms",
        created_at=T0 - 5,
        segments=1,
        timeline=[Step(0, "received")],
        id="relay-1",
        source="realtime_api",
    )
    records = {r["id"]: r for r in http.get(list_url(server), timeout=5).json()["data"]}
    record = records[laml.id]
    assert set(record) == {
        "id",
        "from",
        "to",
        "status",
        "direction",
        "kind",
        "source",
        "type",
        "url",
        "number_of_segments",
        "charge",
        "charge_details",
        "created_at",
        "error_code",
        "error_message",
    }
    assert record["created_at"] == iso(T0 - 2)  # floored to whole seconds
    # An outbound message: from one of the account's numbers, to a remote party.
    assert record["direction"].startswith("outbound")
    assert record["from"] in OWN_NUMBERS and record["to"] not in OWN_NUMBERS
    assert record["type"] == "laml_message" and record["url"].startswith(server.base_url)
    assert record["charge"] == 0.0083
    assert sum(d["charge"] for d in record["charge_details"]) == 0.0083
    assert records["relay-1"]["type"] == "relay_message" and records["relay-1"]["url"] is None
    assert records["relay-1"]["charge_details"] == []


def test_message_created_between_pages_shifts_a_duplicate(
    sim: Simulator, clock: FakeClock, server: SimulatorServer, http: requests.Session
) -> None:
    for i in range(25):
        add(sim, T0 - 100 + i)
    first = http.get(list_url(server), params={"page_size": 10}, timeout=5).json()
    add(sim, T0)
    second = http.get(first["links"]["next"], timeout=5).json()
    assert ids(second)[0] == ids(first)[-1]


@pytest.mark.parametrize("keep", [True, False])
def test_next_link_with_and_without_filters(
    sim: Simulator, server: SimulatorServer, http: requests.Session, keep: bool
) -> None:
    for i in range(25):
        add(sim, T0 - 100 + i)
    sim.next_link_keeps_filters = keep
    pages = walk(http, list_url(server), {"page_size": 5, "created_after": iso(T0 - 90)})
    assert ("created_after" in pages[0]["links"]["next"]) is keep
    assert "created_after" in pages[0]["links"]["first"]
    records = [r for page in pages for r in page["data"]]
    # The token remembers the filter, so the listing stays filtered either way.
    assert len(records) == 14
    assert all(r["created_at"] > iso(T0 - 90) for r in records)


def test_next_link_without_filters_and_offset_only_token_pages_unfiltered(
    sim: Simulator, server: SimulatorServer, http: requests.Session
) -> None:
    for i in range(25):
        add(sim, T0 - 100 + i)
    sim.next_link_keeps_filters = False
    sim.token_encodes_filters = False
    pages = walk(http, list_url(server), {"page_size": 5, "created_after": iso(T0 - 90)})
    records = [r for page in pages for r in page["data"]]
    assert len(pages) == 5 and len(records) == 25
    assert any(r["created_at"] <= iso(T0 - 90) for r in records)


def test_query_filters_override_token_filters(
    sim: Simulator, server: SimulatorServer, http: requests.Session
) -> None:
    for i in range(10):
        add(sim, T0 - 100 + i)
    params: dict[str, str | int] = {"page_size": 2, "created_after": iso(T0 - 95)}
    first = http.get(list_url(server), params=params, timeout=5).json()
    response = http.get(first["links"]["next"], params={"created_after": iso(T0 - 200)}, timeout=5)
    # page 1 of the wider listing: the 3rd and 4th newest of all ten
    assert [r["created_at"] for r in response.json()["data"]] == [iso(T0 - 93), iso(T0 - 94)]


# --------------------------------------------------------------------------- filters


def listed(http: requests.Session, server: SimulatorServer, **params: Any) -> set[str]:
    response = http.get(list_url(server), params={"page_size": 1000, **params}, timeout=5)
    assert response.status_code == 200, response.text
    return set(ids(response.json()))


def test_created_after_exclusive_and_inclusive(
    sim: Simulator, server: SimulatorServer, http: requests.Session
) -> None:
    before, at, after = add(sim, T0 - 10), add(sim, T0 - 5), add(sim, T0 - 1)
    assert listed(http, server, created_after=iso(T0 - 5)) == {after.id}
    sim.created_after_inclusive = True
    assert listed(http, server, created_after=iso(T0 - 5)) == {at.id, after.id}
    # an offset means the same instant
    assert listed(http, server, created_after="2026-11-22T06:56:55+01:00") == {at.id, after.id}
    assert listed(http, server, created_before=iso(T0 - 5)) == {before.id}


def test_dates_and_day_precision(
    sim: Simulator, server: SimulatorServer, http: requests.Session
) -> None:
    midnight = datetime(2026, 11, 22, tzinfo=UTC).timestamp()
    yesterday = add(sim, midnight - 3600)
    early = add(sim, T0 - 3600)
    latest = add(sim, T0)
    assert listed(http, server, created_on="2026-11-22") == {early.id, latest.id}
    assert listed(http, server, created_after="2026-11-22") == {early.id, latest.id}
    assert listed(http, server, created_after=iso(T0 - 60)) == {latest.id}
    assert listed(http, server, created_before=iso(T0 - 60)) == {yesterday.id, early.id}
    sim.created_after_day_precision = True
    assert listed(http, server, created_after=iso(T0 - 60)) == {early.id, latest.id}
    assert listed(http, server, created_before=iso(T0 - 60)) == {yesterday.id}


@pytest.mark.parametrize(("order", "expected"), [("oldest", [0, 1, 2]), ("newest", [2, 1, 0])])
def test_list_order(
    sim: Simulator, server: SimulatorServer, http: requests.Session, order: str, expected: list[int]
) -> None:
    messages = [add(sim, T0 - 10 + i) for i in range(3)]
    sim.list_order = order
    assert ids(http.get(list_url(server), timeout=5).json()) == [messages[i].id for i in expected]


# --------------------------------------------------------------------------- time, get


def test_future_messages_and_status_moving_over_time(
    sim: Simulator, clock: FakeClock, server: SimulatorServer, http: requests.Session
) -> None:
    message = sim.add_message(
        PROJECT,
        direction="outbound-api",
        kind="sms",
        created_at=T0 + 5,
        segments=1,
        timeline=[
            Step(0, "queued"),
            Step(2, "sent", charge=0.0083),
            Step(4, "undelivered", "30007", "Message filtered by carrier", 0.0083),
        ],
    )
    url = f"{list_url(server)}/{message.id}"
    assert http.get(list_url(server), timeout=5).json()["data"] == []
    assert_error(http.get(url, timeout=5), 404, "not_found")
    seen = []
    for offset in (5, 6.9, 7, 9):
        clock.now = T0 + offset
        record = http.get(url, timeout=5).json()
        assert http.get(list_url(server), timeout=5).json()["data"] == [record]
        seen.append((record["status"], record["error_code"], record["charge"]))
    assert seen == [
        ("queued", None, 0.0),
        ("queued", None, 0.0),
        ("sent", None, 0.0083),
        ("undelivered", "30007", 0.0083),
    ]


def test_get_by_id_and_404(sim: Simulator, server: SimulatorServer, http: requests.Session) -> None:
    mine = add(sim, T0 - 1)
    other = add(sim, T0 - 1, project="proj-2")
    gone = add(sim, T0 - 1)
    sim.delete_message(PROJECT, gone.id)
    record = http.get(f"{list_url(server)}/{mine.id}", timeout=5).json()
    assert record["id"] == mine.id and record["status"] == "delivered"
    for missing in (other.id, gone.id, "no-such-id"):
        assert_error(http.get(f"{list_url(server)}/{missing}", timeout=5), 404, "not_found")
    assert gone.id not in listed(http, server)
    assert sim.get_requests == 4 and sim.list_requests == 1 and sim.requests_total == 5


# --------------------------------------------------------------------------- faults


def test_fail_next_then_normal(sim: Simulator, server: SimulatorServer) -> None:
    sim.fail_next(2, status=502)
    url = list_url(server)
    assert_error(requests.get(url, timeout=5), 502, "bad_gateway")  # before auth
    assert_error(requests.get(url, auth=AUTH, timeout=5), 502, "bad_gateway")
    assert requests.get(url, auth=AUTH, timeout=5).status_code == 200


def test_fail_next_with_html_or_generic_body(sim: Simulator, server: SimulatorServer) -> None:
    sim.fail_next(1, status=400, body={"error": "Bad Request"})
    assert requests.get(list_url(server), auth=AUTH, timeout=5).json() == {"error": "Bad Request"}
    sim.fail_next(1, status=502, body="<html>Bad Gateway</html>")
    response = requests.get(list_url(server), auth=AUTH, timeout=5)
    assert response.status_code == 502 and response.headers["Content-Type"].startswith("text/html")


def test_rate_limit(sim: Simulator, server: SimulatorServer, http: requests.Session) -> None:
    sim.rate_limit_next(1, retry_after=1.2)
    response = http.get(list_url(server), timeout=5)
    assert_error(response, 429, "rate_limit_exceeded")
    assert response.headers["Retry-After"] == "2"
    sim.rate_limit_next(1, retry_after=None)
    response = http.get(list_url(server), timeout=5)
    assert_error(response, 429, "rate_limit_exceeded")
    assert "Retry-After" not in response.headers
    assert http.get(list_url(server), timeout=5).status_code == 200


def test_fault_order(sim: Simulator, server: SimulatorServer, http: requests.Session) -> None:
    sim.fail_next(1)
    sim.rate_limit_next(1)
    sim.set_outage(True)
    assert http.get(list_url(server), timeout=5).status_code == 503
    sim.set_outage(False)
    statuses = [http.get(list_url(server), timeout=5).status_code for _ in range(3)]
    assert statuses == [503, 429, 200]


def test_delay_next_triggers_client_timeouts(sim: Simulator, server: SimulatorServer) -> None:
    sim.delay_next(1, 0.5)
    with pytest.raises(requests.exceptions.ReadTimeout):
        requests.get(list_url(server), auth=AUTH, timeout=0.1)
    started = time.monotonic()
    assert requests.get(list_url(server), auth=AUTH, timeout=5).status_code == 200
    assert time.monotonic() - started < 0.4
    sim.delay_next(1, 0.15)
    started = time.monotonic()
    assert requests.get(list_url(server), auth=AUTH, timeout=5).status_code == 200
    assert time.monotonic() - started >= 0.15


def test_outage_modes(sim: Simulator, server: SimulatorServer, http: requests.Session) -> None:
    sim.set_outage(True)
    for _ in range(3):
        assert_error(http.get(list_url(server), timeout=5), 503, "service_unavailable")
    sim.set_outage(True, mode="reset")
    with pytest.raises(requests.exceptions.ConnectionError):
        http.get(list_url(server), timeout=5)
    sim.set_outage(False)
    assert http.get(list_url(server), timeout=5).status_code == 200
    with pytest.raises(ValueError):
        sim.set_outage(True, mode="teapot")


def test_stop_ends_kept_alive_connections(sim: Simulator, http: requests.Session) -> None:
    server = SimulatorServer(sim)
    server.start()
    assert http.get(list_url(server), timeout=5).status_code == 200
    server.stop()
    with pytest.raises(requests.exceptions.ConnectionError):
        http.get(list_url(server), timeout=5)


# --------------------------------------------------------------------------- ground truth


def test_state_at_and_validation() -> None:
    message = SimMessage(
        id="m",
        project_id="p",
        direction="outbound-api",
        kind="sms",
        created_at=T0,
        segments=1,
        timeline=[Step(0, "queued"), Step(1, "sent"), Step(1, "delivered")],
    )
    assert message.state_at(T0 - 1).status == "queued"
    assert message.state_at(T0 + 0.99).status == "queued"
    assert message.state_at(T0 + 1).status == "delivered"
    with pytest.raises(ValueError):
        SimMessage("m", "p", "inbound", "sms", T0, 1, [Step(1, "received")])
    with pytest.raises(ValueError):
        SimMessage("m", "p", "inbound", "sms", T0, 1, [Step(0, "a"), Step(2, "b"), Step(1, "c")])


def test_expected_totals(sim: Simulator, clock: FakeClock) -> None:
    def msg(created_at: float, *steps: Step, kind: str = "sms", segments: int = 1) -> None:
        sim.add_message(
            PROJECT,
            direction="outbound-api",
            kind=kind,
            created_at=created_at,
            segments=segments,
            timeline=[Step(0, "queued"), *steps],
        )

    sent = Step(1, "sent", charge=0.00415)
    msg(T0, sent, Step(2, "delivered", charge=0.00415))
    msg(T0 + 1, Step(1, "sent", charge=0.0083), Step(2, "delivered", charge=0.0083), segments=2)
    msg(T0, sent, Step(100, "delivered", charge=0.00415))  # receipt after the timeout
    msg(T0, Step(1, "sent", charge=0.015), kind="mms")  # final for mms only
    msg(T0, sent, Step(3, "undelivered", "30007", "filtered", 0.00415))
    msg(T0, Step(2, "failed", None, "Relay error without a code"))
    msg(T0 - 1, sent, Step(2, "delivered", charge=0.00415))  # before start_point
    msg(T0 + 30, sent)  # created after `now`
    deleted = sim.add_message(
        PROJECT,
        direction="inbound",
        kind="sms",
        created_at=T0,
        segments=1,
        timeline=[Step(0, "received")],
    )
    sim.delete_message(PROJECT, deleted.id)
    clock.now = T0 + 10
    totals = sim.expected_totals(
        PROJECT,
        final_statuses=["delivered", "undelivered", "failed", "received"],
        final_statuses_by_kind={"mms": ["sent"]},
        settle_timeout=60,
        start_point=T0,
    )
    assert totals == {
        ("outbound-api", "sms", "delivered", ""): (2, 3, 4_150_000 + 8_300_000),
        ("outbound-api", "sms", "sent", ""): (1, 1, 4_150_000),
        ("outbound-api", "mms", "sent", ""): (1, 1, 15_000_000),
        ("outbound-api", "sms", "undelivered", "30007"): (1, 1, 4_150_000),
        ("outbound-api", "sms", "failed", ""): (1, 1, 0),
    }
    with_deleted = sim.expected_totals(
        PROJECT,
        final_statuses=["received"],
        final_statuses_by_kind={},
        settle_timeout=60,
        start_point=T0,
        now=T0,
        include_deleted=True,
    )
    assert with_deleted[("inbound", "sms", "received", "")] == (1, 1, 0)


# --------------------------------------------------------------------------- traffic


def test_traffic_generator_start_stop() -> None:
    simulator = Simulator(seed=3)
    simulator.add_project(PROJECT, TOKEN)
    profile = TrafficProfile(max_delay=2.0)
    generator = TrafficGenerator(simulator, PROJECT, rate=1000, profile=profile, seed=5)
    generator.start()
    wait_for(lambda: generator.created >= 30)
    generator.stop()
    assert not generator.running
    messages = simulator.messages(PROJECT)
    assert len(messages) == generator.created
    for message in messages:
        assert message.created_at == int(message.created_at)
        assert all(0 <= step.at <= profile.max_delay for step in message.timeline)
        assert message.timeline == sorted(message.timeline, key=lambda s: s.at)


def test_random_messages_cover_every_outcome() -> None:
    rng = random.Random(11)
    profile = TrafficProfile()
    outcomes = set()
    for _ in range(3000):
        args = random_message_args(rng, profile)
        final = args["timeline"][-1]
        outbound = args["direction"] != "inbound"
        outcomes.add((outbound, args["kind"], final.status, final.error_code))
        assert all(step.at <= profile.max_delay for step in args["timeline"])
        assert args["segments"] >= 1
    expected = {
        (True, "sms", "delivered", None),
        (True, "sms", "sent", None),
        (True, "mms", "sent", None),
        (False, "sms", "received", None),
        (False, "mms", "received", None),
        *((True, "sms", "undelivered", code) for code in ("30003", "30005", "30006", "30007")),
        *((True, "sms", "failed", code) for code in ("21610", "21601")),
    }
    assert outcomes == expected


def test_missing_error_code_profile() -> None:
    rng = random.Random(1)
    profile = TrafficProfile(
        inbound=0, mms=0, undelivered=0.9, failed=0.1, never_receipted=0, missing_error_code=1.0
    )
    final = random_message_args(rng, profile)["timeline"][-1]
    assert (
        final.status in ("undelivered", "failed")
        and final.error_code is None
        and final.error_message
    )


# --------------------------------------------------------------------------- properties


def _auth_header() -> str:
    return "Basic " + base64.b64encode(f"{PROJECT}:{TOKEN}".encode()).decode()


@settings(max_examples=40, deadline=None)
@given(
    offsets=st.lists(st.integers(min_value=0, max_value=20), max_size=40),
    page_size=st.integers(min_value=1, max_value=7),
)
def test_paging_a_still_list_returns_each_record_once(offsets: list[int], page_size: int) -> None:
    simulator = Simulator(clock=lambda: T0, seed=1)
    simulator.add_project(PROJECT, TOKEN)
    expected = {add(simulator, T0 - offset).id for offset in offsets}
    seen: list[str] = []
    target = f"{LIST_PATH}?page_size={page_size}"
    while True:
        response = simulator.handle("GET", target, _auth_header())
        assert response.status == 200
        seen.extend(record["id"] for record in response.body["data"])
        if "next" not in response.body["links"]:
            break
        target = response.body["links"]["next"]
    assert len(seen) == len(expected) and set(seen) == expected


def test_concurrent_requests_are_counted(sim: Simulator, server: SimulatorServer) -> None:
    def fetch() -> None:
        with requests.Session() as session:
            for _ in range(5):
                assert session.get(list_url(server), auth=AUTH, timeout=5).status_code == 200

    threads = [threading.Thread(target=fetch) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sim.requests_total == 20 and sim.list_requests == 20


def test_numbers_follow_the_direction() -> None:
    """Outbound: from an own number to a remote one; inbound: the other way round. The remote
    parties span several countries (NANP regions included), short codes and senders."""
    sim = Simulator(clock=lambda: T0, seed=4)
    sim.add_project("p", "t")
    remotes = []
    for i in range(400):
        direction = "inbound" if i % 2 else "outbound-api"
        m = sim.add_message(
            "p",
            direction=direction,
            kind="sms",
            created_at=T0 - 10,
            segments=1,
            timeline=[Step(0, "received" if i % 2 else "delivered")],
        )
        own, remote = (m.to_number, m.from_number) if i % 2 else (m.from_number, m.to_number)
        assert own in OWN_NUMBERS and remote not in OWN_NUMBERS
        remotes.append(remote)
    prefixes = {r[:5] for r in remotes}
    assert {"+1212", "+1416", "+1787", "+1876", "+4477"} <= prefixes
    assert any(not r.startswith("+") for r in remotes)


def test_a_late_record_shows_only_once_it_appears(
    sim: Simulator, clock: FakeClock, server: SimulatorServer, http: requests.Session
) -> None:
    """The log's ingestion delay: a record is neither listed nor fetched before created_at +
    appears_after, whatever the filters."""
    on_time = add(sim, T0 - 100)
    late = sim.add_message(
        PROJECT,
        direction="outbound-api",
        kind="sms",
        created_at=T0 - 90,
        segments=1,
        timeline=[Step(0, "delivered")],
        appears_after=120.0,
    )
    listed = [i for page in walk(http, list_url(server)) for i in ids(page)]
    assert listed == [on_time.id]
    get = http.get(f"{list_url(server)}/{late.id}", timeout=5)
    assert get.status_code == 404
    clock.now = T0 + 30
    params = {"created_after": iso(T0 - 95)}
    listed = [i for page in walk(http, list_url(server), params) for i in ids(page)]
    assert listed == [late.id]
    assert http.get(f"{list_url(server)}/{late.id}", timeout=5).status_code == 200


def test_a_profile_makes_a_share_of_records_late() -> None:
    rng = random.Random(5)
    profile = TrafficProfile(late=0.3, max_lateness=150.0)
    delays = [random_message_args(rng, profile).get("appears_after", 0.0) for _ in range(2000)]
    late = [d for d in delays if d > 0]
    assert 450 < len(late) < 750 and max(late) <= 150.0 and max(late) > 140.0
    with pytest.raises(ValueError):
        TrafficProfile(late=1.5)
