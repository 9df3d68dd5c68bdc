"""A backlog taken in as committed steps: one project's poller against the simulator, in-process
(the real client through a requests adapter), with small steps so that a few thousand messages
make many windows."""

from __future__ import annotations

import functools
import math
import random
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from exporter import catchup
from exporter.catchup import Windows
from exporter.config import Config, ProjectConfig, SettleConfig
from exporter.ledger import LabelKey, PollDelta, Totals
from exporter.poller import Counters, ProjectPoller, poll_client
from exporter.simulator import Simulator, SimulatorAdapter, Step
from exporter.store import Store
from exporter.views import ProjectView

BASE = "http://simulator.invalid"
PID, TOKEN = "p-1", "PTgood-token"
TIMEOUT = 60.0
HOUR = 3600.0
FINAL = frozenset({"delivered", "undelivered", "failed", "received"})


@pytest.fixture(autouse=True)
def small_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(catchup, "STEP_RECORDS", 100)
    monkeypatch.setattr(catchup, "STEP_MAX_RECORDS", 200)


def populate(simulator: Simulator, count: int, since: float, until: float, seed: int = 1) -> None:
    """Messages spread over [since, until): every outcome, some never receipted (they settle
    by timeout as `sent`), some MMS, some inbound."""
    rng = random.Random(seed)
    simulator.add_project(PID, TOKEN)
    for _ in range(count):
        created = rng.uniform(since, until)
        direction, kind = rng.choice(
            [("outbound-api", "sms"), ("outbound-api", "mms"), ("inbound", "sms")]
        )
        if direction == "inbound":
            timeline = [Step(0, "received", charge=0.0075)]
        else:
            last = rng.choice(
                [
                    Step(3, "delivered", charge=0.0079),
                    Step(5, "undelivered", "30007", "Filtered", 0.0079),
                    Step(1, "failed", "21610", "Unsubscribed", 0.0),
                    Step(2, "sent", charge=0.0079),  # never a receipt
                ]
            )
            timeline = [Step(0, "queued"), last]
        simulator.add_message(
            PID,
            direction=direction,
            kind=kind,
            created_at=created,
            segments=rng.randint(1, 3),
            timeline=timeline,
        )


def make_poller(state_path: str, simulator: Simulator, start_from: float) -> ProjectPoller:
    project = ProjectConfig("prod", BASE, PID, TOKEN)
    config = Config(
        projects=(project,),
        poll_interval=30.0,
        state_path=state_path,
        start_from=start_from,
        settle=SettleConfig(timeout=TIMEOUT, final_statuses_by_kind={"mms": frozenset({"sent"})}),
        request_timeout=5.0,
        page_size=25,
    )
    poller = ProjectPoller(
        project,
        config,
        HookedStore(state_path),
        Counters(),
        threading.Event(),
        clock=simulator.clock,
        connect=functools.partial(poll_client, adapter=SimulatorAdapter(simulator, BASE)),
    )
    poller.load()
    return poller


def truth(simulator: Simulator, poller: ProjectPoller) -> dict[LabelKey, tuple[int, int, int]]:
    assert poller.ledger is not None
    return simulator.expected_totals(
        PID,
        final_statuses=FINAL,
        final_statuses_by_kind={"mms": {"sent"}},
        settle_timeout=TIMEOUT,
        start_point=poller.ledger.state.start_point,
    )


def counted(totals: dict[LabelKey, Totals]) -> dict[LabelKey, tuple[int, int, int]]:
    return {k: (t.messages, t.segments, t.charge_nano) for k, t in totals.items()}


