"""The real daemon, as a subprocess, against the simulator over HTTP: counts equal ground truth."""

from __future__ import annotations

import math
import random
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from exporter.simulator import (
    SimMessage,
    Simulator,
    SimulatorServer,
    Step,
    TrafficGenerator,
    TrafficProfile,
)
from tests.helpers import (
    Daemon,
    Samples,
    Totals,
    dimension_truth,
    exported_dimension,
    exported_totals,
    ground_truth,
    own_of,
    pending_total,
    remote_of,
    select,
    sums_agree,
    true_country,
    wait_for,
    write_config,
)

TIMEOUT = 4.0  # settle.timeout of these tests
START_FROM = 30.0
PROFILE = TrafficProfile(max_delay=1.5, never_receipted=0.08)
PROJECTS = {
    "alpha": ("11111111-aaaa", "PTalpha-secret-token"),
    "beta": ("22222222-bbbb", "PTb-tok"),
}
GROUPS = {"otp": ["+15551230000", "+15551230001"], "marketing": ["72345"]}
GROUP_OF = {number: name for name, numbers in GROUPS.items() for number in numbers}


@pytest.fixture
def sim() -> Iterator[tuple[Simulator, str]]:
    simulator = Simulator(seed=3)
    # The awkward forms of what the API leaves unconfirmed: next links without the filters, page
    # tokens that do not carry them either, newest-first offset pages that shift under inserts.
    simulator.next_link_keeps_filters = False
    simulator.token_encodes_filters = False
    simulator.list_order = "newest"
    for project_id, token in PROJECTS.values():
        simulator.add_project(project_id, token)
    with SimulatorServer(simulator) as server:
        yield simulator, server.base_url


def config_for(tmp_path: Path, base_url: str, **settings: object) -> Path:
    projects = [
        {"name": name, "space": base_url, "project_id": pid, "api_token": token}
        for name, (pid, token) in PROJECTS.items()
    ]
    values: dict[str, object] = {
        "poll_interval": "1s",
        "start_from": f"{int(START_FROM)}s",
        "state_path": "state/exporter.db",
        "settle": {"timeout": f"{int(TIMEOUT)}s"},
        "request": {"timeout": "1s", "page_size": 3},
        "number_groups": GROUPS,
    }
    values.update(settings)
    return write_config(tmp_path / "config.yaml", projects, **values)


def exported(samples: Samples, project: str) -> Totals:
    return exported_totals(samples, project)


def expected(simulator: Simulator, project: str, start_point: float) -> Totals:
    return ground_truth(simulator, PROJECTS[project][0], start_point, TIMEOUT)


def pending(samples: Samples, project: str) -> float:
    return pending_total(samples, project)


def settled_exactly(daemon: Daemon, simulator: Simulator, start_point: float) -> bool:
    """Nothing pending; every counter, by error code, country and number group, equal to the
    ground truth label set by label set; and the sums of the last two those of the first."""
    samples = daemon.scrape()
    for p in PROJECTS:
        assert sums_agree(samples, p), p
    return all(
        pending(samples, p) == 0
        and exported(samples, p) == expected(simulator, p, start_point)
        and dimension(samples, "country", simulator, p, start_point)
        and dimension(samples, "number_group", simulator, p, start_point)
        for p in PROJECTS
    )


def dimension(
    samples: Samples, name: str, simulator: Simulator, project: str, start_point: float
) -> bool:
    def by(message: SimMessage) -> str:
        if name == "country":
            return true_country(remote_of(message))
        return GROUP_OF.get(own_of(message), "ungrouped")

    want = dimension_truth(simulator, PROJECTS[project][0], start_point, TIMEOUT, by)
    have = exported_dimension(samples, project, name)
    return have.keys() == want.keys() and all(
        have[k][0] == want[k][0] and math.isclose(have[k][1], want[k][1], abs_tol=1e-9)
        for k in want
    )


