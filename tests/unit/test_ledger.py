"""One test (at least) per counting rule of contract §3, on the pure ledger."""

from __future__ import annotations

import copy
import dataclasses
import itertools
import random
from collections.abc import Callable

import pytest

from exporter.config import SettleConfig
from exporter.ledger import (
    BURST_RECEIPTS,
    BURST_SHARE,
    BURST_STEPS,
    CURSOR_SAFETY,
    LISTING_SLACK,
    MAX_NEW_LABEL_VALUES,
    MIDDLE_AGE_DIVISOR,
    MIDDLE_GETS_PER_POLL,
    OTHER_ERROR_CODE,
    OTHER_LABEL_VALUE,
    Batch,
    Ledger,
    LedgerState,
    PollDelta,
    PollPlan,
    Rules,
    Totals,
)
from exporter.pending import PendingEntry
from exporter.records import Message

T0 = 1_800_000_000.0
TIMEOUT = 100.0


def rules(**overrides: object) -> Rules:
    values: dict[str, object] = {
        "settle": SettleConfig(timeout=TIMEOUT),
        "poll_interval": 10.0,
        "failure_ratio_window": 60.0,
        "max_error_codes": 3,
        "page_size": 10,
    }
    values.update(overrides)
    return Rules(**values)  # type: ignore[arg-type]


def msg(
    id: str,
    status: str,
    created: float = T0 + 1,
    *,
    direction: str = "outbound-api",
    kind: str = "sms",
    error_code: str = "",
    error_message: str | None = None,
    segments: int = 1,
    charge_nano: int = 4_150_000,
    remote: str = "+12125550100",
    own: str = "+15551230000",
) -> Message:
    return Message(
        id,
        created,
        direction,
        kind,
        status,
        error_code,
        error_message,
        segments,
        charge_nano,
        remote,
        own,
    )


def new_ledger(**overrides: object) -> Ledger:
    return Ledger(rules(**overrides), LedgerState(start_point=T0, cursor=T0))


def poll(ledger: Ledger, now: float, *messages: Message, gone: tuple[str, ...] = ()) -> PollDelta:
    """One successful poll observing `messages` at `now`, committed and applied."""
    batch = ledger.begin(ledger.plan(now))
    for m in messages:
        batch.observe(m, now)
    for message_id in gone:
        batch.gone(message_id)
    delta = batch.close(now, now)
    ledger.apply(delta)
    return delta


def totals(ledger: Ledger) -> dict[tuple[str, str, str, str], tuple[int, int, int]]:
    return {k: (v.messages, v.segments, v.charge_nano) for k, v in ledger.state.totals.items()}


def test_rule1_a_message_is_identified_by_its_id() -> None:
    ledger = new_ledger()
    poll(ledger, T0 + 10, msg("a", "delivered"), msg("b", "delivered"), msg("a", "delivered"))
    assert totals(ledger) == {("outbound-api", "sms", "delivered", ""): (2, 2, 8_300_000)}


def test_rule2_settles_when_first_observed_in_a_final_status() -> None:
    ledger = new_ledger()
    poll(ledger, T0 + 10, msg("a", "sent"))
    assert totals(ledger) == {}
    assert ledger.pending_by_labels() == {("outbound-api", "sms", "sent"): 1}
    poll(ledger, T0 + 20, msg("a", "delivered"))
    assert totals(ledger) == {("outbound-api", "sms", "delivered", ""): (1, 1, 4_150_000)}
    assert len(ledger.state.pending) == 0


def test_rule2_final_statuses_by_kind_settle_mms_at_sent() -> None:
    ledger = new_ledger()
    poll(ledger, T0 + 10, msg("m", "sent", kind="mms"), msg("s", "sent", kind="sms"))
    assert totals(ledger) == {("outbound-api", "mms", "sent", ""): (1, 1, 4_150_000)}
    assert set(ledger.state.pending) == {"s"}


def test_rule2_configured_final_statuses_are_used() -> None:
    settle = SettleConfig(
        timeout=TIMEOUT, final_statuses=frozenset({"read"}), final_statuses_by_kind={}
    )
    ledger = new_ledger(settle=settle)
    poll(ledger, T0 + 10, msg("a", "delivered"), msg("b", "read"))
    assert set(ledger.state.pending) == {"a"}
    assert list(totals(ledger)) == [("outbound-api", "sms", "read", "")]


def test_rule2_timeout_settles_with_the_status_observed_after_the_timeout() -> None:
    ledger = new_ledger()
    poll(ledger, T0 + 10, msg("a", "queued"))
    # Observed just before the timeout: still pending.
    poll(ledger, T0 + 1 + TIMEOUT - 1, msg("a", "sent"))
    assert totals(ledger) == {}
    # Past the timeout the plan demands a refresh (in batches: once the first has waited a few
    # polls); the refreshed status is the one settled.
    batched = (ledger.schedule().timeout_every - 1) * 10.0  # the batch's wait, 10 s polls
    assert ledger.plan(T0 + 1 + TIMEOUT + batched - 5).timeout_due == frozenset()
    due = T0 + 1 + TIMEOUT + batched
    plan = ledger.plan(due)
    assert plan.timeout_due == {"a"}
    batch = ledger.begin(plan)
    assert batch.unrefreshed_timeout_due() == ["a"]
    batch.observe(msg("a", "sent", charge_nano=7), due + 1)
    delta = batch.close(due + 2, due)
    ledger.apply(delta)
    assert delta.settled_by_timeout == 1
    assert totals(ledger) == {("outbound-api", "sms", "sent", ""): (1, 1, 7)}
    assert len(ledger.state.pending) == 0


def test_rule2_timeout_without_refresh_does_not_settle() -> None:
    ledger = new_ledger()
    poll(ledger, T0 + 10, msg("a", "sent"))
    poll(ledger, T0 + TIMEOUT + 50)  # nothing observed: no refresh, no settlement
    assert totals(ledger) == {}
    assert set(ledger.state.pending) == {"a"}


def test_rule2_timeout_of_a_message_gone_from_the_api_settles_with_its_last_status() -> None:
    ledger = new_ledger()
    poll(ledger, T0 + 10, msg("a", "sent", segments=2))
    poll(ledger, T0 + TIMEOUT + 50, gone=("a",))
    assert totals(ledger) == {("outbound-api", "sms", "sent", ""): (1, 2, 4_150_000)}
    assert len(ledger.state.pending) == 0


def test_a_gone_message_before_its_timeout_stays_pending() -> None:
    ledger = new_ledger()
    poll(ledger, T0 + 10, msg("a", "sent"))
    poll(ledger, T0 + 20, gone=("a",))
    assert set(ledger.state.pending) == {"a"}


def test_first_sight_after_the_timeout_settles_at_once() -> None:
    ledger = new_ledger()
    poll(ledger, T0 + TIMEOUT + 30, msg("a", "sent"))
    assert totals(ledger) == {("outbound-api", "sms", "sent", ""): (1, 1, 4_150_000)}


def test_rule3_counts_segments_and_charge_under_the_settled_labels() -> None:
    ledger = new_ledger()
    poll(
        ledger,
        T0 + 10,
        msg("a", "undelivered", error_code="30007", segments=3, charge_nano=12),
        msg("b", "undelivered", error_code="30007", segments=2, charge_nano=30),
        msg("c", "received", direction="inbound", segments=1, charge_nano=5),
    )
    assert totals(ledger) == {
        ("outbound-api", "sms", "undelivered", "30007"): (2, 5, 42),
        ("inbound", "sms", "received", ""): (1, 1, 5),
    }


def test_rule3_a_message_settles_at_most_once() -> None:
    ledger = new_ledger()
    poll(ledger, T0 + 10, msg("a", "delivered"))
    poll(ledger, T0 + 20, msg("a", "delivered"), msg("a", "failed"))
    poll(ledger, T0 + TIMEOUT + 20, msg("a", "delivered"), gone=("a",))
    assert totals(ledger) == {("outbound-api", "sms", "delivered", ""): (1, 1, 4_150_000)}


def test_rule3_first_final_observation_wins_within_a_poll() -> None:
    ledger = new_ledger()
    batch = ledger.begin(ledger.plan(T0 + 10))
    batch.observe(msg("a", "undelivered", error_code="30003"), T0 + 10)
    batch.observe(msg("a", "delivered"), T0 + 11)
    ledger.apply(batch.close(T0 + 12, T0 + 10))
    assert list(totals(ledger)) == [("outbound-api", "sms", "undelivered", "30003")]


def test_an_older_observation_never_overrides_a_newer_one() -> None:
    ledger = new_ledger()
    batch = ledger.begin(ledger.plan(T0 + 10))
    batch.observe(msg("a", "sent"), T0 + 12)
    batch.observe(msg("a", "queued"), T0 + 11)
    ledger.apply(batch.close(T0 + 12, T0 + 10))
    assert ledger.pending_by_labels() == {("outbound-api", "sms", "sent"): 1}


def test_rule4_pending_is_counted_under_its_latest_status() -> None:
    ledger = new_ledger()
    poll(ledger, T0 + 10, msg("a", "queued"), msg("b", "queued"), msg("c", "sent", kind="mms"))
    assert ledger.pending_by_labels() == {("outbound-api", "sms", "queued"): 2}
    poll(ledger, T0 + 20, msg("a", "sent"))
    assert ledger.pending_by_labels() == {
        ("outbound-api", "sms", "queued"): 1,
        ("outbound-api", "sms", "sent"): 1,
    }


