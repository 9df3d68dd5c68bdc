"""How often each refresh tier runs: from the poll interval, settle.timeout and the traffic
observed, rather than constants tuned for one profile. Pure logic.

The API has no "changed since" filter, so seeing a status change costs a request: a re-listed
page or a get-by-id. The tiers, youngest first:

* the head listing, every poll: from a little before the previous one (`head_overlap`, as much
  as fits in the pages it takes anyway), so most receipts are seen within a poll;
* the sweep and the recent tier, every `recent_every` polls (at least `RECENT_MIN_PERIOD`
  apart, so short polls do not re-list more often than long ones): one listing from the cursor,
  or from the oldest pending message younger than `recent_age`, whichever is older. It is what
  lets the cursor advance (records that show up in the log late are seen), and what catches
  receipts that came after the head listing had passed;
* older pending messages (the middle tier) by id on those same polls, each every age/4;
* past settle.timeout, in batches every `timeout_every` polls (at least `TIMEOUT_MIN_PERIOD`
  apart: a batch's listing costs about the same pages whatever its length);
* the late sweep, every `late_sweep_period`: one listing from where every record is sure to have
  been seen, up to max_ingestion_delay before now (beside the head listing, or as the head
  listing where that takes no more pages), so a record the log shows late is counted however
  late it shows. Each record is listed by one late sweep, whatever the period, plus a part-filled
  page a sweep; the period (three times the delay, at least `LATE_SWEEP_MIN_PERIOD`) bounds the
  wait: a late record is counted within period + delay at the latest (most are sooner: every
  listing that meets one counts it).

`recent_age` follows the ages at which pending messages were seen to settle (their late
receipts: nearly all of them, `RECENT_AGE_QUANTILE`), within [`MIN_RECENT_AGE`, `MAX_RECENT_AGE`].
The ledger recomputes the schedule at sweeps only, so the recent tier keeps, between two sweeps,
the age the first one re-listed.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

RECENT_EVERY_POLLS = 4
RECENT_MIN_PERIOD = 24.0
TIMEOUT_EVERY_POLLS = 3
TIMEOUT_MIN_PERIOD = 60.0
MIN_RECENT_AGE = 60.0
MAX_RECENT_AGE = 600.0
# The recent tier reaches this much past the observed 99.9th percentile of late-receipt ages.
RECENT_AGE_QUANTILE = 0.999
RECENT_AGE_MARGIN = 1.25
# Late-receipt ages kept for that percentile: a bounded sample of the latest.
AGES_KEPT = 2048
AGES_NEEDED = 100
# The head listing's overlap stays within the pages it takes anyway, with this much room.
HEAD_FILL = 0.8
LATE_SWEEP_MIN_PERIOD = 1800.0
LATE_SWEEP_DELAY_FACTOR = 3.0


@dataclass(frozen=True, slots=True)
class Schedule:
    interval: float
    recent_every: int  # polls between sweeps (and re-listings of the recent tier)
    recent_age: float  # pending messages younger than this form the recent tier
    head_overlap: float  # an ordinary head listing starts this long before the previous one
    timeout_every: int  # polls between refreshes of the messages past settle.timeout
    late_sweep_period: float = LATE_SWEEP_MIN_PERIOD  # time between late sweeps

    @property
    def sweep_period(self) -> float:
        return self.recent_every * self.interval


def schedule(
    interval: float,
    page_size: int,
    messages_per_second: float,
    late_receipt_ages: deque[float],
    slack: float,
    cursor_safety: float,
    max_ingestion_delay: float = 0.0,
) -> Schedule:
    """The tiers' cadence for a project polled every `interval` seconds whose messages appear
    at `messages_per_second`."""
    recent_every = max(RECENT_EVERY_POLLS, math.ceil(RECENT_MIN_PERIOD / interval))
    timeout_every = max(TIMEOUT_EVERY_POLLS, math.ceil(TIMEOUT_MIN_PERIOD / interval))
    if len(late_receipt_ages) >= AGES_NEEDED:
        ordered = sorted(late_receipt_ages)
        late = ordered[min(len(ordered) - 1, math.ceil(RECENT_AGE_QUANTILE * len(ordered)) - 1)]
        recent_age = min(MAX_RECENT_AGE, max(MIN_RECENT_AGE, late * RECENT_AGE_MARGIN))
    else:
        recent_age = MAX_RECENT_AGE  # until receipts have been seen: the widest
    # As much overlap as the head's pages hold anyway: a receipt up to that old is seen free.
    fits = HEAD_FILL * page_size / messages_per_second if messages_per_second > 0 else math.inf
    head_overlap = min(cursor_safety, max(2 * slack, fits - interval))
    late_sweep_period = max(LATE_SWEEP_MIN_PERIOD, LATE_SWEEP_DELAY_FACTOR * max_ingestion_delay)
    return Schedule(
        interval, recent_every, recent_age, head_overlap, timeout_every, late_sweep_period
    )


def late_ages(kept: int = AGES_KEPT) -> deque[float]:
    """An empty sample of late-receipt ages, bounded."""
    return deque(maxlen=kept)
