"""The benchmark suite: `make bench` (python -m tests.benchmarks.bench).

A busy day runs in virtual time against the simulator reached in-process (the real client through
a requests adapter, the real ledger, store and metrics code), then the figures that need a real
process or real HTTP are measured on the side: start-up and memory on the day's state, and scrape
latency of the real daemon while it takes in a backlog from a simulator in another process.
Prints a table next to the targets and writes the figures as JSON. Not a timed test: the test
suite runs it at a tiny size only.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import multiprocessing
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from operator import itemgetter
from pathlib import Path
from typing import Any
from unittest import mock

import requests
import yaml

from exporter.client import _decode as decode
from exporter.config import Config, ProjectConfig, SettleConfig
from exporter.ledger import Batch, LabelKey, Ledger, Rules, Totals
from exporter.logs import configure
from exporter.metrics import build_registry
from exporter.pending import id_of
from exporter.poller import Counters, ProjectPoller, copy_totals
from exporter.records import InvalidRecord, parse_records
from exporter.simulator import (
    OWN_NUMBERS,
    Simulator,
    SimulatorAdapter,
    SimulatorServer,
    remote_number,
)
from exporter.store import Store
from exporter.views import CounterState, ProjectView
from tests.benchmarks.pending import POLL as PENDING_POLL
from tests.benchmarks.pending import peak_rss_mb, pending_set
from tests.benchmarks.profile import DayProfile, populate
from tests.helpers import exported_totals, parse_metrics, pending_total

ROOT = Path(__file__).resolve().parents[2]
BASE = "http://simulator.invalid"
PROJECT_ID, TOKEN = "bench-project", "PTbench-token"
POLL, TIMEOUT, PAGE = 30.0, 7200.0, 1000
DAY = 86400.0
# Messages the daemon takes in during the scrape measurement: a poll runs for the whole catch-up.
SCRAPE_BACKLOG = 200_000

# Short polls: 100 messages a second polled every 2 s, receipts log-normal (median 2 s, up to a
# minute), measured in a steady state of half an hour once the timeout tier runs (after 2 h 10 m).
SHORT_POLL, SHORT_RATE = 2.0, 100.0
SHORT_TRAFFIC, SHORT_WINDOW = 9600.0, (7800.0, 9600.0)
BACKLOGS = (100_000, 300_000, 1_000_000)
# Pending sets held through a carrier's receipt delay, then their receipts all at once.
PENDING_SETS = (10_000, 100_000, 300_000)

TARGETS = {
    "requests_per_1000_messages": ("<=", 12.0),
    "settle_delay_p50_polls": ("<=", 1.0),
    "settle_delay_p99_polls": ("<=", 4.0),
    "requests_per_1000_messages_2s_polls": ("<=", 12.0),
    "settle_delay_mean_polls_2s_polls": ("<=", 2.0),
    "catch_up_largest_peak_rss_mb": ("<=", 150.0),
    "daemon_peak_rss_mb": ("<=", 150.0),
    "ingest_cpu_ratio_to_json_loads": ("<=", 1.5),
    "ingest_cpu_countries_over_without": ("<=", 1.10),
    "metrics_render_median_ms": ("<=", 25.0),
    "scrape_p99_ratio_polling_to_idle": ("<=", 2.0),
    "startup_to_ready_s": ("<=", 2.0),
    "commit_per_poll_at_peak_max_ms": ("<=", 50.0),
    "pending_largest_peak_rss_mb": ("<=", 150.0),
    "pending_largest_bytes_per_message": ("<=", 150.0),
    "pending_largest_burst_settle_polls": ("<=", 8.0),
}


@dataclass
class DayResult:
    messages: int
    requests: int
    polls: int
    delays: list[float] = field(default_factory=list)  # settlement delay, seconds
    commit_ms: list[tuple[float, float]] = field(default_factory=list)  # (virtual time, ms)
    totals: dict[LabelKey, Totals] = field(default_factory=dict)
    by_country: dict[LabelKey, Totals] = field(default_factory=dict)
    by_group: dict[LabelKey, Totals] = field(default_factory=dict)
    cpu_s: float = 0.0
    state_path: str = ""
    simulator: Simulator | None = None
    end: float = 0.0
    pending_left: int = 0
    # Within the steady-state window, when one is asked for: requests made, messages created in
    # it, and the settlement delays of receipts that came in it.
    window_requests: int = 0
    window_messages: int = 0
    window_delays: list[float] = field(default_factory=list)


def config_for(
    state_path: str, base: str = BASE, poll: float = POLL, ingestion_delay: float = 600.0
) -> Config:
    return Config(
        projects=(ProjectConfig("busy", base, PROJECT_ID, TOKEN),),
        poll_interval=poll,
        max_ingestion_delay=ingestion_delay,
        state_path=state_path,
        settle=SettleConfig(timeout=TIMEOUT),
        page_size=PAGE,
        request_timeout=30.0,
        number_groups={"otp": OWN_NUMBERS[:2], "marketing": OWN_NUMBERS[-1:]},
        source="<bench>",
    )


def final_time(simulator: Simulator, message_id: str, settle: SettleConfig) -> float | None:
    """When the message's first final status appeared, if before its timeout."""
    message = simulator._projects[PROJECT_ID].messages[message_id]
    for step in message.timeline:
        final = step.status in settle.final_statuses or step.status in (
            settle.final_statuses_by_kind.get(message.kind, ())
        )
        if final and step.at < settle.timeout:
            return message.created_at + step.at
    return None


