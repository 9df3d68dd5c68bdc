"""The daemon's two processes: it serves /metrics, its child polls. They live and die together."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from exporter.config import Config, ProjectConfig, SettleConfig
from exporter.polling import HEARTBEAT_TIMEOUT, PollingProcess, worker_command
from exporter.simulator import Simulator, SimulatorServer, TrafficGenerator, TrafficProfile
from exporter.views import CounterState, ProjectView
from tests.helpers import (
    ROOT,
    Daemon,
    alive,
    free_port,
    process_family,
    select,
    wait_for,
    write_config,
)

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


def config_file(tmp_path: Path, base_url: str) -> Path:
    return write_config(
        tmp_path / "config.yaml",
        [{"name": "main", "space": base_url, "project_id": PROJECT_ID, "api_token": TOKEN}],
        poll_interval="1s",
        state_path="state/exporter.db",
        settle={"timeout": "5s"},
    )


def started(tmp_path: Path, base_url: str) -> tuple[Daemon, int]:
    daemon = Daemon(config_file(tmp_path, base_url), tmp_path).start()
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
    text = requests.get(f"{daemon.url}/metrics", timeout=5).text
    assert (
        "# HELP signalwire_exporter_poller_process_resident_memory_bytes Polling process: " in text
    )
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


@pytest.mark.parametrize(
    ("sig", "ending"), [(signal.SIGKILL, "killed by SIGKILL"), (signal.SIGTERM, "exit status 0")]
)
def test_a_polling_process_that_ends_alone_stops_the_daemon_with_one_clear_line(
    tmp_path: Path, base_url: str, sig: signal.Signals, ending: str
) -> None:
    daemon, worker = started(tmp_path, base_url)
    assert daemon.proc is not None
    os.kill(worker, sig)
    code = daemon.proc.wait(timeout=20)
    log = daemon.log()
    assert code == 1, log
    # Nor may a SIGTERM'd worker abort at exit ("Fatal Python error" on a daemon thread's lock).
    assert "Fatal Python error" not in log and "Traceback" not in log, log
    plain = [line for line in log.splitlines() if line and not line.startswith("ts=")]
    assert plain == [f"signalwire-exporter: the polling process stopped unexpectedly ({ending})"], (
        log
    )


def test_the_worker_entry_alone_says_what_it_is() -> None:
    proc = subprocess.run(
        worker_command(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=30,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == "the polling process is started by signalwire-exporter itself"


def test_ctrl_c_while_the_polling_process_starts_is_a_clean_stop(
    tmp_path: Path, base_url: str
) -> None:
    config = config_file(tmp_path, base_url)
    proc = subprocess.Popen(
        [sys.executable, "-m", "exporter", "--config.file", str(config),
         "--web.listen-address", "127.0.0.1:0"],
        cwd=tmp_path,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        start_new_session=True,
    )  # fmt: skip
    try:
        # As soon as the polling process exists, a terminal's Ctrl-C (to the foreground group).
        wait_for(lambda: len(process_family(proc.pid)) == 2, 20, "the polling process started")
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = err.decode(errors="replace")
    assert proc.returncode == 0, text
    assert "Traceback" not in text and "KeyboardInterrupt" not in text, text


def test_the_working_directory_cannot_shadow_the_polling_process_modules(
    tmp_path: Path, base_url: str
) -> None:
    # The installed command, unlike `python -m`, keeps the working directory off sys.path: so
    # must the polling process it starts.
    command = Path(sys.executable).parent / "signalwire-exporter"
    if not command.exists():
        pytest.skip("the signalwire-exporter command is not installed beside this interpreter")
    (tmp_path / "ctypes.py").write_text("raise SystemExit('shadowed ctypes')\n")
    (tmp_path / "exporter").mkdir()
    (tmp_path / "exporter" / "__init__.py").write_text("raise SystemExit('shadowed exporter')\n")
    config = config_file(tmp_path, base_url)
    port = free_port()
    proc = subprocess.Popen(
        [str(command), "--config.file", str(config), "--web.listen-address", f"127.0.0.1:{port}"],
        cwd=tmp_path,
        stderr=subprocess.PIPE,
    )
    try:
        wait_for(
            lambda: requests.get(f"http://127.0.0.1:{port}/-/ready", timeout=2).ok,
            30,
            "the daemon ready",
        )
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = err.decode(errors="replace")
    assert proc.returncode == 0, text
    assert "shadowed" not in text, text


def test_a_silent_polling_process_is_given_up(tmp_path: Path, base_url: str) -> None:
    config = Config(
        projects=(ProjectConfig("main", base_url, PROJECT_ID, TOKEN),),
        poll_interval=1.0,
        state_path=str(tmp_path / "state.db"),
        settle=SettleConfig(timeout=5.0),
        source="<test>",
    )
    now = [0.0]
    views: list[ProjectView] = []
    counters: list[CounterState] = []
    worker = PollingProcess(
        config, lambda _, v: views.append(v), counters.append, "warning", "logfmt", lambda: now[0]
    )
    worker.start()
    try:
        assert views and views[-1].name == "main"
        assert worker.failure() is None
        os.kill(worker.pid or 0, signal.SIGSTOP)  # hung: says nothing more
        now[0] += HEARTBEAT_TIMEOUT + 1
        reason = worker.failure()
        assert reason == (
            f"the polling process has not answered for {HEARTBEAT_TIMEOUT + 1:.0f} s "
            "(killed by SIGKILL)"
        )
        assert worker.pid is not None and not alive(worker.pid)
    finally:
        worker.stop()
