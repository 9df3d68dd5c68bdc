"""The polling loop: one schedule per project, tying client -> ledger -> store.

Each poll lists new and recently changed message logs, refreshes pending messages the ledger asks
for, commits the poll's effects in one transaction, and only then applies them and publishes a
fresh `ProjectStatus` for scrapes. A failed poll publishes `up = 0` and changes nothing else, so the
next poll starts from the same cursor: an outage delays counts but never loses or doubles them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import chain
from typing import Any, NamedTuple

import structlog

from exporter.client import (
    HISTORY_LIMIT_CODE,
    ApiError,
    AuthError,
    Client,
    Page,
    RetryPolicy,
    Stopped,
)
from exporter.config import Config, ProjectConfig, read_token_file
from exporter.ledger import Batch, LabelKey, Ledger, PollDelta, Rules, Totals
from exporter.logs import redact
from exporter.records import InvalidRecord, Message, parse_message, parse_records
from exporter.store import CommitError, Store

Clock = Callable[[], float]
AUTH_BACKOFF_START = 60.0
AUTH_BACKOFF_MAX = 600.0
MAX_INVALID_KEYS = 100_000
PROGRESS_EVERY_PAGES = 25


class CounterState(NamedTuple):
    api_requests: dict[tuple[str, str], int]
    invalid_records: dict[str, int]
    poll_errors: dict[tuple[str, str], int]


class Counters:
    """The exporter's own process counters (they start again at zero on restart)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.api_requests: dict[tuple[str, str], int] = {}
        self.invalid_records: dict[str, int] = {}
        self.poll_errors: dict[tuple[str, str], int] = {}

    def request(self, project: str, code: str) -> None:
        with self._lock:
            key = (project, code)
            self.api_requests[key] = self.api_requests.get(key, 0) + 1

    def invalid(self, project: str) -> None:
        with self._lock:
            self.invalid_records[project] = self.invalid_records.get(project, 0) + 1

    def poll_error(self, project: str, reason: str) -> None:
        with self._lock:
            key = (project, reason)
            self.poll_errors[key] = self.poll_errors.get(key, 0) + 1

    def state(self) -> CounterState:
        """A consistent copy of all three counts."""
        with self._lock:
            return CounterState(
                dict(self.api_requests), dict(self.invalid_records), dict(self.poll_errors)
            )

    def replace(self, state: CounterState) -> None:
        """Take over the counts kept by the polling process."""
        with self._lock:
            self.api_requests = dict(state.api_requests)
            self.invalid_records = dict(state.invalid_records)
            self.poll_errors = dict(state.poll_errors)


@dataclass(frozen=True)
class ProjectStatus:
    """An immutable view of one project for /metrics and the landing page, replaced per poll."""

    name: str
    polled: bool = False
    up: bool = False
    last_success: float | None = None
    last_duration: float | None = None
    last_error: str | None = None
    cursor: float = 0.0
    totals: dict[LabelKey, Totals] = field(default_factory=dict)
    pending: dict[tuple[str, str, str], int] = field(default_factory=dict)
    failure_ratios: dict[tuple[str, str], float] = field(default_factory=dict)
    error_info: dict[str, str] = field(default_factory=dict)

    @property
    def pending_total(self) -> int:
        return sum(self.pending.values())