def busy_day(
    profile: DayProfile,
    workdir: Path,
    poll: float = POLL,
    tail: float = TIMEOUT + 3600,
    window: tuple[float, float] | None = None,
    ingestion_delay: float = 600.0,
) -> DayResult:
    """The day in virtual time: polls every `poll` seconds, for `tail` seconds past its traffic
    (by default until every message has settled). `window` (seconds from the start) is a steady
    state measured on its own."""
    end_of_run = math.floor(time.time())
    start = end_of_run - profile.seconds - tail
    clock = [start - 1.0]
    simulator = Simulator(clock=lambda: clock[0], seed=1)
    simulator.add_project(PROJECT_ID, TOKEN)
    populate(simulator, PROJECT_ID, profile, start, seed=2)
    gc.collect()
    gc.freeze()  # the simulator's million messages are not the exporter's garbage to scan
    workdir.mkdir(parents=True, exist_ok=True)
    state_path = str(workdir / "busy.db")
    config = config_for(state_path, poll=poll, ingestion_delay=ingestion_delay)
    store = Store(state_path)
    poller = ProjectPoller(
        config.projects[0], config, store, Counters(), threading.Event(), clock=lambda: clock[0]
    )
    poller.client.session.mount(BASE, SimulatorAdapter(simulator, BASE))
    poller.load()
    result = DayResult(messages=profile.messages, requests=0, polls=0, simulator=simulator)
    settled_at: dict[str, float] = {}
    real_commit = store.commit

    def commit(project: str, delta: Any) -> None:
        began = time.perf_counter()
        real_commit(project, delta)
        result.commit_ms.append((clock[0], (time.perf_counter() - began) * 1000))
        for message_id in map(id_of, delta.settled_ids):
            settled_at[message_id] = clock[0]

    store.commit = commit  # type: ignore[method-assign]
    sys.setswitchinterval(0.001)  # as the daemon sets it
    cpu = time.process_time()
    t = start
    in_window = False
    while t <= end_of_run:
        clock[0] = t
        if window is not None and in_window != (window[0] <= t - start < window[1]):
            in_window = not in_window
            # Requests are counted from the window's start to its end.
            sign = 1 if in_window else -1
            result.window_requests -= sign * simulator.requests_total
        poller.poll_once()
        result.polls += 1
        if result.polls % round(PROGRESS_EVERY / poll) == 0:
            progress(f"{profile.messages:,} messages: virtual hour {(t - start) / 3600:.0f}")
        t += poll
    result.cpu_s = time.process_time() - cpu
    result.requests = simulator.requests_total
    assert poller.ledger is not None
    result.pending_left = len(poller.ledger.state.pending)
    result.totals = dict(poller.ledger.state.totals)
    result.by_country = dict(poller.ledger.state.by_country)
    result.by_group = dict(poller.ledger.state.by_group)
    if in_window:
        result.window_requests += simulator.requests_total
    for message_id, when in settled_at.items():
        appeared = final_time(simulator, message_id, config.settle)
        if appeared is not None:
            result.delays.append(max(0.0, when - appeared))
            if window is not None and window[0] <= appeared - start < window[1]:
                result.window_delays.append(max(0.0, when - appeared))
    if window is not None:
        result.window_messages = sum(
            window[0] <= m.created_at - start < window[1] for m in simulator.messages(PROJECT_ID)
        )
    store.close()
    result.state_path = state_path
    result.end = end_of_run
    gc.unfreeze()
    return result


