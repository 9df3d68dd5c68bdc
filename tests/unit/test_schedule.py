"""The refresh tiers' cadence, from the poll interval and the traffic observed."""

from __future__ import annotations

import pytest

from exporter.schedule import (
    AGES_KEPT,
    AGES_NEEDED,
    LATE_SWEEP_MIN_PERIOD,
    MAX_RECENT_AGE,
    MIN_RECENT_AGE,
    RECENT_AGE_MARGIN,
    RECENT_EVERY_POLLS,
    TIMEOUT_EVERY_POLLS,
    late_ages,
    schedule,
)

SLACK, SAFETY = 1.0, 30.0


def cadence(interval: float, rate: float = 10.0, ages: list[float] | None = None):  # type: ignore[no-untyped-def]
    sample = late_ages()
    sample.extend(ages or [])
    return schedule(interval, 1000, rate, sample, SLACK, SAFETY)


def test_long_polls_keep_the_tiers_a_few_polls_apart() -> None:
    thirty = cadence(30.0)
    assert thirty.recent_every == RECENT_EVERY_POLLS
    assert thirty.timeout_every == TIMEOUT_EVERY_POLLS
    assert thirty.sweep_period == RECENT_EVERY_POLLS * 30.0


def test_short_polls_do_not_re_list_more_often_than_long_ones() -> None:
    two = cadence(2.0)
    assert two.recent_every == 12  # 24 s apart
    assert two.timeout_every == 30  # 60 s
    one = cadence(1.0)
    assert one.recent_every == 24 and one.timeout_every == 60


def test_the_recent_tier_is_widest_until_receipts_have_been_seen() -> None:
    assert cadence(30.0, ages=[5.0] * (AGES_NEEDED - 1)).recent_age == MAX_RECENT_AGE


@pytest.mark.parametrize(
    ("ages", "expected"),
    [
        ([10.0] * 99 + [48.0], MIN_RECENT_AGE),  # never below the minimum
        ([10.0] * 998 + [56.0, 900.0], 56.0 * RECENT_AGE_MARGIN),  # 99.9th percentile, widened
        ([100.0] * 50 + [2000.0] * 50, MAX_RECENT_AGE),  # never above the maximum
    ],
)
def test_the_recent_tier_follows_the_ages_of_late_receipts(
    ages: list[float], expected: float
) -> None:
    assert cadence(2.0, ages=ages).recent_age == pytest.approx(expected)


def test_the_sample_of_ages_is_bounded_and_keeps_the_latest() -> None:
    sample = late_ages()
    sample.extend(float(i) for i in range(3 * AGES_KEPT))
    assert len(sample) == AGES_KEPT and sample[-1] == 3 * AGES_KEPT - 1


@pytest.mark.parametrize(
    ("rate", "interval", "overlap"),
    [
        (100.0, 2.0, 6.0),  # 800 of a page's 1000 records: 8 s, less the 2 s since the last
        (1.0, 30.0, SAFETY),  # a quiet project: as far back as the cursor's margin
        (0.0, 30.0, SAFETY),
        (35.0, 30.0, 2 * SLACK),  # a page holds less than a poll: the minimum overlap
    ],
)
def test_the_head_overlaps_the_last_one_as_far_as_its_pages_allow(
    rate: float, interval: float, overlap: float
) -> None:
    assert cadence(interval, rate=rate).head_overlap == pytest.approx(overlap)


def test_the_recent_tier_reaches_the_latest_receipt_of_a_small_sample() -> None:
    # 100 ages: the 99.9th percentile is the latest of them.
    assert cadence(2.0, ages=[10.0] * 98 + [50.0, 200.0]).recent_age == pytest.approx(
        200.0 * RECENT_AGE_MARGIN
    )


def test_the_head_overlap_of_a_slow_project_with_small_pages() -> None:
    # Half a message a second, 10 records a page: 8 records take 16 s, less the 2 s since.
    slow = schedule(2.0, 10, 0.5, late_ages(), SLACK, SAFETY)
    assert slow.head_overlap == pytest.approx(14.0)
    # Never less than twice the listing slack, whatever the slack.
    busy = schedule(30.0, 1000, 35.0, late_ages(), 2.0, SAFETY)
    assert busy.head_overlap == pytest.approx(4.0)


@pytest.mark.parametrize(
    ("delay", "period"),
    [(None, LATE_SWEEP_MIN_PERIOD), (0.0, 1800.0), (600.0, 1800.0), (1200.0, 3600.0)],
)
def test_the_late_sweep_runs_every_three_ingestion_delays_at_least_half_an_hour_apart(
    delay: float | None, period: float
) -> None:
    if delay is None:
        cadence_ = schedule(30.0, 1000, 10.0, late_ages(), SLACK, SAFETY)
    else:
        cadence_ = schedule(30.0, 1000, 10.0, late_ages(), SLACK, SAFETY, delay)
    assert cadence_.late_sweep_period == period
