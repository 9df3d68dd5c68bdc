"""Soak: the real daemon against the simulator at a high message rate, scraped continuously.

Its memory and thread count must stop growing, no scrape may fail, and once the traffic stops
every counter must equal the simulator's ground truth exactly.

60 s by default; a longer run, e.g. ten minutes:

    SOAK_SECONDS=600 .venv/bin/pytest -s tests/integration/test_soak.py
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests

from exporter.simulator import Simulator, SimulatorServer, TrafficGenerator, TrafficProfile
from tests.helpers import (
    Daemon,
    Samples,
    Totals,
    exported_totals,
    ground_truth,
    parse_metrics,
    pending_total,
    process_family,
    wait_for,
    write_config,
)

SOAK_SECONDS = float(os.environ.get("SOAK_SECONDS", "60"))
RATE = 100.0  # messages per second, per project
SETTLE_TIMEOUT = 3.0
START_FROM = 30.0
PROFILE = TrafficProfile(max_delay=1.5)  # every transition within the settle timeout
PROJECTS = {
    "alpha": ("11111111-aaaa", "PTalpha-soak-token"),
    "beta": ("22222222-bbbb", "PTbeta-soak-token"),
}
RSS_MARGIN_RATIO = 0.10
RSS_MARGIN_KB = 15 * 1024
THREAD_MARGIN = 2


# --------------------------------------------------------------------------- helpers


def proc_status(pid: int) -> tuple[int, int]:
    """(VmRSS in kB, Threads) of the daemon and its polling process, from /proc/PID/status."""
    rss = threads = 0
    for member in process_family(pid):
        fields = {}
        with open(f"/proc/{member}/status", encoding="ascii") as f:
            for line in f:
                name, _, value = line.partition(":")
                fields[name] = value.strip()
        rss += int(fields["VmRSS"].split()[0])
        threads += int(fields["Threads"])
    return rss, threads


def exported(samples: Samples, project: str) -> Totals:
    return exported_totals(samples, project)


def expected(simulator: Simulator, project: str, start_point: float) -> Totals:
    return ground_truth(simulator, PROJECTS[project][0], start_point, SETTLE_TIMEOUT)


def pending(samples: Samples, project: str) -> float:
    return pending_total(samples, project)


@dataclass
class Scraper:
    """Scrapes /metrics back to back (own connection each time) until stopped."""

    url: str
    stop: threading.Event = field(default_factory=threading.Event)
    ok: int = 0
    failures: list[str] = field(default_factory=list)
    slowest: float = 0.0

    def run(self) -> None:
        while not self.stop.is_set():
            start = time.monotonic()
            try:
                response = requests.get(f"{self.url}/metrics", timeout=5)
                if response.status_code != 200:
                    raise ValueError(f"status {response.status_code}")
                parse_metrics(response.text)
            except (requests.RequestException, ValueError) as exc:
                self.failures.append(f"{time.monotonic():.1f}: {exc!r}")
            else:
                self.ok += 1
            self.slowest = max(self.slowest, time.monotonic() - start)
            self.stop.wait(0.02)  # pacing, so the scraper does not starve the simulator


@pytest.fixture
def sim() -> Iterator[tuple[Simulator, str]]:
    simulator = Simulator(seed=11)
    for project_id, token in PROJECTS.values():
        simulator.add_project(project_id, token)
    with SimulatorServer(simulator) as server:
        yield simulator, server.base_url


# --------------------------------------------------------------------------- the soak


@pytest.mark.timeout(SOAK_SECONDS + 180)
def test_soak_memory_and_threads_level_off_and_counts_stay_exact(
    sim: tuple[Simulator, str], tmp_path: Path
) -> None:
    simulator, base_url = sim
    projects = [
        {"name": name, "space": base_url, "project_id": pid, "api_token": token}
        for name, (pid, token) in PROJECTS.items()
    ]
    config = write_config(
        tmp_path / "config.yaml",
        projects,
        poll_interval="1s",
        start_from=f"{int(START_FROM)}s",
        state_path="state/exporter.db",
        settle={"timeout": f"{int(SETTLE_TIMEOUT)}s"},
        request={"timeout": "5s", "page_size": 200},
    )
    traffic = [
        TrafficGenerator(simulator, pid, rate=RATE, profile=PROFILE, seed=30 + i)
        for i, (pid, _) in enumerate(PROJECTS.values())
    ]
    before = time.time()
    daemon = Daemon(config, tmp_path).start()
    start_point = before - START_FROM
    assert daemon.proc is not None
    pid = daemon.proc.pid
    scraper = Scraper(daemon.url)
    scraping = threading.Thread(target=scraper.run, name="scraper", daemon=True)
    samples: list[tuple[float, int, int]] = []  # (seconds since start, RSS kB, threads)
    tick = threading.Event()  # never set: its timed wait paces the 1 s sampling
    try:
        for t in traffic:
            t.start()
        scraping.start()
        began = time.monotonic()
        while (elapsed := time.monotonic() - began) < SOAK_SECONDS:
            daemon.assert_alive()
            rss, threads = proc_status(pid)
            samples.append((elapsed, rss, threads))
            tick.wait(1.0)
    finally:
        for t in traffic:
            t.stop()
        scraper.stop.set()
        scraping.join(timeout=10)
    messages = sum(t.created for t in traffic)

    daemon.assert_alive()
    assert not scraper.failures, f"{len(scraper.failures)} scrapes failed: {scraper.failures[:5]}"
    assert scraper.ok >= SOAK_SECONDS, f"only {scraper.ok} scrapes in {SOAK_SECONDS:.0f}s"

    third = len(samples) // 3
    middle, last = samples[third : 2 * third], samples[2 * third :]
    rss_middle = max(s[1] for s in middle)
    rss_last = max(s[1] for s in last)
    threads_middle = max(s[2] for s in middle)
    threads_last = max(s[2] for s in last)
    rss_allowed = rss_middle + max(RSS_MARGIN_KB, rss_middle * RSS_MARGIN_RATIO)

    def settled_exactly() -> bool:
        scraped = daemon.scrape()
        return all(
            pending(scraped, p) == 0 and exported(scraped, p) == expected(simulator, p, start_point)
            for p in PROJECTS
        )

    try:
        wait_for(settled_exactly, 30, "exact counts after the soak", interval=0.5)
    except AssertionError:
        scraped = daemon.scrape()
        diff = {
            (p, key): (exported(scraped, p).get(key), truth)
            for p in PROJECTS
            for key, truth in expected(simulator, p, start_point).items()
            if exported(scraped, p).get(key) != truth
        }
        pendings = {p: pending(scraped, p) for p in PROJECTS}
        raise AssertionError(
            f"counts differ from the ground truth 30 s after the traffic stopped: pending "
            f"{pendings}; (exported, expected) per label set: {diff}\n{daemon.log()}"
        ) from None
    final = daemon.scrape()
    counted = sum(sum(v[0] for v in exported(final, p).values()) for p in PROJECTS)
    timeline = " ".join(
        f"{t:.0f}s:{rss / 1024:.1f}MB/{n}"
        for t, rss, n in samples[:: max(1, len(samples) // 6)] + samples[-1:]
    )
    print(
        f"\nsoak {SOAK_SECONDS:.0f}s at {len(PROJECTS)}x{RATE:.0f} msg/s: {messages} messages "
        f"created, {counted} counted; {scraper.ok} scrapes (slowest {scraper.slowest:.3f}s), "
        f"0 failed; RSS {samples[0][1] / 1024:.1f} -> {samples[-1][1] / 1024:.1f} MB (max middle "
        f"third {rss_middle / 1024:.1f}, last third {rss_last / 1024:.1f}); threads "
        f"{samples[0][2]} -> {samples[-1][2]} (max middle {threads_middle}, last {threads_last})"
        f"\n  RSS/threads over time: {timeline}"
    )
    assert counted == messages, f"{counted} counted, {messages} created"
    assert rss_last <= rss_allowed, (
        f"RSS still growing: max {rss_last} kB over the last third, {rss_middle} kB over the "
        f"middle third (allowed {rss_allowed:.0f} kB)"
    )
    assert threads_last <= threads_middle + THREAD_MARGIN, (
        f"threads still growing: max {threads_last} over the last third, {threads_middle} over "
        "the middle third"
    )
    assert daemon.terminate() == 0
    assert "Traceback" not in daemon.log()
