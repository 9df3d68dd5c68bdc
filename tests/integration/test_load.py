"""The HTTP server under load and abuse: the real daemon (a subprocess) polling the simulator while
clients hold idle connections open and send a 1 MB header; 50 concurrent scrapes must each be
answered 200 within a second, and the process must give back the threads and memory afterwards."""

from __future__ import annotations

import contextlib
import socket
import statistics
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import requests

from exporter.simulator import Simulator, SimulatorServer, TrafficGenerator, TrafficProfile
from tests.helpers import Daemon, parse_metrics, wait_for, write_config

PROJECTS = {
    "alpha": ("11111111-aaaa", "PTalpha-load-token"),
    "beta": ("22222222-bbbb", "PTbeta-load-token"),
}
SCRAPES = 50
SCRAPE_BOUND = 1.0  # seconds: every scrape under abuse answers within this (part of the promise)
IDLE_CONNECTIONS = 100
RSS_MARGIN_KB = 30 * 1024
THREAD_MARGIN = 3  # threads above the baseline once the abusive connections are gone
QUIET_THREADS = 8  # at most, with no connection open: main, accept loop, 2 pollers, spare
HUGE_HEADER = 1024 * 1024
SERVER_IDLE_TIMEOUT = 10.0  # exporter.server.REQUEST_TIMEOUT: an idle connection is dropped after


# --------------------------------------------------------------------------- helpers


def proc_status(pid: int) -> dict[str, str]:
    fields = {}
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            name, _, value = line.partition(":")
            fields[name] = value.strip()
    return fields


def rss_kb(pid: int) -> int:
    return int(proc_status(pid)["VmRSS"].split()[0])


def threads(pid: int) -> int:
    return int(proc_status(pid)["Threads"])


def pid_of(daemon: Daemon) -> int:
    assert daemon.proc is not None
    return daemon.proc.pid


@dataclass
class Scrape:
    status: int | None
    seconds: float
    error: str | None = None
    body: str = ""


def listen_overflows() -> int:
    """The kernel's count of connections dropped because a listen queue was full (this network
    namespace; a diagnostic for slow scrapes: a dropped SYN or ACK is retried after 1 s)."""
    with open("/proc/net/netstat", encoding="ascii") as f:
        lines = f.read().splitlines()
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names.startswith("TcpExt:"):
            return int(dict(zip(names.split(), values.split(), strict=True))["ListenOverflows"])
    return 0


def concurrent_scrapes(url: str, n: int) -> list[Scrape]:
    """n threads released together by a barrier, each timing one GET /metrics (own connection)."""
    barrier = threading.Barrier(n)
    results: list[Scrape | None] = [None] * n

    def one(i: int) -> None:
        barrier.wait()
        start = time.monotonic()
        try:
            response = requests.get(f"{url}/metrics", timeout=10)
        except requests.RequestException as exc:
            results[i] = Scrape(None, time.monotonic() - start, repr(exc))
        else:
            results[i] = Scrape(response.status_code, time.monotonic() - start, body=response.text)

    workers = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(n)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=30)
    assert not any(w.is_alive() for w in workers), "a scrape thread hung"
    return [r for r in results if r is not None]


def timed_scrapes(url: str, n: int, context: str) -> tuple[float, float]:
    """n concurrent scrapes, each answered 200 with metrics within SCRAPE_BOUND; returns the
    (p50, max) latency in seconds."""
    overflows = listen_overflows()
    scrapes = concurrent_scrapes(url, n)
    overflows = listen_overflows() - overflows
    assert len(scrapes) == n
    failed = [s for s in scrapes if s.status != 200]
    latencies = sorted(s.seconds for s in scrapes)
    summary = (
        f"{context}: {len(failed)}/{n} failed, latency p50 {statistics.median(latencies):.3f}s "
        f"max {latencies[-1]:.3f}s; listen queue overflows meanwhile: {overflows}; "
        f"failures: {[(s.status, s.error) for s in failed[:3]]}"
    )
    print(summary)
    assert not failed, summary
    slow = [s.seconds for s in scrapes if s.seconds > SCRAPE_BOUND]
    assert not slow, f"{len(slow)} scrapes slower than {SCRAPE_BOUND}s: {summary}"
    for s in scrapes:
        assert ("signalwire_up", frozenset({("project", "alpha")})) in parse_metrics(s.body)
    return statistics.median(latencies), latencies[-1]


