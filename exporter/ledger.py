"""The counting rules (docs/counting.md), as pure logic: no I/O, the time is always passed in.

One poll of a project is one `Batch`:

    plan = ledger.plan(now)                 # what to list and which pending messages to get by id
    batch = ledger.begin(plan)
    batch.observe(message, at) ...          # every record listed or fetched, duplicates too
    batch.gone(message_id) ...              # a get-by-id answered 404
    delta = batch.close(now)                # settlements, pending changes, the new cursor
    store.commit(delta); ledger.apply(delta)

Nothing changes in the ledger until `apply`, so a poll that fails half way (or a commit that fails)
is simply dropped and the next poll starts from the same committed state: nothing is lost, and
nothing is counted twice.

Why the floor: the API has no "changed since" filter, so a poll re-lists from a little before
the cursor. A re-listed record that is neither pending nor among the recently settled ids and was
created before the floor has already been dealt with (or predates the start point), so it is
ignored; the ids of messages settled after the floor are kept, so re-listing them never counts
them again.

Late records: SignalWire's log may show a record some time after its created_at (up to
max_ingestion_delay). `complete_until` marks where every record is sure to have been seen: a
listing from the floor made at time t has seen every record created before t minus the delay.
The floor is `complete_until` (or the cursor, if lower), so a record that first shows behind the
cursor is still new above it, and counted; a late sweep, a listing from the floor every
`Schedule.late_sweep_period`, moves `complete_until` on. It reaches up to max_ingestion_delay
before now, where it moves `complete_until` to, as a listing of its own beside the head listing
(or, where that takes no more pages, as the head listing itself).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from exporter.catchup import Windows
from exporter.config import Config, SettleConfig
from exporter.countries import UNKNOWN, country_of
from exporter.pending import (
    MINUTE,
    Key,
    PendingSet,
    SettledIds,
    id_of,
    key_of,
)
from exporter.records import Message
from exporter.schedule import Schedule, late_ages, schedule

LabelKey = tuple[str, str, str, str]  # direction, kind, status, error_code
# direction, kind, status, and the country or number group: the insight counters' label sets.
DimensionKey = tuple[str, str, str, str]
WindowKey = tuple[int, str, str]  # settlement second, direction, kind
FAILED_STATUSES = frozenset({"failed", "undelivered"})
OTHER_ERROR_CODE = "other"
OTHER_LABEL_VALUE = "other"
UNGROUPED = "ungrouped"  # the number group of an own number that no group lists
# SignalWire's documented values of direction, kind and status. New values are passed through as
# labels, but at most MAX_NEW_LABEL_VALUES of them per label and project: garbage from the API must
# not explode the number of series. Past that they show as "other".
KNOWN_LABEL_VALUES = (
    frozenset({"inbound", "outbound", "outbound-api", "outbound-call", "outbound-reply"}),
    frozenset({"sms", "mms", "whatsapp"}),
    frozenset(
        {"queued", "initiated", "sent", "delivered", "undelivered", "failed", "received", "read"}
    ),
)
MAX_NEW_LABEL_VALUES = 10

# How long after a message's creation it may take to appear in a listing (ingestion delay and the
# difference between our clock and SignalWire's). The cursor trails the listing start by this much.
CURSOR_SAFETY = 30.0
# created_after is second-precision and its inclusiveness is unconfirmed: list one second earlier.
LISTING_SLACK = 1.0
# Refresh tiers: their cadence is the Schedule's (exporter.schedule). Pending messages older than
# the recent tier are refreshed by id on the recent tier's polls, at most MIDDLE_GETS_PER_POLL each
# time, each every age/MIDDLE_AGE_DIVISOR.
MIDDLE_AGE_DIVISOR = 4.0
MIDDLE_GETS_PER_POLL = 1
# The rate of new messages, for the head listing's overlap, is taken over this many minutes.
RATE_MINUTES = 5
# First-sighting counts per minute, kept this long, estimate the cost of re-listing a time range.
HISTOGRAM_BUCKET = 60
# A poll that settles this many pending messages by their receipts, and at least this share of
# the pending set, or that settles one older than the recent tier, marks a burst (a carrier's
# delayed receipts arriving): the next poll refreshes every older pending message, by a listing
# where that takes fewer requests than gets.
BURST_RECEIPTS = 100
BURST_SHARE = 0.1
# A listing that refreshes older pending messages re-lists about this many records at most (from
# the one seen longest ago; the others wait for the next polls): what a poll holds stays bounded
# whatever the pending set, as a catch-up step's does.
REFRESH_RECORDS = 50_000
# After a burst of receipts, a capped listing of older pending messages is followed at once, in
# the same poll, by the next (each committed before the next is planned), up to this many a poll:
# the burst settles within a poll or two, and what a step holds stays bounded.
BURST_STEPS = 8


@dataclass(slots=True)
class Totals:
    messages: int = 0
    segments: int = 0
    charge_nano: int = 0

    def add(self, other: Totals) -> None:
        self.messages += other.messages
        self.segments += other.segments
        self.charge_nano += other.charge_nano


class Pending(NamedTuple):
    """A message seen but not yet settled in a poll: its latest record and when that was
    observed. Between polls the ledger keeps less of it (`PendingSet`)."""

    message: Message
    observed_at: float


# Builds a Pending from a tuple of its fields without the keyword-handling constructor.
_new_pending: Callable[[type[Pending], tuple[Any, ...]], Pending] = tuple.__new__


@dataclass
class LedgerState:
    """Everything a project's counting needs across restarts; the store persists exactly this."""

    start_point: float
    cursor: float
    pending: PendingSet = field(default_factory=PendingSet)
    settled: SettledIds = field(default_factory=SettledIds)  # recent ones only
    totals: dict[LabelKey, Totals] = field(default_factory=dict)
    error_info: dict[str, str] = field(default_factory=dict)  # exported error_code -> message
    window: dict[WindowKey, tuple[int, int]] = field(default_factory=dict)  # -> (settled, failed)
    by_country: dict[DimensionKey, Totals] = field(default_factory=dict)
    by_group: dict[DimensionKey, Totals] = field(default_factory=dict)
    # Every record created before this has been listed after it could have appeared (NaN: the
    # cursor, as for a project that has just started).
    complete_until: float = math.nan

    def __post_init__(self) -> None:
        if math.isnan(self.complete_until):
            self.complete_until = self.cursor

    @property
    def floor(self) -> float:
        """Records created before this are old: not pending, not settled recently, not new."""
        return max(self.start_point, min(self.complete_until, self.cursor) - LISTING_SLACK)

    def as_delta(self) -> PollDelta:
        """The whole state as one commit (a backfill's seed)."""
        pending: dict[str, Pending] = {}
        for message_id, entry in self.pending.items():
            record = self.pending.record(message_id)
            assert record is not None
            pending[message_id] = Pending(record, entry.observed_at)
        return PollDelta(
            cursor=self.cursor,
            settled_ids=dict(self.settled.items()),
            totals=self.totals,
            by_country=self.by_country,
            by_group=self.by_group,
            pending_upserts=pending,
            error_info=dict(self.error_info),
        )

    def error_codes(self) -> set[str]:
        return {k[3] for k in self.totals if k[3] not in ("", OTHER_ERROR_CODE)}

    def countries(self) -> set[str]:
        """The countries admitted so far (under limits.max_countries)."""
        return {k[3] for k in self.by_country if k[3] not in (UNKNOWN, OTHER_LABEL_VALUE)}

    def label_values(self) -> LabelValues:
        """The label values admitted so far: the documented ones and those already counted."""
        admitted: tuple[set[str], set[str], set[str]] = (set(), set(), set())
        for key in self.totals:
            for i in range(3):
                if key[i] not in KNOWN_LABEL_VALUES[i]:
                    admitted[i].add(key[i])
        return LabelValues(admitted)