def seed_scripted_messages(simulator: Simulator, now: float) -> None:
    """Hand-written cases: each shape the counting rules must get right."""
    alpha, beta = PROJECTS["alpha"][0], PROJECTS["beta"][0]
    c = 0.00415
    # Created before the start point: never counted.
    simulator.add_message(
        alpha,
        direction="outbound-api",
        kind="sms",
        created_at=now - 2 * START_FROM,
        segments=1,
        timeline=[Step(0, "delivered", charge=c)],
    )
    # Created before the daemon starts, after the start point: counted.
    simulator.add_message(
        alpha,
        direction="outbound-api",
        kind="sms",
        created_at=now - START_FROM / 2,
        segments=2,
        timeline=[Step(0, "delivered", charge=2 * c)],
    )
    # Status changing after first sight: sent now, delivered in 2.5 s.
    simulator.add_message(
        alpha,
        direction="outbound-api",
        kind="sms",
        created_at=now,
        segments=1,
        timeline=[Step(0, "sent", charge=c), Step(2.5, "delivered", charge=c)],
    )
    # MMS stays sent for good: settles at sent.
    simulator.add_message(
        beta,
        direction="outbound-api",
        kind="mms",
        created_at=now,
        segments=1,
        timeline=[Step(0, "queued"), Step(1, "sent", charge=0.015)],
    )
    # An SMS whose receipt never comes: settles as sent after settle.timeout.
    simulator.add_message(
        beta,
        direction="outbound-reply",
        kind="sms",
        created_at=now,
        segments=3,
        timeline=[Step(0, "queued"), Step(0.5, "sent", charge=3 * c)],
    )
    # Failure with an error code, after first being seen queued.
    simulator.add_message(
        beta,
        direction="outbound-api",
        kind="sms",
        created_at=now,
        segments=1,
        timeline=[Step(0, "queued"), Step(2, "undelivered", "30007", "Carrier filtering", c)],
    )
    simulator.add_message(
        alpha,
        direction="inbound",
        kind="sms",
        created_at=now,
        segments=1,
        timeline=[Step(0, "received", charge=c)],
    )


def test_counts_equal_ground_truth(sim: tuple[Simulator, str], tmp_path: Path) -> None:
    simulator, base_url = sim
    now = math.floor(time.time())
    seed_scripted_messages(simulator, now)
    traffic = [
        TrafficGenerator(simulator, pid, rate=15, profile=PROFILE, seed=i)
        for i, (pid, _) in enumerate(PROJECTS.values())
    ]
    before = time.time()
    daemon = Daemon(config_for(tmp_path, base_url), tmp_path).start()
    start_point = before - START_FROM
    try:
        for t in traffic:
            t.start()
        # Statuses move while the daemon watches: pending messages show under their status.
        wait_for(lambda: pending(daemon.scrape(), "alpha") > 0, 10, "pending messages")
        wait_for(lambda: sum(t.created for t in traffic) >= 120, 30, "traffic")
    finally:
        for t in traffic:
            t.stop()
    wait_for(
        lambda: settled_exactly(daemon, simulator, start_point),
        30,
        f"exact counts\n{daemon.log()}",
        interval=0.3,
    )
    samples = daemon.scrape()
    alpha = exported(samples, "alpha")
    beta = exported(samples, "beta")
    assert alpha[("outbound-api", "sms", "delivered", "")][0] >= 2
    assert beta[("outbound-api", "mms", "sent", "")][0] >= 1
    assert beta[("outbound-reply", "sms", "sent", "")][0] >= 1
    assert beta[("outbound-api", "sms", "undelivered", "30007")][0] >= 1
    assert sum(v[0] for v in alpha.values()) == sum(
        1 for m in simulator.messages(PROJECTS["alpha"][0]) if m.created_at >= start_point
    )
    info = select(samples, "signalwire_message_error_info", project="beta", error_code="30007")
    assert info, "error description exported"
    assert select(samples, "signalwire_up", project="alpha") == {
        frozenset({("project", "alpha")}): 1.0
    }
    ratio = select(samples, "signalwire_message_failure_ratio", project="beta", kind="sms")
    assert ratio and all(0 <= v <= 1 for v in ratio.values())
    assert select(samples, "signalwire_api_requests_total", project="alpha", code="200")
    landing = requests.get(f"{daemon.url}/", timeout=5).text
    assert "alpha" in landing and "beta" in landing
    for _, token in PROJECTS.values():
        assert token not in landing
        assert token not in requests.get(f"{daemon.url}/metrics", timeout=5).text
        assert token not in daemon.log()
    assert daemon.terminate() == 0
    assert "Traceback" not in daemon.log()


def test_kill_9_mid_traffic_loses_and_doubles_nothing(
    sim: tuple[Simulator, str], tmp_path: Path
) -> None:
    simulator, base_url = sim
    config = config_for(tmp_path, base_url)
    traffic = [
        TrafficGenerator(simulator, pid, rate=20, profile=PROFILE, seed=10 + i)
        for i, (pid, _) in enumerate(PROJECTS.values())
    ]
    before = time.time()
    daemon = Daemon(config, tmp_path).start()
    start_point = before - START_FROM
    rng = random.Random(5)
    last_seen: Samples = {}

    def check_monotonic(samples: Samples) -> None:
        for key, value in samples.items():
            name = key[0]
            if name.startswith(
                ("signalwire_messages_total", "signalwire_message_")
            ) and name.endswith("_total"):
                assert value >= last_seen.get(key, 0), f"{key} went down across a restart"
        last_seen.update({k: v for k, v in samples.items() if k[0].endswith("_total")})

    try:
        for t in traffic:
            t.start()
        for _ in range(4):
            wait_for(daemon.scrape, 5, "a scrape")
            check_monotonic(daemon.scrape())
            time.sleep(rng.uniform(0.2, 1.5))  # a random instant to kill at, not a synchronisation
            daemon.kill()
            daemon = Daemon(config, tmp_path).start()
            check_monotonic(daemon.scrape())
    finally:
        for t in traffic:
            t.stop()
    wait_for(
        lambda: settled_exactly(daemon, simulator, start_point),
        40,
        f"exact counts after kills\n{daemon.log()}",
        interval=0.3,
    )
    check_monotonic(daemon.scrape())
    assert daemon.terminate() == 0


