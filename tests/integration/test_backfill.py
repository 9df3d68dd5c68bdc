"""`backfill` over a simulated month, through the real promtool and Prometheus: `increase()` over
past windows equals the simulator's ground truth; then the live daemon continues the totals."""

from __future__ import annotations

import math
import os
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests

from exporter.config import DEFAULT_FINAL_BY_KIND, DEFAULT_FINAL_STATUSES
from exporter.simulator import (
    SimMessage,
    Simulator,
    SimulatorServer,
    TrafficProfile,
    random_message_args,
)
from tests.helpers import (
    ROOT,
    Daemon,
    free_port,
    own_of,
    parse_metrics,
    remote_of,
    select,
    true_country,
    wait_for,
    write_config,
)

DAY = 86400
TIMEOUT = 7200.0
PROJECTS = {"north": ("p-north", "PTnorth-token"), "south": ("p-south", "PTsouth-token")}
PROFILE = TrafficProfile(max_delay=60.0, never_receipted=0.05)
MESSAGES_PER_PROJECT = 10_500
GROUPS = {"+15551230000": "otp", "+15551230001": "otp", "72345": "marketing"}


@pytest.fixture(scope="module")
def month() -> Iterator[tuple[Simulator, str, float]]:
    """Two projects with 30 days of traffic, on a daily curve."""
    simulator = Simulator(seed=30)
    rng = random.Random(30)
    now = math.floor(time.time())
    for project_id, token in PROJECTS.values():
        simulator.add_project(project_id, token)
        for _ in range(MESSAGES_PER_PROJECT):
            while True:  # busier in the day than at night
                created = now - rng.uniform(0, 30 * DAY)
                if rng.random() < 0.35 + 0.65 * math.sin(math.pi * (created % DAY) / DAY):
                    break
            simulator.add_message(
                project_id, created_at=math.floor(created), **random_message_args(rng, PROFILE)
            )
    with SimulatorServer(simulator) as server:
        yield simulator, server.base_url, now


def config(tmp_path: Path, base_url: str) -> Path:
    return write_config(
        tmp_path / "config.yaml",
        [
            {"name": name, "space": base_url, "project_id": pid, "api_token": token}
            for name, (pid, token) in PROJECTS.items()
        ],
        poll_interval="1s",
        state_path="state.db",
        request={"page_size": 1000},
        number_groups={"otp": ["+15551230000", "+15551230001"], "marketing": ["72345"]},
    )


def remote_country(message: SimMessage) -> str:
    return true_country(remote_of(message))


def number_group(message: SimMessage) -> str:
    return GROUPS.get(own_of(message), "ungrouped")


