"""The country of a phone number: the `country` label of the per-country counters.

`phonenumbers` decides, from the library's own metadata. NANP numbers (+1) share one country code
across 25 regions, and which region a number belongs to depends on its area code and exchange: the
library tells +1 416 (CA) from +1 876 (JM) and +1 212 (US).

Asking the library costs tens of microseconds a number, which on a busy day would be a large share
of the ingest. So its answer is kept for each prefix that decides it:
- a country code of one region (+33, +49, ...) is that region whatever follows;
- a code shared by several regions (+1, +7, +44, +61, ...) is decided by the national number's
  first six digits (the NANP area code and exchange; the UK's Crown Dependency ranges are at most
  five) and its length, so those and the length form the key.
"""

from __future__ import annotations

import phonenumbers
from phonenumbers.phonenumberutil import COUNTRY_CODE_TO_REGION_CODE

UNKNOWN = "unknown"
# Digits of the national number that decide the region within a shared country code.
DECIDING_DIGITS = 6
# The prefix cache is cleared past this many entries: it never grows without bound, whatever
# numbers arrive (a day of NANP traffic uses a few thousand).
MAX_PREFIXES = 100_000

_by_prefix: dict[tuple[str, int], str] = {}


def country_of(number: str) -> str:
    """ISO 3166-1 alpha-2 region of an E.164 number; "unknown" for anything else (short codes,
    alphanumeric senders, unassigned or non-geographic country codes, garbage)."""
    # E.164: "+", a first digit that is not 0, at most 15 digits in all (and at least two).
    if not (
        number[:1] == "+"
        and number[1:2] != "0"
        and 3 <= len(number) <= 16
        and number.isascii()
        and number[1:].isdigit()
    ):
        return UNKNOWN
    for size in (2, 3, 4):  # country codes are one to three digits, and prefix-free
        region = _CODES.get(number[1:size])
        if region is None:
            continue
        if region:  # the code's only region; a national number is at least two digits
            return region if len(number) >= size + 2 else UNKNOWN
        key = (number[: size + DECIDING_DIGITS], len(number))
        found = _by_prefix.get(key)
        if found is None:
            if len(_by_prefix) >= MAX_PREFIXES:
                _by_prefix.clear()
            found = _by_prefix[key] = _resolve(number)
        return found
    return UNKNOWN  # an unassigned country code


def _resolve(number: str) -> str:
    try:
        parsed = phonenumbers.parse(number, None)
    except phonenumbers.NumberParseException:
        return UNKNOWN
    return _region(phonenumbers.region_code_for_number(parsed))


def _region(region: str | None) -> str:
    # "001" marks non-geographic codes (+800, +882...), "ZZ" an unknown region: not countries.
    if region is None or len(region) != 2 or not region.isalpha() or region == "ZZ":
        return UNKNOWN
    return region


# Country code (as written) -> its only region, or "" when several regions share it.
_CODES: dict[str, str] = {
    str(code): (_region(regions[0]) if len(regions) == 1 else "")
    for code, regions in COUNTRY_CODE_TO_REGION_CODE.items()
}
