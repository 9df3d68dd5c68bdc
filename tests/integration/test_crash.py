"""Crash safety of the state file (docs/counting.md "State file"), against the real daemon as a
subprocess and the simulator over HTTP:

- SIGKILL at 24 random instants (during startup, between polls, in the middle of commits) under
  live traffic: no message counter (those by country and number group included) is ever seen
  lower, at every scrape the counters by country and by group sum to the message counters, and
  once all settles every one of them is exact.
- A full state filesystem while the daemon runs, and a read-only one at (re)start: polls fail with
  `reason="state"`, nothing uncommitted is shown, and counting resumes exactly once writable again.
- A state file that is corrupt, truncated, another program's or from a future version: exit 1 with
  one line that names the file and says what to do, and the file is left as it was.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import math
import os
import random
import re
import select as io_select
import shutil
import sqlite3
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path

import pytest
import requests

from exporter.simulator import (
    Simulator,
    SimulatorServer,
    Step,
    TrafficGenerator,
    TrafficProfile,
    random_message_args,
)
from exporter.store import SCHEMA_VERSION
from tests.helpers import (
    ROOT,
    Daemon,
    Samples,
    Totals,
    dimension_truth,
    exported_dimension,
    exported_totals,
    free_port,
    ground_truth,
    own_of,
    remote_of,
    select,
    sums_agree,
    true_country,
    wait_for,
    write_config,
)

SETTLE_TIMEOUT = 4.0
START_FROM = 30.0  # traffic starts after the first start: no message is near the start point
PROFILE = TrafficProfile(max_delay=1.5, never_receipted=0.08)
PROJECTS = {
    "alpha": ("33333333-aaaa", "PTcrash-alpha-token"),
    "beta": ("44444444-bbbb", "PTcrash-beta-token"),
}
COUNTERS = (
    "signalwire_messages_total",
    "signalwire_message_segments_total",
    "signalwire_message_charge_usd_total",
    "signalwire_messages_by_country_total",
    "signalwire_message_charge_usd_by_country_total",
    "signalwire_messages_by_number_group_total",
    "signalwire_message_charge_usd_by_number_group_total",
)
GROUPS = {"otp": ["+15551230000", "+15551230001"], "marketing": ["+15557650000", "72345"]}
GROUP_OF = {number: name for name, numbers in GROUPS.items() for number in numbers}
POLL_DONE = re.compile(rb'event="poll (?:finished|recovered)"')

Key = tuple[str, frozenset[tuple[str, str]]]


@pytest.fixture
def sim() -> Iterator[tuple[Simulator, str]]:
    simulator = Simulator(seed=11)
    # The awkward forms: next links without the filters, newest-first pages shifting under inserts.
    simulator.next_link_keeps_filters = False
    simulator.token_encodes_filters = False
    simulator.list_order = "newest"
    for project_id, token in PROJECTS.values():
        simulator.add_project(project_id, token)
    with SimulatorServer(simulator) as server:
        yield simulator, server.base_url


def make_config(tmp_path: Path, space: str, state_path: Path, page_size: int = 10) -> Path:
    projects = [
        {"name": name, "space": space, "project_id": pid, "api_token": token}
        for name, (pid, token) in PROJECTS.items()
    ]
    return write_config(
        tmp_path / "config.yaml",
        projects,
        poll_interval="1s",
        start_from=f"{int(START_FROM)}s",
        state_path=str(state_path),
        settle={"timeout": f"{int(SETTLE_TIMEOUT)}s"},
        request={"timeout": "2s", "page_size": page_size},
        number_groups=GROUPS,
    )


def traffic_for(simulator: Simulator, rate: float, seed: int) -> list[TrafficGenerator]:
    return [
        TrafficGenerator(simulator, pid, rate=rate, profile=PROFILE, seed=seed + i)
        for i, (pid, _) in enumerate(PROJECTS.values())
    ]


def message_counters(samples: Samples) -> dict[Key, float]:
    return {key: value for key, value in samples.items() if key[0] in COUNTERS}


def exported(samples: Samples, project: str) -> Totals:
    return exported_totals(samples, project)


def expected(simulator: Simulator, project: str, start_point: float) -> Totals:
    return ground_truth(simulator, PROJECTS[project][0], start_point, SETTLE_TIMEOUT)


def per_project(samples: Samples, name: str, **labels: str) -> dict[str, float]:
    """A metric summed per project."""
    result: dict[str, float] = {}
    for lbl, value in select(samples, name, **labels).items():
        project = dict(lbl)["project"]
        result[project] = result.get(project, 0.0) + value
    return result


def exact(daemon: Daemon, simulator: Simulator, start_point: float) -> bool:
    """Nothing pending, and every counter equal to the ground truth, label set by label set."""
    samples = daemon.scrape()
    return all(
        sum(select(samples, "signalwire_messages_pending", project=p).values()) == 0
        and exported(samples, p) == expected(simulator, p, start_point)
        and all(
            approx(exported_dimension(samples, p, dimension))
            == approx(dimension_truth(simulator, PROJECTS[p][0], start_point, SETTLE_TIMEOUT, by))
            for dimension, by in (
                ("country", lambda m: true_country(remote_of(m))),
                ("number_group", lambda m: GROUP_OF.get(own_of(m), "ungrouped")),
            )
        )
        for p in PROJECTS
    )


def approx(
    totals: dict[tuple[str, str, str, str], tuple[int, float]],
) -> dict[tuple[str, str, str, str], tuple[int, float]]:
    """Dollars to the nano-dollar, as the exposition's floats carry them."""
    return {k: (n, round(usd, 9)) for k, (n, usd) in totals.items()}