def idle_connection(port: int, partial: bytes = b"") -> socket.socket:
    """A slowloris client: connects, sends at most a partial request, and then nothing."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    if partial:
        sock.sendall(partial)
    return sock


def huge_header_request(port: int) -> str:
    """Sends a request with a 1 MB header; returns what happened: the status line the server
    answered, or "closed" when it closed or reset the connection. Anything else (no answer and
    the connection still open after 10 s, or a 2xx) fails the caller's assertion."""
    request = (
        b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Huge: " + b"a" * HUGE_HEADER + b"\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        # The server may stop reading and close: its answer may still be readable.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(request)
        received = b""
        try:
            while b"\r\n" not in received:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                received += chunk
        except ConnectionResetError:
            pass
        except TimeoutError:
            return "no answer within 10 s, connection still open"
    if not received:
        return "closed"
    return received.split(b"\r\n", 1)[0].decode("latin-1")


def is_rejection(outcome: str) -> bool:
    if outcome == "closed":
        return True
    parts = outcome.split()
    return len(parts) >= 2 and parts[0].startswith("HTTP/") and parts[1][:1] in ("4", "5")


def closed_by_peer(sock: socket.socket) -> bool:
    """True when the server has closed the connection (EOF or reset), reading anything first."""
    sock.settimeout(2)
    try:
        while sock.recv(4096):
            pass
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return True


def healthy(daemon: Daemon) -> bool:
    daemon.assert_alive()
    return requests.get(f"{daemon.url}/-/healthy", timeout=2).status_code == 200


def settle_threads(pid: int, baseline: int, what: str, timeout: float = 15) -> int:
    """Waits for the thread count to come back to the baseline (+ THREAD_MARGIN); returns it."""
    try:
        return wait_for(
            lambda: (n := threads(pid)) <= baseline + THREAD_MARGIN and n,
            timeout,
            what,
            interval=0.1,
        )
    except AssertionError:
        raise AssertionError(
            f"{what}: threads not back to {baseline}+{THREAD_MARGIN} within {timeout:.0f}s "
            f"(still {threads(pid)})"
        ) from None


# --------------------------------------------------------------------------- fixture


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """The daemon polling two simulated projects every second, with live traffic."""
    simulator = Simulator(seed=7)
    for project_id, token in PROJECTS.values():
        simulator.add_project(project_id, token)
    tmp_path = tmp_path_factory.mktemp("load")
    profile = TrafficProfile(max_delay=1.5)
    traffic = [
        TrafficGenerator(simulator, pid, rate=10, profile=profile, seed=i)
        for i, (pid, _) in enumerate(PROJECTS.values())
    ]
    with SimulatorServer(simulator) as server:
        projects = [
            {"name": name, "space": server.base_url, "project_id": pid, "api_token": token}
            for name, (pid, token) in PROJECTS.items()
        ]
        config = write_config(
            tmp_path / "config.yaml",
            projects,
            poll_interval="1s",
            state_path="state/exporter.db",
            settle={"timeout": "3s"},
            request={"timeout": "2s", "page_size": 50},
        )
        for t in traffic:
            t.start()
        daemon = Daemon(config, tmp_path).start()
        try:
            key = "signalwire_messages_total"
            wait_for(
                lambda: any(name == key for name, _ in daemon.scrape()), 20, "messages counted"
            )
            yield daemon
            daemon.assert_alive()
            assert daemon.terminate() == 0, daemon.log()
        finally:
            for t in traffic:
                t.stop()
            if daemon.proc is not None and daemon.proc.poll() is None:
                daemon.kill()


def baseline(daemon: Daemon) -> tuple[int, int]:
    """(RSS kB, threads) once a first round of concurrent scrapes has warmed the server up and
    its connection threads have ended (the same count twice, 0.2 s apart)."""
    daemon.assert_alive()
    pid = pid_of(daemon)
    concurrent_scrapes(daemon.url, SCRAPES)
    last = [-1]

    def steady() -> int:
        previous, last[0] = last[0], threads(pid)
        return last[0] if last[0] == previous and last[0] <= QUIET_THREADS else 0

    try:
        base_threads = wait_for(steady, 10, "threads to settle", interval=0.2)
    except AssertionError:
        raise AssertionError(
            f"threads did not settle to {QUIET_THREADS} or fewer after a round of scrapes: "
            f"{threads(pid)}"
        ) from None
    return rss_kb(pid), base_threads


# --------------------------------------------------------------------------- tests


def test_scrapes_answered_during_slowloris_and_huge_header(daemon: Daemon) -> None:
    pid = pid_of(daemon)
    rss_before, threads_before = baseline(daemon)

    slow: list[socket.socket] = []
    try:
        slow.append(idle_connection(daemon.port))  # connects and sends nothing
        slow.append(idle_connection(daemon.port, b"GET /metrics HTTP/1.1\r\nHost: 127."))
        outcome: list[str] = []
        huge = threading.Thread(
            target=lambda: outcome.append(huge_header_request(daemon.port)), daemon=True
        )
        huge.start()
        p50, worst = timed_scrapes(daemon.url, SCRAPES, "50 scrapes under slowloris")
        huge.join(timeout=20)
        assert outcome, "the 1 MB header request hung"
        assert is_rejection(outcome[0]), f"1 MB header answered {outcome[0]!r}"
        assert wait_for(lambda: healthy(daemon), 5, "/-/healthy under abuse")
        threads_during = threads(pid)
    finally:
        for sock in slow:
            sock.close()

    threads_after = settle_threads(pid, threads_before, "after slowloris")
    assert healthy(daemon)
    rss_after = rss_kb(pid)
    print(
        f"abuse: huge header -> {outcome[0]!r}; scrapes p50 {p50:.3f}s max {worst:.3f}s; "
        f"RSS {rss_before / 1024:.1f} -> {rss_after / 1024:.1f} MB; threads {threads_before} "
        f"-> {threads_during} (during) -> {threads_after}"
    )
    assert rss_after <= rss_before + RSS_MARGIN_KB, (
        f"RSS grew from {rss_before} kB to {rss_after} kB under abuse"
    )


def test_hundred_idle_connections_do_not_stop_scrapes(daemon: Daemon) -> None:
    pid = pid_of(daemon)
    rss_before, threads_before = baseline(daemon)

    idle: list[socket.socket] = []
    try:
        opened = time.monotonic()
        for i in range(IDLE_CONNECTIONS):
            partial = b"GET /metrics HTTP/1.1\r\n" if i % 2 else b""
            idle.append(idle_connection(daemon.port, partial))
        p50, worst = timed_scrapes(daemon.url, SCRAPES, "50 scrapes, 100 idle connections")
        assert healthy(daemon)
        # Noted, not promised: ThreadingHTTPServer gives each idle connection a thread.
        threads_during = threads(pid)
        # The idle clients never close: the server must drop them itself (REQUEST_TIMEOUT), and
        # with them their threads.
        threads_after = settle_threads(
            pid, threads_before, "idle connections dropped by the server", SERVER_IDLE_TIMEOUT + 10
        )
        dropped_after = time.monotonic() - opened
        still_open = sum(1 for sock in idle if not closed_by_peer(sock))
        assert still_open == 0, f"{still_open} idle connections still open after the timeout"
    finally:
        for sock in idle:
            sock.close()
    assert healthy(daemon)
    rss_after = rss_kb(pid)
    print(
        f"100 idle: scrapes p50 {p50:.3f}s max {worst:.3f}s; threads {threads_before} -> "
        f"{threads_during} (with the idle connections) -> {threads_after} after "
        f"{dropped_after:.1f}s; RSS {rss_before / 1024:.1f} -> {rss_after / 1024:.1f} MB"
    )
    assert rss_after <= rss_before + RSS_MARGIN_KB


def test_clients_that_hang_up_leave_no_traceback_in_the_log(daemon: Daemon) -> None:
    """docs/logs.md: one event per line on stderr, also when clients hang up before the answer."""
    pid = pid_of(daemon)
    _, threads_before = baseline(daemon)
    for request in (
        b"GET /metrics HTTP/1.1\r\nHost: 127.",  # a slowloris giving up half way
        b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",  # a scraper timing out
    ):
        for _ in range(5):
            with idle_connection(daemon.port, request) as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    settle_threads(pid, threads_before, "hung-up connections handled")
    assert healthy(daemon)
    log = daemon.log_path.read_text(errors="replace")
    assert "Traceback" not in log, log[log.index("Traceback") - 300 :][:3000]
