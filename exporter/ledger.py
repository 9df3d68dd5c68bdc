"""The counting rules of the contract (§3), as pure logic: no I/O, the time is always passed in.

One poll of a project is one `Batch`:

    plan = ledger.plan(now)                 # what to list and which pending messages to get by id
    batch = ledger.begin(plan)
    batch.observe(message, at) ...          # every record listed or fetched, duplicates too
    batch.gone(message_id, at) ...          # a get-by-id answered 404
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
`Schedule.late_sweep_period`, moves `complete_until` on.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from operator import attrgetter, itemgetter
from typing import Any, NamedTuple

from exporter.catchup import Windows
from exporter.config import Config, SettleConfig
from exporter.countries import UNKNOWN, country_of
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
# Pending messages are indexed by minute of creation, so planning skips the many that the head
# listing sees anyway without looking at them one by one.
PENDING_BUCKET = 60


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
    """A message seen but not yet settled: its latest record and when that was observed."""

    message: Message
    observed_at: float


# Builds a Pending from a tuple of its fields without the keyword-handling constructor.
_new_pending: Callable[[type[Pending], tuple[Any, ...]], Pending] = tuple.__new__
_segments_of = attrgetter("segments")
_charge_of = attrgetter("charge_nano")


@dataclass
class LedgerState:
    """Everything a project's counting needs across restarts; the store persists exactly this."""

    start_point: float
    cursor: float
    pending: dict[str, Pending] = field(default_factory=dict)
    settled: dict[str, float] = field(default_factory=dict)  # id -> created_at, recent ones only
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

    def of(self, message: Message) -> tuple[str, str, str]:
        return self.map(message.direction, message.kind, message.status)

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
    settled_ids: dict[str, float] = field(default_factory=dict)  # id -> created_at
    totals: dict[LabelKey, Totals] = field(default_factory=dict)  # increments
    by_country: dict[DimensionKey, Totals] = field(default_factory=dict)  # increments
    by_group: dict[DimensionKey, Totals] = field(default_factory=dict)  # increments
    pending_upserts: dict[str, Pending] = field(default_factory=dict)  # new or changed
    pending_seen: dict[str, float] = field(default_factory=dict)  # unchanged: when seen again
    pending_removed: set[str] = field(default_factory=set)
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
    """Pending messages due for a refresh, sorted by tier for one poll's plan."""

    recent_since: float
    recent: list[Pending] = field(default_factory=list)
    recent_due: bool = False  # one of them has waited the recent tier's period
    timed_out: list[Pending] = field(default_factory=list)
    timeout_due: bool = False  # the first of them has waited the timeout tier's period
    middle: list[tuple[float, Pending]] = field(default_factory=list)  # (overdue, message)


@dataclass(slots=True)
class _Choice:
    """What a plan lists and gets, as the tiers add to it."""

    head_after: float
    ranges: list[Listing] = field(default_factory=list)
    gets: list[str] = field(default_factory=list)
    timeout_due: frozenset[str] = frozenset()


