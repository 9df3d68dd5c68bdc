"""The /metrics exposition (contract §4), built at scrape time from the published project views.

The message counters come from committed totals, so they continue across restarts instead of
resetting. The collector only reads immutable snapshots: a scrape never waits for a poll.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence

from prometheus_client import ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from exporter import __version__
from exporter.ledger import Totals
from exporter.poller import Counters, ProjectStatus
from exporter.records import NANO

MESSAGE_LABELS = ["project", "direction", "kind", "status", "error_code"]
# The three message counters: family name, help, and the committed total each one shows
# (the charge in nano-dollars, shown in dollars). /metrics and the backfill both use this.
MESSAGE_FAMILIES: tuple[tuple[str, str, Callable[[Totals], int]], ...] = (
    ("signalwire_messages", "Messages settled, by final outcome.", lambda t: t.messages),
    ("signalwire_message_segments", "Segments of settled messages.", lambda t: t.segments),
    (
        "signalwire_message_charge_usd",
        "Charge of settled messages, in US dollars.",
        lambda t: t.charge_nano,
    ),
)


def counter_value(family: str, total: int) -> float:
    return total / NANO if family.endswith("_usd") else total


class ExporterCollector(Collector):
    """Yields, for example:

    signalwire_messages_total{project="production",direction="outbound-api",kind="sms",
                              status="delivered",error_code=""} 1042.0
    signalwire_messages_pending{project="production",direction="outbound-api",kind="sms",
                                status="sent"} 7.0
    signalwire_up{project="production"} 1.0
    """

    def __init__(self, statuses: Callable[[], Sequence[ProjectStatus]], counters: Counters) -> None:
        self.statuses = statuses
        self.counters = counters

    def collect(self) -> Iterator[Metric]:
        statuses = list(self.statuses())
        yield from _message_families(statuses)
        yield from _gauges(statuses)
        yield from self._process_counters(statuses)
        info = GaugeMetricFamily(
            "signalwire_exporter_build_info",
            "A metric with a constant '1' value labelled by the exporter's version.",
            labels=["version"],
        )
        info.add_metric([__version__], 1)
        yield info

    def _process_counters(self, statuses: Iterable[ProjectStatus]) -> Iterator[Metric]:
        counts = self.counters.state()
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
        for status in statuses:
            bad.add_metric([status.name], counts.invalid_records.get(status.name, 0))
        yield bad
        errors = CounterMetricFamily(
            "signalwire_poll_errors",
            "Failed polls by reason: api (SignalWire unreachable or erring), auth (401/403), "
            "state (the state file could not be written), internal.",
            labels=["project", "reason"],
        )
        for (project, reason), value in sorted(counts.poll_errors.items()):
            errors.add_metric([project, reason], value)
        yield errors


def _message_families(statuses: Sequence[ProjectStatus]) -> Iterator[Metric]:
    counters = [
        (CounterMetricFamily(name, help_text, labels=MESSAGE_LABELS), name, field_of)
        for name, help_text, field_of in MESSAGE_FAMILIES
    ]
    pending = GaugeMetricFamily(
        "signalwire_messages_pending",
        "Messages seen but not yet settled, by latest status.",
        labels=["project", "direction", "kind", "status"],
    )
    for status in statuses:
        for key, totals in sorted(status.totals.items()):
            labels = [status.name, *key]
            for family, name, field_of in counters:
                family.add_metric(labels, counter_value(name, field_of(totals)))
        for pkey, count in sorted(status.pending.items()):
            pending.add_metric([status.name, *pkey], count)
    yield from (family for family, _, _ in counters)
    yield pending


def _gauges(statuses: Sequence[ProjectStatus]) -> Iterator[Metric]:
    ratio = GaugeMetricFamily(
        "signalwire_message_failure_ratio",
        "Of the messages settled in the last failure_ratio_window, the share failed or "
        "undelivered.",
        labels=["project", "direction", "kind"],
    )
    error_info = GaugeMetricFamily(
        "signalwire_message_error_info",
        "The latest description seen for each exported error code.",
        labels=["project", "error_code", "error_message"],
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
    for status in statuses:
        name = status.name
        for (direction, kind), value in sorted(status.failure_ratios.items()):
            ratio.add_metric([name, direction, kind], value)
        for code, text in sorted(status.error_info.items()):
            error_info.add_metric([name, code, text], 1)
        up.add_metric([name], 1 if status.up else 0)
        if status.last_success is not None:
            last_success.add_metric([name], status.last_success)
        if status.last_duration is not None:
            duration.add_metric([name], status.last_duration)
        cursor.add_metric([name], status.cursor)
    yield from (ratio, error_info, up, last_success, duration, cursor)


def build_registry(
    statuses: Callable[[], Sequence[ProjectStatus]], counters: Counters
) -> CollectorRegistry:
    """A private registry: this exporter's metrics plus the usual process_* metrics."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ExporterCollector(statuses, counters))
    ProcessCollector(registry=registry)
    return registry