class LabelValues:
    """Maps direction, kind and status to label values, admitting new ones up to the cap."""

    def __init__(self, admitted: tuple[set[str], set[str], set[str]]) -> None:
        self.admitted = admitted

    def _value(self, i: int, value: str) -> str:
        if value in KNOWN_LABEL_VALUES[i] or value in self.admitted[i]:
            return value
        if len(self.admitted[i] - {OTHER_LABEL_VALUE}) < MAX_NEW_LABEL_VALUES:
            self.admitted[i].add(value)
            return value
        return OTHER_LABEL_VALUE

    def map(self, direction: str, kind: str, status: str) -> tuple[str, str, str]:
        return self._value(0, direction), self._value(1, kind), self._value(2, status)


@dataclass(frozen=True, slots=True)
class Rules:
    settle: SettleConfig
    poll_interval: float
    failure_ratio_window: float
    max_error_codes: int
    page_size: int
    max_countries: int = 60
    number_groups: Mapping[str, str] = field(default_factory=dict)  # own number -> group name
    max_ingestion_delay: float = 600.0
    refresh_records: int = REFRESH_RECORDS  # the most a refresh listing of older ones re-lists

    @classmethod
    def of(cls, config: Config) -> Rules:
        """The counting rules a configuration sets."""
        return cls(
            settle=config.settle,
            poll_interval=config.poll_interval,
            failure_ratio_window=config.failure_ratio_window,
            max_error_codes=config.max_error_codes,
            page_size=config.page_size,
            max_countries=config.max_countries,
            number_groups=config.group_of_number(),
            max_ingestion_delay=config.max_ingestion_delay,
        )


Listing = tuple[float, float | None]  # created_after, created_before (None: up to now)


@dataclass(frozen=True, slots=True)
class PollPlan:
    now: float
    listings: tuple[Listing, ...]  # the head listing first (it moves the cursor), then ranges
    horizon: float  # a listing from here on sweeps (moves the cursor)
    get_ids: tuple[str, ...]  # pending messages to refresh by id
    timeout_due: frozenset[str]  # past settle.timeout, refreshed (and settled) this poll
    window_end: float | None = None  # a catch-up step: the listing's created_before
    floor: float | None = None  # unknown records created before this are ignored (None: horizon)
    late_sweep_end: float | None = None  # listings[1] is a late sweep, up to this created_at
    more_due: bool = False  # its refresh listing is capped: more older pending messages are due

    @property
    def sweeps(self) -> bool:
        """Whether the first listing starts from the cursor: only then may the cursor move."""
        return self.listings[0][0] <= self.horizon

    @property
    def created_after(self) -> float:
        return self.listings[0][0]


@dataclass
class PollDelta:
    """What one poll changes; committed by the store, then applied to the ledger."""

    cursor: float
    settled_ids: dict[Key, float] = field(default_factory=dict)  # id -> created_at
    totals: dict[LabelKey, Totals] = field(default_factory=dict)  # increments
    by_country: dict[DimensionKey, Totals] = field(default_factory=dict)  # increments
    by_group: dict[DimensionKey, Totals] = field(default_factory=dict)  # increments
    pending_upserts: dict[str, Pending] = field(default_factory=dict)  # new or changed
    pending_seen: dict[Key, float] = field(default_factory=dict)  # unchanged: when seen again
    pending_removed: set[Key] = field(default_factory=set)
    prune_settled_before: float = 0.0
    complete_until: float | None = None  # None: unchanged
    late_records: int = 0  # new records first seen behind the cursor
    lateness: float = 0.0  # the latest of them: seconds from created_at to first sight
    error_info: dict[str, str] = field(default_factory=dict)
    window_add: dict[WindowKey, tuple[int, int]] = field(default_factory=dict)
    prune_window_before: int = 0
    new_messages: int = 0
    settled_by_timeout: int = 0
    sightings: dict[float, int] = field(default_factory=dict)  # created_at -> first sightings
    head_started: float | None = None  # an ordinary poll: when its head listing started
    receipt_ages: list[float] = field(default_factory=list)  # pending settled by a status: age

    @property
    def settled_count(self) -> int:
        return len(self.settled_ids)


