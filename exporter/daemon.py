"""The daemon: the HTTP server here, the polling in a child process (see exporter.polling)."""

from __future__ import annotations

import structlog

from exporter import __version__
from exporter.config import Config, ListenAddress
from exporter.logs import settings
from exporter.metrics import PollerProcessCollector, build_registry
from exporter.polling import PollingProcess, WorkerError
from exporter.server import ExporterServer
from exporter.views import CounterState, ProjectView
from exporter.webconfig import WebConfig

# The polling process's own process_* metrics carry this prefix.
WORKER_NAMESPACE = "signalwire_exporter_poller"


class FatalError(Exception):
    """The daemon cannot run; the message says why (exit status 1)."""


class Exporter:
    def __init__(
        self,
        config: Config,
        listen: ListenAddress | None = None,
        web: WebConfig | None = None,
        demo: bool = False,
    ) -> None:
        self.config = config
        self.web = web
        self.demo = demo  # simulated data: the landing page says so
        self.listen = listen or config.listen_address
        # Each project's view and the counters as the polling process last sent them; no view
        # before it has loaded.
        self.views: list[ProjectView | None] = [None] * len(config.projects)
        self.counts = CounterState.zero()
        self.loaded = False
        self.server: ExporterServer | None = None
        self.worker: PollingProcess | None = None
        self.log = structlog.get_logger()

    def published(self) -> list[ProjectView]:
        return [view for view in self.views if view is not None]

    def ready(self) -> bool:
        worker = self.worker
        return (
            self.loaded
            and worker is not None
            and not worker.gone.is_set()
            and all(view is not None and view.polled for view in self.views)
        )

    def _on_view(self, index: int, view: ProjectView) -> None:
        self.views[index] = view

    def _on_counts(self, counts: CounterState) -> None:
        self.counts = counts

    def _counts(self) -> CounterState:
        return self.counts

    def _worker_pid(self) -> int | None:
        return self.worker.pid if self.worker is not None else None

    def start(self) -> None:
        """Listen, then start polling once the state has loaded. Raises FatalError."""
        registry = build_registry(self.published, self._counts)
        registry.register(PollerProcessCollector(WORKER_NAMESPACE, self._worker_pid))
        try:
            self.server = ExporterServer(
                self.listen, registry, self.published, self.ready, self.web, demo=self.demo
            )
        except OSError as exc:
            raise FatalError(f"cannot listen on {self.listen}: {exc.strerror or exc}") from None
        self.server.start()
        self.log.info(
            "starting",
            version=__version__,
            listen_address=self.server.bound,
            url=self.server.url,
            projects=",".join(p.name for p in self.config.projects),
            state_path=self.config.state_path,
        )
        for warning in self.config.warnings:
            self.log.warning("configuration readable by others", detail=warning)
        level, fmt = settings()
        self.worker = PollingProcess(self.config, self._on_view, self._on_counts, level, fmt)
        try:
            self.worker.start()
        except WorkerError as exc:
            raise FatalError(str(exc)) from None
        self.loaded = True

    def check(self) -> None:
        """Raise FatalError when polling has stopped for good (the daemon should then exit)."""
        failure = self.worker.failure() if self.worker is not None else None
        if failure is not None:
            raise FatalError(failure)

    def shutdown(self) -> None:
        """Stop polling (a poll in flight is abandoned uncommitted), then stop serving."""
        if self.worker is not None:
            self.worker.stop()
        if self.server is not None:
            self.server.stop()
        self.log.info("stopped")