class ProjectPoller:
    def __init__(
        self,
        project: ProjectConfig,
        config: Config,
        store: Store,
        counters: Counters,
        stop: threading.Event,
        clock: Clock = time.time,
        on_publish: Callable[[ProjectStatus], None] | None = None,
    ) -> None:
        self.project = project
        self.config = config
        self.store = store
        self.counters = counters
        self.stop = stop
        self.clock = clock
        self.on_publish = on_publish
        self.log = structlog.get_logger().bind(project=project.name)
        self.client = Client(
            project.base_url,
            project.project_id,
            project.api_token,
            timeout=config.request_timeout,
            page_size=config.page_size,
            on_request=lambda code: counters.request(project.name, code),
            # Retries within a poll stay within about one poll interval; the next poll retries on.
            retry=RetryPolicy(attempts=4, max_delay=min(30.0, config.poll_interval)),
            stop=stop,
        )
        self.rules = Rules(
            settle=config.settle,
            poll_interval=config.poll_interval,
            failure_ratio_window=config.failure_ratio_window,
            max_error_codes=config.max_error_codes,
            page_size=config.page_size,
        )
        self.ledger: Ledger | None = None
        self.status = ProjectStatus(project.name)
        self._invalid_keys: set[str] = set()
        self._auth_failures = 0
        self._last_success: float | None = None
        self._token = project.api_token

    # ----------------------------------------------------------------- lifecycle
    def load(self) -> None:
        """Load the committed state (recording the start point on a project's first start)."""
        state = self.store.load(self.project.name, self.clock(), self.config.start_from)
        self.ledger = Ledger(self.rules, state)
        self.log.info(
            "state loaded",
            start_point=_iso(state.start_point),
            cursor=_iso(state.cursor),
            pending=len(state.pending),
        )
        self._publish(polled=False, up=False, duration=None, error=None)

    def run(self) -> None:
        """Poll until stopped; never raises, so one project's trouble never stops another's."""
        next_start = time.monotonic()
        while not self.stop.is_set():
            began = time.monotonic()
            try:
                ok = self.poll_once()
            except Stopped:
                self.log.info("poll abandoned for shutdown")
                break
            except Exception as exc:  # a bug must not kill the project's loop silently
                self.log.error("poll crashed", error=repr(exc))
                self.counters.poll_error(self.project.name, "internal")
                self._publish(polled=True, up=False, duration=None, error=f"internal: {exc}")
                ok = False
            interval = self.config.poll_interval
            if not ok and self._auth_failures:
                backoff = AUTH_BACKOFF_START * 2 ** (self._auth_failures - 1)
                interval = max(interval, min(AUTH_BACKOFF_MAX, backoff))
            next_start = max(began + interval, time.monotonic()) if ok else began + interval
            self.stop.wait(max(0.0, next_start - time.monotonic()))
        self.client.close()

    # ----------------------------------------------------------------- one poll
    def poll_once(self) -> bool:
        """One poll; True when it succeeded and was committed. Raises Stopped on shutdown."""
        assert self.ledger is not None, "load() first"
        started = self.clock()
        try:
            delta = self._collect(started)
            if self.stop.is_set():
                # Stopping while the last answer came in: the poll is abandoned uncommitted, as
                # the README promises; the next start redoes it.
                raise Stopped("stopping")
            self.store.commit(self.project.name, delta)
        except AuthError as exc:
            self._auth_failures += 1
            if self._reload_token():
                self.log.info("api token file changed; retrying with the new token")
                return self.poll_once()
            return self._failed(
                started, f"SignalWire rejected the credentials: {exc}", "auth", alarm=True
            )
        except ApiError as exc:
            return self._failed(started, f"SignalWire API: {exc}", "api")
        except CommitError as exc:
            return self._failed(started, str(exc), "state", alarm=True)
        self.ledger.apply(delta)
        self._auth_failures = 0
        duration = self.clock() - started
        self._last_success = self.clock()
        recovered = self.status.polled and not self.status.up
        self._publish(polled=True, up=True, duration=duration, error=None)
        event = "poll recovered" if recovered else "poll finished"
        log = self.log.info if recovered or delta.settled_count else self.log.debug
        log(
            event,
            new=delta.new_messages,
            settled=delta.settled_count,
            settled_by_timeout=delta.settled_by_timeout,
            pending=self.status.pending_total,
            cursor=_iso(delta.cursor),
            duration=round(duration, 3),
        )
        return True

    def _collect(self, started: float) -> PollDelta:
        assert self.ledger is not None
        plan = self.ledger.plan(started)
        batch = self.ledger.begin(plan)
        server_time: float | None = None
        head = self._listing(plan.created_after, started)
        ranges = (self.client.list_pages(after, before) for after, before in plan.listings[1:])
        records = 0
        for number, page in enumerate(chain(head, *ranges), start=1):
            if server_time is None:
                server_time = page.server_time
            at = self.clock()
            # Records re-listed after settling are skipped unparsed (observe would skip them too).
            settled = self.ledger.state.settled
            batch.observe_all(parse_records(page.records, self._invalid, settled), at)
            records += len(page.records)
            if number % PROGRESS_EVERY_PAGES == 0:
                self.log.info("listing in progress", pages=number, records=records)
        self._refresh_by_id(batch, plan.get_ids)
        self._refresh_by_id(batch, batch.unrefreshed_timeout_due())
        listing_started = started if server_time is None else min(started, server_time)
        return batch.close(self.clock(), listing_started)

    def _listing(self, created_after: float, now: float) -> Iterator[Page]:
        """The listing's pages; past SignalWire's history limit, from the oldest time it allows.

        Messages older than the limit cannot be listed any more: the exporter says so once, with
        the span it had to skip, instead of failing every poll for good.
        """
        pages = self.client.list_pages(created_after)
        try:
            first = next(pages, None)
        except ApiError as exc:
            if exc.code != HISTORY_LIMIT_CODE:
                raise
            allowed = self.client.oldest_listable(created_after, now)
            self.log.error(
                "messages beyond SignalWire's history limit are not counted",
                skipped_from=_iso(created_after),
                skipped_to=_iso(allowed),
            )
            pages = self.client.list_pages(allowed)
            first = next(pages, None)
        if first is not None:
            yield first
            yield from pages

    def _refresh_by_id(self, batch: Batch, ids: Any) -> None:
        for message_id in ids:
            if message_id in batch.seen or message_id in batch.settled:
                continue
            raw = self.client.get_message(message_id)
            at = self.clock()
            if raw is None:
                batch.gone(message_id, at)
                continue
            message = self._parse(raw)
            if message is not None and message.id == message_id:
                batch.observe(message, at)

    def _parse(self, raw: Any) -> Message | None:
        try:
            return parse_message(raw)
        except InvalidRecord as exc:
            self._invalid(exc)
            return None

    def _invalid(self, exc: InvalidRecord) -> None:
        """Count and report an invalid record once, however often it is listed."""
        if exc.key not in self._invalid_keys:
            if len(self._invalid_keys) >= MAX_INVALID_KEYS:
                self._invalid_keys.clear()
            self._invalid_keys.add(exc.key)
            self.counters.invalid(self.project.name)
            self.log.warning("invalid record skipped", reason=exc.reason)

    def _reload_token(self) -> bool:
        """On 401/403, pick up a rotated token from api_token_file without a restart."""
        path = self.project.api_token_file
        if not path:
            return False
        token = read_token_file(path)
        if not token or token == self._token:
            return False
        redact(token)
        self._token = token
        self.client.set_token(token)
        return True

    def _failed(self, started: float, error: str, reason: str, alarm: bool = False) -> bool:
        duration = self.clock() - started
        first_failure = self.status.up or not self.status.polled
        self._publish(polled=True, up=False, duration=duration, error=error)
        self.counters.poll_error(self.project.name, reason)
        log = self.log.error if alarm or first_failure else self.log.warning
        log("poll failed", error=error, duration=round(duration, 3))
        return False

    def _publish(self, polled: bool, up: bool, duration: float | None, error: str | None) -> None:
        assert self.ledger is not None
        state = self.ledger.state
        # A label set that has been pending stays exported at 0, so graphs drop to zero instead
        # of ending (the label values are bounded by the API's enums).
        pending = dict.fromkeys(self.status.pending, 0) | self.ledger.pending_by_labels()
        self.status = ProjectStatus(
            name=self.project.name,
            polled=polled or self.status.polled,
            up=up,
            last_success=self._last_success,
            last_duration=duration,
            last_error=error,
            cursor=state.cursor,
            totals={
                k: Totals(v.messages, v.segments, v.charge_nano) for k, v in state.totals.items()
            },
            pending=pending,
            failure_ratios=self.ledger.failure_ratios(self.clock()),
            error_info=dict(state.error_info),
        )
        if self.on_publish is not None:
            self.on_publish(self.status)


def _iso(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))
