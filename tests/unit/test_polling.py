"""The daemon's side of the polling process, without a process: the typed messages it receives,
what the serving side imports, and the polling process's metrics when there is none."""

from __future__ import annotations

import subprocess
import sys
from multiprocessing import Pipe

import pytest

from exporter.config import Config, ProjectConfig
from exporter.logs import Secrets
from exporter.metrics import PollerProcessCollector
from exporter.polling import Alive, Counted, Fatal, PollingProcess, Published
from exporter.views import CounterState, ProjectView
from tests.helpers import ROOT

CONFIG = Config(projects=(ProjectConfig("main", "http://api.invalid", "pid", "PTtoken-1234"),))


class Received:
    def __init__(self) -> None:
        self.views: list[tuple[int, ProjectView]] = []
        self.counts: list[CounterState] = []
        self.process = PollingProcess(
            CONFIG,
            lambda index, view: self.views.append((index, view)),
            self.counts.append,
            "info",
            "logfmt",
        )


def test_each_message_reaches_its_handler() -> None:
    received = Received()
    view = ProjectView("main", polled=True, up=True)
    counts = CounterState({("main", "200"): 3}, {}, {}, {})
    for message in (Published(0, view), Counted(counts), Alive(), Fatal("the state file is gone")):
        received.process._dispatch(message)
    assert received.views == [(0, view)]
    assert received.counts == [counts]
    assert received.process.reason == "the state file is gone"


def test_anything_else_is_refused() -> None:
    with pytest.raises(TypeError, match="not a message of the polling process"):
        Received().process._dispatch(("status", 0, ProjectView("main")))


def test_a_garbled_channel_gives_the_worker_up_with_the_reason() -> None:
    received = Received()
    reader, writer = Pipe(duplex=False)
    received.process.channel = reader
    writer.send(Published(0, ProjectView("main")))
    writer.send_bytes(b"not a pickle")
    received.process._receive()
    assert [index for index, _ in received.views] == [0]
    assert received.process.gone.is_set()
    assert received.process.reason is not None
    assert received.process.reason.startswith("the polling process sent something unreadable")


def test_the_end_of_the_channel_is_no_failure_of_its_own() -> None:
    received = Received()
    reader, writer = Pipe(duplex=False)
    received.process.channel = reader
    writer.close()
    received.process._receive()
    assert received.process.gone.is_set() and received.process.reason is None


def test_no_polling_process_no_process_series() -> None:
    assert list(PollerProcessCollector("worker", lambda: None).collect()) == []


def test_one_scrubber_for_logs_and_clients() -> None:
    secrets = Secrets("PTtoken-1234", "short")
    assert secrets.scrub("echoed PTtoken-1234 and short") == "echoed <redacted> and short"
    assert not Secrets() and Secrets("PTtoken-1234")


def test_the_serving_side_imports_nothing_of_the_polling_stack() -> None:
    # exporter.cli is the serving process's entry point: the backfill and check commands import
    # their own modules when run.
    code = (
        "import sys, exporter.cli, exporter.daemon, exporter.metrics, exporter.server; "
        "print(' '.join(sorted(m for m in sys.modules if m.startswith('exporter'))))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True
    )
    loaded = set(done.stdout.split())
    assert "exporter.polling" in loaded
    polling_stack = {"exporter.poller", "exporter.client", "exporter.ledger", "exporter.store"}
    polling_stack |= {"exporter.pending", "exporter.worker", "exporter.backfill"}
    assert not loaded & polling_stack, sorted(loaded)
