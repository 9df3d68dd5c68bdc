"""Counting rules at their edges, through the ledger's public steps only (plan, begin, observe,
gone, close, apply): a message settled once, the timeout's boundary, error texts, and the caps on
error codes and new label values."""

from __future__ import annotations

import copy

import pytest

from exporter.config import Config, SettleConfig
from exporter.ledger import (
    MAX_NEW_LABEL_VALUES,
    OTHER_ERROR_CODE,
    OTHER_LABEL_VALUE,
    Ledger,
    LedgerState,
    Pending,
    PollDelta,
    PollPlan,
    Rules,
    Totals,
)
from exporter.pending import PendingSet
from exporter.records import Message

T0 = 1_800_000_000.0
TIMEOUT = 100.0
CREATED = T0 + 1
NEW_STATUSES = tuple(f"new{i}" for i in range(MAX_NEW_LABEL_VALUES + 2))
NEW_KINDS = tuple(f"kind{i}" for i in range(MAX_NEW_LABEL_VALUES + 2))
NEW_DIRECTIONS = tuple(f"dir{i}" for i in range(MAX_NEW_LABEL_VALUES + 2))
FINAL = frozenset({"delivered", "undelivered", "failed", "received", *NEW_STATUSES})

LabelKey = tuple[str, str, str, str]


def new_ledger(max_error_codes: int = 3, final: frozenset[str] = FINAL) -> Ledger:
    settle = SettleConfig(timeout=TIMEOUT, final_statuses=final)
    rules = Rules(
        settle=settle,
        poll_interval=10.0,
        failure_ratio_window=60.0,
        max_error_codes=max_error_codes,
        page_size=10,
    )
    return Ledger(rules, LedgerState(start_point=T0, cursor=T0))


def msg(
    id: str,
    status: str,
    *,
    created: float = CREATED,
    direction: str = "outbound-api",
    kind: str = "sms",
    error_code: str = "",
    error_message: str | None = None,
) -> Message:
    return Message(
        id, created, direction, kind, status, error_code, error_message, 1, 4_000_000, "", ""
    )


def close(ledger: Ledger, now: float, *messages: Message, gone: tuple[str, ...] = ()) -> PollDelta:
    """One poll at `now` observing `messages` (and 404s for `gone`); its delta, not applied."""
    batch = ledger.begin(ledger.plan(now))
    for message in messages:
        batch.observe(message, now)
    for message_id in gone:
        batch.gone(message_id)
    return batch.close(now, now)


def poll(ledger: Ledger, now: float, *messages: Message, gone: tuple[str, ...] = ()) -> PollDelta:
    """One poll, committed and applied."""
    delta = close(ledger, now, *messages, gone=gone)
    ledger.apply(delta)
    return delta


def counts(totals: dict[LabelKey, object]) -> dict[LabelKey, int]:
    return {key: value.messages for key, value in totals.items()}  # type: ignore[attr-defined]


def with_pending(*messages: Message) -> Ledger:
    """A ledger holding `messages` as pending (seen in a non-final status at T0 + 10)."""
    ledger = new_ledger()
    poll(ledger, T0 + 10, *messages)
    assert set(ledger.state.pending) == {m.id for m in messages}
    return ledger


# ----------------------------------------------------------------- settled once


@pytest.mark.parametrize("listed_status", ["delivered", "sent"])
def test_a_message_listed_and_answered_404_past_its_timeout_settles_once(
    listed_status: str,
) -> None:
    """Listed (in a final status, or in any status past the timeout) and gone by id in the same
    poll: it settles once, with the listed status, not a second time with the pending one."""
    ledger = with_pending(msg("a", "queued"))
    now = CREATED + TIMEOUT + 50
    delta = close(ledger, now, msg("a", listed_status), gone=("a",))
    assert delta.settled_ids == {"a": CREATED}
    assert counts(delta.totals) == {("outbound-api", "sms", listed_status, ""): 1}
    assert sum(settled for settled, _ in delta.window_add.values()) == 1
    ledger.apply(delta)
    assert counts(ledger.state.totals) == {("outbound-api", "sms", listed_status, ""): 1}
    assert len(ledger.state.pending) == 0


def test_a_message_gone_past_its_timeout_settles_with_its_last_status() -> None:
    ledger = with_pending(msg("a", "sent"), msg("b", "sent", created=CREATED + 60))
    now = CREATED + TIMEOUT + 50  # past the timeout of "a", not of "b"
    delta = close(ledger, now, gone=("a", "b"))
    assert delta.settled_ids == {"a": CREATED}
    assert counts(delta.totals) == {("outbound-api", "sms", "sent", ""): 1}
    assert delta.settled_by_timeout == 1
    assert delta.pending_removed == {"a"}


