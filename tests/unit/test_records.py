"""Message records: validation, and the fast path agreeing with the full checks."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

import exporter.records
from exporter.records import (
    InvalidRecord,
    Message,
    _parse_checked,
    format_timestamp,
    parse_message,
    parse_records,
)

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


def parse_each(records: list[Any]) -> list[Message | tuple[str, str]]:
    """The full checks, record by record: a Message, or the (key, reason) of the rejection."""
    out: list[Message | tuple[str, str]] = []
    for record in records:
        try:
            out.append(_parse_checked(record))
        except InvalidRecord as exc:
            out.append((exc.key, exc.reason))
    return out


def parse_page(records: list[Any], skip: set[str] | None = None) -> list[Message | tuple[str, str]]:
    """parse_records, with the rejections reported in line with the valid records."""
    out: list[Message | tuple[str, str]] = []

    def invalid(exc: InvalidRecord) -> None:
        out.append((exc.key, exc.reason))

    for message in parse_records(records, invalid, skip or set()):
        out.append(message)
    return out


@given(st.lists(st.dictionaries(st.sampled_from(sorted(GOOD)), values), max_size=6))
def test_the_page_parser_agrees_with_the_full_checks(changes: list[dict[str, Any]]) -> None:
    records: list[Any] = [{**GOOD, **change} for change in changes]
    expected = parse_each(records)
    # The page parser reports each rejection as it comes; order the valid ones the same way.
    got = parse_page(records)
    assert sorted(map(repr, got)) == sorted(map(repr, expected))
    assert [m for m in got if isinstance(m, Message)] == [
        m for m in expected if isinstance(m, Message)
    ]


def test_the_page_parser_rejects_what_the_full_checks_reject() -> None:
    bad: list[Any] = [
        ["not", "an", "object"],
        None,
        {**GOOD, "id": ""},
        {**GOOD, "id": ["a", "list"]},  # unhashable: must not break the settled-id check
        {**GOOD, "created_at": "yesterday"},
        {**GOOD, "created_at": ""},
        {**GOOD, "status": None},
        {**GOOD, "direction": ""},
        {**GOOD, "kind": 3},
        {**GOOD, "number_of_segments": "two"},
        {**GOOD, "number_of_segments": -1},
        {**GOOD, "number_of_segments": True},
        {**GOOD, "charge": "free"},
        {**GOOD, "charge": -1.0},
        {**GOOD, "charge": float("nan")},
        {**GOOD, "charge": 1e12},
        {**GOOD, "charge": True},
        {**GOOD, "error_code": ["30007"]},
        {**GOOD, "error_code": False},
        {k: v for k, v in GOOD.items() if k != "charge"},
        {k: v for k, v in GOOD.items() if k != "number_of_segments"},
        {k: v for k, v in GOOD.items() if k != "id"},
    ]
    got = parse_page([*bad, GOOD], skip={"zz"})
    assert got[-1] == parse_message(GOOD)
    assert got[:-1] == parse_each(bad)
    assert all(isinstance(item, tuple) and len(item) == 2 for item in got[:-1])


def test_the_page_parser_skips_settled_ids_unvalidated() -> None:
    broken_but_settled = {**GOOD, "id": "done", "charge": "free"}
    other = {**GOOD, "id": "new"}
    assert parse_page([broken_but_settled, other, GOOD], skip={"done", "a1b2"}) == [
        parse_message(other)
    ]


def test_tolerated_forms_take_the_full_checks_on_a_page_too() -> None:
    records = [
        {**GOOD, "charge": None, "number_of_segments": None, "error_code": 30007},
        {**GOOD, "charge": 1},
        {**GOOD, "error_message": 5},
        {k: v for k, v in GOOD.items() if k not in ("error_code", "error_message")},
    ]
    assert parse_page(records) == [parse_message(r) for r in records]
    assert parse_page(records) == parse_each(records)


def test_a_message_is_the_same_value_however_it_is_built() -> None:
    fast = parse_message(GOOD)
    assert type(fast) is Message
    assert fast == _parse_checked(GOOD) == parse_page([GOOD])[0]
    assert fast == Message(
        id="a1b2",
        created_at=T,
        direction="outbound-api",
        kind="sms",
        status="delivered",
        error_code="",
        error_message=None,
        segments=2,
        charge_nano=8_300_000,
    )


def test_a_settled_id_is_skipped_even_when_its_record_lacks_a_field() -> None:
    lacking = {k: v for k, v in GOOD.items() if k != "charge"}
    assert parse_page([lacking], skip={"a1b2"}) == []
    assert parse_page([lacking]) == parse_each([lacking])


@pytest.mark.parametrize(
    ("direction", "remote", "own"),
    [
        ("outbound-api", "+14165550100", "+15551230000"),  # to the remote party, from our number
        ("outbound-reply", "+14165550100", "+15551230000"),
        ("inbound", "+15551230000", "+14165550100"),  # from the remote party, to our number
    ],
)
def test_remote_and_own_numbers_follow_the_direction(direction: str, remote: str, own: str) -> None:
    record = {**GOOD, "direction": direction, "to": "+14165550100", "from": "+15551230000"}
    for message in (parse_message(record), _parse_checked(record)):
        assert (message.remote, message.own) == (remote, own)


@pytest.mark.parametrize("odd", [None, 15551230000, ["+1555"], {}])
def test_a_missing_or_odd_number_costs_only_the_country_and_group(odd: Any) -> None:
    record = {**GOOD, "to": odd, "from": "+15551230000"}
    for message in (parse_message(record), parse_page([{**record, "charge": 1}])[0]):
        assert isinstance(message, Message)
        assert (message.remote, message.own) == ("", "+15551230000")
    without = {k: v for k, v in GOOD.items() if k not in ("to", "from")}
    assert (parse_message(without).remote, parse_message(without).own) == ("", "")


@pytest.mark.parametrize("charge", [0, "0", 0.0, "0.0"])
def test_a_charge_of_zero_is_counted(charge: Any) -> None:
    """A free message (charge 0 as a JSON integer, a float or a numeric string) is valid."""
    record = {**GOOD, "charge": charge}
    for message in (parse_message(record), _parse_checked(record), parse_page([record])[0]):
        assert isinstance(message, Message)
        assert message.charge_nano == 0


@pytest.mark.parametrize(
    ("charge", "nano"),
    [(1_000_000_000, 10**18), (1e9, 10**18), ("1000000000", 10**18), ("0.000000001", 1)],
)
def test_charges_up_to_a_billion_dollars_are_counted_exactly(charge: Any, nano: int) -> None:
    record = {**GOOD, "charge": charge}
    assert parse_message(record).charge_nano == nano
    assert parse_page([record]) == [_parse_checked(record)]


@pytest.mark.parametrize("charge", [1_000_000_001, 1000000000.5, "1000000001", -0.000000001])
def test_charges_past_a_billion_dollars_or_below_zero_are_out_of_range(charge: Any) -> None:
    record = {**GOOD, "charge": charge}
    with pytest.raises(InvalidRecord) as info:
        parse_message(record)
    assert info.value.key == "a1b2"
    assert parse_page([record]) == [("a1b2", info.value.reason)]


@pytest.mark.parametrize(
    "change",
    [
        {},
        {"number_of_segments": 0},
        {"charge": 0.0},
        {"error_code": "30007", "error_message": "Unknown destination handset"},
        {"direction": "inbound", "to": "+15551230000", "from": "+14165550100"},
        {"created_at": "2026-11-22T05:57:00.123456+00:00"},
    ],
)
def test_the_common_records_take_the_fast_path(
    change: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every field present with its usual type: no record of a page goes to the full checks
    (a call per record is a large share of the parsing cost)."""
    record = {**GOOD, **change}
    expected = _parse_checked(record)

    def not_expected(raw: Any) -> Message:
        raise AssertionError(f"the full checks were called for {raw!r}")

    monkeypatch.setattr(exporter.records, "_parse_checked", not_expected)
    assert parse_records([record, record, {**record, "id": "other"}], _raise_it) == [
        expected,
        expected,
        expected._replace(id="other"),
    ]


