"""One project's poll in-process against the simulator, through an injected client and a frozen
clock: failures, credentials, invalid records."""

from __future__ import annotations

import functools
import math
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from exporter.client import Client, Page, Stopped
from exporter.config import Config, ProjectConfig, SettleConfig
from exporter.ledger import PollDelta
from exporter.poller import Counters, ProjectPoller, poll_client
from exporter.records import format_timestamp
from exporter.simulator import Simulator, SimulatorAdapter, Step
from exporter.store import Store

PID, TOKEN = "p-1", "PTgood-token"
BASE = "http://simulator.invalid"
NOW = 1_767_225_600.0  # the frozen clock of the simulator and the poller


def clock() -> float:
    return NOW


@pytest.fixture
def simulator() -> Simulator:
    simulator = Simulator(clock=clock, seed=1)
    simulator.add_project(PID, TOKEN)
    return simulator


def make_poller(
    tmp_path: Path,
    simulator: Simulator,
    token: str = TOKEN,
    token_file: str | None = None,
    start_from: float = 60.0,
    source: str = "<config>",
    client: type[Client] = Client,
    store: type[Store] = Store,
) -> tuple[ProjectPoller, Counters]:
    """A poller whose client (of class `client`) reaches the simulator in-process."""
    project = ProjectConfig("prod", BASE, PID, token, token_file)
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
    connect = functools.partial(poll_client, adapter=SimulatorAdapter(simulator, BASE), kind=client)
    poller = ProjectPoller(
        project,
        config,
        store(config.state_path),
        counters,
        threading.Event(),
        clock=clock,
        connect=connect,
    )
    poller.load()
    return poller, counters


def add(simulator: Simulator, status: str = "delivered", direction: str = "outbound-api") -> None:
    simulator.add_message(
        PID,
        direction=direction,
        kind="sms",
        created_at=NOW - 5,
        segments=1,
        timeline=[Step(0, status, charge=0.01)],
    )


class CorruptingClient(Client):
    """Every page it lists carries two malformed records as well."""

    def list_pages(
        self, created_after: float | None, created_before: float | None = None
    ) -> Iterator[Page]:
        for page in super().list_pages(created_after, created_before):
            records = list(page.records)
            records.append({"id": "broken", "status": "delivered"})  # fields missing
            records.append("not an object")
            yield Page(records, page.server_time)


class RecordingStore(Store):
    """Records the commits instead of making them."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.commits: list[PollDelta] = []

    def commit(self, project: str, delta: PollDelta) -> None:
        self.commits.append(delta)


class StoppedAfterListing(Client):
    """The stop comes just as the listing's last answer is in."""

    def list_pages(
        self, created_after: float | None, created_before: float | None = None
    ) -> Iterator[Page]:
        yield from super().list_pages(created_after, created_before)
        self.stop.set()


def test_a_poll_counts_and_publishes(simulator: Simulator, tmp_path: Path) -> None:
    for _ in range(5):
        add(simulator)
    add(simulator, "sent")
    poller, counters = make_poller(tmp_path, simulator)
    assert poller.poll_once()
    view = poller.view
    assert view.up and view.polled and view.last_error is None
    assert view.totals[("outbound-api", "sms", "delivered", "")].messages == 5
    assert view.pending == {("outbound-api", "sms", "sent"): 1}
    assert counters.state().api_requests[("prod", "200")] >= 3  # 6 records, 2 per page


def test_bad_credentials_fail_once_per_poll_without_retry_storm(
    simulator: Simulator, tmp_path: Path
) -> None:
    poller, counters = make_poller(tmp_path, simulator, token="PTwrong-token")
    assert not poller.poll_once()
    assert not poller.view.up and poller.view.polled
    assert poller.view.last_error is not None and "401" in poller.view.last_error
    assert "PTwrong-token" not in poller.view.last_error
    assert counters.state().api_requests == {("prod", "401"): 1}
    assert counters.state().poll_errors == {("prod", "auth"): 1}


def test_a_rotated_token_file_is_picked_up_on_401(simulator: Simulator, tmp_path: Path) -> None:
    add(simulator)
    token_file = tmp_path / "token"
    token_file.write_text("PTold-token\n")
    poller, _counters = make_poller(tmp_path, simulator, "PTold-token", str(token_file))
    assert not poller.poll_once()
    token_file.write_text(TOKEN + "\n")
    assert poller.poll_once()
    assert poller.view.totals[("outbound-api", "sms", "delivered", "")].messages == 1


def test_an_outage_then_recovery(simulator: Simulator, tmp_path: Path) -> None:
    add(simulator)
    poller, counters = make_poller(tmp_path, simulator)
    simulator.set_outage(True)
    assert not poller.poll_once()
    assert counters.state().poll_errors == {("prod", "api"): 1}
    assert poller.view.totals == {}
    assert poller.view.last_error is not None and "503" in poller.view.last_error
    simulator.set_outage(False)
    add(simulator)
    assert poller.poll_once()
    assert poller.view.up
    assert poller.view.totals[("outbound-api", "sms", "delivered", "")].messages == 2


