"""The API client over real HTTP on loopback: paging, retries, errors, and no leaked token."""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from exporter.client import ApiError, AuthError, Client, RetryPolicy, Stopped
from exporter.simulator import LIST_PATH, Simulator, SimulatorServer, Step, format_timestamp

T0 = datetime(2026, 11, 22, 5, 57, tzinfo=UTC).timestamp()
PROJECT = "proj-1"
TOKEN = "PTsecret-token-4f1e9c"
FAST = RetryPolicy(attempts=4, base_delay=0.01, max_delay=0.05, max_retry_after=5.0)


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Requests:
    """What the client reported to on_request, in order."""

    def __init__(self) -> None:
        self.codes: list[str] = []

    def __call__(self, code: str) -> None:
        self.codes.append(code)


@pytest.fixture
def sim() -> Simulator:
    simulator = Simulator(clock=FakeClock(T0), seed=3)
    simulator.add_project(PROJECT, TOKEN)
    simulator.add_project("proj-noscope", "tok", messaging_scope=False)
    return simulator


@pytest.fixture
def server(sim: Simulator) -> Iterator[SimulatorServer]:
    with SimulatorServer(sim) as srv:
        yield srv


@pytest.fixture
def reported() -> Requests:
    return Requests()


ClientFactory = Callable[..., Client]


@pytest.fixture
def make_client(server: SimulatorServer, reported: Requests) -> Iterator[ClientFactory]:
    clients: list[Client] = []

    def make(**kwargs: Any) -> Client:
        options: dict[str, Any] = {
            "timeout": 2.0,
            "page_size": 3,
            "on_request": reported,
            "retry": FAST,
        }
        options.update(kwargs)
        base_url = options.pop("base_url", server.base_url)
        project = options.pop("project_id", PROJECT)
        token = options.pop("token", TOKEN)
        client = Client(base_url, project, token, **options)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


def add(sim: Simulator, created_at: float, status: str = "delivered") -> str:
    return sim.add_message(
        PROJECT,
        direction="outbound-api",
        kind="sms",
        created_at=created_at,
        segments=1,
        timeline=[Step(0, status)],
    ).id


def listed_ids(client: Client, created_after: float | None) -> list[str]:
    return [r["id"] for page in client.list_pages(created_after) for r in page.records]


# --------------------------------------------------------------------------- a stub server


class Stub:
    """A tiny HTTP server answering with `respond(path, headers) -> (status, headers, body)`."""

    def __init__(
        self, respond: Callable[[str, dict[str, str]], tuple[int, dict[str, str], bytes]]
    ) -> None:
        self.respond = respond
        self.requests: list[tuple[str, dict[str, str]]] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                return

            def do_GET(self) -> None:
                headers = dict(self.headers.items())
                stub.requests.append((self.path, headers))
                status, extra, body = stub.respond(self.path, headers)
                self.send_response(status)
                extra = {"Content-Type": "application/json", **extra}
                extra.setdefault("Content-Length", str(len(body)))
                for name, value in extra.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)
                self.wfile.flush()
                if int(extra["Content-Length"]) != len(body):
                    self.close_connection = True

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()

    def queries(self) -> list[dict[str, list[str]]]:
        return [parse_qs(urlsplit(path).query) for path, _ in self.requests]


@pytest.fixture
def stubs() -> Iterator[Callable[..., Stub]]:
    started: list[Stub] = []

    def start(
        respond: Callable[[str, dict[str, str]], tuple[int, dict[str, str], bytes]],
    ) -> Stub:
        stub = Stub(respond)
        started.append(stub)
        return stub

    yield start
    for stub in started:
        stub.close()


def page(records: list[dict[str, Any]], next_link: str | None = None) -> bytes:
    links = {"self": "x", "first": "x"}
    if next_link is not None:
        links["next"] = next_link
    return json.dumps({"links": links, "data": records}).encode()


# --------------------------------------------------------------------------- listing


