"""What settled lately, for the landing page: pure logic, no I/O, no clock (times are passed in).

Each committed poll adds what it settled at its commit time into one of 1440 per-minute buckets, a
ring covering 24 hours: a bucket is reused (emptied) when its minute comes round again, so memory
stays the same whatever the traffic. The counts live in memory only: after a restart they start
from zero, and cover at most the time since then.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from exporter.ledger import FAILED_STATUSES, LabelKey, Totals
from exporter.views import RecentSummary

BUCKET_SECONDS = 60
BUCKETS = 1440  # 24 h of minutes
HOUR = 3600
DAY = 86400


def is_outbound(direction: str) -> bool:
    """outbound, outbound-api, outbound-call, outbound-reply."""
    return direction.startswith("outbound")


class RecentCounts:
    """Rolling per-minute counts of settled messages over the last 24 hours."""

    __slots__ = ("_charge", "_failed", "_minute", "_outbound", "_settled", "since")

    def __init__(self, since: float) -> None:
        self.since = since
        self._minute = [-1] * BUCKETS  # which minute (seconds // 60) each bucket holds; -1: none
        self._settled = [0] * BUCKETS
        self._outbound = [0] * BUCKETS
        self._failed = [0] * BUCKETS
        self._charge = [0] * BUCKETS

    def __len__(self) -> int:
        """Buckets in use (at most BUCKETS)."""
        return sum(1 for m in self._minute if m >= 0)

    def add(self, at: float, totals: Mapping[LabelKey, Totals]) -> None:
        """Count what one committed poll settled (its increments by label set), at `at`."""
        settled = outbound = failed = charge = 0
        for (direction, _kind, status, _code), t in totals.items():
            settled += t.messages
            charge += t.charge_nano
            if is_outbound(direction):
                outbound += t.messages
                if status in FAILED_STATUSES:
                    failed += t.messages
        if not settled and not charge:
            return
        minute = math.floor(at / BUCKET_SECONDS)
        i = minute % BUCKETS
        if self._minute[i] != minute:
            if self._minute[i] > minute:
                return  # older than what the bucket now holds: more than 24 h old
            self._minute[i] = minute
            self._settled[i] = self._outbound[i] = self._failed[i] = self._charge[i] = 0
        self._settled[i] += settled
        self._outbound[i] += outbound
        self._failed[i] += failed
        self._charge[i] += charge

    def summary(self, now: float) -> RecentSummary:
        """The last hour, the last 24 hours and the UTC day so far, by whole minutes up to now's."""
        current = math.floor(now / BUCKET_SECONDS)
        hour_from = current - HOUR // BUCKET_SECONDS  # exclusive: 60 minutes
        day_from = current - BUCKETS  # exclusive: 1440 minutes
        today_from = math.floor(now / DAY) * DAY // BUCKET_SECONDS  # inclusive
        settled_hour = settled_day = outbound_hour = failed_hour = charge_today = charge_day = 0
        for i, minute in enumerate(self._minute):
            if not day_from < minute <= current:
                continue
            settled_day += self._settled[i]
            charge_day += self._charge[i]
            if minute >= today_from:
                charge_today += self._charge[i]
            if minute > hour_from:
                settled_hour += self._settled[i]
                outbound_hour += self._outbound[i]
                failed_hour += self._failed[i]
        return RecentSummary(
            since=self.since,
            settled_hour=settled_hour,
            settled_day=settled_day,
            outbound_hour=outbound_hour,
            outbound_failed_hour=failed_hour,
            charge_nano_today=charge_today,
            charge_nano_day=charge_day,
        )
