"""The store's public methods at their edges: seeding a project with backfilled history, and
each write being all or nothing."""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from exporter.ledger import LedgerState, Pending, PollDelta, Totals
from exporter.records import Message
from exporter.store import (
    APPLICATION_ID,
    CommitError,
    StateError,
    Store,
    committed_start_point,
    state_path_problem,
)
from tests.unit.test_store import detached, observed, pending_of, settled_of

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
        return detached(store.load(project, now, 0.0))
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
    assert dict(state.settled.items()) == settled_of(delta.settled_ids)
    assert pending_of(state) == observed(delta.pending_upserts)
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
    assert len(state.pending) == 0


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
    assert staging.totals == {} and len(staging.settled) == 0 and len(staging.pending) == 0
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


# ----------------------------------------------------------------- what a refusal says

AFTERWARDS = (
    ". Restore it from a backup, or move it away to start counting afresh (counters then start "
    "again from the current time)"
)


def test_a_garbage_file_is_refused_with_the_whole_advice(tmp_path: Path) -> None:
    file = tmp_path / "state.db"
    file.write_bytes(b"this is not a database, just some text\n" * 200)
    with pytest.raises(StateError) as info:
        Store(str(file))
    assert str(info.value) == (
        f"state file {file}: cannot be read (file is not a database)" + AFTERWARDS
    )


def test_a_database_of_another_program_is_refused_with_the_whole_advice(tmp_path: Path) -> None:
    file = tmp_path / "state.db"
    conn = sqlite3.connect(file)
    conn.execute("CREATE TABLE users (name TEXT)")
    conn.commit()
    conn.close()
    with pytest.raises(StateError) as info:
        Store(str(file))
    assert str(info.value) == (
        f"state file {file}: is a SQLite database of another program" + AFTERWARDS
    )


