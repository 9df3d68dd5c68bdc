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

Why the horizon: the API has no "changed since" filter, so a poll re-lists from a little before
the cursor. A re-listed record that is neither pending nor among the recently settled ids and was
created before the horizon has already been dealt with (or predates the start point), so it is
ignored; the ids of messages settled after the horizon are kept, so re-listing them never counts
them again.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field

from exporter.config import SettleConfig
from exporter.records import Message

LabelKey = tuple[str, str, str, str]  # direction, kind, status, error_code
WindowKey = tuple[int, str, str]  # settlement second, direction, kind
FAILED_STATUSES = frozenset({"failed", "undelivered"})
OTHER_ERROR_CODE = "other"
OTHER_LABEL_VALUE = "other"
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
# Refresh tiers. The API has no "changed since" filter, so seeing a status change costs a request:
# a re-listed page or a get-by-id. Most receipts come within seconds (the head listing sees them);
# pending messages up to RECENT_AGE old are refreshed together every RECENT_EVERY_POLLS polls, so a
# late receipt settles within a few polls; older ones are refreshed by id on those same polls, at
# most MIDDLE_GETS_PER_POLL each time, every age/MIDDLE_AGE_DIVISOR; past settle.timeout they are
# refreshed in batches every TIMEOUT_EVERY_POLLS polls and settle as they stand.
RECENT_AGE = 600.0
RECENT_EVERY_POLLS = 4
MIDDLE_AGE_DIVISOR = 4.0
MIDDLE_GETS_PER_POLL = 1
TIMEOUT_EVERY_POLLS = 3
# First-sighting counts per minute, kept this long, estimate the cost of re-listing a time range.
HISTOGRAM_BUCKET = 60


@dataclass(slots=True)
class Totals:
    messages: int = 0
    segments: int = 0
    charge_nano: int = 0

    def add(self, other: Totals) -> None:
        self.messages += other.messages
        self.segments += other.segments
        self.charge_nano += other.charge_nano


@dataclass(frozen=True, slots=True)
class Pending:
    """A message seen but not yet settled: its latest record and when that was observed."""

    message: Message
    observed_at: float


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

    def error_codes(self) -> set[str]:
        return {k[3] for k in self.totals if k[3] not in ("", OTHER_ERROR_CODE)}

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


Listing = tuple[float, float | None]  # created_after, created_before (None: up to now)


@dataclass(frozen=True, slots=True)
class PollPlan:
    now: float
    listings: tuple[Listing, ...]  # the head listing first (it moves the cursor), then ranges
    horizon: float  # unknown records created before this are ignored
    get_ids: tuple[str, ...]  # pending messages to refresh by id
    timeout_due: frozenset[str]  # past settle.timeout, refreshed (and settled) this poll

    @property
    def created_after(self) -> float:
        return self.listings[0][0]


@dataclass
class PollDelta:
    """What one poll changes; committed by the store, then applied to the ledger."""

    cursor: float
    settled_ids: dict[str, float] = field(default_factory=dict)  # id -> created_at
    totals: dict[LabelKey, Totals] = field(default_factory=dict)  # increments
    pending_upserts: dict[str, Pending] = field(default_factory=dict)  # new or changed
    pending_seen: dict[str, float] = field(default_factory=dict)  # unchanged: when seen again
    pending_removed: set[str] = field(default_factory=set)
    prune_settled_before: float = 0.0
    error_info: dict[str, str] = field(default_factory=dict)
    window_add: dict[WindowKey, tuple[int, int]] = field(default_factory=dict)
    prune_window_before: int = 0
    new_messages: int = 0
    settled_by_timeout: int = 0

    @property
    def settled_count(self) -> int:
        return len(self.settled_ids)