def test_basic_auth_and_page_size_are_sent(
    stubs: Callable[..., Stub], make_client: ClientFactory
) -> None:
    stub = stubs(lambda path, headers: (200, {}, page([{"id": "a"}])))
    client = make_client(base_url=stub.base_url, page_size=7)
    assert listed_ids(client, T0 - 3600) == ["a"]
    ((path, headers),) = stub.requests
    expected = base64.b64encode(f"{PROJECT}:{TOKEN}".encode()).decode()
    assert headers["Authorization"] == f"Basic {expected}"
    assert urlsplit(path).path == LIST_PATH
    query = parse_qs(urlsplit(path).query)
    assert query["page_size"] == ["7"]
    assert query["created_after"] == [format_timestamp(T0 - 3600)]


def test_listing_without_created_after_sends_no_filter(
    stubs: Callable[..., Stub], make_client: ClientFactory
) -> None:
    stub = stubs(lambda path, headers: (200, {}, page([])))
    assert listed_ids(make_client(base_url=stub.base_url), None) == []
    assert "created_after" not in stub.queries()[0]


def test_wrong_token_is_rejected_by_the_simulator(
    sim: Simulator, make_client: ClientFactory, reported: Requests
) -> None:
    add(sim, T0 - 10)
    assert len(listed_ids(make_client(), None)) == 1
    with pytest.raises(AuthError) as info:
        listed_ids(make_client(token="wrong"), None)
    assert info.value.status == 401
    assert reported.codes == ["200", "401"]


def test_follows_next_links_across_pages(
    sim: Simulator, make_client: ClientFactory, reported: Requests
) -> None:
    expected = {add(sim, T0 - 100 + i) for i in range(10)}
    client = make_client(page_size=3)
    pages = list(client.list_pages(T0 - 3600))
    assert [len(p.records) for p in pages] == [3, 3, 3, 1]
    ids = [r["id"] for p in pages for r in p.records]
    assert len(ids) == 10
    assert set(ids) == expected
    assert sim.list_requests == 4
    assert reported.codes == ["200"] * 4
    assert pages[0].server_time == T0  # the Date header


def test_next_links_that_drop_the_filters_get_them_back(
    sim: Simulator, make_client: ClientFactory
) -> None:
    sim.next_link_keeps_filters = False
    sim.token_encodes_filters = False
    cutoff = T0 - 1000
    for i in range(10):
        add(sim, cutoff - 500 + i)  # before the cutoff: must not be listed
    expected = {add(sim, cutoff + 10 + i) for i in range(10)}
    sim.list_order = "oldest"  # the filtered records are then not all on the first pages
    ids = listed_ids(make_client(page_size=3), cutoff)
    assert len(ids) == 10
    assert set(ids) == expected