# ----------------------------------------------------------------- the timeout's boundary


def test_a_message_observed_exactly_at_its_timeout_settles_in_that_poll() -> None:
    ledger = with_pending(msg("a", "queued"))
    at_timeout = CREATED + TIMEOUT
    delta = close(ledger, at_timeout, msg("a", "sent"))
    assert delta.settled_ids == {"a": CREATED}
    assert counts(delta.totals) == {("outbound-api", "sms", "sent", ""): 1}
    assert delta.settled_by_timeout == 1
    # A moment before, it stays pending with the status seen.
    before = close(with_pending(msg("a", "queued")), at_timeout - 0.5, msg("a", "sent"))
    assert before.settled_ids == {}
    assert before.pending_upserts["a"].message.status == "sent"


def test_a_message_answered_404_exactly_at_its_timeout_settles_in_that_poll() -> None:
    ledger = with_pending(msg("a", "sent"))
    delta = close(ledger, CREATED + TIMEOUT, gone=("a",))
    assert delta.settled_ids == {"a": CREATED}
    assert delta.settled_by_timeout == 1
    early = close(with_pending(msg("a", "sent")), CREATED + TIMEOUT - 0.5, gone=("a",))
    assert early.settled_ids == {}


# ----------------------------------------------------------------- error texts


def test_a_message_settled_by_timeout_keeps_its_error_text() -> None:
    failing = msg("a", "sent", error_code="30003", error_message="Unreachable handset")
    ledger = with_pending(failing)
    delta = poll(ledger, CREATED + TIMEOUT + 5, failing)
    assert counts(delta.totals) == {("outbound-api", "sms", "sent", "30003"): 1}
    assert delta.error_info == {"30003": "Unreachable handset"}
    assert ledger.state.error_info == {"30003": "Unreachable handset"}


def test_a_message_gone_past_its_timeout_keeps_its_error_text() -> None:
    failing = msg("a", "sent", error_code="30005", error_message="Unknown destination")
    ledger = with_pending(failing)
    delta = poll(ledger, CREATED + TIMEOUT + 5, gone=("a",))
    assert counts(delta.totals) == {("outbound-api", "sms", "sent", "30005"): 1}
    assert ledger.state.error_info == {"30005": "Unknown destination"}


def test_the_error_text_is_kept_for_an_admitted_code_only() -> None:
    ledger = new_ledger(max_error_codes=1)
    delta = poll(
        ledger,
        T0 + 10,
        msg("a", "failed", error_code="30003", error_message="Unreachable handset"),
        msg("b", "failed", error_code="30005", error_message="Unknown destination"),
    )
    assert counts(delta.totals) == {
        ("outbound-api", "sms", "failed", "30003"): 1,
        ("outbound-api", "sms", "failed", OTHER_ERROR_CODE): 1,
    }
    assert ledger.state.error_info == {"30003": "Unreachable handset"}


# ----------------------------------------------------------------- the error-code cap


def test_no_error_takes_no_slot_of_the_error_code_cap_in_one_poll() -> None:
    ledger = new_ledger(max_error_codes=1)
    delta = poll(
        ledger,
        T0 + 10,
        msg("a", "delivered"),
        msg("b", "failed", error_code="30003"),
        msg("c", "failed", error_code="30005"),
    )
    assert counts(delta.totals) == {
        ("outbound-api", "sms", "delivered", ""): 1,
        ("outbound-api", "sms", "failed", "30003"): 1,
        ("outbound-api", "sms", "failed", OTHER_ERROR_CODE): 1,
    }


def test_no_error_takes_no_slot_of_the_error_code_cap_across_polls() -> None:
    ledger = new_ledger(max_error_codes=1)
    poll(ledger, T0 + 10, msg("a", "delivered"))
    poll(ledger, T0 + 20, msg("b", "failed", error_code="30003"))
    poll(ledger, T0 + 30, msg("c", "failed", error_code="30005"))
    poll(ledger, T0 + 40, msg("d", "failed", error_code="30003"))
    assert counts(ledger.state.totals) == {
        ("outbound-api", "sms", "delivered", ""): 1,
        ("outbound-api", "sms", "failed", "30003"): 2,
        ("outbound-api", "sms", "failed", OTHER_ERROR_CODE): 1,
    }


# ----------------------------------------------------------------- the cap on new label values