class Ledger:
    """One project's counting state and rules."""

    def __init__(self, rules: Rules, state: LedgerState) -> None:
        self.rules = rules
        self.state = state
        self._histogram: dict[int, int] = {}
        # Kept up to date by apply(), so neither a poll nor a scrape walks every message.
        self._pending_counts: dict[tuple[str, str, str], int] = {}
        self._settled_by_age = [(created, i) for i, created in state.settled.items()]
        heapq.heapify(self._settled_by_age)
        for pending in state.pending.values():
            self._count_sighting(pending.message.created_at)
            self._count_pending(pending.message, 1)

    def _count_pending(self, message: Message, change: int) -> None:
        key = (message.direction, message.kind, message.status)
        count = self._pending_counts.get(key, 0) + change
        if count:
            self._pending_counts[key] = count
        else:
            del self._pending_counts[key]

    # ----------------------------------------------------------------- planning
    def plan(self, now: float) -> PollPlan:
        """Decide this poll's listings and the pending messages to get by id (refresh tiers)."""
        state, rules = self.state, self.rules
        interval, timeout = rules.poll_interval, rules.settle.timeout
        horizon = state.cursor - LISTING_SLACK
        recent_since = now - RECENT_AGE
        recent: list[Pending] = []
        timed_out: list[Pending] = []
        middle: list[tuple[float, Pending]] = []
        recent_due = timeout_due = False
        for pending in state.pending.values():
            created = pending.message.created_at
            unseen = now - pending.observed_at
            if created + timeout <= now:
                timed_out.append(pending)
                # Batch the timeout tier: wait until the first has been due a few polls.
                timeout_due |= created + timeout + (TIMEOUT_EVERY_POLLS - 1) * interval <= now
            elif created >= horizon:
                continue  # the head listing sees it
            elif created >= recent_since:
                if unseen >= interval * 0.5:
                    recent.append(pending)
                recent_due |= unseen >= (RECENT_EVERY_POLLS - 0.5) * interval
            else:
                wait = max((now - created) / MIDDLE_AGE_DIVISOR, RECENT_EVERY_POLLS * interval)
                if unseen >= wait:
                    middle.append((unseen / wait, pending))
        head_after = horizon
        ranges: list[Listing] = []
        gets: list[str] = []
        if recent_due and recent:
            oldest = min(p.message.created_at for p in recent)
            extra = self._pages(oldest, None) - self._pages(horizon, None)
            if extra < len(recent):
                head_after = oldest - LISTING_SLACK
            else:
                gets += [p.message.id for p in recent]
        refreshed: frozenset[str] = frozenset()
        if timeout_due and timed_out:
            refreshed = frozenset(p.message.id for p in timed_out)
            low = min(p.message.created_at for p in timed_out)
            high = max(p.message.created_at for p in timed_out)
            if high >= head_after:
                head_after = min(head_after, low - LISTING_SLACK)
            elif self._pages(low, high) < len(timed_out):
                ranges.append((low - LISTING_SLACK, high + LISTING_SLACK))
            else:
                gets += sorted(refreshed)
        middle.sort(key=lambda item: item[0], reverse=True)
        for _, pending in middle[:MIDDLE_GETS_PER_POLL] if recent_due or not recent else []:
            created = pending.message.created_at
            covered = created >= head_after or any(
                lo <= created <= (hi or now) for lo, hi in ranges
            )
            if not covered:
                gets.append(pending.message.id)
        return PollPlan(now, ((head_after, None), *ranges), horizon, tuple(gets), refreshed)

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
        for message_id, pending in delta.pending_upserts.items():
            if message_id not in state.pending:
                self._count_sighting(pending.message.created_at)
        for message_id, created_at in delta.settled_ids.items():
            if message_id not in state.pending:
                self._count_sighting(created_at)
        state.cursor = delta.cursor
        for message_id in delta.pending_removed:
            removed = state.pending.pop(message_id, None)
            if removed is not None:
                self._count_pending(removed.message, -1)
        for message_id, pending in delta.pending_upserts.items():
            previous = state.pending.get(message_id)
            if previous is not None:
                self._count_pending(previous.message, -1)
            self._count_pending(pending.message, 1)
            state.pending[message_id] = pending
        for message_id, observed_at in delta.pending_seen.items():
            known = state.pending.get(message_id)
            if known is not None and message_id not in delta.pending_removed:
                state.pending[message_id] = Pending(known.message, observed_at)
        for message_id, created_at in delta.settled_ids.items():
            state.settled[message_id] = created_at
            heapq.heappush(self._settled_by_age, (created_at, message_id))
        by_age = self._settled_by_age
        while by_age and by_age[0][0] < delta.prune_settled_before:
            created_at, message_id = heapq.heappop(by_age)
            if state.settled.get(message_id) == created_at:  # not a stale entry
                del state.settled[message_id]
        for key, inc in delta.totals.items():
            state.totals.setdefault(key, Totals()).add(inc)
        state.error_info.update(delta.error_info)
        for wkey, (settled, failed) in delta.window_add.items():
            s, f = state.window.get(wkey, (0, 0))
            state.window[wkey] = (s + settled, f + failed)
        state.window = {k: v for k, v in state.window.items() if k[0] >= delta.prune_window_before}
        oldest_minute = int((delta.cursor - self.rules.settle.timeout - 3600) // HISTOGRAM_BUCKET)
        self._histogram = {m: n for m, n in self._histogram.items() if m >= oldest_minute}

    # ----------------------------------------------------------------- reading
    def pending_by_labels(self) -> dict[tuple[str, str, str], int]:
        """signalwire_messages_pending: direction, kind, latest status -> count."""
        counts: dict[tuple[str, str, str], int] = {}
        labels = self.state.label_values()
        for raw, count in self._pending_counts.items():
            key = labels.map(*raw)
            counts[key] = counts.get(key, 0) + count
        return counts

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
    """The observations of one poll, turned into a PollDelta by `close`."""

    def __init__(self, ledger: Ledger, plan: PollPlan) -> None:
        self.ledger = ledger
        self.plan = plan
        self.settled: dict[str, tuple[Message, float]] = {}  # id -> (record, settled at)
        self.seen: dict[str, Pending] = {}  # latest observation of each unsettled message
        self.gone_ids: set[str] = set()
        self.new_messages = 0
        self.ignored = 0

    def _final(self, message: Message) -> bool:
        return self.ledger.rules.settle.is_final(message.kind, message.status)

    def observe(self, message: Message, at: float) -> None:
        """One record as listed or fetched at time `at`, duplicates and stale copies included."""
        state = self.ledger.state
        message_id = message.id
        if message_id in self.settled or message_id in state.settled:
            return
        known = message_id in state.pending or message_id in self.seen
        if not known:
            if message.created_at < state.start_point or message.created_at < self.plan.horizon:
                self.ignored += 1
                return
            self.new_messages += 1
        previous = self.seen.get(message_id)
        if previous is not None and previous.observed_at > at:
            return  # an older observation arriving late never overrides a newer one
        if self._final(message):
            self.settled[message_id] = (message, at)
            self.seen.pop(message_id, None)
        else:
            self.seen[message_id] = Pending(message, at)

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
        """Settle what this poll allows and compute the new cursor (rules 2-4, 6, 7)."""
        state, rules = self.ledger.state, self.ledger.rules
        timeout = rules.settle.timeout
        cursor = max(state.cursor, listing_started - CURSOR_SAFETY)
        delta = PollDelta(cursor=cursor, new_messages=self.new_messages)
        to_settle: list[tuple[Message, float]] = list(self.settled.values())
        for message_id, pending in self.seen.items():
            # Rule 2: past the timeout, settle with the status observed after the timeout.
            if pending.observed_at >= pending.message.created_at + timeout:
                to_settle.append((pending.message, pending.observed_at))
                delta.settled_by_timeout += 1
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
                to_settle.append((last.message, now))
                delta.settled_by_timeout += 1
        codes = state.error_codes()
        labels = state.label_values()
        second = int(now)
        for message, _ in to_settle:
            delta.settled_ids[message.id] = message.created_at
            if message.id in state.pending:
                delta.pending_removed.add(message.id)
            code = message.error_code
            if code and code not in codes:
                if len(codes) < rules.max_error_codes:
                    codes.add(code)
                else:
                    code = OTHER_ERROR_CODE
            direction, kind, status = labels.of(message)
            key = (direction, kind, status, code)
            inc = delta.totals.setdefault(key, Totals())
            inc.messages += 1
            inc.segments += message.segments
            inc.charge_nano += message.charge_nano
            if code and code != OTHER_ERROR_CODE and message.error_message:
                delta.error_info[code] = message.error_message
            wkey = (second, direction, kind)
            settled, failed = delta.window_add.get(wkey, (0, 0))
            delta.window_add[wkey] = (settled + 1, failed + (message.status in FAILED_STATUSES))
        delta.prune_settled_before = cursor - LISTING_SLACK - 1.0
        delta.prune_window_before = int(now - rules.failure_ratio_window) - 1
        return delta


def new_state(now: float, start_from: float) -> LedgerState:
    """The state of a project seen for the first time: its start point is now minus start_from."""
    start = now - start_from
    return LedgerState(start_point=start, cursor=start)
