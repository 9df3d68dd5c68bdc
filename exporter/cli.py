"""Command line (docs/cli.md): run, check, demo, backfill, --version."""

from __future__ import annotations

import argparse
import difflib
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from types import FrameType
from typing import NoReturn

import structlog

from exporter import __version__
from exporter.config import (
    Config,
    ConfigError,
    ListenAddress,
    load_config,
    parse_duration,
    parse_listen_address,
)
from exporter.daemon import Exporter, FatalError
from exporter.logs import LEVELS, configure, redact_tokens, scrub
from exporter.webconfig import WebConfig, load_web_config

COMMANDS = ("run", "check", "demo", "backfill")
# The demo serves simulated data: on this machine only, unless asked otherwise.
DEMO_LISTEN = ListenAddress("127.0.0.1", 9797)
PROG = "signalwire-exporter"


class UsageError(Exception):
    pass


class _Exit(Exception):
    """argparse finished on its own (--help): the status to return."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see {self.prog} --help)")

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        if message:
            print(message, end="", file=sys.stderr)
        raise _Exit(status)


def _one_line(text: str) -> str:
    """Messages for stderr are one line, whatever the file or the environment held."""
    return " ".join(text.split())


def _listen(text: str) -> ListenAddress:
    try:
        return parse_listen_address(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value <= 10_000:
        raise argparse.ArgumentTypeError("must be between 0 and 10000 messages per second")
    return value


def _parser(command: str) -> argparse.ArgumentParser:
    prog = f"{PROG} {command}"
    p = _Parser(prog=prog, description=_DESCRIPTIONS[command], allow_abbrev=False)
    if command in ("run", "check", "backfill"):
        p.add_argument(
            "--config.file",
            dest="config_file",
            default="config.yaml",
            metavar="PATH",
            help="configuration file (default: config.yaml)",
        )
    if command in ("run", "demo"):
        p.add_argument(
            "--web.listen-address",
            dest="listen",
            type=_listen,
            metavar="HOST:PORT",
            help=(
                "address to serve /metrics, the status page and the health endpoints on "
                + (
                    "(default: listen_address of the file, or 0.0.0.0:9797)"
                    if command == "run"
                    else f"(default: {DEMO_LISTEN})"
                )
            ),
        )
        p.add_argument(
            "--web.config.file",
            dest="web_config",
            metavar="PATH",
            help="TLS and basic auth for every endpoint, in the exporter-toolkit format",
        )
    if command == "backfill":
        _backfill_arguments(p)
    if command == "demo":
        p.add_argument(
            "--demo.rate",
            dest="rate",
            type=_rate,
            default=2.0,
            metavar="MESSAGES_PER_SECOND",
            help="synthetic messages per second (default: 2)",
        )
    p.add_argument(
        "--log.level",
        dest="log_level",
        choices=LEVELS,
        default="info",
        help="least severe events logged (default: info)",
    )
    p.add_argument(
        "--log.format",
        dest="log_format",
        choices=("logfmt", "json"),
        default="logfmt",
        help="one event per line on stderr, as logfmt or JSON (default: logfmt)",
    )
    return p


# The backfill, the API client and the state file are imported where a command uses them: the
# daemon's serving process needs none of them (and stays smaller without).


def _time(text: str) -> str:
    from exporter.backfill import parse_time

    try:
        parse_time(text, time.time())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _step(text: str) -> float:
    try:
        seconds = parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if seconds < 1:
        raise argparse.ArgumentTypeError("must be at least 1s")
    return seconds


def _label(text: str) -> tuple[str, str]:
    from exporter.backfill import parse_label

    try:
        return parse_label(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _backfill_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--from", dest="start", required=True, type=_time, metavar="TIME",
        help="start of the period: an ISO date/time (2026-10-01) or a duration back (30d)",
    )  # fmt: skip
    p.add_argument(
        "--to", dest="end", type=_time, metavar="TIME",
        help="end of the period (default: where live counting started, or now)",
    )  # fmt: skip
    p.add_argument(
        "--step", dest="step", type=_step, default=60.0, metavar="DURATION",
        help="time between samples (default: 1m)",
    )  # fmt: skip
    p.add_argument(
        "--label", dest="labels", type=_label, action="append", default=[], metavar="NAME=VALUE",
        help="a label added to every series, e.g. job=signalwire (repeatable)",
    )  # fmt: skip
    p.add_argument(
        "--output", dest="output", required=True, metavar="FILE.om",
        help="the OpenMetrics file to write",
    )  # fmt: skip


_DESCRIPTIONS = {
    "run": "Poll SignalWire message logs and serve Prometheus metrics (the default command).",
    "check": "Load the configuration and make one small authenticated request per project.",
    "demo": "Run the exporter against a built-in SignalWire simulator; no account needed.",
    "backfill": "Write past message logs as OpenMetrics for promtool tsdb create-blocks-from; "
    "before a project's first start, also seed the state file so live counting continues them.",
}


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:  # Ctrl-C outside the daemon (e.g. during check): a quiet stop
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


def _main(argv: Sequence[str] | None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("--version", "-V", "version"):
        print(f"{PROG} {__version__}")
        return 0
    if args and args[0] in ("-h", "--help"):
        print(f"usage: {PROG} [{'|'.join(COMMANDS)}] [flags]   ({PROG} COMMAND --help for flags)")
        for name in COMMANDS:
            print(f"  {name:8} {_DESCRIPTIONS[name]}")
        print(f"  {PROG} --version")
        return 0
    command = "run"
    if args and args[0] in COMMANDS:
        command = args.pop(0)
    elif args and not args[0].startswith("-"):
        hint = difflib.get_close_matches(args[0], COMMANDS, n=1)
        did_you_mean = f" (did you mean {hint[0]!r}?)" if hint else ""
        print(
            _one_line(
                f"{PROG}: error: unknown command {args[0]!r}{did_you_mean}; "
                f"commands: {', '.join(COMMANDS)} (see {PROG} --help)"
            ),
            file=sys.stderr,
        )
        return 2
    try:
        options = _parser(command).parse_args(args)
    except UsageError as exc:
        print(_one_line(f"{PROG}: error: {exc}"), file=sys.stderr)
        return 2
    except _Exit as exc:
        return exc.status
    configure(options.log_level, options.log_format)
    try:
        if command == "check":
            return _check(options.config_file)
        if command == "backfill":
            return _backfill(options)
        if command == "demo":
            from exporter.demo import run_demo

            listen = options.listen or DEMO_LISTEN
            return run_demo(listen, options.rate, _web(options.web_config))
        return _run(options.config_file, options.listen, options.web_config)
    except ConfigError as exc:
        print(_one_line(f"{PROG}: configuration error: {scrub(str(exc))}"), file=sys.stderr)
        return 2


def _load(config_file: str) -> Config:
    """The configuration, its tokens kept out of every log line and error text from now on."""
    config = load_config(config_file)
    redact_tokens(config)
    return config


def _backfill(options: argparse.Namespace) -> int:
    from exporter.backfill import BackfillError, run_backfill
    from exporter.store import StateError

    config = _load(options.config_file)
    try:
        return run_backfill(
            config, options.start, options.end, options.step, options.labels, options.output
        )
    except (BackfillError, StateError) as exc:
        print(_one_line(f"{PROG}: backfill: {scrub(str(exc))}"), file=sys.stderr)
        return 1


def _web(path: str | None) -> WebConfig | None:
    return load_web_config(path) if path else None


def _run(config_file: str, listen: ListenAddress | None, web_config: str | None) -> int:
    config = _load(config_file)
    web = _web(web_config)
    return serve(Exporter(config, listen, web=web))


def serve(exporter: Exporter, on_started: Callable[[], None] | None = None) -> int:
    """Run an Exporter until SIGTERM/SIGINT; 0 after a clean stop, 1 on a fatal error."""
    log = structlog.get_logger()
    stopping = threading.Event()

    def on_signal(signum: int, _: FrameType | None) -> None:
        log.info("shutting down", signal=signal.Signals(signum).name)
        stopping.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    started = False
    try:
        exporter.start()
        started = True
        if on_started is not None:
            on_started()
        while not stopping.wait(1.0):
            exporter.check()
    except FatalError as exc:
        log.error("stopping on a fatal error" if started else "cannot start", error=str(exc))
        print(_one_line(f"{PROG}: {scrub(str(exc))}"), file=sys.stderr)
        exporter.shutdown()
        return 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    exporter.shutdown()
    return 0


def _check(config_file: str) -> int:
    from exporter.client import ApiError, Client, RetryPolicy
    from exporter.store import state_path_problem

    config = _load(config_file)
    for warning in config.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    failures = 0
    for project in config.projects:
        client = Client.for_project(
            project,
            config,
            page_size=1,
            retry=RetryPolicy(attempts=2, base_delay=0.5, max_delay=1.0, max_retry_after=5.0),
        )
        try:
            page = next(iter(client.list_pages(None)))
        except ApiError as exc:
            failures += 1
            print(_one_line(f"{project.name}: FAILED: {scrub(str(exc))}"), flush=True)
        else:
            found = "a message log" if page.records else "no message logs yet"
            print(f"{project.name}: ok ({project.base_url}, {found})", flush=True)
        finally:
            client.close()
    problem = state_path_problem(config.state_path)
    if problem is None:
        print(f"state file: ok ({config.state_path})", flush=True)
    else:
        failures += 1
        print(_one_line(f"state file: FAILED: {config.state_path}: {problem}"), flush=True)
    return 1 if failures else 0