def test_new_status_values_are_remembered_from_the_committed_totals() -> None:
    """The cap on new values counts those of earlier polls: it does not start over each poll."""
    ledger = new_ledger()
    cap = MAX_NEW_LABEL_VALUES
    for i, status in enumerate(NEW_STATUSES[:cap]):
        poll(ledger, T0 + 10 + i, msg(f"m{i}", status))
    delta = poll(ledger, T0 + 30, msg("late", NEW_STATUSES[cap]), msg("again", NEW_STATUSES[0]))
    assert counts(delta.totals) == {
        ("outbound-api", "sms", OTHER_LABEL_VALUE, ""): 1,
        ("outbound-api", "sms", NEW_STATUSES[0], ""): 1,
    }


def test_a_documented_value_is_never_other_once_the_cap_is_full() -> None:
    ledger = new_ledger()
    cap = MAX_NEW_LABEL_VALUES
    poll(ledger, T0 + 10, *(msg(f"m{i}", s) for i, s in enumerate(NEW_STATUSES[:cap])))
    delta = poll(
        ledger,
        T0 + 20,
        msg("d", "delivered"),
        msg("u", "undelivered", direction="inbound", kind="mms"),
    )
    assert counts(delta.totals) == {
        ("outbound-api", "sms", "delivered", ""): 1,
        ("inbound", "mms", "undelivered", ""): 1,
    }
    # Nor is a documented value counted against the cap: with one slot left, a new one fits.
    ledger = new_ledger()
    poll(ledger, T0 + 10, msg("d", "delivered"), msg("f", "failed"), msg("r", "received"))
    poll(ledger, T0 + 20, *(msg(f"m{i}", s) for i, s in enumerate(NEW_STATUSES[: cap - 1])))
    delta = poll(ledger, T0 + 30, msg("x", NEW_STATUSES[cap - 1]), msg("y", NEW_STATUSES[cap]))
    assert counts(delta.totals) == {
        ("outbound-api", "sms", NEW_STATUSES[cap - 1], ""): 1,
        ("outbound-api", "sms", OTHER_LABEL_VALUE, ""): 1,
    }


@pytest.mark.parametrize("field", ["direction", "kind"])
def test_new_directions_and_kinds_are_capped_across_polls(field: str) -> None:
    values = NEW_DIRECTIONS if field == "direction" else NEW_KINDS
    cap = MAX_NEW_LABEL_VALUES
    ledger = new_ledger()
    for i, value in enumerate(values[:cap]):
        poll(ledger, T0 + 10 + i, msg(f"m{i}", "delivered", **{field: value}))
    delta = poll(ledger, T0 + 30, msg("x", "delivered", **{field: values[cap]}))
    other = dict(direction="outbound-api", kind="sms")
    other[field] = OTHER_LABEL_VALUE
    assert counts(delta.totals) == {(other["direction"], other["kind"], "delivered", ""): 1}
    # The documented ones still show as themselves.
    delta = poll(ledger, T0 + 40, msg("y", "delivered", direction="inbound", kind="mms"))
    assert counts(delta.totals) == {("inbound", "mms", "delivered", ""): 1}


def test_pending_messages_show_new_values_under_the_same_cap() -> None:
    ledger = new_ledger(final=frozenset({"delivered", *NEW_STATUSES[:MAX_NEW_LABEL_VALUES]}))
    cap = MAX_NEW_LABEL_VALUES
    poll(ledger, T0 + 10, *(msg(f"m{i}", s) for i, s in enumerate(NEW_STATUSES[:cap])))
    poll(ledger, T0 + 20, msg("p", NEW_STATUSES[cap]), msg("q", "sent"))
    assert ledger.pending_by_labels() == {
        ("outbound-api", "sms", OTHER_LABEL_VALUE): 1,
        ("outbound-api", "sms", "sent"): 1,
    }


# ----------------------------------------------------------------- rules and restarts


def test_the_rules_are_those_the_configuration_sets() -> None:
    settle = SettleConfig(timeout=50.0, final_statuses=frozenset({"delivered"}))
    config = Config(
        projects=(),
        poll_interval=7.0,
        failure_ratio_window=120.0,
        max_ingestion_delay=900.0,
        settle=settle,
        max_error_codes=4,
        max_countries=5,
        number_groups={"otp": ("+15551230000",), "support": ("+15551230001", "+15551230002")},
        page_size=25,
    )
    assert Rules.of(config) == Rules(
        settle=settle,
        poll_interval=7.0,
        failure_ratio_window=120.0,
        max_error_codes=4,
        page_size=25,
        max_countries=5,
        number_groups={
            "+15551230000": "otp",
            "+15551230001": "support",
            "+15551230002": "support",
        },
        max_ingestion_delay=900.0,
    )


