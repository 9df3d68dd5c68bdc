"""`signalwire-exporter demo` on a fresh start: counts of every kind within a minute."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import requests

from tests.helpers import ROOT, Samples, free_port, parse_metrics, wait_for


def varied(samples: Samples) -> bool:
    series = [
        dict(labels)
        for (name, labels), value in samples.items()
        if name == "signalwire_messages_total" and value > 0
    ]
    seen = {key: {s[key] for s in series} for key in ("status", "direction", "kind", "error_code")}
    return (
        {"delivered", "undelivered", "failed", "received", "sent"} <= seen["status"]
        and len(seen["direction"]) >= 2
        and {"sms", "mms"} <= seen["kind"]
        and len(seen["error_code"] - {""}) >= 3
    )


def test_demo_shows_varied_counts_and_the_project_up(tmp_path: object) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "exporter", "demo", "--web.listen-address", f"127.0.0.1:{port}"],
        cwd=str(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(
            lambda: varied(parse_metrics(requests.get(f"{url}/metrics", timeout=2).text)),
            60,
            "varied signalwire_messages_total series",
        )
        landing = requests.get(f"{url}/", timeout=2).text
        assert '<tr class="up"><td>demo</td><td>up</td>' in landing
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr.decode()
    assert b"Traceback" not in stderr
    assert f"http://127.0.0.1:{port}/".encode() in stderr
