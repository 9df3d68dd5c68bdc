"""The daemon's handle on its polling process (exporter.worker), and the messages they exchange.

Python threads share one interpreter lock, and a poll holds it for most of its work (decoding pages,
counting records, building the published view). A scrape served by a thread of the same process
waits behind that work, so the daemon polls in a child process and serves /metrics from the views
the child sends: a scrape only competes with the thread that receives them. This module imports
nothing of the polling stack: the serving process only reads the views.

Two pipes, each a `multiprocessing.connection.Connection` (length-prefixed pickles) carrying the
typed messages below:
  daemon -> worker (its stdin): one `WorkerSetup`; end of file then means "stop".
  worker -> daemon (channel_fd): `Published`, `Counted`, `Alive`, `Loaded`, `Fatal`.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

import structlog

from exporter.config import Config
from exporter.views import CounterState, ProjectView

# How long a stopping worker may take to abandon its polls and close the state before it is
# killed: within systemd's and Kubernetes' usual grace periods.
STOP_TIMEOUT = 20.0
# The worker says it is alive every second, polls or not; this long without a word, it is hung.
HEARTBEAT_TIMEOUT = 60.0
_PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent)
# The errors of a pipe whose other end has gone, or that carried something that is not a message.
BROKEN = (EOFError, OSError, pickle.UnpicklingError)


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


# ----------------------------------------------------------------------------- the messages
@dataclass(frozen=True)
class WorkerSetup:
    """daemon -> worker, first and only: what to poll and how to log."""

    config: Config
    log_level: str
    log_format: str
    channel_fd: int  # the write end of the pipe the worker answers on
    parent_pid: int


@dataclass(frozen=True)
class Published:
    """A project's latest view; `index` is its place in the configuration."""

    index: int
    view: ProjectView


@dataclass(frozen=True)
class Counted:
    """The polling process's counters, sent when they have changed."""

    counts: CounterState


@dataclass(frozen=True)
class Alive:
    """Nothing new this second: the worker is not hung."""


@dataclass(frozen=True)
class Loaded:
    """The state is loaded and every project's first view sent: polling starts."""


@dataclass(frozen=True)
class Fatal:
    """The worker cannot go on (the state file cannot be used, or a bug): the message says why."""

    message: str


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
        on_view: Callable[[int, ProjectView], None],
        on_counts: Callable[[CounterState], None],
        log_level: str,
        log_format: str,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.on_view = on_view
        self.on_counts = on_counts
        self.log_level = log_level
        self.log_format = log_format
        self.clock = clock
        self.proc: subprocess.Popen[bytes] | None = None
        self.control: Connection | None = None  # the worker's stdin: closed to stop it
        self.channel: Connection | None = None  # what the worker sends
        self.gone = threading.Event()
        self.stopping = False
        self.last_heard = clock()
        self.reason: str | None = None  # why the worker ended, when it said or we saw
        self._receiver: threading.Thread | None = None
        self._channel_fd = -1  # the worker's end of the channel, as numbered in both processes

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def start(self) -> None:
        """Spawn the worker and wait until it has loaded the state (or raise WorkerError)."""
        self._spawn()
        assert self.control is not None and self.channel is not None
        setup = WorkerSetup(
            self.config, self.log_level, self.log_format, self._channel_fd, os.getpid()
        )
        with contextlib.suppress(OSError):  # it died at once: reported below from its exit status
            self.control.send(setup)
        while True:
            try:
                message = self.channel.recv()
            except BROKEN:
                code = self._end()
                raise WorkerError(
                    f"the polling process ended before loading the state ({describe_exit(code)})"
                ) from None
            match message:
                case Loaded():
                    break
                case Fatal(text):
                    self._end()
                    raise WorkerError(text)
                case _:
                    try:
                        self._dispatch(message)
                    except TypeError as exc:
                        self._end()
                        raise WorkerError(str(exc)) from None
        self.last_heard = self.clock()
        self._receiver = threading.Thread(target=self._receive, name="worker-views", daemon=True)
        self._receiver.start()

    def _spawn(self) -> None:
        """Start the worker process with its two pipes."""
        stdin_read, stdin_write = os.pipe()
        channel_read, channel_write = os.pipe()
        try:
            # A process group of its own: a terminal's Ctrl-C reaches the daemon only, which
            # then stops its worker.
            self.proc = subprocess.Popen(
                worker_command(), stdin=stdin_read, pass_fds=(channel_write,), process_group=0
            )
        except OSError as exc:
            os.close(stdin_write)
            os.close(channel_read)
            raise WorkerError(f"cannot start the polling process: {exc}") from None
        finally:
            os.close(stdin_read)
            os.close(channel_write)
        self._channel_fd = channel_write  # its number in the worker, which inherited it
        self.control = Connection(stdin_write, readable=False)
        self.channel = Connection(channel_read, writable=False)

    def _dispatch(self, message: object) -> None:
        match message:
            case Published(index, view):
                self.on_view(index, view)
            case Counted(counts):
                self.on_counts(counts)
            case Alive():
                pass
            case Fatal(text):
                self.reason = text
            case _:
                raise TypeError(f"not a message of the polling process: {message!r}")

    def _receive(self) -> None:
        assert self.channel is not None
        try:
            while True:
                message = self.channel.recv()
                self.last_heard = self.clock()
                self._dispatch(message)
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
        if self.control is not None:
            with contextlib.suppress(OSError):
                self.control.close()
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
        if self.channel is not None:
            self.channel.close()
            self.channel = None
