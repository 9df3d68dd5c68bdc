"""The catch-up's windows and progress, as pure logic."""

from __future__ import annotations

import math

import pytest

from exporter.catchup import (
    DAY,
    FIRST_STEP_SECONDS,
    MIN_STEP_SECONDS,
    STEP_GROWTH,
    STEP_MAX_RECORDS,
    STEP_RECORDS,
    Progress,
    Windows,
)

T0 = 1_800_000_000.0  # a whole second, 8 h into its day


def test_a_cursor_within_a_window_of_now_needs_no_step() -> None:
    windows = Windows()
    assert windows.end(T0, T0, T0 + FIRST_STEP_SECONDS) is None
    assert windows.end(T0, T0, T0 + FIRST_STEP_SECONDS + 0.5) == T0 + FIRST_STEP_SECONDS


def test_a_window_ends_on_a_whole_second_past_the_cursor() -> None:
    windows = Windows(seconds=MIN_STEP_SECONDS)
    for cursor in (T0, T0 + 0.1, T0 + 0.9):
        end = windows.end(cursor, cursor, T0 + 1000)
        assert end is not None and end == math.floor(end)
        # The next cursor (one second before the end) is past this one: every step moves on.
        assert end - 1 > cursor


def test_coarse_windows_are_whole_days_and_always_move_on() -> None:
    windows = Windows(coarse=True)
    day = math.floor(T0 / DAY) * DAY
    assert windows.end(T0, T0, T0 + 10 * DAY) == day + DAY
    # After a step the cursor is one second before the day's end: the next window is the next day.
    assert windows.end(day + DAY - 1, day + DAY - 1, T0 + 10 * DAY) == day + 2 * DAY
    assert windows.end(day + DAY - 1, day + DAY - 1, day + 2 * DAY) is None


