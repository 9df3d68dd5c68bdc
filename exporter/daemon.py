"""The daemon: the state store, one poller thread per project, and the HTTP server."""

from __future__ import annotations

import gc
import sys
import threading
import time
from collections.abc import Callable

import structlog

from exporter import __version__
from exporter.config import Config, ListenAddress
from exporter.logs import redact
from exporter.metrics import build_registry
from exporter.poller import Counters, ProjectPoller, ProjectStatus
from exporter.server import ExporterServer
from exporter.store import Store
from exporter.webconfig import WebConfig


class FatalError(Exception):
    """The daemon cannot run; the message says why (exit status 1)."""


class Exporter:
    def __init__(
        self,
        config: Config,
        listen: ListenAddress | None = None,
        clock: Callable[[], float] = time.time,
        web: WebConfig | None = None,
    ) -> None:
        self.config = config
        self.web = web
        self.listen = listen or config.listen_address
        self.clock = clock
        self.stop = threading.Event()
        self.counters = Counters()
        self.pollers: list[ProjectPoller] = []
        self.loaded = False
        self.server: ExporterServer | None = None
        self.log = structlog.get_logger()
        for project in config.projects:
            redact(project.api_token)

    def statuses(self) -> list[ProjectStatus]:
        return [p.status for p in self.pollers]

    def ready(self) -> bool:
        return self.loaded and all(p.status.polled for p in self.pollers)

    def start(self) -> None:
        """Listen, load the state, and start polling. Raises FatalError or StateError."""
        registry = build_registry(self.statuses, self.counters)
        try:
            self.server = ExporterServer(self.listen, registry, self.statuses, self.ready, self.web)
        except OSError as exc:
            raise FatalError(f"cannot listen on {self.listen}: {exc.strerror or exc}") from None
        self.server.start()
        self.log.info(
            "starting",
            version=__version__,
            listen_address=self.server.url,
            projects=",".join(p.name for p in self.config.projects),
            state_path=self.config.state_path,
        )
        for warning in self.config.warnings:
            self.log.warning("configuration readable by others", detail=warning)
        self.store = Store(self.config.state_path)
        for project in self.config.projects:
            poller = ProjectPoller(
                project, self.config, self.store, self.counters, self.stop, self.clock
            )
            poller.load()
            self.pollers.append(poller)
        self.loaded = True
        # A scrape waits for the interpreter lock while a poll decodes pages: hand it over more
        # often than every 5 ms so scrapes stay quick during polls.
        sys.setswitchinterval(0.001)
        gc.collect()
        gc.freeze()  # the loaded state lives for good: keep it out of every garbage collection
        self.threads = [
            threading.Thread(target=p.run, name=f"poll-{p.project.name}", daemon=True)
            for p in self.pollers
        ]
        for thread in self.threads:
            thread.start()

    def shutdown(self) -> None:
        """Stop polling (a poll in flight is abandoned uncommitted), then close the state."""
        self.stop.set()
        for thread in getattr(self, "threads", []):
            thread.join()
        if self.server is not None:
            self.server.stop()
        if hasattr(self, "store"):
            self.store.close()
        self.log.info("stopped")
