"""The polling process: the state store and one poller thread per project, apart from /metrics.

Started and stopped by the daemon through exporter.polling, which says what the two processes
exchange: one `WorkerSetup` on this process's stdin (whose end of file then means "stop"), and
its views, counters and heartbeats on the channel.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import signal
import sys
import threading
from multiprocessing.connection import Connection

import structlog

from exporter.config import Config
from exporter.logs import configure, redact_tokens
from exporter.poller import Counters, ProjectPoller
from exporter.polling import BROKEN, Alive, Counted, Fatal, Loaded, Published, WorkerSetup
from exporter.store import StateError, Store
from exporter.views import CounterState, ProjectView

PR_SET_PDEATHSIG = 1
WORKER_NICENESS = 5


class _Publisher:
    """Sends each project's latest view, and the counters when they change, to the daemon; and
    at least once a second a word that it is alive."""

    def __init__(self, channel: Connection, counters: Counters, stop: threading.Event) -> None:
        self.channel = channel
        self.counters = counters
        self.stop = stop
        self.wake = threading.Event()
        self.lock = threading.Lock()
        self.latest: dict[int, ProjectView] = {}
        self.sent_counts: CounterState | None = None
        self.closing = False

    def published(self, index: int, view: ProjectView) -> None:
        with self.lock:
            self.latest[index] = view
        self.wake.set()

    def run(self) -> None:
        while True:
            self.wake.wait(1.0)
            self.wake.clear()
            closing = self.closing
            if not self.flush(heartbeat=True):
                self.stop.set()  # the daemon has gone
                return
            if closing:
                return

    def flush(self, heartbeat: bool = False) -> bool:
        with self.lock:
            latest, self.latest = self.latest, {}
        counts = self.counters.state()
        try:
            for index, view in sorted(latest.items()):
                self.channel.send(Published(index, view))
            if counts != self.sent_counts:
                self.channel.send(Counted(counts))
                self.sent_counts = counts
            elif heartbeat and not latest:
                self.channel.send(Alive())
        except OSError:
            return False
        return True


def _die_with_parent(parent: int) -> None:
    """Linux kills this process when the daemon dies, even by kill -9, so it never polls alone
    (elsewhere the end of stdin stops it)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(1)


def _watch_stdin(control: Connection, stop: threading.Event) -> None:
    """Stop when the daemon closes this process's stdin (or dies). Connection reads with plain
    os.read, no buffered reader: a daemon thread still blocked in it when the interpreter exits
    holds no lock that the exit needs."""
    with contextlib.suppress(*BROKEN):
        while True:
            control.recv()  # the daemon sends nothing more: only the end of file matters
    stop.set()


def main() -> int:
    # Ctrl-C reaches the whole process group: the daemon decides when this process stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    control = Connection(0, writable=False)
    try:
        setup = control.recv()
    except BROKEN:
        setup = None
    if not isinstance(setup, WorkerSetup):
        print("the polling process is started by signalwire-exporter itself", file=sys.stderr)
        return 2
    _die_with_parent(setup.parent_pid)
    # Polls are throughput work and scrapes are latency: on a busy machine, scrapes go first.
    with contextlib.suppress(OSError):
        os.nice(WORKER_NICENESS)
    configure(setup.log_level, setup.log_format)
    log = structlog.get_logger()
    redact_tokens(setup.config)
    channel = Connection(setup.channel_fd, readable=False)
    try:
        return _serve(setup.config, control, channel, stop)
    except StateError as exc:
        with contextlib.suppress(OSError):
            channel.send(Fatal(str(exc)))
        return 1
    except Exception as exc:  # a bug: one clear line for the daemon to report, no traceback
        log.error("polling process failed", error=repr(exc))
        with contextlib.suppress(OSError):
            channel.send(Fatal(f"the polling process failed: {exc!r}"))
        return 1


def _serve(config: Config, control: Connection, channel: Connection, stop: threading.Event) -> int:
    counters = Counters()
    publisher = _Publisher(channel, counters, stop)
    store = Store(config.state_path)
    try:
        pollers = _load(config, store, counters, stop, publisher)
        publisher.flush()
        channel.send(Loaded())
        # A poll hands the interpreter lock to the publisher more often than every 5 ms.
        sys.setswitchinterval(0.001)
        gc.collect()
        gc.freeze()  # the loaded state lives for good: keep it out of every garbage collection
        polling = [
            threading.Thread(target=p.run, name=f"poll-{p.project.name}", daemon=True)
            for p in pollers
        ]
        watcher = threading.Thread(
            target=_watch_stdin, args=(control, stop), name="watch-stdin", daemon=True
        )
        sending = threading.Thread(target=publisher.run, name="publish", daemon=True)
        sending.start()
        for thread in (*polling, watcher):
            thread.start()
        stop.wait()
        for thread in polling:  # the watcher may stay blocked in its read: it is a daemon thread
            thread.join()
        publisher.closing = True
        publisher.wake.set()
        sending.join()
    finally:
        store.close()
    return 0


def _load(
    config: Config,
    store: Store,
    counters: Counters,
    stop: threading.Event,
    publisher: _Publisher,
) -> list[ProjectPoller]:
    """A poller per project, each with its committed state loaded and its first view published."""
    pollers = []
    for index, project in enumerate(config.projects):

        def on_publish(view: ProjectView, index: int = index) -> None:
            publisher.published(index, view)

        poller = ProjectPoller(project, config, store, counters, stop, on_publish=on_publish)
        poller.load()
        pollers.append(poller)
    return pollers