class HookedStore(Store):
    """The real store, calling hooks before and after each commit."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.before: list[Callable[[PollDelta], None]] = []
        self.after: list[Callable[[PollDelta], None]] = []

    def commit(self, project: str, delta: PollDelta) -> None:
        for hook in self.before:
            hook(delta)
        super().commit(project, delta)
        for hook in self.after:
            hook(delta)


def hooks(poller: ProjectPoller) -> HookedStore:
    assert isinstance(poller.store, HookedStore)
    return poller.store


class Recorder:
    """Every commit of a poller, and every view it publishes."""

    def __init__(self, poller: ProjectPoller) -> None:
        self.deltas: list[PollDelta] = []
        self.views: list[ProjectView] = []
        hooks(poller).after.append(self.deltas.append)
        poller.on_publish = self.views.append


@pytest.fixture
def workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as path:
        yield Path(path)


@pytest.mark.parametrize(
    ("order", "after_inclusive", "before_inclusive", "keeps_filters", "token_filters"),
    [
        ("newest", False, False, True, True),
        ("oldest", True, True, True, True),
        ("arbitrary", False, True, False, False),
        ("newest", True, False, False, True),
    ],
)
def test_a_backlog_is_taken_in_as_committed_steps_exactly(
    workdir: Path,
    order: str,
    after_inclusive: bool,
    before_inclusive: bool,
    keeps_filters: bool,
    token_filters: bool,
) -> None:
    now = math.floor(time.time())
    simulator = Simulator(clock=lambda: now, seed=3)
    simulator.list_order = order
    simulator.created_after_inclusive = after_inclusive
    simulator.created_before_inclusive = before_inclusive
    simulator.next_link_keeps_filters = keeps_filters
    simulator.token_encodes_filters = token_filters
    populate(simulator, 3000, now - 3 * HOUR, now - TIMEOUT - 10)
    poller = make_poller(str(workdir / "state.db"), simulator, start_from=3 * HOUR + 60)
    recorder = Recorder(poller)
    assert poller.poll_once()
    steps = recorder.deltas[:-1]
    assert len(steps) >= 10, "a backlog of 3,000 in steps of about 100"
    assert all(d.new_messages <= catchup.STEP_MAX_RECORDS + 25 for d in recorder.deltas)
    cursors = [d.cursor for d in recorder.deltas]
    assert cursors == sorted(cursors), "the cursor only moves forward"
    # Each step was published, ready (polled) from the first one on, with its progress.
    stepped = [v for v in recorder.views if v.catch_up is not None]
    assert len(stepped) == len(steps) and all(v.polled and v.up for v in stepped)
    shares = [v.catch_up.share for v in stepped if v.catch_up is not None]
    assert shares == sorted(shares) and 0 < shares[0] < 1
    assert [v.cursor for v in stepped] == cursors[:-1]
    assert recorder.views[-1].catch_up is None
    assert poller.ledger is not None
    assert counted(poller.ledger.state.totals) == truth(simulator, poller)
    assert not poller.ledger.state.pending


def test_filters_honoured_only_to_the_day_are_detected_and_the_count_stays_exact(
    workdir: Path,
) -> None:
    now = math.floor(time.time())
    simulator = Simulator(clock=lambda: now, seed=4)
    simulator.created_after_day_precision = True
    populate(simulator, 800, now - 50 * HOUR, now - TIMEOUT - 10, seed=2)
    poller = make_poller(str(workdir / "state.db"), simulator, start_from=50 * HOUR)
    recorder = Recorder(poller)
    assert poller.poll_once()
    assert poller.ledger is not None and poller.ledger.windows.coarse
    assert len(recorder.deltas) >= 2, "whole days, each committed"
    assert counted(poller.ledger.state.totals) == truth(simulator, poller)


def test_a_failure_mid_catch_up_keeps_the_committed_steps(workdir: Path) -> None:
    now = math.floor(time.time())
    simulator = Simulator(clock=lambda: now, seed=5)
    populate(simulator, 2000, now - 2 * HOUR, now - TIMEOUT - 10, seed=3)
    state = str(workdir / "state.db")
    poller = make_poller(state, simulator, start_from=2 * HOUR + 60)
    recorder = Recorder(poller)

    def fail_later(_: PollDelta) -> None:
        if len(recorder.deltas) == 5:
            simulator.set_outage(True)  # every request from now on fails

    hooks(poller).after.append(fail_later)
    assert not poller.poll_once()
    assert len(recorder.deltas) == 5
    assert not poller.view.up and poller.view.polled
    assert poller.view.cursor == recorder.deltas[-1].cursor
    poller.store.close()
    # The next process goes on from the last committed step, not from the start.
    simulator.set_outage(False)
    again = make_poller(state, simulator, start_from=2 * HOUR + 60)
    assert again.ledger is not None and again.ledger.state.cursor == recorder.deltas[-1].cursor
    listed_before = simulator.list_requests
    assert again.poll_once()
    assert counted(again.ledger.state.totals) == truth(simulator, again)
    requests_after = simulator.list_requests - listed_before
    assert requests_after < 2000 / 25, "the committed steps are not listed again"


def test_traffic_denser_than_the_last_window_cuts_the_window(workdir: Path) -> None:
    now = math.floor(time.time())
    simulator = Simulator(clock=lambda: now, seed=6)
    populate(simulator, 30, now - 2 * HOUR, now - HOUR, seed=4)
    populate(simulator, 1500, now - HOUR, now - HOUR + 120, seed=5)  # a burst of two minutes
    poller = make_poller(str(workdir / "state.db"), simulator, start_from=2 * HOUR + 60)
    cuts: list[int] = []
    assert poller.ledger is not None
    windows = poller.ledger.windows
    real_too_large = windows.too_large

    class Watched(Windows):
        def too_large(self, new: int, span: float) -> bool:
            windows.seconds = self.seconds
            cut = real_too_large(new, span)
            if cut:
                cuts.append(new)
            self.seconds = windows.seconds
            return cut

    watched = Watched(seconds=3600.0)  # sized for the sparse hour: the burst is far denser
    windows.seconds = watched.seconds
    poller.ledger.windows = watched
    recorder = Recorder(poller)
    assert poller.poll_once()
    assert cuts and all(n <= catchup.STEP_MAX_RECORDS + 25 for n in cuts)
    assert all(d.new_messages <= catchup.STEP_MAX_RECORDS + 25 for d in recorder.deltas)
    assert counted(poller.ledger.state.totals) == truth(simulator, poller)


def test_a_window_beyond_the_history_limit_moves_to_what_is_left(workdir: Path) -> None:
    now = math.floor(time.time())
    simulator = Simulator(clock=lambda: now, seed=7)
    simulator.history_limit = 2 * HOUR
    populate(simulator, 1000, now - 2 * HOUR + 60, now - TIMEOUT - 10, seed=6)
    poller = make_poller(str(workdir / "state.db"), simulator, start_from=5 * HOUR)
    recorder = Recorder(poller)
    assert poller.poll_once()
    assert len(recorder.deltas) > 2
    assert poller.ledger is not None
    assert counted(poller.ledger.state.totals) == truth(simulator, poller)


class ScriptedWindows(Windows):
    """Windows of lengths drawn by the test, whatever the density (an empty window that cannot
    be trusted still grows, as it must to end)."""

    def __init__(self, lengths: list[float]) -> None:
        super().__init__(seconds=lengths[0])
        self.lengths = lengths
        self.index = 0
        self.scale = 1.0

    def end(self, cursor: float, reach: float, caught_up: float) -> float | None:
        self.seconds = self.lengths[self.index % len(self.lengths)] * self.scale
        self.index += 1
        return super().end(cursor, reach, caught_up)

    def grow(self) -> None:
        self.scale *= 8

    def stepped(self, new: int, span: float) -> None:
        self.scale = 1.0

    def too_large(self, new: int, span: float) -> bool:
        return False


@settings(max_examples=100)
@given(
    seed=st.integers(0, 2**16),
    lengths=st.lists(st.floats(20.0, 4000.0), min_size=1, max_size=6),
    order=st.sampled_from(["newest", "oldest", "arbitrary"]),
    after_inclusive=st.booleans(),
    before_inclusive=st.booleans(),
    kills=st.lists(st.integers(1, 12), max_size=4),
)
def test_any_windows_any_bounds_and_restarts_between_steps_count_exactly_once(
    seed: int,
    lengths: list[float],
    order: str,
    after_inclusive: bool,
    before_inclusive: bool,
    kills: list[int],
) -> None:
    now = math.floor(time.time())
    simulator = Simulator(clock=lambda: now, seed=seed)
    simulator.list_order = order
    simulator.created_after_inclusive = after_inclusive
    simulator.created_before_inclusive = before_inclusive
    populate(simulator, 300, now - HOUR, now - TIMEOUT - 10, seed=seed)
    # Some messages share a second, on and around window boundaries alike.
    rng = random.Random(seed)
    for _ in range(60):
        second = math.floor(now - rng.uniform(10, HOUR))
        simulator.add_message(
            PID,
            direction="inbound",
            kind="sms",
            created_at=second,
            segments=1,
            timeline=[Step(0, "received", charge=0.0075)],
        )
    with tempfile.TemporaryDirectory() as workdir:
        state = str(Path(workdir) / "state.db")
        last_cursor = -math.inf
        for kill_after in [*kills, None]:
            poller = make_poller(state, simulator, start_from=HOUR + 60)
            assert poller.ledger is not None
            assert poller.ledger.state.cursor >= last_cursor, "a restart never goes back"
            poller.ledger.windows = ScriptedWindows(lengths)
            commits: list[Any] = []

            def kill(
                _: PollDelta, limit: int | None = kill_after, done: list[Any] = commits
            ) -> None:
                if limit is not None and len(done) >= limit:
                    raise Killed  # the process dies here: nothing more is committed

            hooks(poller).before.append(kill)
            hooks(poller).after.append(lambda delta, done=commits: done.append(delta.cursor))
            try:
                finished = poller.poll_once()
            except Killed:
                finished = False
            if commits:
                last_cursor = commits[-1]
            poller.store.close()
            if finished:
                break
        else:
            raise AssertionError("the last run has no kill")
        assert counted(poller.ledger.state.totals) == truth(simulator, poller)


class Killed(BaseException):
    """Stands for SIGKILL: nothing catches it."""
