"""A stand-in for SignalWire's message-log API, for tests.

It is meant to be at least as awkward as the real API (see the API notes in the project's spec):
everything the published reference leaves unconfirmed is a switch here, so the exporter can be
tested against every possibility:

* offset pagination evaluated against the list as it is at each request, so records created between
  page requests shift older records onto later pages and a client sees some of them twice;
* ``links.next`` with or without the caller's filters (``next_link_keeps_filters``), and page tokens
  that do or do not remember them (``token_encodes_filters``);
* ``created_after`` exclusive or inclusive, ``created_before`` exclusive or inclusive, both honoured
  to the second or only to the day;
* ``Retry-After`` present or absent on 429;
* list order newest first, oldest first or arbitrary (``list_order``);
* statuses that keep changing after a message was first listed (MMS and unreceipted SMS stay
  ``sent`` for good);
* ``exceeds_history_logs_limit`` (``history_limit``), HTML or ``{"error": ...}`` error bodies
  (``fail_next(body=...)``), outages that reset connections, invalidated page tokens, a random
  share of requests failing (``set_error_rate``).
"""

from __future__ import annotations

import base64
import binascii
import bisect
import contextlib
import email.utils
import functools
import hashlib
import hmac
import io
import json
import math
import random
import re
import socket
import socketserver
import struct
import sys
import threading
import time
import uuid
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from itertools import pairwise
from typing import Any, cast
from urllib.parse import parse_qs, unquote, urlencode, urlsplit

import requests
import requests.adapters
import requests.structures

Clock = Callable[[], float]
"""Returns the current time as epoch seconds."""

LIST_PATH = "/api/messaging/logs"
ERROR_DOCS_URL = "https://developer.signalwire.com/rest/overview/error-codes"
FILTER_NAMES = ("created_after", "created_before", "created_on")
DEFAULT_PAGE_SIZE = 50
DAY = 86400

_DATE_RE = re.compile(r"\d{4}-\d{2}-\d{2}")
_ERROR_MESSAGES = {
    "21601": "Phone number is not a valid SMS-capable number",
    "21610": "Message cannot be sent to the 'To' number because the customer has replied STOP",
    "30003": "Unreachable destination handset",
    "30005": "Unknown destination handset",
    "30006": "Landline or unreachable carrier",
    "30007": "Message filtered by carrier",
}

# Remote parties the simulator writes to and hears from: mostly the US, with the other NANP regions
# (which share +1 and differ by area code), a few other countries, and senders that are not phone
# numbers at all. Each is (prefix, digits after it, weight).
REMOTE_NUMBER_PLANS: tuple[tuple[str, int, int], ...] = (
    ("+1212", 7, 20),  # US, New York
    ("+1415", 7, 15),  # US, San Francisco
    ("+1312", 7, 10),  # US, Chicago
    ("+1305", 7, 8),  # US, Miami
    ("+1416", 7, 8),  # CA, Toronto
    ("+1604", 7, 4),  # CA, Vancouver
    ("+1787", 7, 3),  # PR
    ("+1876", 7, 2),  # JM
    ("+447700", 6, 6),  # GB, mobile
    ("+49151", 8, 4),  # DE, mobile
    ("+33612", 6, 3),  # FR, mobile
    ("+5215", 9, 3),  # MX, mobile
    ("+91981", 7, 3),  # IN, mobile
    ("+61412", 6, 2),  # AU, mobile
    ("+8190", 8, 2),  # JP, mobile
    ("", 5, 2),  # a short code
    ("SIGNALWIRE", 0, 1),  # an alphanumeric sender
)
# The numbers the simulated account owns: long codes and a short code.
OWN_NUMBERS = ("+15551230000", "+15551230001", "+15557650000", "+15557650001", "72345")


# --------------------------------------------------------------------------- messages


def remote_number(rng: random.Random) -> str:
    """A remote party's number, drawn from REMOTE_NUMBER_PLANS."""
    prefix, digits, _ = rng.choices(REMOTE_NUMBER_PLANS, weights=_PLAN_WEIGHTS)[0]
    if not digits:
        return prefix
    return prefix + str(rng.randrange(10**digits)).zfill(digits)


_PLAN_WEIGHTS = [weight for _, _, weight in REMOTE_NUMBER_PLANS]


@dataclass(frozen=True, slots=True)
class Step:
    """The message's full mutable state from `at` seconds after created_at on."""

    at: float
    status: str
    error_code: str | None = None
    error_message: str | None = None
    charge: float = 0.0


