"""The durable state: one SQLite file holding, per project, the start point, the cursor, the pending
messages, the recently settled ids, the counter totals (by error code, by country and by number
group), the error descriptions and the failure-ratio window.

A poll's effects are committed in one transaction (WAL), so a kill -9 at any
instant leaves either the previous poll's state or the new one: nothing lost, nothing counted twice.
A file that cannot be read, or that belongs to something else, is refused with a message that says
what to do; it is never silently replaced.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import os
import sqlite3
import struct
import threading
import time
from pathlib import Path

import structlog

from exporter.ledger import LedgerState, PollDelta, Totals
from exporter.pending import PendingSet, id_of, settled_prune_point
from exporter.records import Message

# A pending message's latest record, as Message's fields, then when it was observed.
PENDING_COLUMNS = (
    "id, created_at, direction, kind, status, error_code, error_message, segments, charge_nano,"
    " remote, own, observed_at"
)

APPLICATION_ID = 0x53574558  # "SWEX": marks the file as ours
SCHEMA_VERSION = 2

# How long opening waits for another process to release the state file's lock before refusing: a
# process killed with its parent can hold it for a few milliseconds more, while a supervisor is
# already starting the daemon again.
LOCK_WAIT = 3.0
LOCK_RETRY_INTERVAL = 0.05
# The WAL is copied back into the database by a background checkpoint once it holds this much, so
# that no commit pays for the copy and its fsyncs (SQLite's own default is about this size).
CHECKPOINT_AFTER_BYTES = 4 * 2**20
# Past this much WAL (background checkpoints failing or never completing), commits checkpoint
# themselves, as SQLite would on its own: the WAL must never grow without bound.
CHECKPOINT_IN_COMMIT_BYTES = 16 * CHECKPOINT_AFTER_BYTES

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS project (
    name TEXT PRIMARY KEY, start_point REAL NOT NULL, cursor REAL NOT NULL,
    complete_until REAL);
CREATE TABLE IF NOT EXISTS pending (
    project TEXT NOT NULL, id TEXT NOT NULL, created_at REAL NOT NULL,
    direction TEXT NOT NULL, kind TEXT NOT NULL, status TEXT NOT NULL,
    error_code TEXT NOT NULL, error_message TEXT, segments INTEGER NOT NULL,
    charge_nano INTEGER NOT NULL, observed_at REAL NOT NULL,
    remote TEXT NOT NULL DEFAULT '', own TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (project, id)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS settled (
    project TEXT NOT NULL, id TEXT NOT NULL, created_at REAL NOT NULL,
    PRIMARY KEY (project, id)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS settled_by_age ON settled (project, created_at);
CREATE TABLE IF NOT EXISTS totals (
    project TEXT NOT NULL, direction TEXT NOT NULL, kind TEXT NOT NULL, status TEXT NOT NULL,
    error_code TEXT NOT NULL, messages INTEGER NOT NULL, segments INTEGER NOT NULL,
    charge_nano INTEGER NOT NULL,
    PRIMARY KEY (project, direction, kind, status, error_code)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS totals_by_country (
    project TEXT NOT NULL, direction TEXT NOT NULL, kind TEXT NOT NULL, status TEXT NOT NULL,
    country TEXT NOT NULL, messages INTEGER NOT NULL, segments INTEGER NOT NULL,
    charge_nano INTEGER NOT NULL,
    PRIMARY KEY (project, direction, kind, status, country)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS totals_by_group (
    project TEXT NOT NULL, direction TEXT NOT NULL, kind TEXT NOT NULL, status TEXT NOT NULL,
    number_group TEXT NOT NULL, messages INTEGER NOT NULL, segments INTEGER NOT NULL,
    charge_nano INTEGER NOT NULL,
    PRIMARY KEY (project, direction, kind, status, number_group)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS error_info (
    project TEXT NOT NULL, error_code TEXT NOT NULL, error_message TEXT NOT NULL,
    PRIMARY KEY (project, error_code)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS failure_window (
    project TEXT NOT NULL, second INTEGER NOT NULL, direction TEXT NOT NULL, kind TEXT NOT NULL,
    settled INTEGER NOT NULL, failed INTEGER NOT NULL,
    PRIMARY KEY (project, second, direction, kind)) WITHOUT ROWID;
"""

