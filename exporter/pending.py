"""The pending messages and the recently settled ids, held compactly: pure data structures.

A busy account can hold hundreds of thousands of pending messages during a carrier's receipt
delay, and as many settled ids after the receipts arrive, so what is kept per message is only
what planning and settlement need, packed into one integer:

* the id, as an integer when it is a lowercase UUID (SignalWire's ids are; 44 bytes instead of
  77 for the string), else the string itself;
* created_at (its float's 64 bits), when last observed (whole seconds after created_at), the raw
  direction, kind and status (an index into a table of the label sets seen), and a 30-bit
  fingerprint of the other fields, so an unchanged record is told from a changed one without
  keeping it.

The whole latest record of a pending message is in the state file; `PendingSet.record` reads it
from there when a message must be settled from it (a 404 past settle.timeout).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Iterator, Mapping
from typing import NamedTuple

from exporter.records import Message

Key = int | str
RawLabels = tuple[str, str, str]  # direction, kind, status as SignalWire gives them
# Pending messages are indexed by minute of creation, so planning skips the many that the head
# listing sees anyway without looking at them one by one; settled ids are pruned a minute at once.
MINUTE = 60

# A table that has emptied to below a quarter of its peak is rebuilt at its size.
SHRINK_BELOW = 4

_DOUBLE = struct.Struct("<d")
_BITS = struct.Struct("<Q")
_CREATED_MASK = (1 << 64) - 1
# 120 bits in all while there are at most 16 label sets: four 30-bit digits, a 40-byte int.
_SEEN_SHIFT, _SEEN_BITS = 64, 22  # whole seconds after created_at, up to 48 days
_SEEN_MAX = (1 << _SEEN_BITS) - 1
_PRINT_SHIFT, _PRINT_BITS = 86, 30
_PRINT_MASK = (1 << _PRINT_BITS) - 1
_LABEL_SHIFT = 116


def key_of(message_id: str) -> Key:
    """The key a message id is kept under: a lowercase (or all-digit) UUID as its integer, so
    that distinct ids never share a key; any other id as itself."""
    if (
        len(message_id) == 36
        and message_id[8] == message_id[13] == message_id[18] == message_id[23] == "-"
    ):
        digits = message_id.replace("-", "")
        if (
            len(digits) == 32
            and digits.isascii()
            and digits.isalnum()
            and (digits.islower() or digits.isdigit())
        ):
            try:
                return int(digits, 16)
            except ValueError:
                pass
    return message_id


def as_key(ref: Key) -> Key:
    """A message id or a key, as a key."""
    return key_of(ref) if isinstance(ref, str) else ref


def id_of(key: Key) -> str:
    """The message id a key stands for (the inverse of `key_of`)."""
    if isinstance(key, str):
        return key
    h = f"{key:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def fingerprint(message: Message) -> int:
    """A digest of the fields that are neither the id, created_at nor the label set."""
    rest = (
        message.error_code,
        message.error_message,
        message.segments,
        message.charge_nano,
        message.remote,
        message.own,
    )
    return hash(rest) & _PRINT_MASK


class PendingEntry(NamedTuple):
    """What is kept of a pending message, unpacked on demand."""

    created_at: float
    observed_at: float  # to the second below
    direction: str
    kind: str
    status: str


class PendingSet:
    """Pending messages by id, with their count per raw label set and minute of creation.

    `records` reads a pending message's latest record back (from the state file); without it,
    the records are kept in memory (a ledger that has no state file, as in a backfill)."""

    def __init__(self, records: Callable[[str], Message | None] | None = None) -> None:
        self._packed: dict[Key, int] = {}
        self._most = 0  # the most held since the table was last rebuilt
        self._records = records
        self._kept: dict[Key, Message] | None = {} if records is None else None
        self._labels: list[RawLabels] = []
        self._label_index: dict[RawLabels, int] = {}
        # Keys by minute of creation; removal is lazy (a key may stay listed after it left the
        # minute), `_live` counts the ones still there, and a list is compacted when it is
        # mostly stale.
        self._minutes: dict[int, list[Key]] = {}
        self._live: dict[int, int] = {}
        # Per minute, a lower bound of its messages' observed_at.
        self._seen_bound: dict[int, float] = {}
        # Per raw label set, the count of pending messages and their count per minute.
        self.counts: dict[RawLabels, int] = {}
        self.minutes_by_labels: dict[RawLabels, dict[int, int]] = {}

    # ------------------------------------------------------------ reading
    def __len__(self) -> int:
        return len(self._packed)

    def __contains__(self, message_id: object) -> bool:
        return isinstance(message_id, str) and key_of(message_id) in self._packed

    def __iter__(self) -> Iterator[str]:
        return map(id_of, self._packed)

    def __eq__(self, other: object) -> bool:
        """The same messages in the same state (what is kept of them, and their records)."""
        if not isinstance(other, PendingSet):
            return NotImplemented
        return dict(self.items()) == dict(other.items()) and all(
            self.record(i) == other.record(i) for i in self
        )

    __hash__ = None  # type: ignore[assignment]

    @property
    def keys(self) -> dict[Key, int]:
        """The keys held (for membership tests on the hot path, after `key_of`)."""
        return self._packed

    def get(self, message_id: str) -> PendingEntry | None:
        packed = self._packed.get(key_of(message_id))
        return None if packed is None else self._unpack(packed)

    def same(self, message: Message, key: Key | None = None) -> bool:
        """Whether `message` is what is held for its id (created_at, labels and the rest); `key`
        is its key when the caller has it."""
        packed = self._packed.get(key_of(message.id) if key is None else key)
        if packed is None:
            return False
        label = self._label_index.get((message.direction, message.kind, message.status))
        return (
            label is not None
            and packed >> _LABEL_SHIFT == label
            and (packed >> _PRINT_SHIFT) & _PRINT_MASK == fingerprint(message)
            and packed & _CREATED_MASK == _BITS.unpack(_DOUBLE.pack(message.created_at))[0]
        )

    def record(self, message_id: str) -> Message | None:
        """The latest record of a pending message, whole."""
        key = key_of(message_id)
        if key not in self._packed:
            return None
        if self._kept is not None:
            return self._kept.get(key)
        assert self._records is not None
        return self._records(message_id)

    def items(self) -> Iterator[tuple[str, PendingEntry]]:
        for key, packed in self._packed.items():
            yield id_of(key), self._unpack(packed)

    def minutes(self) -> list[int]:
        """The minutes of creation that hold pending messages, oldest first."""
        return sorted(self._live)

    def in_minute(self, minute: int) -> Iterator[tuple[str, PendingEntry]]:
        """The pending messages created in `minute`."""
        packed_of = self._packed
        for key in dict.fromkeys(self._minutes.get(minute, ())):
            packed = packed_of.get(key)
            if packed is not None:
                entry = self._unpack(packed)
                if int(entry.created_at // MINUTE) == minute:
                    yield id_of(key), entry

    def scan(self, minute: int) -> Iterator[tuple[Key, float, float]]:
        """The key, created_at and observed_at of each pending message created in `minute`: what
        planning reads of every one, without unpacking the rest."""
        packed_of = self._packed
        for key in dict.fromkeys(self._minutes.get(minute, ())):
            packed = packed_of.get(key)
            if packed is not None:
                created = _DOUBLE.unpack(_BITS.pack(packed & _CREATED_MASK))[0]
                if int(created // MINUTE) == minute:
                    yield key, created, created + ((packed >> _SEEN_SHIFT) & _SEEN_MAX)

    def count_in(self, minute: int) -> int:
        """How many pending messages were created in `minute`."""
        return self._live.get(minute, 0)

    def seen_bound(self, minute: int) -> float:
        """A lower bound of when the messages of `minute` were last observed."""
        return self._seen_bound.get(minute, -math.inf)

    def set_seen_bound(self, minute: int, bound: float) -> None:
        if minute in self._live:
            self._seen_bound[minute] = bound

    def oldest(self) -> dict[RawLabels, float]:
        """created_at of the oldest pending message per raw label set (only its minute is read)."""
        oldest: dict[RawLabels, float] = {}
        for raw, minutes in self.minutes_by_labels.items():
            bucket = min(minutes)
            oldest[raw] = min(
                (e.created_at for _, e in self.in_minute(bucket) if e[2:] == raw),
                default=bucket * MINUTE,
            )
        return oldest

    # ------------------------------------------------------------ changing
    def put(self, message: Message, observed_at: float) -> None:
        """Hold `message` as the latest record of a pending message, observed at `observed_at`."""
        key = key_of(message.id)
        labels = (message.direction, message.kind, message.status)
        label = self._label_index.get(labels)
        if label is None:
            label = self._label_index[labels] = len(self._labels)
            self._labels.append(labels)
        created = message.created_at
        minute = int(created // MINUTE)
        packed = (
            _BITS.unpack(_DOUBLE.pack(created))[0]
            | self._seen_offset(created, observed_at) << _SEEN_SHIFT
            | fingerprint(message) << _PRINT_SHIFT
            | label << _LABEL_SHIFT
        )
        previous = self._packed.get(key)
        self._packed[key] = packed
        if previous is None:
            self._most = max(self._most, len(self._packed))
            self._join(key, minute)
        else:
            old = self._unpack(previous)
            old_minute = int(old.created_at // MINUTE)
            self._count(old[2:], old_minute, -1)
            if old_minute != minute:
                self._leave(old_minute)
                self._join(key, minute)
        if self._kept is not None:
            self._kept[key] = message
        self._lower_bound(minute, observed_at)
        self._count(labels, minute, 1)

    def seen(self, ref: Key, observed_at: float) -> None:
        """A pending message (its id or key) observed again, unchanged."""
        key = as_key(ref)
        packed = self._packed.get(key)
        if packed is None:
            return
        created = _DOUBLE.unpack(_BITS.pack(packed & _CREATED_MASK))[0]
        mask = _SEEN_MAX << _SEEN_SHIFT
        offset = self._seen_offset(created, observed_at)
        self._packed[key] = (packed & ~mask) | offset << _SEEN_SHIFT
        self._lower_bound(int(created // MINUTE), observed_at)

    def remove(self, ref: Key) -> bool:
        """Forget a pending message (by its id or key)."""
        key = as_key(ref)
        packed = self._packed.pop(key, None)
        if packed is None:
            return False
        entry = self._unpack(packed)
        minute = int(entry.created_at // MINUTE)
        self._count(entry[2:], minute, -1)
        self._leave(minute)
        if self._kept is not None:
            del self._kept[key]
        if len(self._packed) * SHRINK_BELOW < self._most:
            # A dict does not give back its table as it empties (after a burst of receipts).
            self._packed = dict(self._packed)
            self._most = len(self._packed)
        return True

    # ------------------------------------------------------------ inside
    @staticmethod
    def _seen_offset(created: float, observed_at: float) -> int:
        return min(_SEEN_MAX, max(0, math.floor(observed_at - created)))

    def _unpack(self, packed: int) -> PendingEntry:
        created = _DOUBLE.unpack(_BITS.pack(packed & _CREATED_MASK))[0]
        seen = created + ((packed >> _SEEN_SHIFT) & _SEEN_MAX)
        direction, kind, status = self._labels[packed >> _LABEL_SHIFT]
        return PendingEntry(created, seen, direction, kind, status)

    def _lower_bound(self, minute: int, observed_at: float) -> None:
        bound = self._seen_bound.get(minute)
        # The observed_at kept is to the second below: so is the bound.
        floor = math.floor(observed_at)
        if bound is None or floor < bound:
            self._seen_bound[minute] = floor

    def _join(self, key: Key, minute: int) -> None:
        self._live[minute] = self._live.get(minute, 0) + 1
        self._minutes.setdefault(minute, []).append(key)

    def _leave(self, minute: int) -> None:
        """One key has left `minute` (it is gone or held under another minute already)."""
        live = self._live[minute] - 1
        if not live:
            del self._live[minute], self._minutes[minute]
            self._seen_bound.pop(minute, None)
            return
        self._live[minute] = live
        members = self._minutes[minute]
        if len(members) > 2 * live + 16:
            self._minutes[minute] = [
                k
                for k in dict.fromkeys(members)
                if k in self._packed and self._minute_of(k) == minute
            ]

    def _minute_of(self, key: Key) -> int:
        return int(_DOUBLE.unpack(_BITS.pack(self._packed[key] & _CREATED_MASK))[0] // MINUTE)

    def _count(self, labels: RawLabels, minute: int, change: int) -> None:
        count = self.counts.get(labels, 0) + change
        minutes = self.minutes_by_labels.setdefault(labels, {})
        in_minute = minutes.get(minute, 0) + change
        if in_minute:
            minutes[minute] = in_minute
        else:
            del minutes[minute]
        if count:
            self.counts[labels] = count
        else:
            del self.counts[labels], self.minutes_by_labels[labels]


def settled_prune_point(before: float) -> float:
    """Where settled ids asked to be kept down to `before` are pruned: at the start of its minute
    (the state file prunes there too, so a restart keeps the same ids)."""
    return math.floor(before / MINUTE) * MINUTE


class SettledIds:
    """The ids of recently settled messages, kept until no listing can show them as new: a
    re-listed settled record is never counted again. Pruned a minute of creation at a time, so
    an id may be kept up to a minute longer than asked."""

    def __init__(self) -> None:
        self._minute_of: dict[Key, int] = {}
        self._minutes: dict[int, list[Key]] = {}
        self._minute_objects: dict[int, int] = {}  # one int object per minute, shared

    def __len__(self) -> int:
        return len(self._minute_of)

    def __contains__(self, message_id: object) -> bool:
        return isinstance(message_id, str) and key_of(message_id) in self._minute_of

    def __iter__(self) -> Iterator[str]:
        return map(id_of, self._minute_of)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SettledIds):
            return NotImplemented
        return self._minute_of == other._minute_of

    __hash__ = None  # type: ignore[assignment]

    @property
    def keys(self) -> dict[Key, int]:
        """The keys held (for membership tests on the hot path, after `key_of`)."""
        return self._minute_of

    def add(self, ref: Key, created_at: float) -> None:
        key = as_key(ref)
        minute = int(created_at // MINUTE)
        shared = self._minute_objects.setdefault(minute, minute)
        if self._minute_of.get(key) == minute:
            return
        self._minute_of[key] = shared
        self._minutes.setdefault(minute, []).append(key)

    def update(self, settled: Mapping[Key, float], since: float = -math.inf) -> None:
        """Add the ids of `settled`, but for those that `prune(since)` would forget."""
        point = settled_prune_point(since) if since > -math.inf else since
        for ref, created_at in settled.items():
            if created_at >= point:
                self.add(ref, created_at)

    def prune(self, before: float) -> None:
        """Forget the ids created before `settled_prune_point(before)`."""
        last = int(settled_prune_point(before) // MINUTE) - 1  # the last minute to forget
        held = len(self._minute_of)
        for minute in [m for m in self._minutes if m <= last]:
            for key in self._minutes.pop(minute):
                if self._minute_of.get(key) == minute:
                    del self._minute_of[key]
            del self._minute_objects[minute]
        if len(self._minute_of) * SHRINK_BELOW < held:
            self._minute_of = dict(self._minute_of)  # give back the emptied table

    def items(self) -> Iterator[tuple[str, float]]:
        """Each id with the end of its minute of creation (an upper bound of its created_at)."""
        for key, minute in self._minute_of.items():
            yield id_of(key), float((minute + 1) * MINUTE)
