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
    PollDelta,
    Rules,
    new_state,
)
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
        batch.gone(message_id, now)
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
    assert ledger.state.pending == {}


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


def test_a_new_project_starts_start_from_before_now() -> None:
    state = new_state(T0, 3600.0)
    assert (state.start_point, state.cursor, state.complete_until) == (T0 - 3600,) * 3
    assert not state.pending and not state.settled and not state.totals


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