@dataclass
class SimMessage:
    """One message log; what the API shows of it depends on the time of the request."""

    id: str
    project_id: str
    direction: str
    kind: str
    created_at: float
    segments: int
    timeline: list[Step]
    source: str = "laml"
    from_number: str = ""
    to_number: str = ""
    # How long after created_at the message first shows in listings and get-by-id: the log's
    # ingestion delay, whose size SignalWire does not document.
    appears_after: float = 0.0

    @property
    def appears_at(self) -> float:
        return self.created_at + self.appears_after

    def __post_init__(self) -> None:
        if not self.timeline or self.timeline[0].at != 0:
            raise ValueError("timeline must start with a step at 0")
        if any(b.at < a.at for a, b in pairwise(self.timeline)):
            raise ValueError("timeline must be sorted by at")
        # Deterministic fake numbers for messages built without the Simulator.
        digest = hashlib.sha256(self.id.encode()).hexdigest()
        if not self.from_number:
            self.from_number = "+1555" + str(int(digest[:12], 16))[-7:].zfill(7)
        if not self.to_number:
            self.to_number = "+1555" + str(int(digest[12:24], 16))[-7:].zfill(7)

    def state_at(self, now: float) -> Step:
        """The last step with created_at + at <= now (the first step before creation)."""
        current = self.timeline[0]
        for step in self.timeline:
            if self.created_at + step.at > now:
                break
            current = step
        return current

    def settled_step(self, final: Collection[str], settle_timeout: float) -> Step:
        """What an exporter settles: the first final step within the timeout, else the state at
        the timeout."""
        for step in self.timeline:
            if step.status in final:
                if step.at <= settle_timeout:
                    return step
                break
        return self.state_at(self.created_at + settle_timeout)

    def to_json(self, now: float, base_url: str) -> dict[str, Any]:
        """The API record as of `now`."""
        state = self.state_at(now)
        relay = self.source == "realtime_api"
        details: list[dict[str, Any]] = []
        if state.charge:
            # One entry only: a split into several float parts would not sum exactly to `charge`.
            unit = "segment" if self.segments == 1 else "segments"
            details.append(
                {
                    "description": f"{self.kind.upper()} {self.direction}, {self.segments} {unit}",
                    "charge": state.charge,
                }
            )
        return {
            "id": self.id,
            "from": self.from_number,
            "to": self.to_number,
            "status": state.status,
            "direction": self.direction,
            "kind": self.kind,
            "source": self.source,
            "type": "relay_message" if relay else "laml_message",
            "url": None
            if relay
            else f"{base_url}/api/laml/2010-04-01/Accounts/{self.project_id}/Messages/{self.id}",
            "number_of_segments": self.segments,
            "charge": state.charge,
            "charge_details": details,
            "created_at": _created_text(self.created_at),
            "error_code": state.error_code,
            "error_message": state.error_message,
        }


@functools.lru_cache(maxsize=65536)
def _created_text(epoch: float) -> str:
    return format_timestamp(epoch)


