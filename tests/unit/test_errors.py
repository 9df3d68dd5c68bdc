"""The table of messaging error codes and their categories."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from exporter.errors import CATEGORIES, ERROR_CODES, ErrorCode, category
from exporter.ledger import OTHER_ERROR_CODE

REQUIRED = (
    *("21211", "21601", "21610", "21612", "21614"),
    *(f"300{n:02}" for n in range(1, 13)),
    *("30022", "30027"),
)


def test_the_seven_categories() -> None:
    assert set(CATEGORIES) == {
        "carrier_filtering",
        "unreachable",
        "opted_out",
        "invalid_number",
        "volume_limit",
        "account",
        "unknown",
    }


@pytest.mark.parametrize("code", REQUIRED)
def test_the_common_codes_are_listed(code: str) -> None:
    assert code in ERROR_CODES


@pytest.mark.parametrize("entry", ERROR_CODES.values(), ids=lambda e: e.code)
def test_every_entry_is_complete(entry: ErrorCode) -> None:
    assert entry.category in CATEGORIES
    assert category(entry.code) == entry.category
    assert entry.code.isdigit()
    assert entry.description.strip() == entry.description != ""
    source = urlsplit(entry.source)
    assert source.scheme == "https"
    assert source.netloc != ""


def test_keys_are_the_entries_codes() -> None:
    assert all(code == entry.code for code, entry in ERROR_CODES.items())


def test_no_error_code_has_no_category() -> None:
    assert category("") == ""


@pytest.mark.parametrize("code", ["99999", OTHER_ERROR_CODE, "other", "not a code"])
def test_codes_not_listed_are_unknown(code: str) -> None:
    assert code not in ERROR_CODES
    assert category(code) == "unknown"


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        ("30007", "carrier_filtering"),
        ("30034", "carrier_filtering"),
        ("21610", "opted_out"),
        ("30003", "unreachable"),
        ("30006", "unreachable"),
        ("21211", "invalid_number"),
        ("30005", "invalid_number"),
        ("30022", "volume_limit"),
        ("30027", "volume_limit"),
        ("30002", "account"),
        ("30010", "account"),
        ("30008", "unknown"),
    ],
)
def test_specific_mappings(code: str, expected: str) -> None:
    assert category(code) == expected


def test_the_table_cannot_be_changed() -> None:
    with pytest.raises(TypeError):
        ERROR_CODES["30007"] = ERROR_CODES["30008"]  # type: ignore[index]
    with pytest.raises(dataclasses.FrozenInstanceError):
        ERROR_CODES["30007"].category = "unknown"  # type: ignore[misc]


def test_the_documented_table_is_the_modules() -> None:
    """docs/insights.md lists every code with its category, and no code the module lacks."""
    text = (Path(__file__).resolve().parents[2] / "docs" / "insights.md").read_text()
    rows = dict(re.findall(r"^\| (\d+) \| `([a-z_]+)` \|", text, re.MULTILINE))
    assert rows == {code: entry.category for code, entry in ERROR_CODES.items()}
