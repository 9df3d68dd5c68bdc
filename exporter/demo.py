"""`signalwire-exporter demo`: the exporter against the built-in simulator, no account needed.

The simulator gets ten minutes of history (so counts show at the first poll) and live traffic
covering every status, direction, kind and several error codes. The state lives in a temporary
directory that is removed on exit.
"""

from __future__ import annotations

import math
import random
import sys
import tempfile
import time

from exporter.cli import serve
from exporter.config import Config, ListenAddress, ProjectConfig, SettleConfig
from exporter.daemon import Exporter
from exporter.logs import redact_tokens
from exporter.simulator import (
    Simulator,
    SimulatorServer,
    TrafficGenerator,
    TrafficProfile,
    random_message_args,
)
from exporter.webconfig import WebConfig

DEMO_PROJECT_ID = "00000000-demo-0000-0000-000000000000"
DEMO_TOKEN = "PTdemo-not-a-real-token"
HISTORY = 600.0
# A few records the log shows late (up to 90 s after their created_at), as SignalWire's may.
PROFILE = TrafficProfile(max_delay=20.0, late=0.03, max_lateness=90.0)
DEMO_NUMBER_GROUPS = {
    "otp": ("+15551230000", "+15551230001"),
    "marketing": ("+15557650000", "72345"),
}


def demo_config(base_url: str, state_path: str, listen: ListenAddress) -> Config:
    return Config(
        projects=(ProjectConfig("demo", base_url, DEMO_PROJECT_ID, DEMO_TOKEN),),
        listen_address=listen,
        poll_interval=5.0,
        state_path=state_path,
        start_from=HISTORY,
        failure_ratio_window=300.0,
        settle=SettleConfig(timeout=60.0),
        page_size=200,
        # Two of the simulated account's numbers for one-time passwords, a long code and the
        # short code for marketing: the rest show as "ungrouped".
        number_groups=DEMO_NUMBER_GROUPS,
        source="<demo>",
    )


def run_demo(listen: ListenAddress | None, rate: float, web: WebConfig | None = None) -> int:
    simulator = Simulator(seed=1)
    simulator.add_project(DEMO_PROJECT_ID, DEMO_TOKEN)
    rng = random.Random(7)
    now = math.floor(time.time())
    for i in range(int(HISTORY * rate)):
        created = now - HISTORY + i / rate
        simulator.add_message(
            DEMO_PROJECT_ID, created_at=math.floor(created), **random_message_args(rng, PROFILE)
        )
    traffic = TrafficGenerator(simulator, DEMO_PROJECT_ID, rate, PROFILE, seed=11)
    with SimulatorServer(simulator) as api, tempfile.TemporaryDirectory() as state_dir:
        config = demo_config(
            api.base_url, f"{state_dir}/demo.db", listen or ListenAddress("0.0.0.0", 9797)
        )
        redact_tokens(config)
        exporter = Exporter(config, web=web, demo=True)
        traffic.start()

        def announce() -> None:
            assert exporter.server is not None
            url = exporter.server.url
            print(
                f"SignalWire simulator: {api.base_url}/api/messaging/logs "
                f"(project {DEMO_PROJECT_ID}, {rate:g} messages/s)\n"
                f"Exporter:             {url}/  (metrics: {url}/metrics; listening on "
                f"{exporter.server.bound})\n"
                "Counts appear within a few seconds. Press Ctrl-C to stop.",
                file=sys.stderr,
                flush=True,
            )

        try:
            return serve(exporter, announce)
        finally:
            traffic.stop()
