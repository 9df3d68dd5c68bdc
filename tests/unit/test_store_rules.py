"""The store's public methods at their edges: seeding a project with backfilled history, and
each write being all or nothing."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from exporter.ledger import LedgerState, Pending, PollDelta, Totals
from exporter.records import Message
from exporter.store import (
    CommitError,
    StateError,
    Store,
    committed_start_point,
    state_path_problem,
)

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


# ----------------------------------------------------------------- reading without taking over


def test_the_committed_start_point_is_read_while_the_daemon_holds_the_file(path: str) -> None:
    assert committed_start_point(path, "production") is None  # no file yet
    store = Store(path)
    try:
        assert committed_start_point(path, "production") is None  # no project yet
        store.load("production", NOW, 3600.0)
        store.load("staging", NOW + 5, 0.0)
        # The store is open (and locked) meanwhile: the read neither waits nor takes it over.
        assert committed_start_point(path, "production") == NOW - 3600.0
        assert committed_start_point(path, "staging") == NOW + 5
        assert committed_start_point(path, "other") is None
        store.commit("production", PollDelta(cursor=NOW))
    finally:
        store.close()
    assert load(path).cursor == NOW


def test_the_committed_start_point_of_a_file_without_tables_is_none(tmp_path: Path) -> None:
    empty = tmp_path / "empty.db"
    sqlite3.connect(empty).close()
    empty.touch()
    assert committed_start_point(str(empty), "production") is None


def test_the_committed_start_point_of_a_garbage_file_is_refused(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"not a database at all, " * 100)
    with pytest.raises(StateError, match=rf"state file {garbage}: cannot be read \("):
        committed_start_point(str(garbage), "production")


# ----------------------------------------------------------------- checking a state path


def test_a_usable_state_path_has_no_problem(tmp_path: Path) -> None:
    assert state_path_problem(str(tmp_path / "new.db")) is None
    assert state_path_problem(str(tmp_path / "a" / "b" / "new.db")) is None  # created on start
    existing = tmp_path / "existing.db"
    existing.write_bytes(b"")
    assert state_path_problem(str(existing)) is None


def test_a_state_path_that_is_a_directory_or_under_a_file_is_a_problem(tmp_path: Path) -> None:
    assert state_path_problem(str(tmp_path)) == "is a directory; set state_path to a file"
    file = tmp_path / "file"
    file.write_text("")
    assert state_path_problem(str(file / "state.db")) == (
        f"{file} is not a directory; set state_path to a path in a directory"
    )
    assert state_path_problem(str(file / "sub" / "state.db")) == (
        f"{file} is not a directory; set state_path to a path in a directory"
    )


def test_a_state_path_without_permission_is_a_problem(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    existing = tmp_path / "existing.db"
    existing.write_bytes(b"")
    locked = tmp_path / "locked"
    locked.mkdir()
    asked: list[tuple[str, int]] = []

    def access(target: object, mode: int) -> bool:
        """As for a user other than root: `locked` and `existing` may only be read."""
        asked.append((str(target), mode))
        return str(target) not in (str(existing), str(locked))

    monkeypatch.setattr(os, "access", access)
    assert state_path_problem(str(existing)) == (
        "cannot open for writing: permission denied; make it writable by this user"
    )
    assert (str(existing), os.R_OK | os.W_OK) in asked
    assert state_path_problem(str(locked / "a" / "state.db")) == (
        f"cannot create: {locked} is not writable by this user"
    )
    assert (str(locked), os.W_OK | os.X_OK) in asked
    assert state_path_problem(str(tmp_path / "fine.db")) is None


# ----------------------------------------------------------------- a failing checkpoint


class FailingCheckpoints:
    """A connection whose WAL checkpoints fail (as on a failing disk); all else goes through."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def execute(self, sql: str, *args: object) -> sqlite3.Cursor:
        if "wal_checkpoint" in sql.lower():
            raise sqlite3.OperationalError("disk I/O error")
        return self.conn.execute(sql, *args)

    def __getattr__(self, name: str) -> object:
        return getattr(self.conn, name)

    def __enter__(self) -> sqlite3.Connection:
        return self.conn.__enter__()

    def __exit__(self, *exc: object) -> object:
        return self.conn.__exit__(*exc)  # type: ignore[arg-type]


def test_a_failing_checkpoint_in_a_commit_is_logged_once_and_the_commit_stands(
    path: str,
) -> None:
    # Every commit checkpoints itself (the WAL is always past both marks).
    store = Store(path, checkpoint_after=0, checkpoint_in_commit=0)
    store.load("production", NOW, 0.0)
    store._conn = FailingCheckpoints(store._conn)  # type: ignore[assignment]
    with capture_logs() as logs:
        for n in range(1, 4):
            store.commit("production", PollDelta(cursor=NOW + n, totals={KEY: Totals(1)}))
        store.close()  # its own checkpoint fails too: still closed, nothing lost
    assert logs == [
        {
            "event": "checkpoint failed",
            "log_level": "warning",
            "state_path": path,
            "error": "disk I/O error",
        }
    ]
    state = load(path)
    assert state.cursor == NOW + 3
    assert state.totals == {KEY: Totals(3)}