class Watermarks:
    """The highest value seen of every message counter: none may ever be seen lower."""

    def __init__(self) -> None:
        self.highest: dict[Key, float] = {}
        self.scrapes = 0
        self.ready = False

    def check(self, daemon: Daemon, context: str) -> Samples:
        # Before /-/ready the state may still be loading (series absent); once ready, every label
        # set ever exported must be back, at least at its highest value.
        self.ready = requests.get(f"{daemon.url}/-/ready", timeout=5).status_code == 200
        samples = daemon.scrape()
        current = message_counters(samples)
        for key, value in current.items():
            assert value >= self.highest.get(key, 0.0), (
                f"{context}: {key} went down from {self.highest[key]} to {value}\n{daemon.log()}"
            )
        if self.ready:
            missing = self.highest.keys() - current.keys()
            assert not missing, f"{context}: counters vanished once ready: {sorted(missing)}"
        for key, value in current.items():
            self.highest[key] = max(value, self.highest.get(key, 0.0))
        for project in PROJECTS:
            assert sums_agree(samples, project), f"{context}: {project}: sums differ\n{samples}"
        self.scrapes += 1
        return samples

    def start(self, config: Path, workdir: Path, context: str) -> Daemon:
        """Start a daemon and check every scrape from its first answer on: the state as loaded
        from the file shows before the first poll, and must not be below what was shown."""
        daemon = Daemon(config, workdir)
        daemon.start(wait_ready=False)

        def ready() -> bool:
            daemon.assert_alive()
            self.check(daemon, context)
            return self.ready

        wait_for(ready, 30, f"{context}: daemon ready\n{daemon.log()}", interval=0.01)
        return daemon

    def watch_until(self, daemon: Daemon, instant: float, context: str) -> None:
        """Scrape and check until the (random) monotonic `instant` at which the daemon is killed."""
        while time.monotonic() < instant:
            with suppress(requests.RequestException):
                self.check(daemon, context)
            time.sleep(min(0.05, max(0.0, instant - time.monotonic())))


