"""A carrier's receipt delay, then its receipts all at once: the real daemon over HTTP holds a large
pending set (every age below settle.timeout), sees the burst within a few polls, whatever the
messages' age, and ends with every counter exact."""

from __future__ import annotations

import math
import random
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from exporter.simulator import Simulator, SimulatorServer, Step
from tests.helpers import (
    Daemon,
    exported_totals,
    ground_truth,
    pending_total,
    wait_for,
    write_config,
)

PROJECT_ID, TOKEN = "burst-project", "PTburst"
MESSAGES = 12_000
POLL = 5.0
TIMEOUT = 7200.0
# Seen within a few polls: the recent tier's period (at most five polls here), then a poll that
# lists the rest, and a poll's slack on either side.
SETTLE_POLLS = 9


@pytest.fixture
def sim() -> Iterator[tuple[Simulator, str]]:
    simulator = Simulator(seed=21)
    simulator.add_project(PROJECT_ID, TOKEN)
    with SimulatorServer(simulator) as server:
        yield simulator, server.base_url


def withheld(simulator: Simulator, now: float, youngest: float, oldest: float) -> None:
    """MESSAGES outbound SMS created between `oldest` and `youngest` seconds ago, all `sent`, their
    receipts withheld."""
    rng = random.Random(3)
    for i in range(MESSAGES):
        age = youngest + (oldest - youngest) * i / MESSAGES
        simulator.add_message(
            PROJECT_ID,
            direction="outbound-api",
            kind="sms",
            created_at=now - age,
            segments=rng.choice((1, 1, 2)),
            timeline=[Step(0, "queued"), Step(1, "sent", charge=0.0083)],
        )


def release(simulator: Simulator, now: float) -> None:
    """Every receipt arrives now: nine in ten delivered, the rest undelivered with an error."""
    rng = random.Random(4)
    with simulator._lock:
        for message in simulator.messages(PROJECT_ID):
            at = math.ceil(now - message.created_at)
            if rng.random() < 0.9:
                message.timeline.append(Step(at, "delivered", charge=0.0083))
            else:
                message.timeline.append(
                    Step(at, "undelivered", "30003", "Unreachable destination handset", 0.0083)
                )


@pytest.mark.parametrize(
    "youngest, oldest",
    [(60.0, 3600.0), (900.0, 5400.0)],
    ids=["recent-and-old", "all-past-the-recent-tier"],
)
def test_a_burst_of_receipts_settles_within_a_few_polls_whatever_the_age(
    sim: tuple[Simulator, str], tmp_path: Path, youngest: float, oldest: float
) -> None:
    simulator, base_url = sim
    withheld(simulator, time.time(), youngest, oldest)
    config = write_config(
        tmp_path / "config.yaml",
        [{"name": "burst", "space": base_url, "project_id": PROJECT_ID, "api_token": TOKEN}],
        poll_interval=f"{POLL:g}s",
        start_from="3h",
        state_path=str(tmp_path / "state.db"),
        settle={"timeout": f"{TIMEOUT:g}s"},
        request={"page_size": 1000},
    )
    daemon = Daemon(config, tmp_path).start()
    wait_for(lambda: pending_total(daemon.scrape(), "burst") == MESSAGES, 120, "all pending", 0.5)
    released = time.time()
    release(simulator, released)
    truth = ground_truth(simulator, PROJECT_ID, 0.0, TIMEOUT)

    def settled() -> bool:
        samples = daemon.scrape()
        return pending_total(samples, "burst") == 0 and exported_totals(samples, "burst") == truth

    wait_for(settled, SETTLE_POLLS * POLL + 30, "every receipt counted", 0.5)
    took = time.time() - released
    print(
        f"\n{MESSAGES:,} receipts settled {took:.1f} s after they arrived ({took / POLL:.1f} polls)"
    )
    assert took <= SETTLE_POLLS * POLL, f"{took:.1f} s: more than {SETTLE_POLLS} polls"
    assert daemon.terminate() == 0
