"""The polling process: the state store and one poller thread per project, apart from /metrics.

Python threads share one interpreter lock, and a poll holds it for most of its work (decoding pages,
counting records, building the published view). A scrape served by a thread of the same process
waits behind that work, so the daemon polls in a child process and serves /metrics from the views
the child sends: a scrape only competes with the thread that receives them.

The pipe carries length-prefixed pickles between the daemon and its own child:
  daemon -> worker (stdin): one WorkerSetup; end of file then means "stop".
  worker -> daemon (channel_fd): ("status", index, ProjectStatus), ("counters", CounterState),
                                 ("loaded",), ("fatal", "state" | "other", message).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import pickle
import signal
import struct
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any

import structlog

from exporter.config import Config
from exporter.logs import configure, redact
from exporter.poller import Counters, CounterState, ProjectPoller, ProjectStatus
from exporter.store import StateError, Store

_HEADER = struct.Struct("!I")
PR_SET_PDEATHSIG = 1
# Run as `python -c`: under -m the pickled classes would belong to __main__, not this module.
WORKER_COMMAND = "from exporter.worker import main; raise SystemExit(main())"
WORKER_NICENESS = 5
# How long a stopping worker may take to abandon its polls and close the state before it is killed.
STOP_TIMEOUT = 30.0


class WorkerError(Exception):
    """The polling process could not start or stopped; the message says why."""


@dataclass(frozen=True)
class WorkerSetup:
    config: Config
    log_level: str
    log_format: str
    channel_fd: int
    parent_pid: int


def write_frame(stream: IO[bytes], item: object) -> None:
    data = pickle.dumps(item, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_HEADER.pack(len(data)) + data)
    stream.flush()


def read_frame(stream: IO[bytes]) -> Any:
    """The next item; EOFError when the other side has gone."""
    header = stream.read(_HEADER.size)
    if len(header) < _HEADER.size:
        raise EOFError
    (size,) = _HEADER.unpack(header)
    data = stream.read(size)
    if len(data) < size:
        raise EOFError
    return pickle.loads(data)


def describe_exit(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
        return f"killed by signal {-code}"
    return f"exit status {code}"


# ----------------------------------------------------------------------------- the daemon's side
class PollingProcess:
    """The daemon's handle on its worker: start it, receive its views, stop it."""

    def __init__(
        self,
        config: Config,
        on_status: Callable[[int, ProjectStatus], None],
        on_counters: Callable[[CounterState], None],
        log_level: str,
        log_format: str,
    ) -> None:
        self.config = config
        self.on_status = on_status
        self.on_counters = on_counters
        self.log_level = log_level
        self.log_format = log_format
        self.proc: subprocess.Popen[bytes] | None = None
        self.channel: IO[bytes] | None = None
        self.gone = threading.Event()
        self.stopping = False
        self._receiver: threading.Thread | None = None

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def start(self) -> None:
        """Spawn the worker and wait until it has loaded the state (or raise StateError or
        WorkerError)."""
        read_end, write_end = os.pipe()
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", WORKER_COMMAND],
                stdin=subprocess.PIPE,
                pass_fds=(write_end,),
            )
        except OSError as exc:
            os.close(read_end)
            raise WorkerError(f"cannot start the polling process: {exc}") from None
        finally:
            os.close(write_end)
        self.channel = os.fdopen(read_end, "rb")
        assert self.proc.stdin is not None
        setup = WorkerSetup(self.config, self.log_level, self.log_format, write_end, os.getpid())
        with contextlib.suppress(OSError):  # it died at once: reported below from its exit status
            write_frame(self.proc.stdin, setup)
        while True:
            try:
                item = read_frame(self.channel)
            except EOFError:
                code = self.proc.wait()
                raise WorkerError(
                    f"the polling process ended before loading the state ({describe_exit(code)})"
                ) from None
            if item[0] == "loaded":
                break
            if item[0] == "fatal":
                self.proc.wait()
                raise (StateError if item[1] == "state" else WorkerError)(item[2])
            self._dispatch(item)
        self._receiver = threading.Thread(target=self._receive, name="worker-views", daemon=True)
        self._receiver.start()

    def _dispatch(self, item: Any) -> None:
        if item[0] == "status":
            self.on_status(item[1], item[2])
        elif item[0] == "counters":
            self.on_counters(item[1])

    def _receive(self) -> None:
        assert self.channel is not None
        try:
            while True:
                self._dispatch(read_frame(self.channel))
        except (EOFError, OSError, pickle.UnpicklingError):
            pass
        self.gone.set()

    def failure(self) -> str | None:
        """Why polling stopped for good while it should be running, or None."""
        if not self.gone.is_set() or self.stopping or self.proc is None:
            return None
        code = self.proc.wait()
        return f"the polling process stopped unexpectedly ({describe_exit(code)})"

    def stop(self) -> None:
        """Ask the worker to stop (end of its stdin), wait for it, and kill it if it hangs."""
        self.stopping = True
        proc = self.proc
        if proc is None:
            return
        if proc.stdin is not None:
            with contextlib.suppress(OSError):
                proc.stdin.close()
        try:
            proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if self._receiver is not None:
            self._receiver.join(timeout=5)
        if self.channel is not None:
            self.channel.close()