def test_a_restarted_ledger_goes_on_from_the_committed_state() -> None:
    """What a ledger holds is rebuilt from the state the store loads: the pending messages (by
    label set, oldest first) and the settled ids, which are never counted again."""
    first = new_ledger()
    poll(
        first,
        T0 + 10,
        msg("a", "sent", created=T0 + 2),
        msg("b", "sent", created=T0 + 5),
        msg("c", "queued", created=T0 + 3, kind="mms"),
        msg("d", "delivered", created=T0 + 4),
    )
    restarted = Ledger(first.rules, copy.deepcopy(first.state))
    expected_pending = {("outbound-api", "sms", "sent"): 2, ("outbound-api", "mms", "queued"): 1}
    assert restarted.pending_by_labels() == first.pending_by_labels() == expected_pending
    assert restarted.pending_oldest() == {
        ("outbound-api", "sms", "sent"): T0 + 2,
        ("outbound-api", "mms", "queued"): T0 + 3,
    }
    delta = poll(
        restarted,
        T0 + 20,
        msg("d", "delivered", created=T0 + 4),  # settled before the restart
        msg("a", "delivered", created=T0 + 2),
    )
    assert delta.settled_ids == {"a": T0 + 2}
    assert counts(restarted.state.totals) == {("outbound-api", "sms", "delivered", ""): 2}
    assert restarted.pending_by_labels() == {
        ("outbound-api", "sms", "sent"): 1,
        ("outbound-api", "mms", "queued"): 1,
    }
    assert restarted.pending_oldest() == {
        ("outbound-api", "sms", "sent"): T0 + 5,
        ("outbound-api", "mms", "queued"): T0 + 3,
    }


# ----------------------------------------------------------------- what a poll reports


def test_a_poll_counts_what_it_listed_new_and_ignored() -> None:
    ledger = new_ledger()
    poll(ledger, T0 + 5, msg("done", "delivered", created=T0 + 2))
    batch = ledger.begin(ledger.plan(T0 + 10))
    batch.observe_all(
        [
            msg("a", "sent", created=T0 + 3),
            msg("b", "delivered", created=T0 + 4),
            msg("a", "sent", created=T0 + 3),  # listed twice: one message
            msg("old", "delivered", created=T0 - 5),  # before the start point
            msg("older", "sent", created=T0 - 7),
            msg("done", "delivered", created=T0 + 2),  # settled in an earlier poll
        ],
        T0 + 10,
    )
    batch.observe_all(
        [msg("c", "sent", created=T0 + 6), msg("old2", "sent", created=T0 - 9)], T0 + 11
    )
    assert (batch.listed, batch.new_messages, batch.ignored) == (8, 3, 3)
    delta = batch.close(T0 + 12, T0 + 10)
    assert delta.new_messages == 3
    assert delta.sightings == {T0 + 3: 1, T0 + 4: 1, T0 + 6: 1}


def test_first_sightings_are_counted_per_creation_time() -> None:
    ledger = new_ledger()
    delta = poll(
        ledger,
        T0 + 10,
        msg("a", "sent", created=T0 + 3),
        msg("b", "delivered", created=T0 + 3),
        msg("c", "sent", created=T0 + 4),
    )
    assert delta.sightings == {T0 + 3: 2, T0 + 4: 1}


def test_a_record_created_exactly_at_the_floor_is_counted() -> None:
    ledger = new_ledger()  # start point T0: the floor
    delta = poll(ledger, T0 + 10, msg("edge", "delivered", created=T0))
    assert delta.settled_ids == {"edge": T0}


def late_ledger() -> Ledger:
    """A ledger whose cursor (T0 + 100) is ahead of where every record is sure to have been
    seen (T0 + 50): records first seen between the two are late, and still new."""
    rules = new_ledger().rules
    return Ledger(rules, LedgerState(start_point=T0, cursor=T0 + 100, complete_until=T0 + 50))


def test_records_first_seen_behind_the_cursor_are_counted_as_late() -> None:
    ledger = late_ledger()
    at = T0 + 140
    delta = poll(
        ledger,
        at,
        msg("x", "delivered", created=T0 + 60),
        msg("y", "sent", created=T0 + 70),
        msg("edge", "delivered", created=T0 + 100),  # at the cursor: not late
        msg("new", "delivered", created=T0 + 120),
    )
    assert delta.late_records == 2
    assert delta.lateness == at - (T0 + 60)
    assert set(delta.settled_ids) == {"x", "edge", "new"}


def test_a_poll_without_late_records_reports_no_lateness() -> None:
    delta = poll(late_ledger(), T0 + 140, msg("new", "delivered", created=T0 + 120))
    assert (delta.late_records, delta.lateness) == (0, 0.0)