def test_next_links_that_drop_the_page_size_get_it_back(
    stubs: Callable[..., Stub], make_client: ClientFactory
) -> None:
    def respond(path: str, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
        query = parse_qs(urlsplit(path).query)
        if "page_token" not in query:
            return 200, {}, page([{"id": "a"}], "?page_number=1&page_token=T")
        return 200, {}, page([{"id": "b"}])

    stub = stubs(respond)
    assert listed_ids(make_client(base_url=stub.base_url, page_size=5), T0) == ["a", "b"]
    assert stub.queries()[1]["page_size"] == ["5"]


@pytest.mark.parametrize(
    "next_link",
    [
        "/api/messaging/logs?page_number=1&page_token=T",
        "?page_number=1&page_token=T",
        "logs?page_number=1&page_token=T",
    ],
)
def test_relative_next_link(
    stubs: Callable[..., Stub], make_client: ClientFactory, next_link: str
) -> None:
    def respond(path: str, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
        if "page_token" not in path:
            return 200, {}, page([{"id": "a"}], next_link)
        return 200, {}, page([{"id": "b"}])

    stub = stubs(respond)
    client = make_client(base_url=stub.base_url, page_size=2)
    assert listed_ids(client, T0 - 60) == ["a", "b"]
    second_path, second_headers = stub.requests[1]
    assert urlsplit(second_path).path == LIST_PATH
    query = parse_qs(urlsplit(second_path).query)
    assert query["page_token"] == ["T"]
    assert query["page_number"] == ["1"]
    assert query["created_after"] == [format_timestamp(T0 - 60)]
    assert query["page_size"] == ["2"]
    assert second_headers["Authorization"].startswith("Basic ")


def test_next_link_to_another_host_is_refused(
    stubs: Callable[..., Stub], make_client: ClientFactory
) -> None:
    elsewhere = stubs(lambda path, headers: (200, {}, page([{"id": "stolen"}])))
    stub = stubs(
        lambda path, headers: (
            200,
            {},
            page([{"id": "a"}], f"{elsewhere.base_url}{LIST_PATH}?page_number=1&page_token=T"),
        )
    )
    client = make_client(base_url=stub.base_url)
    pages = client.list_pages(None)
    assert next(pages).records == [{"id": "a"}]
    with pytest.raises(ApiError, match="another host"):
        next(pages)
    assert elsewhere.requests == [], "credentials must never go to another host"


def test_next_link_to_the_same_host_with_another_scheme_is_refused(
    stubs: Callable[..., Stub], make_client: ClientFactory
) -> None:
    stub = stubs(lambda path, headers: (200, {}, page([], "x")))
    host = urlsplit(stub.base_url).netloc
    stub.respond = lambda path, headers: (
        200,
        {},
        page([{"id": "a"}], f"https://{host}{LIST_PATH}?page_token=T"),
    )
    with pytest.raises(ApiError, match="another host"):
        listed_ids(make_client(base_url=stub.base_url), None)
    assert len(stub.requests) == 1


def test_absolute_next_link_to_the_same_host_is_followed(
    stubs: Callable[..., Stub], make_client: ClientFactory
) -> None:
    holder: dict[str, str] = {}

    def respond(path: str, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
        if "page_token" not in path:
            return 200, {}, page([{"id": "a"}], holder["next"])
        return 200, {}, page([{"id": "b"}])

    stub = stubs(respond)
    # Host names are case-insensitive.
    holder["next"] = stub.base_url.replace("http://", "HTTP://") + LIST_PATH + "?page_token=T"
    assert listed_ids(make_client(base_url=stub.base_url), None) == ["a", "b"]


def test_repeating_next_link_is_stopped(
    stubs: Callable[..., Stub], make_client: ClientFactory, reported: Requests
) -> None:
    holder: dict[str, str] = {}
    stub = stubs(lambda path, headers: (200, {}, page([{"id": "a"}], holder["next"])))
    holder["next"] = f"{stub.base_url}{LIST_PATH}?page_number=1&page_size=3&page_token=SAME"
    with pytest.raises(ApiError, match="repeats"):
        listed_ids(make_client(base_url=stub.base_url), None)
    assert len(stub.requests) == 2
    assert reported.codes == ["200", "200"]


def test_retry_in_the_middle_of_a_listing_continues_it(
    sim: Simulator, make_client: ClientFactory, reported: Requests
) -> None:
    expected = {add(sim, T0 - 100 + i) for i in range(7)}
    pages = make_client(page_size=3).list_pages(T0 - 3600)
    ids = [r["id"] for r in next(pages).records]
    sim.fail_next(2, 503)
    ids += [r["id"] for p in pages for r in p.records]
    assert len(ids) == 7
    assert set(ids) == expected
    assert reported.codes == ["200", "503", "503", "200", "200"]


def test_redirects_are_not_followed(
    stubs: Callable[..., Stub], make_client: ClientFactory, reported: Requests
) -> None:
    elsewhere = stubs(lambda path, headers: (200, {}, page([{"id": "stolen"}])))
    stub = stubs(lambda path, headers: (301, {"Location": elsewhere.base_url + path}, b""))
    with pytest.raises(ApiError, match="redirected to") as info:
        listed_ids(make_client(base_url=stub.base_url), None)
    assert info.value.status == 301
    assert elsewhere.base_url in str(info.value)
    assert elsewhere.requests == []
    assert reported.codes == ["301"]


def test_oversized_body_is_refused(
    stubs: Callable[..., Stub],
    make_client: ClientFactory,
    reported: Requests,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("exporter.client.MAX_BODY_BYTES", 1000)
    stub = stubs(lambda path, headers: (200, {}, page([{"id": "x" * 2000}])))
    with pytest.raises(ApiError, match="larger than 1000 bytes"):
        listed_ids(make_client(base_url=stub.base_url), None)
    assert reported.codes == ["200"]


def test_response_without_data_list_is_an_error(
    stubs: Callable[..., Stub], make_client: ClientFactory
) -> None:
    stub = stubs(lambda path, headers: (200, {}, b'{"links": {}, "data": {"id": "a"}}'))
    with pytest.raises(ApiError, match="data"):
        listed_ids(make_client(base_url=stub.base_url), None)


# --------------------------------------------------------------------------- retries


def test_server_errors_are_retried_and_reported(
    sim: Simulator, make_client: ClientFactory, reported: Requests
) -> None:
    expected = add(sim, T0 - 5)
    sim.fail_next(3, 503)
    assert listed_ids(make_client(), None) == [expected]
    assert reported.codes == ["503", "503", "503", "200"]


def test_server_errors_until_attempts_run_out(
    sim: Simulator, make_client: ClientFactory, reported: Requests
) -> None:
    sim.fail_next(10, 500)
    with pytest.raises(ApiError) as info:
        listed_ids(make_client(retry=RetryPolicy(3, 0.01, 0.05)), None)
    assert info.value.status == 500
    assert "500" in str(info.value)
    assert "Internal Server Error" in str(info.value)  # SignalWire's own words
    assert reported.codes == ["500"] * 3


def test_429_retry_after_is_honoured(
    sim: Simulator, make_client: ClientFactory, reported: Requests
) -> None:
    expected = add(sim, T0 - 5)
    sim.rate_limit_next(1, retry_after=1)
    began = time.monotonic()
    assert listed_ids(make_client(), None) == [expected]
    assert time.monotonic() - began >= 0.95
    assert reported.codes == ["429", "200"]


def test_429_retry_after_is_capped(sim: Simulator, make_client: ClientFactory) -> None:
    add(sim, T0 - 5)
    sim.rate_limit_next(1, retry_after=600)
    began = time.monotonic()
    listed_ids(make_client(retry=RetryPolicy(3, 0.01, 0.05, max_retry_after=0.1)), None)
    assert time.monotonic() - began < 5


def test_429_without_retry_after_backs_off(
    sim: Simulator, make_client: ClientFactory, reported: Requests
) -> None:
    expected = add(sim, T0 - 5)
    sim.rate_limit_next(2, retry_after=None)
    began = time.monotonic()
    assert listed_ids(make_client(), None) == [expected]
    assert time.monotonic() - began < 5
    assert reported.codes == ["429", "429", "200"]


def test_429_until_attempts_run_out(
    sim: Simulator, make_client: ClientFactory, reported: Requests
) -> None:
    sim.rate_limit_next(10, retry_after=None)
    with pytest.raises(ApiError) as info:
        listed_ids(make_client(retry=RetryPolicy(2, 0.01, 0.05)), None)
    assert info.value.status == 429
    assert info.value.code == "rate_limit_exceeded"
    assert reported.codes == ["429", "429"]


def test_timeout_is_reported_as_error_and_retried(
    sim: Simulator, make_client: ClientFactory, reported: Requests
) -> None:
    expected = add(sim, T0 - 5)
    sim.delay_next(1, 5.0)  # the server's stop ends the wait
    began = time.monotonic()
    assert listed_ids(make_client(timeout=0.3), None) == [expected]
    assert time.monotonic() - began < 4, "the client waited for the slow answer"
    assert reported.codes == ["error", "200"]


def test_timeouts_until_attempts_run_out(
    sim: Simulator, make_client: ClientFactory, reported: Requests
) -> None:
    sim.delay_next(2, 1.0)
    with pytest.raises(ApiError, match="timeout") as info:
        listed_ids(make_client(timeout=0.2, retry=RetryPolicy(2, 0.01, 0.05)), None)
    assert info.value.status is None
    assert reported.codes == ["error", "error"]


def test_connection_reset_is_reported_as_error(
    sim: Simulator, make_client: ClientFactory, reported: Requests
) -> None:
    expected = add(sim, T0 - 5)
    sim.set_outage(True, "reset")
    client = make_client(retry=RetryPolicy(3, 0.01, 0.05))
    with pytest.raises(ApiError) as info:
        listed_ids(client, None)
    assert info.value.status is None
    assert reported.codes == ["error"] * 3
    sim.set_outage(False)
    assert listed_ids(client, None) == [expected]
    assert reported.codes[-1] == "200"


def test_connection_refused_is_reported_as_error(
    make_client: ClientFactory, reported: Requests
) -> None:
    stub = Stub(lambda path, headers: (200, {}, b""))
    base_url = stub.base_url
    stub.close()  # nothing listens there any more
    with pytest.raises(ApiError, match="connection"):
        listed_ids(make_client(base_url=base_url, retry=RetryPolicy(2, 0.01, 0.05)), None)
    assert reported.codes == ["error", "error"]


def test_body_cut_short_is_retried(
    stubs: Callable[..., Stub], make_client: ClientFactory, reported: Requests
) -> None:
    body = page([{"id": "a"}])

    def respond(path: str, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
        if len(stub.requests) == 1:  # promise the whole body, send half, hang up
            return 200, {"Content-Length": str(len(body))}, body[: len(body) // 2]
        return 200, {}, body

    stub = stubs(respond)
    assert listed_ids(make_client(base_url=stub.base_url), None) == ["a"]
    assert reported.codes == ["error", "200"]


def test_slowly_trickling_body_is_bounded_by_the_timeout(
    stubs: Callable[..., Stub], make_client: ClientFactory, reported: Requests
) -> None:
    stop = threading.Event()

    class Trickle(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            return

        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            while not stop.wait(0.05):  # one byte per chunk, forever
                try:
                    self.wfile.write(b"1\r\n \r\n")
                    self.wfile.flush()
                except OSError:
                    return

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Trickle)
    httpd.daemon_threads = True
    thread = threading.Thread(
        target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
    )
    thread.start()
    try:
        client = make_client(
            base_url=f"http://127.0.0.1:{httpd.server_address[1]}",
            timeout=0.3,
            retry=RetryPolicy(2, 0.01, 0.05),
        )
        began = time.monotonic()
        with pytest.raises(ApiError):
            listed_ids(client, None)
        assert time.monotonic() - began < 3
        assert reported.codes == ["error", "error"]
    finally:
        stop.set()
        httpd.shutdown()
        httpd.server_close()
        thread.join()


@pytest.mark.parametrize(
    "body",
    [
        "<html><body><h1>502 Bad Gateway</h1></body></html>",
        '{"links": {"self": "x"}, "data": [{"id": "a", "sta',
        "",
    ],
)
def test_200_with_a_body_that_is_not_json_is_retried(
    sim: Simulator, make_client: ClientFactory, reported: Requests, body: str
) -> None:
    expected = add(sim, T0 - 5)
    sim.fail_next(2, 200, body=body)
    assert listed_ids(make_client(), None) == [expected]
    assert reported.codes == ["200", "200", "200"]

    sim.fail_next(10, 200, body=body)
    reported.codes.clear()
    with pytest.raises(ApiError, match="not JSON") as info:
        listed_ids(make_client(retry=RetryPolicy(3, 0.01, 0.05)), None)
    assert reported.codes == ["200"] * 3
    assert "200" in str(info.value)
    assert body[:20] in str(info.value)


def test_200_with_json_that_is_not_an_object(
    sim: Simulator, make_client: ClientFactory, reported: Requests
) -> None:
    sim.fail_next(10, 200, body=[1, 2])  # type: ignore[arg-type]
    with pytest.raises(ApiError, match="JSON list, not an object"):
        listed_ids(make_client(retry=RetryPolicy(2, 0.01, 0.05)), None)
    assert reported.codes == ["200", "200"]


# --------------------------------------------------------------------------- errors not retried


@pytest.mark.parametrize(
    ("project", "token", "status"),
    [(PROJECT, "wrong-token", 401), ("nobody", TOKEN, 401), ("proj-noscope", "tok", 403)],
)
def test_auth_errors_are_not_retried(
    sim: Simulator,
    make_client: ClientFactory,
    reported: Requests,
    project: str,
    token: str,
    status: int,
) -> None:
    client = make_client(project_id=project, token=token, retry=RetryPolicy(5, 5.0, 5.0))
    began = time.monotonic()
    with pytest.raises(AuthError) as info:
        listed_ids(client, None)
    assert time.monotonic() - began < 2
    assert info.value.status == status
    assert str(status) in str(info.value)
    assert reported.codes == [str(status)]
    assert sim.requests_total == 1


def test_a_rejected_page_token_restarts_the_listing(
    sim: Simulator, make_client: ClientFactory, reported: Requests
) -> None:
    for i in range(7):
        add(sim, T0 - 100 + i)
    pages = make_client(page_size=3).list_pages(T0 - 3600)
    ids = {r["id"] for r in next(pages).records}
    sim.invalidate_page_tokens()
    for page in pages:
        ids |= {r["id"] for r in page.records}
    assert ids == {m.id for m in sim.messages(PROJECT)}
    assert reported.codes == ["200", "422", "200", "200", "200"]


def test_a_page_token_rejected_every_time_is_an_error_carrying_the_code(
    sim: Simulator, make_client: ClientFactory, reported: Requests
) -> None:
    for i in range(7):
        add(sim, T0 - 100 + i)
    pages = make_client(page_size=3).list_pages(T0 - 3600)
    with pytest.raises(ApiError) as info:
        while True:
            next(pages)
            sim.invalidate_page_tokens()
    assert not isinstance(info.value, AuthError)
    assert info.value.status == 422
    assert info.value.code == "page_token_is_invalid"
    assert "Page token is invalid" in str(info.value)
    assert reported.codes.count("422") == 4  # the first refusal and three restarts


def test_history_limit_is_a_422_carrying_the_code(
    sim: Simulator, make_client: ClientFactory, reported: Requests
) -> None:
    sim.history_limit = 3600
    with pytest.raises(ApiError) as info:
        listed_ids(make_client(), T0 - 7200)
    assert info.value.status == 422
    assert info.value.code == "exceeds_history_logs_limit"
    assert reported.codes == ["422"]


def test_generic_error_body(sim: Simulator, make_client: ClientFactory, reported: Requests) -> None:
    sim.fail_next(1, 400, body={"error": "Bad Request"})
    with pytest.raises(ApiError, match="400 Bad Request") as info:
        listed_ids(make_client(), None)
    assert info.value.code is None
    assert reported.codes == ["400"]


def test_listing_404_names_the_likely_cause(
    stubs: Callable[..., Stub], make_client: ClientFactory
) -> None:
    stub = stubs(lambda path, headers: (404, {}, b"<html>no</html>"))
    with pytest.raises(ApiError, match="space") as info:
        listed_ids(make_client(base_url=stub.base_url), None)
    assert info.value.status == 404


# --------------------------------------------------------------------------- get by id


def test_get_message(sim: Simulator, make_client: ClientFactory, reported: Requests) -> None:
    message_id = add(sim, T0 - 5, "undelivered")
    client = make_client()
    record = client.get_message(message_id)
    assert record is not None
    assert record["id"] == message_id
    assert record["status"] == "undelivered"
    assert client.get_message("00000000-0000-4000-8000-000000000000") is None
    assert reported.codes == ["200", "404"]
    assert sim.get_requests == 2


def test_get_message_quotes_the_id(stubs: Callable[..., Stub], make_client: ClientFactory) -> None:
    stub = stubs(lambda path, headers: (200, {}, b'{"data": {"id": "a/b?c"}}'))
    assert make_client(base_url=stub.base_url).get_message("a/b?c") == {"id": "a/b?c"}
    assert stub.requests[0][0] == f"{LIST_PATH}/a%2Fb%3Fc"


def test_get_message_retries_server_errors(
    sim: Simulator, make_client: ClientFactory, reported: Requests
) -> None:
    message_id = add(sim, T0 - 5)
    sim.fail_next(1, 502)
    record = make_client().get_message(message_id)
    assert record is not None and record["id"] == message_id
    assert reported.codes == ["502", "200"]


# --------------------------------------------------------------------------- shutdown, secrets


def test_stop_interrupts_the_backoff(sim: Simulator, make_client: ClientFactory) -> None:
    stop = threading.Event()
    sim.fail_next(10, 503)
    client = make_client(
        stop=stop, on_request=lambda code: stop.set(), retry=RetryPolicy(5, 30.0, 30.0)
    )
    began = time.monotonic()
    with pytest.raises(Stopped):
        listed_ids(client, None)
    assert time.monotonic() - began < 5


def test_set_token_takes_effect(sim: Simulator, make_client: ClientFactory) -> None:
    client = make_client(token="old")
    with pytest.raises(AuthError):
        listed_ids(client, None)
    client.set_token(TOKEN)
    assert listed_ids(client, None) == []


def _echoing(status: int, html: bool) -> Callable[..., tuple[int, dict[str, str], bytes]]:
    """A server that puts the credentials it received into its error text."""

    def respond(path: str, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
        auth = headers.get("Authorization", "")
        secret = base64.b64decode(auth.partition(" ")[2]).decode()
        text = f"denied for {secret} with header {auth}"
        if html:
            return status, {"Content-Type": "text/html"}, f"{text}<html>".encode()
        body = {"errors": [{"code": f"bad_{secret}", "message": text, "attribute": auth}]}
        return status, {}, json.dumps(body).encode()

    return respond


@pytest.mark.parametrize(
    ("status", "html"), [(401, False), (403, True), (422, False), (500, False), (200, True)]
)
def test_token_never_appears_in_error_text(
    stubs: Callable[..., Stub], make_client: ClientFactory, status: int, html: bool
) -> None:
    stub = stubs(_echoing(status, html))
    client = make_client(base_url=stub.base_url, retry=RetryPolicy(2, 0.01, 0.05))
    with pytest.raises(ApiError) as info:
        listed_ids(client, T0)
    encoded = base64.b64encode(f"{PROJECT}:{TOKEN}".encode()).decode()
    for text in (str(info.value), repr(info.value), str(info.value.code)):
        assert TOKEN not in text
        assert encoded not in text


def test_token_never_appears_in_transport_errors(
    sim: Simulator, make_client: ClientFactory
) -> None:
    encoded = base64.b64encode(f"{PROJECT}:{TOKEN}".encode()).decode()
    stub = Stub(lambda path, headers: (200, {}, b""))
    refused = stub.base_url
    stub.close()
    sim.delay_next(2, 1.0)
    for client in (
        make_client(timeout=0.2, retry=RetryPolicy(2, 0.01, 0.05)),
        make_client(base_url=refused, retry=RetryPolicy(1, 0.01, 0.05)),
        make_client(base_url=refused.replace("http://", f"http://{PROJECT}:{TOKEN}@")),
    ):
        with pytest.raises(ApiError) as info:
            listed_ids(client, T0)
        assert TOKEN not in str(info.value)
        assert encoded not in str(info.value)