@dataclass(slots=True)
class _Tiers:
    """Pending messages due for a refresh, sorted by tier for one poll's plan. Only keys and
    bounds are kept: a burst can make hundreds of thousands due at once."""

    recent_since: float
    head: float = math.inf  # where the head listing starts: the tiers are below it
    recent: list[Key] = field(default_factory=list)
    recent_oldest: float = math.inf  # created_at of the oldest of them
    recent_due: bool = False  # one of them has waited the recent tier's period
    timed_out: list[Key] = field(default_factory=list)
    timed_out_span: tuple[float, float] = (math.inf, -math.inf)  # their created_at, lowest, highest
    timeout_due: bool = False  # the first of them has waited the timeout tier's period
    middle_minutes: set[int] = field(default_factory=set)  # the minutes holding the middle tier

    def in_middle(self, created_at: float, now: float, timeout: float) -> bool:
        """Whether a pending message created then is in the middle tier."""
        return (
            created_at < self.recent_since
            and created_at < self.head
            and (created_at + timeout > now)
        )


@dataclass(slots=True)
class _MiddleDue:
    """The middle tier's messages due this poll: per minute of creation, the count, the bounds
    and the least recent observation of those no listing of the plan covers yet; and the most
    overdue, covered or not (the first found among equals)."""

    found: int = 0
    # minute -> [count, lowest and highest created_at, least recently observed]
    minutes: dict[int, list[float]] = field(default_factory=dict)
    most_overdue: list[tuple[float, int, Key, float]] = field(default_factory=list)  # a heap

    def add(
        self, key: Key, created_at: float, observed_at: float, overdue: float, covered: bool
    ) -> None:
        self.found += 1
        item = (overdue, -self.found, key, created_at)
        if len(self.most_overdue) < MIDDLE_GETS_PER_POLL:
            heapq.heappush(self.most_overdue, item)
        elif item > self.most_overdue[0]:
            heapq.heapreplace(self.most_overdue, item)
        if covered:
            return
        minute = int(created_at // MINUTE)
        bounds = self.minutes.get(minute)
        if bounds is None:
            self.minutes[minute] = [1, created_at, created_at, observed_at]
        else:
            bounds[0] += 1
            bounds[1] = min(bounds[1], created_at)
            bounds[2] = max(bounds[2], created_at)
            bounds[3] = min(bounds[3], observed_at)


@dataclass(slots=True)
class _Choice:
    """What a plan lists and gets, as the tiers add to it."""

    head_after: float
    ranges: list[Listing] = field(default_factory=list)
    gets: list[str] = field(default_factory=list)
    timeout_due: frozenset[str] = frozenset()
    capped: bool = False  # older pending messages are due beyond the refresh listing

    def covers(self, created_at: float) -> bool:
        return created_at >= self.head_after or any(
            lo <= created_at <= (math.inf if hi is None else hi) for lo, hi in self.ranges
        )


class Ledger:
    """One project's counting state and rules.

    `state.pending` and `state.settled` change only through `apply`.
    """

    def __init__(self, rules: Rules, state: LedgerState) -> None:
        self.rules = rules
        self.state = state
        self._histogram: dict[int, int] = {}
        self.windows = Windows()
        # Where the last ordinary poll's head listing started (not persisted: after a restart the
        # first poll sweeps from the cursor), and the ages at which pending messages settled.
        self._last_head: float | None = None
        self._late_ages = late_ages()
        self._schedule: Schedule | None = None
        # The last poll settled many pending messages by their receipts: the older ones are
        # likely to have theirs too, so the next poll refreshes the whole middle tier.
        self._receipt_burst = False
        for _, pending in state.pending.items():
            self._count_sighting(pending.created_at)

    # ----------------------------------------------------------------- planning
    def catch_up_step(self, now: float) -> PollPlan | None:
        """The next step of a catch-up: one window of creation time from the cursor on, with no
        refresh (pending messages wait for the ordinary polls, so a refresh never re-lists the
        backlog); None when the cursor is within a step of now."""
        # Between sweeps the cursor trails the head listings: what is left to list starts where
        # the last head listing (less the cursor's margin) or the cursor is, whichever is later.
        caught_up = now - CURSOR_SAFETY
        reach = self.state.cursor
        if self._last_head is not None:
            reach = max(reach, self._last_head - CURSOR_SAFETY)
        end = self.windows.end(self.state.cursor, reach, caught_up)
        if end is None:
            return None
        horizon = self.state.cursor - LISTING_SLACK
        floor = self.state.floor  # from where records may still be new (late ones)
        # Within max_ingestion_delay of now, listing each step from the floor would re-list the
        # same stretch again and again: only as a late sweep, or where it costs no more pages.
        start = floor if self._from_floor(now, self.schedule(), end, sweep=True) else horizon
        return PollPlan(now, ((start, end),), horizon, (), frozenset(), window_end=end, floor=floor)

    def schedule(self) -> Schedule:
        """The refresh tiers' cadence for this project's traffic (recomputed as it changes)."""
        if self._schedule is None:
            last = int(self.state.cursor // HISTOGRAM_BUCKET)
            recent = sum(self._histogram.get(m, 0) for m in range(last - RATE_MINUTES, last))
            self._schedule = schedule(
                self.rules.poll_interval,
                self.rules.page_size,
                recent / (RATE_MINUTES * HISTOGRAM_BUCKET),
                self._late_ages,
                LISTING_SLACK,
                CURSOR_SAFETY,
                self.rules.max_ingestion_delay,
            )
        return self._schedule

    def head_start(self, now: float, cadence: Schedule) -> float:
        """Where this poll's head listing starts: from the floor when a late sweep is due (and
        not listed on its own), from the cursor when a sweep is due (or after a restart), else a
        little before the previous head listing."""
        state = self.state
        horizon = state.cursor - LISTING_SLACK
        last = self._last_head
        sweep = last is None or now - state.cursor >= CURSOR_SAFETY + cadence.sweep_period
        start = horizon if sweep or last is None else max(horizon, last - cadence.head_overlap)
        late_apart = self._late_sweep_end(now, cadence, start) is not None
        if not late_apart and self._from_floor(now, cadence, None, sweep):
            return state.floor
        return start

    def _late_sweep_end(self, now: float, cadence: Schedule, head: float) -> float | None:
        """Where a late sweep listed apart from the head listing ends: max_ingestion_delay before
        now (every record created before has shown by now, and the newer ones are not complete
        anyway). None when no late sweep is due, or when one listing from the floor up to now,
        as the head listing, takes no more pages than the two."""
        state = self.state
        delay = self.rules.max_ingestion_delay
        if now - delay - state.complete_until < cadence.late_sweep_period:
            return None
        end = now - delay + LISTING_SLACK
        if end >= head:  # the head listing reaches it (from the floor, say): one listing
            return None
        pages = self._pages(state.floor, end) + self._pages(head, None)
        return None if pages >= self._pages(state.floor, None) else end

    def _from_floor(self, now: float, cadence: Schedule, until: float | None, sweep: bool) -> bool:
        """Whether a listing up to `until` starts from the floor, below the cursor: when a late
        sweep is due, or for a sweep that takes no more pages from there (a quiet project)."""
        state = self.state
        floor, horizon = state.floor, state.cursor - LISTING_SLACK
        if floor >= horizon:
            return False
        late = now - self.rules.max_ingestion_delay - state.complete_until
        if late >= cadence.late_sweep_period:
            return True
        return sweep and self._pages(floor, until) <= self._pages(horizon, until)

    def plan(self, now: float) -> PollPlan:
        """Decide this poll's listings and the pending messages to get by id (refresh tiers):
        sort the pending messages into tiers, then choose each tier's cheapest means."""
        cadence = self.schedule()
        horizon = self.state.cursor - LISTING_SLACK
        head = self.head_start(now, cadence)
        if head <= horizon:
            # The cadence follows the traffic at sweeps only (where the head listing starts does
            # not depend on it then). Between them the recent tier keeps the age its last sweep
            # re-listed: were it to grow, the messages that sweep left to the middle tier would
            # be due at once, and a poll later sweep again.
            self._schedule = None
            cadence = self.schedule()
        floor = self.state.floor
        late_end = self._late_sweep_end(now, cadence, head)
        tiers = self._tiers(now, head, cadence)
        choice = _Choice(head_after=head)
        if late_end is not None:  # the first range: the refreshes take it as covering
            choice.ranges.append((floor, late_end))
        self._refresh_recent(tiers, choice, horizon)
        self._refresh_timed_out(tiers, choice)
        self._refresh_middle(tiers, choice, now)
        self._recent_joins_burst(tiers, choice, horizon)
        if late_end is not None and choice.head_after <= late_end:
            # A refresh took the head listing down to the late sweep: one listing of the two.
            choice.head_after, late_end = floor, None
            del choice.ranges[0]
        return PollPlan(
            now,
            ((choice.head_after, None), *choice.ranges),
            horizon,
            tuple(choice.gets),
            choice.timeout_due,
            floor=floor,
            late_sweep_end=late_end,
            more_due=choice.capped,
        )

    def refresh_goes_on(self, plan: PollPlan, steps: int) -> bool:
        """Whether, `plan` committed and applied as this poll's `steps`-th, the poll plans again
        at once: its refresh listing was capped and it settled a burst of receipts."""
        return plan.more_due and self._receipt_burst and steps < BURST_STEPS

    def _tiers(self, now: float, head: float, cadence: Schedule) -> _Tiers:
        """The pending messages due for a refresh in the recent and timeout tiers, and the
        minutes holding the middle tier (those the head listing sees aside).

        Pending messages are indexed by minute of creation, so whole minutes the head listing
        covers, or wholly in the middle tier, are passed over at once."""
        interval, timeout = self.rules.poll_interval, self.rules.settle.timeout
        tiers = _Tiers(recent_since=now - cadence.recent_age, head=head)
        pending = self.state.pending
        # Batch the timeout tier: wait until the first has been due a few polls.
        timeout_wait = timeout + (cadence.timeout_every - 1) * interval
        recent_wait = (cadence.recent_every - 0.5) * interval
        for minute in pending.minutes():
            minute_start = minute * MINUTE
            minute_end = minute_start + MINUTE
            if minute_start + timeout > now:  # none timed out
                if minute_start >= head:
                    continue  # the head listing sees them all (the common case)
                if minute_end <= tiers.recent_since and minute_end <= head:
                    tiers.middle_minutes.add(minute)
                    continue
            for key, created, observed in pending.scan(minute):
                unseen = now - observed
                if created + timeout <= now:
                    tiers.timed_out.append(key)
                    low, high = tiers.timed_out_span
                    tiers.timed_out_span = (min(low, created), max(high, created))
                    tiers.timeout_due |= created + timeout_wait <= now
                elif created >= head:
                    continue  # the head listing sees it
                elif created >= tiers.recent_since:
                    if unseen >= interval * 0.5:
                        tiers.recent.append(key)
                        tiers.recent_oldest = min(tiers.recent_oldest, created)
                    tiers.recent_due |= unseen >= recent_wait
                else:
                    tiers.middle_minutes.add(minute)
        return tiers

    def _refresh_recent(self, tiers: _Tiers, choice: _Choice, horizon: float) -> None:
        """The recent tier, when due: the head listing from its oldest (a sweep too), or gets,
        whichever takes fewer requests."""
        if not (tiers.recent_due and tiers.recent):
            return
        oldest = tiers.recent_oldest
        extra = self._pages(oldest, None) - self._pages(choice.head_after, None)
        if extra < len(tiers.recent):
            choice.head_after = min(choice.head_after, oldest - LISTING_SLACK, horizon)
        else:
            choice.gets += map(id_of, tiers.recent)

    def _recent_joins_burst(self, tiers: _Tiers, choice: _Choice, horizon: float) -> None:
        """After a burst of receipts where older pending messages are most of what was created
        (a carrier's delayed receipts arriving), the recent tier's are likely in too: it is
        refreshed in this poll rather than at its period, where its listing and the plan's
        other refresh listings re-list at most rules.refresh_records records together."""
        if tiers.recent_due or not tiers.recent or not self._receipt_burst:
            return
        if not self._dense(tiers.middle_minutes):
            return
        records = self._records(tiers.recent_oldest, None)
        records += sum(self._records(low, high) for low, high in choice.ranges)
        if records <= self.rules.refresh_records:
            tiers.recent_due = True
            self._refresh_recent(tiers, choice, horizon)

    def _refresh_timed_out(self, tiers: _Tiers, choice: _Choice) -> None:
        """Messages past settle.timeout, when a batch is due: within the head listing's reach,
        a listing of their range, or gets, whichever takes fewer requests."""
        if not (tiers.timeout_due and tiers.timed_out):
            return
        ids = [id_of(key) for key in tiers.timed_out]
        choice.timeout_due = frozenset(ids)
        low, high = tiers.timed_out_span
        if high >= choice.head_after:
            choice.head_after = min(choice.head_after, low - LISTING_SLACK)
        elif self._pages(low, high) < len(ids):
            choice.ranges.append((low - LISTING_SLACK, high + LISTING_SLACK))
        else:
            choice.gets += sorted(ids)

    def _refresh_middle(self, tiers: _Tiers, choice: _Choice, now: float) -> None:
        """The middle tier's due messages, on the recent tier's polls (or when it has none, or
        after a burst of receipts): a listing of their range, from the one seen longest ago and up
        to rules.refresh_records re-listed, when it takes fewer requests than getting each; else
        the most overdue by id, MIDDLE_GETS_PER_POLL a poll, unless a listing of this poll
        covers them anyway."""
        # Only where pending messages are most of what was created (a receipt outage, not the
        # trickle of never-receipted ones of a busy day) is a listing or a burst worth its pages.
        dense = self._dense(tiers.middle_minutes)
        burst = self._receipt_burst and dense
        if tiers.recent and not tiers.recent_due and not burst:
            if dense:  # between the recent tier's polls, one get tells whether receipts came
                self._probe_middle(tiers, choice, now)
            return
        due = self._middle_due(tiers, choice, now, burst)
        if not due.found:
            if dense:
                self._probe_middle(tiers, choice, now)
            return
        if dense and due.minutes:
            low, high, count = self._least_seen_within_cap(due.minutes)
            if self._pages(low, high) < count:
                choice.ranges.append((low - LISTING_SLACK, high + LISTING_SLACK))
                choice.capped = count < sum(int(n) for n, *_ in due.minutes.values())
                return
        for _, _, key, created in sorted(due.most_overdue, reverse=True):
            if not choice.covers(created):
                choice.gets.append(id_of(key))

    def _middle_due(self, tiers: _Tiers, choice: _Choice, now: float, burst: bool) -> _MiddleDue:
        """The middle tier's messages due for a refresh: each once it has waited a quarter of
        its age (at least the recent tier's period), every one after a burst of receipts.
        Minutes where even the one seen longest ago has not waited that long are skipped."""
        pending = self.state.pending
        timeout = self.rules.settle.timeout
        min_wait = self.schedule().recent_every * self.rules.poll_interval
        due = _MiddleDue()
        for minute in sorted(tiers.middle_minutes):
            shortest_wait = max((now - (minute + 1) * MINUTE) / MIDDLE_AGE_DIVISOR, min_wait)
            if not burst and now - pending.seen_bound(minute) < shortest_wait:
                continue
            least_seen = math.inf
            for key, created, observed in pending.scan(minute):
                least_seen = min(least_seen, observed)
                if not tiers.in_middle(created, now, timeout):
                    continue
                unseen = now - observed
                wait = max((now - created) / MIDDLE_AGE_DIVISOR, min_wait)
                if burst or unseen >= wait:
                    due.add(key, created, observed, unseen / wait, choice.covers(created))
            pending.set_seen_bound(minute, least_seen)  # exact again
        return due

    def _least_seen_within_cap(self, minutes: dict[int, list[float]]) -> tuple[float, float, int]:
        """The due messages from the minute of the one seen longest ago (the oldest among
        equals) on, as far as a listing re-lists at most rules.refresh_records records (a
        minute's at least): their lowest and highest created_at, and how many. A burst's
        listings thus move on from poll to poll even where no receipt has come."""
        cap = max(1, self.rules.refresh_records // self.rules.page_size)
        start = min(minutes, key=lambda m: (minutes[m][3], m))
        low, high, count = math.inf, -math.inf, 0
        for minute in sorted(m for m in minutes if m >= start):
            n, lo, hi, _ = minutes[minute]
            if count and self._pages(low, hi) > cap:
                break
            low, high, count = min(low, lo), hi, count + int(n)
        return low, high, count

    def _dense(self, minutes: set[int]) -> bool:
        """Whether pending messages are at least half the records created in `minutes`."""
        held = sum(self.state.pending.count_in(m) for m in minutes)
        return held > 0 and held * 2 >= sum(self._histogram.get(m, 0) for m in minutes)

    def _probe_middle(self, tiers: _Tiers, choice: _Choice, now: float) -> None:
        """With none of the middle tier due but many of them (a listing of their minutes would
        take fewer requests than gets), get the one seen longest ago if it has waited the recent
        tier's period: one request that tells whether receipts are arriving for the old ones (a
        burst then refreshes them all at the next poll). A trickle of old pending messages is
        left to its own pace."""
        pending = self.state.pending
        minutes = tiers.middle_minutes
        if not minutes:
            return
        many = sum(pending.count_in(m) for m in minutes)
        if self._pages(min(minutes) * MINUTE, max(minutes) * MINUTE) >= many:
            return
        min_wait = self.schedule().recent_every * self.rules.poll_interval
        best: tuple[float, float, str] | None = None
        # The minutes' bounds are lower bounds: scan in their order until none can hold better.
        for bound, minute in sorted((pending.seen_bound(m), m) for m in tiers.middle_minutes):
            if best is not None and bound >= best[0]:
                break
            least = math.inf
            for key, created, observed in pending.scan(minute):
                least = min(least, observed)
                if not tiers.in_middle(created, now, self.rules.settle.timeout):
                    continue
                if best is not None and (observed, created) > best[:2]:
                    continue
                candidate = (observed, created, id_of(key))
                if best is None or candidate < best:
                    best = candidate
            pending.set_seen_bound(minute, least)
        if best is not None and now - best[0] >= min_wait and not choice.covers(best[1]):
            choice.gets.append(best[2])

    def _pages(self, since: float, until: float | None) -> int:
        """Pages a listing of [since, until] takes, from the first sightings per minute."""
        return max(1, math.ceil(self._records(since, until) / self.rules.page_size))

    def _records(self, since: float, until: float | None) -> int:
        """Records a listing of [since, until] re-lists (whole minutes of first sightings)."""
        first = int(since // HISTOGRAM_BUCKET)
        last = None if until is None else int(until // HISTOGRAM_BUCKET)
        return sum(
            n
            for minute, n in self._histogram.items()
            if minute >= first and (last is None or minute <= last)
        )

    def _count_sighting(self, created_at: float) -> None:
        minute = int(created_at // HISTOGRAM_BUCKET)
        self._histogram[minute] = self._histogram.get(minute, 0) + 1

    # ----------------------------------------------------------------- a poll
    def begin(self, plan: PollPlan) -> Batch:
        return Batch(self, plan)

    def apply(self, delta: PollDelta) -> None:
        """Make a committed poll's effects current."""
        state = self.state
        histogram = self._histogram
        for created_at, count in delta.sightings.items():
            minute = int(created_at // HISTOGRAM_BUCKET)
            histogram[minute] = histogram.get(minute, 0) + count
        state.cursor = delta.cursor
        if delta.complete_until is not None:
            state.complete_until = delta.complete_until
        if delta.head_started is not None:
            self._last_head = delta.head_started
        self._late_ages.extend(delta.receipt_ages)  # the cadence takes them in at a sweep
        pending = state.pending
        # A burst of receipts: many at once, or one for a message past the recent tier.
        recent_age = self.schedule().recent_age
        self._receipt_burst = len(delta.receipt_ages) >= max(
            BURST_RECEIPTS, BURST_SHARE * len(pending)
        ) or any(age >= recent_age for age in delta.receipt_ages)
        for ref in delta.pending_removed:
            pending.remove(ref)
        for message in delta.pending_upserts.values():
            pending.put(message.message, message.observed_at)
        # Never one just removed: a batch settles or times out only what it has not seen again.
        for ref, observed_at in delta.pending_seen.items():
            pending.seen(ref, observed_at)
        # Ids below the prune point would be forgotten at once: they are not taken in.
        state.settled.update(delta.settled_ids, since=delta.prune_settled_before)
        state.settled.prune(delta.prune_settled_before)
        for key, inc in delta.totals.items():
            state.totals.setdefault(key, Totals()).add(inc)
        for key, inc in delta.by_country.items():
            state.by_country.setdefault(key, Totals()).add(inc)
        for key, inc in delta.by_group.items():
            state.by_group.setdefault(key, Totals()).add(inc)
        state.error_info.update(delta.error_info)
        for wkey, (settled, failed) in delta.window_add.items():
            s, f = state.window.get(wkey, (0, 0))
            state.window[wkey] = (s + settled, f + failed)
        state.window = {k: v for k, v in state.window.items() if k[0] >= delta.prune_window_before}
        oldest_minute = int((delta.cursor - self.rules.settle.timeout - 3600) // HISTOGRAM_BUCKET)
        self._histogram = {m: n for m, n in histogram.items() if m >= oldest_minute}

    # ----------------------------------------------------------------- reading
    def pending_by_labels(self) -> dict[tuple[str, str, str], int]:
        """signalwire_messages_pending: direction, kind, latest status -> count."""
        counts: dict[tuple[str, str, str], int] = {}
        labels = self.state.label_values()
        for raw, count in self.state.pending.counts.items():
            key = labels.map(*raw)
            counts[key] = counts.get(key, 0) + count
        return counts

    def pending_oldest(self) -> dict[tuple[str, str, str], float]:
        """created_at of the oldest pending message, by direction, kind and latest status.

        Only the oldest minute holding each label set is looked at."""
        oldest: dict[tuple[str, str, str], float] = {}
        labels = self.state.label_values()
        for raw, created in self.state.pending.oldest().items():
            key = labels.map(*raw)
            if created < oldest.get(key, math.inf):
                oldest[key] = created
        return oldest

    def failure_ratios(self, now: float) -> dict[tuple[str, str], float]:
        """Share failed or undelivered of the messages settled in the window, by direction, kind."""
        since = now - self.rules.failure_ratio_window
        sums: dict[tuple[str, str], list[int]] = {}
        for (second, direction, kind), (settled, failed) in self.state.window.items():
            if second >= since:
                acc = sums.setdefault((direction, kind), [0, 0])
                acc[0] += settled
                acc[1] += failed
        return {key: failed / settled for key, (settled, failed) in sums.items() if settled}


class _Settled:
    """The messages of one raw label set settled in a poll, summed as they come (by country and
    number group too): a poll that settles a burst does not hold its records."""

    __slots__ = ("by_pair", "charge_nano", "messages", "segments")

    def __init__(self) -> None:
        self.messages = self.segments = self.charge_nano = 0
        self.by_pair: dict[tuple[str, str], Totals] = {}  # (country, number group) -> sums

    def add(self, segments: int, charge_nano: int, pair: tuple[str, str]) -> None:
        self.messages += 1
        self.segments += segments
        self.charge_nano += charge_nano
        totals = self.by_pair.get(pair)
        if totals is None:
            self.by_pair[pair] = Totals(1, segments, charge_nano)
        else:
            totals.messages += 1
            totals.segments += segments
            totals.charge_nano += charge_nano

    def copy(self) -> _Settled:
        other = _Settled()
        other.messages, other.segments, other.charge_nano = (
            self.messages,
            self.segments,
            self.charge_nano,
        )
        other.by_pair = {
            pair: Totals(t.messages, t.segments, t.charge_nano) for pair, t in self.by_pair.items()
        }
        return other


class Batch:
    """The observations of one poll, turned into a PollDelta by `close`.

    Most records settle on first sight. They are summed by their raw label set as they come, so
    `close` maps labels and error codes once per label set, and the records are not kept. A
    pending message seen again unchanged keeps only when it was seen.
    """

    def __init__(self, ledger: Ledger, plan: PollPlan) -> None:
        self.ledger = ledger
        self.plan = plan
        self.settled: dict[Key, float] = {}  # settled by a final status: key -> created_at
        # The latest observation of each unsettled message that is new, changed, or past its
        # timeout; of a pending message seen again unchanged, only when.
        self.seen: dict[str, Pending] = {}
        self.seen_again: dict[Key, float] = {}
        self.gone_ids: set[str] = set()
        self.new_messages = 0
        self.ignored = 0
        self.listed = 0  # records observed, duplicates included: the size of the poll
        state = ledger.state
        rules = ledger.rules
        self._committed = state.settled.keys
        self._pending = state.pending
        self._timeout = rules.settle.timeout
        self._number_groups = rules.number_groups
        # The final statuses, taken apart so the per-record test is two set lookups.
        self._final = rules.settle.final_statuses
        self._final_by_kind = rules.settle.final_statuses_by_kind
        floor = plan.horizon if plan.floor is None else plan.floor
        self._floor = max(state.start_point, floor)  # unknown records below are ignored
        self._cursor = state.cursor  # new records first seen behind it are late
        self.late = 0
        self.lateness = 0.0
        self._groups: dict[LabelKey, _Settled] = {}  # settled, by raw label set
        self._error_texts: dict[str, str] = {}  # raw error code -> latest settled error_message
        self._settled_pending: set[Key] = set()  # settled ones that were pending before this poll
        self._sightings: dict[float, int] = {}  # created_at -> messages first seen in this poll

    def observe(self, message: Message, at: float) -> None:
        """One record as listed or fetched at time `at`, duplicates and stale copies included."""
        self.observe_all((message,), at)

    def observed(self, message_id: str) -> bool:
        """Whether this poll has observed the message (or it was already settled)."""
        ref = key_of(message_id)
        return (
            ref in self.settled
            or ref in self._committed
            or message_id in self.seen
            or ref in self.seen_again
        )

    def observe_all(self, messages: Sequence[Message], at: float) -> None:
        """`observe` for each of `messages` (a page), with the loop's lookups hoisted.

        An observation older than one already made in this poll never overrides it."""
        settled, committed, seen, again_at = (
            self.settled,
            self._committed,
            self.seen,
            self.seen_again,
        )
        pending_keys = self._pending.keys
        final, final_by_kind = self._final, self._final_by_kind
        for message in messages:
            message_id = message[0]
            ref = key_of(message_id)
            if ref in settled or ref in committed:
                continue
            full = seen.get(message_id)
            again = again_at.get(ref) if full is None else None  # never in both
            was_pending = ref in pending_keys
            last = again if full is None else full.observed_at
            if last is not None:
                if last > at:
                    continue
            elif not was_pending and not self._first_sight(message, at):
                continue
            status = message[4]
            if status in final or status in final_by_kind.get(message[3], ()):
                self._settle(message, ref, was_pending)
            else:
                self._pend(message, ref, at, was_pending)
        self.listed += len(messages)

    def _first_sight(self, message: Message, at: float) -> bool:
        """A record neither pending nor settled: new, unless created before the floor."""
        created_at = message.created_at
        if created_at < self._floor:
            self.ignored += 1
            return False
        self.new_messages += 1
        self._sightings[created_at] = self._sightings.get(created_at, 0) + 1
        if created_at < self._cursor:
            self.late += 1
            self.lateness = max(self.lateness, at - created_at)
        return True

    def _settle(self, message: Message, ref: Key, was_pending: bool) -> None:
        """A record in a final status: its message settles with it (rules 2 and 3)."""
        message_id, created_at, direction, kind, status, code, text, segments, charge, *_ = message
        self.settled[ref] = created_at
        key = (direction, kind, status, code)
        group = self._groups.get(key)
        if group is None:
            group = self._groups[key] = _Settled()
        pair = (country_of(message.remote), self._number_groups.get(message.own, UNGROUPED))
        group.add(segments, charge, pair)
        if code and text:
            self._error_texts[code] = text
        self.seen.pop(message_id, None)
        self.seen_again.pop(ref, None)
        if was_pending:
            self._settled_pending.add(ref)

    def _pend(self, message: Message, ref: Key, at: float, was_pending: bool) -> None:
        """A record in a status that is not final: the message's latest observation."""
        if (
            was_pending
            and at < message.created_at + self._timeout
            and self._pending.same(message, ref)
        ):
            self.seen_again[ref] = at  # unchanged: nothing to write
            self.seen.pop(message[0], None)
        else:
            self.seen[message[0]] = _new_pending(Pending, (message, at))
            self.seen_again.pop(ref, None)

    def gone(self, message_id: str) -> None:
        """A pending message that SignalWire no longer knows (404 on get-by-id)."""
        if message_id in self.ledger.state.pending:
            self.gone_ids.add(message_id)

    def unrefreshed_timeout_due(self) -> list[str]:
        """Timeout-due pending messages this poll has not observed yet: fetch them by id."""
        return [
            i
            for i in sorted(self.plan.timeout_due)
            if not self.observed(i) and i not in self.gone_ids
        ]

    def close(self, now: float, listing_started: float) -> PollDelta:
        """Settle what this poll allows and compute the new cursor (rules 2-4, 6, 7).

        The batch itself is left as it was: closing twice gives the same delta.
        """
        rules = self.ledger.rules
        cursor = self._new_cursor(listing_started)
        complete = self._new_complete_until(listing_started)
        delta = PollDelta(
            cursor=cursor,
            complete_until=complete,
            late_records=self.late,
            lateness=self.lateness,
            head_started=listing_started if self.plan.window_end is None else None,
            receipt_ages=[now - self.settled[ref] for ref in self._settled_pending],
            new_messages=self.new_messages,
            # The batch's own: copied by _settle_the_rest before it adds to them (a burst of
            # receipts settles hundreds of thousands in a few polls: no copy of each).
            settled_ids=self.settled,
            pending_removed=self._settled_pending,
            pending_seen=dict(self.seen_again),
            sightings=dict(self._sightings),
        )
        groups = dict(self._groups)
        texts = dict(self._error_texts)
        self._settle_the_rest(now, delta, groups, texts)
        self._count(now, delta, groups, texts)
        # The settled ids are kept down to the next floor: below it no record is new.
        delta.prune_settled_before = min(complete, cursor) - LISTING_SLACK - 1.0
        delta.prune_window_before = int(now - rules.failure_ratio_window) - 1
        return delta

    def _new_cursor(self, listing_started: float) -> float:
        state = self.ledger.state
        # The cursor moves only with a listing from the cursor on (a sweep or a catch-up step).
        cursor = listing_started - CURSOR_SAFETY if self.plan.sweeps else state.cursor
        if self.plan.window_end is not None:
            # Everything created before the window's end has been listed (created_before is
            # inclusive or exclusive: one second less either way).
            cursor = min(cursor, self.plan.window_end - LISTING_SLACK)
        return max(state.cursor, cursor)

    def _new_complete_until(self, listing_started: float) -> float:
        state = self.ledger.state
        plan = self.plan
        if plan.late_sweep_end is not None:  # listed after the head: it has seen as much
            end = plan.late_sweep_end
        elif plan.listings[0][0] <= self._floor:
            end = math.inf if plan.window_end is None else plan.window_end
        else:
            return state.complete_until
        # A listing from the floor, started at listing_started, has seen every record that had
        # appeared by then: all those created max_ingestion_delay before, at the latest (those
        # up to its end: created_before is inclusive or exclusive, one second less either way).
        complete = min(listing_started - self.ledger.rules.max_ingestion_delay, end - LISTING_SLACK)
        # Nothing before the floor can be new: it predates the start point, or SignalWire's
        # history limit has taken it out of reach.
        return max(state.complete_until, complete, self._floor)

    def _settle_the_rest(
        self,
        now: float,
        delta: PollDelta,
        groups: dict[LabelKey, _Settled],
        texts: dict[str, str],
    ) -> None:
        """Messages settled by their timeout (rule 2, and 404s past it), after the first-sight
        settlements; the other observations become pending changes. `groups` is a copy of the
        batch's: the sums it changes are copied first."""
        state = self.ledger.state
        timeout = self.ledger.rules.settle.timeout
        number_groups = self.ledger.rules.number_groups
        copied: set[LabelKey] = set()

        def settle_late(message: Message) -> None:
            if delta.settled_ids is self.settled:
                delta.settled_ids = dict(self.settled)
                delta.pending_removed = set(self._settled_pending)
            ref = key_of(message.id)
            delta.settled_ids[ref] = message.created_at
            if ref in state.pending.keys:
                delta.pending_removed.add(ref)
            key = (message.direction, message.kind, message.status, message.error_code)
            group = groups.get(key)
            if group is None:
                group = groups[key] = _Settled()
            elif key not in copied:
                group = groups[key] = group.copy()  # the batch's own sums stay as they were
            copied.add(key)
            pair = (country_of(message.remote), number_groups.get(message.own, UNGROUPED))
            group.add(message.segments, message.charge_nano, pair)
            if message.error_code and message.error_message:
                texts[message.error_code] = message.error_message
            delta.settled_by_timeout += 1

        for message_id, pending in self.seen.items():
            # Rule 2: past the timeout, settle with the status observed after the timeout.
            # The others are new or changed (observe keeps only when of an unchanged one).
            if pending.observed_at >= pending.message.created_at + timeout:
                settle_late(pending.message)
            else:
                delta.pending_upserts[message_id] = pending
        for message_id in self.gone_ids:
            if self.observed(message_id):
                continue
            last = state.pending.record(message_id)
            if last is not None and last.created_at + timeout <= now:
                settle_late(last)

    def _count(
        self,
        now: float,
        delta: PollDelta,
        groups: dict[LabelKey, _Settled],
        texts: dict[str, str],
    ) -> None:
        """The settled sums as counter increments, under the caps on label values."""
        state, rules = self.ledger.state, self.ledger.rules
        codes = state.error_codes()
        countries = state.countries()
        labels = state.label_values()
        second = int(now)
        # Label sets in order of first settlement: new error codes and label values are admitted
        # in the same order as message by message.
        for (direction, kind, status, code), group in groups.items():
            if code and code not in codes:
                if len(codes) < rules.max_error_codes:
                    codes.add(code)
                else:
                    code = OTHER_ERROR_CODE
            direction, kind, label_status = labels.map(direction, kind, status)
            inc = delta.totals.setdefault((direction, kind, label_status, code), Totals())
            count = group.messages
            inc.messages += count
            inc.segments += group.segments
            inc.charge_nano += group.charge_nano
            self._dimensions(group, (direction, kind, label_status), countries, delta)
            wkey = (second, direction, kind)
            settled, failed = delta.window_add.get(wkey, (0, 0))
            failed += count if status in FAILED_STATUSES else 0
            delta.window_add[wkey] = (settled + count, failed)
        for code, text in texts.items():
            if code in codes and code != OTHER_ERROR_CODE:
                delta.error_info[code] = text

    def _dimensions(
        self,
        group: _Settled,
        labels: tuple[str, str, str],
        countries: set[str],
        delta: PollDelta,
    ) -> None:
        """Add settled messages of one label set to the counters by country and number group.

        A new country is admitted while fewer than limits.max_countries are; past that it counts
        as "other", so the sums stay those of signalwire_messages_total."""
        limit = self.ledger.rules.max_countries
        for (country, number_group), totals in group.by_pair.items():
            if country != UNKNOWN and country not in countries:
                if len(countries) < limit:
                    countries.add(country)
                else:
                    country = OTHER_LABEL_VALUE
            delta.by_country.setdefault((*labels, country), Totals()).add(totals)
            delta.by_group.setdefault((*labels, number_group), Totals()).add(totals)
