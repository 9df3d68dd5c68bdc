"""The polling process: the state store and one poller thread per project, apart from /metrics.

Python threads share one interpreter lock, and a poll holds it for most of its work (decoding pages,
counting records, building the published view). A scrape served by a thread of the same process
waits behind that work, so the daemon polls in a child process and serves /metrics from the views
the child sends: a scrape only competes with the thread that receives them.

The pipe carries length-prefixed pickles between the daemon and its own child:
  daemon -> worker (stdin): one WorkerSetup; end of file then means "stop".
  worker -> daemon (channel_fd): ("status", index, ProjectStatus), ("counters", CounterState),
                                 ("alive",), ("loaded",), ("fatal", "state" | "other", message).
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
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from exporter.config import Config
from exporter.logs import configure, redact
from exporter.poller import Counters, CounterState, ProjectPoller, ProjectStatus
from exporter.store import StateError, Store

_HEADER = struct.Struct("!I")
PR_SET_PDEATHSIG = 1
WORKER_NICENESS = 5
# How long a stopping worker may take to abandon its polls and close the state before it is
# killed: within systemd's and Kubernetes' usual grace periods.
STOP_TIMEOUT = 20.0
# The worker says it is alive every second, polls or not; this long without a word, it is hung.
HEARTBEAT_TIMEOUT = 60.0
_PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent)


def worker_command(root: str = _PACKAGE_ROOT) -> list[str]:
    """The worker's command line: this interpreter with its isolation flags, -P so that the
    working directory cannot shadow a module, and this very copy of the package. The leading
    comment names it in ps and pgrep -f. Signals are ignored until main() takes them over, as the
    daemon decides when its worker stops. Run as -c, not -m: under -m the pickled classes would
    belong to __main__."""
    flags = ["-I"] if sys.flags.isolated else ["-E"] * sys.flags.ignore_environment
    flags += ["-s"] * (sys.flags.no_user_site and not sys.flags.isolated)
    code = (
        "# signalwire-exporter polling process\n"
        "import signal; signal.signal(signal.SIGINT, signal.SIG_IGN); "
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        f"import sys; sys.path.insert(0, {root!r})\n"
        "from exporter.worker import main; raise SystemExit(main())"
    )
    return [sys.executable, *flags, "-P", "-c", code]


class WorkerError(Exception):
    """The polling process could not start or stopped; the message says why."""


@dataclass(frozen=True)
class WorkerSetup:
    config: Config
    log_level: str
    log_format: str
    channel_fd: int
    parent_pid: int


def write_frame(fd: int, item: object) -> None:
    data = pickle.dumps(item, protocol=pickle.HIGHEST_PROTOCOL)
    view = memoryview(_HEADER.pack(len(data)) + data)
    while view:
        view = view[os.write(fd, view) :]


def _read_exactly(fd: int, size: int) -> bytes:
    chunks = []
    while size:
        chunk = os.read(fd, min(size, 1 << 20))
        if not chunk:
            raise EOFError
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def read_frame(fd: int) -> Any:
    """The next item from a pipe's file descriptor; EOFError when the other side has gone.

    Plain os.read, not a buffered reader: a daemon thread still blocked in it when the
    interpreter exits holds no lock that the exit needs."""
    (size,) = _HEADER.unpack(_read_exactly(fd, _HEADER.size))
    return pickle.loads(_read_exactly(fd, size))


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
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.on_status = on_status
        self.on_counters = on_counters
        self.log_level = log_level
        self.log_format = log_format
        self.clock = clock
        self.proc: subprocess.Popen[bytes] | None = None
        self.channel = -1
        self.gone = threading.Event()
        self.stopping = False
        self.last_heard = clock()
        self.reason: str | None = None  # why the worker ended, when it said or we saw
        self._receiver: threading.Thread | None = None

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def start(self) -> None:
        """Spawn the worker and wait until it has loaded the state (or raise StateError or
        WorkerError)."""
        read_end, write_end = os.pipe()
        try:
            # A process group of its own: a terminal's Ctrl-C reaches the daemon only, which
            # then stops its worker.
            self.proc = subprocess.Popen(
                worker_command(), stdin=subprocess.PIPE, pass_fds=(write_end,), process_group=0
            )
        except OSError as exc:
            os.close(read_end)
            raise WorkerError(f"cannot start the polling process: {exc}") from None
        finally:
            os.close(write_end)
        self.channel = read_end
        assert self.proc.stdin is not None
        setup = WorkerSetup(self.config, self.log_level, self.log_format, write_end, os.getpid())
        with contextlib.suppress(OSError):  # it died at once: reported below from its exit status
            write_frame(self.proc.stdin.fileno(), setup)
        while True:
            try:
                item = read_frame(self.channel)
            except (EOFError, OSError, pickle.UnpicklingError):
                code = self._end()
                raise WorkerError(
                    f"the polling process ended before loading the state ({describe_exit(code)})"
                ) from None
            if item[0] == "loaded":
                break
            if item[0] == "fatal":
                self._end()
                raise (StateError if item[1] == "state" else WorkerError)(item[2])
            self._dispatch(item)
        self.last_heard = self.clock()
        self._receiver = threading.Thread(target=self._receive, name="worker-views", daemon=True)
        self._receiver.start()

    def _dispatch(self, item: Any) -> None:
        if item[0] == "status":
            self.on_status(item[1], item[2])
        elif item[0] == "counters":
            self.on_counters(item[1])
        elif item[0] == "fatal":
            self.reason = item[2]

    def _receive(self) -> None:
        try:
            while True:
                item = read_frame(self.channel)
                self.last_heard = self.clock()
                self._dispatch(item)
        except (EOFError, OSError):
            pass
        except Exception as exc:  # a garbled pipe: the worker cannot be trusted any more
            self.reason = f"the polling process sent something unreadable ({exc!r})"
        self.gone.set()

    def failure(self) -> str | None:
        """Why polling stopped for good while it should be running, or None."""
        if self.stopping or self.proc is None:
            return None
        if not self.gone.is_set():
            silent = self.clock() - self.last_heard
            if silent <= HEARTBEAT_TIMEOUT:
                return None
            self.reason = f"the polling process has not answered for {silent:.0f} s"
        code = self._end()
        if self.reason is not None:
            return f"{self.reason} ({describe_exit(code)})"
        return f"the polling process stopped unexpectedly ({describe_exit(code)})"

    def _end(self) -> int:
        """The worker's exit status, killing it first if it is still there."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.kill()
        return self.proc.wait()

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
            structlog.get_logger().warning(
                "polling process killed", reason=f"still running {STOP_TIMEOUT:.0f} s after stop"
            )
            proc.kill()
            proc.wait()
        if self._receiver is not None:
            self._receiver.join(timeout=5)
        if self.channel >= 0:
            os.close(self.channel)
            self.channel = -1


# ----------------------------------------------------------------------------- the worker's side
class _Publisher:
    """Sends each project's latest view, and the counters when they change, to the daemon; and
    at least once a second a word that it is alive."""

    def __init__(self, channel: int, counters: Counters, stop: threading.Event) -> None:
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
        counters = self.counters.state()
        try:
            for index, status in sorted(latest.items()):
                write_frame(self.channel, ("status", index, status))
            if counters != self.sent_counters:
                write_frame(self.channel, ("counters", counters))
                self.sent_counters = counters
            elif heartbeat and not latest:
                write_frame(self.channel, ("alive",))
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
        while os.read(0, 4096):
            pass
    stop.set()


def main() -> int:
    # Ctrl-C reaches the whole process group: the daemon decides when this process stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        setup = read_frame(0)
    except (EOFError, OSError, pickle.UnpicklingError):
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
    channel = setup.channel_fd
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


def _serve(config: Config, channel: int, stop: threading.Event) -> int:
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
