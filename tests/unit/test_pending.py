"""The compact pending set and settled ids: what is kept reads back exactly, whatever the order."""

from __future__ import annotations

import math
import random
import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from exporter.pending import (
    MINUTE,
    PendingEntry,
    PendingSet,
    SettledIds,
    as_key,
    id_of,
    key_of,
    settled_prune_point,
)
from exporter.records import Message

T0 = 1_800_000_000.0  # the start of a minute
UUID = "0d5e1e5c-3f7a-4b2e-9c1d-2a3b4c5d6e7f"


def msg(
    message_id: str,
    status: str = "sent",
    created: float = T0 + 5,
    *,
    kind: str = "sms",
    charge: int = 4_150_000,
    code: str = "",
) -> Message:
    return Message(
        message_id, created, "outbound-api", kind, status, code, None, 1, charge, "+1415", "+1555"
    )


# --------------------------------------------------------------------------- keys


def test_a_lowercase_uuid_is_kept_as_its_integer_and_read_back() -> None:
    key = key_of(UUID)
    assert key == int(UUID.replace("-", ""), 16)
    assert id_of(key) == UUID
    assert id_of(key_of("00000000-0000-4000-8000-000000000001")) == (
        "00000000-0000-4000-8000-000000000001"
    )


@pytest.mark.parametrize(
    "message_id",
    [
        UUID.upper(),  # another id than the lowercase one: kept apart
        "0D5e1e5c-3f7a-4b2e-9c1d-2a3b4c5d6e7f",
        "0d5e1e5c_3f7a-4b2e-9c1d-2a3b4c5d6e7f",
        "0d5e1e5c-3f7a-4b2e-9c1d-2a3b4c5d6e7",  # too short
        "0d5e1e5c-3f7a-4b2e-9c1d-2a3b4c5d6e7f0",  # too long
        "0d5e1e5c3f7a-4b2e-9c1d-2a3b4c5d6e7f0",  # a dash moved
        "0d5e1e5c-3f7a-4b2e-9c1d-2a3b4c5d6e7g",  # not hex
        "0d5e1e5c-3f7a-4b2e-9c1d-2a3b4c5d6e_f",  # int() would take the underscore
        "0d5e1e5c-3f7a-4b2e-9c1d-2a3b4c5d6e\uff17f",  # a digit int() would take, not ASCII
        "m1",
        "",
    ],
)
def test_any_other_id_is_kept_as_itself(message_id: str) -> None:
    assert key_of(message_id) == message_id
    assert id_of(key_of(message_id)) == message_id


def test_an_all_digit_uuid_is_an_integer_too() -> None:
    digits = "12345678-1234-1234-1234-123456789012"
    assert key_of(digits) == int(digits.replace("-", ""), 16)
    assert id_of(key_of(digits)) == digits


@given(st.uuids())
def test_every_uuid_reads_back(value: uuid.UUID) -> None:
    assert id_of(key_of(str(value))) == str(value)
    assert key_of(str(value)) != key_of(str(value).upper()) or str(value).upper() == str(value)


def test_as_key_takes_an_id_or_a_key() -> None:
    assert as_key(UUID) == key_of(UUID)
    assert as_key(key_of(UUID)) == key_of(UUID)
    assert as_key("m1") == "m1"


# --------------------------------------------------------------------------- pending set


def test_what_is_put_reads_back() -> None:
    pending = PendingSet()
    pending.put(msg(UUID, "queued", T0 + 5.25), T0 + 30.75)
    entry = pending.get(UUID)
    # observed_at is kept to the whole second after created_at below.
    assert entry == PendingEntry(T0 + 5.25, T0 + 30.25, "outbound-api", "sms", "queued")
    assert UUID in pending and "other" not in pending and 3 not in pending
    assert len(pending) == 1 and list(pending) == [UUID]
    assert pending.record(UUID) == msg(UUID, "queued", T0 + 5.25)
    assert pending.get("other") is None and pending.record("other") is None


def test_records_come_from_the_state_file_when_it_has_them() -> None:
    asked: list[str] = []

    def records(message_id: str) -> Message | None:
        asked.append(message_id)
        return msg(message_id, "sent")

    pending = PendingSet(records)
    pending.put(msg("a", "queued"), T0)
    assert pending.record("a") == msg("a", "sent") and asked == ["a"]
    assert pending.record("b") is None and asked == ["a"]  # not pending: not asked


