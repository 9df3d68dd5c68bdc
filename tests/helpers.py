"""Shared test helpers: waiting on conditions, scraping, running the daemon as a subprocess."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import phonenumbers
import requests
import yaml
from prometheus_client.parser import text_string_to_metric_families

from exporter.config import DEFAULT_FINAL_BY_KIND, DEFAULT_FINAL_STATUSES
from exporter.simulator import SimMessage, Simulator

T = TypeVar("T")
ROOT = Path(__file__).resolve().parent.parent


def wait_for(condition: Callable[[], T], timeout: float, what: str, interval: float = 0.05) -> T:
    """Poll `condition` until it returns a truthy value; fail with `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = condition()
        except (requests.RequestException, OSError, ValueError) as exc:
            last_error = exc
        else:
            if value:
                return value
        time.sleep(interval)
    raise AssertionError(
        f"timed out after {timeout}s waiting for {what} (last error: {last_error})"
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse_metrics(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def select(samples: Samples, name: str, **labels: str) -> dict[frozenset[tuple[str, str]], float]:
    """Samples of one metric whose labels include `labels`."""
    want = set(labels.items())
    return {lbl: v for (n, lbl), v in samples.items() if n == name and want <= set(lbl)}


# The metric names of docs/metrics.md: rules and dashboards may use these and nothing else.
DOCUMENTED_METRICS = frozenset(
    {
        "signalwire_messages_total",
        "signalwire_message_segments_total",
        "signalwire_message_charge_usd_total",
        "signalwire_messages_pending",
        "signalwire_message_failure_ratio",
        "signalwire_message_error_info",
        "signalwire_up",
        "signalwire_last_successful_poll_timestamp_seconds",
        "signalwire_poll_duration_seconds",
        "signalwire_cursor_timestamp_seconds",
        "signalwire_api_requests_total",
        "signalwire_invalid_records_total",
        "signalwire_late_records_total",
        "signalwire_exporter_build_info",
        "signalwire_messages_by_country_total",
        "signalwire_message_charge_usd_by_country_total",
        "signalwire_messages_by_number_group_total",
        "signalwire_message_charge_usd_by_number_group_total",
        "signalwire_messages_pending_oldest_created_timestamp_seconds",
    }
)

Totals = dict[tuple[str, str, str, str], tuple[int, int, float]]


def exported_totals(samples: Samples, project: str) -> Totals:
    """A project's three message counters from a scrape: labels -> (messages, segments, USD)."""
    result: Totals = {}
    for labels, value in select(samples, "signalwire_messages_total", project=project).items():
        d = dict(labels)
        key = (d["direction"], d["kind"], d["status"], d["error_code"])
        segments = select(samples, "signalwire_message_segments_total", **d)[labels]
        charge = select(samples, "signalwire_message_charge_usd_total", **d)[labels]
        result[key] = (int(value), int(segments), charge)
    return result


def ground_truth(
    simulator: Simulator, project_id: str, start_point: float, settle_timeout: float
) -> Totals:
    """What the exporter must show once everything settled, under the default final statuses."""
    truth = simulator.expected_totals(
        project_id,
        final_statuses=DEFAULT_FINAL_STATUSES,
        final_statuses_by_kind=DEFAULT_FINAL_BY_KIND,
        settle_timeout=settle_timeout,
        start_point=start_point,
    )
    return {k: (n, s, c / 1e9) for k, (n, s, c) in truth.items()}


def true_country(number: str) -> str:
    """The country a remote number belongs to, straight from the phone-number library (no
    cache): what the exporter's `country` label must say below limits.max_countries."""
    if not re.fullmatch(r"\+[1-9][0-9]{1,14}", number):
        return "unknown"
    try:
        region = phonenumbers.region_code_for_number(phonenumbers.parse(number, None))
    except phonenumbers.NumberParseException:
        return "unknown"
    return region if region and len(region) == 2 and region.isalpha() else "unknown"


def remote_of(message: SimMessage) -> str:
    return message.from_number if message.direction == "inbound" else message.to_number


def own_of(message: SimMessage) -> str:
    return message.to_number if message.direction == "inbound" else message.from_number


def dimension_truth(
    simulator: Simulator,
    project_id: str,
    start_point: float,
    settle_timeout: float,
    by: Callable[[SimMessage], str],
) -> dict[tuple[str, str, str, str], tuple[int, float]]:
    """(direction, kind, status, by(message)) -> (messages, USD) once everything settled."""
    truth = simulator.expected_totals(
        project_id,
        final_statuses=DEFAULT_FINAL_STATUSES,
        final_statuses_by_kind=DEFAULT_FINAL_BY_KIND,
        settle_timeout=settle_timeout,
        start_point=start_point,
        by=by,
    )
    return {k: (n, c / 1e9) for k, (n, _, c) in truth.items()}


def exported_dimension(
    samples: Samples, project: str, dimension: str
) -> dict[tuple[str, str, str, str], tuple[int, float]]:
    """The counters by `country` or by `number_group` from a scrape: labels -> (messages, USD)."""
    result: dict[tuple[str, str, str, str], tuple[int, float]] = {}
    name = "number_group" if dimension == "number_group" else "country"
    for labels, value in select(
        samples, f"signalwire_messages_by_{name}_total", project=project
    ).items():
        d = dict(labels)
        charge = select(samples, f"signalwire_message_charge_usd_by_{name}_total", **d)[labels]
        result[(d["direction"], d["kind"], d["status"], d[name])] = (int(value), charge)
    return result


def sums_agree(samples: Samples, project: str) -> bool:
    """Summed over country, and over number_group, the insight counters equal the message
    counters summed over error_code, per direction, kind and status."""
    messages: dict[tuple[str, str, str], list[float]] = {}
    for (d, k, s, _), (n, _, usd) in exported_totals(samples, project).items():
        acc = messages.setdefault((d, k, s), [0, 0.0])
        acc[0] += n
        acc[1] += usd
    for dimension in ("country", "number_group"):
        sums: dict[tuple[str, str, str], list[float]] = {}
        for (d, k, s, _), (n, usd) in exported_dimension(samples, project, dimension).items():
            acc = sums.setdefault((d, k, s), [0, 0.0])
            acc[0] += n
            acc[1] += usd
        if set(sums) != set(messages):
            return False
        for key, (n, usd) in sums.items():
            if n != messages[key][0] or abs(usd - messages[key][1]) > 1e-6:
                return False
    return True


def pending_total(samples: Samples, project: str) -> float:
    return sum(select(samples, "signalwire_messages_pending", project=project).values())


def write_config(path: Path, projects: list[dict[str, Any]], **settings: Any) -> Path:
    config = {"projects": projects, **settings}
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


RUNNING: list[subprocess.Popen[bytes]] = []  # every daemon started, killed after each test


def kill_leftovers(keep: int = 0) -> None:
    """Kill daemons started after the first `keep` that are still running: a failed test may
    leave its own behind (a passing test stops them); wider fixtures' daemons are kept."""
    while len(RUNNING) > keep:
        proc = RUNNING.pop()
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


class Daemon:
    """`python -m exporter run` in a subprocess, with its stderr captured to a file."""

    def __init__(self, config: Path, workdir: Path, extra: list[str] | None = None) -> None:
        self.config = config
        self.workdir = workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.extra = extra or []
        self.log_path = workdir / "daemon.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, wait_ready: bool = True) -> Daemon:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "exporter",
                "run",
                "--config.file",
                str(self.config),
                "--web.listen-address",
                f"127.0.0.1:{self.port}",
                "--log.level",
                "debug",
                *self.extra,
            ],
            cwd=self.workdir,
            stdout=log,
            stderr=log,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        log.close()
        RUNNING.append(self.proc)
        if wait_ready:
            wait_for(self.ready, 30, f"daemon ready\n{self.log()}")
        return self

    def ready(self) -> bool:
        self.assert_alive()
        return requests.get(f"{self.url}/-/ready", timeout=2).status_code == 200

    def assert_alive(self) -> None:
        assert self.proc is not None
        code = self.proc.poll()
        if code is not None:
            raise AssertionError(f"daemon exited with {code}:\n{self.log()}")

    def scrape(self) -> Samples:
        response = requests.get(f"{self.url}/metrics", timeout=5)
        response.raise_for_status()
        return parse_metrics(response.text)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:]

    def kill(self) -> None:
        """kill -9 the daemon, then wait until its polling process has died with it, as a
        supervisor restarting it would find things."""
        assert self.proc is not None
        family = process_family(self.proc.pid) if self.proc.poll() is None else []
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)
        wait_for(lambda: not any(map(alive, family)), 10, f"the daemon's processes {family} gone")

    def terminate(self, timeout: float = 30) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)


def process_family(pid: int) -> list[int]:
    """A daemon's process and its children (the polling process), from /proc."""
    family = [pid]
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # gone meanwhile
        # The command name in parentheses may hold spaces: the parent pid follows the last ')'.
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            family.append(int(entry.name))
    return family


def alive(pid: int) -> bool:
    """The process exists and is not a zombie (a zombie holds no files)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"
