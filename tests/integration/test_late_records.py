"""Records that SignalWire's log shows late (up to 150 s after their created_at, behind the cursor):
the real daemon over HTTP counts each exactly once, every counter ends exact per label set, and
signalwire_late_records_total says that the log lagged."""

from __future__ import annotations

import math
import random
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from exporter.simulator import (
    Simulator,
    SimulatorServer,
    TrafficGenerator,
    TrafficProfile,
    random_message_args,
)
from tests.helpers import (
    Daemon,
    Samples,
    dimension_truth,
    exported_dimension,
    exported_totals,
    ground_truth,
    pending_total,
    remote_of,
    select,
    sums_agree,
    true_country,
    wait_for,
    write_config,
)

TIMEOUT = 4.0
START_FROM = 300.0
LATEST = 150.0  # the latest a record shows, after its created_at
PROFILE = TrafficProfile(max_delay=1.5, never_receipted=0.05)
LIVE = TrafficProfile(max_delay=1.5, never_receipted=0.05, late=0.3, max_lateness=60.0)
PROJECTS = {"north": ("late-north", "PTnorth"), "south": ("late-south", "PTsouth")}


@pytest.fixture
def sim() -> Iterator[tuple[Simulator, str]]:
    simulator = Simulator(seed=15)
    simulator.next_link_keeps_filters = False
    simulator.list_order = "newest"
    for project_id, token in PROJECTS.values():
        simulator.add_project(project_id, token)
    with SimulatorServer(simulator) as server:
        yield simulator, server.base_url


def backdate(simulator: Simulator, now: float, rng: random.Random) -> int:
    """200 messages a project over the last 200 s; a third show 150 s after their created_at at
    the latest, most of them 5-40 s after the daemon starts. Returns how many show after it
    started though created well behind where its first poll leaves the cursor (30 s before)."""
    behind = 0
    for project_id, _ in PROJECTS.values():
        for i in range(200):
            created = math.floor(now - rng.uniform(0, 200))
            shows = 0.0
            if i % 3 == 0:
                shows = min(LATEST, now - created + rng.uniform(5, 40))
            if i == 0:
                created, shows = math.floor(now - 140), LATEST  # shows 10 s after the start
            behind += created < now - 40 and created + shows > now + 4
            simulator.add_message(
                project_id,
                created_at=created,
                appears_after=shows,
                **random_message_args(rng, PROFILE),
            )
    return behind


def exact(samples: Samples, simulator: Simulator, start_point: float) -> bool:
    for project, (project_id, _) in PROJECTS.items():
        if pending_total(samples, project) or exported_totals(samples, project) != ground_truth(
            simulator, project_id, start_point, TIMEOUT
        ):
            return False
        for name, by in (
            ("country", lambda m: true_country(remote_of(m))),
            ("number_group", lambda m: "ungrouped"),
        ):
            want = dimension_truth(simulator, project_id, start_point, TIMEOUT, by)
            have = exported_dimension(samples, project, name)
            if have.keys() != want.keys() or any(
                have[k][0] != want[k][0] or not math.isclose(have[k][1], want[k][1], abs_tol=1e-9)
                for k in want
            ):
                return False
    return True


def test_records_up_to_150_s_late_are_counted_once(
    sim: tuple[Simulator, str], tmp_path: Path
) -> None:
    simulator, base_url = sim
    rng = random.Random(15)
    now = time.time()
    behind = backdate(simulator, now, rng)
    config = write_config(
        tmp_path / "config.yaml",
        [
            {"name": name, "space": base_url, "project_id": pid, "api_token": token}
            for name, (pid, token) in PROJECTS.items()
        ],
        poll_interval="1s",
        start_from=f"{int(START_FROM)}s",
        state_path="state.db",
        max_ingestion_delay="3m",
        settle={"timeout": f"{int(TIMEOUT)}s"},
        request={"timeout": "2s", "page_size": 1000},
    )
    start_point = now - START_FROM
    daemon = Daemon(config, tmp_path).start()
    traffic = [
        TrafficGenerator(simulator, pid, rate=4, profile=LIVE, seed=20 + i)
        for i, (pid, _) in enumerate(PROJECTS.values())
    ]
    try:
        for t in traffic:
            t.start()
        wait_for(lambda: sum(t.created for t in traffic) >= 120, 40, "live traffic")
    finally:
        for t in traffic:
            t.stop()
    last_shows = max(m.appears_at for p, _ in PROJECTS.values() for m in simulator.messages(p))
    wait_for(lambda: time.time() > last_shows, LATEST + 10, "every record shown")
    wait_for(
        lambda: exact(daemon.scrape(), simulator, start_point),
        90,
        f"exact counts\n{daemon.log()[-3000:]}",
        interval=0.5,
    )
    samples = daemon.scrape()
    for project in PROJECTS:
        assert sums_agree(samples, project)
        late = select(samples, "signalwire_late_records_total", project=project)
        assert late and 0 < sum(late.values()) <= len(simulator.messages(PROJECTS[project][0]))
    total_late = sum(select(samples, "signalwire_late_records_total").values())
    assert total_late >= behind > 50
    assert "records appeared late" in daemon.log_path.read_text()
    assert daemon.terminate() == 0
    assert "Traceback" not in daemon.log()
