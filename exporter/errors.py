"""SignalWire's messaging error codes and the cause each one stands for. Pure data.

The table gives `signalwire_message_error_info` its `category` label: alerts and dashboards can
then group failures by cause (carrier filtering, opt-outs, rate limits...) without knowing each
of the codes. The codes are the Compatibility API's (LaML), which reuses Twilio's numbering but
not always Twilio's meaning: SignalWire's own error-code page is the source wherever it lists a
code, Twilio's page only for codes SignalWire does not document.

Categories:

* `carrier_filtering`: the traffic was refused for its content, or because the sender is not
  (or no longer) registered or verified for the route (10DLC campaign, toll-free verification);
* `unreachable`: the destination exists but the message could not be delivered to it;
* `opted_out`: the recipient opted out or blocked the sender;
* `invalid_number`: the destination is missing, malformed, unknown, or not a mobile or SMS-capable
  number;
* `volume_limit`: a queue, rate or daily limit was exceeded;
* `account`: the sending account's balance, price cap, trial limits, numbers or settings;
* `unknown`: the cause is unknown, or fits none of the above (a malformed message, for one).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal, get_args

Category = Literal[
    "carrier_filtering",
    "unreachable",
    "opted_out",
    "invalid_number",
    "volume_limit",
    "account",
    "unknown",
]
CATEGORIES: tuple[Category, ...] = get_args(Category)
UNKNOWN: Category = "unknown"

SIGNALWIRE = "https://signalwire.com/docs/compatibility-api/rest/error-codes"


def _twilio(code: str) -> str:
    return f"https://www.twilio.com/docs/api/errors/{code}"


@dataclass(frozen=True, slots=True)
class ErrorCode:
    """One code: its category, what it means, and the published page that says so."""

    code: str
    category: Category
    description: str
    source: str


_ENTRIES = (
    ErrorCode(
        "21210",
        "account",
        "'From' is not a number purchased or verified in the project",
        SIGNALWIRE,
    ),
    ErrorCode("21211", "invalid_number", "'To' number missing or invalidly formatted", SIGNALWIRE),
    ErrorCode("21217", "invalid_number", "'To' number does not appear to be valid", SIGNALWIRE),
    ErrorCode(
        "21219",
        "account",
        "Account limits exceeded, or 'To' is not a verified caller ID on a trial",
        SIGNALWIRE,
    ),
    # SignalWire's meaning; Twilio's (a region not enabled in geo permissions) would be `account`
    # as well: both are settings on the sender's side.
    ErrorCode("21408", "account", "Callback URL is not set", SIGNALWIRE),
    # The page does not say whether 'To' or 'From' is the number that cannot take messages.
    ErrorCode("21601", "invalid_number", "Number is not SMS- or MMS-capable", SIGNALWIRE),
    # A malformed request: no category describes it.
    ErrorCode("21602", "unknown", "Message has neither a body nor a media URL", SIGNALWIRE),
    ErrorCode("21604", "invalid_number", "'To' number is missing", SIGNALWIRE),
    # SignalWire's meaning is about 'To'; Twilio's (an unusable 'From') would be `account`.
    ErrorCode("21606", "invalid_number", "'To' number is not a mobile number", SIGNALWIRE),
    # Not on SignalWire's page: Twilio's trial-account restriction.
    ErrorCode(
        "21608", "account", "'To' number is not yet verified for this account", _twilio("21608")
    ),
    ErrorCode(
        "21610",
        "opted_out",
        "Blocked by the recipient, or sent from a blacklisted number",
        SIGNALWIRE,
    ),
    ErrorCode(
        "21611", "volume_limit", "'From' number exceeded its maximum of queued messages", SIGNALWIRE
    ),
    # SignalWire's meaning (Twilio's: a To/From pair that cannot be routed). A malformed message:
    # no category describes it.
    ErrorCode("21612", "unknown", "Media is not supported", SIGNALWIRE),
    ErrorCode("21614", "invalid_number", "'To' number is not a valid mobile number", SIGNALWIRE),
    # A malformed message: no category describes it.
    ErrorCode("21617", "unknown", "Concatenated body exceeds the character limit", SIGNALWIRE),
    # Unregistered 10DLC traffic, refused before it leaves, like 30034 at the carriers.
    ErrorCode(
        "21717", "carrier_filtering", "'From' number is not in an active 10DLC campaign", SIGNALWIRE
    ),
    # SignalWire's meaning (Twilio's: queue overflow): the message expired in the send queue,
    # which is what sending faster than the number's throughput leads to.
    ErrorCode("30001", "volume_limit", "Validity period exceeded before sending", SIGNALWIRE),
    ErrorCode("30002", "account", "Account balance insufficient", SIGNALWIRE),
    ErrorCode("30003", "unreachable", "Destination handset not reachable", SIGNALWIRE),
    # The carrier blocks on the recipient's behalf: SignalWire's former troubleshooting guide called
    # it a recipient opt-out (STOP), and Twilio's 30004 includes opted-out recipients.
    ErrorCode("30004", "opted_out", "Blocked by the destination carrier", SIGNALWIRE),
    ErrorCode("30005", "invalid_number", "Destination handset unknown", SIGNALWIRE),
    # A landline or an unreachable carrier: the number exists but cannot take the message.
    ErrorCode("30006", "unreachable", "Could not be routed to the destination handset", SIGNALWIRE),
    ErrorCode(
        "30007",
        "carrier_filtering",
        "Flagged as a carrier violation, or filtered for content",
        SIGNALWIRE,
    ),
    ErrorCode("30008", "unknown", "Unknown upstream error", SIGNALWIRE),
    # SignalWire's meaning (Twilio's: a missing inbound segment): the carrier held the message
    # and could not deliver it to the handset in time.
    ErrorCode("30009", "unreachable", "Validity period expired at the carrier", SIGNALWIRE),
    ErrorCode("30010", "account", "Cost exceeded the max price set", SIGNALWIRE),
    # Several causes in one code (expired, rejected, not supported): none can be told apart.
    ErrorCode("30011", "unknown", "MMS expired, rejected, failed or not supported", SIGNALWIRE),
    ErrorCode("30012", "unknown", "MMS could not be sent", SIGNALWIRE),
    ErrorCode("30022", "volume_limit", "US A2P 10DLC rate limits exceeded", SIGNALWIRE),
    ErrorCode("30023", "volume_limit", "US A2P 10DLC daily message cap reached", _twilio("30023")),
    # The carrier does not accept the sender yet: a registration block, like 30034.
    ErrorCode(
        "30024",
        "carrier_filtering",
        "Numeric sender ID not provisioned with the carrier",
        _twilio("30024"),
    ),
    ErrorCode(
        "30027", "volume_limit", "US A2P 10DLC T-Mobile daily message limit reached", SIGNALWIRE
    ),
    ErrorCode(
        "30032", "carrier_filtering", "Toll-free number has not been verified", _twilio("30032")
    ),
    ErrorCode("30033", "carrier_filtering", "US A2P 10DLC campaign suspended", _twilio("30033")),
    ErrorCode(
        "30034",
        "carrier_filtering",
        "US A2P 10DLC message from an unregistered number",
        _twilio("30034"),
    ),
    # Not sendable on the A2P route until the number's registration completes, like 30034.
    ErrorCode(
        "30035",
        "carrier_filtering",
        "US A2P 10DLC number registration not yet complete",
        _twilio("30035"),
    ),
    # SignalWire's meaning (Twilio's 35125 is a limit on scheduled messages).
    ErrorCode(
        "35125",
        "volume_limit",
        "Platform Free Trial or sole-proprietor campaign daily cap met",
        SIGNALWIRE,
    ),
    # No cause is given.
    ErrorCode("63011", "unknown", "Message could not be delivered to the carrier", SIGNALWIRE),
)

ERROR_CODES: Mapping[str, ErrorCode] = MappingProxyType({e.code: e for e in _ENTRIES})


def category(error_code: str) -> str:
    """The category of `error_code`: "" for no error code, "unknown" for a code not listed."""
    if not error_code:
        return ""
    entry = ERROR_CODES.get(error_code)
    return entry.category if entry is not None else UNKNOWN
