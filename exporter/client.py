"""SignalWire's message-log API over HTTP: listing with its cursor, get by id, retries.

One `Client` per project holds one pooled `requests.Session`. Every request is reported to
`on_request(code)` (the HTTP status, or "error" for timeouts and connection failures) so the
exporter can count it. Retries use exponential backoff with full jitter on 5xx, timeouts and
connection errors, and honour `Retry-After` on 429; 401/403 are never retried: hammering with bad
credentials helps nobody, so the poller backs off instead.
"""

from __future__ import annotations

import email.utils
import json
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import requests
from requests.adapters import HTTPAdapter

from exporter import __version__
from exporter.records import format_timestamp

LOGS_PATH = "/api/messaging/logs"
MAX_BODY_BYTES = 64 * 1024 * 1024
MAX_PAGES_PER_LISTING = 100_000


class ApiError(Exception):
    """A request that failed for good. `status` is the HTTP status, or None for transport errors."""

    def __init__(self, message: str, status: int | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code  # SignalWire's error code, e.g. page_token_is_invalid


class AuthError(ApiError):
    """401/403: the project id or token is wrong, or the token lacks the Messaging scope."""


class Stopped(Exception):
    """The exporter is shutting down: abandon the current poll."""


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    attempts: int = 5
    base_delay: float = 0.5
    max_delay: float = 30.0
    max_retry_after: float = 120.0

    def backoff(self, attempt: int, rng: random.Random) -> float:
        """Full jitter: uniform in [0, min(max, base * 2**attempt)]."""
        return rng.uniform(0, min(self.max_delay, self.base_delay * 2**attempt))


@dataclass(frozen=True, slots=True)
class Page:
    records: list[Any]
    server_time: float | None  # the response's Date header, when present


def _error_detail(response: requests.Response) -> tuple[str, str | None]:
    """SignalWire's own words for an error: (message, code)."""
    try:
        body = response.json()
    except ValueError:
        return response.reason or f"HTTP {response.status_code}", None
    if isinstance(body, dict):
        errors = body.get("errors")
        if isinstance(errors, list) and errors and isinstance(errors[0], dict):
            first = errors[0]
            code = first.get("code")
            message = first.get("message") or code or response.reason
            attribute = first.get("attribute")
            text = f"{message} ({attribute})" if attribute else str(message)
            return text[:300], str(code) if code else None
        if isinstance(body.get("error"), str):
            return body["error"][:300], None
    return response.reason or f"HTTP {response.status_code}", None


def _retry_after(response: requests.Response) -> float | None:
    value = response.headers.get("Retry-After")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        moment = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, moment.timestamp() - time.time())