def _raise_it(exc: InvalidRecord) -> None:
    raise exc


def test_a_settled_record_lacking_a_field_does_not_end_the_page() -> None:
    lacking = {k: v for k, v in GOOD.items() if k != "charge"}
    other = {**GOOD, "id": "next"}
    assert parse_page([lacking, other], skip={"a1b2"}) == [parse_message(other)]


@pytest.mark.parametrize(
    "change",
    [
        {"created_at": None},
        {"created_at": "yesterday"},
        {"direction": None},
        {"kind": ""},
        {"status": 7},
        {"number_of_segments": -1},
        {"number_of_segments": None, "charge": "free"},
        {"charge": [1]},
        {"charge": "free"},
        {"charge": -1},
        {"error_code": 1.5},
        {"number_of_segments": "__missing__"},
        {"charge": "__missing__"},
        {"created_at": "__missing__"},
    ],
)
def test_a_rejected_record_is_reported_under_its_id(change: dict[str, Any]) -> None:
    """The key of a rejection is the record's id, so that its reports can be told apart."""
    record = {k: v for k, v in {**GOOD, **change}.items() if v != "__missing__"}
    with pytest.raises(InvalidRecord) as info:
        parse_message(record)
    assert info.value.key == "a1b2"
    assert isinstance(info.value.reason, str) and info.value.reason
    assert str(info.value) == info.value.reason
    assert parse_page([record]) == [("a1b2", info.value.reason)]


@pytest.mark.parametrize("bad_id", ["", None, ["a", "list"], 12])
def test_a_rejected_record_without_a_usable_id_is_reported_under_its_content(
    bad_id: Any,
) -> None:
    record = {**GOOD, "id": bad_id}
    with pytest.raises(InvalidRecord) as info:
        parse_message(record)
    assert info.value.key == repr(sorted(record.items()))[:200]
    assert "'id'" in info.value.reason
    long = {**record, "error_message": "x" * 300}
    with pytest.raises(InvalidRecord) as info:
        parse_message(long)
    assert info.value.key == repr(sorted(long.items()))[:200]
    assert len(info.value.key) == 200


def test_a_record_that_is_not_an_object_is_reported_under_its_text() -> None:
    record = ["x" * 100]
    with pytest.raises(InvalidRecord) as info:
        parse_message(record)
    assert info.value.key == repr(record)[:80]
    assert len(info.value.key) == 80
    assert info.value.reason == "record must be an object, got list"


def test_an_error_message_that_is_not_text_is_dropped() -> None:
    for error_message in (5, ["x"], ""):
        record = {**GOOD, "error_code": "30007", "error_message": error_message}
        assert parse_message(record).error_message is None
        assert _parse_checked(record).error_message is None


def test_format_timestamp_gives_whole_seconds_in_utc() -> None:
    assert format_timestamp(T + 0.9) == "2026-11-22T05:57:00Z"
    assert format_timestamp(0) == "1970-01-01T00:00:00Z"
    assert parse_message({**GOOD, "created_at": format_timestamp(T)}).created_at == T


def test_format_timestamp_is_utc_whatever_the_local_time_zone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        assert format_timestamp(T) == "2026-11-22T05:57:00Z"
    finally:
        monkeypatch.undo()
        time.tzset()
