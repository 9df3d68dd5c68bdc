"""Every fault the API can throw, one after another, against the real daemon: after each fault
clears, every counter equals the simulator's ground truth exactly."""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from exporter.simulator import Simulator, SimulatorServer, Step, TrafficProfile, random_message_args
from tests.helpers import Daemon, Samples, select, wait_for
from tests.integration.test_daemon import PROJECTS, config_for, expected, exported, pending

PROFILE = TrafficProfile(max_delay=1.0, never_receipted=0.1, undelivered=0.1, failed=0.1)
START_FROM = 30.0


@pytest.fixture
def sim() -> Iterator[tuple[Simulator, str]]:
    simulator = Simulator(seed=17)
    simulator.next_link_keeps_filters = False
    simulator.token_encodes_filters = False
    for project_id, token in PROJECTS.values():
        simulator.add_project(project_id, token)
    with SimulatorServer(simulator) as server:
        yield simulator, server.base_url


def add_batch(simulator: Simulator, rng: random.Random, count: int = 8) -> None:
    now = math.floor(time.time())
    for pid, _ in PROJECTS.values():
        for _ in range(count):
            simulator.add_message(pid, created_at=now, **random_message_args(rng, PROFILE))


def requests_with(samples: Samples, code: str) -> float:
    return sum(select(samples, "signalwire_api_requests_total", code=code).values())


def test_counts_stay_exact_through_every_fault(sim: tuple[Simulator, str], tmp_path: Path) -> None:
    simulator, base_url = sim
    rng = random.Random(8)
    before = time.time()
    daemon = Daemon(config_for(tmp_path, base_url), tmp_path).start()
    start_point = before - START_FROM

    def exact() -> bool:
        samples = daemon.scrape()
        return all(
            pending(samples, p) == 0 and exported(samples, p) == expected(simulator, p, start_point)
            for p in PROJECTS
        )

    def step(
        name: str,
        fault: Callable[[], object],
        observed: Callable[[Samples], bool],
        clear: Callable[[], object] = lambda: None,
    ) -> None:
        add_batch(simulator, rng)
        fault()
        wait_for(lambda: observed(daemon.scrape()), 30, f"{name}: fault seen\n{daemon.log()}")
        clear()
        add_batch(simulator, rng)
        wait_for(exact, 30, f"{name}: exact counts after the fault\n{daemon.log()}", interval=0.2)

    base = {code: requests_with(daemon.scrape(), code) for code in ("503", "429", "error", "422")}
    step(
        "5xx burst",
        lambda: simulator.fail_next(6, 503),
        lambda s: requests_with(s, "503") >= base["503"] + 6,
    )
    step(
        "429 with Retry-After",
        lambda: simulator.rate_limit_next(2, retry_after=1),
        lambda s: requests_with(s, "429") >= base["429"] + 2,
    )
    step(
        "429 without Retry-After",
        lambda: simulator.rate_limit_next(2, retry_after=None),
        lambda s: requests_with(s, "429") >= base["429"] + 4,
    )
    step(
        "answers slower than request.timeout",
        lambda: simulator.delay_next(2, 1.5),
        lambda s: requests_with(s, "error") >= base["error"] + 2,
    )
    errors_before = requests_with(daemon.scrape(), "error")

    step(
        "connection resets",
        lambda: simulator.set_outage(True, "reset"),
        lambda s: requests_with(s, "error") >= errors_before + 3,
        clear=lambda: simulator.set_outage(False),
    )
    step(
        "an HTML error page answered with 200",
        lambda: simulator.fail_next(2, 200, "<html><body>Bad gateway</body></html>"),
        lambda s: requests_with(s, "200") > 0,
    )
    step(
        "truncated JSON answered with 200",
        lambda: simulator.fail_next(2, 200, '{"links": {"self": "x"}, "data": [{"id": '),
        lambda s: requests_with(s, "200") > 0,
    )
    invalid = [
        {"id": "no-created-at", "status": "delivered", "direction": "outbound-api", "kind": "sms"},
        {
            "id": "wrong-type",
            "status": "delivered",
            "direction": "outbound-api",
            "kind": "sms",
            "created_at": "2026-01-01T00:00:00Z",
            "number_of_segments": "two",
            "charge": 0.01,
        },
    ]

    def invalid_records(s: Samples) -> float:
        return sum(select(s, "signalwire_invalid_records_total", project="alpha").values())

    step(
        "malformed records",
        lambda: [simulator.add_invalid_record(PROJECTS["alpha"][0], r) for r in invalid],
        lambda s: invalid_records(s) == 2,
    )
    wait_for(lambda: requests_with(daemon.scrape(), "200") > 20, 10, "re-listings")
    assert invalid_records(daemon.scrape()) == 2, "a re-listed malformed record counted again"

    def unknown_values() -> None:
        now = math.floor(time.time())
        pid = PROJECTS["beta"][0]
        for direction, kind, status in (
            ("outbound-magic", "sms", "delivered"),
            ("outbound-api", "whatsapp", "delivered"),
            ("outbound-api", "sms", "accepted"),  # unknown, not final: settles at the timeout
        ):
            simulator.add_message(
                pid,
                direction=direction,
                kind=kind,
                created_at=now,
                segments=1,
                timeline=[Step(0, status, charge=0.01)],
            )

    step(
        "unknown direction, kind and status values",
        unknown_values,
        lambda s: bool(select(s, "signalwire_messages_total", kind="whatsapp")),
    )
    samples = daemon.scrape()
    assert select(samples, "signalwire_messages_total", direction="outbound-magic")
    assert select(samples, "signalwire_messages_total", status="accepted")
    step(
        "page tokens rejected in the middle of listings",
        lambda: simulator.reject_page_tokens(3),
        lambda s: requests_with(s, "422") >= base["422"] + 3,
    )
    step("page tokens invalidated", simulator.invalidate_page_tokens, lambda s: True)
    step(
        "a links.next that repeats",
        lambda: simulator.repeat_next_link(2),
        lambda s: True,
    )
    step(
        "pages with more records than asked",
        lambda: simulator.oversize_pages(4, 5),
        lambda s: True,
    )

    def day_precision() -> None:
        simulator.created_after_day_precision = True

    step("created_after honoured only to the day", day_precision, lambda s: True)
    simulator.created_after_day_precision = False
    step(
        "an outage",
        lambda: simulator.set_outage(True, "503"),
        lambda s: all(v == 0 for v in select(s, "signalwire_up").values()),
        clear=lambda: simulator.set_outage(False),
    )
    wait_for(
        lambda: all(v == 1 for v in select(daemon.scrape(), "signalwire_up").values()),
        30,
        "up again",
    )
    assert daemon.terminate() == 0
    assert "Traceback" not in daemon.log()
