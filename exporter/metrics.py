"""The /metrics exposition (docs/metrics.md), built at scrape time from the published views.

The message counters come from committed totals, so they continue across restarts instead of
resetting. The collector only reads immutable snapshots: a scrape never waits for a poll.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from operator import attrgetter
from typing import Any

from prometheus_client import ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from exporter import __version__
from exporter.errors import category
from exporter.records import NANO
from exporter.views import CounterState, ProjectView, TotalsKey, TotalsLike

POLL_ERROR_REASONS = ("api", "auth", "state", "internal")
# The totals a counter family is drawn from (a published view, or the backfill's ledger state): by
# error code, by country or by number group; each keyed by direction, kind, status and that fourth
# label's value.
Source = Callable[[Any], Mapping[TotalsKey, TotalsLike]]


@dataclass(frozen=True)
class CounterFamily:
    """A settled-message counter: its name (without _total), help, the label after direction,
    kind and status, where its totals come from and which figure of them it shows."""

    name: str
    help: str
    label: str
    source: Source
    value: Callable[[TotalsLike], float]

    @property
    def labels(self) -> list[str]:
        return ["project", "direction", "kind", "status", self.label]


def _messages(t: TotalsLike) -> float:
    return t.messages


def _dollars(t: TotalsLike) -> float:
    return t.charge_nano / NANO


_BY_CODE: Source = attrgetter("totals")
_BY_COUNTRY: Source = attrgetter("by_country")
_BY_GROUP: Source = attrgetter("by_group")
# The settled-message counters, from committed totals; /metrics and the backfill both use this.
COUNTER_FAMILIES = (
    CounterFamily(
        "signalwire_messages",
        "Messages settled, by final outcome.",
        "error_code",
        _BY_CODE,
        _messages,
    ),
    CounterFamily(
        "signalwire_message_segments",
        "Segments of settled messages.",
        "error_code",
        _BY_CODE,
        attrgetter("segments"),
    ),
    CounterFamily(
        "signalwire_message_charge_usd",
        "Charge of settled messages, in US dollars.",
        "error_code",
        _BY_CODE,
        _dollars,
    ),
    CounterFamily(
        "signalwire_messages_by_country",
        "Messages settled, by the remote number's country.",
        "country",
        _BY_COUNTRY,
        _messages,
    ),
    CounterFamily(
        "signalwire_message_charge_usd_by_country",
        "Charge of settled messages by the remote number's country, in US dollars.",
        "country",
        _BY_COUNTRY,
        _dollars,
    ),
    CounterFamily(
        "signalwire_messages_by_number_group",
        "Messages settled, by the number group of the project's own number.",
        "number_group",
        _BY_GROUP,
        _messages,
    ),
    CounterFamily(
        "signalwire_message_charge_usd_by_number_group",
        "Charge of settled messages by the number group of the project's own number, in US "
        "dollars.",
        "number_group",
        _BY_GROUP,
        _dollars,
    ),
)


class ExporterCollector(Collector):
    """Yields, for example:

    signalwire_messages_total{project="production",direction="outbound-api",kind="sms",
                              status="delivered",error_code=""} 1042.0
    signalwire_messages_pending{project="production",direction="outbound-api",kind="sms",
                                status="sent"} 7.0
    signalwire_up{project="production"} 1.0
    """

    def __init__(
        self, views: Callable[[], Sequence[ProjectView]], counts: Callable[[], CounterState]
    ) -> None:
        self.views = views
        self.counts = counts

    def collect(self) -> Iterator[Metric]:
        views = list(self.views())
        yield from _message_families(views)
        yield from _gauges(views)
        yield from self._process_counters(views)
        info = GaugeMetricFamily(
            "signalwire_exporter_build_info",
            "A metric with a constant '1' value labelled by the exporter's version.",
            labels=["version"],
        )
        info.add_metric([__version__], 1)
        yield info

    def _process_counters(self, views: Iterable[ProjectView]) -> Iterator[Metric]:
        counts = self.counts()
        api = CounterMetricFamily(
            "signalwire_api_requests",
            'Requests to SignalWire\'s API by HTTP status; code="error" for timeouts and '
            "connection failures.",
            labels=["project", "code"],
        )
        for (project, code), value in sorted(counts.api_requests.items()):
            api.add_metric([project, code], value)
        yield api
        bad = CounterMetricFamily(
            "signalwire_invalid_records",
            "Message log records skipped as malformed.",
            labels=["project"],
        )
        for view in views:
            bad.add_metric([view.name], counts.invalid_records.get(view.name, 0))
        yield bad
        late = CounterMetricFamily(
            "signalwire_late_records",
            "Records first seen with a created_at behind the cursor (SignalWire's log showed them "
            "late); counted normally as well.",
            labels=["project"],
        )
        for view in views:
            late.add_metric([view.name], counts.late_records.get(view.name, 0))
        yield late
        errors = CounterMetricFamily(
            "signalwire_poll_errors",
            "Failed polls by reason: api (SignalWire unreachable or erring), auth (401/403), "
            "state (the state file could not be written), internal.",
            labels=["project", "reason"],
        )
        # Every reason of every project from the start, at 0 until it happens: a rate over a
        # series that appears only with its first error would miss that first error.
        keys = {(v.name, reason) for v in views for reason in POLL_ERROR_REASONS}
        for project, reason in sorted(keys | counts.poll_errors.keys()):
            errors.add_metric([project, reason], counts.poll_errors.get((project, reason), 0))
        yield errors


def _message_families(views: Sequence[ProjectView]) -> Iterator[Metric]:
    for spec in COUNTER_FAMILIES:
        family = CounterMetricFamily(spec.name, spec.help, labels=spec.labels)
        for view in views:
            for key, totals in sorted(spec.source(view).items()):
                family.add_metric([view.name, *key], spec.value(totals))
        yield family
    pending = GaugeMetricFamily(
        "signalwire_messages_pending",
        "Messages seen but not yet settled, by latest status.",
        labels=["project", "direction", "kind", "status"],
    )
    oldest = GaugeMetricFamily(
        "signalwire_messages_pending_oldest_created_timestamp_seconds",
        "created_at of the oldest message pending in the label set, Unix time.",
        labels=["project", "direction", "kind", "status"],
    )
    for view in views:
        for pkey, count in sorted(view.pending.items()):
            pending.add_metric([view.name, *pkey], count)
        for pkey, created in sorted(view.pending_oldest.items()):
            oldest.add_metric([view.name, *pkey], created)
    yield pending
    yield oldest


def _gauges(views: Sequence[ProjectView]) -> Iterator[Metric]:
    ratio = GaugeMetricFamily(
        "signalwire_message_failure_ratio",
        "Of the messages settled in the last failure_ratio_window, the share failed or "
        "undelivered.",
        labels=["project", "direction", "kind"],
    )
    error_info = GaugeMetricFamily(
        "signalwire_message_error_info",
        "The latest description seen for each exported error code, and the cause it stands for.",
        labels=["project", "error_code", "error_message", "category"],
    )
    up = GaugeMetricFamily(
        "signalwire_up", "1 if the last poll of the project succeeded, else 0.", labels=["project"]
    )
    last_success = GaugeMetricFamily(
        "signalwire_last_successful_poll_timestamp_seconds",
        "End of the last successful poll, Unix time.",
        labels=["project"],
    )
    duration = GaugeMetricFamily(
        "signalwire_poll_duration_seconds", "Duration of the last poll.", labels=["project"]
    )
    cursor = GaugeMetricFamily(
        "signalwire_cursor_timestamp_seconds",
        "Every message created up to this time has been fetched, Unix time.",
        labels=["project"],
    )
    for view in views:
        name = view.name
        for (direction, kind), value in sorted(view.failure_ratios.items()):
            ratio.add_metric([name, direction, kind], value)
        for code, text in sorted(view.error_info.items()):
            error_info.add_metric([name, code, text, category(code)], 1)
        up.add_metric([name], 1 if view.up else 0)
        if view.last_success is not None:
            last_success.add_metric([name], view.last_success)
        if view.last_duration is not None:
            duration.add_metric([name], view.last_duration)
        cursor.add_metric([name], view.cursor)
    yield from (ratio, error_info, up, last_success, duration, cursor)


class PollerProcessCollector(Collector):
    """The process metrics of the polling process, under their own names and help text (the
    serving process has the usual process_* ones)."""

    def __init__(self, namespace: str, pid: Callable[[], int | None]) -> None:
        """`pid`: the polling process's id, None while there is none (then no series)."""
        self.pid = pid
        self._current = 0
        self._process = ProcessCollector(
            namespace=namespace, pid=lambda: self._current, registry=None
        )

    def collect(self) -> Iterator[Metric]:
        pid = self.pid()
        if pid is None:
            return
        self._current = pid
        for metric in self._process.collect():
            metric.documentation = f"Polling process: {metric.documentation}"
            yield metric


def build_registry(
    views: Callable[[], Sequence[ProjectView]], counts: Callable[[], CounterState]
) -> CollectorRegistry:
    """A private registry: this exporter's metrics plus the usual process_* metrics."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ExporterCollector(views, counts))
    ProcessCollector(registry=registry)
    return registry