def test_faults_and_outage_lose_and_double_nothing(
    sim: tuple[Simulator, str], tmp_path: Path
) -> None:
    simulator, base_url = sim
    traffic = [
        TrafficGenerator(simulator, pid, rate=10, profile=PROFILE, seed=20 + i)
        for i, (pid, _) in enumerate(PROJECTS.values())
    ]
    before = time.time()
    daemon = Daemon(config_for(tmp_path, base_url), tmp_path).start()
    start_point = before - START_FROM

    def requests_with(code: str) -> float:
        return sum(select(daemon.scrape(), "signalwire_api_requests_total", code=code).values())

    def up(project: str) -> float:
        return select(daemon.scrape(), "signalwire_up", project=project)[
            frozenset({("project", project)})
        ]

    try:
        for t in traffic:
            t.start()
        simulator.fail_next(5, 503)
        wait_for(lambda: requests_with("503") >= 5, 15, "5xx burst served")
        simulator.rate_limit_next(2, retry_after=1)
        wait_for(lambda: requests_with("429") >= 2, 15, "429s served")
        simulator.delay_next(2, 1.6)  # longer than request.timeout
        wait_for(lambda: requests_with("error") >= 2, 15, "timeouts")
        simulator.set_outage(True, "503")
        wait_for(lambda: up("alpha") == 0 and up("beta") == 0, 20, "up == 0 in the outage")
        outage_landing = requests.get(f"{daemon.url}/", timeout=5).text
        assert "down" in outage_landing
        simulator.set_outage(False)
        wait_for(lambda: up("alpha") == 1 and up("beta") == 1, 20, "up == 1 after the outage")
        simulator.set_outage(True, "reset")
        wait_for(lambda: up("alpha") == 0, 20, "up == 0 with connections reset")
        simulator.set_outage(False)
        wait_for(lambda: up("alpha") == 1, 20, "up == 1 again")
    finally:
        for t in traffic:
            t.stop()
    wait_for(
        lambda: settled_exactly(daemon, simulator, start_point),
        40,
        f"exact counts after faults\n{daemon.log()}",
        interval=0.3,
    )
    assert daemon.terminate() == 0
    assert "Traceback" not in daemon.log()


def test_restart_continues_counters(sim: tuple[Simulator, str], tmp_path: Path) -> None:
    simulator, base_url = sim
    now = math.floor(time.time())
    for i in range(12):
        simulator.add_message(
            PROJECTS["alpha"][0],
            direction="outbound-api",
            kind="sms",
            created_at=now - i,
            segments=1,
            timeline=[Step(0, "delivered", charge=0.01)],
        )
    config = config_for(tmp_path, base_url)
    daemon = Daemon(config, tmp_path).start()
    key = (
        "signalwire_messages_total",
        frozenset(
            {
                ("project", "alpha"),
                ("direction", "outbound-api"),
                ("kind", "sms"),
                ("status", "delivered"),
                ("error_code", ""),
            }
        ),
    )
    wait_for(lambda: daemon.scrape().get(key) == 12, 10, "12 delivered")
    insight = insight_counters(daemon.scrape())
    assert (
        sum(v for (name, _), v in insight.items() if name.startswith("signalwire_messages")) == 24
    )
    assert daemon.terminate() == 0
    simulator.add_message(
        PROJECTS["alpha"][0],
        direction="outbound-api",
        kind="sms",
        created_at=math.floor(time.time()),
        segments=1,
        timeline=[Step(0, "delivered", charge=0.01)],
    )
    daemon = Daemon(config, tmp_path).start()
    restarted = daemon.scrape()
    assert restarted[key] >= 12  # continues, no reset
    assert all(restarted[k] >= v for k, v in insight.items())  # so do those by country and group
    wait_for(lambda: daemon.scrape().get(key) == 13, 10, "13 delivered after restart")
    assert sums_agree(daemon.scrape(), "alpha")
    assert daemon.terminate() == 0


def insight_counters(samples: Samples) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        k: v for k, v in samples.items() if "_by_country_" in k[0] or "_by_number_group_" in k[0]
    }
