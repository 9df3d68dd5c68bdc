"""The busy-day traffic profile: a day of messages on a daily curve, with realistic outcomes."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from exporter.simulator import Simulator, Step

DAY = 86400.0
UNDELIVERED_CODES = ("30003", "30005", "30006", "30007")
FAILED_CODES = ("21610", "21601")
ERROR_TEXT = {
    "30003": "Unreachable destination handset",
    "30005": "Unknown destination handset",
    "30006": "Landline or unreachable carrier",
    "30007": "Carrier violation",
    "21610": "Attempt to send to unsubscribed recipient",
    "21601": "Phone number is not a valid SMS-capable number",
}
SMS_PRICE, MMS_PRICE = 0.00415, 0.015


@dataclass(frozen=True)
class DayProfile:
    messages: int = 1_000_000
    seconds: float = DAY
    curve: float = 1.7  # exp(curve * cos): peak about 3x the mean
    outbound_sms: float = 0.70
    outbound_mms: float = 0.10  # the rest inbound
    delivered: float = 0.93
    never_receipted: float = 0.03
    undelivered: float = 0.02  # the rest failed
    receipt_median: float = 5.0
    receipt_p99: float = 600.0
    receipt_max: float = math.inf  # receipts later than this come at this age

    @property
    def sigma(self) -> float:
        return math.log(self.receipt_p99 / self.receipt_median) / 2.3263

    def rate_shape(self, t: float) -> float:
        """Relative rate at second t of the day, peaking at midday."""
        return math.exp(self.curve * (math.cos(2 * math.pi * (t / self.seconds - 0.5)) - 1))


def populate(
    simulator: Simulator, project_id: str, profile: DayProfile, start: float, seed: int
) -> None:
    """Add the day's messages to the simulator, created from `start` on."""
    rng = random.Random(seed)
    created: list[float] = []
    while len(created) < profile.messages:
        t = rng.uniform(0, profile.seconds)
        if rng.random() < profile.rate_shape(t):
            created.append(math.floor(start + t))
    created.sort()
    mu = math.log(profile.receipt_median)
    for at in created:
        r = rng.random()
        if r < profile.outbound_sms:
            segments = rng.choices((1, 2, 3), weights=(85, 12, 3))[0]
            charge = round(segments * SMS_PRICE, 6)
            delay = min(profile.receipt_max, max(1.5, rng.lognormvariate(mu, profile.sigma)))
            outcome = rng.random()
            steps = [Step(0, "queued"), Step(1, "sent", charge=charge)]
            if outcome < profile.delivered:
                steps.append(Step(delay, "delivered", charge=charge))
            elif outcome < profile.delivered + profile.never_receipted:
                pass
            elif outcome < profile.delivered + profile.never_receipted + profile.undelivered:
                code = rng.choice(UNDELIVERED_CODES)
                steps.append(Step(delay, "undelivered", code, ERROR_TEXT[code], charge))
            else:
                code = rng.choice(FAILED_CODES)
                steps = [Step(0, "queued"), Step(1, "failed", code, ERROR_TEXT[code], 0.0)]
            simulator.add_message(
                project_id,
                direction="outbound-api",
                kind="sms",
                created_at=at,
                segments=segments,
                timeline=steps,
            )
        elif r < profile.outbound_sms + profile.outbound_mms:
            simulator.add_message(
                project_id,
                direction="outbound-api",
                kind="mms",
                created_at=at,
                segments=1,
                timeline=[Step(0, "queued"), Step(2, "sent", charge=MMS_PRICE)],
            )
        else:
            simulator.add_message(
                project_id,
                direction="inbound",
                kind="sms",
                created_at=at,
                segments=1,
                timeline=[Step(0, "received", charge=SMS_PRICE)],
            )
