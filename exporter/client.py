"""SignalWire's message-log API over HTTP: listing with its cursor, get by id, retries.

One `Client` per project holds one pooled `requests.Session`. Every request is reported to
`on_request(code)` exactly once (the HTTP status, or "error" for timeouts and connection failures,
a body cut off half way included) so the exporter can count it. Retries use exponential backoff
with full jitter on 5xx, timeouts, connection errors and 200s whose body is not JSON, and honour
`Retry-After` on 429; 401/403 are never retried: hammering with bad credentials helps nobody, so
the poller backs off instead. Other 4xx (422: SignalWire's `code` says why) are not retried either.
Error texts never carry the token, even when a server echoes it.
"""

from __future__ import annotations

import base64
import email.utils
import json
import math
import random
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode, urljoin, urlsplit, urlunsplit

import requests
from requests.adapters import BaseAdapter, HTTPAdapter

from exporter import __version__
from exporter.config import Config, ProjectConfig
from exporter.logs import Secrets
from exporter.records import format_timestamp

LOGS_PATH = "/api/messaging/logs"
MAX_BODY_BYTES = 64 * 1024 * 1024
MAX_PAGES_PER_LISTING = 100_000
HISTORY_LIMIT_CODE = "exceeds_history_logs_limit"
PAGE_TOKEN_ERRORS = ("page_token_is_invalid", "page_token_required")
MAX_RESTARTS = 3


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


def _error_detail(response: requests.Response, body: bytes) -> tuple[str, str | None]:
    """SignalWire's own words for an error: (message, code)."""
    fallback = response.reason or f"HTTP {response.status_code}"
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return fallback, None
    if isinstance(payload, dict):
        errors = payload.get("errors")
        if isinstance(errors, list) and errors and isinstance(errors[0], dict):
            first = errors[0]
            code = first.get("code")
            message = first.get("message") or code or fallback
            attribute = first.get("attribute")
            text = f"{message} ({attribute})" if attribute else str(message)
            return text[:300], str(code)[:100] if code else None
        if isinstance(payload.get("error"), str):
            return payload["error"][:300], None
    return fallback, None


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


@dataclass(frozen=True, slots=True)
class _Retry:
    """An attempt that failed in a way worth another try: the error to raise if none is left."""

    failure: ApiError
    delay: float


