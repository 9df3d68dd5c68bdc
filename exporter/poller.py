"""The polling loop: one schedule per project, tying client -> ledger -> store.

Each poll lists new and recently changed message logs, refreshes pending messages the ledger asks
for, commits the poll's effects in one transaction, and only then applies them and publishes a
fresh `ProjectView` for scrapes. A failed poll publishes `up = 0` and changes nothing else, so the
next poll starts from the same cursor: an outage delays counts but never loses or doubles them.
"""

from __future__ import annotations

import math
import shlex
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import replace
from itertools import chain
from typing import Any

import structlog
from requests.adapters import BaseAdapter

from exporter.catchup import Progress
from exporter.client import (
    HISTORY_LIMIT_CODE,
    ApiError,
    AuthError,
    Client,
    Page,
    RetryPolicy,
    Stopped,
)
from exporter.config import Config, ProjectConfig, format_duration, read_token_file
from exporter.ledger import (
    CURSOR_SAFETY,
    LISTING_SLACK,
    Batch,
    LabelKey,
    Ledger,
    PollDelta,
    PollPlan,
    Rules,
    Totals,
)
from exporter.logs import redact
from exporter.recent import RecentCounts
from exporter.records import (
    InvalidRecord,
    Message,
    format_timestamp,
    parse_message,
    parse_records,
)
from exporter.store import CommitError, Store
from exporter.views import CounterState, ProjectView, SettledTotals, StartNote

Clock = Callable[[], float]
AUTH_BACKOFF_START = 60.0
AUTH_BACKOFF_MAX = 600.0
MAX_INVALID_KEYS = 100_000
PROGRESS_EVERY_PAGES = 25
# A catch-up logs its progress at most this often (a step can take well under a second).
PROGRESS_LOG_INTERVAL = 5.0
# Records that appear late are logged at most this often, with how many and the latest.
LATE_LOG_INTERVAL = 60.0
# A start_from reaching further back than the recorded start point by more than this is pointed
# out at start (less is the clock's jitter between starts).
START_NOTE_TOLERANCE = 10.0


