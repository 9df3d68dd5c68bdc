"""One project's poll in-process against the simulator: failures, credentials, invalid records."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from exporter.client import Stopped
from exporter.config import Config, ProjectConfig, SettleConfig
from exporter.ledger import PollDelta, PollPlan
from exporter.poller import Counters, ProjectPoller
from exporter.records import format_timestamp
from exporter.simulator import Simulator, SimulatorServer, Step
from exporter.store import Store

PID, TOKEN = "p-1", "PTgood-token"


@pytest.fixture
def api() -> Iterator[tuple[Simulator, str]]:
    simulator = Simulator(seed=1)
    simulator.add_project(PID, TOKEN)
    with SimulatorServer(simulator) as server:
        yield simulator, server.base_url


def make_poller(
    tmp_path: Path,
    base_url: str,
    token: str = TOKEN,
    token_file: str | None = None,
    start_from: float = 60.0,
    source: str = "<config>",
) -> tuple[ProjectPoller, Counters]:
    project = ProjectConfig("prod", base_url, PID, token, token_file)
    config = Config(
        projects=(project,),
        poll_interval=1.0,
        state_path=str(tmp_path / "state.db"),
        start_from=start_from,
        settle=SettleConfig(timeout=60.0),
        request_timeout=1.0,
        page_size=2,
        source=source,
    )
    counters = Counters()
    poller = ProjectPoller(project, config, Store(config.state_path), counters, threading.Event())
    poller.load()
    return poller, counters


def add(simulator: Simulator, status: str = "delivered", direction: str = "outbound-api") -> None:
    simulator.add_message(
        PID,
        direction=direction,
        kind="sms",
        created_at=math.floor(time.time()) - 5,
        segments=1,
        timeline=[Step(0, status, charge=0.01)],
    )


def test_a_poll_counts_and_publishes(api: tuple[Simulator, str], tmp_path: Path) -> None:
    simulator, base_url = api
    for _ in range(5):
        add(simulator)
    add(simulator, "sent")
    poller, counters = make_poller(tmp_path, base_url)
    assert poller.poll_once()
    status = poller.status
    assert status.up and status.polled and status.last_error is None
    assert status.totals[("outbound-api", "sms", "delivered", "")].messages == 5
    assert status.pending == {("outbound-api", "sms", "sent"): 1}
    assert counters.state().api_requests[("prod", "200")] >= 3  # 6 records, 2 per page


def test_bad_credentials_fail_once_per_poll_without_retry_storm(
    api: tuple[Simulator, str], tmp_path: Path
) -> None:
    _simulator, base_url = api
    poller, counters = make_poller(tmp_path, base_url, token="PTwrong-token")
    assert not poller.poll_once()
    assert not poller.status.up and poller.status.polled
    assert poller.status.last_error is not None and "401" in poller.status.last_error
    assert "PTwrong-token" not in poller.status.last_error
    assert counters.state().api_requests == {("prod", "401"): 1}
    assert counters.state().poll_errors == {("prod", "auth"): 1}


def test_a_rotated_token_file_is_picked_up_on_401(
    api: tuple[Simulator, str], tmp_path: Path
) -> None:
    simulator, base_url = api
    add(simulator)
    token_file = tmp_path / "token"
    token_file.write_text("PTold-token\n")
    poller, _counters = make_poller(tmp_path, base_url, "PTold-token", str(token_file))
    assert not poller.poll_once()
    token_file.write_text(TOKEN + "\n")
    assert poller.poll_once()
    assert poller.status.totals[("outbound-api", "sms", "delivered", "")].messages == 1


def test_an_outage_then_recovery(api: tuple[Simulator, str], tmp_path: Path) -> None:
    simulator, base_url = api
    add(simulator)
    poller, counters = make_poller(tmp_path, base_url)
    simulator.set_outage(True)
    assert not poller.poll_once()
    assert counters.state().poll_errors == {("prod", "api"): 1}
    assert poller.status.totals == {}
    assert poller.status.last_error is not None and "503" in poller.status.last_error
    simulator.set_outage(False)
    add(simulator)
    assert poller.poll_once()
    assert poller.status.up
    assert poller.status.totals[("outbound-api", "sms", "delivered", "")].messages == 2


def test_invalid_records_are_skipped_counted_once_and_the_rest_counted(
    api: tuple[Simulator, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    simulator, base_url = api
    for _ in range(3):
        add(simulator)
    poller, counters = make_poller(tmp_path, base_url)
    original = poller.client.list_pages

    def corrupt(created_after: float | None, created_before: float | None = None):  # type: ignore[no-untyped-def]
        for page in original(created_after, created_before):
            records = list(page.records)
            records.append({"id": "broken", "status": "delivered"})  # fields missing
            records.append("not an object")
            yield page.__class__(records, page.server_time)

    monkeypatch.setattr(poller.client, "list_pages", corrupt)
    assert poller.poll_once()
    assert poller.poll_once()  # re-listed: the same bad records do not count again
    assert counters.state().invalid_records == {"prod": 2}
    assert poller.status.totals[("outbound-api", "sms", "delivered", "")].messages == 3


def test_beyond_the_history_limit_it_lists_what_is_left_instead_of_failing(
    api: tuple[Simulator, str], tmp_path: Path
) -> None:
    simulator, base_url = api
    simulator.history_limit = 300.0  # the first listing asks for 600 s: too far back
    add(simulator)  # created 5 s ago: within the limit
    poller, counters = make_poller(tmp_path, base_url, start_from=600.0)
    assert poller.poll_once()
    assert poller.status.up
    assert poller.status.totals[("outbound-api", "sms", "delivered", "")].messages == 1
    assert counters.state().api_requests[("prod", "422")] >= 1
    # Nothing before the oldest time allowed can be new: no late sweep reaches back there.
    assert poller.ledger is not None
    assert poller.ledger.state.floor >= time.time() - 300.0 - 5
    assert poller.poll_once()  # the cursor has moved on: no more refusals
    refusals = counters.state().api_requests[("prod", "422")]
    assert poller.poll_once()
    assert counters.state().api_requests[("prod", "422")] == refusals


def test_a_poll_whose_answers_arrive_after_stop_is_abandoned_uncommitted(
    api: tuple[Simulator, str], tmp_path: Path
) -> None:
    simulator, base_url = api
    for _ in range(5):
        add(simulator)
    poller, _ = make_poller(tmp_path, base_url)
    commits: list[object] = []
    poller.store.commit = lambda project, delta: commits.append(delta)  # type: ignore[method-assign]
    collect = poller._collect

    def collect_then_stop(plan: PollPlan) -> PollDelta | None:
        delta = collect(plan)  # the last answer is in...
        poller.stop.set()  # ...when the stop comes
        return delta

    poller._collect = collect_then_stop  # type: ignore[method-assign]
    with pytest.raises(Stopped):
        poller.poll_once()
    assert commits == [], "nothing of the abandoned poll is written"
    assert not poller.status.polled and poller.status.totals == {}


def test_the_status_sums_what_settled_lately(api: tuple[Simulator, str], tmp_path: Path) -> None:
    simulator, base_url = api
    for _ in range(3):
        add(simulator)
    add(simulator, "undelivered")
    add(simulator, "received", direction="inbound")
    add(simulator, "sent")  # pending: not settled, not counted
    poller, _ = make_poller(tmp_path, base_url)
    loaded = poller.status.recent
    assert loaded is not None and loaded.settled_day == 0
    assert poller.poll_once()
    recent = poller.status.recent
    assert recent is not None
    assert (recent.settled_hour, recent.settled_day) == (5, 5)
    assert (recent.outbound_hour, recent.outbound_failed_hour) == (4, 1)
    assert recent.charge_nano_day == recent.charge_nano_today == 5 * 10_000_000
    add(simulator)
    assert poller.poll_once()
    recent = poller.status.recent
    assert recent is not None and recent.settled_hour == 6


def test_a_start_from_reaching_before_the_recorded_start_point_is_pointed_out(
    api: tuple[Simulator, str], tmp_path: Path
) -> None:
    _simulator, base_url = api
    first, _ = make_poller(tmp_path, base_url, start_from=60.0)
    assert first.ledger is not None and first.status.start_note is None
    recorded = first.ledger.state.start_point
    first.store.close()
    with capture_logs() as logs:
        poller, _ = make_poller(
            tmp_path, base_url, start_from=86400.0, source="/etc/signalwire exporter.yaml"
        )
    poller.store.close()
    note = poller.status.start_note
    assert note is not None
    assert note.start_point == recorded
    assert note.wanted == pytest.approx(time.time() - 86400.0, abs=10)
    command = (
        "signalwire-exporter backfill --config.file '/etc/signalwire exporter.yaml' "
        f"--from {format_timestamp(note.wanted)} --to {format_timestamp(math.ceil(recorded))} "
        "--output history.om"
    )
    assert note.command == command
    warnings = [e for e in logs if e["log_level"] == "warning"]
    assert len(warnings) == 1
    assert warnings[0]["event"].startswith("start_from reaches before the recorded start point")
    assert warnings[0]["wanted_start"] == format_timestamp(note.wanted)
    assert warnings[0]["start_point"] == format_timestamp(recorded)
    assert warnings[0]["backfill"] == command
    assert format_timestamp(note.wanted) in note.text and format_timestamp(recorded) in note.text
    assert poller.ledger is not None and poller.ledger.state.start_point == recorded  # unmoved


def test_the_same_or_a_shorter_start_from_after_the_first_start_says_nothing(
    api: tuple[Simulator, str], tmp_path: Path
) -> None:
    _simulator, base_url = api
    first, _ = make_poller(tmp_path, base_url, start_from=3600.0)
    first.store.close()
    # 3602 s: a few seconds further back than the start point recorded a moment ago, within the
    # clock's jitter between starts.
    for start_from in (3600.0, 3602.0, 60.0, 0.0):
        with capture_logs() as logs:
            poller, _ = make_poller(tmp_path, base_url, start_from=start_from)
        poller.store.close()
        assert poller.status.start_note is None
        assert [e for e in logs if e["log_level"] == "warning"] == []