# ----------------------------------------------------------------------------- the worker's side
class _Publisher:
    """Sends each project's latest view, and the counters when they change, to the daemon."""

    def __init__(self, channel: IO[bytes], counters: Counters, stop: threading.Event) -> None:
        self.channel = channel
        self.counters = counters
        self.stop = stop
        self.wake = threading.Event()
        self.lock = threading.Lock()
        self.latest: dict[int, ProjectStatus] = {}
        self.sent_counters: CounterState | None = None
        self.closing = False

    def published(self, index: int, status: ProjectStatus) -> None:
        with self.lock:
            self.latest[index] = status
        self.wake.set()

    def run(self) -> None:
        # Counters move during long polls too: send them at least every second.
        while True:
            self.wake.wait(1.0)
            self.wake.clear()
            closing = self.closing
            if not self.flush():
                self.stop.set()  # the daemon has gone
                return
            if closing:
                return

    def flush(self) -> bool:
        with self.lock:
            latest, self.latest = self.latest, {}
        counters = self.counters.state()
        try:
            for index, status in sorted(latest.items()):
                write_frame(self.channel, ("status", index, status))
            if counters != self.sent_counters:
                write_frame(self.channel, ("counters", counters))
                self.sent_counters = counters
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


def _watch_stdin(stop: threading.Event) -> None:
    with contextlib.suppress(OSError):
        while sys.stdin.buffer.read(4096):
            pass
    stop.set()


def main() -> int:
    # Ctrl-C reaches the whole process group: the daemon decides when this process stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        setup = read_frame(sys.stdin.buffer)
    except (EOFError, pickle.UnpicklingError):
        print("the polling process is started by signalwire-exporter itself", file=sys.stderr)
        return 2
    assert isinstance(setup, WorkerSetup)
    _die_with_parent(setup.parent_pid)
    # Polls are throughput work and scrapes are latency: on a busy machine, scrapes go first.
    with contextlib.suppress(OSError):
        os.nice(WORKER_NICENESS)
    configure(setup.log_level, setup.log_format)
    log = structlog.get_logger()
    config = setup.config
    for project in config.projects:
        redact(project.api_token)
    channel = os.fdopen(setup.channel_fd, "wb")
    try:
        return _serve(config, channel, stop)
    except StateError as exc:
        with contextlib.suppress(OSError):
            write_frame(channel, ("fatal", "state", str(exc)))
        return 1
    except Exception as exc:  # a bug: one clear line for the daemon to report, no traceback
        log.error("polling process failed", error=repr(exc))
        with contextlib.suppress(OSError):
            write_frame(channel, ("fatal", "other", f"the polling process failed: {exc!r}"))
        return 1


def _serve(config: Config, channel: IO[bytes], stop: threading.Event) -> int:
    counters = Counters()
    publisher = _Publisher(channel, counters, stop)
    store = Store(config.state_path)
    try:
        pollers = []
        for index, project in enumerate(config.projects):

            def on_publish(status: ProjectStatus, index: int = index) -> None:
                publisher.published(index, status)

            poller = ProjectPoller(project, config, store, counters, stop, on_publish=on_publish)
            poller.load()
            pollers.append(poller)
        publisher.flush()
        write_frame(channel, ("loaded",))
        # A poll hands the interpreter lock to the publisher more often than every 5 ms.
        sys.setswitchinterval(0.001)
        gc.collect()
        gc.freeze()  # the loaded state lives for good: keep it out of every garbage collection
        threads = [
            threading.Thread(target=p.run, name=f"poll-{p.project.name}", daemon=True)
            for p in pollers
        ]
        threads.append(threading.Thread(target=_watch_stdin, args=(stop,), daemon=True))
        sending = threading.Thread(target=publisher.run, name="publish", daemon=True)
        sending.start()
        for thread in threads:
            thread.start()
        stop.wait()
        for thread in threads[:-1]:
            thread.join()
        publisher.closing = True
        publisher.wake.set()
        sending.join()
    finally:
        store.close()
    return 0