class Counters:
    """The exporter's own process counters (they start again at zero on restart)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.api_requests: dict[tuple[str, str], int] = {}
        self.invalid_records: dict[str, int] = {}
        self.poll_errors: dict[tuple[str, str], int] = {}
        self.late_records: dict[str, int] = {}

    def request(self, project: str, code: str) -> None:
        with self._lock:
            key = (project, code)
            self.api_requests[key] = self.api_requests.get(key, 0) + 1

    def invalid(self, project: str) -> None:
        with self._lock:
            self.invalid_records[project] = self.invalid_records.get(project, 0) + 1

    def late(self, project: str, records: int) -> None:
        """Records first seen behind the cursor, counted once their poll is committed."""
        with self._lock:
            self.late_records[project] = self.late_records.get(project, 0) + records

    def poll_error(self, project: str, reason: str) -> None:
        with self._lock:
            key = (project, reason)
            self.poll_errors[key] = self.poll_errors.get(key, 0) + 1

    def state(self) -> CounterState:
        """A consistent copy of all the counts."""
        with self._lock:
            return CounterState(
                dict(self.api_requests),
                dict(self.invalid_records),
                dict(self.poll_errors),
                dict(self.late_records),
            )


# How a poller gets its project's client: (project, config, on_request, stop) -> Client.
ClientFactory = Callable[[ProjectConfig, Config, Callable[[str], None], threading.Event], Client]


def poll_client(
    project: ProjectConfig,
    config: Config,
    on_request: Callable[[str], None],
    stop: threading.Event,
    adapter: BaseAdapter | None = None,
    kind: type[Client] = Client,
) -> Client:
    """The client a poller uses: retries within a poll stay within about one poll interval (the
    next poll retries on), and a stop cuts every wait short. `adapter` and `kind`: another
    transport or another Client class (the simulator's, a test's)."""
    retry = RetryPolicy(attempts=4, max_delay=min(30.0, config.poll_interval))
    return kind.for_project(
        project, config, on_request=on_request, retry=retry, stop=stop, adapter=adapter
    )


class ProjectPoller:
    def __init__(
        self,
        project: ProjectConfig,
        config: Config,
        store: Store,
        counters: Counters,
        stop: threading.Event,
        clock: Clock = time.time,
        on_publish: Callable[[ProjectView], None] | None = None,
        connect: ClientFactory = poll_client,
    ) -> None:
        self.project = project
        self.config = config
        self.store = store
        self.counters = counters
        self.stop = stop
        self.clock = clock
        self.on_publish = on_publish
        self.log = structlog.get_logger().bind(project=project.name)
        self.client = connect(
            project, config, lambda code: counters.request(project.name, code), stop
        )
        self.rules = Rules.of(config)
        self.ledger: Ledger | None = None
        self.view = ProjectView(project.name)
        self._invalid_keys: set[str] = set()
        self._auth_failures = 0
        self._last_success: float | None = None
        self._token = project.api_token
        self._progress: Progress | None = None
        self._progress_began = 0.0
        self._progress_logged = -math.inf
        self._late_logged = -math.inf
        self._late_unlogged = 0
        self._lateness = 0.0
        self.recent = RecentCounts(self.clock())
        self._start_note: StartNote | None = None

    # ----------------------------------------------------------------- lifecycle
    def load(self) -> None:
        """Load the committed state (recording the start point on a project's first start)."""
        now = self.clock()
        state = self.store.load(self.project.name, now, self.config.start_from)
        self.ledger = Ledger(self.rules, state)
        self.log.info(
            "state loaded",
            start_point=format_timestamp(state.start_point),
            cursor=format_timestamp(state.cursor),
            pending=len(state.pending),
        )
        self._start_note = self._earlier_start(now, state.start_point)
        if self._start_note is not None:
            note = self._start_note
            self.log.warning(
                "start_from reaches before the recorded start point; the messages in between "
                "are not counted",
                start_from=format_duration(round(note.start_from)),
                wanted_start=format_timestamp(note.wanted),
                start_point=format_timestamp(note.start_point),
                backfill=note.command,
            )
        self._publish(polled=False, up=False, duration=None, error=None)

    def _earlier_start(self, now: float, start_point: float) -> StartNote | None:
        """A note when start_from would now start counting before the recorded start point."""
        wanted = now - self.config.start_from
        if wanted >= start_point - START_NOTE_TOLERANCE:
            return None
        source = self.config.source
        config_file = "" if source.startswith("<") else f" --config.file {shlex.quote(source)}"
        # Backfill counts messages created before --to; live counting, those from the start point
        # on. Creation times are whole seconds: the next whole second leaves no gap between them.
        command = (
            f"signalwire-exporter backfill{config_file} --from {format_timestamp(wanted)} "
            f"--to {format_timestamp(math.ceil(start_point))} --output history.om"
        )
        return StartNote(
            start_from=self.config.start_from,
            wanted=wanted,
            start_point=start_point,
            command=command,
            one_project_config=len(self.config.projects) > 1,
        )

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
        """One poll; True when it succeeded and was committed. Raises Stopped on shutdown.

        A poll far behind now is a catch-up: a series of steps, each committed and published
        before the next, then the ordinary poll up to now. A failure loses the step in flight
        only; the next poll goes on from the last committed step.
        """
        assert self.ledger is not None, "load() first"
        started = self.clock()
        steps = 0  # ordinary plans committed in this poll
        try:
            while True:
                now = self.clock()
                plan = self.ledger.catch_up_step(now) or self.ledger.plan(now)
                delta = self._collect(plan)
                if delta is None:
                    continue  # the window was resized: plan the step again
                if self.stop.is_set():
                    # Stopping while the last answer came in: the step is abandoned
                    # uncommitted, as docs/cli.md promises; the next start redoes it.
                    raise Stopped("stopping")
                self.store.commit(self.project.name, delta)
                self.recent.add(self.clock(), delta.totals)
                self.ledger.apply(delta)
                self._late(delta)
                if plan.window_end is not None:
                    self._stepped(plan, delta)
                    del delta  # not held while the next step is listed
                    continue
                steps += 1
                if not self.ledger.refresh_goes_on(plan, steps):
                    break
                # A burst of receipts: its next capped listing at once, this one published.
                self._last_success = self.clock()
                self._publish(polled=True, up=True, duration=self.view.last_duration, error=None)
                self.log.info(
                    "refreshing pending messages after a burst of receipts",
                    settled=delta.settled_count,
                    pending=self.view.pending_total,
                )
                del delta  # not held while the next listing is taken in
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
        self._auth_failures = 0
        duration = self.clock() - started
        self._last_success = self.clock()
        recovered = self.view.polled and not self.view.up
        progress, self._progress = self._progress, None
        self._publish(polled=True, up=True, duration=duration, error=None)
        if progress is not None:
            self.log.info(
                "caught up",
                messages=progress.messages + delta.new_messages,
                seconds=round(time.monotonic() - self._progress_began, 1),
                cursor=format_timestamp(delta.cursor),
            )
        event = "poll recovered" if recovered else "poll finished"
        log = self.log.info if recovered or delta.settled_count else self.log.debug
        log(
            event,
            new=delta.new_messages,
            settled=delta.settled_count,
            settled_by_timeout=delta.settled_by_timeout,
            pending=self.view.pending_total,
            cursor=format_timestamp(delta.cursor),
            duration=round(duration, 3),
        )
        return True

    def _late(self, delta: PollDelta) -> None:
        """Count the committed poll's late records, and say so at most once a minute."""
        if not delta.late_records:
            return
        self.counters.late(self.project.name, delta.late_records)
        self._late_unlogged += delta.late_records
        self._lateness = max(self._lateness, delta.lateness)
        if time.monotonic() - self._late_logged >= LATE_LOG_INTERVAL:
            self._late_logged = time.monotonic()
            self.log.warning(
                "records appeared late in SignalWire's log; counted",
                records=self._late_unlogged,
                latest_seconds=round(self._lateness),
                max_ingestion_delay=format_duration(self.config.max_ingestion_delay),
            )
            self._late_unlogged, self._lateness = 0, 0.0

    def _stepped(self, plan: PollPlan, delta: PollDelta) -> None:
        """A catch-up step is committed: size the next window, publish, report progress."""
        assert self.ledger is not None and plan.window_end is not None
        after = plan.listings[0][0]
        self.ledger.windows.stepped(delta.new_messages, plan.window_end - after)
        now = time.monotonic()
        previous = self._progress
        if previous is None:  # the first step of this catch-up
            self._progress_began = now
        progress = self._progress = Progress(
            began=after + LISTING_SLACK if previous is None else previous.began,
            cursor=delta.cursor,
            target=plan.now - CURSOR_SAFETY,
            messages=delta.new_messages + (0 if previous is None else previous.messages),
            elapsed=now - self._progress_began,
        )
        self._last_success = self.clock()
        self._publish(polled=True, up=True, duration=self.view.last_duration, error=None)
        if now - self._progress_logged >= PROGRESS_LOG_INTERVAL:
            self._progress_logged = now
            eta = progress.eta_seconds
            self.log.info(
                "catching up",
                done=f"{progress.share:.1%}",
                cursor=format_timestamp(delta.cursor),
                behind=format_duration(round(max(0.0, progress.target - delta.cursor))),
                messages=progress.messages,
                messages_per_second=round(progress.messages_per_second),
                eta="unknown" if eta is None else format_duration(round(eta)),
            )

    def _collect(self, plan: PollPlan) -> PollDelta | None:
        """List, refresh and settle what the plan says; None when a catch-up step must be
        planned again (its window was resized)."""
        assert self.ledger is not None
        windows = self.ledger.windows
        plan, head = self._listing(plan)
        batch = self.ledger.begin(plan)
        server_time: float | None = None
        ranges = (self._range(a, b, plan.now) for a, b in plan.listings[1:])
        low, high = math.inf, -math.inf  # creation times listed in a catch-up step
        span = (plan.window_end or plan.now) - plan.listings[0][0]
        for number, page in enumerate(chain(head, *ranges), start=1):
            if server_time is None:
                server_time = page.server_time
            at = self.clock()
            # Records re-listed after settling are skipped unparsed (observe would skip them too).
            settled = self.ledger.state.settled
            messages = parse_records(page.records, self._invalid, settled)
            batch.observe_all(messages, at)
            if messages and (plan.window_end is not None or windows.past_bound(batch.new_messages)):
                low = min(low, min(m.created_at for m in messages))
                high = max(high, max(m.created_at for m in messages))
            if windows.past_bound(batch.new_messages):
                # Only a window honoured to the second can be cut (with whole-day filters, a
                # shorter one would list nothing): check that first.
                if not windows.checked and not self._window_trusted(plan, low, high):
                    return None
                if windows.too_large(batch.new_messages, span):
                    self.log.info(
                        "listing cut into steps: more messages than expected",
                        new=batch.new_messages,
                        next_window=format_duration(round(windows.seconds)),
                    )
                    return None
            if number % PROGRESS_EVERY_PAGES == 0:
                self.log.info("listing in progress", pages=number, records=batch.listed)
        if plan.window_end is not None and not self._window_trusted(plan, low, high):
            return None
        self._refresh_by_id(batch, plan.get_ids)
        self._refresh_by_id(batch, batch.unrefreshed_timeout_due())
        listing_started = plan.now if server_time is None else min(plan.now, server_time)
        return batch.close(self.clock(), listing_started)

    def _moved(self, plan: PollPlan, after: float) -> PollPlan:
        """The plan with its listing starting at `after` instead (SignalWire's history limit)."""
        assert self.ledger is not None
        # What lies before `after` can no longer be listed: the listing sweeps from there, and
        # nothing before it can be new any more.
        floor = after if plan.floor is None else max(plan.floor, after)
        if plan.window_end is None:
            listings = ((after, None), *plan.listings[1:])
            return replace(plan, listings=listings, horizon=after, floor=floor)
        end = max(plan.window_end, float(math.floor(after + self.ledger.windows.seconds)))
        if end >= plan.now - CURSOR_SAFETY:
            return replace(
                plan, listings=((after, None),), horizon=after, window_end=None, floor=floor
            )
        return replace(plan, listings=((after, end),), horizon=after, window_end=end, floor=floor)

    def _window_trusted(self, plan: PollPlan, low: float, high: float) -> bool:
        """Whether a catch-up step may be committed (or a listing cut into steps): SignalWire
        must be known to honour the bounds to the second (checked once), or the windows are
        whole days."""
        assert self.ledger is not None
        windows = self.ledger.windows
        if windows.coarse:
            return True
        after, before = plan.listings[0]
        if before is not None and low <= high and not windows.within(low, high, after, before):
            self._coarse(
                f"records created from {format_timestamp(low)} to {format_timestamp(high)} listed"
            )
            return False
        if windows.verified:
            return True
        if low > high:  # nothing listed, so nothing to check the filters with
            if plan.window_end is None or windows.exact_whatever_the_precision(plan.window_end):
                return True
            windows.grow()  # a longer window instead, up to the day's end
            return False
        page = next(self.client.list_pages(high - 1, high + 1), None)
        times = [m.created_at for m in parse_records(page.records if page else [], _ignore)]
        if not windows.probed(high, times):
            probe = f"{format_timestamp(high - 1)} to {format_timestamp(high + 1)}"
            self._coarse(f"a listing of {probe} did not match")
            return False
        return True

    def _coarse(self, evidence: str) -> None:
        self.log.warning(
            "SignalWire honours created_after/created_before only to the day; catching up a "
            "day at a time",
            evidence=evidence,
        )

    def _listing(self, plan: PollPlan) -> tuple[PollPlan, Iterator[Page]]:
        """The plan's first listing, and the plan as it stands: past SignalWire's history limit
        the listing starts from the oldest time it allows.

        Messages older than the limit cannot be listed any more: the exporter says so once, with
        the span it had to skip, instead of failing every poll for good.
        """
        after, before = plan.listings[0]
        pages, allowed = self._opened(after, before, plan.now)
        if allowed is not None:
            self.log.error(
                "messages beyond SignalWire's history limit are not counted",
                skipped_from=format_timestamp(after),
                skipped_to=format_timestamp(allowed),
            )
            plan = self._moved(plan, allowed)
            after, before = plan.listings[0]
            pages = self._started(after, before)
        return plan, pages

    def _range(self, after: float, before: float | None, now: float) -> Iterator[Page]:
        """The pages of a listing after the first (a refresh or a late sweep): past SignalWire's
        history limit, from the oldest time it allows, as the first listing does."""
        pages, allowed = self._opened(after, before, now)
        if allowed is not None:
            self.log.warning(
                "a listing reaches beyond SignalWire's history limit; listed from the oldest "
                "time it allows",
                skipped_from=format_timestamp(after),
                skipped_to=format_timestamp(allowed),
            )
            if before is not None and allowed > before:
                return
            pages = self._started(allowed, before)
        yield from pages

    def _opened(
        self, after: float, before: float | None, now: float
    ) -> tuple[Iterator[Page], float | None]:
        """A listing's pages, the first asked for at once; past SignalWire's history limit, none,
        and the oldest time a listing is accepted from."""
        try:
            return self._started(after, before), None
        except ApiError as exc:
            if exc.code != HISTORY_LIMIT_CODE:
                raise
            return iter(()), self.client.oldest_listable(after, now)

    def _started(self, after: float, before: float | None) -> Iterator[Page]:
        """A listing's pages, the first asked for at once (a refusal raises here)."""
        pages = self.client.list_pages(after, before)
        return _prepend(next(pages, None), pages)

    def _refresh_by_id(self, batch: Batch, ids: Any) -> None:
        for message_id in ids:
            if batch.observed(message_id):
                continue
            raw = self.client.get_message(message_id)
            at = self.clock()
            if raw is None:
                batch.gone(message_id)
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
        redact(token)  # a token rotated in: never logged either
        self._token = token
        self.client.set_token(token)
        return True

    def _failed(self, started: float, error: str, reason: str, alarm: bool = False) -> bool:
        duration = self.clock() - started
        first_failure = self.view.up or not self.view.polled
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
        pending = dict.fromkeys(self.view.pending, 0) | self.ledger.pending_by_labels()
        self.view = ProjectView(
            name=self.project.name,
            polled=polled or self.view.polled,
            up=up,
            last_success=self._last_success,
            last_duration=duration,
            last_error=error,
            cursor=state.cursor,
            totals=copy_totals(state.totals),
            by_country=copy_totals(state.by_country),
            by_group=copy_totals(state.by_group),
            pending=pending,
            pending_oldest=self.ledger.pending_oldest(),
            failure_ratios=self.ledger.failure_ratios(self.clock()),
            error_info=dict(state.error_info),
            catch_up=self._progress,
            recent=self.recent.summary(self.clock()),
            start_note=self._start_note,
        )
        if self.on_publish is not None:
            self.on_publish(self.view)


def copy_totals(totals: Mapping[LabelKey, Totals]) -> dict[LabelKey, SettledTotals]:
    """A snapshot for the published view: the ledger's Totals change in place."""
    return {k: SettledTotals(v.messages, v.segments, v.charge_nano) for k, v in totals.items()}


def _prepend(first: Page | None, rest: Iterator[Page]) -> Iterator[Page]:
    if first is not None:
        yield first
        yield from rest


def _ignore(_: InvalidRecord) -> None:
    """Invalid records in a probe are reported when a listing meets them, not here."""
