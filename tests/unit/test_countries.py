"""The `country` label: the phone-number library's verdict, from a cache by deciding prefix."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from phonenumbers.phonenumberutil import COUNTRY_CODE_TO_REGION_CODE

from exporter import countries
from exporter.countries import UNKNOWN, country_of
from exporter.simulator import remote_number
from tests.helpers import true_country


@pytest.mark.parametrize(
    ("number", "country"),
    [
        ("+12125550123", "US"),
        ("+14165550123", "CA"),  # NANP: the area code decides, not +1
        ("+16045550123", "CA"),
        ("+17875550123", "PR"),
        ("+18765550123", "JM"),
        ("+447700012345", "GB"),
        ("+441481712345", "GG"),  # +44 shared with the Crown Dependencies
        ("+447797712345", "JE"),
        ("+4915112345678", "DE"),
        ("+33612345678", "FR"),
        ("+77011234567", "KZ"),  # +7 shared by RU and KZ
        ("+79161234567", "RU"),
        ("+819012345678", "JP"),
    ],
)
def test_regions_of_real_numbers(number: str, country: str) -> None:
    assert country_of(number) == country


@pytest.mark.parametrize(
    "number",
    [
        "",
        "72345",  # a short code
        "SIGNALWIRE",  # an alphanumeric sender
        "+",
        "+1",
        "+0123456789",  # no country code starts with 0
        "+15550100",  # too short for NANP: no region
        "+999123456",  # an unassigned country code
        "+80012345678",  # non-geographic (+800): not a country
        "+1212555abcd",
        "+12125550123 ",
        "12125550123",  # E.164 needs its +
        "+1234567890123456",  # longer than E.164 allows
        "+2980",  # a national number of one digit
    ],
)
def test_anything_not_an_e164_number_of_a_country_is_unknown(number: str) -> None:
    assert country_of(number) == UNKNOWN


def test_a_cached_prefix_does_not_vouch_for_garbage_after_it() -> None:
    assert country_of("+12125550123") == "US"
    assert country_of("+1212555012x") == UNKNOWN
    assert country_of("+4477000123ab") == UNKNOWN


def test_the_simulated_traffic_resolves_as_the_library_says() -> None:
    rng = random.Random(11)
    numbers = [remote_number(rng) for _ in range(20_000)]
    wrong = [
        (n, country_of(n), true_country(n)) for n in numbers if country_of(n) != true_country(n)
    ]
    assert wrong == []
    assert {country_of(n) for n in numbers} >= {"US", "CA", "PR", "JM", "GB", "DE", UNKNOWN}


_CODES = sorted(COUNTRY_CODE_TO_REGION_CODE)


@settings(max_examples=3000, deadline=None)
@given(
    code=st.sampled_from(_CODES),
    digits=st.text(alphabet="0123456789", min_size=0, max_size=14),
)
def test_any_number_resolves_as_the_library_says(code: int, digits: str) -> None:
    """Whatever the order numbers arrive in, the cache answers as the library would for each."""
    number = f"+{code}{digits}"
    assert country_of(number) == true_country(number)


def test_the_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(countries, "MAX_PREFIXES", 50)
    countries._by_prefix.clear()
    rng = random.Random(2)
    for _ in range(500):
        number = f"+1212{rng.randrange(10**7):07d}"
        assert country_of(number) == true_country(number)
        assert len(countries._by_prefix) <= 50