def test_a_plan_without_a_floor_ignores_what_is_below_its_horizon() -> None:
    ledger = new_ledger()
    plan = PollPlan(T0 + 100, ((T0 + 49, None),), T0 + 50, (), frozenset())
    batch = ledger.begin(plan)
    batch.observe_all([msg("below", "delivered", created=T0 + 10)], T0 + 100)
    batch.observe_all([msg("above", "delivered", created=T0 + 60)], T0 + 100)
    assert (batch.ignored, batch.new_messages) == (1, 1)
    assert batch.close(T0 + 100, T0 + 100).settled_ids == {"above": T0 + 60}


def test_of_two_observations_made_at_the_same_time_the_later_one_counts() -> None:
    ledger = new_ledger()
    batch = ledger.begin(ledger.plan(T0 + 10))
    batch.observe(msg("a", "queued"), T0 + 10)
    batch.observe(msg("a", "sent"), T0 + 10)
    delta = batch.close(T0 + 10, T0 + 10)
    assert delta.pending_upserts["a"].message.status == "sent"


def test_a_pending_message_seen_again_unchanged_is_only_marked_seen() -> None:
    ledger = with_pending(msg("a", "sent"), msg("b", "sent"))
    delta = poll(ledger, T0 + 30, msg("a", "sent"), msg("b", "queued"))
    assert delta.pending_seen == {"a": T0 + 30}
    assert list(delta.pending_upserts) == ["b"]
    assert ledger.state.pending.get("a").observed_at == T0 + 30  # type: ignore[union-attr]
    assert ledger.state.pending.get("b").status == "queued"  # type: ignore[union-attr]
    # Settled in the next poll: marked seen there too, it is gone from pending all the same.
    delta = poll(ledger, T0 + 40, msg("a", "delivered"))
    assert "a" not in ledger.state.pending


def test_an_error_code_without_text_keeps_the_text_known_for_it() -> None:
    ledger = new_ledger()
    poll(ledger, T0 + 10, msg("a", "failed", error_code="30003", error_message="Unreachable"))
    delta = poll(ledger, T0 + 20, msg("b", "failed", error_code="30003"))
    assert delta.error_info == {}
    assert ledger.state.error_info == {"30003": "Unreachable"}
    pending = with_pending(msg("c", "sent", error_code="30005"))
    delta = poll(pending, CREATED + TIMEOUT + 1, msg("c", "sent", error_code="30005"))
    assert delta.settled_by_timeout == 1
    assert delta.error_info == {}


# ----------------------------------------------------------------- settling by timeout


def test_several_messages_settled_by_timeout_in_one_poll_all_count() -> None:
    ledger = with_pending(msg("a", "sent"), msg("b", "sent"), msg("c", "sent"))
    now = CREATED + TIMEOUT + 5
    delta = poll(ledger, now, msg("a", "sent"), msg("b", "sent"), gone=("c",))
    assert delta.settled_by_timeout == 3
    assert counts(delta.totals) == {("outbound-api", "sms", "sent", ""): 3}
    assert ledger.state.totals[("outbound-api", "sms", "sent", "")].segments == 3


def test_every_gone_message_is_dealt_with_whatever_the_others() -> None:
    listed = [msg(f"l{i}", "sent") for i in range(10)]
    gone = [msg(f"g{i}", "sent") for i in range(10)]
    ledger = with_pending(*listed, *gone)
    now = CREATED + TIMEOUT + 5
    delta = close(ledger, now, *listed, gone=tuple(m.id for m in listed + gone))
    assert set(delta.settled_ids) == {m.id for m in listed + gone}
    assert counts(delta.totals) == {("outbound-api", "sms", "sent", ""): 20}


def test_timeout_due_messages_not_yet_observed_are_those_to_get() -> None:
    ledger = with_pending(*(msg(i, "sent") for i in "abcd"))
    now = CREATED + TIMEOUT + 5
    plan = PollPlan(now, ((T0 - 1, None),), T0 - 1, (), frozenset("abcd"), floor=T0)
    batch = ledger.begin(plan)
    assert batch.unrefreshed_timeout_due() == ["a", "b", "c", "d"]
    batch.observe(msg("a", "delivered"), now)
    batch.observe(msg("b", "sent"), now)
    batch.gone("c")
    assert batch.unrefreshed_timeout_due() == ["d"]


# ----------------------------------------------------------------- sums under one label


def test_error_codes_past_the_cap_add_up_under_other() -> None:
    ledger = new_ledger(max_error_codes=1)
    delta = poll(
        ledger,
        T0 + 10,
        msg("a", "failed", error_code="30001"),
        msg("b", "failed", error_code="30002")._replace(segments=2, charge_nano=10),
        msg("c", "failed", error_code="30003")._replace(segments=3, charge_nano=20),
    )
    other = delta.totals[("outbound-api", "sms", "failed", OTHER_ERROR_CODE)]
    assert (other.messages, other.segments, other.charge_nano) == (2, 5, 30)