@pytest.mark.parametrize(
    "change",
    [
        {"status": "queued"},
        {"kind": "mms"},
        {"direction": "outbound-call"},
        {"created_at": T0 + 6},
        {"charge_nano": 1},
        {"segments": 2},
        {"error_code": "30003"},
        {"error_message": "Unreachable"},
        {"remote": "+1416"},
        {"own": "+1556"},
    ],
)
def test_a_changed_record_is_told_from_the_one_held(change: dict[str, object]) -> None:
    pending = PendingSet()
    held = msg("a")
    pending.put(held, T0)
    assert pending.same(held) and pending.same(held, "a")
    assert not pending.same(held._replace(**change))  # type: ignore[arg-type]
    assert not pending.same(msg("b"))


def test_seen_again_moves_only_when_it_was_seen() -> None:
    pending = PendingSet()
    pending.put(msg("a", created=T0 + 5), T0 + 10)
    pending.seen("a", T0 + 100.5)
    assert pending.get("a") == PendingEntry(T0 + 5, T0 + 100, "outbound-api", "sms", "sent")
    pending.seen(key_of("a"), T0 + 200)
    assert pending.get("a").observed_at == T0 + 200  # type: ignore[union-attr]
    pending.seen("missing", T0 + 300)  # nothing to do
    assert len(pending) == 1
    # Before created_at (the clocks differ), it reads as created_at; far after, it is capped.
    pending.seen("a", T0)
    assert pending.get("a").observed_at == T0 + 5  # type: ignore[union-attr]
    pending.seen("a", T0 + 10**9)
    assert pending.get("a").observed_at == T0 + 5 + (1 << 22) - 1  # type: ignore[union-attr]