# Version 1 -> 2: the counters by country and by number group, the pending messages' numbers, and
# where every record is sure to have been seen (NULL: at the cursor). What was counted before has
# no country or group on record: it is carried over as "unknown" and "ungrouped", so the new
# counters' sums equal the message counters from the first scrape on.
_MIGRATE_FROM_1 = """
ALTER TABLE project ADD COLUMN complete_until REAL;
ALTER TABLE pending ADD COLUMN remote TEXT NOT NULL DEFAULT '';
ALTER TABLE pending ADD COLUMN own TEXT NOT NULL DEFAULT '';
INSERT INTO totals_by_country
    SELECT project, direction, kind, status, 'unknown', sum(messages), sum(segments),
           sum(charge_nano)
    FROM totals GROUP BY project, direction, kind, status;
INSERT INTO totals_by_group
    SELECT project, direction, kind, status, 'ungrouped', sum(messages), sum(segments),
           sum(charge_nano)
    FROM totals GROUP BY project, direction, kind, status;
"""


class StateError(Exception):
    """The state file cannot be used; the message says which file, why, and what to do."""


class CommitError(Exception):
    """A poll could not be committed (disk full, unwritable...): its effects are dropped."""


def committed_start_point(path: str, project: str) -> float | None:
    """A project's start point in a state file, read without taking it over (the daemon may be
    running); None when the file or the project is not there yet."""
    if not Path(path).is_file():
        return None
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            row = conn.execute(
                "SELECT start_point FROM project WHERE name=?", (project,)
            ).fetchone()
        finally:
            conn.close()
    except sqlite3.Error as exc:
        if "no such table" in str(exc):
            return None
        raise StateError(f"state file {path}: cannot be read ({exc})") from None
    return None if row is None else float(row[0])