def test_messages_of_one_country_and_group_add_up() -> None:
    rules = new_ledger().rules
    ledger = Ledger(
        Rules(
            settle=rules.settle,
            poll_interval=10.0,
            failure_ratio_window=60.0,
            max_error_codes=3,
            page_size=10,
            number_groups={"+15551230000": "otp"},
        ),
        LedgerState(start_point=T0, cursor=T0),
    )
    us = dict(remote="+12125550100", own="+15551230000")
    delta = poll(
        ledger,
        T0 + 10,
        msg("a", "delivered")._replace(segments=2, charge_nano=10, **us),
        msg("b", "delivered")._replace(segments=3, charge_nano=20, **us),
    )
    by_country = delta.by_country[("outbound-api", "sms", "delivered", "US")]
    by_group = delta.by_group[("outbound-api", "sms", "delivered", "otp")]
    assert (by_country.messages, by_country.segments, by_country.charge_nano) == (2, 5, 30)
    assert (by_group.messages, by_group.segments, by_group.charge_nano) == (2, 5, 30)


def test_an_admitted_country_stays_admitted_under_the_cap() -> None:
    rules = new_ledger().rules
    ledger = Ledger(
        Rules(
            settle=rules.settle,
            poll_interval=10.0,
            failure_ratio_window=60.0,
            max_error_codes=3,
            page_size=10,
            max_countries=1,
        ),
        LedgerState(start_point=T0, cursor=T0),
    )
    delta = poll(
        ledger,
        T0 + 10,
        msg("a", "delivered")._replace(remote="+12125550100"),
        msg("b", "failed")._replace(remote="+12125550101"),
        msg("c", "failed")._replace(remote="+442079460000"),
    )
    assert counts(delta.by_country) == {
        ("outbound-api", "sms", "delivered", "US"): 1,
        ("outbound-api", "sms", "failed", "US"): 1,
        ("outbound-api", "sms", "failed", OTHER_LABEL_VALUE): 1,
    }


def test_pending_messages_of_label_sets_shown_alike_add_up() -> None:
    ledger = new_ledger(final=frozenset({"delivered", *NEW_STATUSES[:MAX_NEW_LABEL_VALUES]}))
    cap = MAX_NEW_LABEL_VALUES
    poll(ledger, T0 + 10, *(msg(f"m{i}", s) for i, s in enumerate(NEW_STATUSES[:cap])))
    poll(
        ledger,
        T0 + 20,
        msg("q", NEW_STATUSES[cap + 1], created=T0 + 5),
        msg("p", NEW_STATUSES[cap], created=T0 + 8),
    )
    assert ledger.pending_by_labels() == {("outbound-api", "sms", OTHER_LABEL_VALUE): 2}
    assert ledger.pending_oldest() == {("outbound-api", "sms", OTHER_LABEL_VALUE): T0 + 5}


# ----------------------------------------------------------------- windows and pruning


def test_the_failure_ratio_counts_the_window_s_first_second() -> None:
    ledger = new_ledger()  # a 60 s window
    poll(ledger, T0 + 10, msg("f", "failed"))
    poll(ledger, T0 + 70, msg("d", "delivered"))
    assert ledger.failure_ratios(T0 + 70) == {("outbound-api", "sms"): 0.5}
    assert ledger.failure_ratios(T0 + 71) == {("outbound-api", "sms"): 0.0}


def test_a_catch_up_step_lists_one_window_from_the_cursor_and_gets_nothing() -> None:
    ledger = new_ledger()
    now = T0 + 100_000
    plan = ledger.catch_up_step(now)
    assert plan is not None
    assert plan.now == now
    assert plan.horizon == T0 - 1
    (start, end), *rest = plan.listings
    assert rest == [] and start == T0 - 1 and end is not None and T0 < end < now
    assert (plan.get_ids, plan.timeout_due, plan.window_end, plan.floor) == (
        (),
        frozenset(),
        end,
        T0,
    )
    delta = ledger.begin(plan).close(now, now)
    assert delta.cursor == end - 1  # everything before the window's end has been listed
    assert delta.head_started is None


def test_no_catch_up_step_right_after_a_head_listing_near_now() -> None:
    ledger = new_ledger()
    now = T0 + 100_000
    # An ordinary poll whose head listing started just now: what is left is within a step.
    batch = ledger.begin(ledger.plan(now))
    ledger.apply(batch.close(now, now))
    assert ledger.catch_up_step(now + 10) is None
    # What is left starts 30 s (the cursor's margin) before that head listing: 100 s later,
    # more than a first step (60 s) is left.
    assert ledger.catch_up_step(now + 100) is not None