def test_rule5_messages_created_before_the_start_point_are_never_counted() -> None:
    ledger = new_ledger()
    poll(ledger, T0 + 10, msg("old", "delivered", created=T0 - 1), msg("old2", "sent", T0 - 5))
    assert totals(ledger) == {}
    assert len(ledger.state.pending) == 0
    poll(ledger, T0 + TIMEOUT + 20, msg("old2", "sent", T0 - 5))
    assert totals(ledger) == {}


def test_rule6_messages_created_while_stopped_are_counted_after_a_restart() -> None:
    ledger = new_ledger()
    poll(ledger, T0 + 10, msg("a", "delivered", T0 + 5))
    committed = copy.deepcopy(ledger.state)
    # The exporter is stopped for an hour; messages keep coming.
    restarted = Ledger(rules(), committed)
    later = T0 + 3600
    plan = restarted.plan(later)
    assert plan.created_after <= T0 + 5  # lists from before the stop
    poll(restarted, later, msg("b", "delivered", T0 + 600), msg("c", "sent", T0 + 3590))
    assert totals(restarted)[("outbound-api", "sms", "delivered", "")][0] == 2
    assert set(restarted.state.pending) == {"c"}


def test_rule7_a_failed_poll_changes_nothing() -> None:
    ledger = new_ledger()
    poll(ledger, T0 + 10, msg("a", "sent"))
    before = copy.deepcopy(ledger.state)
    batch = ledger.begin(ledger.plan(T0 + 20))
    batch.observe(msg("a", "delivered"), T0 + 20)
    batch.observe(msg("b", "delivered"), T0 + 20)
    batch.close(T0 + 21, T0 + 20)  # computed, never committed nor applied
    assert ledger.state == before


def test_rule7_re_listed_records_after_settlement_are_not_counted_again() -> None:
    ledger = new_ledger()
    poll(ledger, T0 + 10, msg("a", "delivered", T0 + 9))
    for step in range(1, 20):  # the overlap keeps re-listing it for a while
        poll(ledger, T0 + 10 + step * 10, msg("a", "delivered", T0 + 9))
    assert totals(ledger)[("outbound-api", "sms", "delivered", "")][0] == 1


def test_unknown_records_older_than_the_floor_are_ignored() -> None:
    ledger = new_ledger(max_ingestion_delay=0.0)  # every record shows at once
    poll(ledger, T0 + 1000, msg("a", "delivered", T0 + 900))
    plan = ledger.plan(T0 + 2000)
    assert plan.horizon > T0 + 900 and plan.floor is not None and plan.floor > T0 + 900
    # Its settled id has been pruned; re-listed (e.g. by a day-precision filter) it is ignored.
    assert "a" not in ledger.state.settled
    poll(ledger, T0 + 2000, msg("a", "delivered", T0 + 900), msg("x", "failed", T0 + 800))
    assert totals(ledger)[("outbound-api", "sms", "delivered", "")][0] == 1
    assert ("outbound-api", "sms", "failed", "") not in totals(ledger)


def test_past_the_history_limit_everything_before_it_is_complete() -> None:
    # A listing moved up to the oldest time SignalWire allows: nothing before can be new, even
    # where max_ingestion_delay would leave the listing's own span incomplete.
    ledger = new_ledger(max_ingestion_delay=3600.0)
    now = T0 + 100_000
    allowed = now - 600
    plan = ledger.plan(now)
    moved = dataclasses.replace(plan, listings=((allowed, None),), horizon=allowed, floor=allowed)
    batch = ledger.begin(moved)
    batch.observe(msg("a", "delivered", now - 300), now)
    ledger.apply(batch.close(now, now))
    assert ledger.state.complete_until == allowed
    assert totals(ledger)[("outbound-api", "sms", "delivered", "")][0] == 1


def test_a_settled_id_just_above_the_floor_is_kept_when_the_floor_is_at_a_minute_s_edge() -> None:
    # Settled ids are pruned a whole minute at a time: with the floor a second before a minute,
    # the minute before it is kept (its last second can still be re-listed).
    ledger = new_ledger(max_ingestion_delay=0.0)
    now = T0 + 1230
    poll(ledger, now, msg("a", "delivered", T0 + 1199.5))
    assert ledger.state.floor == T0 + 1199
    poll(ledger, now + 10, msg("a", "delivered", T0 + 1199.5))
    assert totals(ledger)[("outbound-api", "sms", "delivered", "")][0] == 1


def test_a_message_seen_pending_then_final_in_one_poll_is_settled_not_left_pending() -> None:
    # The head listing shows it sent; a later listing of the same poll shows it delivered.
    ledger = new_ledger()
    now = T0 + 100
    batch = ledger.begin(ledger.plan(now))
    batch.observe(msg("a", "sent", T0 + 50), now)
    batch.observe(msg("a", "delivered", T0 + 50), now + 1)
    delta = batch.close(now + 1, now)
    assert delta.pending_upserts == {}
    ledger.apply(delta)
    assert len(ledger.state.pending) == 0
    assert totals(ledger)[("outbound-api", "sms", "delivered", "")][0] == 1


def test_settled_ids_are_kept_while_they_can_be_re_listed() -> None:
    ledger = new_ledger()
    poll(ledger, T0 + 100, msg("a", "delivered", T0 + 95))
    horizon = ledger.plan(T0 + 110).horizon
    assert horizon <= T0 + 95
    assert "a" in ledger.state.settled


def test_cursor_trails_the_listing_start_and_never_goes_back() -> None:
    ledger = new_ledger()
    poll(ledger, T0 + 500)
    assert ledger.state.cursor == T0 + 500 - CURSOR_SAFETY
    batch = ledger.begin(ledger.plan(T0 + 510))
    ledger.apply(batch.close(T0 + 510, T0 + 100))  # a server clock far behind
    assert ledger.state.cursor == T0 + 500 - CURSOR_SAFETY


def test_error_codes_beyond_the_cap_become_other() -> None:
    ledger = new_ledger(max_error_codes=2)
    poll(
        ledger,
        T0 + 10,
        msg("a", "failed", error_code="1", error_message="one"),
        msg("b", "failed", error_code="2", error_message="two"),
        msg("c", "failed", error_code="3", error_message="three"),
        msg("d", "failed", error_code="1", error_message="one, reworded"),
        msg("e", "delivered"),
    )
    assert totals(ledger) == {
        ("outbound-api", "sms", "failed", "1"): (2, 2, 8_300_000),
        ("outbound-api", "sms", "failed", "2"): (1, 1, 4_150_000),
        ("outbound-api", "sms", "failed", OTHER_ERROR_CODE): (1, 1, 4_150_000),
        ("outbound-api", "sms", "delivered", ""): (1, 1, 4_150_000),
    }
    assert ledger.state.error_info == {"1": "one, reworded", "2": "two"}
    # The admitted codes stay admitted across polls (and restarts: they live in the totals).
    poll(ledger, T0 + 20, msg("f", "failed", error_code="4"), msg("g", "failed", error_code="2"))
    assert totals(ledger)[("outbound-api", "sms", "failed", OTHER_ERROR_CODE)][0] == 2
    assert totals(ledger)[("outbound-api", "sms", "failed", "2")][0] == 2


def test_failure_ratio_over_the_window() -> None:
    ledger = new_ledger()
    poll(
        ledger,
        T0 + 10,
        msg("a", "delivered"),
        msg("b", "failed"),
        msg("c", "undelivered"),
        msg("d", "delivered"),
        msg("e", "received", direction="inbound"),
    )
    assert ledger.failure_ratios(T0 + 10) == {("outbound-api", "sms"): 0.5, ("inbound", "sms"): 0.0}
    poll(ledger, T0 + 50, msg("f", "delivered"), msg("g", "delivered"))
    assert ledger.failure_ratios(T0 + 50)[("outbound-api", "sms")] == pytest.approx(2 / 6)
    # The first poll's settlements leave the 60 s window; absent when none settled.
    assert ledger.failure_ratios(T0 + 71) == {("outbound-api", "sms"): 0.0}
    assert ledger.failure_ratios(T0 + 200) == {}


def aged(ledger: Ledger, message_id: str, seen_ago: float, now: float) -> None:
    """Pretend `message_id` was last observed `seen_ago` seconds before `now`."""
    assert message_id in ledger.state.pending
    # Through apply(), as a poll would: the ledger indexes pending messages as they change.
    ledger.apply(PollDelta(cursor=ledger.state.cursor, pending_seen={message_id: now - seen_ago}))


def test_recent_pending_messages_are_refreshed_together_every_few_polls() -> None:
    ledger = new_ledger(settle=SettleConfig(timeout=7200.0))
    now = T0 + 1000
    poll(ledger, T0 + 10, msg("a", "sent", now - 300), msg("b", "sent", now - 200))
    ledger.state.cursor = ledger.state.complete_until = now - 30
    aged(ledger, "a", 20, now)
    aged(ledger, "b", 6, now)
    plan = ledger.plan(now)  # seen 20 s ago (2 polls): not yet
    assert plan.listings == ((now - 31, None),) and plan.get_ids == ()
    aged(ledger, "a", 35, now)
    plan = ledger.plan(now)  # due; "b" (seen 6 s ago) comes along; one page: re-list, no gets
    assert plan.listings == ((now - 301, None),) and plan.get_ids == ()