class WalWatch:
    """inotify on the state directory: wakes up as soon as a commit starts writing the WAL."""

    IN_MODIFY = 0x2
    EVENT = struct.Struct("iIII")

    def __init__(self, directory: Path) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self.fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        if libc.inotify_add_watch(self.fd, bytes(directory), self.IN_MODIFY) < 0:
            os.close(self.fd)
            raise OSError(ctypes.get_errno(), "inotify_add_watch")

    def _wal_written(self) -> bool:
        try:
            data = os.read(self.fd, 1 << 16)
        except BlockingIOError:
            return False
        found, offset = False, 0
        while offset < len(data):
            _, _, _, length = self.EVENT.unpack_from(data, offset)
            start = offset + self.EVENT.size
            found |= data[start : start + length].rstrip(b"\0").endswith(b"-wal")
            offset = start + length
        return found

    def next_commit(self, timeout: float) -> bool:
        """Forget earlier writes, then wait for the next write to the WAL."""
        while self._wal_written():
            pass
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            if io_select.select([self.fd], [], [], left)[0] and self._wal_written():
                return True
        return False

    def close(self) -> None:
        os.close(self.fd)


def stop_all(traffic: list[TrafficGenerator], daemon: Daemon) -> None:
    """On the way out, whatever happened: no traffic thread or daemon process is left running."""
    for t in traffic:
        t.stop()
    if daemon.proc is not None and daemon.proc.poll() is None:
        daemon.kill()


def log_bytes(daemon: Daemon) -> bytes:
    return daemon.log_path.read_bytes() if daemon.log_path.exists() else b""


def full_log(daemon: Daemon) -> str:
    return log_bytes(daemon).decode(errors="replace")


# --------------------------------------------------------------------------- 1. kill -9


KILLS = 24
# Where the kills land: just after spawning (import, WAL recovery, load, first polls); on a commit
# (the instant its first WAL write is seen, or a few milliseconds later, while SQLite writes and
# syncs); about one poll interval after a commit was logged; anywhere.
KILL_KINDS = ("startup", "commit", "after-log", "commit", "anywhere")


def test_sigkill_at_random_instants_never_lowers_and_ends_exact(
    sim: tuple[Simulator, str], tmp_path: Path
) -> None:
    simulator, base_url = sim
    state = tmp_path / "state" / "exporter.db"
    config = make_config(tmp_path, base_url, state)
    rng = random.Random(20261122)
    marks = Watermarks()
    before = time.time()
    daemon = marks.start(config, tmp_path, "first start")
    start_point = before - START_FROM
    wal = WalWatch(state.parent)
    traffic = traffic_for(simulator, rate=15, seed=40)
    kinds: list[str] = []
    began = time.monotonic()
    try:
        for t in traffic:
            t.start()
        wait_for(
            lambda: sum(marks.check(daemon, "first run").values()) > 0,
            20,
            f"first counts\n{daemon.log()}",
        )
        for n in range(KILLS):
            kind = KILL_KINDS[n % len(KILL_KINDS)]
            kinds.append(kind)
            context = f"kill {n} ({kind})"
            if n > 0 and kind == "startup":
                daemon = Daemon(config, tmp_path)
                daemon.start(wait_ready=False)
                marks.watch_until(daemon, time.monotonic() + rng.uniform(0.0, 0.6), context)
            else:
                if n > 0:
                    daemon = marks.start(config, tmp_path, f"{context}: restart")
                if kind == "commit":
                    marks.watch_until(daemon, time.monotonic() + rng.uniform(0.0, 0.5), context)
                    assert wal.next_commit(10), f"{context}: no commit seen\n{daemon.log()}"
                    delay = rng.choice((0.0, rng.uniform(0.0, 0.012)))
                    if delay:
                        time.sleep(delay)  # a random instant within the commit
                elif kind == "after-log":
                    # A project commits about one poll interval after its previous commit was
                    # logged: kill around then, on or next to its next commit.
                    offset = len(log_bytes(daemon))
                    wait_for(
                        lambda d=daemon, off=offset: POLL_DONE.search(log_bytes(d), off),
                        15,
                        f"{context}: a committed poll\n{daemon.log()}",
                        interval=0.01,
                    )
                    instant = time.monotonic() + 1.0 + rng.uniform(-0.25, 0.15)
                    marks.watch_until(daemon, instant, context)
                else:
                    delay = rng.choice((rng.uniform(0.0, 0.05), rng.uniform(0.0, 1.5)))
                    marks.watch_until(daemon, time.monotonic() + delay, context)
            daemon.kill()
        daemon = marks.start(config, tmp_path, "after the last kill")
        for t in traffic:
            t.stop()
        killing = time.monotonic() - began
        wait_for(
            lambda: exact(daemon, simulator, start_point),
            40,
            f"exact counts after {KILLS} kills ({kinds})\n{daemon.log()}",
            interval=0.3,
        )
        marks.check(daemon, "settled")
        assert sum(t.created for t in traffic) > 300, "traffic ran throughout"
        assert daemon.terminate() == 0
    finally:
        wal.close()
        stop_all(traffic, daemon)
    log = full_log(daemon)
    assert "Traceback" not in log and "poll crashed" not in log, log[-5000:]
    assert marks.scrapes > 10 * KILLS, f"{marks.scrapes} scrapes over {killing:.0f}s of kills"