class _BodyTooLarge(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


# Failures of the exchange itself, before or during the body: worth another try.
_TRANSPORT_ERRORS = (
    requests.Timeout,
    requests.ConnectionError,
    requests.exceptions.ChunkedEncodingError,
    requests.exceptions.ContentDecodingError,
)


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
        adapter: BaseAdapter | None = None,
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
        if adapter is not None:  # another transport for this API (the simulator's, in-process)
            self.session.mount(self.base_url, adapter)
        self.set_token(token)

    @classmethod
    def for_project(
        cls,
        project: ProjectConfig,
        config: Config,
        *,
        page_size: int | None = None,
        on_request: Callable[[str], None] = lambda code: None,
        retry: RetryPolicy = RetryPolicy(),
        stop: threading.Event | None = None,
        adapter: BaseAdapter | None = None,
    ) -> Client:
        """The client of a configured project: its space, credentials, timeout and page size."""
        return cls(
            project.base_url,
            project.project_id,
            project.api_token,
            timeout=config.request_timeout,
            page_size=config.page_size if page_size is None else page_size,
            on_request=on_request,
            retry=retry,
            stop=stop,
            adapter=adapter,
        )

    def set_token(self, token: str) -> None:
        self.session.auth = (self.project_id, token)
        basic = base64.b64encode(f"{self.project_id}:{token}".encode()).decode()
        self._secrets = Secrets(basic, token)

    def close(self) -> None:
        self.session.close()

    # ----------------------------------------------------------------- requests
    def _wait(self, seconds: float) -> None:
        if self.stop.wait(seconds):
            raise Stopped()

    def _get_once(self, url: str) -> tuple[requests.Response, bytes]:
        """One GET with a bound on the whole exchange, not just on each socket read."""
        deadline = time.monotonic() + self.timeout
        # Redirects are not followed: each hop would be an uncounted request carrying the
        # credentials; a space that redirects is reported so that its URL gets fixed.
        with self.session.get(
            url, timeout=self.timeout, stream=True, allow_redirects=False
        ) as response:
            chunks: list[bytes] = []
            size = 0
            for chunk in response.iter_content(chunk_size=65536):
                chunks.append(chunk)
                size += len(chunk)
                if size > MAX_BODY_BYTES:
                    raise _BodyTooLarge(response.status_code)
                if time.monotonic() > deadline:
                    raise requests.Timeout(f"no complete response within {self.timeout:g}s")
            return response, b"".join(chunks)

    def request(self, url: str) -> tuple[requests.Response, dict[str, Any] | None]:
        """GET with retries: the response and its JSON object (None for a 404).

        Every attempt is reported to `on_request` exactly once. Raises ApiError when retries are
        exhausted or the error is not worth retrying (AuthError for 401/403). A 200 whose body is
        not a JSON object (an HTML error page, a truncated body) is retried like a 5xx.
        """
        attempt = 0
        while True:
            if self.stop.is_set():
                raise Stopped()
            outcome = self._attempt(url, attempt)
            if not isinstance(outcome, _Retry):
                return outcome
            attempt += 1
            if attempt >= self.retry.attempts:
                raise outcome.failure
            self._wait(outcome.delay)

    def _attempt(
        self, url: str, attempt: int
    ) -> tuple[requests.Response, dict[str, Any] | None] | _Retry:
        """One request: its result, a _Retry, or an ApiError for a failure not worth retrying."""
        try:
            response, body = self._get_once(url)
        except _TRANSPORT_ERRORS as exc:
            self.on_request("error")
            return _Retry(
                self._error(_describe_transport(exc, self.timeout)), self._backoff(attempt)
            )
        except _BodyTooLarge as exc:
            self.on_request(str(exc.status))
            raise self._error(
                f"{exc.status} response larger than {MAX_BODY_BYTES} bytes", exc.status
            ) from None
        except requests.RequestException as exc:
            self.on_request("error")
            raise self._error(f"request failed: {_describe(exc)}") from None
        status = response.status_code
        self.on_request(str(status))
        if status == 404:
            return response, None
        if 200 <= status < 300:
            try:
                return response, _decode(body)
            except ValueError as exc:
                return _Retry(self._error(f"{status} {exc}", status), self._backoff(attempt))
        message, code = _error_detail(response, body)
        if status in (401, 403):
            meaning = (
                "invalid credentials (project id or API token)"
                if status == 401
                else "forbidden (does the API token have the Messaging scope?)"
            )
            raise self._error(f"{status} {meaning}: {message}", status, code, AuthError)
        if 300 <= status < 400:
            location = _redact_url(urljoin(url, response.headers.get("Location", "")))
            message = f"{message}: redirected to {location}; set the project's space to that URL"
        failure = self._error(f"{status} {message}", status, code)
        if status == 429:
            after = _retry_after(response)
            if after is None:
                return _Retry(failure, self._backoff(attempt + 1))
            return _Retry(failure, min(after, self.retry.max_retry_after))
        if status >= 500:
            return _Retry(failure, self._backoff(attempt))
        raise failure

    def _backoff(self, attempt: int) -> float:
        return self.retry.backoff(attempt, self.rng)

    def _error(
        self,
        message: str,
        status: int | None = None,
        code: str | None = None,
        kind: type[ApiError] = ApiError,
    ) -> ApiError:
        """An ApiError whose text cannot carry the credentials, whatever the server echoed."""
        scrub = self._secrets.scrub
        return kind(scrub(message), status, scrub(code) if code else code)

    # ----------------------------------------------------------------- the API
    def list_url(
        self,
        created_after: float | None,
        page_size: int | None = None,
        created_before: float | None = None,
    ) -> str:
        params = {"page_size": str(page_size or self.page_size)}
        if created_after is not None:
            params["created_after"] = format_timestamp(created_after)
        if created_before is not None:
            params["created_before"] = format_timestamp(math.ceil(created_before))
        return f"{self.base_url}{LOGS_PATH}?{urlencode(params)}"

    def list_pages(
        self, created_after: float | None, created_before: float | None = None
    ) -> Iterator[Page]:
        """Every page of the listing of messages created after `created_after`.

        Follows `links.next` (absolute or relative), putting our filters and page size back when
        the link leaves them out, refusing links to another host (they would receive the
        credentials), and stopping with an error if a link repeats.
        """
        first = self.list_url(created_after, created_before=created_before)
        restore = parse_qsl(urlsplit(first).query)
        url: str | None = first
        seen: set[str] = set()
        restarts = 0
        while url is not None:
            if url in seen:
                raise self._error(f"links.next repeats an earlier page ({_redact_url(url)})")
            if len(seen) >= MAX_PAGES_PER_LISTING:
                raise self._error(f"listing exceeds {MAX_PAGES_PER_LISTING} pages")
            seen.add(url)
            try:
                response, payload = self.request(url)
            except ApiError as exc:
                # A rejected page token: start the listing again (what was already read is
                # observed again harmlessly: observations are idempotent).
                if exc.code not in PAGE_TOKEN_ERRORS or url == first or restarts >= MAX_RESTARTS:
                    raise
                restarts += 1
                seen.clear()
                url = first
                continue
            if payload is None:
                raise self._error(f"404 {LOGS_PATH} not found: is the space right?", 404)
            data = payload.get("data")
            if not isinstance(data, list):
                raise self._error("response has no 'data' list", response.status_code)
            yield Page(data, _server_time(response))
            url = self._next_url(url, payload, restore)

    def _next_url(
        self, current: str, payload: dict[str, Any], restore: list[tuple[str, str]]
    ) -> str | None:
        links = payload.get("links")
        next_link = links.get("next") if isinstance(links, dict) else None
        if not next_link:
            return None
        if not isinstance(next_link, str):
            raise self._error("links.next is not a string")
        target = urljoin(current, next_link)
        parts = urlsplit(target)
        if _origin(target) != _origin(self.base_url):
            raise self._error(
                f"links.next points to another host ({parts.scheme}://{parts.hostname}); "
                "not followed, it would receive the credentials"
            )
        query = parse_qsl(parts.query, keep_blank_values=True)
        present = {name for name, _ in query}
        missing = [(name, value) for name, value in restore if name not in present]
        if not missing:
            return target
        query.extend(missing)
        return urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(query), ""))

    def oldest_listable(self, refused: float, now: float, probes: int = 8) -> float:
        """Bisect SignalWire's history limit between a refused `created_after` and now: the
        oldest time a listing is accepted from, to within (now - refused) / 2**probes."""
        accepted = now
        for _ in range(probes):
            middle = (refused + accepted) / 2
            try:
                next(self.list_pages(middle, now), None)
            except ApiError as exc:
                if exc.code != HISTORY_LIMIT_CODE:
                    raise
                refused = middle
            else:
                accepted = middle
        return accepted

    def get_message(self, message_id: str) -> Any | None:
        """One message log by id; None when SignalWire answers 404 (the record is gone)."""
        url = f"{self.base_url}{LOGS_PATH}/{quote(message_id, safe='')}"
        _, payload = self.request(url)
        if payload is None:
            return None
        if isinstance(payload.get("data"), dict):  # tolerate a wrapped answer
            return payload["data"]
        return payload


