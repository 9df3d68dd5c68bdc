"""Structured logs (docs/logs.md): one event per line on stderr, logfmt or JSON.

Secrets registered with `redact()` (every project's API token, by `redact_tokens()`) are scrubbed
from every event, as a last line of defence: the code never logs a token on purpose. `Secrets` is
the one scrubber: the API client keeps one of its own for its error texts.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog

from exporter.config import Config

LEVELS = ("debug", "info", "warning", "error")
# Shorter "secrets" are not scrubbed: they would garble every text, and real API tokens are
# dozens of characters.
MIN_SECRET_LENGTH = 6
REDACTED = "<redacted>"
# The settings of the last configure(), for the polling process to log alike.
_settings = {"level": "info", "format": "logfmt"}


class Secrets:
    """Texts that must never be shown, and the scrubber that replaces them."""

    def __init__(self, *secrets: str) -> None:
        self._secrets: set[str] = set()
        for secret in secrets:
            self.add(secret)

    def __bool__(self) -> bool:
        return bool(self._secrets)

    def add(self, secret: str) -> None:
        if len(secret) >= MIN_SECRET_LENGTH:
            self._secrets.add(secret)

    def scrub(self, text: str) -> str:
        """`text` with every secret replaced by <redacted>."""
        for secret in self._secrets:
            text = text.replace(secret, REDACTED)
        return text


# The secrets of this process, scrubbed from every log event.
_secrets = Secrets()


def redact(secret: str) -> None:
    """Never let `secret` reach a log line (nor the texts passed through `scrub`)."""
    _secrets.add(secret)


def redact_tokens(config: Config) -> None:
    """Never let any project's API token reach a log line: called where a configuration enters a
    process (loaded by the command line, built by the demo, received by the polling process)."""
    for project in config.projects:
        redact(project.api_token)


def scrub(text: str) -> str:
    return _secrets.scrub(text)


def _scrub_event(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    if _secrets:
        for key, value in event.items():
            if isinstance(value, str):
                event[key] = scrub(value)
            elif not isinstance(value, int | float | bool | type(None)):
                event[key] = scrub(str(value))
    return event


def configure(level: str = "info", fmt: str = "logfmt", stream: TextIO | None = None) -> None:
    _settings.update(level=level, format=fmt)
    renderer: Any
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer(sort_keys=False)
    else:
        renderer = structlog.processors.LogfmtRenderer(
            key_order=["ts", "level", "event", "project"], drop_missing=True, bool_as_flag=False
        )
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True, key="ts"),
            _scrub_event,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=structlog.PrintLoggerFactory(stream or sys.stderr),
        cache_logger_on_first_use=False,
    )


def settings() -> tuple[str, str]:
    """The log level and format configured last."""
    return _settings["level"], _settings["format"]
