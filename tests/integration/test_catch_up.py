"""A large backlog against the real daemon over HTTP: a first start whose start_from covers
200,000 messages, taken in while a fifth of SignalWire's answers are 503, with a SIGKILL half way.
The daemon is ready within seconds, the cursor moves only forward across the kill, and once caught
up every counter equals the ground truth."""

from __future__ import annotations

import math
import random
import time
from collections.abc import Iterator
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest

from exporter.simulator import Simulator, SimulatorServer, Step
from tests.helpers import (
    Daemon,
    Samples,
    exported_totals,
    ground_truth,
    pending_total,
    select,
    wait_for,
    write_config,
)

PID, TOKEN = "backlog-project", "PTbacklog-token"
QUIET_PID, QUIET_TOKEN = "quiet-project", "PTquiet-token"
BACKLOG = 200_000
SPAN = 6 * 3600.0
SETTLE_TIMEOUT = 600.0


@pytest.fixture(scope="module")
def api() -> Iterator[tuple[Simulator, str, float]]:
    now = math.floor(time.time())
    simulator = Simulator(seed=21)
    simulator.add_project(PID, TOKEN)
    simulator.add_project(QUIET_PID, QUIET_TOKEN)
    rng = random.Random(22)
    since = now - SPAN
    # Settled long ago, or a second old: every outcome; some messages share a second.
    for _ in range(BACKLOG):
        created = since + rng.random() * (SPAN - SETTLE_TIMEOUT - 60)
        r = rng.random()
        if r < 0.6:
            timeline = [Step(0, "queued"), Step(2, "delivered", charge=0.0079)]
        elif r < 0.7:
            timeline = [Step(0, "queued"), Step(2, "undelivered", "30007", "Filtered", 0.0079)]
        elif r < 0.75:
            timeline = [Step(0, "queued"), Step(2, "sent", charge=0.0079)]  # never a receipt
        else:
            timeline = [Step(0, "received", charge=0.0075)]
        simulator.add_message(
            PID,
            direction="inbound" if timeline[0].status == "received" else "outbound-api",
            kind="sms",
            created_at=created,
            segments=1 + (r > 0.95),
            timeline=timeline,
        )
    with SimulatorServer(simulator) as server:
        yield simulator, server.base_url, float(now)


def config_for(tmp_path: Path, now: float, projects: list[dict[str, Any]], **settings: Any) -> Path:
    """A configuration whose first start covers the whole backlog."""
    config = write_config(
        tmp_path / "config.yaml",
        projects,
        start_from=f"{round(time.time() - now + SPAN + 60)}s",
        state_path=str(tmp_path / "state.db"),
        settle={"timeout": f"{round(SETTLE_TIMEOUT)}s"},
        **settings,
    )
    config.chmod(0o600)  # it holds tokens
    return config


def cursor(samples: Samples) -> float:
    values = select(samples, "signalwire_cursor_timestamp_seconds", project="busy")
    return next(iter(values.values()), 0.0)


def test_a_backlog_under_errors_and_a_kill_ends_exact_and_never_goes_back(
    api: tuple[Simulator, str, float], tmp_path: Path
) -> None:
    simulator, base_url, now = api
    busy = {"name": "busy", "space": base_url, "project_id": PID, "api_token": TOKEN}
    config = config_for(tmp_path, now, [busy], poll_interval="5s")
    simulator.set_error_rate(0.2)
    try:
        daemon = Daemon(config, tmp_path)
        began = time.monotonic()
        daemon.start()  # waits for /-/ready: the first step, not the whole backlog
        ready_after = time.monotonic() - began
        assert ready_after < 20, f"ready after {ready_after:.1f} s"

        # Half way (by the cursor), kill -9: the last cursor published is the floor.
        def half_way() -> float | None:
            at = cursor(daemon.scrape())
            return at if at >= now - SPAN / 2 else None

        published = wait_for(half_way, 300, f"half way through the backlog\n{daemon.log()}")
        daemon.kill()
        restarted = Daemon(config, tmp_path).start()
        first = cursor(restarted.scrape())
        assert first >= published, "the restart goes on from the last committed step"
        seen = [first]

        def caught_up() -> bool:
            samples = restarted.scrape()
            seen.append(cursor(samples))
            return seen[-1] >= time.time() - 120

        wait_for(caught_up, 600, f"caught up\n{restarted.log()}", interval=0.5)
        assert seen == sorted(seen), "the cursor only moves forward"
        simulator.set_error_rate(0.0)
        start_point = now - SPAN - 60  # every message is after it; its exact value is the daemon's
        truth = ground_truth(simulator, PID, start_point, SETTLE_TIMEOUT)

        def exact() -> bool:
            samples = restarted.scrape()
            return pending_total(samples, "busy") == 0 and exported_totals(samples, "busy") == {
                k: (n, s, pytest.approx(c)) for k, (n, s, c) in truth.items()
            }

        wait_for(exact, 120, f"exact counts\n{restarted.log()}", interval=1.0)
        assert sum(n for n, _, _ in truth.values()) == BACKLOG
        errors = select(restarted.scrape(), "signalwire_api_requests_total", code="503")
        assert sum(errors.values()) > 0, "the errors were there"
        assert "catching up" in restarted.log()
        assert restarted.terminate() == 0
    finally:
        simulator.set_error_rate(0.0)


QUIET_POLL = 1.0


def test_one_project_catching_up_never_holds_back_another(
    api: tuple[Simulator, str, float], tmp_path: Path
) -> None:
    _, base_url, now = api
    busy = {"name": "busy", "space": base_url, "project_id": PID, "api_token": TOKEN}
    quiet = {"name": "quiet", "space": base_url, "project_id": QUIET_PID, "api_token": QUIET_TOKEN}
    # Polled every second, so that even a fast catch-up spans several of the quiet project's polls.
    config = config_for(tmp_path, now, [busy, quiet], poll_interval=f"{QUIET_POLL:g}s")
    daemon = Daemon(config, tmp_path).start()
    successes: list[float] = []
    deadline = time.monotonic() + 600

    def quiet_polls_while_busy_catches_up() -> bool:
        samples = daemon.scrape()
        last = select(samples, "signalwire_last_successful_poll_timestamp_seconds", project="quiet")
        if last:
            value = next(iter(last.values()))
            if not successes or value != successes[-1]:
                successes.append(value)
        return cursor(samples) >= time.time() - 120 or time.monotonic() > deadline

    wait_for(quiet_polls_while_busy_catches_up, 620, "caught up", interval=0.2)
    assert cursor(daemon.scrape()) >= time.time() - 120, daemon.log()
    assert len(successes) >= 5, "the catch-up lasts several of the quiet project's polls"
    gaps = [b - a for a, b in pairwise(successes)]
    assert max(gaps) <= QUIET_POLL + 2.0, f"the quiet project's polls kept their interval: {gaps}"
    assert daemon.terminate() == 0