class Ledger:
    """One project's counting state and rules.

    `state.pending` and `state.settled` change only through `apply`, which keeps the indexes
    below in step with them.
    """

    def __init__(self, rules: Rules, state: LedgerState) -> None:
        self.rules = rules
        self.state = state
        self._histogram: dict[int, int] = {}
        # Kept up to date by apply(), so neither a poll nor a scrape walks every message: per raw
        # label set, the count of pending messages and their count per minute of creation.
        self._pending_counts: dict[tuple[str, str, str], int] = {}
        self._pending_minutes: dict[tuple[str, str, str], dict[int, int]] = {}
        # Recently settled ids in the groups they were settled in, each with its oldest created_at:
        # pruning looks only at the groups old enough to hold something to prune.
        self._settled_groups: list[tuple[float, dict[str, float]]] = []
        self._settled_oldest = math.inf
        if state.settled:
            self._settled_oldest = min(state.settled.values())
            self._settled_groups.append((self._settled_oldest, dict(state.settled)))
        # state.pending by minute of creation: planning skips whole minutes at once.
        self._pending_index: dict[int, dict[str, Pending]] = {}
        # Per minute, a lower bound of its messages' observed_at: a minute of the middle tier
        # where none can be due yet is skipped whole.
        self._seen_bound: dict[int, float] = {}
        self._indexed = 0
        self.windows = Windows()
        # Where the last ordinary poll's head listing started (not persisted: after a restart the
        # first poll sweeps from the cursor), and the ages at which pending messages settled.
        self._last_head: float | None = None
        self._late_ages = late_ages()
        self._schedule: Schedule | None = None
        for pending in state.pending.values():
            self._count_sighting(pending.message.created_at)
            self._count_pending(pending.message, 1)
        self._reindex_pending()

    def _count_pending(self, message: Message, change: int) -> None:
        key = (message.direction, message.kind, message.status)
        count = self._pending_counts.get(key, 0) + change
        minutes = self._pending_minutes.setdefault(key, {})
        bucket = int(message.created_at // PENDING_BUCKET)
        in_bucket = minutes.get(bucket, 0) + change
        if in_bucket:
            minutes[bucket] = in_bucket
        else:
            del minutes[bucket]
        if count:
            self._pending_counts[key] = count
        else:
            del self._pending_counts[key]
            del self._pending_minutes[key]

    def _reindex_pending(self) -> None:
        self._pending_index = {}
        self._seen_bound = {}
        self._indexed = 0
        for message_id, pending in self.state.pending.items():
            self._index_pending(message_id, pending)

    def _index_pending(self, message_id: str, pending: Pending) -> None:
        """Add or replace a pending message in the index (its created_at unchanged)."""
        bucket = int(pending.message.created_at // PENDING_BUCKET)
        bound = self._seen_bound.get(bucket)
        if bound is None or pending.observed_at < bound:
            self._seen_bound[bucket] = pending.observed_at
        members = self._pending_index.get(bucket)
        if members is None:
            self._pending_index[bucket] = {message_id: pending}
            self._indexed += 1
        else:
            self._indexed += message_id not in members
            members[message_id] = pending

    def _unindex_pending(self, message_id: str, created_at: float) -> None:
        bucket = int(created_at // PENDING_BUCKET)
        members = self._pending_index.get(bucket)
        if members is not None and members.pop(message_id, None) is not None:
            self._indexed -= 1
            if not members:
                del self._pending_index[bucket]
                del self._seen_bound[bucket]

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
        start = min(horizon, floor)
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
        """Where this poll's head listing starts: from the floor when a late sweep is due, from
        the cursor when a sweep is due (or after a restart), else a little before the previous
        head listing."""
        state = self.state
        horizon = state.cursor - LISTING_SLACK
        floor = state.floor
        last = self._last_head
        sweep = last is None or now - state.cursor >= CURSOR_SAFETY + cadence.sweep_period
        if floor < horizon:
            late = now - self.rules.max_ingestion_delay - state.complete_until
            if late >= cadence.late_sweep_period:
                return floor
            # A sweep that takes no more pages from the floor (a quiet project) goes from there.
            if sweep and self._pages(floor, None) <= self._pages(horizon, None):
                return floor
        if sweep:
            return horizon
        assert last is not None
        return max(horizon, last - cadence.head_overlap)

    def plan(self, now: float) -> PollPlan:
        """Decide this poll's listings and the pending messages to get by id (refresh tiers):
        sort the pending messages into tiers, then choose each tier's cheapest means."""
        cadence = self.schedule()
        horizon = self.state.cursor - LISTING_SLACK
        head = self.head_start(now, cadence)
        tiers = self._tiers(now, head, cadence)
        choice = _Choice(head_after=head)
        self._refresh_recent(tiers, choice, horizon)
        self._refresh_timed_out(tiers, choice)
        self._refresh_middle(tiers, choice, now)
        return PollPlan(
            now,
            ((choice.head_after, None), *choice.ranges),
            horizon,
            tuple(choice.gets),
            choice.timeout_due,
            floor=self.state.floor,
        )

    def _tiers(self, now: float, head: float, cadence: Schedule) -> _Tiers:
        """The pending messages due for a refresh, by tier (those the head listing sees aside).

        Pending messages are indexed by minute of creation, so whole minutes the head listing
        covers, or in the middle tier with none due yet, are passed over at once."""
        interval, timeout = self.rules.poll_interval, self.rules.settle.timeout
        tiers = _Tiers(recent_since=now - cadence.recent_age)
        if self._indexed != len(self.state.pending):
            self._reindex_pending()  # a safety net: nothing but apply() should change pending
        min_wait = cadence.recent_every * interval
        index = self._pending_index
        for bucket in sorted(index):
            bucket_start = bucket * PENDING_BUCKET
            bucket_end = bucket_start + PENDING_BUCKET
            if bucket_start + timeout > now:  # none timed out
                if bucket_start >= head:
                    continue  # the head listing sees them all (the common case)
                if bucket_end <= tiers.recent_since and bucket_end <= head:
                    self._middle_bucket(bucket, now, min_wait, tiers)
                    continue
            for pending in index[bucket].values():
                created = pending.message.created_at
                unseen = now - pending.observed_at
                if created + timeout <= now:
                    tiers.timed_out.append(pending)
                    # Batch the timeout tier: wait until the first has been due a few polls.
                    waited = (cadence.timeout_every - 1) * interval
                    tiers.timeout_due |= created + timeout + waited <= now
                elif created >= head:
                    continue  # the head listing sees it
                elif created >= tiers.recent_since:
                    if unseen >= interval * 0.5:
                        tiers.recent.append(pending)
                    tiers.recent_due |= unseen >= (cadence.recent_every - 0.5) * interval
                else:
                    wait = max((now - created) / MIDDLE_AGE_DIVISOR, min_wait)
                    if unseen >= wait:
                        tiers.middle.append((unseen / wait, pending))
        return tiers

    def _middle_bucket(self, bucket: int, now: float, min_wait: float, tiers: _Tiers) -> None:
        """A minute wholly in the middle tier: the same test as in _tiers without the tier
        checks, and none of it when even the longest unseen is not due yet."""
        shortest_wait = max((now - (bucket + 1) * PENDING_BUCKET) / MIDDLE_AGE_DIVISOR, min_wait)
        if now - self._seen_bound[bucket] < shortest_wait:
            return
        least_seen = math.inf
        for pending in self._pending_index[bucket].values():
            observed = pending.observed_at
            if observed < least_seen:
                least_seen = observed
            unseen = now - observed
            if unseen < min_wait:
                continue
            wait = (now - pending.message.created_at) / MIDDLE_AGE_DIVISOR
            if wait < min_wait:
                wait = min_wait
            if unseen >= wait:
                tiers.middle.append((unseen / wait, pending))
        self._seen_bound[bucket] = least_seen  # exact again

    def _refresh_recent(self, tiers: _Tiers, choice: _Choice, horizon: float) -> None:
        """The recent tier, when due: the head listing from its oldest (a sweep too), or gets,
        whichever takes fewer requests."""
        if not (tiers.recent_due and tiers.recent):
            return
        oldest = min(p.message.created_at for p in tiers.recent)
        extra = self._pages(oldest, None) - self._pages(choice.head_after, None)
        if extra < len(tiers.recent):
            choice.head_after = min(oldest - LISTING_SLACK, horizon)
        else:
            choice.gets += [p.message.id for p in tiers.recent]

    def _refresh_timed_out(self, tiers: _Tiers, choice: _Choice) -> None:
        """Messages past settle.timeout, when a batch is due: within the head listing's reach,
        a listing of their range, or gets, whichever takes fewer requests."""
        if not (tiers.timeout_due and tiers.timed_out):
            return
        choice.timeout_due = frozenset(p.message.id for p in tiers.timed_out)
        low = min(p.message.created_at for p in tiers.timed_out)
        high = max(p.message.created_at for p in tiers.timed_out)
        if high >= choice.head_after:
            choice.head_after = min(choice.head_after, low - LISTING_SLACK)
        elif self._pages(low, high) < len(tiers.timed_out):
            choice.ranges.append((low - LISTING_SLACK, high + LISTING_SLACK))
        else:
            choice.gets += sorted(choice.timeout_due)

    @staticmethod
    def _refresh_middle(tiers: _Tiers, choice: _Choice, now: float) -> None:
        """The most overdue of the middle tier by id, on the recent tier's polls (or when it has
        none), unless a listing of this poll covers them anyway."""
        if tiers.recent and not tiers.recent_due:
            return
        for _, pending in heapq.nlargest(MIDDLE_GETS_PER_POLL, tiers.middle, key=itemgetter(0)):
            created = pending.message.created_at
            covered = created >= choice.head_after or any(
                lo <= created <= (hi or now) for lo, hi in choice.ranges
            )
            if not covered:
                choice.gets.append(pending.message.id)

    def _pages(self, since: float, until: float | None) -> int:
        """Pages a listing of [since, until] takes, from the first sightings per minute."""
        first = int(since // HISTOGRAM_BUCKET)
        last = None if until is None else int(until // HISTOGRAM_BUCKET)
        count = sum(
            n
            for minute, n in self._histogram.items()
            if minute >= first and (last is None or minute <= last)
        )
        return max(1, math.ceil(count / self.rules.page_size))

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
        if delta.receipt_ages or delta.sightings:
            self._late_ages.extend(delta.receipt_ages)
            self._schedule = None  # the traffic has moved: recompute the cadence
        pendings = state.pending
        for message_id in delta.pending_removed:
            removed = pendings.pop(message_id, None)
            if removed is not None:
                self._count_pending(removed.message, -1)
                self._unindex_pending(message_id, removed.message.created_at)
        for message_id, pending in delta.pending_upserts.items():
            previous = pendings.get(message_id)
            if previous is not None:
                self._count_pending(previous.message, -1)
                if previous.message.created_at != pending.message.created_at:
                    self._unindex_pending(message_id, previous.message.created_at)
            self._count_pending(pending.message, 1)
            self._index_pending(message_id, pending)
            pendings[message_id] = pending
        for message_id, observed_at in delta.pending_seen.items():
            known = pendings.get(message_id)
            if known is not None and message_id not in delta.pending_removed:
                seen_again = _new_pending(Pending, (known.message, observed_at))
                self._index_pending(message_id, seen_again)
                pendings[message_id] = seen_again
        if delta.settled_ids:
            settled_now = dict(delta.settled_ids)
            state.settled.update(settled_now)
            oldest = min(settled_now.values())
            self._settled_groups.append((oldest, settled_now))
            self._settled_oldest = min(self._settled_oldest, oldest)
        self._prune_settled(delta.prune_settled_before)
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

    def _prune_settled(self, before: float) -> None:
        """Forget the settled ids created before `before`: they can no longer be re-listed."""
        if self._settled_oldest >= before:
            return
        groups = self._settled_groups
        settled = self.state.settled
        kept: list[tuple[float, dict[str, float]]] = []
        for oldest, group in groups:
            if oldest >= before:
                kept.append((oldest, group))
                continue
            rest: dict[str, float] = {}
            for message_id, created_at in group.items():
                if created_at >= before:
                    rest[message_id] = created_at
                elif settled.get(message_id) == created_at:  # not settled again since
                    del settled[message_id]
            if rest:
                kept.append((min(rest.values()), rest))
        self._settled_groups = kept
        self._settled_oldest = min((oldest for oldest, _ in kept), default=math.inf)

    # ----------------------------------------------------------------- reading
    def pending_by_labels(self) -> dict[tuple[str, str, str], int]:
        """signalwire_messages_pending: direction, kind, latest status -> count."""
        counts: dict[tuple[str, str, str], int] = {}
        labels = self.state.label_values()
        for raw, count in self._pending_counts.items():
            key = labels.map(*raw)
            counts[key] = counts.get(key, 0) + count
        return counts

    def pending_oldest(self) -> dict[tuple[str, str, str], float]:
        """created_at of the oldest pending message, by direction, kind and latest status.

        Only the oldest minute holding each label set is looked at."""
        oldest: dict[tuple[str, str, str], float] = {}
        labels = self.state.label_values()
        for raw, minutes in self._pending_minutes.items():
            bucket = min(minutes)
            members = self._pending_index.get(bucket, {}).values()
            created = min(
                (
                    p.message.created_at
                    for p in members
                    if (p.message.direction, p.message.kind, p.message.status) == raw
                ),
                default=bucket * PENDING_BUCKET,
            )
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


class Batch:
    """The observations of one poll, turned into a PollDelta by `close`.

    Most records settle on first sight. Those are grouped by their raw label set as they come, so
    `close` maps labels and error codes once per label set instead of once per message.
    """

    def __init__(self, ledger: Ledger, plan: PollPlan) -> None:
        self.ledger = ledger
        self.plan = plan
        self.settled: dict[str, float] = {}  # id -> created_at, settled by a final status
        self.seen: dict[str, Pending] = {}  # latest observation of each unsettled message
        self.gone_ids: set[str] = set()
        self.new_messages = 0
        self.ignored = 0
        self.listed = 0  # records observed, duplicates included: the size of the poll
        state = ledger.state
        settle = ledger.rules.settle
        self._committed = state.settled
        self._pending = state.pending
        # SettleConfig.is_final, taken apart so the per-record test is two set lookups.
        self._final = settle.final_statuses
        self._final_by_kind = settle.final_statuses_by_kind
        floor = plan.horizon if plan.floor is None else plan.floor
        self._floor = max(state.start_point, floor)  # unknown records below are ignored
        self._cursor = state.cursor  # new records first seen behind it are late
        self.late = 0
        self.lateness = 0.0
        self._groups: dict[LabelKey, list[Message]] = {}  # settled, by raw label set
        self._error_texts: dict[str, str] = {}  # raw error code -> latest settled error_message
        self._settled_pending: list[str] = []  # settled ids that were pending before this poll
        self._sightings: dict[float, int] = {}  # created_at -> messages first seen in this poll

    def observe(self, message: Message, at: float) -> None:
        """One record as listed or fetched at time `at`, duplicates and stale copies included."""
        self.observe_all((message,), at)

    def observe_all(self, messages: Sequence[Message], at: float) -> None:
        """`observe` for each of `messages` (a page), with the loop's lookups hoisted.

        An observation older than one already made in this poll never overrides it."""
        settled, committed, pending, seen = self.settled, self._committed, self._pending, self.seen
        groups, texts, sightings = self._groups, self._error_texts, self._sightings
        settled_pending = self._settled_pending
        final, final_by_kind, floor = self._final, self._final_by_kind, self._floor
        cursor = self._cursor
        new_messages = ignored = 0
        for message in messages:
            message_id, created_at, direction, kind, status, code, text, _, _, _, _ = message
            if message_id in settled or message_id in committed:
                continue
            in_seen = message_id in seen
            if in_seen:
                if seen[message_id].observed_at > at:
                    continue  # an older observation arriving late never overrides a newer one
            elif message_id not in pending:
                if created_at < floor:
                    ignored += 1
                    continue
                new_messages += 1
                sightings[created_at] = sightings.get(created_at, 0) + 1
                if created_at < cursor:
                    self.late += 1
                    self.lateness = max(self.lateness, at - created_at)
            if status in final or status in final_by_kind.get(kind, ()):
                settled[message_id] = created_at
                key = (direction, kind, status, code)
                group = groups.get(key)
                if group is None:
                    groups[key] = [message]
                else:
                    group.append(message)
                if code and text:
                    texts[code] = text
                if in_seen:
                    del seen[message_id]
                if message_id in pending:
                    settled_pending.append(message_id)
            else:
                seen[message_id] = _new_pending(Pending, (message, at))
        self.new_messages += new_messages
        self.ignored += ignored
        self.listed += len(messages)

    def gone(self, message_id: str, at: float) -> None:
        """A pending message that SignalWire no longer knows (404 on get-by-id)."""
        if message_id in self.ledger.state.pending:
            self.gone_ids.add(message_id)

    def unrefreshed_timeout_due(self) -> list[str]:
        """Timeout-due pending messages this poll has not observed yet: fetch them by id."""
        return [
            i
            for i in sorted(self.plan.timeout_due)
            if i not in self.settled and i not in self.seen and i not in self.gone_ids
        ]

    def close(self, now: float, listing_started: float) -> PollDelta:
        """Settle what this poll allows and compute the new cursor (rules 2-4, 6, 7).

        The batch itself is left as it was: closing twice gives the same delta.
        """
        state, rules = self.ledger.state, self.ledger.rules
        timeout = rules.settle.timeout
        # The cursor moves only with a listing from the cursor on (a sweep or a catch-up step).
        cursor = listing_started - CURSOR_SAFETY if self.plan.sweeps else state.cursor
        if self.plan.window_end is not None:
            # Everything created before the window's end has been listed (created_before is
            # inclusive or exclusive: one second less either way).
            cursor = min(cursor, self.plan.window_end - LISTING_SLACK)
        cursor = max(state.cursor, cursor)
        complete = state.complete_until
        if self.plan.listings[0][0] <= self._floor:
            # A listing from the floor, started at listing_started, has seen every record that
            # had appeared by then: all those created max_ingestion_delay before, at the latest.
            complete = listing_started - rules.max_ingestion_delay
            if self.plan.window_end is not None:
                complete = min(complete, self.plan.window_end - LISTING_SLACK)
            # Nothing before the floor can be new: it predates the start point, or SignalWire's
            # history limit has taken it out of reach.
            complete = max(state.complete_until, complete, self._floor)
        delta = PollDelta(
            cursor=cursor,
            complete_until=complete,
            late_records=self.late,
            lateness=self.lateness,
            head_started=listing_started if self.plan.window_end is None else None,
            receipt_ages=[now - self.settled[i] for i in self._settled_pending],
            new_messages=self.new_messages,
            settled_ids=dict(self.settled),
            pending_removed=set(self._settled_pending),
            sightings=dict(self._sightings),
        )
        groups = dict(self._groups)
        texts = dict(self._error_texts)

        def settle_late(message: Message) -> None:
            # After the first-sight settlements, in the order the per-message rules use.
            delta.settled_ids[message.id] = message.created_at
            if message.id in state.pending:
                delta.pending_removed.add(message.id)
            key = (message.direction, message.kind, message.status, message.error_code)
            groups[key] = [*groups.get(key, ()), message]
            if message.error_code and message.error_message:
                texts[message.error_code] = message.error_message
            delta.settled_by_timeout += 1

        for message_id, pending in self.seen.items():
            # Rule 2: past the timeout, settle with the status observed after the timeout.
            if pending.observed_at >= pending.message.created_at + timeout:
                settle_late(pending.message)
            elif (known := state.pending.get(message_id)) is not None and (
                known.message == pending.message
            ):
                delta.pending_seen[message_id] = pending.observed_at  # nothing to write
            else:
                delta.pending_upserts[message_id] = pending
        for message_id in self.gone_ids:
            if message_id in self.settled or message_id in self.seen:
                continue
            last = state.pending[message_id]
            if last.message.created_at + timeout <= now:
                settle_late(last.message)
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
            key = (direction, kind, label_status, code)
            inc = delta.totals.get(key)
            if inc is None:
                inc = delta.totals[key] = Totals()
            count = len(group)
            inc.messages += count
            inc.segments += sum(map(_segments_of, group))
            inc.charge_nano += sum(map(_charge_of, group))
            self._dimensions(group, (direction, kind, label_status), countries, delta)
            wkey = (second, direction, kind)
            settled, failed = delta.window_add.get(wkey, (0, 0))
            failed += count if status in FAILED_STATUSES else 0
            delta.window_add[wkey] = (settled + count, failed)
        for code, text in texts.items():
            if code in codes and code != OTHER_ERROR_CODE:
                delta.error_info[code] = text
        # The settled ids are kept down to the next floor: below it no record is new.
        delta.prune_settled_before = min(complete, cursor) - LISTING_SLACK - 1.0
        delta.prune_window_before = int(now - rules.failure_ratio_window) - 1
        return delta

    def _dimensions(
        self,
        group: list[Message],
        labels: tuple[str, str, str],
        countries: set[str],
        delta: PollDelta,
    ) -> None:
        """Add settled messages of one label set to the counters by country and number group.

        A new country is admitted while fewer than limits.max_countries are; past that it counts
        as "other", so the sums stay those of signalwire_messages_total."""
        number_groups = self.ledger.rules.number_groups
        by_pair: dict[tuple[str, str], Totals] = {}
        for message in group:
            pair = (country_of(message.remote), number_groups.get(message.own, UNGROUPED))
            totals = by_pair.get(pair)
            if totals is None:
                totals = by_pair[pair] = Totals()
            totals.messages += 1
            totals.segments += message.segments
            totals.charge_nano += message.charge_nano
        limit = self.ledger.rules.max_countries
        for (country, number_group), totals in by_pair.items():
            if country != UNKNOWN and country not in countries:
                if len(countries) < limit:
                    countries.add(country)
                else:
                    country = OTHER_LABEL_VALUE
            delta.by_country.setdefault((*labels, country), Totals()).add(totals)
            delta.by_group.setdefault((*labels, number_group), Totals()).add(totals)


def new_state(now: float, start_from: float) -> LedgerState:
    """The state of a project seen for the first time: its start point is now minus start_from."""
    start = now - start_from
    return LedgerState(start_point=start, cursor=start)