def test_recent_pending_messages_are_got_by_id_when_a_re_list_costs_more() -> None:
    ledger = new_ledger(settle=SettleConfig(timeout=7200.0), page_size=10)
    now = T0 + 1000
    settled = [msg(f"d{i}", "delivered", now - 400 + i) for i in range(200)]
    poll(ledger, T0 + 10, msg("p", "sent", now - 400), *settled)
    ledger.state.cursor = ledger.state.complete_until = now - 30
    aged(ledger, "p", 40, now)
    plan = ledger.plan(now)
    assert plan.get_ids == ("p",)
    assert plan.listings == ((now - 31, None),)


def test_older_pending_messages_are_got_by_id_rarely_and_few_per_poll() -> None:
    ledger = new_ledger(settle=SettleConfig(timeout=7200.0), page_size=10)
    now = T0 + 5000
    # A few pending among many settled: a listing of their range would take more requests.
    settled = (msg(f"s{i}", "delivered", now - 3600 - i * 0.01) for i in range(50))
    poll(ledger, T0 + 10, *(msg(f"m{i}", "sent", now - 3600 - i) for i in range(3)), *settled)
    ledger.state.cursor = ledger.state.complete_until = now - 30
    for i in range(3):
        aged(ledger, f"m{i}", 600, now)  # an hour old: refreshed every 15 minutes
    assert ledger.plan(now).get_ids == ()
    aged(ledger, "m1", 1000, now)
    aged(ledger, "m2", 950, now)
    assert ledger.plan(now).get_ids == ("m1",)  # the most overdue, one per poll
    assert len(ledger.plan(now).listings) == 1  # and no listing of their range


def test_many_old_pending_messages_are_refreshed_by_a_listing_of_their_range() -> None:
    ledger = new_ledger(settle=SettleConfig(timeout=7200.0), page_size=10)
    now = T0 + 5000
    # Many pending in a range that takes fewer pages than they would take gets.
    old = [msg(f"m{i}", "sent", now - 3600 - i) for i in range(40)]
    poll(ledger, T0 + 10, *old)
    ledger.state.cursor = ledger.state.complete_until = now - 30
    for m in old:
        aged(ledger, m.id, 1000, now)  # all overdue (every 15 minutes at an hour old)
    plan = ledger.plan(now)
    assert plan.get_ids == ()
    low, high = now - 3600 - 39, now - 3600
    assert plan.listings[1:] == ((low - LISTING_SLACK, high + LISTING_SLACK),)


def test_a_listing_of_old_pending_messages_re_lists_at_most_refresh_records_least_seen_first() -> (
    None
):
    # 10 a page, at most 100 records a refresh listing: 10 pages.
    ledger = new_ledger(settle=SettleConfig(timeout=7200.0), page_size=10, refresh_records=100)
    now = T0 + 5000
    base = (now - 3600) // 60 * 60  # three whole minutes of 60 pending messages each
    old = [msg(f"m{i}", "sent", base + i) for i in range(180)]
    poll(ledger, T0 + 10, *old)
    ledger.state.cursor = ledger.state.complete_until = now - 30
    for m in old:
        aged(ledger, m.id, 1000, now)  # all overdue
    plan = ledger.plan(now)
    # The first minute takes 6 pages; with the second it would take 12: the first only.
    assert plan.listings[1:] == ((base - LISTING_SLACK, base + 59 + LISTING_SLACK),)
    assert plan.get_ids == ()
    # More are due: after a burst of receipts the poll would plan the next listing at once.
    assert plan.more_due and not ledger.refresh_goes_on(plan, 1), "no burst"
    ledger._receipt_burst = True
    assert ledger.refresh_goes_on(plan, 1) and ledger.refresh_goes_on(plan, BURST_STEPS - 1)
    assert not ledger.refresh_goes_on(plan, BURST_STEPS)
    uncapped = new_ledger(settle=SettleConfig(timeout=7200.0), page_size=10, refresh_records=180)
    uncapped.state = ledger.state
    uncapped._histogram = ledger._histogram
    assert uncapped.plan(now).listings[1:] == ((base - 1, base + 179 + 1),)
    assert not uncapped.plan(now).more_due, "all of them in one listing"
    ledger._receipt_burst = False
    batch = ledger.begin(plan)
    batch.observe_all(old[:60], now)  # re-listed, still pending
    ledger.apply(batch.close(now, now))
    # The next poll takes the next minute, the one after the last.
    later = ledger.plan(now + 10)
    assert later.listings[1:] == ((base + 60 - LISTING_SLACK, base + 119 + LISTING_SLACK),)
    # After a burst of receipts every old one is due: the listing stays within its bound, and
    # goes on from the ones seen longest ago (not the first minute again).
    ledger._receipt_burst = True
    assert ledger.plan(now + 10).listings[1:] == later.listings[1:]


# 180 old records and the recent tier's 10 fit 190 exactly; not 189 (nor the old ones' 180 alone).
@pytest.mark.parametrize(
    "cap, minutes, joins", [(200, 3, True), (190, 3, True), (189, 3, False), (100, 1, False)]
)
def test_after_a_burst_the_recent_tier_is_refreshed_too_where_it_fits_the_cap(
    cap: int, minutes: int, joins: bool
) -> None:
    ledger = new_ledger(settle=SettleConfig(timeout=7200.0), page_size=10, refresh_records=cap)
    now = T0 + 5000
    base = (now - 3600) // 60 * 60  # three whole minutes of 60 old pending messages each
    old = [msg(f"m{i}", "sent", base + i) for i in range(180)]
    recent = [msg(f"r{i}", "sent", now - 100 + i) for i in range(10)]
    poll(ledger, T0 + 10, *old, *recent)
    ledger.state.cursor = ledger.state.complete_until = now - 30
    for m in old:
        aged(ledger, m.id, 1000, now)
    for m in recent:
        aged(ledger, m.id, 10, now)  # not due for the recent tier's own period
    assert ledger.plan(now).created_after == now - 31
    ledger._receipt_burst = True
    plan = ledger.plan(now)
    # The old minutes within the cap are listed (the estimate counts whole minutes: the next
    # one too, at the second's slack); the recent tier's 10 records fit 200 with them, not 100.
    end = base + 60 * minutes - 1 + LISTING_SLACK
    assert plan.listings[1:] == ((base - LISTING_SLACK, end),)
    assert plan.created_after == (now - 100 - LISTING_SLACK if joins else now - 31)


def test_of_old_pending_messages_equally_overdue_the_first_found_is_got() -> None:
    # One a page: a listing of their range takes as many requests as getting each, so gets.
    ledger = new_ledger(settle=SettleConfig(timeout=7200.0), page_size=1)
    now = T0 + 5000
    poll(ledger, T0 + 10, msg("a", "sent", now - 3600), msg("z", "sent", now - 2400))
    ledger.state.cursor = ledger.state.complete_until = now - 30
    aged(ledger, "a", 1800, now)  # waits a quarter of its age, 900 s: twice overdue
    aged(ledger, "z", 1200, now)  # 600 s: twice overdue too
    assert ledger.plan(now).get_ids == ("a",)  # the older, found first
    assert len(ledger.plan(now).listings) == 1


def test_old_pending_messages_are_listed_only_where_they_are_at_least_half_of_the_records() -> None:
    now = T0 + 5000

    def plan_with(settled: int) -> PollPlan:
        ledger = new_ledger(settle=SettleConfig(timeout=7200.0), page_size=10)
        pending = [msg(f"m{i}", "sent", now - 3600 + i) for i in range(20)]
        others = (msg(f"s{i}", "delivered", now - 3600 + i + 0.5) for i in range(settled))
        poll(ledger, T0 + 10, *pending, *others)
        ledger.state.cursor = ledger.state.complete_until = now - 30
        for m in pending:
            aged(ledger, m.id, 1000, now)  # all overdue
        return ledger.plan(now)

    half = plan_with(20)  # 20 pending of 40 records: a receipt outage's density, listed
    assert half.get_ids == () and len(half.listings) == 2
    fewer = plan_with(21)  # 20 of 41: a trickle, got by id, the most overdue one a poll
    assert len(fewer.get_ids) == 1 and len(fewer.listings) == 1


def test_many_old_pending_none_due_are_probed_by_one_get_of_the_one_seen_longest_ago() -> None:
    ledger = new_ledger(settle=SettleConfig(timeout=7200.0), page_size=10)
    now = T0 + 5000
    old = [msg(f"m{i}", "sent", now - 3600 - i) for i in range(40)]
    poll(ledger, T0 + 10, *old)
    ledger.state.cursor = ledger.state.complete_until = now - 30
    for m in old:
        aged(ledger, m.id, 300, now)  # an hour old, seen 5 minutes ago: none due
    aged(ledger, "m7", 310, now)
    plan = ledger.plan(now)
    assert plan.get_ids == ("m7",) and len(plan.listings) == 1
    # A trickle (a listing of their minutes would take more pages than they are) is not probed.
    sparse = new_ledger(settle=SettleConfig(timeout=7200.0), page_size=10)
    poll(sparse, T0 + 10, *old[:3], *(msg(f"s{i}", "delivered", now - 3600) for i in range(60)))
    sparse.state.cursor = sparse.state.complete_until = now - 30
    for m in old[:3]:
        aged(sparse, m.id, 300, now)
    assert sparse.plan(now).get_ids == ()


