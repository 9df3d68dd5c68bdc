"""`signalwire-exporter backfill`: past message logs as OpenMetrics text for
`promtool tsdb create-blocks-from openmetrics`, so dashboards show history from day one.

Messages are settled by the daemon's own ledger, in order of creation, one step at a time; the
counters are written at every step boundary for every series, from the first boundary on, so
`increase()` over windows aligned to the step is exact. A backfilled message counts at its creation
time (the live daemon counts at settlement, a few seconds later for most).

By default the period ends where live counting starts: the project's start point in the state file
(nothing is counted twice), or now when the project has never run. In that second case the state
file is seeded with what was counted, so the daemon's counters continue the backfilled totals
instead of starting from zero.
"""

from __future__ import annotations

import math
import re
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TextIO

from exporter.client import HISTORY_LIMIT_CODE, ApiError, Client
from exporter.config import Config, ProjectConfig, parse_duration
from exporter.ledger import (
    LISTING_SLACK,
    DimensionKey,
    LabelKey,
    Ledger,
    LedgerState,
    PollPlan,
    Rules,
    Totals,
)
from exporter.metrics import COUNTER_FAMILIES
from exporter.records import InvalidRecord, Message, format_timestamp, parse_message
from exporter.store import StateError, Store, committed_start_point
from exporter.views import SettledTotals, TotalsLike

LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
RESERVED_LABELS = {label for family in COUNTER_FAMILIES for label in family.labels}


class BackfillError(Exception):
    """The backfill cannot go on; the message says why and what to do."""


