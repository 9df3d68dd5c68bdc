"""Catching up a backlog in committed steps: pure logic, no I/O.

When the cursor is far behind (a first start with `start_from`, an outage, a long stop), listing
everything up to now in one poll would hold the whole backlog in memory and commit nothing until
the end: a kill or a failed request would throw all of it away. Instead the backlog is taken in as
windows of creation time, oldest first (`created_after` .. `created_before`), each listed, settled
and committed on its own, so memory is bounded by a step and a failure loses one step at most.

A window's length follows the density observed so far, so a step holds about `STEP_RECORDS`
new messages whatever the API's list order (which is undocumented: a window makes it irrelevant).
A listing that passes `STEP_MAX_RECORDS` (traffic much denser than the last window's, or an
ordinary poll after a burst) is abandoned and tried again as windows cut to size.

The exactness of a step rests on SignalWire honouring `created_before` to the second. That is
checked once per process before the first step is committed (one small listing around a record
the step saw); an API that honours the filters only to the day is caught by that check or by
records outside the asked window, and the catch-up then proceeds a whole day at a time.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

# A step aims at this many records; past the maximum a listing is abandoned and retried smaller.
STEP_RECORDS = 10_000
STEP_MAX_RECORDS = 20_000
# The first window of a process, before any density is known; windows grow at most this much per
# step (a sparse stretch is crossed in a few steps) and are never shorter than the minimum.
FIRST_STEP_SECONDS = 60.0
STEP_GROWTH = 8.0
MIN_STEP_SECONDS = 2.0
DAY = 86400.0
# Filters honoured to the second never list a record further than this outside the asked window
# (whole-second formatting of the bounds, inclusive or exclusive).
BOUND_TOLERANCE = 2.0


@dataclass(slots=True)
class Windows:
    """How one project's next catch-up window is chosen; lives as long as the process."""

    seconds: float = FIRST_STEP_SECONDS
    verified: bool = False  # created_before has been seen honoured to the second
    coarse: bool = False  # the filters are honoured only to the day: whole-day windows

    def end(self, cursor: float, reach: float, caught_up: float) -> float | None:
        """The end (`created_before`) of the next step's window from `cursor`, or None when what
        is left to list (from `reach` to `caught_up`) is no bigger than a step: then the poll is
        an ordinary one."""
        next_day = (math.floor((cursor + 1) / DAY) + 1) * DAY
        if self.coarse:
            end = next_day  # day boundaries are the only bounds such an API honours exactly
        elif reach + self.seconds >= caught_up:
            return None
        else:
            end = float(math.floor(cursor + self.seconds))
            if not self.verified:
                # Until created_before is seen honoured to the second, no window crosses
                # midnight: one that ends there is exact whatever the filters' precision.
                end = min(end, next_day)
        return end if end < caught_up else None

    @staticmethod
    def exact_whatever_the_precision(end: float) -> bool:
        """Whether a window ending at `end` lists the same records when the filters are honoured
        only to the day (it ends on a day boundary)."""
        return end % DAY == 0

    @property
    def checked(self) -> bool:
        """Whether the filters' precision is known."""
        return self.verified or self.coarse

    def past_bound(self, new: int) -> bool:
        """Whether a listing has met more new messages than a step may hold (whole days
        excepted)."""
        return new > STEP_MAX_RECORDS and not self.coarse

    def too_large(self, new: int, span: float) -> bool:
        """Whether a listing of `span` seconds has passed its bound; if so the window is cut for
        a retry. The shortest window is never cut."""
        if not self.past_bound(new) or self.seconds <= MIN_STEP_SECONDS:
            return False
        self.seconds = max(MIN_STEP_SECONDS, min(self.seconds, span) * STEP_RECORDS / new)
        return True

    def stepped(self, new: int, span: float) -> None:
        """A listing of `span` seconds met `new` messages: size the next window to match."""
        wanted = span * STEP_RECORDS / new if new else math.inf
        self.seconds = max(MIN_STEP_SECONDS, min(wanted, self.seconds * STEP_GROWTH))

    def grow(self) -> None:
        """An empty window that cannot be trusted yet: try a longer one instead of committing."""
        self.seconds *= STEP_GROWTH

    def within(self, low: float, high: float, after: float, before: float) -> bool:
        """Whether records created from `low` to `high` fit the window asked for; if not, the
        filters are coarser than a second and windows become whole days."""
        fits = low >= math.floor(after) - BOUND_TOLERANCE
        fits = fits and high <= math.ceil(before) + BOUND_TOLERANCE
        if not fits:
            self.coarse = True
        return fits

    def probed(self, created: float, listed: Iterable[float]) -> bool:
        """The outcome of listing `created - 1` .. `created + 1` around a record created at
        `created`: honoured to the second only if records of that very time are listed and
        nothing far from it is."""
        times = list(listed)
        honoured = created in times and all(abs(t - created) <= BOUND_TOLERANCE for t in times)
        self.verified = honoured
        self.coarse = not honoured
        return honoured


@dataclass(frozen=True, slots=True)
class Progress:
    """How far a project's catch-up has come, for the log and the landing page."""

    began: float  # the cursor when the catch-up started
    cursor: float
    target: float  # where it ends: about now, less the cursor's safety margin
    messages: int  # records taken in so far
    elapsed: float  # seconds since the catch-up started

    @property
    def share(self) -> float:
        span = self.target - self.began
        return 1.0 if span <= 0 else min(1.0, max(0.0, (self.cursor - self.began) / span))

    @property
    def messages_per_second(self) -> float:
        return self.messages / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def eta_seconds(self) -> float | None:
        """Time left at the pace so far, or None before any progress."""
        share = self.share
        if share <= 0 or self.elapsed <= 0:
            return None
        return self.elapsed * (1 - share) / share