def test_a_file_that_cannot_be_opened_is_refused(
    path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refused(*_: object, **__: object) -> sqlite3.Connection:
        raise sqlite3.OperationalError("unable to open database file")

    monkeypatch.setattr(sqlite3, "connect", refused)
    with pytest.raises(StateError) as info:
        Store(path)
    assert str(info.value) == (
        f"state file {path}: cannot be opened (unable to open database file)" + AFTERWARDS
    )
    monkeypatch.undo()
    Store(path).close()  # the refusal released the lock


@pytest.mark.parametrize("value", ["99", "two"])
def test_a_schema_version_this_version_does_not_know_is_refused(path: str, value: str) -> None:
    Store(path).close()
    conn = sqlite3.connect(path)
    conn.execute("UPDATE meta SET value=? WHERE key='schema_version'", (value,))
    conn.commit()
    conn.close()
    with pytest.raises(StateError) as info:
        Store(path)
    assert str(info.value) == (
        f"state file {path}: schema version {value} is not supported by this version "
        "(expects 2); run the newer version that wrote it, or restore a backup made by this "
        "version"
    )


def test_a_file_of_ours_without_a_schema_version_is_taken_as_current(path: str) -> None:
    Store(path).close()
    conn = sqlite3.connect(path)
    conn.execute("DELETE FROM meta")
    conn.commit()
    conn.close()
    store = Store(path)
    try:
        store.load("production", NOW, 0.0)
        store.commit("production", PollDelta(cursor=NOW + 1, totals={KEY: Totals(1)}))
    finally:
        store.close()
    assert load(path).totals == {KEY: Totals(1)}


def test_a_file_in_use_by_another_process_is_refused_with_what_to_do(path: str) -> None:
    first = Store(path)
    try:
        with pytest.raises(StateError) as info:
            Store(path, lock_wait=0.0)
    finally:
        first.close()
    assert str(info.value) == (
        f"state file {path}: in use by another signalwire-exporter process; give each instance "
        "its own state_path"
    )


@pytest.mark.parametrize("exists", [False, True])
def test_a_lock_file_that_cannot_be_opened_is_refused(path: str, exists: bool) -> None:
    if exists:
        Store(path).close()
    Path(f"{path}.lock").unlink(missing_ok=True)
    Path(f"{path}.lock").mkdir()  # opening it for writing fails, even as root
    with pytest.raises(StateError) as info:
        Store(path)
    doing = "cannot open for writing" if exists else "cannot create"
    assert str(info.value) == (
        f"state file {path}: {doing}: Is a directory; make the file and its directory "
        "writable by this user, or set state_path elsewhere"
    )


def test_the_lock_file_is_readable_by_its_owner_only(path: str) -> None:
    old = os.umask(0)
    try:
        Store(path).close()
    finally:
        os.umask(old)
    assert Path(f"{path}.lock").stat().st_mode & 0o777 == 0o600


def test_a_start_point_that_cannot_be_recorded_is_refused(path: str) -> None:
    store = Store(path)
    try:
        store._conn.execute("PRAGMA query_only=ON")
        with pytest.raises(StateError) as info:
            store.load("production", NOW, 0.0)
    finally:
        store.close()
    assert str(info.value) == (
        f"state file {path}: cannot record the start point of project production (attempt to "
        "write a readonly database); make the file and its directory writable, or free disk "
        "space"
    )


def test_a_state_that_cannot_be_read_is_refused_with_what_to_do(path: str) -> None:
    store = Store(path)
    try:
        store.load("production", NOW, 0.0)
        store._conn.execute("DROP TABLE totals")
        with pytest.raises(StateError) as info:
            store.load("production", NOW, 0.0)
    finally:
        store.close()
    assert str(info.value) == (
        f"state file {path}: cannot be read (no such table: totals)" + AFTERWARDS
    )


# ----------------------------------------------------------------- migration, threads, closing

SCHEMA_1 = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE project (name TEXT PRIMARY KEY, start_point REAL NOT NULL, cursor REAL NOT NULL);
CREATE TABLE pending (
    project TEXT NOT NULL, id TEXT NOT NULL, created_at REAL NOT NULL,
    direction TEXT NOT NULL, kind TEXT NOT NULL, status TEXT NOT NULL,
    error_code TEXT NOT NULL, error_message TEXT, segments INTEGER NOT NULL,
    charge_nano INTEGER NOT NULL, observed_at REAL NOT NULL,
    PRIMARY KEY (project, id)) WITHOUT ROWID;
CREATE TABLE totals (
    project TEXT NOT NULL, direction TEXT NOT NULL, kind TEXT NOT NULL, status TEXT NOT NULL,
    error_code TEXT NOT NULL, messages INTEGER NOT NULL, segments INTEGER NOT NULL,
    charge_nano INTEGER NOT NULL,
    PRIMARY KEY (project, direction, kind, status, error_code)) WITHOUT ROWID;
INSERT INTO meta VALUES ('schema_version', '1');
INSERT INTO project VALUES ('production', 1789990000.0, 1789999000.0);
INSERT INTO totals VALUES ('production', 'outbound-api', 'sms', 'delivered', '', 9, 9, 0);
"""


def test_a_migration_is_logged_with_the_file_and_what_changed(path: str) -> None:
    conn = sqlite3.connect(path)
    conn.executescript(SCHEMA_1)
    conn.execute(f"PRAGMA application_id={APPLICATION_ID}")
    conn.commit()
    conn.close()
    with capture_logs() as logs:
        Store(path).close()
    assert logs == [
        {
            "event": "state file migrated",
            "log_level": "info",
            "state_path": path,
            "schema_version": "1 -> 2",
            "detail": "counters by country and number group added; what was counted before "
            "shows under country unknown and number_group ungrouped",
        }
    ]
    assert load(path).totals == {KEY: Totals(9, 9, 0)}


def test_the_store_can_be_used_from_another_thread(path: str) -> None:
    store = Store(path)
    errors: list[BaseException] = []

    def poll() -> None:
        try:
            store.load("production", NOW, 0.0)
            store.commit("production", PollDelta(cursor=NOW + 1, totals={KEY: Totals(1)}))
        except BaseException as exc:
            errors.append(exc)

    worker = threading.Thread(target=poll)
    worker.start()
    worker.join()
    store.close()
    assert errors == []
    assert load(path).totals == {KEY: Totals(1)}


def test_the_checkpoint_thread_is_named_and_never_keeps_the_process_alive(path: str) -> None:
    def checkpointers() -> set[threading.Thread]:
        return {t for t in threading.enumerate() if t.name == "state-checkpoint"}

    others = checkpointers()  # of stores other tests left open
    store = Store(path)
    try:
        threads = list(checkpointers() - others)
        assert len(threads) == 1 and threads[0].daemon
    finally:
        store.close()
    assert not checkpointers() - others


def test_closing_a_store_that_never_checkpointed_logs_nothing(path: str) -> None:
    with capture_logs() as logs:
        store = Store(path)
        store.load("production", NOW, 0.0)
        store.close()
    assert logs == []


def test_close_empties_the_wal_while_another_process_reads_the_file(path: str) -> None:
    store = Store(path)
    store.load("production", NOW, 0.0)
    for n in range(1, 20):
        store.commit("production", PollDelta(cursor=NOW + n, totals={KEY: Totals(1)}))
    reader = sqlite3.connect(path)  # as `backfill` reading the start point, or a backup tool
    try:
        reader.execute("SELECT count(*) FROM project").fetchone()
        with capture_logs() as logs:
            store.close()
        assert logs == []
        # The reader keeps the WAL file from being removed: it is emptied instead.
        assert Path(f"{path}-wal").stat().st_size == 0
    finally:
        reader.close()
    assert load(path).cursor == NOW + 19


def test_a_failing_checkpoint_on_close_is_logged_and_nothing_is_lost(path: str) -> None:
    store = Store(path)
    store.load("production", NOW, 0.0)
    store.commit("production", PollDelta(cursor=NOW + 1, totals={KEY: Totals(1)}))
    store._conn = FailingCheckpoints(store._conn)  # type: ignore[assignment]
    with capture_logs() as logs:
        store.close()
    assert logs == [
        {
            "event": "checkpoint on close failed",
            "log_level": "warning",
            "state_path": path,
            "error": "disk I/O error",
        }
    ]
    assert load(path).totals == {KEY: Totals(1)}


def test_closing_twice_leaves_other_files_open(path: str) -> None:
    store = Store(path)
    store.close()
    with open(path, "rb") as other:  # may take the number the lock file had
        store.close()
        os.fstat(other.fileno())
        os.fstat(0)
        os.fstat(1)
        os.fstat(2)


class ClosingFails:
    """The checkpointer's own connection, whose checkpoints work but whose closing fails."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.checkpoints = 0

    def execute(self, sql: str, *args: object) -> sqlite3.Cursor:
        self.checkpoints += 1
        return self.conn.execute(sql, *args)

    def close(self) -> None:
        self.conn.close()
        raise sqlite3.OperationalError("disk I/O error")


def test_a_background_connection_failing_to_close_is_logged(
    path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = Store(path, checkpoint_after=0)  # every commit asks for a background checkpoint
    store.load("production", NOW, 0.0)
    opened: list[ClosingFails] = []
    connect = sqlite3.connect

    def checkpointer_connect(*args: object, **kwargs: object) -> ClosingFails:
        conn = ClosingFails(connect(*args, **kwargs))  # type: ignore[arg-type]
        opened.append(conn)
        return conn

    monkeypatch.setattr(sqlite3, "connect", checkpointer_connect)
    with capture_logs() as logs:
        store.commit("production", PollDelta(cursor=NOW + 1, totals={KEY: Totals(1)}))
        deadline = time.monotonic() + 10
        while not (opened and opened[0].checkpoints):
            assert time.monotonic() < deadline, "no background checkpoint"
            time.sleep(0.01)
        store.close()
    monkeypatch.undo()
    assert logs == [
        {
            "event": "background checkpoint failed",
            "log_level": "warning",
            "state_path": path,
            "error": "disk I/O error",
        }
    ]
    assert load(path).totals == {KEY: Totals(1)}


def test_a_lock_file_opened_as_descriptor_0_is_released_on_close(path: str) -> None:
    """A daemon started with standard input closed gets its lock file as descriptor 0."""
    saved = os.dup(0)
    os.close(0)
    try:
        store = Store(path)
        store.close()
        again = Store(path, lock_wait=0.0)  # the lock was released
        again.close()
    finally:
        os.dup2(saved, 0)
        os.close(saved)


def test_a_commit_stands_when_the_wal_index_cannot_be_read(path: str) -> None:
    # The background checkpointer never opens a connection here: no second WAL index.
    store = Store(path, checkpoint_after=2**40, checkpoint_in_commit=2**40)
    try:
        store.load("production", NOW, 0.0)
        store.commit("production", PollDelta(cursor=NOW + 1, totals={KEY: Totals(1)}))
        os.unlink(f"{path}-shm")  # its size is then taken from the WAL file
        store.commit("production", PollDelta(cursor=NOW + 2, totals={KEY: Totals(1)}))
    finally:
        store.close()
    assert load(path).totals == {KEY: Totals(2)}


@pytest.mark.parametrize("started", [False, True], ids=["first-start", "restart"])
def test_a_pending_message_s_whole_record_is_read_from_the_file(path: str, started: bool) -> None:
    """The ledger keeps less of a pending message than its record: the record is the file's."""
    if started:
        store = Store(path)
        store.load("production", NOW, 0.0)
        store.close()
    store = Store(path)
    try:
        state = store.load("production", NOW, 0.0)
        first = PollDelta(cursor=NOW, pending_upserts={"a": Pending(message("a", NOW - 50), NOW)})
        store.commit("production", first)
        state.pending.put(first.pending_upserts["a"].message, NOW)
        newer = message("a", NOW - 50, "queued")
        store.commit(
            "production", PollDelta(cursor=NOW, pending_upserts={"a": Pending(newer, NOW)})
        )
        assert state.pending.record("a") == newer  # not kept in memory: read from the file
        assert state.pending.record("b") is None
        assert store.pending_record("production", "b") is None
        assert store.pending_record("staging", "a") is None
    finally:
        store.close()