def test_the_probe_waits_the_recent_tier_period_and_finds_the_one_seen_longest_ago() -> None:
    now = T0 + 5000

    def ledger_with(
        seen_ago: dict[str, list[float]], recent: int = 0, fresh: bool = False
    ) -> Ledger:
        ledger = new_ledger(settle=SettleConfig(timeout=7200.0), page_size=10)
        old = [msg(f"m{i}", "sent", now - 3600 - i) for i in range(40)]
        old += [msg(f"n{i}", "sent", now - 3000 - i) for i in range(40)]  # ten minutes later
        settled = (msg(f"r{i}", "delivered", now - 300 + i * 0.5) for i in range(recent))
        young = [msg("fresh", "sent", now - 100)] if fresh else []  # in the recent tier
        poll(ledger, T0 + 10, *old, *settled, *young)
        ledger.state.cursor = ledger.state.complete_until = now - 30
        for m in old:
            aged(ledger, m.id, 300, now)  # none due
        for message_id, agos in seen_ago.items():
            for ago in agos:
                aged(ledger, message_id, ago, now)
        return ledger

    wait = new_ledger().schedule().recent_every * 10.0  # the recent tier's period: 40 s
    assert wait == 40.0
    everyone = {f"{p}{i}": [wait - 10] for p in "mn" for i in range(40)}
    assert ledger_with(everyone).plan(now).get_ids == ()  # all seen within the period
    assert ledger_with({**everyone, "m3": [wait]}).plan(now).get_ids == ("m3",)
    # None is due yet (an hour old: every 900 s; n*, 50 minutes: every 750 s).
    assert ledger_with({"m5": [850, 100], "n7": [700]}).plan(now).get_ids == ("n7",)
    # A minute's bound is a lower bound: every one was seen 880 s ago (a plan makes the bounds
    # exact), then again 300 s ago, n7 700 s ago. The m* minutes, not yet worth a look at their
    # age, keep their bound of 880 s; n7 is still the one seen longest ago.
    stale = ledger_with({})
    for message_id in sorted(stale.state.pending):
        aged(stale, message_id, 880, now)
    stale.plan(now)
    for message_id in sorted(stale.state.pending):
        aged(stale, message_id, 700 if message_id == "n7" else 300, now)
    assert stale.plan(now).get_ids == ("n7",)
    # Within a minute, the best may come after worse ones.
    assert ledger_with({"m1": [500], "m2": [350], "m3": [800]}).plan(now).get_ids == ("m3",)
    # Many recent records do not make a listing of the old ones' minutes look dearer.
    assert ledger_with({"m3": [800]}, recent=500).plan(now).get_ids == ("m3",)
    # Between the recent tier's polls too (a recent one, seen 10 s ago, is not due): one get.
    between = ledger_with({"m3": [800]}, fresh=True)
    aged(between, "fresh", 10, now)
    plan = between.plan(now)
    assert plan.get_ids == ("m3",) and len(plan.listings) == 1


def test_a_receipt_for_an_old_pending_message_refreshes_all_the_old_ones_at_the_next_poll() -> None:
    ledger = new_ledger(settle=SettleConfig(timeout=7200.0), page_size=10)
    now = T0 + 5000
    old = [msg(f"m{i}", "sent", now - 3600 + i * 30) for i in range(40)]  # 40-20 minutes old
    poll(ledger, T0 + 10, *old)
    ledger.state.cursor = ledger.state.complete_until = now - 30
    for m in old:
        aged(ledger, m.id, 300, now)  # none due
    plan = ledger.plan(now)
    assert plan.get_ids == ("m0",)  # the probe
    batch = ledger.begin(plan)
    batch.observe(msg("m0", "delivered", old[0].created_at), now)
    ledger.apply(batch.close(now, now))
    after = now + 10
    plan = ledger.plan(after)
    # Every other one is due now, and a listing of their range is cheaper than 39 gets.
    low, high = old[1].created_at, old[-1].created_at
    assert plan.listings[1:] == ((low - LISTING_SLACK, high + LISTING_SLACK),)
    batch = ledger.begin(plan)
    batch.observe_all([m._replace(status="delivered") for m in old[1:]], after)
    ledger.apply(batch.close(after, after))
    assert len(ledger.state.pending) == 0
    assert totals(ledger)[("outbound-api", "sms", "delivered", "")][0] == 40
    # With nothing more settled, the next poll is an ordinary one again.
    assert ledger.plan(after + 10).listings[1:] == ()


def test_a_burst_of_receipts_is_many_at_once_or_one_for_a_message_past_the_recent_tier() -> None:
    ledger = new_ledger(settle=SettleConfig(timeout=7200.0))
    poll(ledger, T0 + 10, *(msg(f"m{i}", "sent", T0) for i in range(2000)))
    loaded = Ledger(ledger.rules, ledger.state)
    assert loaded._receipt_burst is False, "a start is not a burst"
    recent_age = ledger.schedule().recent_age

    def burst(*ages: float) -> bool:
        ledger.apply(PollDelta(cursor=ledger.state.cursor, receipt_ages=list(ages)))
        return ledger._receipt_burst

    # 2,000 pending: a tenth of them at once is many (200 receipts), one fewer is not.
    assert BURST_SHARE * 2000 > BURST_RECEIPTS
    assert burst(*[1.0] * 200) and not burst(*[1.0] * 199)
    assert burst(recent_age) and not burst(recent_age - 0.5)
    # Fewer pending: BURST_RECEIPTS at once, whatever the share.
    small = new_ledger(settle=SettleConfig(timeout=7200.0))
    small.apply(PollDelta(cursor=T0, receipt_ages=[1.0] * BURST_RECEIPTS))
    assert small._receipt_burst
    small.apply(PollDelta(cursor=T0, receipt_ages=[1.0] * (BURST_RECEIPTS - 1)))
    assert not small._receipt_burst


def test_timed_out_messages_are_refreshed_in_batches_by_a_range_or_by_id() -> None:
    ledger = new_ledger(settle=SettleConfig(timeout=7200.0), page_size=1000)
    now = T0 + 20000
    due = (ledger.schedule().timeout_every - 1) * 10.0 + 5  # past the batch's wait, 10 s polls
    old = [msg(f"t{i}", "sent", now - 7200 - due - i) for i in range(5)]
    poll(ledger, T0 + 10, *old)
    ledger.state.cursor = ledger.state.complete_until = now - 30
    plan = ledger.plan(now)
    assert plan.timeout_due == {f"t{i}" for i in range(5)}
    # Five messages within one page: one ranged listing instead of five gets.
    assert plan.listings[1] == (now - 7200 - due - 4 - 1, now - 7200 - due + 1)
    assert plan.get_ids == ()


def test_totals_accumulate_across_polls() -> None:
    ledger = new_ledger()
    poll(ledger, T0 + 10, msg("a", "delivered"))
    poll(ledger, T0 + 20, msg("b", "delivered", segments=4, charge_nano=1))
    assert ledger.state.totals[("outbound-api", "sms", "delivered", "")] == Totals(2, 5, 4_150_001)


def test_new_label_values_pass_through_up_to_a_cap() -> None:
    ledger = new_ledger()
    news = [msg(f"n{i}", "delivered", kind=f"rcs{i}") for i in range(MAX_NEW_LABEL_VALUES + 3)]
    poll(ledger, T0 + 10, msg("w", "delivered", kind="whatsapp"), *news)
    kinds = {key[1] for key in ledger.state.totals}
    assert "whatsapp" in kinds and "sms" not in kinds
    assert {f"rcs{i}" for i in range(MAX_NEW_LABEL_VALUES)} <= kinds
    assert ledger.state.totals[("outbound-api", OTHER_LABEL_VALUE, "delivered", "")].messages == 3
    # Admitted values stay admitted; a value past the cap stays "other".
    poll(ledger, T0 + 20, msg("a", "delivered", kind="rcs0"), msg("b", "delivered", kind="zzz"))
    assert ledger.state.totals[("outbound-api", "rcs0", "delivered", "")].messages == 2
    assert ledger.state.totals[("outbound-api", OTHER_LABEL_VALUE, "delivered", "")].messages == 4
    # Pending messages use the same rule.
    poll(ledger, T0 + 30, msg("p", "accepted", kind="zzz"), msg("q", "read-later"))
    assert ledger.pending_by_labels() == {
        ("outbound-api", OTHER_LABEL_VALUE, "accepted"): 1,
        ("outbound-api", "sms", "read-later"): 1,
    }


Due = tuple[str, PendingEntry]


@dataclasses.dataclass
class ReferenceTiers:
    recent: list[Due] = dataclasses.field(default_factory=list)
    timed_out: list[Due] = dataclasses.field(default_factory=list)
    middle: list[tuple[float, Due]] = dataclasses.field(default_factory=list)
    recent_due: bool = False
    timeout_due: bool = False