class Client:
    def __init__(
        self,
        base_url: str,
        project_id: str,
        token: str,
        *,
        timeout: float,
        page_size: int,
        on_request: Callable[[str], None] = lambda code: None,
        retry: RetryPolicy = RetryPolicy(),
        stop: threading.Event | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.project_id = project_id
        self.timeout = timeout
        self.page_size = page_size
        self.on_request = on_request
        self.retry = retry
        self.stop = stop or threading.Event()
        self.rng = rng or random.Random()
        self.session = requests.Session()
        self.session.headers["User-Agent"] = f"signalwire-exporter/{__version__}"
        self.session.headers["Accept"] = "application/json"
        self.session.mount("https://", HTTPAdapter(pool_connections=1, pool_maxsize=4))
        self.session.mount("http://", HTTPAdapter(pool_connections=1, pool_maxsize=4))
        self.set_token(token)

    def set_token(self, token: str) -> None:
        self.session.auth = (self.project_id, token)

    def close(self) -> None:
        self.session.close()

    # ----------------------------------------------------------------- requests
    def _wait(self, seconds: float) -> None:
        if self.stop.wait(seconds):
            raise Stopped()

    def _get_once(self, url: str) -> tuple[requests.Response, bytes]:
        """One GET with a bound on the whole exchange, not just on each socket read."""
        deadline = time.monotonic() + self.timeout
        with self.session.get(url, timeout=self.timeout, stream=True) as response:
            chunks: list[bytes] = []
            size = 0
            for chunk in response.iter_content(chunk_size=65536):
                chunks.append(chunk)
                size += len(chunk)
                if size > MAX_BODY_BYTES:
                    raise ApiError(f"response larger than {MAX_BODY_BYTES} bytes", None)
                if time.monotonic() > deadline:
                    raise requests.Timeout(f"response not complete within {self.timeout}s")
            return response, b"".join(chunks)

    def request(self, url: str) -> tuple[requests.Response, dict[str, Any] | None]:
        """GET with retries: the response and its JSON object (None for a 404).

        Raises ApiError when retries are exhausted or the error is not worth retrying. A 200 whose
        body is not a JSON object (an HTML error page, a truncated body) is retried like a 5xx.
        """
        attempt = 0
        while True:
            if self.stop.is_set():
                raise Stopped()
            try:
                response, body = self._get_once(url)
            except (requests.Timeout, requests.ConnectionError) as exc:
                self.on_request("error")
                kind = "timeout" if isinstance(exc, requests.Timeout) else "connection failed"
                failure = ApiError(f"{kind}: {_describe(exc)}", None)
                delay = self.retry.backoff(attempt, self.rng)
            except requests.RequestException as exc:
                self.on_request("error")
                raise ApiError(f"request failed: {_describe(exc)}", None) from None
            else:
                status = response.status_code
                self.on_request(str(status))
                if status == 404:
                    return response, None
                if 200 <= status < 300:
                    try:
                        return response, _decode(body)
                    except ApiError as exc:
                        failure = exc
                        delay = self.retry.backoff(attempt, self.rng)
                        attempt += 1
                        if attempt >= self.retry.attempts:
                            raise
                        self._wait(delay)
                        continue
                message, code = _error_detail(response)
                if status in (401, 403):
                    raise AuthError(f"{status} {message}", status, code)
                failure = ApiError(f"{status} {message}", status, code)
                if status == 429:
                    after = _retry_after(response)
                    delay = (
                        min(after, self.retry.max_retry_after)
                        if after is not None
                        else self.retry.backoff(attempt + 1, self.rng)
                    )
                elif status >= 500:
                    delay = self.retry.backoff(attempt, self.rng)
                else:
                    raise failure
            attempt += 1
            if attempt >= self.retry.attempts:
                raise failure
            self._wait(delay)

    # ----------------------------------------------------------------- the API
    def list_url(self, created_after: float | None, page_size: int | None = None) -> str:
        params = {"page_size": str(page_size or self.page_size)}
        if created_after is not None:
            params["created_after"] = format_timestamp(created_after)
        return f"{self.base_url}{LOGS_PATH}?{urlencode(params)}"

    def list_pages(self, created_after: float | None) -> Iterator[Page]:
        """Every page of the listing of messages created after `created_after`.

        Follows `links.next` as given, putting our filters back when the link leaves them out,
        refusing links to another host, and stopping (with an error) if a link repeats.
        """
        first = self.list_url(created_after)
        filters = dict(parse_qsl(urlsplit(first).query))
        filters.pop("page_size", None)
        url: str | None = first
        seen: set[str] = set()
        while url is not None:
            if url in seen:
                raise ApiError(f"links.next repeats an earlier page ({_redact_url(url)})", None)
            if len(seen) >= MAX_PAGES_PER_LISTING:
                raise ApiError(f"listing exceeds {MAX_PAGES_PER_LISTING} pages", None)
            seen.add(url)
            response, payload = self.request(url)
            if payload is None:
                raise ApiError(f"404 {LOGS_PATH} not found: is the space right?", 404)
            data = payload.get("data")
            if not isinstance(data, list):
                raise ApiError("response has no 'data' list", response.status_code)
            yield Page(data, _server_time(response))
            url = self._next_url(payload, filters)

    def _next_url(self, payload: dict[str, Any], filters: dict[str, str]) -> str | None:
        links = payload.get("links")
        next_link = links.get("next") if isinstance(links, dict) else None
        if not next_link:
            return None
        if not isinstance(next_link, str):
            raise ApiError("links.next is not a string", None)
        parts = urlsplit(next_link)
        base = urlsplit(self.base_url)
        if parts.netloc and (parts.scheme, parts.netloc) != (base.scheme, base.netloc):
            raise ApiError(f"links.next points to another host: {parts.netloc}", None)
        query = dict(parse_qsl(parts.query, keep_blank_values=True))
        missing = {k: v for k, v in filters.items() if k not in query}
        if not missing and parts.netloc:
            return next_link
        query.update(missing)
        path = parts.path or LOGS_PATH
        return urlunsplit((base.scheme, base.netloc, path, urlencode(query), ""))

    def get_message(self, message_id: str) -> Any | None:
        """One message log by id; None when SignalWire answers 404 (the record is gone)."""
        url = f"{self.base_url}{LOGS_PATH}/{quote(message_id, safe='')}"
        _, payload = self.request(url)
        if payload is None:
            return None
        if isinstance(payload.get("data"), dict):  # tolerate a wrapped answer
            return payload["data"]
        return payload


def _decode(body: bytes) -> dict[str, Any]:
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        start = body[:60].decode("utf-8", "replace").strip()
        raise ApiError(f"response is not JSON (starts with {start!r})", None) from None
    if not isinstance(payload, dict):
        raise ApiError(f"response is a JSON {type(payload).__name__}, not an object", None)
    return payload


def _server_time(response: requests.Response) -> float | None:
    value = response.headers.get("Date")
    if not value:
        return None
    try:
        return email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        return None


def _describe(exc: Exception) -> str:
    """An exception's text without anything that could carry a credential."""
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:200]


def _redact_url(url: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.hostname or "", parts.path, "", ""))
