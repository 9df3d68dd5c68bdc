"""A burst of delayed receipts, polled in-process against the simulator on a clock of the test's
own: the capped listings of older pending messages follow one another within a poll."""

from __future__ import annotations

import dataclasses
import functools
import threading
from pathlib import Path

from exporter.config import Config, ProjectConfig, SettleConfig
from exporter.poller import Counters, ProjectPoller, poll_client
from exporter.simulator import Simulator, SimulatorAdapter, Step
from exporter.store import Store

PID, TOKEN = "p-burst", "PTburst-token"
BASE = "http://simulator.invalid"
START = 1_767_225_600.0
MESSAGES = 600


def test_after_a_burst_of_receipts_one_poll_lists_the_capped_ranges_one_after_another(
    tmp_path: Path,
) -> None:
    now = [START]
    simulator = Simulator(clock=lambda: now[0], seed=1)
    simulator.add_project(PID, TOKEN)
    for i in range(MESSAGES):  # sent 20 to 70 minutes ago, their receipts withheld
        simulator.add_message(
            PID,
            direction="outbound-api",
            kind="sms",
            created_at=START - 1200 - 5 * i,
            segments=1,
            timeline=[Step(0, "sent", charge=0.01)],
        )
    project = ProjectConfig("burst", BASE, PID, TOKEN, None)
    config = Config(
        projects=(project,),
        poll_interval=10.0,
        state_path=str(tmp_path / "state.db"),
        start_from=7200.0,
        settle=SettleConfig(timeout=7200.0),
        request_timeout=1.0,
        page_size=10,
    )
    connect = functools.partial(poll_client, adapter=SimulatorAdapter(simulator, BASE))
    poller = ProjectPoller(
        project,
        config,
        Store(config.state_path),
        Counters(),
        threading.Event(),
        clock=lambda: now[0],
        connect=connect,
    )
    poller.load()
    assert poller.ledger is not None
    # A refresh listing takes at most 100 records (10 pages): the 600 take six.
    poller.ledger.rules = dataclasses.replace(poller.ledger.rules, refresh_records=100)
    assert poller.poll_once() and poller.view.pending_total == MESSAGES
    with simulator._lock:
        for message in simulator.messages(PID):
            message.timeline.append(Step(now[0] - message.created_at + 1, "delivered"))
    settled_per_poll = []
    while poller.view.pending_total:
        assert len(settled_per_poll) < 20, f"still pending after: {settled_per_poll}"
        now[0] += 10
        before = poller.view.pending_total
        assert poller.poll_once()
        settled_per_poll.append(before - poller.view.pending_total)
    # Polls see nothing until one gets a message whose receipt came (a probe); the next poll
    # lists all the rest, 100 records a listing.
    first = next(i for i, n in enumerate(settled_per_poll) if n)
    assert settled_per_poll[first:] == [1, MESSAGES - 1], settled_per_poll
    delivered = poller.view.totals[("outbound-api", "sms", "delivered", "")]
    assert delivered.messages == MESSAGES
