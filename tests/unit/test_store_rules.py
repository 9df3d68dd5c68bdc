"""The store's public methods at their edges: seeding a project with backfilled history, and
each write being all or nothing."""

from __future__ import annotations

from pathlib import Path

import pytest

from exporter.ledger import LedgerState, Pending, PollDelta, Totals
from exporter.records import Message
from exporter.store import CommitError, StateError, Store

NOW = 1_790_000_000.0
START = NOW - 86_400.0
KEY = ("outbound-api", "sms", "delivered", "")


def message(message_id: str, created_at: float, status: str = "sent") -> Message:
    return Message(
        message_id,
        created_at,
        "outbound-api",
        "sms",
        status,
        "30007",
        "Filtered",
        2,
        9_000_000,
        "+14165550100",
        "+15551230000",
    )


def history() -> PollDelta:
    """A backfill's whole result, as `backfill` hands it to `Store.seed`."""
    return PollDelta(
        cursor=NOW - 60,
        settled_ids={"s1": NOW - 300, "s2": NOW - 90},
        totals={KEY: Totals(5, 6, 20_000_000), ("inbound", "sms", "received", ""): Totals(2)},
        by_country={("outbound-api", "sms", "delivered", "CA"): Totals(5, 6, 20_000_000)},
        by_group={("outbound-api", "sms", "delivered", "otp"): Totals(5, 6, 20_000_000)},
        pending_upserts={"p": Pending(message("p", NOW - 70), NOW - 61)},
        error_info={"30003": "Unreachable destination handset"},
    )


@pytest.fixture
def path(tmp_path: Path) -> str:
    return str(tmp_path / "state.db")


def load(path: str, project: str = "production", now: float = NOW + 3600) -> LedgerState:
    """The project's state as the next start of the daemon loads it (start_from 0)."""
    store = Store(path)
    try:
        return store.load(project, now, 0.0)
    finally:
        store.close()


def seeded(path: str, delta: PollDelta | None = None) -> None:
    store = Store(path)
    try:
        store.seed("production", START, history() if delta is None else delta)
    finally:
        store.close()


def test_a_seeded_project_starts_with_its_backfilled_history(path: str) -> None:
    delta = history()
    seeded(path, delta)
    state = load(path)
    assert state.start_point == START  # not the time of this first start
    assert state.cursor == NOW - 60
    assert state.complete_until == NOW - 60  # at the cursor, as for a project just started
    assert state.totals == delta.totals
    assert state.by_country == delta.by_country
    assert state.by_group == delta.by_group
    assert state.settled == delta.settled_ids
    assert state.pending == delta.pending_upserts
    assert state.error_info == delta.error_info


def test_a_seeded_project_goes_on_counting_from_its_history(path: str) -> None:
    seeded(path)
    store = Store(path)
    try:
        store.load("production", NOW, 0.0)
        store.commit(
            "production",
            PollDelta(cursor=NOW, totals={KEY: Totals(1, 1, 1)}, pending_removed={"p"}),
        )
    finally:
        store.close()
    state = load(path)
    assert state.start_point == START
    assert state.cursor == NOW
    assert state.totals[KEY] == Totals(6, 7, 20_000_001)
    assert state.pending == {}


@pytest.mark.parametrize("how", ["loaded", "seeded"])
def test_seeding_a_project_that_has_state_is_refused_and_changes_nothing(
    path: str, how: str
) -> None:
    store = Store(path)
    try:
        if how == "loaded":
            store.load("production", NOW, 0.0)
        else:
            store.seed("production", START, history())
        before = store.load("production", NOW, 0.0)
        with pytest.raises(StateError, match="production has already started counting"):
            store.seed("production", START - 1000, history())
        after = store.load("production", NOW, 0.0)
    finally:
        store.close()
    assert (after.start_point, after.cursor, after.totals) == (
        before.start_point,
        before.cursor,
        before.totals,
    )
    assert load(path).totals == before.totals


def test_seeding_one_project_leaves_the_others_alone(path: str) -> None:
    store = Store(path)
    try:
        store.load("staging", NOW - 10, 0.0)
        store.seed("production", START, history())
    finally:
        store.close()
    staging = load(path, "staging")
    assert staging.start_point == NOW - 10
    assert staging.totals == {} and staging.settled == {} and staging.pending == {}
    assert load(path).totals == history().totals


def test_a_seed_failing_half_way_records_nothing(path: str) -> None:
    store = Store(path)
    try:
        # The project row, cursor, pending and settled rows come before the totals: fail there.
        store._conn.execute(
            "CREATE TEMP TRIGGER fail_totals BEFORE INSERT ON main.totals"
            " BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END"
        )
        with pytest.raises(CommitError, match="disk is full"):
            store.seed("production", START, history())
        store._conn.execute("DROP TRIGGER fail_totals")
        # Nothing of it was kept: the project can still be seeded.
        store.seed("production", START, history())
    finally:
        store.close()
    assert load(path).totals == history().totals


def test_a_seed_refused_by_the_database_leaves_the_project_unstarted(path: str) -> None:
    store = Store(path)
    try:
        store._conn.execute("PRAGMA query_only=ON")
        with pytest.raises(CommitError, match=r"state\.db"):
            store.seed("production", START, history())
    finally:
        store.close()
    state = load(path, now=NOW)
    assert state.start_point == NOW  # a first start: nothing was seeded
    assert state.totals == {}


def test_seeding_after_close_raises_commit_error(path: str) -> None:
    store = Store(path)
    store.close()
    with pytest.raises(CommitError):
        store.seed("production", START, history())