def reference_tiers(ledger: Ledger, now: float, head: float) -> ReferenceTiers:
    """The pending messages due for a refresh, by tier, message by message."""
    interval, timeout = ledger.rules.poll_interval, ledger.rules.settle.timeout
    cadence = ledger.schedule()
    tiers = ReferenceTiers()
    for message_id, pending in ledger.state.pending.items():
        created = pending.created_at
        unseen = now - pending.observed_at
        if created + timeout <= now:
            tiers.timed_out.append((message_id, pending))
            tiers.timeout_due |= created + timeout + (cadence.timeout_every - 1) * interval <= now
        elif created >= head:
            continue
        elif created >= now - cadence.recent_age:
            if unseen >= interval * 0.5:
                tiers.recent.append((message_id, pending))
            tiers.recent_due |= unseen >= (cadence.recent_every - 0.5) * interval
        else:
            wait = max((now - created) / MIDDLE_AGE_DIVISOR, cadence.recent_every * interval)
            if unseen >= wait or ledger._receipt_burst:
                tiers.middle.append((unseen / wait, (message_id, pending)))
    return tiers


def reference_within_cap(ledger: Ledger, due: list[Due]) -> list[Due]:
    """From the minute of the one seen longest ago (the oldest among equals), those whose range
    takes at most refresh_records records (a minute at least)."""
    if not due:
        return due
    first = min(due, key=lambda item: (item[1].observed_at, item[1].created_at))
    due = [(i, p) for i, p in due if p.created_at // 60 >= first[1].created_at // 60]
    low = min(p.created_at for _, p in due)
    cap = max(1, ledger.rules.refresh_records // ledger.rules.page_size)
    return [
        (i, p)
        for i, p in due
        if int(p.created_at // 60) == int(low // 60) or ledger._pages(low, p.created_at) <= cap
    ]


def reference_probe(
    ledger: Ledger, now: float, head: float, covered: Callable[[float], bool]
) -> list[str]:
    """None of the middle tier due, or not a recent tier's poll: a probe, the one seen longest
    ago, if it has waited."""
    state, cadence, timeout = ledger.state, ledger.schedule(), ledger.rules.settle.timeout
    probes = [
        (p.observed_at, p.created_at, i)
        for i, p in state.pending.items()
        if p.created_at < min(head, now - cadence.recent_age) and p.created_at + timeout > now
    ]
    minutes = {int(created // 60) for _, created, _ in probes}
    many = sum(int(p.created_at // 60) in minutes for _, p in state.pending.items())
    if probes and ledger._pages(min(minutes) * 60, max(minutes) * 60) < many:
        seen, created, message_id = min(probes)
        if now - seen >= cadence.recent_every * ledger.rules.poll_interval and not covered(created):
            return [message_id]
    return []


def reference_recent(
    ledger: Ledger, recent: list[Due], head: float, horizon: float, gets: list[str]
) -> float:
    """The recent tier refreshed: the head listing reaching back to its oldest, or gets."""
    oldest = min(p.created_at for _, p in recent)
    if ledger._pages(oldest, None) - ledger._pages(head, None) < len(recent):
        return min(head, oldest - LISTING_SLACK, horizon)
    gets += [i for i, _ in recent]
    return head


def reference_recent_in_burst(
    ledger: Ledger,
    recent: list[Due],
    ranges: list[tuple[float, float | None]],
    head: float,
    horizon: float,
    gets: list[str],
) -> float:
    """A burst: the recent tier too, if it fits with the other refresh listings."""
    oldest = min(p.created_at for _, p in recent)
    records = ledger._records(oldest, None) + sum(ledger._records(a, b) for a, b in ranges)
    if records <= ledger.rules.refresh_records:
        return reference_recent(ledger, recent, head, horizon, gets)
    return head


def reference_plan(ledger: Ledger, now: float) -> PollPlan:
    """The refresh tiers message by message, in the most direct form: the plan must agree."""
    state, rules = ledger.state, ledger.rules
    timeout = rules.settle.timeout
    cadence = ledger.schedule()
    horizon = state.cursor - LISTING_SLACK
    head = ledger.head_start(now, cadence)
    burst = ledger._receipt_burst
    tiers = reference_tiers(ledger, now, head)
    recent, timed_out, middle = tiers.recent, tiers.timed_out, tiers.middle
    recent_due, timeout_due = tiers.recent_due, tiers.timeout_due
    head_after = head
    ranges: list[tuple[float, float | None]] = []
    late_end = ledger._late_sweep_end(now, cadence, head)  # tested on its own
    more_due = False
    if late_end is not None:
        ranges.append((state.floor, late_end))
    gets: list[str] = []

    def covered(created: float) -> bool:
        return created >= head_after or any(lo <= created <= (hi or now) for lo, hi in ranges)

    if recent_due and recent:
        head_after = reference_recent(ledger, recent, head_after, horizon, gets)
    refreshed: frozenset[str] = frozenset()
    if timeout_due and timed_out:
        refreshed = frozenset(i for i, _ in timed_out)
        low = min(p.created_at for _, p in timed_out)
        high = max(p.created_at for _, p in timed_out)
        if high >= head_after:
            head_after = min(head_after, low - LISTING_SLACK)
        elif ledger._pages(low, high) < len(timed_out):
            ranges.append((low - LISTING_SLACK, high + LISTING_SLACK))
        else:
            gets += sorted(refreshed)
    minutes = {int(p.created_at // 60) for _, (_, p) in middle}
    minutes |= {
        int(p.created_at // 60)
        for _, p in state.pending.items()
        if p.created_at < min(head, now - cadence.recent_age) and p.created_at + timeout > now
    }
    held = sum(int(p.created_at // 60) in minutes for _, p in state.pending.items())
    dense = held > 0 and held * 2 >= sum(ledger._histogram.get(m, 0) for m in minutes)
    burst = burst and dense
    if not burst:
        middle = [x for x in middle if x[0] >= 1.0]
    if middle and (recent_due or not recent or burst):
        uncovered = [(i, p) for _, (i, p) in middle if not covered(p.created_at)]
        due = reference_within_cap(ledger, uncovered)
        low = min((p.created_at for _, p in due), default=0.0)
        high = max((p.created_at for _, p in due), default=0.0)
        if due and dense and ledger._pages(low, high) < len(due):
            # A listing of their range takes fewer requests than getting each.
            ranges.append((low - LISTING_SLACK, high + LISTING_SLACK))
            more_due = len(due) < len(uncovered)
        else:
            middle.sort(key=lambda item: item[0], reverse=True)
            for _, (message_id, pending) in middle[:MIDDLE_GETS_PER_POLL]:
                if not covered(pending.created_at):
                    gets.append(message_id)
    elif dense:
        gets += reference_probe(ledger, now, head, covered)
    if recent and not recent_due and ledger._receipt_burst and dense:
        head_after = reference_recent_in_burst(ledger, recent, ranges, head_after, horizon, gets)
    if late_end is not None and head_after <= late_end:
        head_after, late_end = state.floor, None
        ranges.pop(0)
    return PollPlan(
        now,
        ((head_after, None), *ranges),
        horizon,
        tuple(gets),
        refreshed,
        late_sweep_end=late_end,
        more_due=more_due,
    )


@pytest.mark.parametrize("seed", range(40))
def test_the_plan_agrees_with_the_tiers_message_by_message(seed: int) -> None:
    rng = random.Random(seed)
    ledger = new_ledger(
        settle=SettleConfig(timeout=7200.0),
        page_size=rng.choice([5, 50]),
        refresh_records=rng.choice([50_000, 20, 100]),
    )
    now = T0 + 20000
    spread = rng.choice([120.0, 900.0, 9000.0])
    for step in range(rng.randrange(1, 8)):
        messages = [
            msg(
                f"m{step}-{i}",
                rng.choice(["sent", "queued", "delivered"]),
                now - rng.random() * spread,
            )
            for i in range(rng.randrange(0, 60))
        ]
        poll(ledger, now - rng.random() * spread, *messages)
        for message_id in rng.sample(sorted(ledger.state.pending), len(ledger.state.pending) // 3):
            aged(ledger, message_id, rng.random() * spread, now)
    for cursor, burst in itertools.product((now - 30, now - rng.random() * spread, T0), (0, 1)):
        ledger.state.cursor = cursor
        ledger._receipt_burst = bool(burst)  # as after a poll that settled many by receipts
        for at in (now, now + rng.random() * 3000):
            plan, expected = ledger.plan(at), reference_plan(ledger, at)
            assert (
                plan.listings,
                plan.horizon,
                plan.timeout_due,
                plan.late_sweep_end,
                plan.more_due,
            ) == (
                expected.listings,
                expected.horizon,
                expected.timeout_due,
                expected.late_sweep_end,
                expected.more_due,
            )
            # Which pending messages come in which order may differ; the set may not.
            assert sorted(plan.get_ids) == sorted(expected.get_ids)


def observe_one_by_one(ledger: Ledger, plan: PollPlan, seen: list[tuple[Message, float]]) -> Batch:
    batch = ledger.begin(plan)
    for message, at in seen:
        batch.observe(message, at)
    return batch


def observe_by_page(ledger: Ledger, plan: PollPlan, seen: list[tuple[Message, float]]) -> Batch:
    batch = ledger.begin(plan)
    start = 0  # consecutive records observed at the same time form one page
    while start < len(seen):
        end = start
        while end < len(seen) and seen[end][1] == seen[start][1]:
            end += 1
        batch.observe_all([m for m, _ in seen[start:end]], seen[start][1])
        start = end
    return batch


@pytest.mark.parametrize("seed", range(60))
def test_observing_a_page_at_once_equals_one_by_one(seed: int) -> None:
    rng = random.Random(seed)
    ledger = new_ledger(max_error_codes=2)
    statuses = ["sent", "queued", "delivered", "undelivered", "failed", "received", "odd"]
    ids = [f"i{n}" for n in range(30)]

    def random_message(created_base: float) -> Message:
        status = rng.choice(statuses)
        return msg(
            rng.choice(ids),
            status,
            created_base + rng.randrange(-200, 20),
            direction=rng.choice(["outbound-api", "inbound"]),
            kind=rng.choice(["sms", "mms", f"k{rng.randrange(14)}"]),
            error_code=rng.choice(["", "", "30003", "30007", "21610"]),
            error_message=rng.choice([None, "text a", "text b"]),
            segments=rng.randrange(1, 4),
            charge_nano=rng.randrange(10**7),
        )

    now = T0 + 10
    for _ in range(6):
        seen = []
        at = now
        for _ in range(rng.randrange(0, 40)):
            at += rng.choice([0.0, 0.0, 1.0, -2.0])  # late pages too
            seen.append((random_message(now), at))
        plan = ledger.plan(now)
        gone = rng.sample(sorted(ledger.state.pending), min(2, len(ledger.state.pending)))
        batches = [observe_one_by_one(ledger, plan, seen), observe_by_page(ledger, plan, seen)]
        for batch in batches:
            for message_id in gone:
                batch.gone(message_id)
        closing = now + rng.choice([5.0, 200.0])
        one, paged = (batch.close(closing, now) for batch in batches)
        assert one == paged
        assert batches[1].close(closing, now) == paged  # closing leaves the batch as it was
        ledger.apply(paged)
        now += rng.choice([10.0, 60.0, 150.0])


def test_between_sweeps_the_head_lists_from_just_before_the_last_one_and_the_cursor_waits() -> None:
    ledger = new_ledger(max_ingestion_delay=0.0)  # records show at once: no late sweep
    poll(ledger, T0 + 100)  # the first poll of a process sweeps from the cursor
    assert ledger.state.cursor == T0 + 100 - CURSOR_SAFETY
    cadence = ledger.schedule()
    plan = ledger.plan(T0 + 110)
    assert not plan.sweeps
    assert plan.created_after == T0 + 100 - cadence.head_overlap
    batch = ledger.begin(plan)
    batch.observe(msg("a", "delivered", T0 + 105), T0 + 110)
    ledger.apply(batch.close(T0 + 110, T0 + 110))
    assert ledger.state.cursor == T0 + 100 - CURSOR_SAFETY, "only a sweep moves the cursor"
    assert "a" in ledger.state.settled
    # Once the cursor trails by its margin and a sweep period, the head sweeps from the cursor.
    due = ledger.state.cursor + CURSOR_SAFETY + cadence.sweep_period
    assert not ledger.plan(due - 1).sweeps
    sweep = ledger.plan(due)
    assert sweep.sweeps and sweep.created_after == ledger.state.cursor - LISTING_SLACK
    poll(ledger, due)
    assert ledger.state.cursor == due - CURSOR_SAFETY


def test_a_record_late_in_the_log_is_seen_by_the_next_sweep() -> None:
    ledger = new_ledger(page_size=10)  # 2 messages a second: the head overlaps only a little
    now, serial = T0 + 10, 0

    def traffic(now: float) -> list[Message]:
        nonlocal serial
        serial += 20
        return [msg(f"m{serial - i}", "delivered", now - i / 2) for i in range(20)]

    for _ in range(40):
        poll(ledger, now, *traffic(now))
        now += 10
    cadence = ledger.schedule()
    assert cadence.head_overlap < 10
    created = now - 5  # shows in the log 28 s after its creation (within the cursor's margin)
    missed = 0
    while True:
        plan = ledger.plan(now)
        covers = plan.created_after <= created
        late = [msg("late", "delivered", created)] if covers and now >= created + 28 else []
        missed += not covers and now >= created + 28
        batch = ledger.begin(plan)
        for m in [*traffic(now), *late]:
            batch.observe(m, now)
        ledger.apply(batch.close(now, now))
        if late:
            break
        now += 10
        assert now - created <= CURSOR_SAFETY + cadence.sweep_period + 2 * 10, "never seen"
    assert missed, "the head listings had passed it: the sweep saw it"
    assert plan.sweeps
    assert totals(ledger)[("outbound-api", "sms", "delivered", "")][0] == serial + 1


def test_pending_messages_settled_by_a_receipt_record_their_age_for_the_schedule() -> None:
    ledger = new_ledger()
    poll(ledger, T0 + 10, msg("a", "sent", T0 + 5))
    delta = poll(ledger, T0 + 50, msg("a", "delivered", T0 + 5), msg("b", "delivered", T0 + 45))
    assert delta.receipt_ages == [45.0]  # b settled on first sight: no receipt delay to learn
    created = T0 + 200
    poll(ledger, created, *(msg(f"p{i}", "sent", created) for i in range(200)))
    for i in range(200):  # one receipt per poll, 60 s to 259 s after creation
        poll(ledger, created + 60 + i, msg(f"p{i}", "delivered", created))
    # The cadence takes the ages in at the next sweep: the 99.9th percentile of the 201 ages
    # (45, 60 ... 259) is 259, widened by the margin.
    assert ledger.schedule().recent_age < 259.0 * 1.25
    due = ledger.state.cursor + CURSOR_SAFETY + ledger.schedule().sweep_period
    assert ledger.plan(due).sweeps
    assert ledger.schedule().recent_age == pytest.approx(259.0 * 1.25)


def test_between_sweeps_the_recent_tier_keeps_the_age_its_last_sweep_re_listed() -> None:
    ledger = new_ledger(
        settle=SettleConfig(timeout=7200.0), max_ingestion_delay=0.0, page_size=1000
    )
    receipted = [msg(f"p{i}", "sent", T0 + 10) for i in range(100)]
    poll(ledger, T0 + 10, *receipted)
    # 100 receipts 60 s after creation; two messages older than the recent tier will be.
    poll(
        ledger,
        T0 + 70,
        *(m._replace(status="delivered") for m in receipted),
        msg("old", "sent", T0 + 20),
        msg("late", "sent", T0 + 15),
    )
    sweep = ledger.plan(T0 + 110)
    assert sweep.sweeps
    assert ledger.schedule().recent_age == pytest.approx(75.0)  # 60 s, widened by the margin
    batch = ledger.begin(sweep)
    batch.observe(msg("late", "delivered", T0 + 15), T0 + 110)  # a receipt 95 s late
    ledger.apply(batch.close(T0 + 110, T0 + 110))
    # That receipt widens the recent tier to "old" (created 90 s before), which the sweep left to
    # the middle tier: not until the next sweep, or the next poll would sweep again for it.
    plan = ledger.plan(T0 + 120)
    assert not plan.sweeps and ledger.schedule().recent_age == pytest.approx(75.0)
    poll(ledger, T0 + 120)
    due = ledger.state.cursor + CURSOR_SAFETY + ledger.schedule().sweep_period
    assert due == T0 + 150
    assert ledger.plan(due).sweeps
    assert ledger.schedule().recent_age == pytest.approx(95.0 * 1.25)


def test_no_catch_up_step_while_the_head_listings_keep_up() -> None:
    ledger = new_ledger()
    poll(ledger, T0 + 1000)  # a first poll: cursor at T0 + 970
    now = T0 + 1000
    for _ in range(20):  # the cursor trails between sweeps, the head keeps up
        now += 10
        assert ledger.catch_up_step(now) is None
        poll(ledger, now)
    # After an outage the backlog is stepped through from the cursor, the first step from
    # where records may still be new (max_ingestion_delay before).
    step = ledger.catch_up_step(now + 7200)
    assert step is not None and step.created_after == ledger.state.floor
    assert ledger.state.floor < ledger.state.cursor - LISTING_SLACK


# ---------------------------------------------------------------- countries and number groups


def by_country(ledger: Ledger) -> dict[tuple[str, str, str, str], tuple[int, int]]:
    return {k: (v.messages, v.charge_nano) for k, v in ledger.state.by_country.items()}


def by_group(ledger: Ledger) -> dict[tuple[str, str, str, str], tuple[int, int]]:
    return {k: (v.messages, v.charge_nano) for k, v in ledger.state.by_group.items()}


def test_a_settled_message_counts_under_its_country_and_number_group() -> None:
    ledger = new_ledger(number_groups={"+15551230000": "otp", "72345": "marketing"})
    poll(
        ledger,
        T0 + 10,
        msg("a", "delivered", remote="+14165550100", own="+15551230000"),
        msg("b", "failed", remote="+447700012345", own="72345", charge_nano=0),
        msg("c", "received", direction="inbound", remote="+18765550100", own="+15559990000"),
        msg("d", "delivered", remote="72000", own="+15551230000"),  # to a short code
    )
    assert by_country(ledger) == {
        ("outbound-api", "sms", "delivered", "CA"): (1, 4_150_000),
        ("outbound-api", "sms", "failed", "GB"): (1, 0),
        ("inbound", "sms", "received", "JM"): (1, 4_150_000),
        ("outbound-api", "sms", "delivered", "unknown"): (1, 4_150_000),
    }
    assert by_group(ledger) == {
        ("outbound-api", "sms", "delivered", "otp"): (2, 8_300_000),
        ("outbound-api", "sms", "failed", "marketing"): (1, 0),
        ("inbound", "sms", "received", "ungrouped"): (1, 4_150_000),
    }


def test_the_numbers_of_the_settling_record_count_not_those_first_seen() -> None:
    ledger = new_ledger(number_groups={"+15551230001": "otp"})
    poll(ledger, T0 + 10, msg("a", "sent", remote="+12125550100", own="+15551230000"))
    assert by_country(ledger) == {} and by_group(ledger) == {}
    poll(ledger, T0 + 20, msg("a", "delivered", remote="+14165550100", own="+15551230001"))
    assert by_country(ledger) == {("outbound-api", "sms", "delivered", "CA"): (1, 4_150_000)}
    assert by_group(ledger) == {("outbound-api", "sms", "delivered", "otp"): (1, 4_150_000)}


def test_a_message_settled_by_the_timeout_counts_under_its_last_record() -> None:
    ledger = new_ledger()
    poll(ledger, T0 + 10, msg("a", "sent", remote="+4915112345678"))
    poll(ledger, T0 + TIMEOUT + 20, gone=("a",))
    assert by_country(ledger) == {("outbound-api", "sms", "sent", "DE"): (1, 4_150_000)}
    assert by_group(ledger) == {("outbound-api", "sms", "sent", "ungrouped"): (1, 4_150_000)}


def test_countries_past_the_cap_are_other_and_unknown_does_not_use_it() -> None:
    ledger = new_ledger(max_countries=2)
    poll(
        ledger,
        T0 + 10,
        msg("a", "delivered", remote="+14165550100"),
        msg("u", "delivered", remote="x"),
    )
    poll(ledger, T0 + 20, msg("b", "delivered", remote="+447700012345"))
    poll(
        ledger,
        T0 + 30,
        msg("c", "delivered", remote="+4915112345678"),
        msg("d", "failed", remote="+33612345678"),
        msg("e", "delivered", remote="+14165550199"),  # an admitted country stays itself
    )
    assert by_country(ledger) == {
        ("outbound-api", "sms", "delivered", "CA"): (2, 8_300_000),
        ("outbound-api", "sms", "delivered", "unknown"): (1, 4_150_000),
        ("outbound-api", "sms", "delivered", "GB"): (1, 4_150_000),
        ("outbound-api", "sms", "delivered", "other"): (1, 4_150_000),
        ("outbound-api", "sms", "failed", "other"): (1, 4_150_000),
    }
    # The cap holds across restarts: admitted countries are those already counted.
    restarted = Ledger(ledger.rules, copy.deepcopy(ledger.state))
    poll(restarted, T0 + 40, msg("f", "delivered", remote="+819012345678"))
    assert ("outbound-api", "sms", "delivered", "JP") not in restarted.state.by_country
    assert restarted.state.by_country[("outbound-api", "sms", "delivered", "other")].messages == 2


def test_new_label_values_map_alike_in_every_counter() -> None:
    ledger = new_ledger()
    statuses = [f"new-{i}" for i in range(MAX_NEW_LABEL_VALUES + 2)]
    final = SettleConfig(timeout=TIMEOUT, final_statuses=frozenset(statuses))
    ledger = new_ledger(settle=final)
    poll(ledger, T0 + 10, *(msg(str(i), s) for i, s in enumerate(statuses)))
    assert {k[2] for k in ledger.state.by_country} == {k[2] for k in ledger.state.totals}
    assert {k[2] for k in ledger.state.by_group} == {k[2] for k in ledger.state.totals}
    assert OTHER_LABEL_VALUE in {k[2] for k in ledger.state.totals}


def test_oldest_pending_per_label_set_follows_settlements() -> None:
    ledger = new_ledger()
    poll(
        ledger,
        T0 + 140,
        msg("a", "sent", created=T0 + 55),
        msg("b", "sent", created=T0 + 130),
        msg("c", "queued", created=T0 + 90),
        msg("d", "sent", created=T0 + 60, kind="mms"),
    )
    assert ledger.pending_oldest() == {
        ("outbound-api", "sms", "sent"): T0 + 55,
        ("outbound-api", "sms", "queued"): T0 + 90,
    }  # the MMS settled on "sent"
    poll(
        ledger, T0 + 145, msg("a", "delivered", created=T0 + 55), msg("c", "sent", created=T0 + 90)
    )
    assert ledger.pending_oldest() == {("outbound-api", "sms", "sent"): T0 + 90}
    poll(
        ledger,
        T0 + 150,
        msg("b", "delivered", created=T0 + 130),
        msg("c", "failed", created=T0 + 90),
    )
    assert ledger.pending_oldest() == {}


# ---------------------------------------------------------------- late records


def test_a_record_first_seen_behind_the_cursor_is_counted_once_and_as_late() -> None:
    ledger = new_ledger(max_ingestion_delay=600.0)
    poll(ledger, T0 + 300, msg("a", "delivered", T0 + 100))
    assert ledger.state.cursor == T0 + 300 - CURSOR_SAFETY
    # "b" was created before the cursor but shows only now, 150 s late.
    delta = poll(ledger, T0 + 400, msg("b", "delivered", T0 + 250), msg("a", "delivered", T0 + 100))
    assert (delta.late_records, delta.lateness) == (1, 150.0)
    assert totals(ledger)[("outbound-api", "sms", "delivered", "")][0] == 2
    # Seen again by any later listing, it is not counted again, nor late again.
    delta = poll(ledger, T0 + 500, msg("b", "delivered", T0 + 250))
    assert delta.late_records == 0
    assert totals(ledger)[("outbound-api", "sms", "delivered", "")][0] == 2


def test_records_later_than_the_delay_behind_complete_until_are_ignored() -> None:
    ledger = new_ledger(max_ingestion_delay=60.0)
    poll(ledger, T0 + 1000)  # a listing from the start point: complete up to T0 + 940
    assert ledger.state.complete_until == T0 + 940
    delta = poll(ledger, T0 + 1010, msg("old", "delivered", T0 + 500))
    assert delta.late_records == 0 and ledger.state.totals == {}


def test_settled_ids_are_kept_down_to_the_floor() -> None:
    ledger = new_ledger(max_ingestion_delay=600.0)
    poll(ledger, T0 + 100, msg("a", "delivered", T0 + 95))
    for now in range(200, 700, 100):  # the cursor moves on; complete_until stays behind
        poll(ledger, T0 + now)
    assert ledger.state.cursor > T0 + 500 and ledger.state.floor < T0 + 95
    assert "a" in ledger.state.settled
    poll(ledger, T0 + 700, msg("a", "delivered", T0 + 95))  # a late sweep meets it again
    assert totals(ledger)[("outbound-api", "sms", "delivered", "")][0] == 1


def test_the_late_sweep_lists_from_the_floor_and_moves_complete_until() -> None:
    ledger = new_ledger(max_ingestion_delay=600.0)  # 10 a page: 2 messages a second fill many
    now, serial = T0 + 100, 0
    poll(ledger, now)
    swept = []
    while now < T0 + 100 + 2 * 1800 + 600:
        now += 10
        batch = [msg(f"m{serial + i}", "delivered", now - i / 2) for i in range(20)]
        serial += 20
        plan = ledger.plan(now)
        if plan.created_after == ledger.state.floor or plan.late_sweep_end is not None:
            swept.append(now)
            if now >= T0 + 700:  # a late sweep of 2,400 s, 600 of them listed by the head too
                assert plan.created_after > ledger.state.floor, "listed apart from the head"
                assert plan.listings[1] == (ledger.state.floor, now - 600 + LISTING_SLACK)
                assert plan.late_sweep_end == now - 600 + LISTING_SLACK
            poll(ledger, now, *batch)
            assert ledger.state.complete_until == max(T0, now - 600)
        else:
            assert plan.created_after > ledger.state.floor
            before = ledger.state.complete_until
            poll(ledger, now, *batch)
            assert ledger.state.complete_until == before
    period = ledger.schedule().late_sweep_period
    assert period == max(1800.0, 3 * 600.0)
    # Once complete_until can move (600 s in): a late sweep when it is a period behind now less
    # the delay, about every period.
    moving = [t for t in swept if t >= T0 + 700]
    assert len(moving) == 2 and moving[1] - moving[0] == pytest.approx(period, abs=10)


def late_sweep_due(page_size: int) -> tuple[Ledger, float]:
    """A ledger with one record a second since T0, and a late sweep due (from T0, up to 600 s
    before now)."""
    ledger = new_ledger(max_ingestion_delay=600.0, page_size=page_size)
    ledger.state.complete_until = T0
    now = T0 + 600 + ledger.schedule().late_sweep_period
    ledger.state.cursor = now - CURSOR_SAFETY
    for i in range(int(now - T0)):
        ledger._count_sighting(T0 + i)
    return ledger, now


def test_a_late_sweep_is_listed_apart_only_where_it_ends_before_the_head_listing() -> None:
    ledger, now = late_sweep_due(page_size=10)
    cadence = ledger.schedule()
    end = now - 600 + LISTING_SLACK
    assert ledger._late_sweep_end(now, cadence, now - 10) == end
    assert ledger._late_sweep_end(now, cadence, end) is None
    assert ledger._late_sweep_end(now, cadence, T0) is None, "the head lists from the floor"
    assert ledger._late_sweep_end(now - 1, cadence, now - 10) is None, "not due yet"
    plan = ledger.plan(now)  # a process's first poll: the head sweeps from the cursor
    assert plan.listings == ((now - CURSOR_SAFETY - LISTING_SLACK, None), (T0, end))
    assert plan.late_sweep_end == end


def test_a_late_sweep_is_the_head_listing_where_that_takes_no_more_pages() -> None:
    ledger, now = late_sweep_due(page_size=1000)  # 2 pages up to its end, 3 up to now
    assert ledger._late_sweep_end(now, ledger.schedule(), now - 10) is None
    plan = ledger.plan(now)
    assert plan.listings == ((T0, None),) and plan.late_sweep_end is None


def test_a_refresh_reaching_down_to_the_late_sweep_makes_the_two_one_listing() -> None:
    ledger = new_ledger(settle=SettleConfig(timeout=7200.0), max_ingestion_delay=600.0)
    now = T0 + 600 + 1800
    # 50 recent pending messages, the oldest 598 s old: the recent tier re-lists from it.
    poll(ledger, T0 + 10, *(msg(f"r{i}", "sent", now - 598 + 10 * i) for i in range(50)))
    for i in range(1200):  # 120 pages before the late sweep's end
        ledger._count_sighting(T0 + i)
    ledger.state.complete_until = T0
    ledger.state.cursor = now - CURSOR_SAFETY
    cadence = ledger.schedule()
    end = now - 600 + LISTING_SLACK
    assert ledger._late_sweep_end(now, cadence, ledger.head_start(now, cadence)) == end
    plan = ledger.plan(now)
    # The recent tier's listing starts at its oldest less a second: the late sweep's end.
    assert plan.listings == ((T0, None),) and plan.late_sweep_end is None


def test_a_short_delay_needs_no_late_sweep() -> None:
    ledger = new_ledger(max_ingestion_delay=10.0)  # within the cursor's own margin
    now = T0 + 100
    poll(ledger, now)
    for _ in range(400):
        now += 10
        plan = ledger.plan(now)
        assert plan.created_after >= ledger.state.cursor - LISTING_SLACK
        poll(ledger, now)
    assert ledger.state.floor == ledger.state.cursor - LISTING_SLACK
    assert ledger.state.complete_until >= ledger.state.cursor


def test_a_catch_up_makes_complete_until_follow_it() -> None:
    ledger = new_ledger(max_ingestion_delay=600.0)
    poll(ledger, T0 + 100)
    now = T0 + 86_400  # a day later
    first = ledger.catch_up_step(now)
    assert first is not None and first.created_after == ledger.state.floor
    steps = 0
    while (step := ledger.catch_up_step(now)) is not None:
        batch = ledger.begin(step)
        ledger.apply(batch.close(now, now))
        steps += 1
        assert step.window_end is not None
        assert ledger.state.complete_until == min(now - 600, step.window_end - LISTING_SLACK)
    assert steps > 1 and ledger.state.complete_until == now - 600


def test_a_catch_up_step_near_now_lists_from_the_cursor_unless_a_late_sweep_is_due() -> None:
    ledger = new_ledger(max_ingestion_delay=600.0, page_size=10)
    # 50 records below the cursor, above the floor: from the floor a listing takes 5 pages more.
    poll(ledger, T0 + 10, *(msg(f"m{i}", "delivered", T0 + 300 + i) for i in range(50)))
    ledger.state.cursor, ledger.state.complete_until = T0 + 560, T0 + 250
    assert ledger.state.floor == T0 + 249
    step = ledger.catch_up_step(T0 + 1260)  # 700 s behind; complete_until 410 s short of due
    assert step is not None and step.window_end == T0 + 620
    assert step.created_after == T0 + 560 - LISTING_SLACK  # not again from the floor
    assert step.floor == T0 + 249  # what it meets above the floor is still new
    # A late sweep due (complete_until a late_sweep_period behind now less the delay): from it.
    swept = ledger.catch_up_step(T0 + 3000)
    assert swept is not None and swept.created_after == T0 + 249


def test_a_catch_up_step_lists_from_the_floor_when_that_costs_no_page_more() -> None:
    ledger = new_ledger(max_ingestion_delay=600.0, page_size=10)
    poll(ledger, T0 + 10)
    ledger.state.cursor, ledger.state.complete_until = T0 + 560, T0 + 250
    step = ledger.catch_up_step(T0 + 1260)  # nothing between the floor and the cursor
    assert step is not None and step.created_after == T0 + 249
    # Only the records up to the window's end count: 15 below the cursor take a page more
    # there, whatever comes after the window (11 more: 2 pages from the cursor on, as many).
    poll(ledger, T0 + 10, *(msg(f"b{i}", "delivered", T0 + 300 + i) for i in range(15)))
    poll(ledger, T0 + 10, *(msg(f"a{i}", "delivered", T0 + 700 + i) for i in range(11)))
    ledger.state.cursor, ledger.state.complete_until = T0 + 560, T0 + 250
    step = ledger.catch_up_step(T0 + 1260)
    assert step is not None and step.window_end == T0 + 620
    assert step.created_after == T0 + 560 - LISTING_SLACK
    # 6 below the cursor fit the same page: from the floor, what comes after the window aside.
    cheap = new_ledger(max_ingestion_delay=600.0, page_size=10)
    poll(cheap, T0 + 10, *(msg(f"b{i}", "delivered", T0 + 300 + i) for i in range(6)))
    poll(cheap, T0 + 10, *(msg(f"a{i}", "delivered", T0 + 700 + i) for i in range(5)))
    cheap.state.cursor, cheap.state.complete_until = T0 + 560, T0 + 250
    step = cheap.catch_up_step(T0 + 1260)
    assert step is not None and step.created_after == T0 + 249


def test_a_late_sweep_is_due_once_complete_until_is_a_whole_period_behind() -> None:
    ledger = new_ledger(max_ingestion_delay=600.0, page_size=10)
    poll(ledger, T0 + 10, *(msg(f"m{i}", "delivered", T0 + 300 + i) for i in range(50)))
    ledger.state.cursor, ledger.state.complete_until = T0 + 560, T0 + 250
    period = ledger.schedule().late_sweep_period
    due = T0 + 250 + 600 + period  # now less the delay is a whole period past complete_until
    before, at = ledger.catch_up_step(due - 1), ledger.catch_up_step(due)
    assert before is not None and before.created_after == T0 + 560 - LISTING_SLACK
    assert at is not None and at.created_after == T0 + 249


def test_a_quiet_project_sweeps_from_the_floor_when_it_costs_no_page_more() -> None:
    ledger = new_ledger(max_ingestion_delay=600.0, page_size=1000)
    now = T0 + 1000
    poll(ledger, now, *(msg(f"m{i}", "delivered", T0 + 500 + i) for i in range(50)))
    cadence = ledger.schedule()
    assert ledger.state.floor < ledger.state.cursor - LISTING_SLACK
    due = ledger.state.cursor + CURSOR_SAFETY + cadence.sweep_period
    assert ledger.plan(due - 1).created_after > ledger.state.floor  # between sweeps: the head
    assert ledger.plan(due).created_after == ledger.state.floor  # a sweep: from the floor


def test_the_whole_state_as_one_commit_holds_every_part() -> None:
    """What a backfill seeds: the ledger's state as a delta that a store commits in one go."""
    ledger = new_ledger()
    poll(ledger, T0 + 10, msg("p", "sent", T0 + 2), msg("s", "delivered", T0 + 3))
    poll(ledger, T0 + 20, msg("f", "failed", T0 + 4, error_code="30003", error_message="Gone"))
    delta = ledger.state.as_delta()
    state = ledger.state
    assert delta.cursor == state.cursor
    assert delta.totals == state.totals
    assert delta.by_country == state.by_country and delta.by_group == state.by_group
    assert delta.error_info == state.error_info == {"30003": "Gone"}
    assert delta.settled_ids == {"s": (T0 // 60 + 1) * 60, "f": (T0 // 60 + 1) * 60}
    assert list(delta.pending_upserts) == ["p"]
    pending = delta.pending_upserts["p"]
    assert pending.message == msg("p", "sent", T0 + 2)
    assert pending.observed_at == T0 + 10
    # Applied to a fresh ledger, it is the same state.
    other = new_ledger()
    other.apply(delta)
    assert other.state.totals == state.totals
    assert set(other.state.pending) == {"p"} and set(other.state.settled) == {"s", "f"}


def test_old_pending_messages_that_are_a_small_share_of_their_range_are_got_not_listed() -> None:
    """A busy day's never-receipted messages: more of them than pages, but few of the records."""
    ledger = new_ledger(settle=SettleConfig(timeout=7200.0), page_size=100)
    now = T0 + 5000
    old = [msg(f"m{i}", "sent", now - 3600 - i) for i in range(30)]
    settled = [msg(f"s{i}", "delivered", now - 3600 - i * 0.1) for i in range(300)]
    poll(ledger, T0 + 10, *old, *settled)
    ledger.state.cursor = ledger.state.complete_until = now - 30
    for m in old:
        aged(ledger, m.id, 1000, now)  # all due
    plan = ledger.plan(now)
    assert len(plan.listings) == 1  # no listing of their range (4 pages, for 30 of 330 records)
    assert len(plan.get_ids) == 1  # the most overdue one, as for any trickle
