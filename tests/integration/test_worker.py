"""The daemon's two processes: it serves /metrics, its child polls. They live and die together."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from exporter.simulator import Simulator, SimulatorServer, TrafficGenerator, TrafficProfile
from exporter.worker import WORKER_COMMAND
from tests.helpers import ROOT, Daemon, alive, process_family, select, wait_for, write_config

PROJECT_ID, TOKEN = "33333333-cccc", "PTworker-token"


@pytest.fixture
def base_url() -> Iterator[str]:
    simulator = Simulator(seed=21)
    simulator.add_project(PROJECT_ID, TOKEN)
    traffic = TrafficGenerator(simulator, PROJECT_ID, 20.0, TrafficProfile(max_delay=1.0), seed=2)
    with SimulatorServer(simulator) as server:
        traffic.start()
        try:
            yield server.base_url
        finally:
            traffic.stop()


def started(tmp_path: Path, base_url: str) -> tuple[Daemon, int]:
    config = write_config(
        tmp_path / "config.yaml",
        [{"name": "main", "space": base_url, "project_id": PROJECT_ID, "api_token": TOKEN}],
        poll_interval="1s",
        state_path="state/exporter.db",
        settle={"timeout": "5s"},
    )
    daemon = Daemon(config, tmp_path).start()
    assert daemon.proc is not None
    family = process_family(daemon.proc.pid)
    assert len(family) == 2, f"one polling process expected: {family}"
    return daemon, family[1]


def test_polling_process_is_reported_and_counts_arrive(tmp_path: Path, base_url: str) -> None:
    daemon, _ = started(tmp_path, base_url)
    wait_for(
        lambda: sum(select(daemon.scrape(), "signalwire_messages_total").values()) > 0,
        20,
        f"counts from the polling process\n{daemon.log()}",
    )
    samples = daemon.scrape()
    # Both processes' own figures: the usual process_* and the poller's, prefixed.
    assert select(samples, "process_resident_memory_bytes")
    assert select(samples, "signalwire_exporter_poller_process_resident_memory_bytes")
    requests_made = select(samples, "signalwire_api_requests_total")
    assert sum(requests_made.values()) > 0, requests_made
    assert daemon.terminate() == 0


def test_sigkill_of_the_daemon_takes_the_polling_process_with_it(
    tmp_path: Path, base_url: str
) -> None:
    daemon, worker = started(tmp_path, base_url)
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGKILL)
    daemon.proc.wait(timeout=10)
    # Left alone it would poll and hold the state file: a restarted daemon could not start.
    wait_for(lambda: not alive(worker), 10, "the polling process gone")
    Daemon(daemon.config, tmp_path).start().terminate()


def test_sigterm_stops_both_cleanly(tmp_path: Path, base_url: str) -> None:
    daemon, worker = started(tmp_path, base_url)
    assert daemon.terminate() == 0
    assert not alive(worker)
    assert "Traceback" not in daemon.log()


def test_a_dead_polling_process_stops_the_daemon_with_one_clear_line(
    tmp_path: Path, base_url: str
) -> None:
    daemon, worker = started(tmp_path, base_url)
    assert daemon.proc is not None
    os.kill(worker, signal.SIGKILL)
    code = daemon.proc.wait(timeout=20)
    log = daemon.log()
    assert code == 1, log
    assert "Traceback" not in log, log
    plain = [line for line in log.splitlines() if line and not line.startswith("ts=")]
    assert plain == [
        "signalwire-exporter: the polling process stopped unexpectedly (killed by SIGKILL)"
    ], log


def test_the_worker_entry_alone_says_what_it_is() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", WORKER_COMMAND],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=30,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == "the polling process is started by signalwire-exporter itself"