def format_timestamp(epoch: float) -> str:
    """The API's timestamp format: second precision, UTC, with a Z."""
    return datetime.fromtimestamp(math.floor(epoch), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_timestamp(value: str) -> tuple[float, bool] | None:
    """(epoch seconds, value was a bare date) for an ISO 8601 datetime or date; None if invalid.

    A bare date means its midnight UTC; a datetime without an offset is taken as UTC.
    """
    try:
        if _DATE_RE.fullmatch(value):
            d = date.fromisoformat(value)
            return datetime(d.year, d.month, d.day, tzinfo=UTC).timestamp(), True
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp(), False


# --------------------------------------------------------------------------- responses and faults


@dataclass(frozen=True, slots=True)
class Response:
    """An HTTP answer. A str body is sent as HTML (as proxies do); reset closes unanswered."""

    status: int
    body: Any = None
    headers: tuple[tuple[str, str], ...] = ()
    reset: bool = False


def error_body(type_: str, code: str, message: str, attribute: str | None = None) -> dict[str, Any]:
    """The error shape of the message-log endpoints."""
    return {
        "errors": [
            {
                "type": type_,
                "code": code,
                "message": message,
                "attribute": attribute,
                "url": ERROR_DOCS_URL,
            }
        ]
    }


def _generic_error(status: int) -> dict[str, Any]:
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "Error"
    code = re.sub(r"[^a-z0-9]+", "_", phrase.lower()).strip("_")
    return error_body("server_error" if status >= 500 else "client_error", code, phrase)


@dataclass(frozen=True, slots=True)
class FaultAction:
    """What a fault does to one request: answer with `response`, or wait `delay` then go on."""

    response: Response | None = None
    delay: float = 0.0


@dataclass
class Faults:
    """Switchable faults; thread-safe counters are consumed one per request."""

    outage: bool = False
    outage_mode: str = "503"
    fail_remaining: int = 0
    fail_status: int = 503
    fail_body: dict[str, Any] | str | None = None
    rate_limit_remaining: int = 0
    retry_after: float | None = 1.0
    delay_remaining: int = 0
    delay_seconds: float = 0.0
    error_rate: float = 0.0  # this share of the other requests is answered error_status
    error_status: int = 503
    _rng: random.Random = field(default_factory=lambda: random.Random(7), repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def fail_next(
        self, n: int, status: int = 503, body: dict[str, Any] | str | None = None
    ) -> None:
        with self._lock:
            self.fail_remaining, self.fail_status, self.fail_body = n, status, body

    def rate_limit_next(self, n: int, retry_after: float | None = 1.0) -> None:
        with self._lock:
            self.rate_limit_remaining, self.retry_after = n, retry_after

    def delay_next(self, n: int, seconds: float) -> None:
        with self._lock:
            self.delay_remaining, self.delay_seconds = n, seconds

    def set_error_rate(self, rate: float, status: int = 503) -> None:
        with self._lock:
            self.error_rate, self.error_status = rate, status

    def set_outage(self, on: bool, mode: str = "503") -> None:
        if mode not in ("503", "reset"):
            raise ValueError(f"unknown outage mode {mode!r}")
        with self._lock:
            self.outage, self.outage_mode = on, mode

    def consume(self) -> FaultAction | None:
        """The fault for the next request, in the order outage, fail, rate limit, delay."""
        with self._lock:
            if self.outage:
                if self.outage_mode == "reset":
                    return FaultAction(Response(0, reset=True))
                return FaultAction(Response(503, _generic_error(503)))
            if self.fail_remaining > 0:
                self.fail_remaining -= 1
                body = (
                    _generic_error(self.fail_status) if self.fail_body is None else self.fail_body
                )
                return FaultAction(Response(self.fail_status, body))
            if self.rate_limit_remaining > 0:
                self.rate_limit_remaining -= 1
                headers: tuple[tuple[str, str], ...] = ()
                if self.retry_after is not None:
                    headers = (("Retry-After", str(math.ceil(self.retry_after))),)
                body = error_body("rate_limit_error", "rate_limit_exceeded", "Rate limit exceeded")
                return FaultAction(Response(429, body, headers))
            if self.delay_remaining > 0:
                self.delay_remaining -= 1
                return FaultAction(delay=self.delay_seconds)
            if self.error_rate and self._rng.random() < self.error_rate:
                return FaultAction(Response(self.error_status, _generic_error(self.error_status)))
            return None


# --------------------------------------------------------------------------- the simulator


@dataclass
class _Project:
    id: str
    token: str
    messaging_scope: bool
    messages: dict[str, SimMessage] = field(default_factory=dict)
    deleted: dict[str, SimMessage] = field(default_factory=dict)
    # (created_at, id) in order, so a listing only looks at its own time range.
    index: list[tuple[float, str]] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class _PageToken:
    offset: int
    filters: dict[str, str]
    generation: int
    project_id: str


class Simulator:
    """The message-log API's state and request handling, independent of any HTTP server."""

    def __init__(self, clock: Clock = time.time, seed: int = 0) -> None:
        self.clock = clock
        self.faults = Faults()
        # API behaviour switches; see the module docstring.
        self.next_link_keeps_filters = True
        self.token_encodes_filters = True
        self.created_after_inclusive = False
        self.created_before_inclusive = False
        self.created_after_day_precision = False  # both filters honoured only to the day
        self.max_page_size = 1000
        self.list_order = "newest"
        self.history_limit: float | None = None  # seconds of history the list can reach
        # Malformed records served on the first page of every listing of their project.
        self.invalid_records: dict[str, list[Any]] = {}
        self._repeat_next_remaining = 0
        self._reject_tokens_remaining = 0
        self._oversize_remaining = 0
        self._oversize_extra = 0
        # Counters for tests: every request received, and those addressed to each endpoint.
        self.requests_total = 0
        self.list_requests = 0
        self.get_requests = 0
        self._counter_lock = threading.Lock()
        self._lock = threading.RLock()
        self._rng = random.Random(seed)
        self._projects: dict[str, _Project] = {}
        self._generation = 0

    # ---- state

    def add_project(self, project_id: str, token: str, *, messaging_scope: bool = True) -> None:
        """Adds a project, or changes the token/scope of an existing one (keeping its messages)."""
        with self._lock:
            project = self._projects.get(project_id)
            if project is None:
                self._projects[project_id] = _Project(project_id, token, messaging_scope)
            else:
                project.token, project.messaging_scope = token, messaging_scope

    def add_message(
        self,
        project_id: str,
        *,
        direction: str,
        kind: str,
        created_at: float,
        segments: int,
        timeline: list[Step],
        id: str | None = None,
        source: str | None = None,
        from_number: str | None = None,
        to_number: str | None = None,
        appears_after: float = 0.0,
    ) -> SimMessage:
        """Adds a message; created_at is floored to whole seconds, as the API shows it."""
        with self._lock:
            project = self._projects[project_id]
            message_id = (
                id if id is not None else str(uuid.UUID(int=self._rng.getrandbits(128), version=4))
            )
            if message_id in project.messages or message_id in project.deleted:
                raise ValueError(f"duplicate message id {message_id}")
            if source is None:
                source = "realtime_api" if self._rng.random() < 0.25 else "laml"
            inbound = direction == "inbound"
            remote, own = remote_number(self._rng), self._rng.choice(OWN_NUMBERS)
            message = SimMessage(
                id=message_id,
                project_id=project_id,
                direction=direction,
                kind=kind,
                created_at=float(math.floor(created_at)),
                segments=segments,
                timeline=list(timeline),
                source=source,
                from_number=from_number or (remote if inbound else own),
                to_number=to_number or (own if inbound else remote),
                appears_after=appears_after,
            )
            project.messages[message_id] = message
            key = (message.created_at, message_id)
            if not project.index or project.index[-1] <= key:
                project.index.append(key)
            else:
                bisect.insort(project.index, key)
            return message

    def delete_message(self, project_id: str, message_id: str) -> None:
        """Removes a message from list and get (404 from then on)."""
        with self._lock:
            project = self._projects[project_id]
            message = project.messages.pop(message_id)
            project.deleted[message_id] = message
            project.index.remove((message.created_at, message_id))

    def messages(self, project_id: str, *, include_deleted: bool = False) -> list[SimMessage]:
        """All messages added to the project (also those not created yet), in insertion order."""
        with self._lock:
            project = self._projects[project_id]
            result = list(project.messages.values())
            if include_deleted:
                result.extend(project.deleted.values())
            return result

    def expected_totals(
        self,
        project_id: str,
        *,
        final_statuses: Iterable[str],
        final_statuses_by_kind: Mapping[str, Iterable[str]],
        settle_timeout: float,
        start_point: float,
        now: float | None = None,
        include_deleted: bool = False,
        by: Callable[[SimMessage], str] | None = None,
    ) -> dict[tuple[str, str, str, str], tuple[int, int, int]]:
        """Ground truth an exporter must have settled: (direction, kind, status, error_code or "")
        -> (messages, segments, charge in nano-dollars) over messages with
        start_point <= created_at <= now. With `by`, its value for each message (a country, a
        number group) takes the place of the error code."""
        now = self.clock() if now is None else now
        final = frozenset(final_statuses)
        by_kind = {kind: final | frozenset(extra) for kind, extra in final_statuses_by_kind.items()}
        sums: dict[tuple[str, str, str, str], list[int]] = {}
        for message in self.messages(project_id, include_deleted=include_deleted):
            if not start_point <= message.created_at <= now:
                continue
            step = message.settled_step(by_kind.get(message.kind, final), settle_timeout)
            fourth = step.error_code or "" if by is None else by(message)
            key = (message.direction, message.kind, step.status, fourth)
            acc = sums.setdefault(key, [0, 0, 0])
            acc[0] += 1
            acc[1] += message.segments
            acc[2] += round(step.charge * 1e9)
        return {key: (a[0], a[1], a[2]) for key, a in sums.items()}

    # ---- faults

    def fail_next(
        self, n: int, status: int = 503, body: dict[str, Any] | str | None = None
    ) -> None:
        """Answers the next n requests with `status` (body: default JSON error, or as given)."""
        self.faults.fail_next(n, status, body)

    def rate_limit_next(self, n: int, retry_after: float | None = 1.0) -> None:
        """Answers the next n requests 429; Retry-After (ceil, whole seconds) unless None."""
        self.faults.rate_limit_next(n, retry_after)

    def delay_next(self, n: int, seconds: float) -> None:
        """Waits `seconds` before answering each of the next n requests."""
        self.faults.delay_next(n, seconds)

    def set_error_rate(self, rate: float, status: int = 503) -> None:
        """Answers this share of requests (chosen at random) with `status`, until set to 0."""
        self.faults.set_error_rate(rate, status)

    def set_outage(self, on: bool, mode: str = "503") -> None:
        """While on, every request fails: mode "503", or "reset" (connection closed unanswered)."""
        self.faults.set_outage(on, mode)

    def add_invalid_record(self, project_id: str, record: Any) -> None:
        """A malformed record (missing field, wrong type...) listed on every first page."""
        with self._lock:
            self.invalid_records.setdefault(project_id, []).append(record)

    def reject_page_tokens(self, n: int) -> None:
        """The next n requests carrying a page token are answered 422 page_token_is_invalid."""
        with self._lock:
            self._reject_tokens_remaining = n

    def repeat_next_link(self, n: int) -> None:
        """The next n listing pages that have a next page point links.next at themselves."""
        with self._lock:
            self._repeat_next_remaining = n

    def oversize_pages(self, n: int, extra: int) -> None:
        """The next n listing pages carry `extra` records more than page_size asked for."""
        with self._lock:
            self._oversize_remaining, self._oversize_extra = n, extra

    def invalidate_page_tokens(self) -> None:
        """Page tokens issued so far are answered 422 page_token_is_invalid."""
        with self._lock:
            self._generation += 1

    # ---- HTTP

    def handle(
        self,
        method: str,
        target: str,
        authorization: str | None,
        *,
        base_url: str = "",
        sleep: Callable[[float], object] = time.sleep,
    ) -> Response:
        """Answers one request; `target` is the path with its query string."""
        parts = urlsplit(target)
        path = parts.path
        is_get = method == "GET"
        with self._counter_lock:
            self.requests_total += 1
            if is_get and path == LIST_PATH:
                self.list_requests += 1
            elif is_get and path.startswith(LIST_PATH + "/"):
                self.get_requests += 1
        fault = self.faults.consume()
        if fault is not None:
            if fault.response is not None:
                return fault.response
            sleep(fault.delay)
        if not is_get or not (path == LIST_PATH or path.startswith(LIST_PATH + "/")):
            return Response(404, error_body("not_found", "not_found", "Not Found"))
        project, denied = self._authenticate(authorization)
        if project is None:
            return denied or Response(401)
        now = self.clock()
        if path == LIST_PATH:
            return self._list(project, parse_qs(parts.query, keep_blank_values=True), base_url, now)
        return self._get(project, unquote(path[len(LIST_PATH) + 1 :]), base_url, now)

    def _authenticate(self, authorization: str | None) -> tuple[_Project | None, Response | None]:
        unauthorized = Response(
            401,
            error_body("authentication_error", "unauthorized", "Unauthorized"),
            (("WWW-Authenticate", 'Basic realm="SignalWire"'),),
        )
        scheme, _, encoded = (authorization or "").partition(" ")
        if scheme.lower() != "basic":
            return None, unauthorized
        try:
            user, sep, password = base64.b64decode(encoded, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return None, unauthorized
        with self._lock:
            project = self._projects.get(user)
        if (
            not sep
            or project is None
            or not hmac.compare_digest(project.token.encode(), password.encode())
        ):
            return None, unauthorized
        if not project.messaging_scope:
            return None, Response(403, error_body("authorization_error", "forbidden", "Forbidden"))
        return project, None

    def _get(self, project: _Project, message_id: str, base_url: str, now: float) -> Response:
        with self._lock:
            message = project.messages.get(message_id)
        if message is None or message.appears_at > now:
            return Response(404, error_body("not_found", "not_found", "Not Found"))
        return Response(200, message.to_json(now, base_url))

    def _list(
        self, project: _Project, query: dict[str, list[str]], base_url: str, now: float
    ) -> Response:
        def param(name: str) -> str | None:
            values = query.get(name)
            return values[-1] if values else None  # the last of repeated parameters wins

        errors: list[dict[str, Any]] = []
        page_size = _parse_int(
            param("page_size"), "page_size", DEFAULT_PAGE_SIZE, 1, self.max_page_size, errors
        )
        page_number = _parse_int(param("page_number"), "page_number", 0, 0, None, errors)
        query_filters = {name: v for name in FILTER_NAMES if (v := param(name)) is not None}
        if errors:
            return Response(422, {"errors": errors})
        raw_token = param("page_token")
        token = self._page_token(project, raw_token, page_number * page_size)
        if isinstance(token, Response):
            return token
        # The query's filters replace those a token remembers; without any, the token's apply.
        filters = query_filters or (token.filters if token is not None else {})
        filtered = self._filter(filters, now, errors)
        if filtered is None:
            return Response(422, {"errors": errors})
        records = self._listed(project, *filtered, now)
        offset = page_number * page_size
        with self._lock:
            extra = 0
            if self._oversize_remaining > 0:
                self._oversize_remaining -= 1
                extra = self._oversize_extra
            repeat = self._repeat_next_remaining > 0 and offset + page_size < len(records)
            if repeat:
                self._repeat_next_remaining -= 1
            invalid = list(self.invalid_records.get(project.id, ())) if offset == 0 else []
        page = records[offset : offset + page_size + extra]

        links = self._links(
            project, base_url, filters, page_number, page_size, raw_token, len(records)
        )
        if repeat:
            links["next"] = links["self"]
        data = [m.to_json(now, base_url) for m in page] + invalid
        return Response(200, {"links": links, "data": data})

    def _page_token(
        self, project: _Project, raw_token: str | None, offset: int
    ) -> _PageToken | Response | None:
        """The query's page token (None without one), or the 422 that refuses it."""
        if raw_token is None:
            if offset > 0:
                return _validation_error(
                    "page_token_required", "Page token is required", "page_token"
                )
            return None
        with self._lock:
            rejected = self._reject_tokens_remaining > 0
            if rejected:
                self._reject_tokens_remaining -= 1
        token = None if rejected else self._decode_token(raw_token)
        if token is None or token.project_id != project.id or token.offset != offset:
            return _validation_error("page_token_is_invalid", "Page token is invalid", "page_token")
        return token

    def _listed(
        self,
        project: _Project,
        accept: Callable[[float], bool],
        low: float,
        high: float,
        now: float,
    ) -> list[SimMessage]:
        """The messages the filters accept, visible at `now`, in the listing's order."""
        with self._lock:
            index = project.index
            first = bisect.bisect_left(index, (low, ""))
            last = bisect.bisect_right(index, (min(high, now), "\uffff"))
            records = [
                message
                for created, i in index[first:last]
                if created <= now
                and accept(created)
                and (message := project.messages[i]).appears_at <= now
            ]
        # The index is in (created_at, id) order already.
        if self.list_order == "arbitrary":
            records.sort(key=lambda m: hashlib.sha256(m.id.encode()).digest())
        elif self.list_order != "oldest":
            records.reverse()
        return records

    def _links(
        self,
        project: _Project,
        base_url: str,
        filters: Mapping[str, str],
        page_number: int,
        page_size: int,
        raw_token: str | None,
        total: int,
    ) -> dict[str, str]:
        """The page's self, first, next and prev links, as SignalWire writes them."""

        def link(number: int | None, keep_filters: bool, token_offset: int | None) -> str:
            params: list[tuple[str, str]] = []
            if number is not None:
                params.append(("page_number", str(number)))
            params.append(("page_size", str(page_size)))
            if keep_filters:
                params.extend(filters.items())
            if token_offset is not None:
                params.append(("page_token", self._encode_token(token_offset, filters, project.id)))
            return f"{base_url}{LIST_PATH}?{urlencode(params)}"

        self_params: list[tuple[str, str]] = [
            ("page_number", str(page_number)),
            ("page_size", str(page_size)),
            *filters.items(),
        ]
        if raw_token is not None:
            self_params.append(("page_token", raw_token))
        links = {
            "self": f"{base_url}{LIST_PATH}?{urlencode(self_params)}",
            "first": link(None, True, None),
        }
        keep = self.next_link_keeps_filters
        offset = page_number * page_size
        if offset + page_size < total:
            links["next"] = link(page_number + 1, keep, offset + page_size)
        if page_number > 0:
            links["prev"] = link(page_number - 1, keep, offset - page_size)
        return links

    def _bounds(
        self, filters: Mapping[str, str], errors: list[dict[str, Any]]
    ) -> tuple[float | None, float | None, float | None]:
        """created_after, created_before and the start of created_on's day, as honoured (None
        when not given or not valid: the 422 errors are appended)."""
        lower: float | None = None
        upper: float | None = None
        for name in ("created_after", "created_before"):
            if name not in filters:
                continue
            parsed = parse_timestamp(filters[name])
            if parsed is None:
                errors.append(
                    _error_item("datetime_required", "This value must be a DateTime", name)
                )
                continue
            bound = parsed[0]
            if self.created_after_day_precision:
                bound -= bound % DAY  # only the date part is honoured
            if name == "created_after":
                lower = bound
            else:
                upper = bound
        on_start: float | None = None
        if "created_on" in filters:
            parsed = parse_timestamp(filters["created_on"])
            if parsed is None or not parsed[1]:
                errors.append(
                    _error_item("date_required", "This value must be a Date", "created_on")
                )
            else:
                on_start = parsed[0]
        return lower, upper, on_start

    def _filter(
        self, filters: Mapping[str, str], now: float, errors: list[dict[str, Any]]
    ) -> tuple[Callable[[float], bool], float, float] | None:
        """A predicate on created_at for the filters with the range it can accept, or None after
        appending the 422 errors."""
        inclusive = self.created_after_inclusive
        before_inclusive = self.created_before_inclusive
        lower, upper, on_start = self._bounds(filters, errors)
        if errors:
            return None
        if self.history_limit is not None:
            oldest = now - self.history_limit
            if (lower is not None and lower < oldest) or (
                on_start is not None and on_start + DAY <= oldest
            ):
                attribute = "created_after" if lower is not None else "created_on"
                errors.append(
                    _error_item(
                        "exceeds_history_logs_limit",
                        "The requested period exceeds the history logs limit",
                        attribute,
                    )
                )
                return None
            lower_hist = oldest
        else:
            lower_hist = -math.inf

        def accept(created_at: float) -> bool:
            if created_at < lower_hist:
                return False
            if lower is not None and (created_at < lower if inclusive else created_at <= lower):
                return False
            if upper is not None and (
                created_at > upper if before_inclusive else created_at >= upper
            ):
                return False
            return on_start is None or on_start <= created_at < on_start + DAY

        low = max(lower_hist, -math.inf if lower is None else lower)
        high = math.inf if upper is None else upper
        if on_start is not None:
            low, high = max(low, on_start), min(high, on_start + DAY)
        return accept, low, high

    def _encode_token(self, offset: int, filters: Mapping[str, str], project_id: str) -> str:
        payload: dict[str, Any] = {"o": offset, "g": self._generation, "p": project_id}
        if self.token_encodes_filters and filters:
            payload["f"] = dict(filters)
        raw = json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()
        return "PA" + base64.urlsafe_b64encode(raw).decode().rstrip("=")

    def _decode_token(self, token: str) -> _PageToken | None:
        """The token's content, or None when it is malformed or from before an invalidation."""
        if not token.startswith("PA"):
            return None
        encoded = token[2:]
        try:
            payload = json.loads(base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)))
        except (binascii.Error, ValueError):
            return None
        if not isinstance(payload, dict):
            return None
        offset, generation = payload.get("o"), payload.get("g")
        project_id, filters = payload.get("p"), payload.get("f", {})
        if (
            not isinstance(offset, int)
            or not isinstance(generation, int)
            or not isinstance(project_id, str)
            or not isinstance(filters, dict)
            or not all(isinstance(k, str) and isinstance(v, str) for k, v in filters.items())
            or generation != self._generation
        ):
            return None
        return _PageToken(offset, cast(dict[str, str], filters), generation, project_id)


def _error_item(code: str, message: str, attribute: str | None) -> dict[str, Any]:
    return cast(
        dict[str, Any], error_body("validation_error", code, message, attribute)["errors"][0]
    )


def _validation_error(code: str, message: str, attribute: str | None) -> Response:
    return Response(422, {"errors": [_error_item(code, message, attribute)]})


def _parse_int(
    value: str | None,
    name: str,
    default: int,
    low: int,
    high: int | None,
    errors: list[dict[str, Any]],
) -> int:
    """The parameter as an int in [low, high]; appends a 422 error item when it is not."""
    if value is None:
        return default
    try:
        number = int(value)
    except ValueError:
        number = None
    if number is None or number < low or (high is not None and number > high):
        limit = f"between {low} and {high}" if high is not None else f"at least {low}"
        errors.append(
            _error_item("invalid_parameter", f"This value must be an integer {limit}", name)
        )
        return default
    return number


# --------------------------------------------------------------------------- HTTP server


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], simulator: Simulator) -> None:
        self.simulator = simulator
        self.base_url = ""
        self.stopping = threading.Event()
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().__init__(address, _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that gave up (timeout, reset) is business as usual, not a traceback."""
        error = sys.exc_info()[1]
        if not isinstance(error, ConnectionError | TimeoutError):
            super().handle_error(request, client_address)

    def server_bind(self) -> None:
        # HTTPServer.server_bind does a reverse DNS lookup that can stall; it is not needed here.
        socketserver.TCPServer.server_bind(self)
        host, port = self.socket.getsockname()[:2]
        self.server_name, self.server_port = str(host), int(port)

    def track(self, connection: socket.socket, open_: bool) -> None:
        with self._connections_lock:
            if open_:
                self._connections.add(connection)
            else:
                self._connections.discard(connection)

    def close_connections(self) -> None:
        """Ends kept-alive connections, whose handler threads would otherwise go on serving."""
        with self._connections_lock:
            connections = list(self._connections)
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "SignalWireSimulator/1.0"
    sys_version = ""
    disable_nagle_algorithm = True  # headers and body go out in separate writes

    def _sim_server(self) -> _HTTPServer:
        return cast(_HTTPServer, self.server)

    def setup(self) -> None:
        super().setup()
        self._sim_server().track(self.connection, True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self._sim_server().track(self.connection, False)

    def log_message(self, format: str, *args: Any) -> None:
        return  # keep test output quiet

    def date_time_string(self, timestamp: float | None = None) -> str:
        # The Date header follows the simulated clock, as a real server's follows its own.
        when = self._sim_server().simulator.clock() if timestamp is None else timestamp
        return email.utils.formatdate(when, usegmt=True)

    def do_GET(self) -> None:
        self._serve()

    do_POST = do_PUT = do_PATCH = do_DELETE = do_GET

    def _serve(self) -> None:
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = 0
        if length > 0:
            self.rfile.read(length)  # keep the kept-alive connection in sync
        server = self._sim_server()
        response = server.simulator.handle(
            self.command,
            self.path,
            self.headers.get("Authorization"),
            base_url=server.base_url,
            sleep=server.stopping.wait,
        )
        if response.reset:
            # Linger 0 makes close() send RST: the client sees a reset, not an answer.
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True
            return
        if isinstance(response.body, str):
            payload, content_type = response.body.encode(), "text/html; charset=utf-8"
        else:
            payload, content_type = json.dumps(response.body).encode(), "application/json"
        self.send_response(response.status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        for name, value in response.headers:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(payload)


class SimulatorAdapter(requests.adapters.BaseAdapter):
    """Serves a requests Session from a Simulator in-process, without sockets: the real client
    code, minus the network, for benchmarks that run a day in minutes. Mount it on the base URL:
    `session.mount("http://simulator", SimulatorAdapter(simulator, "http://simulator"))`."""

    def __init__(self, simulator: Simulator, base_url: str) -> None:
        super().__init__()
        self.simulator = simulator
        self.base_url = base_url.rstrip("/")

    def send(
        self, request: requests.PreparedRequest, *args: Any, **kwargs: Any
    ) -> requests.Response:
        parts = urlsplit(request.url or "")
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        answer = self.simulator.handle(
            request.method or "GET",
            target,
            request.headers.get("Authorization"),
            base_url=self.base_url,
        )
        if answer.reset:
            raise requests.ConnectionError("connection reset by the simulator")
        if isinstance(answer.body, str):
            payload, content_type = answer.body.encode(), "text/html; charset=utf-8"
        else:
            payload, content_type = json.dumps(answer.body).encode(), "application/json"
        response = requests.Response()
        response.status_code = answer.status
        response.reason = HTTPStatus(answer.status).phrase if answer.status else ""
        response.headers = requests.structures.CaseInsensitiveDict(
            {
                "Content-Type": content_type,
                "Content-Length": str(len(payload)),
                "Date": email.utils.formatdate(self.simulator.clock(), usegmt=True),
                **dict(answer.headers),
            }
        )
        response.raw = io.BytesIO(payload)
        response.url = request.url or ""
        response.request = request
        response.encoding = "utf-8"
        return response

    def close(self) -> None:
        pass


class SimulatorServer:
    """A real HTTP server on 127.0.0.1 serving a Simulator (ThreadingHTTPServer, daemon threads)."""

    def __init__(self, simulator: Simulator, host: str = "127.0.0.1", port: int = 0) -> None:
        self.simulator = simulator
        self.host = host
        self.port = port
        self.base_url = ""
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> str:
        """Serves in a daemon thread; returns the base URL (no trailing slash)."""
        if self._httpd is not None:
            raise RuntimeError("already started")
        httpd = _HTTPServer((self.host, self.port), self.simulator)
        self.base_url = httpd.base_url = f"http://{self.host}:{httpd.server_port}"
        self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="signalwire-simulator",
            daemon=True,
        )
        self._thread.start()
        return self.base_url

    def stop(self) -> None:
        """Stops serving, ends open connections and wakes delayed requests."""
        httpd, thread = self._httpd, self._thread
        if httpd is None or thread is None:
            return
        httpd.stopping.set()
        httpd.shutdown()
        httpd.close_connections()
        httpd.server_close()
        thread.join()
        self._httpd = self._thread = None

    def __enter__(self) -> SimulatorServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


# --------------------------------------------------------------------------- synthetic traffic


@dataclass(frozen=True)
class TrafficProfile:
    """Mix of synthetic traffic. Fractions of messages; delays in seconds after creation."""

    inbound: float = 0.2
    mms: float = 0.15  # share of outbound that is MMS (MMS: queued -> sent, stays sent forever)
    undelivered: float = 0.05  # outbound SMS ending undelivered (30003, 30005, 30006, 30007)
    failed: float = 0.04  # outbound SMS ending failed (21610, 21601)
    never_receipted: float = 0.05  # outbound SMS that stay `sent` forever
    max_delay: float = 3.0  # every transition happens within this many seconds of creation
    # Share of undelivered/failed that carry an error_message but no error_code (seen on Relay).
    missing_error_code: float = 0.0
    # Share of messages the log shows late: each appears up to `max_lateness` seconds after its
    # created_at (uniformly); the others at once.
    late: float = 0.0
    max_lateness: float = 0.0
    # remaining outbound SMS: delivered

    def __post_init__(self) -> None:
        shares = (self.inbound, self.mms, self.undelivered, self.failed, self.never_receipted)
        if any(not 0 <= s <= 1 for s in (*shares, self.missing_error_code, self.late)):
            raise ValueError("fractions must be within [0, 1]")
        if self.undelivered + self.failed + self.never_receipted > 1:
            raise ValueError("undelivered + failed + never_receipted must not exceed 1")
        if self.max_delay <= 0:
            raise ValueError("max_delay must be positive")
        if self.max_lateness < 0:
            raise ValueError("max_lateness must not be negative")


DEFAULT_PROFILE = TrafficProfile()
SMS_PRICE = 0.00415  # US dollars per segment
MMS_PRICE = 0.015
UNDELIVERED_CODES = ("30003", "30005", "30006", "30007")
FAILED_CODES = ("21610", "21601")


def random_message_args(rng: random.Random, profile: TrafficProfile) -> dict[str, Any]:
    """kwargs for Simulator.add_message except project_id and created_at."""
    times = sorted(rng.uniform(0, profile.max_delay) for _ in range(3))
    kind = "mms" if rng.random() < profile.mms else "sms"
    segments = 1 if kind == "mms" else rng.choices((1, 2, 3), weights=(80, 15, 5))[0]
    charge = round(segments * (MMS_PRICE if kind == "mms" else SMS_PRICE), 6)
    late = {}
    if profile.late and rng.random() < profile.late:
        late["appears_after"] = rng.uniform(0, profile.max_lateness)

    if rng.random() < profile.inbound:
        return {
            "direction": "inbound",
            "kind": kind,
            "segments": segments,
            "timeline": [Step(0, "received", charge=charge)],
            **late,
        }
    direction = rng.choices(
        ("outbound-api", "outbound-reply", "outbound", "outbound-call"), weights=(75, 15, 5, 5)
    )[0]
    queued = Step(0, "queued")
    initiated = Step(times[0], "initiated")
    sent = Step(times[1], "sent", charge=charge)
    if kind == "mms":
        timeline = [queued, Step(times[1], "sent", charge=charge)]
    else:
        r = rng.random()
        if r < profile.undelivered:
            code = rng.choice(UNDELIVERED_CODES)
            final = _error_step(rng, profile, times[2], "undelivered", code, charge)
            timeline = [queued, initiated, sent, final]
        elif r < profile.undelivered + profile.failed:
            code = rng.choice(FAILED_CODES)
            timeline = [queued, _error_step(rng, profile, times[0], "failed", code, 0.0)]
        elif r < profile.undelivered + profile.failed + profile.never_receipted:
            timeline = [queued, initiated, sent]
        else:
            timeline = [queued, initiated, sent, Step(times[2], "delivered", charge=charge)]
    return {
        "direction": direction,
        "kind": kind,
        "segments": segments,
        "timeline": timeline,
        **late,
    }


def _error_step(
    rng: random.Random, profile: TrafficProfile, at: float, status: str, code: str, charge: float
) -> Step:
    error_code = None if rng.random() < profile.missing_error_code else code
    return Step(at, status, error_code, _ERROR_MESSAGES[code], charge)


class TrafficGenerator:
    """Adds messages to a project at `rate` per second from a background thread, with
    created_at = clock() (whole seconds)."""

    def __init__(
        self,
        simulator: Simulator,
        project_id: str,
        rate: float,
        profile: TrafficProfile = DEFAULT_PROFILE,
        seed: int = 0,
    ) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.simulator = simulator
        self.project_id = project_id
        self.rate = rate
        self.profile = profile
        self.created = 0
        self._rng = random.Random(seed)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("already started")
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="traffic-generator", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Joins the thread: no message is added after this returns."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        interval = 1.0 / self.rate
        due = time.monotonic()
        while not self._stop.is_set():
            args = random_message_args(self._rng, self.profile)
            self.simulator.add_message(
                self.project_id, created_at=math.floor(self.simulator.clock()), **args
            )
            self.created += 1
            due += interval
            wait = due - time.monotonic()
            if wait < -1.0:
                due = time.monotonic()  # fell behind: carry on at the rate instead of bursting
            elif wait > 0 and self._stop.wait(wait):
                return