def test_invalid_records_are_skipped_counted_once_and_the_rest_counted(
    simulator: Simulator, tmp_path: Path
) -> None:
    for _ in range(3):
        add(simulator)
    poller, counters = make_poller(tmp_path, simulator, client=CorruptingClient)
    assert poller.poll_once()
    assert poller.poll_once()  # re-listed: the same bad records do not count again
    assert counters.state().invalid_records == {"prod": 2}
    assert poller.view.totals[("outbound-api", "sms", "delivered", "")].messages == 3


def test_beyond_the_history_limit_it_lists_what_is_left_instead_of_failing(
    simulator: Simulator, tmp_path: Path
) -> None:
    simulator.history_limit = 300.0  # the first listing asks for 600 s: too far back
    add(simulator)  # created 5 s ago: within the limit
    poller, counters = make_poller(tmp_path, simulator, start_from=600.0)
    assert poller.poll_once()
    assert poller.view.up
    assert poller.view.totals[("outbound-api", "sms", "delivered", "")].messages == 1
    assert counters.state().api_requests[("prod", "422")] >= 1
    # Nothing before the oldest time allowed can be new: no late sweep reaches back there.
    assert poller.ledger is not None
    assert poller.ledger.state.floor >= NOW - 300.0 - 5
    assert poller.poll_once()  # the cursor has moved on: no more refusals
    refusals = counters.state().api_requests[("prod", "422")]
    assert poller.poll_once()
    assert counters.state().api_requests[("prod", "422")] == refusals


def test_a_later_listing_beyond_the_history_limit_lists_what_is_left_instead_of_failing(
    simulator: Simulator, tmp_path: Path
) -> None:
    simulator.history_limit = 300.0
    simulator.add_message(
        PID,
        direction="outbound-api",
        kind="sms",
        created_at=NOW - 200,  # within the limit, before the head listing
        segments=1,
        timeline=[Step(0, "delivered", charge=0.01)],
    )
    poller, _ = make_poller(tmp_path, simulator, start_from=600.0)
    assert poller.ledger is not None
    plan = replace(
        poller.ledger.plan(NOW),
        listings=((NOW - 30, None), (NOW - 600, NOW - 100), (NOW - 900, NOW - 400)),
        floor=NOW - 600,
    )
    with capture_logs() as logs:
        delta = poller._collect(plan)
    assert delta is not None and delta.new_messages == 1, "the second listing, from the limit on"
    skipped = [e for e in logs if "history limit" in e["event"]]
    assert [e["log_level"] for e in skipped] == ["warning", "warning"]
    assert skipped[0]["skipped_from"] == format_timestamp(NOW - 600)


def test_a_poll_whose_answers_arrive_after_stop_is_abandoned_uncommitted(
    simulator: Simulator, tmp_path: Path
) -> None:
    for _ in range(5):
        add(simulator)
    # The last answer is in when the stop comes.
    poller, _ = make_poller(tmp_path, simulator, client=StoppedAfterListing, store=RecordingStore)
    assert isinstance(poller.store, RecordingStore)
    with pytest.raises(Stopped):
        poller.poll_once()
    assert poller.store.commits == [], "nothing of the abandoned poll is written"
    assert not poller.view.polled and poller.view.totals == {}


def test_the_view_sums_what_settled_lately(simulator: Simulator, tmp_path: Path) -> None:
    for _ in range(3):
        add(simulator)
    add(simulator, "undelivered")
    add(simulator, "received", direction="inbound")
    add(simulator, "sent")  # pending: not settled, not counted
    poller, _ = make_poller(tmp_path, simulator)
    loaded = poller.view.recent
    assert loaded is not None and loaded.settled_day == 0
    assert poller.poll_once()
    recent = poller.view.recent
    assert recent is not None
    assert (recent.settled_hour, recent.settled_day) == (5, 5)
    assert (recent.outbound_hour, recent.outbound_failed_hour) == (4, 1)
    assert recent.charge_nano_day == recent.charge_nano_today == 5 * 10_000_000
    add(simulator)
    assert poller.poll_once()
    recent = poller.view.recent
    assert recent is not None and recent.settled_hour == 6


def test_a_start_from_reaching_before_the_recorded_start_point_is_pointed_out(
    simulator: Simulator, tmp_path: Path
) -> None:
    first, _ = make_poller(tmp_path, simulator, start_from=60.0)
    assert first.ledger is not None and first.view.start_note is None
    recorded = first.ledger.state.start_point
    first.store.close()
    with capture_logs() as logs:
        poller, _ = make_poller(
            tmp_path, simulator, start_from=86400.0, source="/etc/signalwire exporter.yaml"
        )
    poller.store.close()
    note = poller.view.start_note
    assert note is not None
    assert note.start_point == recorded
    assert note.wanted == pytest.approx(NOW - 86400.0, abs=10)
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
    simulator: Simulator, tmp_path: Path
) -> None:
    first, _ = make_poller(tmp_path, simulator, start_from=3600.0)
    first.store.close()
    # 3602 s: a few seconds further back than the start point recorded a moment ago, within the
    # clock's jitter between starts.
    for start_from in (3600.0, 3602.0, 60.0, 0.0):
        with capture_logs() as logs:
            poller, _ = make_poller(tmp_path, simulator, start_from=start_from)
        poller.store.close()
        assert poller.view.start_note is None
        assert [e for e in logs if e["log_level"] == "warning"] == []
