"""The benchmark suite at a tiny size: it keeps working (its figures are not asserted here)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from tests.benchmarks.bench import TARGETS, figures, scaling, table
from tests.benchmarks.profile import DayProfile


@pytest.mark.timeout(600)
def test_every_figure_is_measured_at_a_tiny_size(tmp_path: Path) -> None:
    results = figures(
        DayProfile(messages=3000, seconds=3600.0),
        tmp_path,
        ingest_records=2000,
        scrape_backlog=20_000,
        idle_scrapes=50,
        short_traffic=300.0,
        short_window=(150.0, 300.0),
        backlogs=(5_000,),
        pending_sizes=(2_000,),
        pending_poll=2.0,
    )
    for name in TARGETS:
        assert math.isfinite(results[name]), name
    assert results["messages"] == 3000
    assert results["pending_left"] == 0, "every message settles by the end of the run"
    assert results["settled_by_status"] > 2500
    assert results["scrapes_polling"] > 0 and results["scrapes_idle"] == 50
    assert "requests_per_1000_messages" in table(results)
    assert results["short_polls_window_messages"] > 10_000
    assert [c["counted"] for c in results["catch_up"]] == [5_000], "a catch-up counts them all"
    assert [(p["messages"], p["delivered"]) for p in results["pending"]] == [(2_000, 2_000)]
    rows = scaling(tmp_path / "growth", [3000], results)
    assert math.isfinite(rows[0]["late_sweep_adds_requests_per_1000"])  # a figure, not a bound
    assert [row["projects"] for row in rows[1:]] == [1, 10, 100]