def test_complete_until_never_goes_back() -> None:
    ledger = Ledger(
        new_ledger().rules,
        LedgerState(start_point=T0, cursor=T0 + 1000, complete_until=T0 + 1000),
    )
    floor = ledger.state.floor
    plan = PollPlan(T0 + 1100, ((floor, None),), T0 + 999, (), frozenset(), floor=floor)
    delta = ledger.begin(plan).close(T0 + 1100, T0 + 1100)
    assert delta.complete_until == T0 + 1000


def test_a_settled_id_is_kept_while_its_record_can_still_be_new() -> None:
    """Settled ids are forgotten only below the next floor: one that could be re-listed as new
    is never forgotten, so it is never counted twice."""
    ledger = new_ledger()  # max_ingestion_delay 600 s
    poll(ledger, T0 + 80, msg("a", "delivered", created=T0 + 50))
    listing = T0 + 650.5  # a sweep from the floor: complete until T0 + 50.5
    delta = poll(ledger, listing)
    assert delta.complete_until == T0 + 50.5
    assert ledger.state.floor == T0 + 49.5 < T0 + 50
    poll(ledger, T0 + 700, msg("a", "delivered", created=T0 + 50))
    assert counts(ledger.state.totals) == {("outbound-api", "sms", "delivered", ""): 1}


def test_polls_settling_in_the_same_second_add_up_in_the_failure_window() -> None:
    ledger = new_ledger()
    poll(ledger, T0 + 10.2, msg("f", "failed"))
    poll(ledger, T0 + 10.7, msg("d", "delivered"))
    poll(ledger, T0 + 10.9, msg("e", "delivered"))
    assert ledger.failure_ratios(T0 + 11) == {("outbound-api", "sms"): pytest.approx(1 / 3)}


def test_settled_ids_are_forgotten_below_the_prune_point_whatever_their_order() -> None:
    """Ids settled in later polls may be older (late records): each is forgotten once below."""
    # Kept a minute of creation at a time (T0 starts a minute): the times are minutes apart.
    ledger = new_ledger()
    ledger.apply(PollDelta(cursor=T0, settled_ids={"x": T0 + 180}))
    ledger.apply(PollDelta(cursor=T0, settled_ids={"y": T0 + 20, "z": T0 + 100}))
    ledger.apply(PollDelta(cursor=T0, prune_settled_before=T0 + 90))
    assert set(ledger.state.settled) == {"x", "z"}
    ledger.apply(PollDelta(cursor=T0, prune_settled_before=T0 + 150))
    assert set(ledger.state.settled) == {"x"}
    ledger.apply(PollDelta(cursor=T0, prune_settled_before=T0 + 250))
    assert len(ledger.state.settled) == 0


def test_the_plan_is_for_the_time_it_was_made() -> None:
    ledger = new_ledger()
    assert ledger.plan(T0 + 123).now == T0 + 123


