"""A carrier's receipt delay at scale: the real daemon holding a large pending set, then a burst of
its receipts. Measured: bytes of Python heap per pending message and per settled id (tracemalloc,
in this process), the peak RSS of the daemon's two processes, and the time from the burst to the
last settlement."""

from __future__ import annotations

import gc
import math
import multiprocessing
import os
import random
import subprocess
import sys
import time
import tracemalloc
import uuid
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import requests
import yaml

from exporter.config import SettleConfig
from exporter.ledger import Ledger, LedgerState, Pending, PollDelta, Rules
from exporter.pending import PendingSet
from exporter.records import Message
from exporter.simulator import Simulator, SimulatorServer, Step
from tests.helpers import exported_totals, free_port, parse_metrics, pending_total, process_family

PROJECT_ID, TOKEN = "pending-project", "PTpending-token"
POLL = 10.0
TIMEOUT = 7200.0
SENT_OVER = 1800.0  # the pending messages were sent over half an hour
T0 = 1_800_000_000.0


@dataclass
class PendingResult:
    messages: int
    bytes_per_pending: float
    bytes_per_settled_id: float
    peak_rss_mb: float
    burst_settle_s: float
    delivered: int  # counted delivered once all settled: every one of `messages`, once
    poll: float = POLL

    @property
    def burst_settle_polls(self) -> float:
        return self.burst_settle_s / self.poll

    def row(self) -> dict[str, Any]:
        return {
            "messages": self.messages,
            "bytes_per_pending": self.bytes_per_pending,
            "bytes_per_settled_id": self.bytes_per_settled_id,
            "peak_rss_mb": self.peak_rss_mb,
            "burst_settle_s": self.burst_settle_s,
            "burst_settle_polls": self.burst_settle_polls,
            "delivered": self.delivered,
        }


def heap_bytes(size: int) -> tuple[float, float]:
    """Bytes of Python heap a ledger holds per pending message, then per settled id once they
    have all settled (only what the ledger keeps: the records themselves come and go)."""
    rng = random.Random(7)
    messages = [
        Message(
            str(uuid.UUID(int=rng.getrandbits(128), version=4)),
            T0 - SENT_OVER + i * SENT_OVER / size,
            "outbound-api",
            "sms",
            "sent",
            "",
            None,
            1,
            8_300_000,
            f"+1415{rng.randrange(10**7):07d}",
            "+15551230000",
        )
        for i in range(size)
    ]
    rules = Rules(SettleConfig(timeout=TIMEOUT), POLL, 900.0, 50, 1000)
    # As in the daemon, whose state file holds the whole records (none is read here).
    state = LedgerState(
        start_point=T0 - 3600, cursor=T0 - 3600, pending=PendingSet(lambda message_id: None)
    )
    ledger = Ledger(rules, state)
    upserts = {m.id: Pending(m, T0) for m in messages}
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    ledger.apply(PollDelta(cursor=T0 - 60, pending_upserts=upserts))
    del upserts
    gc.collect()
    pending = (tracemalloc.get_traced_memory()[0] - before) / size
    settled = {m.id: m.created_at for m in messages}
    ledger.apply(
        PollDelta(
            cursor=T0 - 60,
            settled_ids=settled,
            pending_removed=set(settled),
            prune_settled_before=T0 - 3600,
        )
    )
    del settled, messages
    gc.collect()
    ids = (tracemalloc.get_traced_memory()[0] - before) / size
    tracemalloc.stop()
    return pending, ids


def _simulator(size: int, conn: Connection) -> None:
    """SignalWire's side, in its own process at a lower priority: `size` outbound SMS sent over
    the last half hour, their receipts withheld until told, then all at once."""
    os.nice(10)
    simulator = Simulator(seed=9)
    simulator.add_project(PROJECT_ID, TOKEN)
    now = time.time()
    for i in range(size):
        simulator.add_message(
            PROJECT_ID,
            direction="outbound-api",
            kind="sms",
            created_at=now - 60 - SENT_OVER * i / size,
            segments=1,
            timeline=[Step(0, "queued"), Step(1, "sent", charge=0.0083)],
        )
    with SimulatorServer(simulator) as api:
        conn.send(api.base_url)
        conn.recv()  # the receipts arrive
        now = time.time()
        with simulator._lock:
            for message in simulator.messages(PROJECT_ID):
                message.timeline.append(
                    Step(math.ceil(now - message.created_at), "delivered", charge=0.0083)
                )
        conn.send(now)
        conn.recv()  # until the measurement is done


def peak_rss_mb(pid: int) -> float:
    """Peak RSS of the daemon and its polling process together (each one's VmHWM, summed)."""
    peak_kb = 0
    for member in process_family(pid):
        for line in Path(f"/proc/{member}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                peak_kb += int(line.split()[1])
    return peak_kb / 1024


def _wait(url: str, proc: subprocess.Popen[bytes], done: Any, limit: float) -> Any:
    """The first scrape for which `done` holds."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the daemon exited with {proc.returncode}")
        try:
            samples = parse_metrics(requests.get(f"{url}/metrics", timeout=10).text)
        except requests.RequestException:
            samples = None
        if samples is not None and done(samples):
            return samples
        time.sleep(0.5)
    raise RuntimeError(f"not done within {limit:.0f} s")


def daemon_with_pending(workdir: Path, size: int, poll: float = POLL) -> tuple[float, float, int]:
    """The real daemon takes in `size` pending messages, then their receipts all at once:
    its peak RSS (both processes), seconds from the receipts to the last settlement, and the
    messages it then counts delivered."""
    context = multiprocessing.get_context("fork")
    ours, theirs = context.Pipe()
    simulator = context.Process(target=_simulator, args=(size, theirs))
    simulator.start()
    try:
        base_url = ours.recv()
        config = workdir / f"pending-{size}.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "poll_interval": f"{poll:g}s",
                    "state_path": str(workdir / f"pending-{size}.db"),
                    "start_from": "1h",
                    "settle": {"timeout": f"{TIMEOUT:g}s"},
                    "request": {"page_size": 1000},
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
        config.chmod(0o600)
        port = free_port()
        proc = subprocess.Popen(
            [sys.executable, "-m", "exporter", "--config.file", str(config),
             "--web.listen-address", f"127.0.0.1:{port}", "--log.level", "warning"],
            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
        )  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        try:
            _wait(url, proc, lambda s: pending_total(s, "busy") == size, 600)
            ours.send("release")
            released = ours.recv()
            samples = _wait(url, proc, lambda s: pending_total(s, "busy") == 0, 600)
            settle_s = time.time() - released
            totals = exported_totals(samples, "busy")
            delivered = sum(
                n for (_, _, status, _), (n, _, _) in totals.items() if status == "delivered"
            )
            rss = peak_rss_mb(proc.pid)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    finally:
        ours.send("done")
        simulator.join(timeout=60)
    return rss, settle_s, delivered


def pending_set(workdir: Path, size: int, poll: float = POLL) -> PendingResult:
    per_pending, per_id = heap_bytes(size)
    gc.collect()
    rss, settle_s, delivered = daemon_with_pending(workdir, size, poll)
    return PendingResult(size, per_pending, per_id, rss, settle_s, delivered, poll)
