"""The rolling counts of what settled lately: per-minute buckets over 24 hours."""

from __future__ import annotations

import pickle

import pytest

from exporter.ledger import LabelKey, Totals
from exporter.recent import BUCKETS, RecentCounts
from exporter.views import RecentSummary

# 2026-10-01T12:00:00Z: a minute boundary, 12 h into a UTC day.
NOON = 1_790_856_000.0
HOUR = 3600.0
DAY = 86400.0

DELIVERED = ("outbound-api", "sms", "delivered", "")
UNDELIVERED = ("outbound-api", "sms", "undelivered", "30007")
FAILED = ("outbound-reply", "mms", "failed", "21610")
RECEIVED = ("inbound", "sms", "received", "")


def poll(
    delivered: int = 0, undelivered: int = 0, failed: int = 0, received: int = 0
) -> dict[LabelKey, Totals]:
    """One committed poll's increments; each message costs 0.01 USD, received ones nothing."""
    totals = {
        DELIVERED: Totals(delivered, delivered, delivered * 10_000_000),
        UNDELIVERED: Totals(undelivered, undelivered, undelivered * 10_000_000),
        FAILED: Totals(failed, failed, failed * 10_000_000),
        RECEIVED: Totals(received, received, 0),
    }
    return {k: v for k, v in totals.items() if v.messages}


def test_nothing_counted_is_all_zeros() -> None:
    summary = RecentCounts(NOON).summary(NOON + 30)
    assert summary == RecentSummary(since=NOON)
    assert summary.failure_ratio_hour is None
    assert len(RecentCounts(NOON)) == 0


def test_the_last_hour_and_the_last_day_sum_their_minutes() -> None:
    recent = RecentCounts(NOON - DAY)
    recent.add(NOON - 2 * HOUR, poll(delivered=5, received=4))  # within 24 h, not the hour
    recent.add(NOON - 59 * 60, poll(delivered=3, undelivered=1))  # within the hour
    recent.add(NOON - 10, poll(delivered=2, failed=1, received=1))
    recent.add(NOON - 5, poll(undelivered=1))  # same minute as the one before: same bucket
    summary = recent.summary(NOON + 1)
    assert summary.settled_hour == 3 + 1 + 2 + 1 + 1 + 1
    assert summary.settled_day == summary.settled_hour + 9
    assert summary.outbound_hour == 3 + 1 + 2 + 1 + 1  # inbound is not outbound
    assert summary.outbound_failed_hour == 1 + 1 + 1  # failed or undelivered
    assert summary.failure_ratio_hour == pytest.approx(3 / 8)
    assert summary.charge_nano_day == (5 + 3 + 1 + 2 + 1 + 1) * 10_000_000
    assert len(recent) == 3


def test_an_hour_later_the_hour_is_empty_and_the_day_is_not() -> None:
    recent = RecentCounts(NOON)
    recent.add(NOON + 30, poll(delivered=2, undelivered=2))
    assert recent.summary(NOON + 59 * 60).settled_hour == 4
    later = recent.summary(NOON + HOUR + 1)
    assert later.settled_hour == 0 and later.outbound_hour == 0
    assert later.failure_ratio_hour is None
    assert later.settled_day == 4


def test_counts_expire_after_24_hours() -> None:
    recent = RecentCounts(NOON)
    recent.add(NOON, poll(delivered=7))
    assert recent.summary(NOON + DAY - 1).settled_day == 7
    gone = recent.summary(NOON + DAY + 60)
    assert gone.settled_day == 0 and gone.charge_nano_day == 0
    # The bucket is reused for the same minute of the next day, emptied first.
    recent.add(NOON + DAY + 10, poll(delivered=1))
    assert recent.summary(NOON + DAY + 20).settled_day == 1
    assert len(recent) == 1


def test_spend_today_starts_at_midnight_utc() -> None:
    recent = RecentCounts(NOON - DAY)
    midnight = NOON - 12 * HOUR
    recent.add(midnight - 60, poll(delivered=3))  # yesterday, 23:59 UTC
    recent.add(midnight, poll(delivered=2))  # today, 00:00 UTC
    recent.add(NOON - 1, poll(delivered=1, received=5))
    summary = recent.summary(NOON)
    assert summary.charge_nano_today == 3 * 10_000_000
    assert summary.charge_nano_day == 6 * 10_000_000


def test_memory_is_bounded_whatever_the_traffic() -> None:
    recent = RecentCounts(NOON)
    for minute in range(3 * BUCKETS):  # three days, every minute
        recent.add(NOON + minute * 60, poll(delivered=1000, undelivered=10))
    assert len(recent) == BUCKETS
    columns = [getattr(recent, name) for name in RecentCounts.__slots__ if name != "since"]
    assert all(len(column) == BUCKETS for column in columns)
    now = NOON + (3 * BUCKETS - 1) * 60
    summary = recent.summary(now + 1)
    assert summary.settled_day == BUCKETS * 1010
    assert summary.settled_hour == 60 * 1010
    assert summary.outbound_failed_hour == 60 * 10


def test_a_poll_that_settled_nothing_takes_no_bucket() -> None:
    recent = RecentCounts(NOON)
    recent.add(NOON, {})
    recent.add(NOON, {DELIVERED: Totals(0, 0, 0)})
    assert len(recent) == 0


def test_a_time_older_than_the_bucket_holds_does_not_wipe_it() -> None:
    recent = RecentCounts(NOON)
    recent.add(NOON, poll(delivered=4))
    recent.add(NOON - DAY, poll(delivered=9))  # the clock stepped back a day: same bucket
    assert recent.summary(NOON + 1).settled_day == 4


def test_the_summary_is_plain_picklable_data() -> None:
    recent = RecentCounts(NOON)
    recent.add(NOON, poll(delivered=1))
    summary = recent.summary(NOON)
    assert pickle.loads(pickle.dumps(summary)) == summary