_BEGAN = time.monotonic()
PROGRESS_EVERY = 7200.0  # virtual seconds between progress lines


def progress(what: str) -> None:
    """One line on stderr per step of a long run."""
    print(f"[{time.monotonic() - _BEGAN:5.0f} s] {what}", file=sys.stderr, flush=True)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


def peak_commit_ms(result: DayResult, profile: DayProfile, start: float, q: float = 1.0) -> float:
    """The slowest commit (or the q-quantile) in the busiest hour."""
    midday = start + profile.seconds / 2
    peak = [ms for at, ms in result.commit_ms if abs(at - midday) <= 1800]
    return percentile(peak, q) if peak else float("nan")


def daemon_config(path: Path, state: Path, base_url: str, start_from: str = "0s") -> Path:
    path.write_text(
        yaml.safe_dump(
            {
                "poll_interval": "30s",
                "state_path": str(state),
                "start_from": start_from,
                "settle": {"timeout": "2h"},
                "request": {"page_size": PAGE},
                "projects": [
                    {
                        "name": "busy",
                        "space": base_url,
                        "project_id": PROJECT_ID,
                        "api_token": TOKEN,
                    }
                ],
            }
        )
    )
    path.chmod(0o600)  # it holds the token
    return path


def spawn_daemon(config: Path, port: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "exporter", "--config.file", str(config),
         "--web.listen-address", f"127.0.0.1:{port}", "--log.level", "warning"],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip


def daemon_start(result: DayResult, workdir: Path) -> tuple[float, float]:
    """Start the real daemon on the day's state file; seconds to /-/ready and its peak RSS."""
    assert result.simulator is not None
    simulator = result.simulator
    simulator.clock = time.time  # the day ended just now
    with SimulatorServer(simulator) as api:
        state = workdir / "startup.db"
        shutil.copy(result.state_path, state)
        config = daemon_config(workdir / "startup.yaml", state, api.base_url)
        with socket_port() as port:
            pass
        began = time.monotonic()
        proc = spawn_daemon(config, port)
        ready = float("nan")
        try:
            while time.monotonic() - began < 60:
                try:
                    if requests.get(f"http://127.0.0.1:{port}/-/ready", timeout=1).ok:
                        ready = time.monotonic() - began
                        break
                except requests.RequestException:
                    pass
                time.sleep(0.02)
            for _ in range(20):
                requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
            rss = peak_rss_mb(proc.pid)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    return ready, rss


def _remote_simulator(backlog: int, start: float, conn: Connection) -> None:
    """SignalWire's side, in its own process and at a lower priority: in production it runs on
    other machines, not on the exporter's CPU."""
    os.nice(10)
    simulator = Simulator(seed=5)
    simulator.add_project(PROJECT_ID, TOKEN)
    populate(simulator, PROJECT_ID, DayProfile(messages=backlog), start, seed=6)
    with SimulatorServer(simulator) as api:
        conn.send(api.base_url)
        conn.recv()  # until the benchmark is done


@dataclass
class ScrapeResult:
    idle_ms: list[float] = field(default_factory=list)
    polling_ms: list[float] = field(default_factory=list)
    catch_up_s: float = float("nan")


