"""Structured logs (contract §6): one event per line on stderr, logfmt or JSON.

Secrets registered with `redact()` are scrubbed from every event, as a last line of defence: the
code never logs a token on purpose.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog

LEVELS = ("debug", "info", "warning", "error")
_secrets: set[str] = set()
# The settings of the last configure(), for the polling process to log alike.
_settings = {"level": "info", "format": "logfmt"}


def redact(secret: str) -> None:
    """Never let `secret` reach a log line."""
    if len(secret) >= 4:
        _secrets.add(secret)


def scrub(text: str) -> str:
    for secret in _secrets:
        text = text.replace(secret, "<redacted>")
    return text


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