def backfill(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "exporter", "backfill", "--config.file", "config.yaml", *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def truth(
    simulator: Simulator,
    project: str,
    after: float,
    until: float,
    by: Callable[[SimMessage], str] | None = None,
) -> dict[str, int]:
    """Messages created in (after, until], settled, by status (or by `by`)."""
    totals = simulator.expected_totals(
        PROJECTS[project][0],
        final_statuses=DEFAULT_FINAL_STATUSES,
        final_statuses_by_kind=DEFAULT_FINAL_BY_KIND,
        settle_timeout=TIMEOUT,
        start_point=math.floor(after) + 1,
        now=until,
        by=by,
    )
    counts: dict[str, int] = {}
    for (_, _, status, fourth), (count, _, _) in totals.items():
        key = status if by is None else fourth
        counts[key] = counts.get(key, 0) + count
    return counts


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: run `make test` (it installs it)")
    return path


def test_backfilled_month_matches_ground_truth_in_prometheus(
    month: tuple[Simulator, str, float], tmp_path: Path
) -> None:
    simulator, base_url, now = month
    config(tmp_path, base_url)
    result = backfill(
        tmp_path,
        # promtool reads the whole file once per 2-hour block: a coarse step keeps this quick.
        "--from", "30d", "--to", "3h", "--step", "6h",
        "--label", "job=signalwire", "--label", "instance=exporter:9797",
        "--output", "history.om",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert ("%" in result.stderr and "ETA" in result.stderr) or "done" in result.stderr
    assert not (tmp_path / "state.db").exists() or "seeded" not in result.stderr
    text = (tmp_path / "history.om").read_text()
    assert text.endswith("# EOF\n")
    families = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")]
    assert families == [
        "signalwire_messages",
        "signalwire_message_segments",
        "signalwire_message_charge_usd",
        "signalwire_messages_by_country",
        "signalwire_message_charge_usd_by_country",
        "signalwire_messages_by_number_group",
        "signalwire_message_charge_usd_by_number_group",
    ]
    blocks = tmp_path / "data"
    created = subprocess.run(
        [tool("promtool"), "tsdb", "create-blocks-from", "openmetrics", "history.om", str(blocks)],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert created.returncode == 0, created.stderr + created.stdout
    port = free_port()
    log = (tmp_path / "prometheus.log").open("wb")
    (tmp_path / "prometheus.yml").write_text("global: {}\n")
    prometheus = subprocess.Popen(
        [tool("prometheus"), f"--config.file={tmp_path / 'prometheus.yml'}",
         f"--storage.tsdb.path={blocks}", "--storage.tsdb.retention.time=5y",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=log, stderr=log,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: requests.get(f"{url}/-/ready", timeout=2).ok, 60, "Prometheus ready")

        def query(expr: str, at: float, label: str = "status") -> dict[tuple[str, str], float]:
            payload = requests.get(
                f"{url}/api/v1/query", params={"query": expr, "time": str(at)}, timeout=30
            ).json()
            assert payload["status"] == "success", payload
            return {
                (r["metric"].get("project", ""), r["metric"].get(label, "")): float(r["value"][1])
                for r in payload["data"]["result"]
            }

        day_end = math.floor((now - 3 * 3600) / DAY) * DAY  # a midnight before --to
        windows = [(day_end - k * DAY, "1d", DAY) for k in (0, 3, 10, 20)]
        windows += [(day_end - 5 * DAY + 12 * 3600, "6h", 6 * 3600)]
        windows += [(day_end - 2 * DAY, "7d", 7 * DAY)]
        checked = 0
        for at, window, seconds in windows:
            got = query(
                f"sum by (project, status) (increase(signalwire_messages_total[{window}]))", at
            )
            for project in PROJECTS:
                want = truth(simulator, project, at - seconds, at)
                have = {s: v for (p, s), v in got.items() if p == project and v}
                assert have == {s: float(n) for s, n in want.items()}, (project, window, at)
                checked += sum(want.values())
        assert checked > 5000
        # The counters by country and by number group, over a week.
        at = day_end - 2 * DAY
        for label, by in (("country", remote_country), ("number_group", number_group)):
            got = query(
                f"sum by (project, {label}) (increase(signalwire_messages_by_{label}_total[7d]))",
                at,
                label,
            )
            for project in PROJECTS:
                want = truth(simulator, project, at - 7 * DAY, at, by)
                have = {c: v for (p, c), v in got.items() if p == project and v}
                assert have == {c: float(n) for c, n in want.items()}, (project, label)
            assert len(want) > 2
        # The extra labels join the live series.
        labels = requests.get(
            f"{url}/api/v1/series",
            params={"match[]": "signalwire_message_charge_usd_total", "start": str(now - 40 * DAY)},
            timeout=10,
        ).json()["data"]
        assert labels and all(
            s["job"] == "signalwire" and s["instance"] == "exporter:9797" for s in labels
        )
    finally:
        prometheus.terminate()
        prometheus.wait(timeout=30)
        log.close()


def test_backfill_then_the_daemon_continues_without_a_reset(
    month: tuple[Simulator, str, float], tmp_path: Path
) -> None:
    _simulator, base_url, _ = month
    path = config(tmp_path, base_url)
    result = backfill(tmp_path, "--from", "7d", "--step", "10m", "--output", "week.om")
    assert result.returncode == 0, result.stderr
    assert "seeded" in result.stderr
    final: dict[str, str] = {}  # series -> its last value
    for line in (tmp_path / "week.om").read_text().splitlines():
        if line.startswith("signalwire_messages_total{"):
            series, value, _ = line.rsplit(" ", 2)
            final[series] = value
    last = parse_metrics("".join(f"{k} {v}\n" for k, v in final.items()))
    assert len(last) == len(final) > 10
    daemon = Daemon(path, tmp_path).start()
    try:
        samples = daemon.scrape()
        for key, value in last.items():
            assert samples.get(key, 0) >= value, f"{key} restarted from {samples.get(key)}"
        # A second backfill of the same period is refused from seeding: it ends at the start.
        again = backfill(tmp_path, "--from", "8d", "--output", "again.om")
        assert again.returncode == 0, again.stderr
        assert "seeded" not in again.stderr
        total = sum(select(daemon.scrape(), "signalwire_messages_total").values())
        assert total >= sum(last.values())
    finally:
        assert daemon.terminate() == 0


def test_beyond_the_history_limit_says_how_far_back_the_account_allows(
    month: tuple[Simulator, str, float], tmp_path: Path
) -> None:
    simulator, base_url, _ = month
    config(tmp_path, base_url)
    simulator.history_limit = 14 * DAY
    try:
        result = backfill(tmp_path, "--from", "30d", "--to", "1d", "--output", "x.om")
    finally:
        simulator.history_limit = None
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert "about 14 days" in line and "--from" in line, result.stderr
