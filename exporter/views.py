"""What the polling process publishes and the serving process reads: plain, immutable values.

No I/O and nothing of the polling stack (client, ledger, store): /metrics, the landing page and
the daemon's serving side depend on this module only, and every value here pickles as it is for
the trip from the polling process to the serving process (exporter.polling).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

from exporter.catchup import Progress
from exporter.config import format_duration
from exporter.records import format_timestamp

# direction, kind, status, and the fourth label: the error code, the country or the number group.
TotalsKey = tuple[str, str, str, str]
PendingKey = tuple[str, str, str]  # direction, kind, status


class TotalsLike(Protocol):
    """What a counter is drawn from: the published `SettledTotals`, or the ledger's own."""

    @property
    def messages(self) -> int: ...

    @property
    def segments(self) -> int: ...

    @property
    def charge_nano(self) -> int: ...


class SettledTotals(NamedTuple):
    """A label set's settled totals at the time of the view."""

    messages: int = 0
    segments: int = 0
    charge_nano: int = 0


class CounterState(NamedTuple):
    """The polling process's own counters (they start again at zero on restart), as sent."""

    api_requests: dict[tuple[str, str], int]  # (project, HTTP status or "error")
    invalid_records: dict[str, int]
    poll_errors: dict[tuple[str, str], int]  # (project, reason)
    late_records: dict[str, int]

    @classmethod
    def zero(cls) -> CounterState:
        """Before the polling process has sent any."""
        return cls({}, {}, {}, {})


@dataclass(frozen=True)
class RecentSummary:
    """What settled lately, counted in memory since the exporter started: plain figures (no
    reference to the buckets of exporter.recent that they are summed from)."""

    since: float  # counting began here (the exporter's start): the figures cover no more
    settled_hour: int = 0
    settled_day: int = 0
    outbound_hour: int = 0  # outbound messages settled in the last hour
    outbound_failed_hour: int = 0  # of those, failed or undelivered
    charge_nano_today: int = 0  # since 00:00 UTC
    charge_nano_day: int = 0  # last 24 h

    @property
    def failure_ratio_hour(self) -> float | None:
        """Failed or undelivered among the outbound settled in the last hour; None when none."""
        if not self.outbound_hour:
            return None
        return self.outbound_failed_hour / self.outbound_hour


@dataclass(frozen=True)
class StartNote:
    """The configured start_from reaches before the start point recorded at the project's first
    start: start_from applies to a first start only, so the messages in between are not counted."""

    start_from: float  # seconds, as configured now
    wanted: float  # where start_from would start counting at this start
    start_point: float  # where counting started, as recorded
    command: str  # the backfill that counts the messages in between
    one_project_config: bool = False  # backfill covers every project of the file: use one

    @property
    def text(self) -> str:
        """The note in words, without the command."""
        only = (
            " (with a configuration file holding this project only: backfill covers every "
            "project of the file)"
            if self.one_project_config
            else ""
        )
        return (
            f"start_from ({format_duration(round(self.start_from))}) would start counting at "
            f"{format_timestamp(self.wanted)}, before the start point recorded at the first "
            f"start, {format_timestamp(self.start_point)}; start_from applies to a first start "
            "only, so the messages created in between are not counted. To count them in "
            f"Prometheus, run{only}:"
        )


@dataclass(frozen=True)
class ProjectView:
    """One project as /metrics and the landing page show it, replaced at every publication."""

    name: str
    polled: bool = False
    up: bool = False
    last_success: float | None = None
    last_duration: float | None = None
    last_error: str | None = None
    cursor: float = 0.0
    totals: dict[TotalsKey, SettledTotals] = field(default_factory=dict)  # by error code
    by_country: dict[TotalsKey, SettledTotals] = field(default_factory=dict)
    by_group: dict[TotalsKey, SettledTotals] = field(default_factory=dict)
    pending: dict[PendingKey, int] = field(default_factory=dict)
    pending_oldest: dict[PendingKey, float] = field(default_factory=dict)
    failure_ratios: dict[tuple[str, str], float] = field(default_factory=dict)
    error_info: dict[str, str] = field(default_factory=dict)
    catch_up: Progress | None = None  # while a backlog is being taken in
    recent: RecentSummary | None = None  # settled lately, counted since the exporter started
    start_note: StartNote | None = None  # start_from reaches before the recorded start point

    @property
    def pending_total(self) -> int:
        return sum(self.pending.values())