def state_path_problem(path: str) -> str | None:
    """Why the state file could not be used, without opening it for writing (a daemon may hold
    it): None when it can, or will be created. Errors of the file's content show on opening."""
    target = Path(path)
    misplaced = _misplaced(target)
    if misplaced is not None:
        return misplaced
    if target.exists():
        if not os.access(target, os.R_OK | os.W_OK):
            return "cannot open for writing: permission denied; make it writable by this user"
        return None
    existing = next(p for p in target.parents if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"cannot create: {existing} is not writable by this user"
    return None


def _misplaced(target: Path) -> str | None:
    """A state path that is a directory, or lies under a file."""
    for parent in reversed(target.parents):
        if parent.exists() and not parent.is_dir():
            return f"{parent} is not a directory; set state_path to a path in a directory"
    if target.is_dir():
        return "is a directory; set state_path to a file"
    return None


class _Checkpointer:
    """Copies the WAL back into the database on its own thread and connection, so that commits do
    not wait for it: sqlite3 releases the GIL while SQLite copies and syncs.

    PASSIVE checkpoints never block the writer, and a checkpoint only moves already committed pages
    into the database file, so durability is that of the commits themselves.
    """

    def __init__(self, path: str) -> None:
        self._path = path
        self._wake = threading.Condition()
        self._due = False
        self._stopping = False
        self._error_logged = False
        self.passes = 0  # checkpoints run to the end, for tests to follow
        self._thread = threading.Thread(target=self._run, name="state-checkpoint", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def request(self) -> None:
        """Checkpoint soon; requests made while one is due count once."""
        with self._wake:
            self._due = True
            self._wake.notify()

    def stop(self) -> None:
        """Finish the checkpoint under way, if any, and end the thread."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join()

    def _run(self) -> None:
        conn: sqlite3.Connection | None = None
        try:
            while True:
                with self._wake:
                    while not (self._due or self._stopping):
                        self._wake.wait()
                    if self._stopping:
                        return
                    self._due = False
                try:
                    if conn is None:
                        conn = sqlite3.connect(self._path, isolation_level=None)
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                    self.passes += 1
                except Exception as exc:  # the commits' own fallback keeps the WAL bounded
                    self.log_error("background checkpoint failed", exc)
        finally:
            if conn is not None:
                try:
                    conn.close()
                except Exception as exc:
                    self.log_error("background checkpoint failed", exc)

    def log_error(self, event: str, exc: BaseException) -> None:
        """Log the first failure only: a failing disk would otherwise log at every poll."""
        if not self._error_logged:
            self._error_logged = True
            structlog.get_logger().warning(event, state_path=self._path, error=str(exc))


class Store:
    def __init__(
        self,
        path: str,
        *,
        lock_wait: float = LOCK_WAIT,
        checkpoint_after: int = CHECKPOINT_AFTER_BYTES,
        checkpoint_in_commit: int = CHECKPOINT_IN_COMMIT_BYTES,
    ) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._lock_fd = -1
        self._lock_wait = lock_wait
        self._shm_path = f"{path}-shm"
        self._checkpoint_after = checkpoint_after
        self._checkpoint_in_commit = checkpoint_in_commit
        self._conn = self._open()
        self._checkpointer: _Checkpointer | None = _Checkpointer(path)

    def _refuse(self, why: str) -> StateError:
        return StateError(
            f"state file {self.path}: {why}. Restore it from a backup, or move it away to start "
            "counting afresh (counters then start again from the current time)"
        )

    def _open(self) -> sqlite3.Connection:
        path = Path(self.path)
        misplaced = _misplaced(path)
        if misplaced is not None:
            raise StateError(f"state file {self.path}: {misplaced}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._lock_fd = os.open(f"{self.path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            doing = "cannot open for writing" if path.exists() else "cannot create"
            raise StateError(
                f"state file {self.path}: {doing}: {exc.strerror}; make the file and its "
                "directory writable by this user, or set state_path elsewhere"
            ) from None
        if not self._take_lock():
            self._release()
            raise StateError(
                f"state file {self.path}: in use by another signalwire-exporter process; "
                "give each instance its own state_path"
            )
        try:
            conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        except sqlite3.Error as exc:
            self._release()
            raise self._refuse(f"cannot be opened ({exc})") from None
        try:
            self._prepare(conn)
        except sqlite3.DatabaseError as exc:
            conn.close()
            self._release()
            raise self._refuse(f"cannot be read ({exc})") from None
        except StateError:
            conn.close()
            self._release()
            raise
        return conn

    def _take_lock(self) -> bool:
        """Lock the state file, waiting up to lock_wait for a process that is going away."""
        deadline = time.monotonic() + self._lock_wait
        while True:
            try:
                fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except OSError as exc:
                left = deadline - time.monotonic()
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN) or left <= 0:
                    return False
                time.sleep(min(LOCK_RETRY_INTERVAL, left))

    def _prepare(self, conn: sqlite3.Connection) -> None:
        """Check that the file is ours (or empty), then create the schema, all or nothing.

        Nothing is written to a file that is refused.
        """
        app_id = conn.execute("PRAGMA application_id").fetchone()[0]
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
        # A file marked by another program, or holding tables without our mark, is not ours.
        if app_id not in (0, APPLICATION_ID) or (app_id == 0 and tables):
            raise self._refuse("is a SQLite database of another program")
        version = SCHEMA_VERSION
        if "meta" in tables:
            row = conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
            version = SCHEMA_VERSION if row is None else int(row[0]) if row[0].isdigit() else -1
            if version not in (1, SCHEMA_VERSION):
                raise StateError(
                    f"state file {self.path}: schema version {row[0]} is not supported by this "
                    f"version (expects {SCHEMA_VERSION}); run the newer version that wrote it, or "
                    "restore a backup made by this version"
                )
        conn.execute("PRAGMA journal_mode=WAL")
        # NORMAL: a committed poll survives the process being killed at any instant; only a power
        # loss can take back the latest polls, and then the state is still a consistent earlier
        # commit whose polls are simply redone. FULL would fsync on every poll (tens of ms).
        conn.execute("PRAGMA synchronous=NORMAL")
        # Checkpoints run on the checkpointer's thread, not inside a commit (see _after_write).
        conn.execute("PRAGMA wal_autocheckpoint=0")
        # A WAL file that keeps its size is rewritten in place: growing it again after each cut
        # would allocate blocks inside commits, which waits on the filesystem's journal. It is
        # cut back only after growing past the point where commits checkpoint themselves.
        conn.execute(f"PRAGMA journal_size_limit={self._checkpoint_in_commit}")
        with conn:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute(f"PRAGMA application_id={APPLICATION_ID}")
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            if version == 1:
                for statement in _MIGRATE_FROM_1.split(";"):
                    if statement.strip():
                        conn.execute(statement)
            conn.execute(
                "INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),)
            )
        if version == 1:
            structlog.get_logger().info(
                "state file migrated",
                state_path=self.path,
                schema_version=f"1 -> {SCHEMA_VERSION}",
                detail="counters by country and number group added; what was counted before "
                "shows under country unknown and number_group ungrouped",
            )

    def _release(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    def close(self) -> None:
        """Stop the checkpointer, copy the whole WAL into the database, and release the file."""
        with self._lock:
            checkpointer, self._checkpointer = self._checkpointer, None
            if checkpointer is not None:
                checkpointer.stop()
                try:
                    # TRUNCATE leaves an empty WAL even if another process keeps the file open.
                    self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
                except sqlite3.Error as exc:  # nothing is lost: the WAL is replayed on opening
                    checkpointer.log_error("checkpoint on close failed", exc)
            self._conn.close()
            self._release()

    def _after_write(self) -> None:
        """After a committed write: have the WAL checkpointed once it has grown past the mark.

        Never raises: the write is committed, and reporting it as failed would have the poll
        counted again.
        """
        size = self._wal_bytes()
        if size <= self._checkpoint_after:
            return
        checkpointer = self._checkpointer
        if checkpointer is not None and checkpointer.alive and size <= self._checkpoint_in_commit:
            checkpointer.request()
            return
        try:
            self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        except sqlite3.Error as exc:
            if checkpointer is not None:
                checkpointer.log_error("checkpoint failed", exc)

    def _wal_bytes(self) -> int:
        """How much of the WAL is in use: the file keeps its size when the WAL starts afresh, so
        the count of frames is read from the wal-index header (mxFrame and the page size, in
        native byte order, https://sqlite.org/walformat.html). Failing that, the file's size:
        never less than what is in use, so the WAL stays bounded either way."""
        try:
            with open(self._shm_path, "rb") as shm:
                header = shm.read(24)
        except OSError:
            header = b""
        if len(header) < 24:
            try:
                return os.stat(f"{self.path}-wal").st_size
            except OSError:
                return 0
        page_size, frames = struct.unpack_from("=HI", header, 14)
        page_size = 65536 if page_size == 1 else page_size
        return int(frames) * (int(page_size) + 24)

    def load(self, project: str, now: float, start_from: float) -> LedgerState:
        """A project's committed state; on its first start, its start point is recorded at once."""
        with self._lock:
            try:
                return self._load(project, now, start_from)
            except sqlite3.DatabaseError as exc:
                raise self._refuse(f"cannot be read ({exc})") from None

    def _load(self, project: str, now: float, start_from: float) -> LedgerState:
        c = self._conn
        row = c.execute(
            "SELECT start_point, cursor, complete_until FROM project WHERE name=?", (project,)
        ).fetchone()
        if row is None:
            start = now - start_from
            try:
                with c:
                    c.execute("BEGIN IMMEDIATE")
                    c.execute(
                        "INSERT INTO project VALUES (?, ?, ?, ?)", (project, start, start, start)
                    )
            except sqlite3.Error as exc:
                raise StateError(
                    f"state file {self.path}: cannot record the start point of project "
                    f"{project} ({exc}); make the file and its directory writable, or free disk "
                    "space"
                ) from None
            return LedgerState(start_point=start, cursor=start, pending=self._pending_set(project))
        state = LedgerState(
            start_point=row[0],
            cursor=row[1],
            complete_until=row[1] if row[2] is None else row[2],
            pending=self._pending_set(project),
        )
        for r in c.execute(f"SELECT {PENDING_COLUMNS} FROM pending WHERE project=?", (project,)):
            state.pending.put(Message(*r[:11]), r[11])
        for message_id, created_at in c.execute(
            "SELECT id, created_at FROM settled WHERE project=?", (project,)
        ):
            state.settled.add(message_id, created_at)
        for r in c.execute(
            "SELECT direction, kind, status, error_code, messages, segments, charge_nano"
            " FROM totals WHERE project=?",
            (project,),
        ):
            state.totals[(r[0], r[1], r[2], r[3])] = Totals(r[4], r[5], r[6])
        for table, totals in (
            ("totals_by_country", state.by_country),
            ("totals_by_group", state.by_group),
        ):
            for r in c.execute(f"SELECT * FROM {table} WHERE project=?", (project,)):
                totals[(r[1], r[2], r[3], r[4])] = Totals(r[5], r[6], r[7])
        state.error_info = dict(
            c.execute(
                "SELECT error_code, error_message FROM error_info WHERE project=?", (project,)
            ).fetchall()
        )
        for r in c.execute(
            "SELECT second, direction, kind, settled, failed FROM failure_window WHERE project=?",
            (project,),
        ):
            state.window[(r[0], r[1], r[2])] = (r[3], r[4])
        return state

    def _pending_set(self, project: str) -> PendingSet:
        """An empty set of pending messages whose records are read back from this file."""
        return PendingSet(functools.partial(self.pending_record, project))

    def pending_record(self, project: str, message_id: str) -> Message | None:
        """A pending message's latest record as committed (the ledger keeps less of it)."""
        with self._lock:
            row = self._conn.execute(
                f"SELECT {PENDING_COLUMNS} FROM pending WHERE project=? AND id=?",
                (project, message_id),
            ).fetchone()
        return None if row is None else Message(*row[:11])

    def commit(self, project: str, delta: PollDelta) -> None:
        """Write one poll's effects atomically; on failure raise CommitError, change nothing."""
        with self._lock:
            try:
                self._commit(project, delta)
            except sqlite3.Error as exc:
                raise CommitError(f"cannot write state file {self.path}: {exc}") from None
            self._after_write()

    def seed(self, project: str, start_point: float, delta: PollDelta) -> None:
        """Record a project that has never run, with history already counted (a backfill).

        Refused when the project already has state: its counters must never be rewritten.
        """
        with self._lock:
            try:
                c = self._conn
                with c:
                    c.execute("BEGIN IMMEDIATE")
                    if c.execute("SELECT 1 FROM project WHERE name=?", (project,)).fetchone():
                        raise StateError(
                            f"state file {self.path}: project {project} has already started "
                            "counting; its state is left as it is"
                        )
                    c.execute(
                        "INSERT INTO project VALUES (?, ?, ?, NULL)",
                        (project, start_point, start_point),
                    )
                    self._write(c, project, delta)
            except sqlite3.Error as exc:
                raise CommitError(f"cannot write state file {self.path}: {exc}") from None
            self._after_write()

    def _commit(self, project: str, delta: PollDelta) -> None:
        c = self._conn
        with c:
            c.execute("BEGIN IMMEDIATE")
            self._write(c, project, delta)

    def _write(self, c: sqlite3.Connection, project: str, delta: PollDelta) -> None:
        """One poll's effects, inside the caller's transaction."""
        c.execute(
            "UPDATE project SET cursor=?, complete_until=coalesce(?, complete_until) WHERE name=?",
            (delta.cursor, delta.complete_until, project),
        )
        c.executemany(
            "DELETE FROM pending WHERE project=? AND id=?",
            ((project, id_of(ref)) for ref in delta.pending_removed),
        )
        c.executemany(
            "INSERT OR REPLACE INTO pending VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (
                (
                    project,
                    i,
                    p.message.created_at,
                    p.message.direction,
                    p.message.kind,
                    p.message.status,
                    p.message.error_code,
                    p.message.error_message,
                    p.message.segments,
                    p.message.charge_nano,
                    p.observed_at,
                    p.message.remote,
                    p.message.own,
                )
                for i, p in delta.pending_upserts.items()
            ),
        )
        prune_point = settled_prune_point(delta.prune_settled_before)
        c.executemany(
            "INSERT OR REPLACE INTO settled VALUES (?,?,?)",
            (
                (project, id_of(ref), created)
                for ref, created in delta.settled_ids.items()
                if created >= prune_point  # below it, deleted in this same commit
            ),
        )
        c.execute("DELETE FROM settled WHERE project=? AND created_at<?", (project, prune_point))
        for table, increments in (
            ("totals", delta.totals),
            ("totals_by_country", delta.by_country),
            ("totals_by_group", delta.by_group),
        ):
            c.executemany(
                f"INSERT INTO {table} VALUES (?,?,?,?,?,?,?,?) ON CONFLICT DO UPDATE SET"
                " messages=messages+excluded.messages, segments=segments+excluded.segments,"
                " charge_nano=charge_nano+excluded.charge_nano",
                (
                    (project, *key, inc.messages, inc.segments, inc.charge_nano)
                    for key, inc in increments.items()
                ),
            )
        c.executemany(
            "INSERT OR REPLACE INTO error_info VALUES (?,?,?)",
            ((project, code, text) for code, text in delta.error_info.items()),
        )
        c.executemany(
            "INSERT INTO failure_window VALUES (?,?,?,?,?,?) ON CONFLICT DO UPDATE SET"
            " settled=settled+excluded.settled, failed=failed+excluded.failed",
            ((project, *key, s, f) for key, (s, f) in delta.window_add.items()),
        )
        c.execute(
            "DELETE FROM failure_window WHERE project=? AND second<?",
            (project, delta.prune_window_before),
        )