def test_remove_forgets_everything_of_a_message() -> None:
    pending = PendingSet()
    pending.put(msg("a"), T0)
    assert pending.remove("a") and not pending.remove("a")
    assert len(pending) == 0 and pending.get("a") is None and pending.record("a") is None
    assert pending.counts == {} and pending.minutes_by_labels == {}
    assert pending.minutes() == [] and pending.count_in(int(T0 // MINUTE)) == 0
    assert pending.oldest() == {}


def test_counts_by_labels_and_minute_follow_each_change() -> None:
    pending = PendingSet()
    minute = int(T0 // MINUTE)
    pending.put(msg("a", "queued", T0 + 5), T0)
    pending.put(msg("b", "queued", T0 + 70), T0)
    pending.put(msg("c", "sent", T0 + 10, kind="mms"), T0)
    assert pending.counts == {
        ("outbound-api", "sms", "queued"): 2,
        ("outbound-api", "mms", "sent"): 1,
    }
    assert pending.minutes_by_labels[("outbound-api", "sms", "queued")] == {
        minute: 1,
        minute + 1: 1,
    }
    pending.put(msg("a", "sent", T0 + 5), T0 + 20)  # a status change moves its count
    assert pending.counts[("outbound-api", "sms", "queued")] == 1
    assert pending.counts[("outbound-api", "sms", "sent")] == 1
    assert pending.minutes() == [minute, minute + 1]
    assert (pending.count_in(minute), pending.count_in(minute + 1)) == (2, 1)
    assert pending.oldest() == {
        ("outbound-api", "sms", "queued"): T0 + 70,
        ("outbound-api", "sms", "sent"): T0 + 5,
        ("outbound-api", "mms", "sent"): T0 + 10,
    }


def test_a_message_whose_created_at_changes_moves_to_its_new_minute() -> None:
    pending = PendingSet()
    minute = int(T0 // MINUTE)
    pending.put(msg("a", created=T0 + 5), T0)
    pending.put(msg("b", created=T0 + 6), T0)
    pending.put(msg("a", created=T0 + 65), T0 + 70)
    assert [i for i, _ in pending.in_minute(minute)] == ["b"]
    assert [i for i, _ in pending.in_minute(minute + 1)] == ["a"]
    pending.put(msg("a", created=T0 + 7), T0 + 80)  # and back
    assert sorted(i for i, _ in pending.in_minute(minute)) == ["a", "b"]
    assert pending.minutes() == [minute]


def test_each_minute_lists_its_messages_once_whatever_comes_and_goes() -> None:
    rng = random.Random(5)
    pending = PendingSet()
    truth: dict[str, Message] = {}
    for step in range(3000):
        message_id = f"m{rng.randrange(200)}"
        if rng.random() < 0.3:
            assert pending.remove(message_id) == (message_id in truth)
            truth.pop(message_id, None)
        else:
            message = msg(message_id, rng.choice(["sent", "queued"]), T0 + rng.randrange(600))
            pending.put(message, T0 + step)
            truth[message_id] = message
        if step % 97 == 0:
            for minute in pending.minutes():
                listed = [i for i, _ in pending.in_minute(minute)]
                assert len(listed) == len(set(listed)) == pending.count_in(minute)
                expected = {i for i, m in truth.items() if int(m.created_at // MINUTE) == minute}
                assert set(listed) == expected
                # scan reads the same messages, by key, with when they were created and seen.
                assert [(id_of(k), c, o) for k, c, o in pending.scan(minute)] == [
                    (i, e.created_at, e.observed_at) for i, e in pending.in_minute(minute)
                ]
    assert {i: pending.record(i) for i in pending} == truth
    assert sum(pending.counts.values()) == len(truth) == len(pending)


def test_the_seen_bound_is_a_lower_bound_of_its_minute() -> None:
    pending = PendingSet()
    minute = int(T0 // MINUTE)
    assert pending.seen_bound(minute) == -math.inf
    pending.put(msg("a", created=T0 + 5), T0 + 100.5)
    assert pending.seen_bound(minute) == T0 + 100
    pending.put(msg("b", created=T0 + 6), T0 + 50)
    pending.seen("a", T0 + 500)
    assert pending.seen_bound(minute) == T0 + 50
    pending.set_seen_bound(minute, T0 + 60)
    assert pending.seen_bound(minute) == T0 + 60
    pending.set_seen_bound(minute + 5, T0)  # a minute with none: not kept
    assert pending.seen_bound(minute + 5) == -math.inf
    pending.remove("a")
    pending.remove("b")
    assert pending.seen_bound(minute) == -math.inf


def test_a_table_that_empties_is_rebuilt_smaller_and_keeps_the_rest() -> None:
    pending = PendingSet()
    for i in range(2000):
        pending.put(msg(f"m{i}", created=T0 + i % 600), T0)
    table = pending.keys
    for i in range(1600):
        pending.remove(f"m{i}")
    assert pending.keys is not table  # rebuilt once below a quarter of the most held
    assert set(pending) == {f"m{i}" for i in range(1600, 2000)}
    assert all(pending.get(f"m{i}") is not None for i in range(1600, 2000))


def test_equal_sets_hold_the_same_messages_in_the_same_state() -> None:
    one, other = PendingSet(), PendingSet()
    for pending in (one, other):
        pending.put(msg("a"), T0)
    assert one == other
    other.seen("a", T0 + 30)
    assert one != other
    assert one != {"a": None}


# --------------------------------------------------------------------------- settled ids


def test_settled_ids_are_pruned_a_minute_of_creation_at_a_time() -> None:
    settled = SettledIds()
    settled.update({"a": T0 + 5, UUID: T0 + 59, "c": T0 + 60, key_of("d"): T0 + 200})
    assert len(settled) == 4 and UUID in settled and "x" not in settled and 5 not in settled
    assert dict(settled.items()) == {
        "a": T0 + 60,
        UUID: T0 + 60,
        "c": T0 + 120,
        "d": T0 + 240,
    }
    settled.prune(T0 + 59.9)  # the minute has not ended: kept
    assert len(settled) == 4
    settled.prune(T0 + 60)
    assert set(settled) == {"c", "d"}
    settled.prune(T0 + 239)
    assert set(settled) == {"d"}


def test_an_id_settled_again_in_another_minute_is_kept_with_it() -> None:
    settled = SettledIds()
    settled.add("a", T0 + 5)
    settled.add("a", T0 + 5)  # the same again: once
    settled.add("a", T0 + 130)
    settled.prune(T0 + 60)
    assert set(settled) == {"a"}
    settled.prune(T0 + 180)
    assert len(settled) == 0


def test_the_prune_point_is_the_start_of_its_minute() -> None:
    assert settled_prune_point(T0 + 59.9) == T0
    assert settled_prune_point(T0 + 60) == T0 + 60
    assert settled_prune_point(T0 - 0.5) == T0 - 60


@settings(max_examples=100, deadline=None)
@given(
    ids=st.dictionaries(
        st.text(alphabet="abc", min_size=1, max_size=3), st.floats(0, 3600), max_size=30
    ),
    before=st.floats(0, 3600),
)
def test_pruning_forgets_exactly_the_ids_of_minutes_ended_before_the_point(
    ids: dict[str, float], before: float
) -> None:
    settled = SettledIds()
    settled.update(ids)
    settled.prune(before)
    point = settled_prune_point(before)
    assert set(settled) == {i for i, created in ids.items() if created >= point}


def test_a_settled_table_that_empties_is_rebuilt() -> None:
    settled = SettledIds()
    settled.update({f"s{i}": T0 + i for i in range(3000)})
    table = settled.keys
    settled.prune(T0 + 2400)
    assert settled.keys is not table
    assert set(settled) == {f"s{i}" for i in range(2400, 3000)}
    other = SettledIds()
    other.update({f"s{i}": T0 + i for i in range(2400, 3000)})
    assert settled == other and settled != {}


def test_messages_of_one_label_set_share_it_and_each_is_still_the_same() -> None:
    pending = PendingSet()
    pending.put(msg("a"), T0)
    pending.put(msg("b"), T0)
    assert pending.same(msg("a")) and pending.same(msg("b"))


def test_removing_one_of_a_minute_s_messages_leaves_the_others_counted() -> None:
    pending = PendingSet()
    minute = int(T0 // MINUTE)
    pending.put(msg("a", created=T0 + 5), T0)
    pending.put(msg("b", created=T0 + 6), T0)
    pending.remove("a")
    assert pending.minutes_by_labels == {("outbound-api", "sms", "sent"): {minute: 1}}
    assert pending.counts == {("outbound-api", "sms", "sent"): 1}
    assert [i for i, _ in pending.in_minute(minute)] == ["b"]
    assert list(pending.in_minute(minute + 7)) == []  # a minute with none


def test_a_message_seen_earlier_than_its_minute_s_bound_lowers_it() -> None:
    pending = PendingSet()
    minute = int(T0 // MINUTE)
    pending.put(msg("a", created=T0 + 5), T0 + 100)
    pending.seen("a", T0 + 20.5)
    assert pending.seen_bound(minute) == T0 + 20


def test_a_set_reading_records_from_the_file_forgets_a_removed_one() -> None:
    pending = PendingSet(lambda message_id: msg(message_id))
    pending.put(msg("a"), T0)
    assert pending.remove("a")
    assert pending.record("a") is None and len(pending) == 0


def test_settled_ids_below_the_prune_point_are_not_taken_in() -> None:
    settled = {"a": 100.0, "b": 119.0, "c": 120.0, "d": 200.0}
    taken = SettledIds()
    taken.update(settled, since=130.0)  # pruned from 120, the start of its minute
    pruned = SettledIds()
    pruned.update(settled)
    pruned.prune(130.0)
    assert taken == pruned and sorted(taken) == ["c", "d"]


def test_scan_gives_each_message_of_a_minute_by_key_with_its_created_and_seen_times() -> None:
    pending = PendingSet()
    minute = int(T0 // MINUTE)
    uid = "0a1b2c3d-0000-4000-8000-00000000abcd"
    pending.put(msg(uid, created=T0 + 5.25), T0 + 100.75)
    pending.put(msg("other", created=T0 + 59.5), T0 + 70)
    pending.put(msg("next", created=T0 + 60), T0 + 70)
    assert list(pending.scan(minute)) == [
        (key_of(uid), T0 + 5.25, T0 + 5.25 + 95),  # seen to the second below
        ("other", T0 + 59.5, T0 + 59.5 + 10),
    ]
    assert list(pending.scan(minute + 1)) == [("next", T0 + 60, T0 + 70)]
    pending.put(msg("other", created=T0 + 61), T0 + 80)  # moved: listed in its new minute only
    assert [k for k, _, _ in pending.scan(minute)] == [key_of(uid)]
    assert [k for k, _, _ in pending.scan(minute + 1)] == ["next", "other"]
    assert list(pending.scan(minute + 2)) == []