def test_the_schedule_follows_the_rules_and_the_traffic() -> None:
    settle = SettleConfig(timeout=TIMEOUT, final_statuses=FINAL)
    rules = Rules(
        settle=settle,
        poll_interval=10.0,
        failure_ratio_window=60.0,
        max_error_codes=3,
        page_size=10,
        max_ingestion_delay=1200.0,
    )
    ledger = Ledger(rules, LedgerState(start_point=T0, cursor=T0))
    assert ledger.schedule().late_sweep_period == 3600.0  # three ingestion delays
    # 75 first sightings in the 5 minutes before the cursor's minute (none in the last one):
    # 0.25 a second, so the 8 records of a page's 80 % take 32 s, less the 10 s since the last
    # head listing.
    minute = (T0 // 60) * 60 + 600
    sightings = {minute - 300 + 3.2 * i: 1 for i in range(75)}
    ledger.apply(PollDelta(cursor=minute + 30, sightings=sightings))
    assert ledger.schedule().head_overlap == 30.0, "no traffic seen until the next sweep"
    assert ledger.plan(minute + 40).sweeps  # a process's first poll sweeps
    assert ledger.schedule().head_overlap == pytest.approx(22.0)
    assert ledger.schedule().interval == 10.0


def test_a_restarted_ledger_takes_the_traffic_from_its_pending_messages() -> None:
    rules = new_ledger().rules
    minute = (T0 // 60) * 60 + 600
    pending = {
        f"p{i}": Pending(msg(f"p{i}", "sent", created=minute - 300 + 3.2 * i), minute)
        for i in range(75)
    }
    held = PendingSet()
    for p in pending.values():
        held.put(p.message, p.observed_at)
    state = LedgerState(start_point=T0, cursor=minute + 30, pending=held)
    # As in the test above: 0.25 new messages a second, 10 records a page.
    assert Ledger(rules, state).schedule().head_overlap == pytest.approx(22.0)


def test_a_message_s_labels_are_its_direction_kind_and_status() -> None:
    labels = new_ledger().state.label_values()
    assert labels.map("inbound", "mms", "sent") == ("inbound", "mms", "sent")
    assert labels.map("dir0", "kind0", "new0") == ("dir0", "kind0", "new0")


def test_a_late_settlement_under_a_first_sight_label_set_leaves_the_batch_as_it_was() -> None:
    """A status made final by a changed configuration: one message settles with it at first sight,
    another past its timeout (404) in the same poll: both counted, and closing twice is the same."""
    before = new_ledger()
    poll(before, T0 + 10, msg("a", "sent"), msg("b", "sent"))
    settle = SettleConfig(
        timeout=TIMEOUT, final_statuses=frozenset({"delivered", "sent"}), final_statuses_by_kind={}
    )
    rules = Rules(settle, 10.0, 900.0, 50, 1000)
    state = copy.deepcopy(before.state)
    ledger = Ledger(rules, state)
    now = CREATED + TIMEOUT + 50
    batch = ledger.begin(ledger.plan(now))
    batch.observe(msg("a", "sent"), now)
    batch.gone("b")
    first, second = batch.close(now, now), batch.close(now, now)
    assert counts(first.totals) == {("outbound-api", "sms", "sent", ""): 2}
    both = Totals(2, 2, 8_000_000)  # each message 1 segment, $0.004
    assert first.by_country == {("outbound-api", "sms", "sent", "unknown"): both}
    assert first.by_group == {("outbound-api", "sms", "sent", "ungrouped"): both}
    assert first.totals == second.totals and first.by_country == second.by_country
    assert first.settled_by_timeout == second.settled_by_timeout == 1


def observed_in_order(ledger: Ledger, *observations: tuple[Message, float]) -> PollDelta:
    now = max(at for _, at in observations)
    batch = ledger.begin(ledger.plan(now))
    for message, at in observations:
        batch.observe(message, at)
    return batch.close(now, now)


def test_an_older_changed_observation_never_overrides_a_newer_unchanged_one() -> None:
    ledger = with_pending(msg("a", "sent"))
    delta = observed_in_order(ledger, (msg("a", "sent"), T0 + 30), (msg("a", "queued"), T0 + 20))
    assert delta.pending_upserts == {} and delta.pending_seen == {"a": T0 + 30}


def test_the_latest_observation_of_a_pending_message_wins_changed_or_not() -> None:
    ledger = with_pending(msg("a", "sent"))
    # Changed, then back to what is held: nothing to write, seen at the latest.
    delta = observed_in_order(ledger, (msg("a", "queued"), T0 + 20), (msg("a", "sent"), T0 + 30))
    assert delta.pending_upserts == {} and delta.pending_seen == {"a": T0 + 30}
    # Unchanged, then changed: the change is written, and it is not only "seen".
    delta = observed_in_order(ledger, (msg("a", "sent"), T0 + 20), (msg("a", "queued"), T0 + 30))
    assert delta.pending_seen == {}
    assert {i: p.message.status for i, p in delta.pending_upserts.items()} == {"a": "queued"}
    # Unchanged, then settled: settled only.
    delta = observed_in_order(ledger, (msg("a", "sent"), T0 + 20), (msg("a", "delivered"), T0 + 30))
    assert delta.pending_seen == {} and set(delta.settled_ids) == {"a"}


def test_an_unchanged_message_observed_exactly_at_its_timeout_settles_in_that_poll() -> None:
    ledger = with_pending(msg("a", "sent"))
    delta = close(ledger, CREATED + TIMEOUT, msg("a", "sent"))
    assert counts(delta.totals) == {("outbound-api", "sms", "sent", ""): 1}
    assert delta.settled_by_timeout == 1 and delta.pending_seen == {}


def test_a_message_settled_by_timeout_counts_under_its_number_group_and_in_full() -> None:
    settle = SettleConfig(timeout=TIMEOUT, final_statuses=FINAL)
    rules = Rules(settle, 10.0, 60.0, 3, 1000, number_groups={"+15551230000": "otp"})
    ledger = Ledger(rules, LedgerState(start_point=T0, cursor=T0))
    pending = Message(
        "a", CREATED, "outbound-api", "sms", "sent", "", None, 2, 7, "", "+15551230000"
    )
    poll(ledger, T0 + 10, pending)
    delta = close(ledger, CREATED + TIMEOUT + 5, pending)
    assert delta.by_group == {("outbound-api", "sms", "sent", "otp"): Totals(1, 2, 7)}
    assert delta.by_country == {("outbound-api", "sms", "sent", "unknown"): Totals(1, 2, 7)}