def cursor_lag(metrics_text: str) -> float:
    """Seconds between now and the project's cursor, from a /metrics answer (inf before it has
    one)."""
    for line in metrics_text.splitlines():
        if line.startswith("signalwire_cursor_timestamp_seconds{"):
            return time.time() - float(line.rsplit(" ", 1)[1])
    return math.inf


# The cursor trails now by about a poll and its safety margin once caught up.
CAUGHT_UP_LAG = 120.0


@contextlib.contextmanager
def daemon_on_backlog(workdir: Path, name: str, backlog: int) -> Iterator[DaemonRun]:
    """The real daemon on a first start whose start_from covers a day of `backlog` messages,
    served by a simulator in another process; stopped, with the simulator, on leaving."""
    context = multiprocessing.get_context("fork")  # no threads run in this process now
    ours, theirs = context.Pipe()
    start = time.time() - DAY - 2 * 3600
    simulator = context.Process(target=_remote_simulator, args=(backlog, start, theirs))
    simulator.start()
    try:
        base_url = ours.recv()
        config = daemon_config(
            workdir / f"{name}.yaml", workdir / f"{name}.db", base_url, start_from="2d"
        )
        with socket_port() as port:
            pass
        proc = spawn_daemon(config, port)
        try:
            yield DaemonRun(proc, f"http://127.0.0.1:{port}")
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    finally:
        ours.send("done")
        simulator.join(timeout=60)


@dataclass
class DaemonRun:
    proc: subprocess.Popen[bytes]
    url: str


def scrape_latency(workdir: Path, backlog: int, idle_samples: int = 500) -> ScrapeResult:
    """Scrape the real daemon every 20 ms while it takes in a day's backlog (catching up), then
    while it waits for its next poll (idle)."""
    result = ScrapeResult()
    with daemon_on_backlog(workdir, "scrape", backlog) as run:
        url = run.url
        session = requests.Session()
        began = time.monotonic()
        while len(result.idle_ms) < idle_samples and time.monotonic() - began < 600:
            try:
                t0 = time.perf_counter()
                answer = session.get(f"{url}/metrics", timeout=10)
                answer.raise_for_status()
                ms = (time.perf_counter() - t0) * 1000
            except requests.RequestException:
                time.sleep(0.05)  # not listening yet
                continue
            if cursor_lag(answer.text) > CAUGHT_UP_LAG:
                result.polling_ms.append(ms)
            else:
                if not result.idle_ms:
                    result.catch_up_s = time.monotonic() - began
                result.idle_ms.append(ms)
            time.sleep(0.02)
    return result


@dataclass
class CatchUpResult:
    messages: int
    seconds: float = float("nan")  # from the daemon's start to a cursor caught up
    peak_rss_mb: float = float("nan")  # both processes
    counted: int = 0  # messages settled or pending once caught up
    ready_s: float = float("nan")


def catch_up(workdir: Path, backlog: int) -> CatchUpResult:
    """A first start whose start_from covers a day of `backlog` messages: the real daemon takes
    it in from a simulator in another process; time, peak memory, and the count once done."""
    result = CatchUpResult(messages=backlog)
    with daemon_on_backlog(workdir, f"catch-up-{backlog}", backlog) as run:
        url, proc = run.url, run.proc
        session = requests.Session()
        began = time.monotonic()
        logged = began
        while time.monotonic() - began < 3600:
            time.sleep(0.5)
            try:
                if math.isnan(result.ready_s) and session.get(f"{url}/-/ready").ok:
                    result.ready_s = time.monotonic() - began
                text = session.get(f"{url}/metrics", timeout=10).text
            except requests.RequestException:
                continue  # not listening yet
            lag = cursor_lag(text)
            if time.monotonic() - logged > 30:
                logged = time.monotonic()
                progress(f"catch-up of {backlog:,}: cursor {lag / 3600:.1f} h behind")
            if lag <= CAUGHT_UP_LAG:
                result.seconds = time.monotonic() - began
                result.peak_rss_mb = peak_rss_mb(proc.pid)
                samples = parse_metrics(text)
                result.counted = round(
                    sum(n for n, _, _ in exported_totals(samples, "busy").values())
                    + pending_total(samples, "busy")
                )
                break
    return result