def _origin(url: str) -> tuple[str, str, int | None]:
    """Scheme, host and port, as compared to decide whether a URL may get the credentials."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    try:
        port = parts.port
    except ValueError:
        port = -1  # a malformed port matches nothing
    if port is None:
        port = _DEFAULT_PORTS.get(scheme)
    return scheme, (parts.hostname or "").lower(), port


_DEFAULT_PORTS = {"http": 80, "https": 443}


def _decode(body: bytes) -> dict[str, Any]:
    """The body as a JSON object; ValueError saying what it is instead."""
    if not body.strip():
        raise ValueError("response body is empty, not JSON")
    payload = _decode_json(body)
    if not isinstance(payload, dict):
        raise ValueError(f"response is a JSON {type(payload).__name__}, not an object")
    return payload


def _decode_json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError):
        start = body[:60].decode("utf-8", "replace").strip()
        raise ValueError(
            f"response body is not JSON (an error page or a cut-off response?): starts with "
            f"{start!r}"
        ) from None


def _server_time(response: requests.Response) -> float | None:
    value = response.headers.get("Date")
    if not value:
        return None
    try:
        return email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        return None


_OBJECT_REPR = re.compile(r"<[\w.]+ object at 0x[0-9a-f]+>: ")


def _describe(exc: BaseException) -> str:
    """An exception's gist: the innermost reason requests and urllib3 wrapped, first line only."""
    reason = exc
    for _ in range(5):
        inner = next((a for a in reversed(reason.args) if isinstance(a, BaseException)), None)
        if inner is None:
            inner = getattr(reason, "reason", None)  # urllib3's MaxRetryError
        if not isinstance(inner, BaseException):
            break
        reason = inner
    text = str(reason).splitlines()[0] if str(reason) else type(reason).__name__
    return _OBJECT_REPR.sub("", text)[:200]


def _describe_transport(exc: BaseException, timeout: float) -> str:
    timed_out = isinstance(exc, requests.Timeout) or "timed out" in str(exc).lower()
    if timed_out:
        return f"timeout: no complete response within {timeout:g}s"
    return f"connection failed: {_describe(exc)}"


def _redact_url(url: str) -> str:
    """The URL without user info or query: nothing in it can be a credential."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"  # IPv6
    try:
        port = parts.port
    except ValueError:
        port = None
    netloc = f"{host}:{port}" if port is not None else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))
