"""A message log record from SignalWire, validated into a compact immutable value.

A record that lacks a field the counting rules need, or carries it with the wrong type, raises
`InvalidRecord`: the caller skips it and counts it, and the rest of the page is still counted.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Container, Iterable
from datetime import UTC, datetime
from typing import Any, NamedTuple

NANO = 1_000_000_000


class InvalidRecord(ValueError):
    """A record that cannot be counted. `key` identifies it for de-duplication of reports."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(reason)
        self.key = key
        self.reason = reason


class Message(NamedTuple):
    """The fields of a message log that the counting rules use; `error_code` is "" when null.

    A named tuple rather than a frozen dataclass: it is built for every record listed, and a
    tuple is built several times faster."""

    id: str
    created_at: float
    direction: str
    kind: str
    status: str
    error_code: str
    error_message: str | None
    segments: int
    charge_nano: int
    remote: str = ""  # the other party's number: `to` when outbound, `from` when inbound
    own: str = ""  # the project's own number: the other one of the two


@functools.lru_cache(maxsize=8192)
def parse_timestamp(text: str) -> float:
    """ISO 8601 (`2024-05-06T12:20:00Z`, offsets, fractions) to epoch seconds; naive means UTC.

    Cached: many messages share a second, and every record is listed several times."""
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def format_timestamp(seconds: float) -> str:
    """Epoch seconds to the API's format, whole seconds, UTC."""
    return datetime.fromtimestamp(int(seconds), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _text(raw: dict[str, Any], name: str, key: str) -> str:
    value = raw.get(name)
    if not isinstance(value, str) or not value:
        raise InvalidRecord(key, f"field {name!r} must be a non-empty string, got {value!r:.60}")
    return value


def charge_to_nano(value: Any, key: str) -> int:
    """Dollars as a JSON number (or numeric string) to whole nano-dollars, so sums are exact."""
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise InvalidRecord(key, f"field 'charge' must be a number, got {value!r:.60}")
    try:
        nano = round(float(value) * NANO)
    except (ValueError, OverflowError):
        raise InvalidRecord(key, f"field 'charge' must be a number, got {value!r:.60}") from None
    if nano < 0 or nano > 10**18:
        raise InvalidRecord(key, f"field 'charge' is out of range: {value!r:.60}")
    return nano


# Builds a Message from a tuple of its fields without the keyword-handling constructor.
_new_message: Callable[[type[Message], tuple[Any, ...]], Message] = tuple.__new__


def parse_message(raw: Any) -> Message:
    """Validate one record of `data[]` (or a get-by-id answer).

    The common case (every field present with its usual type) takes the fast path; anything else
    goes through the full checks, which say exactly what is wrong.
    """
    return parse_records((raw,), _raise)[0]


def _raise(error: InvalidRecord) -> None:
    raise error


def parse_records(
    raws: Iterable[Any],
    invalid: Callable[[InvalidRecord], object],
    skip: Container[str] = (),
) -> list[Message]:
    """`parse_message` over a page: the valid records in order; each invalid one goes to `invalid`.

    Records whose id is in `skip` (already settled) are dropped unvalidated: nothing of them is
    counted again. The fast path is inlined, as a call per record is a large share of the cost.
    """
    messages: list[Message] = []
    append = messages.append
    times: dict[str, float] = {}  # a page shares few distinct seconds
    for raw in raws:
        if type(raw) is dict:
            try:
                message_id = raw["id"]
                created = raw["created_at"]
                direction = raw["direction"]
                kind = raw["kind"]
                status = raw["status"]
                segments = raw["number_of_segments"]
                charge = raw["charge"]
            except KeyError:  # a field is missing: skipped if settled, else the full checks
                message_id = raw.get("id")
                if type(message_id) is str and message_id in skip:
                    continue
            else:
                if type(message_id) is str and message_id in skip:
                    continue
                error_code = raw.get("error_code")
                error_message = raw.get("error_message")
                to, sender = raw.get("to"), raw.get("from")
                if (
                    type(message_id) is str
                    and message_id
                    and type(direction) is str
                    and direction
                    and type(kind) is str
                    and kind
                    and type(status) is str
                    and status
                    and type(segments) is int
                    and segments >= 0
                    and type(charge) is float
                    and 0 <= charge < 1e9
                    and (error_code is None or type(error_code) is str)
                    and (error_message is None or type(error_message) is str)
                    and type(created) is str
                ):
                    created_at = times.get(created)
                    if created_at is None:
                        try:
                            created_at = times[created] = parse_timestamp(created)
                        except (ValueError, OverflowError):
                            created_at = None
                    if created_at is not None:
                        if direction == "inbound":
                            to, sender = sender, to
                        append(
                            _new_message(
                                Message,
                                (
                                    message_id,
                                    created_at,
                                    direction,
                                    kind,
                                    status,
                                    error_code or "",
                                    error_message or None,
                                    segments,
                                    round(charge * NANO),
                                    to if type(to) is str else "",
                                    sender if type(sender) is str else "",
                                ),
                            )
                        )
                        continue
        try:
            append(_parse_checked(raw))
        except InvalidRecord as exc:
            invalid(exc)
    return messages


def _parse_checked(raw: Any) -> Message:
    if not isinstance(raw, dict):
        raise InvalidRecord(repr(raw)[:80], f"record must be an object, got {type(raw).__name__}")
    raw_id = raw.get("id")
    key = raw_id if isinstance(raw_id, str) and raw_id else repr(sorted(raw.items()))[:200]
    message_id = _text(raw, "id", key)
    created_text = _text(raw, "created_at", key)
    try:
        created_at = parse_timestamp(created_text)
    except (ValueError, OverflowError):
        raise InvalidRecord(
            key, f"field 'created_at' is not a timestamp: {created_text!r:.60}"
        ) from None
    for required in ("number_of_segments", "charge"):
        if required not in raw:
            raise InvalidRecord(key, f"field {required!r} is missing")
    segments = raw["number_of_segments"]
    if segments is None:
        segments = 0
    if isinstance(segments, bool) or not isinstance(segments, int) or segments < 0:
        raise InvalidRecord(
            key, f"field 'number_of_segments' must be a count, got {segments!r:.60}"
        )
    error_code = raw.get("error_code")
    if isinstance(error_code, int) and not isinstance(error_code, bool):
        error_code = str(error_code)
    if error_code is not None and not isinstance(error_code, str):
        raise InvalidRecord(key, f"field 'error_code' must be a string, got {error_code!r:.60}")
    error_message = raw.get("error_message")
    if error_message is not None and not isinstance(error_message, str):
        error_message = None
    direction = _text(raw, "direction", key)
    remote, own = _number(raw, "to"), _number(raw, "from")
    if direction == "inbound":
        remote, own = own, remote
    return Message(
        id=message_id,
        created_at=created_at,
        direction=direction,
        kind=_text(raw, "kind", key),
        status=_text(raw, "status", key),
        error_code=error_code or "",
        error_message=error_message or None,
        segments=segments,
        charge_nano=charge_to_nano(raw.get("charge"), key),
        remote=remote,
        own=own,
    )


def _number(raw: dict[str, Any], name: str) -> str:
    """`to` or `from`; a missing or odd value only costs the message its country and group."""
    value = raw.get(name)
    return value if isinstance(value, str) else ""