def parse_time(text: str, now: float) -> float:
    """An ISO date or date-time (UTC unless it says otherwise), or a duration back from now."""
    text = text.strip()
    try:
        return now - parse_duration(text)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(
            f"{text!r} is neither a date/time (2026-10-01, 2026-10-01T12:00:00Z) nor a duration "
            "back from now (30d, 12h)"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def parse_label(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not LABEL_NAME.fullmatch(name) or name.startswith("__"):
        raise ValueError(f"{text!r} is not NAME=VALUE with a Prometheus label name")
    if name in RESERVED_LABELS:
        raise ValueError(f"{name} is one of the exporter's own labels")
    return name, value


@dataclass(frozen=True)
class StepTotals:
    """What one step settled: the increments of the counters, by error code, country and group."""

    totals: dict[LabelKey, Totals]
    by_country: dict[DimensionKey, Totals]
    by_group: dict[DimensionKey, Totals]


@dataclass
class ProjectHistory:
    """One project's settled history: cumulative totals at each step boundary."""

    name: str
    boundaries: list[float]
    increments: list[StepTotals]  # per boundary
    final: LedgerState
    seeded: bool = False
    listed: int = 0


@dataclass
class Progress:
    """A progress bar with an ETA on stderr, from how much of the period the listing covered."""

    stream: TextIO
    label: str
    start: float
    end: float
    began: float = field(default_factory=time.monotonic)
    oldest: float | None = None
    newest: float | None = None
    newest_first: bool | None = None  # the listing's order, read off its first page
    records: int = 0
    _last: float = 0.0
    _printed: float = 0.0

    def update(self, created: list[float], force: bool = False) -> None:
        if self.newest_first is None and len(created) > 1:
            self.newest_first = created[0] >= created[-1]
        for c in created:
            self.records += 1
            self.oldest = c if self.oldest is None else min(self.oldest, c)
            self.newest = c if self.newest is None else max(self.newest, c)
        now = time.monotonic()
        if not force and now - self._last < 0.5:
            return
        self._last = now
        span = max(self.end - self.start, 1.0)
        covered = 0.0
        if self.oldest is not None and self.newest is not None:
            reached = self.end - self.oldest if self.newest_first else self.newest - self.start
            covered = reached / span
        fraction = 1.0 if force else min(max(covered, 0.0), 0.99)
        elapsed = now - self.began
        eta = elapsed * (1 - fraction) / fraction if fraction > 0 else None
        width = 30
        bar = "#" * int(fraction * width) + "-" * (width - int(fraction * width))
        eta_text = "done" if force else ("ETA --" if eta is None else f"ETA {eta:4.0f}s")
        line = (
            f"{self.label}: [{bar}] {fraction:4.0%} {self.records} records "
            f"{elapsed:4.0f}s {eta_text}"
        )
        if self.stream.isatty():
            print(f"\r{line}", end="\n" if force else "", file=self.stream, flush=True)
        elif force or now - self._printed >= 5.0:  # a log file gets a line every 5 s
            self._printed = now
            print(line, file=self.stream, flush=True)


def step_boundaries(start: float, end: float, step: float) -> list[float]:
    """Aligned boundaries from the last one at or before `start`, then `end` itself."""
    first = math.floor(start / step) * step
    count = max(0, math.ceil((end - first) / step))
    boundaries = [first + i * step for i in range(count) if first + i * step < end]
    return [*boundaries, end]


def list_messages(
    client: Client, start: float, end: float, progress: Progress
) -> Iterator[Message]:
    """Every valid message created in [start, end), each once."""
    seen: set[str] = set()
    for page in client.list_pages(start - LISTING_SLACK, end):
        batch: list[float] = []
        for raw in page.records:
            try:
                message = parse_message(raw)
            except InvalidRecord:
                continue
            if message.id in seen or not start <= message.created_at < end:
                continue
            seen.add(message.id)
            batch.append(message.created_at)
            yield message
        progress.update(batch)


def settle_history(
    rules: Rules, messages: Iterable[Message], start: float, boundaries: list[float], now: float
) -> tuple[list[StepTotals], LedgerState]:
    """Run the ledger over the history, one step at a time, in order of creation."""
    ledger = Ledger(rules, LedgerState(start_point=start, cursor=start))
    ordered = sorted(messages, key=lambda m: (m.created_at, m.id))
    increments: list[StepTotals] = []
    i = 0
    for boundary in boundaries:
        horizon = ledger.state.cursor - LISTING_SLACK
        batch = ledger.begin(PollPlan(now, ((horizon, None),), horizon, (), frozenset()))
        while i < len(ordered) and ordered[i].created_at <= boundary:
            batch.observe(ordered[i], now)
            i += 1
        delta = batch.close(now, boundary)
        delta.window_add = {}  # history does not belong in the live failure-ratio window
        ledger.apply(delta)
        increments.append(StepTotals(delta.totals, delta.by_country, delta.by_group))
    return increments, ledger.state


def backfill_project(
    config: Config,
    project: ProjectConfig,
    start: float,
    end: float | None,
    step: float,
    now: float,
    stderr: TextIO,
) -> ProjectHistory:
    committed = committed_start_point(config.state_path, project.name)
    seed = end is None and committed is None
    stop = end if end is not None else (committed if committed is not None else now)
    if stop <= start:
        raise BackfillError(
            f"{project.name}: nothing to backfill: --from {format_timestamp(start)} is not before "
            f"{format_timestamp(stop)}" + (" (where live counting started)" if committed else "")
        )
    client = Client.for_project(project, config)
    progress = Progress(stderr, project.name, start, stop)
    try:
        messages = list(list_messages(client, start, stop, progress))
    except ApiError as exc:
        if exc.code != HISTORY_LIMIT_CODE:
            raise BackfillError(f"{project.name}: SignalWire API: {exc}") from None
        oldest = client.oldest_listable(start, now, probes=12)
        days = (now - oldest) / 86400
        raise BackfillError(
            f"{project.name}: SignalWire keeps message logs for about {days:.0f} days on this "
            f"account: the oldest time it allows is about {format_timestamp(oldest)}; run again "
            f"with --from {format_timestamp(math.ceil(oldest / 3600) * 3600)} or later"
        ) from None
    finally:
        client.close()
    progress.update([], force=True)
    rules = Rules.of(config)
    boundaries = step_boundaries(start, stop, step)
    increments, final = settle_history(rules, messages, start, boundaries, now)
    history = ProjectHistory(project.name, boundaries, increments, final, listed=len(messages))
    if seed:
        try:
            store = Store(config.state_path)
        except StateError as exc:
            raise BackfillError(
                f"{exc}; a backfill that seeds the state file needs the daemon stopped "
                "(or pass --to to only write the OpenMetrics file)"
            ) from None
        try:
            store.seed(project.name, start, final.as_delta())
        finally:
            store.close()
        history.seeded = True
    return history


def write_openmetrics(
    out: TextIO, histories: list[ProjectHistory], extra_labels: list[tuple[str, str]]
) -> int:
    """The settled-message counters, family by family, every series at every boundary."""
    samples = 0
    extra = "".join(f',{name}="{_escape(value)}"' for name, value in extra_labels)
    for family in COUNTER_FAMILIES:
        name = family.name
        out.write(f"# HELP {name} {family.help}\n# TYPE {name} counter\n")
        for history in histories:
            for key in sorted(family.source(history.final)):
                labels = ",".join(
                    f'{label}="{_escape(value)}"'
                    for label, value in zip(family.labels, (history.name, *key), strict=True)
                )
                total = SettledTotals()
                for boundary, step in zip(history.boundaries, history.increments, strict=True):
                    increment = family.source(step).get(key)
                    if increment is not None:
                        total = _plus(total, increment)
                    value = family.value(total)
                    out.write(f"{name}_total{{{labels}{extra}}} {value} {_timestamp(boundary)}\n")
                    samples += 1
    out.write("# EOF\n")
    return samples


def run_backfill(
    config: Config,
    start_text: str,
    end_text: str | None,
    step: float,
    labels: list[tuple[str, str]],
    output: str,
    clock: Callable[[], float] = time.time,
    stderr: TextIO = sys.stderr,
) -> int:
    now = clock()
    try:
        start = parse_time(start_text, now)
        end = parse_time(end_text, now) if end_text else None
    except ValueError as exc:
        raise BackfillError(str(exc)) from None
    if end is not None and end > now:
        raise BackfillError(f"--to {end_text} is in the future")
    histories = [
        backfill_project(config, project, start, end, step, now, stderr)
        for project in config.projects
    ]
    try:
        with open(output, "w", encoding="utf-8") as out:
            samples = write_openmetrics(out, histories, labels)
    except OSError as exc:
        raise BackfillError(f"cannot write {output}: {exc.strerror}") from None
    for h in histories:
        counted = sum(t.messages for t in h.final.totals.values())
        note = (
            "; state file seeded: the daemon continues these totals"
            if h.seeded
            else "; ends where live counting started"
            if end is None
            else ""
        )
        print(
            f"{h.name}: {h.listed} messages listed, {counted} settled, "
            f"{len(h.final.pending)} still pending, {format_timestamp(h.boundaries[0])} to "
            f"{format_timestamp(h.boundaries[-1])}{note}",
            file=stderr,
        )
    print(
        f"wrote {samples} samples to {output}; next: promtool tsdb create-blocks-from "
        f"openmetrics {output} ./data",
        file=stderr,
    )
    return 0


def _plus(total: SettledTotals, increment: TotalsLike) -> SettledTotals:
    return SettledTotals(
        total.messages + increment.messages,
        total.segments + increment.segments,
        total.charge_nano + increment.charge_nano,
    )


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _timestamp(seconds: float) -> str:
    return str(int(seconds)) if seconds == int(seconds) else f"{seconds:.3f}"
