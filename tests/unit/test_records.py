"""Message records: validation, and the fast path agreeing with the full checks."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from exporter.records import InvalidRecord, Message, _parse_checked, parse_message

T = datetime(2026, 11, 22, 5, 57, tzinfo=UTC).timestamp()
GOOD: dict[str, Any] = {
    "id": "a1b2",
    "created_at": "2026-11-22T05:57:00Z",
    "direction": "outbound-api",
    "kind": "sms",
    "status": "delivered",
    "number_of_segments": 2,
    "charge": 0.0083,
    "error_code": None,
    "error_message": None,
}


def test_a_good_record() -> None:
    assert parse_message(GOOD) == Message(
        "a1b2", T, "outbound-api", "sms", "delivered", "", None, 2, 8_300_000
    )


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"id": ""}, "id"),
        ({"created_at": "yesterday"}, "created_at"),
        ({"status": None}, "status"),
        ({"kind": 3}, "kind"),
        ({"number_of_segments": "two"}, "number_of_segments"),
        ({"number_of_segments": -1}, "number_of_segments"),
        ({"charge": "free"}, "charge"),
        ({"charge": -1.0}, "charge"),
        ({"error_code": ["30007"]}, "error_code"),
    ],
)
def test_bad_fields_are_named(change: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidRecord) as info:
        parse_message({**GOOD, **change})
    assert field in info.value.reason


def test_missing_fields_and_non_objects() -> None:
    for name in ("number_of_segments", "charge", "created_at"):
        record = dict(GOOD)
        del record[name]
        with pytest.raises(InvalidRecord):
            parse_message(record)
    with pytest.raises(InvalidRecord):
        parse_message(["not", "an", "object"])


def test_tolerated_forms() -> None:
    message = parse_message(
        {**GOOD, "charge": None, "number_of_segments": None, "error_code": 30007}
    )
    assert (message.charge_nano, message.segments, message.error_code) == (0, 0, "30007")
    assert parse_message({**GOOD, "charge": 1}).charge_nano == 1_000_000_000
    assert parse_message({**GOOD, "created_at": "2026-11-22T06:57:00+01:00"}).created_at == (T)


values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 5),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=5),
    st.sampled_from(["2026-11-22T05:57:00Z", "2026-11-22", "x", "0.01", "sms"]),
)


@given(st.dictionaries(st.sampled_from(sorted(GOOD)), values))
def test_the_fast_path_agrees_with_the_full_checks(change: dict[str, Any]) -> None:
    record = {**GOOD, **change}
    try:
        checked: Message | None = _parse_checked(record)
    except InvalidRecord:
        checked = None
    try:
        fast: Message | None = parse_message(record)
    except InvalidRecord:
        fast = None
    assert fast == checked
