"""The state store: durable, atomic per poll, and never silently replacing a file it cannot use."""

from __future__ import annotations

import fcntl
import itertools
import math
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from exporter.config import SettleConfig
from exporter.ledger import Ledger, LedgerState, Pending, PollDelta, Rules, Totals
from exporter.pending import PendingSet, settled_prune_point
from exporter.records import Message
from exporter.store import APPLICATION_ID, LOCK_WAIT, CommitError, StateError, Store

ROOT = Path(__file__).resolve().parents[2]
NOW = 1_790_000_000.0
KEY = ("outbound-api", "sms", "delivered", "")


def message(
    message_id: str,
    created_at: float = NOW - 100,
    status: str = "sent",
    *,
    direction: str = "outbound-api",
    kind: str = "sms",
    error_code: str = "",
    error_message: str | None = None,
    segments: int = 1,
    charge_nano: int = 4_150_000,
    remote: str = "+14165550100",
    own: str = "+15551230000",
) -> Message:
    return Message(
        message_id,
        created_at,
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


def wait_for(condition: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} not met within {timeout}s"
        time.sleep(0.005)


@pytest.fixture
def path(tmp_path: Path) -> str:
    return str(tmp_path / "state.db")


@pytest.fixture
def store(path: str) -> Iterator[Store]:
    s = Store(path)
    yield s
    s.close()


def reopened(path: str, project: str = "production") -> LedgerState:
    """The project's state as a fresh process would load it."""
    s = Store(path)
    try:
        return detached(s.load(project, NOW + 10_000, 0.0))
    finally:
        s.close()


def detached(state: LedgerState) -> LedgerState:
    """`state` with its pending messages' records read from the state file while it is open."""
    pending = PendingSet()
    for message_id, entry in state.pending.items():
        record = state.pending.record(message_id)
        assert record is not None
        pending.put(record, entry.observed_at)
    state.pending = pending
    return state


def pending_of(state: LedgerState) -> dict[str, Pending]:
    """The pending messages' latest records (read back from the state file) and observed_at."""
    records = {i: state.pending.record(i) for i in state.pending}
    return {i: Pending(r, e.observed_at) for i, e in state.pending.items() if (r := records[i])}


def observed(pending: dict[str, Pending]) -> dict[str, Pending]:
    """As the ledger keeps them: observed_at to the whole second after created_at below."""
    return {
        i: Pending(
            p.message, p.message.created_at + math.floor(p.observed_at - p.message.created_at)
        )
        for i, p in pending.items()
    }


def settled_of(settled: dict[str, float]) -> dict[str, float]:
    """Settled ids as the ledger keeps them: with the end of their minute of creation."""
    return {i: float((c // 60 + 1) * 60) for i, c in settled.items()}


def assert_same_state(actual: LedgerState, expected: LedgerState) -> None:
    assert actual.start_point == expected.start_point
    assert actual.cursor == expected.cursor
    assert pending_of(actual) == pending_of(expected)
    assert dict(actual.settled.items()) == dict(expected.settled.items())
    assert actual.totals == expected.totals
    assert actual.by_country == expected.by_country
    assert actual.by_group == expected.by_group
    assert actual.error_info == expected.error_info
    assert actual.window == expected.window


# --------------------------------------------------------------------------- start point


def test_first_load_records_the_start_point_durably(path: str) -> None:
    first = Store(path)
    state = first.load("production", NOW, 3600.0)
    assert state.start_point == NOW - 3600.0
    assert state.cursor == NOW - 3600.0
    assert not state.pending and not state.settled and not state.totals
    first.close()

    # A later start, with another start_from, keeps the recorded start point.
    second = Store(path)
    again = second.load("production", NOW + 86_400, 0.0)
    assert again.start_point == NOW - 3600.0
    assert again.cursor == NOW - 3600.0
    # Another project starts at its own first start.
    other = second.load("staging", NOW + 86_400, 60.0)
    assert other.start_point == NOW + 86_400 - 60.0
    second.close()
    assert reopened(path, "staging").start_point == NOW + 86_400 - 60.0


def test_missing_parent_directories_are_created(tmp_path: Path) -> None:
    nested = tmp_path / "a" / "b" / "state.db"
    s = Store(str(nested))
    s.load("production", NOW, 0.0)
    s.close()
    assert nested.is_file()


# --------------------------------------------------------------------------- round trips


def full_delta() -> PollDelta:
    pending_a = Pending(message("a", NOW - 50, "queued"), NOW - 40)
    pending_b = Pending(
        message(
            "b",
            NOW - 30.5,
            "sent",
            direction="outbound-reply",
            kind="mms",
            error_code="30007",
            error_message="Message filtered by carrier",
            segments=3,
            charge_nano=45_000_000,
        ),
        NOW - 1.25,
    )
    return PollDelta(
        cursor=NOW - 60,
        complete_until=NOW - 700,
        settled_ids={"s1": NOW - 300, "s2": NOW - 200, "s3": NOW - 100},
        totals={
            KEY: Totals(2, 3, 8_300_000),
            ("inbound", "sms", "received", ""): Totals(1, 1, 4_150_000),
            ("outbound-api", "sms", "undelivered", "30003"): Totals(1, 2, 0),
        },
        by_country={
            ("outbound-api", "sms", "delivered", "CA"): Totals(2, 3, 8_300_000),
            ("inbound", "sms", "received", "unknown"): Totals(1, 1, 4_150_000),
            ("outbound-api", "sms", "undelivered", "GB"): Totals(1, 2, 0),
        },
        by_group={
            ("outbound-api", "sms", "delivered", "otp"): Totals(2, 3, 8_300_000),
            ("inbound", "sms", "received", "ungrouped"): Totals(1, 1, 4_150_000),
            ("outbound-api", "sms", "undelivered", "otp"): Totals(1, 2, 0),
        },
        pending_upserts={"a": pending_a, "b": pending_b},
        pending_removed=set(),
        prune_settled_before=NOW - 1000,
        error_info={"30003": "Unreachable destination handset"},
        window_add={
            (int(NOW) - 10, "outbound-api", "sms"): (3, 1),
            (int(NOW) - 5, "inbound", "sms"): (1, 0),
        },
        prune_window_before=int(NOW) - 900,
    )


def test_commit_load_round_trip_of_every_part(store: Store, path: str) -> None:
    store.load("production", NOW - 500, 0.0)
    delta = full_delta()
    store.commit("production", delta)
    store.close()
    state = reopened(path)
    assert state.start_point == NOW - 500
    assert state.cursor == NOW - 60
    assert pending_of(state) == observed(delta.pending_upserts)
    assert pending_of(state)["b"].message.error_message == "Message filtered by carrier"
    assert pending_of(state)["a"].message.error_message is None
    assert dict(state.settled.items()) == settled_of(delta.settled_ids)
    assert state.totals == delta.totals
    assert state.by_country == delta.by_country
    assert state.by_group == delta.by_group
    assert state.complete_until == delta.complete_until
    assert pending_of(state)["a"].message.remote == "+14165550100"
    assert pending_of(state)["a"].message.own == "+15551230000"
    assert state.error_info == delta.error_info
    assert state.window == delta.window_add


def test_second_commit_accumulates_replaces_and_prunes(store: Store, path: str) -> None:
    store.load("production", NOW - 500, 0.0)
    store.commit("production", full_delta())
    newer_a = Pending(message("a", NOW - 50, "sent", charge_nano=1), NOW - 2)
    store.commit(
        "production",
        PollDelta(
            cursor=NOW - 30,
            settled_ids={"b": NOW - 30.5, "s4": NOW - 20},
            totals={KEY: Totals(1, 1, 4_150_000), ("inbound", "mms", "received", ""): Totals(1)},
            pending_upserts={"a": newer_a, "c": Pending(message("c", NOW - 10), NOW)},
            pending_removed={"b", "never-pending"},
            # Drops s1 and s2, keeps s3 and the new ones (pruned at the start of its minute).
            prune_settled_before=NOW - 90,
            error_info={"30003": "Handset unreachable (new wording)", "30007": "Filtered"},
            window_add={
                (int(NOW) - 5, "inbound", "sms"): (2, 1),  # accumulates
                (int(NOW), "outbound-api", "mms"): (1, 0),
            },
            prune_window_before=int(NOW) - 7,  # drops the second at NOW - 10
        ),
    )
    store.close()
    state = reopened(path)
    assert state.cursor == NOW - 30
    assert set(state.pending) == {"a", "c"}
    assert pending_of(state)["a"] == observed({"a": newer_a})["a"]
    assert dict(state.settled.items()) == settled_of(
        {"s3": NOW - 100, "b": NOW - 30.5, "s4": NOW - 20}
    )
    assert state.totals == {
        KEY: Totals(3, 4, 12_450_000),
        ("inbound", "sms", "received", ""): Totals(1, 1, 4_150_000),
        ("outbound-api", "sms", "undelivered", "30003"): Totals(1, 2, 0),
        ("inbound", "mms", "received", ""): Totals(1, 0, 0),
    }
    assert state.error_info == {
        "30003": "Handset unreachable (new wording)",
        "30007": "Filtered",
    }
    assert state.window == {
        (int(NOW) - 5, "inbound", "sms"): (3, 1),
        (int(NOW), "outbound-api", "mms"): (1, 0),
    }


def test_settled_ids_from_the_prune_point_on_are_kept_below_it_never_written(
    store: Store, path: str
) -> None:
    store.load("production", NOW - 500, 0.0)
    point = (NOW - 300) // 60 * 60  # settled ids are kept down to the start of this minute
    settled = {"below": point - 0.5, "at": point, "above": point + 30.0}
    store.commit(
        "production", PollDelta(cursor=NOW, settled_ids=settled, prune_settled_before=point + 10)
    )
    store.close()
    assert sorted(reopened(path).settled) == ["above", "at"]


def test_projects_do_not_share_state(store: Store, path: str) -> None:
    store.load("production", NOW, 0.0)
    store.load("staging", NOW, 0.0)
    store.commit("production", full_delta())
    store.close()
    staging = reopened(path, "staging")
    assert staging.cursor == NOW
    assert not staging.pending and not staging.settled and not staging.totals
    assert not staging.error_info and not staging.window


def test_totals_accumulate_across_many_commits_and_reopens(path: str) -> None:
    for round_ in range(3):
        s = Store(path)
        s.load("production", NOW, 0.0)
        for i in range(10):
            n = round_ * 10 + i + 1
            s.commit("production", PollDelta(cursor=NOW + n, totals={KEY: Totals(1, 2, 3)}))
        s.close()
    state = reopened(path)
    assert state.totals == {KEY: Totals(30, 60, 90)}
    assert state.cursor == NOW + 30


# The store must hold exactly what the ledger holds after applying the same deltas.
_ids = st.sampled_from([f"m{i}" for i in range(8)])
_times = st.integers(min_value=0, max_value=400).map(lambda s: NOW - 400 + s + 0.25)
_labels = st.sampled_from(["outbound-api", "inbound", "sms", "mms", "sent", "délivré", "x y"])
_messages = st.builds(
    message,
    _ids,
    _times,
    _labels,
    direction=_labels,
    kind=_labels,
    error_code=st.sampled_from(["", "30007", "other"]),
    error_message=st.none() | st.text(max_size=20),
    segments=st.integers(0, 10),
    charge_nano=st.integers(0, 10**12),
)
_pendings = st.builds(Pending, _messages, _times)
_label_keys = st.tuples(_labels, _labels, _labels, st.sampled_from(["", "30007", "other"]))
_deltas = st.builds(
    PollDelta,
    cursor=_times,
    settled_ids=st.dictionaries(_ids, _times, max_size=4),
    totals=st.dictionaries(
        _label_keys,
        st.builds(Totals, st.integers(0, 5), st.integers(0, 15), st.integers(0, 10**10)),
        max_size=4,
    ),
    pending_upserts=st.lists(_pendings, max_size=4).map(lambda ps: {p.message.id: p for p in ps}),
    pending_removed=st.sets(_ids, max_size=4),
    prune_settled_before=_times,
    error_info=st.dictionaries(st.sampled_from(["30003", "30007"]), st.text(max_size=10)),
    window_add=st.dictionaries(
        st.tuples(st.integers(100, 120), _labels, _labels),
        st.tuples(st.integers(0, 5), st.integers(0, 5)),
        max_size=4,
    ),
    prune_window_before=st.integers(95, 125),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(deltas=st.lists(_deltas, min_size=1, max_size=5))
def test_store_holds_what_the_ledger_holds(deltas: list[PollDelta]) -> None:
    rules = Rules(SettleConfig(), 30.0, 900.0, 50, 1000)
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "state.db")
        s = Store(path)
        ledger = Ledger(rules, s.load("production", NOW, 600.0))
        for delta in deltas:
            s.commit("production", delta)
            ledger.apply(delta)
        expected = detached(ledger.state)  # its records read while the file is open
        s.close()
        assert_same_state(reopened(path), expected)


# --------------------------------------------------------------------------- failing commits


def committed_once(path: str) -> Store:
    s = Store(path)
    s.load("production", NOW - 500, 0.0)
    s.commit("production", full_delta())
    return s


def next_delta() -> PollDelta:
    return PollDelta(
        cursor=NOW,
        settled_ids={"a": NOW - 50},
        totals={KEY: Totals(1, 1, 1)},
        pending_upserts={"z": Pending(message("z"), NOW)},
        pending_removed={"a", "b"},
        prune_settled_before=NOW,
        error_info={"30003": "changed"},
        window_add={(int(NOW), "inbound", "sms"): (1, 1)},
        prune_window_before=int(NOW),
    )


def test_a_commit_refused_by_the_database_changes_nothing(path: str) -> None:
    s = committed_once(path)
    before = detached(s.load("production", NOW, 0.0))
    s._conn.execute("PRAGMA query_only=ON")
    with pytest.raises(CommitError, match=r"state\.db"):
        s.commit("production", next_delta())
    assert_same_state(s.load("production", NOW, 0.0), before)
    # Once writing works again, so do commits.
    s._conn.execute("PRAGMA query_only=OFF")
    s.commit("production", next_delta())
    assert reopened_after_close(s, path).cursor == NOW


def reopened_after_close(s: Store, path: str) -> LedgerState:
    s.close()
    return reopened(path)


def test_a_commit_failing_half_way_is_rolled_back(path: str) -> None:
    s = committed_once(path)
    before = detached(s.load("production", NOW, 0.0))
    # The cursor, pending and settled rows are written before the totals: fail there.
    s._conn.execute(
        "CREATE TEMP TRIGGER fail_totals BEFORE UPDATE ON main.totals"
        " BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END"
    )
    with pytest.raises(CommitError, match="disk is full"):
        s.commit("production", next_delta())
    assert_same_state(s.load("production", NOW, 0.0), before)
    assert_same_state(reopened_after_close(s, path), before)


def test_a_commit_with_a_value_sqlite_cannot_store_is_rolled_back(path: str) -> None:
    s = committed_once(path)
    before = detached(s.load("production", NOW, 0.0))
    bad = next_delta()
    bad.error_info = {"30003": object()}  # type: ignore[dict-item]
    with pytest.raises(CommitError):
        s.commit("production", bad)
    assert_same_state(reopened_after_close(s, path), before)


def test_commit_after_close_raises_commit_error(path: str) -> None:
    s = committed_once(path)
    s.close()
    with pytest.raises(CommitError):
        s.commit("production", next_delta())


def test_load_on_an_unwritable_store_names_the_file(path: str) -> None:
    s = Store(path)
    s._conn.execute("PRAGMA query_only=ON")
    with pytest.raises(StateError, match=r"state\.db"):
        s.load("production", NOW, 0.0)
    s._conn.execute("PRAGMA query_only=OFF")
    s.close()


# --------------------------------------------------------------------------- refused files


def assert_refused_and_untouched(file: Path, match: str) -> StateError:
    before = file.read_bytes()
    with pytest.raises(StateError, match=match) as info:
        Store(str(file))
    assert file.read_bytes() == before, "a refused file must not be changed"
    assert str(file) in str(info.value)
    # The refused open released the lock: the path can be used once the file is moved away.
    moved = file.with_suffix(".moved")
    file.rename(moved)
    Store(str(file)).close()
    return info.value


def test_garbage_file_is_refused_with_what_to_do(tmp_path: Path) -> None:
    file = tmp_path / "state.db"
    file.write_bytes(b"this is not a database, just some text\n" * 200)
    error = assert_refused_and_untouched(file, "cannot be read")
    assert "move it away" in str(error)
    assert "backup" in str(error)


def test_database_of_another_program_is_refused(tmp_path: Path) -> None:
    file = tmp_path / "state.db"
    conn = sqlite3.connect(file)
    conn.execute("CREATE TABLE users (name TEXT)")
    conn.execute("INSERT INTO users VALUES ('alice')")
    conn.commit()
    conn.close()
    error = assert_refused_and_untouched(file, "another program")
    assert "move it away" in str(error)


def test_empty_database_marked_by_another_program_is_refused(tmp_path: Path) -> None:
    file = tmp_path / "state.db"
    conn = sqlite3.connect(file)
    conn.execute("PRAGMA application_id=1234")
    conn.close()
    assert file.stat().st_size > 0
    assert_refused_and_untouched(file, "another program")


def test_database_of_a_newer_version_is_refused(path: str) -> None:
    Store(path).close()
    conn = sqlite3.connect(path)
    conn.execute("UPDATE meta SET value='99' WHERE key='schema_version'")
    conn.commit()
    conn.close()
    with pytest.raises(StateError, match="schema version 99"):
        Store(path)


def test_an_empty_file_becomes_a_store(tmp_path: Path) -> None:
    file = tmp_path / "state.db"
    file.touch()
    s = Store(str(file))
    s.load("production", NOW, 0.0)
    s.close()
    conn = sqlite3.connect(file)
    assert conn.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID
    conn.close()


def test_second_store_on_the_same_path_is_refused_while_the_first_is_open(path: str) -> None:
    first = Store(path)
    with pytest.raises(StateError, match="in use") as info:
        Store(path, lock_wait=0.1)
    assert path in str(info.value)
    # The refusal did not disturb the first store.
    first.load("production", NOW, 0.0)
    first.commit("production", PollDelta(cursor=NOW + 1))
    first.close()
    second = Store(path)
    assert second.load("production", NOW, 0.0).cursor == NOW + 1
    second.close()


def hold_lock(path: str) -> int:
    """Take the state file's lock as another process would (flock locks are per open file)."""
    fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd


@pytest.fixture
def refusals(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """When each attempt to take a lock was refused; the list is also a condition to wait on."""
    refused: list[float] = []
    real_flock = fcntl.flock

    def flock(fd: int, operation: int) -> None:
        try:
            real_flock(fd, operation)
        except BlockingIOError:
            refused.append(time.monotonic())
            raise

    monkeypatch.setattr(fcntl, "flock", flock)
    return refused


_HOLDER = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
print("locked", flush=True)
time.sleep(600)
"""


def test_a_lock_released_by_a_killed_process_while_opening_is_taken(
    path: str, refusals: list[float]
) -> None:
    # A dying child of the previous daemon still holds the lock when the new one opens the file.
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, f"{path}.lock"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "locked"

        def kill_once_refused() -> None:
            wait_for(lambda: bool(refusals), what="a refused attempt")
            holder.send_signal(signal.SIGKILL)

        killer = threading.Thread(target=kill_once_refused)
        killer.start()
        began = time.monotonic()
        s = Store(path, lock_wait=30.0)
        waited = time.monotonic() - began
        killer.join()
    finally:
        holder.kill()
        holder.wait(timeout=10)
    assert refusals, "the lock was free from the start"
    assert waited < 10.0
    s.load("production", NOW, 0.0)
    s.close()


def test_a_lock_released_by_a_thread_while_opening_is_taken(
    path: str, refusals: list[float]
) -> None:
    fd = hold_lock(path)

    def release_once_refused() -> None:
        wait_for(lambda: bool(refusals), what="a refused attempt")
        os.close(fd)

    releaser = threading.Thread(target=release_once_refused)
    releaser.start()
    s = Store(path, lock_wait=30.0)
    releaser.join()
    assert refusals
    s.close()


def test_a_lock_held_throughout_is_refused_after_the_wait(path: str, refusals: list[float]) -> None:
    assert 2.0 <= LOCK_WAIT <= 5.0  # a few seconds by default
    fd = hold_lock(path)
    try:
        began = time.monotonic()
        with pytest.raises(StateError, match="in use by another") as info:
            Store(path, lock_wait=0.3)
        waited = time.monotonic() - began
    finally:
        os.close(fd)
    assert path in str(info.value)
    assert 0.3 <= waited < 5.0
    # Retried at short intervals, not once, and not in a busy loop.
    assert 3 <= len(refusals) <= 20
    assert not Path(path).exists(), "nothing is written to a file that is in use"
    Store(path).close()  # once released, the file opens at once


def test_a_path_under_a_file_is_refused_as_not_a_directory(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text("x")
    with pytest.raises(StateError, match=r"config\.yaml is not a directory"):
        Store(str(tmp_path / "config.yaml" / "sw.db"))


def test_directory_as_path_is_refused(tmp_path: Path) -> None:
    with pytest.raises(StateError, match="directory") as info:
        Store(str(tmp_path))
    assert str(tmp_path) in str(info.value)


def test_close_is_idempotent(path: str) -> None:
    s = Store(path)
    s.close()
    s.close()
    Store(path).close()


# --------------------------------------------------------------------------- kill -9

_WRITER = """
import sys
from exporter.ledger import Pending, PollDelta, Totals
from exporter.records import Message
from exporter.store import Store

store = Store(sys.argv[1])
state = store.load("production", 0.0, 0.0)
i = int(state.cursor)
print("ready", i, flush=True)
key = ("outbound-api", "sms", "delivered", "")
while True:
    i += 1
    m = Message(f"p{i}", float(i), "outbound-api", "sms", "sent", "", None, 1, 1)
    store.commit(
        "production",
        PollDelta(
            cursor=float(i),
            settled_ids={f"s{i}": float(i)},
            totals={key: Totals(1, 2, 3)},
            pending_upserts={f"p{i}": Pending(m, float(i))},
            pending_removed={f"p{i - 1}"},
            prune_settled_before=float(i - 20),
            window_add={(i, "outbound-api", "sms"): (1, 0)},
            prune_window_before=i - 20,
        ),
    )
    print(i, flush=True)
"""


def test_kill_9_in_the_middle_of_commits_never_shows_half_a_delta(path: str) -> None:
    rng = random.Random()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    last_reported = 0
    for _ in range(3):
        child = subprocess.Popen(
            [sys.executable, "-c", _WRITER, path],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            cwd=ROOT,
        )
        try:
            assert child.stdout is not None
            ready = child.stdout.readline().split()
            assert ready[0] == "ready", ready
            assert int(ready[1]) >= last_reported
            # While the writer runs, its state file is locked against a second instance.
            with pytest.raises(StateError, match="in use"):
                Store(path, lock_wait=0.1)
            target = int(ready[1]) + rng.randint(5, 150)
            reported = int(ready[1])
            while reported < target:
                line = child.stdout.readline()
                assert line, "the writer stopped on its own"
                reported = int(line)
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait(timeout=10)
        last_reported = reported

        state = reopened(path)  # the kill released the lock
        n = int(state.cursor)
        assert n >= last_reported, "a commit that returned was lost"
        assert state.totals == {("outbound-api", "sms", "delivered", ""): Totals(n, 2 * n, 3 * n)}
        assert set(state.pending) == {f"p{n}"}
        kept_from = max(1, int(settled_prune_point(n - 20)))  # pruned a minute at a time
        assert dict(state.settled.items()) == settled_of(
            {f"s{i}": float(i) for i in range(kept_from, n + 1)}
        )
        assert sum(s for s, _ in state.window.values()) == min(n, 21)
        assert max(k[0] for k in state.window) == n


# --------------------------------------------------------------------------- checkpoints


def busy_delta(n: int, size: int = 200) -> PollDelta:
    """A poll that settles `size` messages and leaves `size` pending: enough to grow the WAL."""
    at = NOW + n
    return PollDelta(
        cursor=at,
        settled_ids={f"s{n}-{i:04d}-{'x' * 24}": at for i in range(size)},
        totals={KEY: Totals(size, size, size)},
        pending_upserts={
            f"p{n}-{i:04d}-{'y' * 24}": Pending(message(f"p{n}-{i:04d}-{'y' * 24}", at), at)
            for i in range(size)
        },
        pending_removed={f"p{n - 1}-{i:04d}-{'y' * 24}" for i in range(size)},
        prune_settled_before=at - 1,
    )


def wal_size(path: str) -> int:
    wal = Path(f"{path}-wal")
    return wal.stat().st_size if wal.exists() else 0


def test_the_wal_in_use_is_read_from_the_wal_index(store: Store, path: str) -> None:
    store.load("production", NOW, 0.0)
    checkpointer = store._checkpointer
    assert checkpointer is not None
    checkpointer.stop()  # nothing else checkpoints while the WAL grows
    for n in range(1, 6):
        before = store._wal_bytes()
        store.commit("production", busy_delta(n, 50))
        # Until the WAL starts afresh, it grows at the end of the file (after a 32-byte header).
        assert store._wal_bytes() == wal_size(path) - 32 > before


def growths(sizes: list[int]) -> list[int]:
    """How much the WAL grew at each commit that did not start it afresh."""
    return [b - a for a, b in itertools.pairwise(sizes) if b > a]


def restarts(sizes: list[int]) -> int:
    """How many times the WAL was started afresh after a complete checkpoint."""
    return sum(b < a for a, b in itertools.pairwise(sizes))


def test_background_checkpoints_keep_the_wal_bounded_and_close_empties_it(path: str) -> None:
    mark = 512 * 1024  # a few commits' worth
    # The commits' own fallback is out of reach here: only the checkpointer keeps the WAL small.
    s = Store(path, checkpoint_after=mark, checkpoint_in_commit=2**40)
    s.load("production", NOW, 0.0)
    checkpointer = s._checkpointer
    assert checkpointer is not None
    sizes = []
    for n in range(1, 301):
        passes = checkpointer.passes
        s.commit("production", busy_delta(n))
        sizes.append(s._wal_bytes())
        if sizes[-1] > mark:
            # As between two polls: the checkpoint has the time to finish before the next commit.
            wait_for(lambda before=passes: checkpointer.passes > before, what="a checkpoint")
    assert restarts(sizes) >= 20, "the WAL was not started afresh over and over"
    assert max(sizes) <= mark + 2 * max(growths(sizes)), "the WAL outgrew the checkpoints"
    thread = checkpointer._thread
    s.close()
    assert not thread.is_alive()
    assert wal_size(path) == 0
    # Everything is in the database file itself: a copy of it alone has the last commit.
    alone = Path(path).with_name("alone.db")
    shutil.copy(path, alone)
    conn = sqlite3.connect(alone)
    assert conn.execute("SELECT cursor FROM project").fetchone()[0] == NOW + 300
    conn.close()
    assert reopened(path).totals == {KEY: Totals(300 * 200, 300 * 200, 300 * 200)}


def test_commits_checkpoint_themselves_when_the_checkpointer_fails(
    path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    mark, limit = 128 * 1024, 512 * 1024
    s = Store(path, checkpoint_after=mark, checkpoint_in_commit=limit)
    s.load("production", NOW, 0.0)

    def broken(*_: object, **__: object) -> sqlite3.Connection:
        raise sqlite3.OperationalError("disk I/O error")

    # The checkpointer opens its connection at its first checkpoint, which now fails.
    monkeypatch.setattr(sqlite3, "connect", broken)
    checkpointer = s._checkpointer
    assert checkpointer is not None
    with capture_logs() as logs:
        sizes = []
        for n in range(1, 201):
            s.commit("production", busy_delta(n, 100))
            sizes.append(s._wal_bytes())
        wait_for(lambda: bool(logs), what="the failure logged")
    assert restarts(sizes) >= 5
    assert max(sizes) <= limit + 2 * max(growths(sizes))
    assert checkpointer.passes == 0
    assert checkpointer.alive, "a failing checkpoint does not end the thread"
    failures = [e for e in logs if e["event"] == "background checkpoint failed"]
    assert len(failures) == 1, logs  # once, not at every poll
    assert failures[0]["log_level"] == "warning"
    assert "disk I/O error" in failures[0]["error"]
    monkeypatch.undo()
    s.close()
    assert wal_size(path) == 0
    assert reopened(path).cursor == NOW + 200


# --------------------------------------------------------------------------- migration

# The schema of the previous release (version 1), as its files are on disk.
SCHEMA_1 = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE project (name TEXT PRIMARY KEY, start_point REAL NOT NULL, cursor REAL NOT NULL);
CREATE TABLE pending (
    project TEXT NOT NULL, id TEXT NOT NULL, created_at REAL NOT NULL,
    direction TEXT NOT NULL, kind TEXT NOT NULL, status TEXT NOT NULL,
    error_code TEXT NOT NULL, error_message TEXT, segments INTEGER NOT NULL,
    charge_nano INTEGER NOT NULL, observed_at REAL NOT NULL,
    PRIMARY KEY (project, id)) WITHOUT ROWID;
CREATE TABLE settled (
    project TEXT NOT NULL, id TEXT NOT NULL, created_at REAL NOT NULL,
    PRIMARY KEY (project, id)) WITHOUT ROWID;
CREATE INDEX settled_by_age ON settled (project, created_at);
CREATE TABLE totals (
    project TEXT NOT NULL, direction TEXT NOT NULL, kind TEXT NOT NULL, status TEXT NOT NULL,
    error_code TEXT NOT NULL, messages INTEGER NOT NULL, segments INTEGER NOT NULL,
    charge_nano INTEGER NOT NULL,
    PRIMARY KEY (project, direction, kind, status, error_code)) WITHOUT ROWID;
CREATE TABLE error_info (
    project TEXT NOT NULL, error_code TEXT NOT NULL, error_message TEXT NOT NULL,
    PRIMARY KEY (project, error_code)) WITHOUT ROWID;
CREATE TABLE failure_window (
    project TEXT NOT NULL, second INTEGER NOT NULL, direction TEXT NOT NULL, kind TEXT NOT NULL,
    settled INTEGER NOT NULL, failed INTEGER NOT NULL,
    PRIMARY KEY (project, second, direction, kind)) WITHOUT ROWID;
INSERT INTO meta VALUES ('schema_version', '1');
INSERT INTO project VALUES ('production', 1789990000.0, 1789999000.0);
INSERT INTO project VALUES ('staging', 1789990000.0, 1789999500.0);
INSERT INTO pending VALUES ('production', 'p1', 1789998000.0, 'outbound-api', 'sms', 'sent',
    '', NULL, 1, 4150000, 1789999000.0);
INSERT INTO settled VALUES ('production', 's1', 1789998500.0);
INSERT INTO totals VALUES ('production', 'outbound-api', 'sms', 'delivered', '', 90, 95, 373500000);
INSERT INTO totals VALUES ('production', 'outbound-api', 'sms', 'failed', '30007', 7, 7, 0);
INSERT INTO totals VALUES ('production', 'outbound-api', 'sms', 'failed', '30003', 3, 3, 0);
INSERT INTO totals VALUES ('staging', 'inbound', 'sms', 'received', '', 5, 5, 0);
INSERT INTO error_info VALUES ('production', '30007', 'Message filtered by carrier');
"""


def version_1_file(path: str) -> None:
    conn = sqlite3.connect(path)
    conn.executescript(SCHEMA_1)
    conn.execute(f"PRAGMA application_id={APPLICATION_ID}")
    conn.commit()
    conn.close()


def test_a_file_of_the_previous_release_is_migrated_and_keeps_its_totals(path: str) -> None:
    version_1_file(path)
    with capture_logs() as logs:
        state = reopened(path)
    migrated = [e for e in logs if e["event"] == "state file migrated"]
    assert len(migrated) == 1 and "1 -> 2" in migrated[0]["schema_version"]
    assert state.cursor == 1789999000.0
    assert state.complete_until == state.cursor  # what version 1 guaranteed
    assert state.totals[("outbound-api", "sms", "failed", "30007")] == Totals(7, 7, 0)
    assert dict(state.settled.items()) == settled_of({"s1": 1789998500.0})
    p1 = pending_of(state)["p1"].message
    assert p1.status == "sent"
    assert (p1.remote, p1.own) == ("", "")
    # What was counted before has no country or group on record: the sums stay equal.
    assert state.by_country == {
        ("outbound-api", "sms", "delivered", "unknown"): Totals(90, 95, 373500000),
        ("outbound-api", "sms", "failed", "unknown"): Totals(10, 10, 0),
    }
    assert state.by_group == {
        ("outbound-api", "sms", "delivered", "ungrouped"): Totals(90, 95, 373500000),
        ("outbound-api", "sms", "failed", "ungrouped"): Totals(10, 10, 0),
    }
    staging = reopened(path, "staging")
    assert staging.by_country == {("inbound", "sms", "received", "unknown"): Totals(5, 5, 0)}
    # Once only: the next start finds version 2.
    with capture_logs() as logs:
        again = reopened(path)
    assert not [e for e in logs if e["event"] == "state file migrated"]
    assert again.by_country == state.by_country
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone() == ("2",)
    conn.close()


def test_a_migrated_file_goes_on_counting(path: str) -> None:
    version_1_file(path)
    s = Store(path)
    try:
        s.load("production", NOW, 0.0)
        s.commit(
            "production",
            PollDelta(
                cursor=1789999100.0,
                totals={KEY: Totals(1, 1, 4_150_000)},
                by_country={(*KEY[:3], "CA"): Totals(1, 1, 4_150_000)},
                by_group={(*KEY[:3], "ungrouped"): Totals(1, 1, 4_150_000)},
                pending_removed={"p1"},
            ),
        )
    finally:
        s.close()
    state = reopened(path)
    assert state.totals[KEY] == Totals(91, 96, 377_650_000)
    assert state.by_country[(*KEY[:3], "CA")] == Totals(1, 1, 4_150_000)
    assert state.by_group[(*KEY[:3], "ungrouped")] == Totals(91, 96, 377_650_000)
    assert len(state.pending) == 0


def test_complete_until_starts_at_the_start_point_and_moves_only_when_given(path: str) -> None:
    s = Store(path)
    try:
        assert s.load("production", NOW, 600.0).complete_until == NOW - 600
        s.commit("production", PollDelta(cursor=NOW - 30, complete_until=NOW - 500))
        s.commit("production", PollDelta(cursor=NOW - 20))  # no listing from the floor
    finally:
        s.close()
    state = reopened(path)
    assert (state.cursor, state.complete_until) == (NOW - 20, NOW - 500)