class socket_port:
    """A free loopback port."""

    def __enter__(self) -> int:
        import socket

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        return int(self.sock.getsockname()[1])

    def __exit__(self, *_: object) -> None:
        self.sock.close()


def ingest_ratio(records: int, workdir: Path, insight: bool = True) -> tuple[float, float, float]:
    """CPU of the whole ingest path over the CPU of json.loads alone, on the same bytes.

    With `insight` false, the counters by country and number group and the oldest pending
    message are left out (patched away here only: the exporter has no such switch), which is
    the ingest path as it was before them."""
    if not insight:
        with (
            mock.patch.object(Batch, "_dimensions", lambda *_: None),
            mock.patch.object(Ledger, "pending_oldest", lambda _: {}),
        ):
            return ingest_ratio(records, workdir, insight=True)
    rng = random.Random(3)
    pages: list[bytes] = []
    base = 1_800_000_000
    for p in range(max(1, records // PAGE)):
        data = []
        for i in range(PAGE):
            n = p * PAGE + i
            # The busy day's mix: outbound SMS mostly delivered, a few never receipted; inbound.
            status = rng.choices(
                ("delivered", "sent", "undelivered", "failed", "received"),
                weights=(65, 2, 1.5, 1.5, 30),
            )[0]
            inbound = status == "received"
            remote, own = remote_number(rng), rng.choice(OWN_NUMBERS)
            data.append(
                {
                    "id": f"{n:08d}-5b2c-4c41-9a3f-{rng.getrandbits(48):012x}",
                    "from": remote if inbound else own,
                    "to": own if inbound else remote,
                    "status": status,
                    "direction": "inbound" if inbound else "outbound-api",
                    "kind": "sms",
                    "source": "realtime_api",
                    "type": "relay_message",
                    "url": None,
                    "number_of_segments": 1,
                    "charge": 0.00415,
                    "charge_details": [{"description": "Outbound SMS", "charge": 0.00415}],
                    "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(base + n // 12)),
                    "error_code": None,
                    "error_message": None,
                }
            )
        pages.append(json.dumps({"links": {"self": "x"}, "data": data}).encode())

    def json_loads_cpu() -> float:
        gc.collect()
        began = time.process_time()
        for page in pages:
            json.loads(page)
        return time.process_time() - began

    # The daemon keeps what it imported and loaded out of garbage collection (gc.freeze): so do
    # both measurements here.
    gc.collect()
    gc.freeze()
    json_before = json_loads_cpu()
    store = Store(str(workdir / "ingest.db"))
    # Two of the own numbers in a group, as a configuration with number_groups would have them.
    groups = {OWN_NUMBERS[0]: "otp", OWN_NUMBERS[-1]: "marketing"}
    rules = Rules(SettleConfig(timeout=TIMEOUT), POLL, 900.0, 50, PAGE, number_groups=groups)
    ledger = Ledger(rules, store.load("ingest", base - 10, 0))
    gc.collect()
    began = time.process_time()
    now = float(base)
    for page in pages:
        now += POLL
        plan = ledger.plan(now)
        batch = ledger.begin(plan)
        batch.observe_all(parse_records(decode(page)["data"], invalid, ledger.state.settled), now)
        # What the daemon's refresh would bring back for messages past their timeout.
        for message_id in (*plan.get_ids, *plan.timeout_due):
            record = ledger.state.pending.record(message_id)
            if record is not None:
                batch.observe(record, now)
        delta = batch.close(now, now)
        store.commit("ingest", delta)
        ledger.apply(delta)
        ProjectView(
            "ingest",
            totals=copy_totals(ledger.state.totals),
            by_country=copy_totals(ledger.state.by_country),
            by_group=copy_totals(ledger.state.by_group),
            pending=ledger.pending_by_labels(),
            pending_oldest=ledger.pending_oldest(),
        )
    pipeline_cpu = time.process_time() - began
    store.close()
    # The decoder's time drifts with the machine's state: time it before and after the pipeline.
    json_cpu = (json_before + json_loads_cpu()) / 2
    gc.unfreeze()
    return pipeline_cpu / json_cpu, pipeline_cpu, json_cpu


def invalid(error: InvalidRecord) -> None:
    raise AssertionError(f"the benchmark's records are valid: {error}")


def render_ms(day: DayResult, projects: int) -> float:
    """Median time to render /metrics for `projects` projects with the day's label sets."""
    statuses = [
        ProjectView(
            f"project-{i}",
            polled=True,
            up=True,
            last_success=1.0,
            last_duration=1.0,
            cursor=1.0,
            totals=day.totals,
            by_country=day.by_country,
            by_group=day.by_group,
            pending={("outbound-api", "sms", s): 10 for s in ("queued", "sent")},
            failure_ratios={("outbound-api", "sms"): 0.04, ("inbound", "sms"): 0.0},
            error_info={"30007": "Carrier violation", "21610": "Unsubscribed recipient"},
        )
        for i in range(projects)
    ]
    from prometheus_client import generate_latest

    registry = build_registry(lambda: statuses, CounterState.zero)
    times = []
    for _ in range(50):
        began = time.perf_counter()
        generate_latest(registry)
        times.append((time.perf_counter() - began) * 1000)
    return statistics.median(times)


def short_polls(
    workdir: Path, traffic: float = SHORT_TRAFFIC, window: tuple[float, float] = SHORT_WINDOW
) -> DayResult:
    """SHORT_RATE messages a second polled every SHORT_POLL seconds, in virtual time."""
    profile = DayProfile(
        messages=round(SHORT_RATE * traffic),
        seconds=traffic,
        curve=0.0,
        receipt_median=2.0,
        receipt_p99=60.0,
        receipt_max=60.0,
    )
    return busy_day(profile, workdir, poll=SHORT_POLL, tail=2 * SHORT_POLL, window=window)


def figures(
    profile: DayProfile,
    workdir: Path,
    ingest_records: int,
    scrape_backlog: int = SCRAPE_BACKLOG,
    idle_scrapes: int = 500,
    short_traffic: float = SHORT_TRAFFIC,
    short_window: tuple[float, float] = SHORT_WINDOW,
    backlogs: tuple[int, ...] = BACKLOGS,
    pending_sizes: tuple[int, ...] = PENDING_SETS,
    pending_poll: float = PENDING_POLL,
) -> dict[str, Any]:
    progress(f"short polls: {SHORT_RATE:g} messages a second every {SHORT_POLL:g} s")
    short = short_polls(workdir / "short", short_traffic, short_window)
    short.simulator = None
    gc.collect()
    catch_ups = []
    for size in backlogs:
        progress(f"catch-up: a first start over a day of {size:,} messages")
        catch_ups.append(catch_up(workdir, size))
    progress(f"the busy day: {profile.messages:,} messages in virtual time")
    result = busy_day(profile, workdir)
    start = result.end - profile.seconds - TIMEOUT - 3600
    progress("start-up and memory of the daemon on the day's state")
    ready, rss = daemon_start(result, workdir)
    result.simulator = None  # free the day before timing CPU
    gc.collect()
    progress(f"ingest CPU: {ingest_records:,} records, with and without countries and groups")
    # Alternated, the least of two each: the machine's speed drifts between runs.
    runs: dict[bool, list[tuple[float, float, float]]] = {True: [], False: []}
    for insight in (True, False, True, False):
        runs[insight].append(ingest_ratio(ingest_records, workdir, insight))
    ratio, pipeline_cpu, json_cpu = min(runs[True], key=itemgetter(1))
    cpu_without = min(run[1] for run in runs[False])
    progress(f"scrape latency: the daemon takes in {scrape_backlog:,} messages")
    scrapes = scrape_latency(workdir, scrape_backlog, idle_scrapes)
    idle = percentile(scrapes.idle_ms, 0.99)
    busy = percentile(scrapes.polling_ms, 0.99)
    largest = catch_ups[-1]
    pendings = []
    for size in pending_sizes:
        progress(f"pending set: {size:,} messages waiting for their receipts, then all at once")
        pendings.append(pending_set(workdir, size, pending_poll))
    return {
        "pending": [p.row() for p in pendings],
        "pending_largest_peak_rss_mb": pendings[-1].peak_rss_mb,
        "pending_largest_bytes_per_message": pendings[-1].bytes_per_pending,
        "pending_largest_bytes_per_settled_id": pendings[-1].bytes_per_settled_id,
        "pending_largest_burst_settle_polls": pendings[-1].burst_settle_polls,
        "requests_per_1000_messages_2s_polls": 1000
        * short.window_requests
        / max(1, short.window_messages),
        "settle_delay_mean_polls_2s_polls": statistics.mean(short.window_delays) / SHORT_POLL,
        "settle_delay_p50_polls_2s_polls": percentile(short.window_delays, 0.5) / SHORT_POLL,
        "settle_delay_p99_polls_2s_polls": percentile(short.window_delays, 0.99) / SHORT_POLL,
        "short_polls_window_messages": short.window_messages,
        "catch_up": [
            {
                "messages": c.messages,
                "seconds": c.seconds,
                "messages_per_second": c.messages / c.seconds,
                "peak_rss_mb": c.peak_rss_mb,
                "ready_s": c.ready_s,
                "counted": c.counted,
            }
            for c in catch_ups
        ],
        "catch_up_largest_messages": largest.messages,
        "catch_up_largest_peak_rss_mb": largest.peak_rss_mb,
        "messages": result.messages,
        "polls": result.polls,
        "requests": result.requests,
        "requests_per_1000_messages": 1000 * result.requests / result.messages,
        "settle_delay_p50_polls": percentile(result.delays, 0.50) / POLL,
        "settle_delay_p99_polls": percentile(result.delays, 0.99) / POLL,
        "settled_by_status": len(result.delays),
        "pending_left": result.pending_left,
        "daemon_peak_rss_mb": rss,
        "ingest_records": ingest_records,
        "ingest_cpu_s": pipeline_cpu,
        "json_loads_cpu_s": json_cpu,
        "ingest_cpu_ratio_to_json_loads": ratio,
        "ingest_cpu_s_without_countries": cpu_without,
        "ingest_cpu_countries_over_without": pipeline_cpu / cpu_without,
        "metrics_render_median_ms": render_ms(result, 10),
        "scrape_idle_p99_ms": idle,
        "scrape_polling_p99_ms": busy,
        "scrape_p99_ratio_polling_to_idle": busy / idle,
        "scrapes_polling": len(scrapes.polling_ms),
        "scrapes_idle": len(scrapes.idle_ms),
        "catch_up_messages": scrape_backlog,
        "catch_up_s": scrapes.catch_up_s,
        "startup_to_ready_s": ready,
        "commit_per_poll_at_peak_max_ms": peak_commit_ms(result, profile, start),
        "commit_per_poll_median_ms": statistics.median(ms for _, ms in result.commit_ms),
        "commit_per_poll_at_peak_p99_ms": peak_commit_ms(result, profile, start, 0.99),
        "day_cpu_s": result.cpu_s,
        "state_file_mb": Path(result.state_path).stat().st_size / 2**20,
        "label_sets": len(result.totals),
    }


def scaling(workdir: Path, sizes: list[int], main: dict[str, Any]) -> list[dict[str, Any]]:
    """The day at other sizes; at each, what the late sweep adds (the same day with
    max_ingestion_delay 0, where records are taken to show at once and none is swept)."""
    rows = []
    for size in sizes:
        if size == main["messages"]:
            row = {
                "messages_per_day": size,
                "requests_per_1000_messages": main["requests_per_1000_messages"],
                "settle_delay_p99_polls": main["settle_delay_p99_polls"],
                "cpu_s_per_day": main["day_cpu_s"],
                "state_file_mb": main["state_file_mb"],
            }
        else:
            progress(f"growth: a day of {size:,} messages")
            result = busy_day(DayProfile(messages=size), workdir / f"s{size}")
            row = {
                "messages_per_day": size,
                "requests_per_1000_messages": 1000 * result.requests / size,
                "settle_delay_p99_polls": percentile(result.delays, 0.99) / POLL,
                "cpu_s_per_day": result.cpu_s,
                "state_file_mb": Path(result.state_path).stat().st_size / 2**20,
            }
        progress(f"growth: a day of {size:,} messages without the late sweep")
        unswept = busy_day(DayProfile(messages=size), workdir / f"u{size}", ingestion_delay=0.0)
        row["late_sweep_adds_requests_per_1000"] = (
            row["requests_per_1000_messages"] - 1000 * unswept.requests / size
        )
        rows.append(row)
    progress("render time by number of projects")
    day = busy_day(DayProfile(messages=sizes[0]), workdir / "p")
    for projects in (1, 10, 100):
        rows.append({"projects": projects, "metrics_render_median_ms": render_ms(day, projects)})
    return rows


def table(results: dict[str, Any]) -> str:
    lines = [f"{'figure':40} {'measured':>12} {'target':>10}  ok"]
    for name, (op, target) in TARGETS.items():
        value = results[name]
        ok = value <= target if op == "<=" else value >= target
        lines.append(
            f"{name:40} {value:12.3f} {op + ' ' + format(target, 'g'):>10}  {'yes' if ok else 'NO'}"
        )
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cores": os.cpu_count(), "cpu": model, "python": platform.python_version()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=1_000_000, help="messages in the day")
    parser.add_argument("--ingest", type=int, default=1_000_000, help="records for the CPU ratio")
    parser.add_argument(
        "--scrape-backlog",
        type=int,
        default=SCRAPE_BACKLOG,
        help="messages the daemon takes in while its scrapes are timed",
    )
    parser.add_argument("--scaling", default="10000,100000,1000000", help="sizes, comma-separated")
    parser.add_argument(
        "--backlogs",
        default=",".join(map(str, BACKLOGS)),
        help="catch-up sizes, comma-separated (the last one's peak RSS is checked)",
    )
    parser.add_argument(
        "--pending",
        default=",".join(map(str, PENDING_SETS)),
        help="pending-set sizes, comma-separated (the last one's figures are checked)",
    )
    parser.add_argument("--output", default="bench-results.json")
    args = parser.parse_args(argv)
    configure("warning")
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        began = time.monotonic()
        results = figures(
            DayProfile(messages=args.messages),
            workdir,
            args.ingest,
            args.scrape_backlog,
            backlogs=tuple(int(b) for b in args.backlogs.split(",") if b),
            pending_sizes=tuple(int(p) for p in args.pending.split(",") if p),
        )
        print(table(results), flush=True)
        for row in results["catch_up"]:
            print(
                f"catch-up of {row['messages']:,}: {row['seconds']:.1f} s, "
                f"{row['messages_per_second']:,.0f} messages/s, peak RSS {row['peak_rss_mb']:.1f}"
                f" MB, ready after {row['ready_s']:.1f} s, {row['counted']:,} counted"
            )
        for row in results["pending"]:
            print(
                f"pending set of {row['messages']:,}: {row['bytes_per_pending']:.0f} bytes a "
                f"pending message, {row['bytes_per_settled_id']:.0f} a settled id, peak RSS "
                f"{row['peak_rss_mb']:.1f} MB; a burst of receipts settled in "
                f"{row['burst_settle_s']:.1f} s ({row['burst_settle_polls']:.1f} polls), "
                f"{row['delivered']:,} counted delivered"
            )
        sizes = [int(s) for s in args.scaling.split(",") if s]
        growth = scaling(workdir, sizes, results) if sizes else []
        for row in growth:
            print(
                "  ".join(
                    f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()
                )
            )
        report = {
            "machine": machine(),
            "figures": results,
            "targets": {k: {"op": op, "value": v} for k, (op, v) in TARGETS.items()},
            "scaling": growth,
            "seconds": time.monotonic() - began,
        }
    Path(args.output).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.output} ({report['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