def test_windows_follow_the_density_and_grow_at_most_by_the_growth_factor() -> None:
    windows = Windows(seconds=100.0)
    windows.stepped(new=STEP_RECORDS * 2, span=100.0)
    assert windows.seconds == 50.0
    windows.stepped(new=STEP_RECORDS // 10, span=50.0)
    assert windows.seconds == 50.0 * STEP_GROWTH  # not 500: growth is bounded per step
    windows.stepped(new=0, span=400.0)
    assert windows.seconds == 400.0 * STEP_GROWTH
    windows.stepped(new=10**9, span=1.0)
    assert windows.seconds == MIN_STEP_SECONDS


def test_a_listing_past_the_maximum_cuts_the_window_in_proportion() -> None:
    windows = Windows(seconds=1000.0)
    assert not windows.too_large(STEP_MAX_RECORDS, 1000.0)
    assert windows.seconds == 1000.0
    assert windows.too_large(STEP_MAX_RECORDS + 1, 1000.0)
    assert windows.seconds == pytest.approx(1000.0 * STEP_RECORDS / (STEP_MAX_RECORDS + 1))


def test_an_ordinary_listing_past_the_maximum_is_cut_to_its_own_span() -> None:
    windows = Windows(seconds=50_000.0)  # sized on a sparse stretch; a burst follows
    assert windows.too_large(4 * STEP_RECORDS, 600.0)
    assert windows.seconds == 150.0


def test_the_shortest_window_and_whole_days_are_never_cut() -> None:
    shortest = Windows(seconds=MIN_STEP_SECONDS)
    assert not shortest.too_large(10 * STEP_MAX_RECORDS, 100.0)
    days = Windows(coarse=True)
    assert not days.too_large(10 * STEP_MAX_RECORDS, DAY)
    assert not days.past_bound(10 * STEP_MAX_RECORDS)
    deep = Windows(seconds=MIN_STEP_SECONDS * 1.5)
    assert deep.too_large(10 * STEP_MAX_RECORDS, 100.0)
    assert deep.seconds == MIN_STEP_SECONDS


def test_an_unverifiable_empty_window_grows() -> None:
    windows = Windows(seconds=10.0)
    windows.grow()
    assert windows.seconds == 10.0 * STEP_GROWTH


@pytest.mark.parametrize(
    ("low", "high", "fits"),
    [
        (T0, T0 + 60, True),
        (T0 - 2, T0 + 62, True),  # whole-second bounds, inclusive or exclusive
        (T0 - 3, T0 + 60, False),  # created_after honoured to the day only
        (T0, T0 + 63, False),  # created_before not honoured
    ],
)
def test_records_outside_the_window_reveal_coarse_filters(
    low: float, high: float, fits: bool
) -> None:
    windows = Windows()
    assert windows.within(low, high, T0, T0 + 60) is fits
    assert windows.coarse is not fits


@pytest.mark.parametrize(
    ("listed", "honoured"),
    [
        ([T0], True),
        ([T0 - 1, T0, T0 + 1], True),
        ([], False),  # the record's own second is missing: created_before cut to the day
        ([T0 - 1], False),
        ([T0, T0 - 3600], False),  # created_after cut to the day
        ([T0, T0 + 5], False),
    ],
)
def test_the_probe_around_a_known_record(listed: list[float], honoured: bool) -> None:
    windows = Windows()
    assert windows.probed(T0, listed) is honoured
    assert windows.verified is honoured
    assert windows.coarse is not honoured


def test_progress_share_rate_and_eta() -> None:
    progress = Progress(began=T0, cursor=T0 + 250, target=T0 + 1000, messages=5000, elapsed=10.0)
    assert progress.share == 0.25
    assert progress.messages_per_second == 500.0
    assert progress.eta_seconds == 30.0
    assert Progress(T0, T0, T0 + 10, 0, 0.0).eta_seconds is None
    assert Progress(T0, T0, T0 + 10, 0, 5.0).eta_seconds is None
    assert Progress(T0, T0 + 20, T0 + 10, 0, 5.0).share == 1.0
    assert Progress(T0, T0 + 20, T0, 0, 5.0).share == 1.0
    assert Progress(T0, T0, T0 + 10, 1, 0.0).messages_per_second == 0.0


DAY_START = math.floor(T0 / DAY) * DAY  # the midnight before T0


def test_no_step_when_what_is_left_is_exactly_one_window() -> None:
    windows = Windows(seconds=100.0, verified=True)
    # What is left runs from `reach`, which may be past the cursor (a head listing went ahead).
    assert windows.end(T0, T0 + 50, T0 + 150) is None
    assert windows.end(T0, T0 + 50, T0 + 149) is None
    assert windows.end(T0, T0 + 50, T0 + 151) == T0 + 100
    assert windows.end(T0, T0, T0 + 100.5) == T0 + 100


def test_until_the_filters_are_verified_no_window_crosses_midnight() -> None:
    cursor = DAY_START + DAY - 30
    assert Windows(seconds=100.0).end(cursor, cursor, T0 + DAY) == DAY_START + DAY
    assert Windows(seconds=100.0, verified=True).end(cursor, cursor, T0 + DAY) == cursor + 100
    # The cursor half a second short of the last second before midnight: still that day's end.
    late = DAY_START + DAY - 1.5
    assert Windows(seconds=100.0).end(late, late, T0 + DAY) == DAY_START + DAY
    assert Windows(coarse=True).end(late, late, T0 + DAY) == DAY_START + DAY


def test_records_outside_the_window_turn_the_windows_into_whole_days() -> None:
    windows = Windows(seconds=100.0, verified=True)
    assert windows.within(T0 - 3, T0 + 10, T0, T0 + 60) is False
    assert windows.end(T0, T0, T0 + 10 * DAY) == DAY_START + DAY
    assert windows.checked


@pytest.mark.parametrize(
    ("listed", "days"),
    [([T0 - 2, T0, T0 + 2], False), ([T0, T0 + 2.5], True), ([], True)],
)
def test_the_probe_decides_between_seconds_and_whole_days(listed: list[float], days: bool) -> None:
    """Records up to BOUND_TOLERANCE (2 s) from the probed one are within a filter honoured to
    the second; past that, or without the record itself, windows become whole days."""
    windows = Windows(seconds=100.0)
    assert windows.probed(T0, listed) is not days
    assert windows.checked
    expected = DAY_START + DAY if days else T0 + 100
    assert windows.end(T0, T0, T0 + 10 * DAY) == expected


def test_a_window_ending_at_midnight_is_exact_whatever_the_precision() -> None:
    assert Windows.exact_whatever_the_precision(DAY_START)
    assert Windows.exact_whatever_the_precision(DAY_START + DAY)
    assert not Windows.exact_whatever_the_precision(DAY_START + 1)
    assert not Windows.exact_whatever_the_precision(T0)