# --------------------------------------------------------------------------- 2. full, read-only


def mount(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["mount", *args], capture_output=True, text=True, check=False)


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 16 MiB tmpfs. The WAL grows by well under 100 KB/s under this traffic and is recycled
    only past about 4 MB: its appends need new blocks, so a full disk fails every commit."""
    where = tmp_path / "statefs"
    where.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root and mount(8)")
    result = mount("-t", "tmpfs", "-o", "size=16m,mode=0755", "tmpfs", str(where))
    if result.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here: {result.stderr.strip()}")
    try:
        yield where
    finally:
        # The test kills its daemon before this runs; a lazy unmount covers anything left over.
        if subprocess.run(["umount", str(where)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(where)], check=False)


def fill(path: Path) -> int:
    """Write `path` until the filesystem is full; the bytes written."""
    written = 0
    with path.open("wb", buffering=0) as f:
        for size in (1 << 16, 4096):
            chunk = b"\0" * size
            try:
                while True:
                    written += f.write(chunk) or 0
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
    return written


def test_full_then_read_only_state_filesystem(
    sim: tuple[Simulator, str], tmp_path: Path, small_tmpfs: Path
) -> None:
    simulator, base_url = sim
    state = small_tmpfs / "exporter.db"
    config = make_config(tmp_path, base_url, state)
    filler = small_tmpfs / "filler"
    marks = Watermarks()
    before = time.time()
    daemon = marks.start(config, tmp_path, "first start")
    start_point = before - START_FROM
    traffic = traffic_for(simulator, rate=8, seed=60)

    def up(samples: Samples) -> dict[str, float]:
        return per_project(samples, "signalwire_up")

    def state_errors(samples: Samples) -> dict[str, float]:
        found = per_project(samples, "signalwire_poll_errors_total", reason="state")
        return {p: found.get(p, 0.0) for p in PROJECTS}

    try:
        for t in traffic:
            t.start()

        def counting_in_both() -> bool:
            counted = per_project(marks.check(daemon, "warm-up"), COUNTERS[0])
            return len(counted) == len(PROJECTS) and all(v > 0 for v in counted.values())

        wait_for(counting_in_both, 20, f"counts in both projects\n{daemon.log()}")
        base_errors = state_errors(daemon.scrape())

        # Disk full: every commit fails until space is freed.
        log_offset = len(log_bytes(daemon))
        assert fill(filler) > 0
        wait_for(
            lambda: (
                (s := marks.check(daemon, "disk full")) is not None
                and all(v == 0 for v in up(s).values())
                and all(state_errors(s)[p] > base_errors[p] for p in PROJECTS)
            ),
            20,
            f"up 0 with state errors on a full disk\n{daemon.log()}",
        )
        frozen = message_counters(daemon.scrape())
        seen_errors = state_errors(daemon.scrape())

        def still_frozen() -> bool:
            daemon.assert_alive()
            samples = daemon.scrape()
            assert message_counters(samples) == frozen, (
                "message counters moved while no commit could succeed"
            )
            assert all(v == 0 for v in up(samples).values()), up(samples)
            errors = state_errors(samples)
            return all(errors[p] >= seen_errors[p] + 2 for p in PROJECTS)

        wait_for(still_frozen, 20, f"more failed commits\n{daemon.log()}", interval=0.1)
        assert requests.get(f"{daemon.url}/-/healthy", timeout=5).status_code == 200
        lines = log_bytes(daemon)[log_offset:].decode(errors="replace").splitlines()
        errors = [line for line in lines if "level=error" in line and str(state) in line]
        assert errors, f"no error line naming {state}:\n" + "\n".join(lines[-20:])

        # Space freed: polls commit again and counting resumes.
        filler.unlink()
        wait_for(
            lambda: (
                (s := marks.check(daemon, "space freed")) is not None
                and all(v == 1 for v in up(s).values())
                and sum(message_counters(s).values()) > sum(frozen.values())
            ),
            20,
            f"counting resumed after freeing space\n{daemon.log()}",
        )

        # Read-only. Linux refuses to remount a filesystem read-only while a process holds files
        # on it open for writing (EBUSY), as the daemon does its state file: a running daemon
        # cannot see its state go read-only. What happens is a (re)start on a read-only volume:
        # it must refuse with one clear line, then resume from the state file once writable.
        daemon.kill()
        # The killed processes' files are released as the kernel tears them down, which on a busy
        # machine can take a moment after they are gone from the process table.
        wait_for(
            lambda: mount("-o", "remount,ro", str(small_tmpfs)).returncode == 0,
            10,
            "the state filesystem remounted read-only",
            interval=0.1,
        )
        log_offset = len(log_bytes(daemon))
        refused = Daemon(config, tmp_path)
        refused.start(wait_ready=False)
        assert refused.proc is not None
        try:
            code = refused.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            refused.kill()
            pytest.fail(f"the daemon ran on a read-only state directory\n{refused.log()}")
        text = log_bytes(refused)[log_offset:].decode(errors="replace")
        assert code == 1, text
        assert "Traceback" not in text, text
        plain = [line for line in text.splitlines() if line and not line.startswith("ts=")]
        assert len(plain) == 1 and str(state) in plain[0], text
        assert mount("-o", "remount,rw", str(small_tmpfs)).returncode == 0

        daemon = marks.start(config, tmp_path, "restart once writable")
        wait_for(
            lambda: all(v == 1 for v in up(marks.check(daemon, "writable again")).values()),
            20,
            f"up 1 once writable again\n{daemon.log()}",
        )
        for t in traffic:
            t.stop()
        wait_for(
            lambda: exact(daemon, simulator, start_point),
            40,
            f"exact counts after disk full and read-only\n{daemon.log()}",
            interval=0.3,
        )
        marks.check(daemon, "settled")
        assert daemon.terminate() == 0
    finally:
        stop_all(traffic, daemon)
    assert "Traceback" not in full_log(daemon)


# --------------------------------------------------------------------------- 3. corrupt, foreign


@pytest.fixture(scope="module")
def real_state(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """The bytes of a state file the daemon wrote and closed cleanly, holding real data."""
    workdir = tmp_path_factory.mktemp("real-state")
    simulator = Simulator(seed=5)
    for project_id, token in PROJECTS.values():
        simulator.add_project(project_id, token)
    rng = random.Random(5)
    now = math.floor(time.time())
    final = TrafficProfile(max_delay=0.1, never_receipted=0.0)
    for project_id, _ in PROJECTS.values():
        for _ in range(250):
            args = random_message_args(rng, final)
            simulator.add_message(project_id, created_at=now - rng.randint(1, 20), **args)
        simulator.add_message(  # stays pending: the pending table is not empty either
            project_id,
            direction="outbound-api",
            kind="sms",
            created_at=now,
            segments=1,
            timeline=[Step(0, "queued")],
        )
    state = workdir / "state" / "exporter.db"
    with SimulatorServer(simulator) as server:
        config = make_config(workdir, server.base_url, state, page_size=1000)
        daemon = Daemon(config, workdir).start()
        wait_for(
            lambda: sum(per_project(daemon.scrape(), COUNTERS[0]).values()) == 500,
            20,
            f"the messages counted\n{daemon.log()}",
        )
        assert daemon.terminate() == 0
    assert not Path(f"{state}-wal").exists(), "a clean stop checkpoints the WAL"
    data = state.read_bytes()
    assert len(data) >= 16 * 4096, len(data)
    return data


def corrupt_state(case: str, path: Path, real: bytes) -> None:
    if case == "garbage":
        path.write_bytes(random.Random(7).randbytes(len(real)))
    elif case == "truncated":
        path.write_bytes(real[: len(real) // 2])
    elif case == "foreign":
        with sqlite3.connect(path) as conn:
            conn.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT NOT NULL)")
            conn.execute("INSERT INTO notes (body) VALUES ('not a signalwire-exporter file')")
        conn.close()
    elif case == "future":
        path.write_bytes(real)
        with sqlite3.connect(path) as conn:
            changed = conn.execute(
                "UPDATE meta SET value=? WHERE key='schema_version'", (str(SCHEMA_VERSION + 1),)
            )
            assert changed.rowcount == 1
        conn.close()
    else:
        raise AssertionError(case)


@pytest.mark.parametrize("case", ["garbage", "truncated", "foreign", "future"])
def test_unusable_state_file_is_refused_and_left_alone(
    case: str, real_state: bytes, tmp_path: Path
) -> None:
    state = tmp_path / "state" / "exporter.db"
    state.parent.mkdir()
    corrupt_state(case, state, real_state)
    assert not Path(f"{state}-wal").exists()
    original = hashlib.sha256(state.read_bytes()).hexdigest()
    # Nothing listens on the discard port: the daemon must stop before it ever polls.
    config = make_config(tmp_path, "http://127.0.0.1:9", state)
    command = [sys.executable, "-m", "exporter", "run", "--config.file", str(config)]
    command += ["--web.listen-address", f"127.0.0.1:{free_port()}"]
    try:
        result = subprocess.run(
            command,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=20,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{case}: the daemon ran on an unusable state file\n{exc.stderr!r}")
    stderr = result.stderr
    assert result.returncode == 1, f"{case}: exit {result.returncode}\n{stderr}"
    assert "Traceback" not in stderr, stderr
    # Log events are logfmt lines (ts=...); besides them, exactly one line for the operator.
    plain = [line for line in stderr.splitlines() if line.strip() and not line.startswith("ts=")]
    assert len(plain) == 1, f"{case}: want one line on stderr besides log events:\n{stderr}"
    line = plain[0]
    assert str(state) in line, f"{case}: the line does not name the file: {line}"
    assert re.search(r"backup|move it away|run the version", line, re.I), (
        f"{case}: the line does not say what to do: {line}"
    )
    assert hashlib.sha256(state.read_bytes()).hexdigest() == original, f"{case}: file changed"
    for suffix in ("-wal", "-journal"):
        sidecar = Path(f"{state}{suffix}")
        assert not sidecar.exists() or sidecar.stat().st_size == 0, f"{case}: {sidecar} written"
