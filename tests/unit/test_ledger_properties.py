"""Property: whatever the interleaving of traffic, polls, failed polls, duplicates, listing order,
ingestion delays (records the log shows up to max_ingestion_delay late), clock advances and
restarts from the last commit, once everything has settled the ledger's totals equal the
simulator's ground truth, and no message settles twice."""

from __future__ import annotations

import copy
import math
import random
from collections.abc import Callable
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from exporter.config import SettleConfig
from exporter.ledger import CURSOR_SAFETY, Ledger, LedgerState, PollDelta, Rules, Totals
from exporter.pending import as_key
from exporter.records import InvalidRecord, parse_message, parse_records
from exporter.simulator import SimMessage, Simulator, TrafficProfile, random_message_args
from tests.helpers import own_of, remote_of, true_country
from tests.unit.test_ledger import reference_plan

T0 = 1_800_000_000
TIMEOUT = 120.0
MAX_DELAY = 300.0  # max_ingestion_delay
PROJECT = "p"
PROFILE = TrafficProfile(max_delay=TIMEOUT / 2, never_receipted=0.1)
GROUPS = {"+15551230000": "otp", "72345": "marketing"}
RULES = Rules(
    settle=SettleConfig(timeout=TIMEOUT),
    poll_interval=10.0,
    failure_ratio_window=60.0,
    max_error_codes=50,
    page_size=5,
    number_groups=GROUPS,
    max_ingestion_delay=MAX_DELAY,
)


def summed(
    totals: dict[tuple[str, str, str, str], Totals],
) -> dict[tuple[str, str, str], tuple[int, int]]:
    """Messages and charge by direction, kind and status, summed over the fourth label."""
    sums: dict[tuple[str, str, str], tuple[int, int]] = {}
    for (d, k, s, _), t in totals.items():
        n, c = sums.get((d, k, s), (0, 0))
        sums[(d, k, s)] = (n + t.messages, c + t.charge_nano)
    return sums


operations = st.lists(
    st.one_of(
        st.tuples(st.just("advance"), st.integers(1, 90)),
        st.tuples(
            st.just("poll"),
            st.booleans(),  # the poll fails before its commit
            st.integers(0, 2**16),  # order and duplication of the listing
            st.integers(0, 25),  # ingestion delay of the API, within CURSOR_SAFETY
        ),
        st.tuples(st.just("restart")),
    ),
    max_size=40,
)


def assert_views_agree(ledger: Ledger, delta: PollDelta, now: float) -> None:
    """After a poll: the ledger's incrementally kept views agree with the state they summarise."""
    # The incrementally kept views agree with the state they summarise.
    recount: dict[tuple[str, str, str], int] = {}
    for _, p in ledger.state.pending.items():
        key = (p.direction, p.kind, p.status)
        recount[key] = recount.get(key, 0) + 1
    assert ledger.pending_by_labels() == recount
    oldest: dict[tuple[str, str, str], float] = {}
    for _, p in ledger.state.pending.items():
        key = (p.direction, p.kind, p.status)
        oldest[key] = min(oldest.get(key, math.inf), p.created_at)
    assert ledger.pending_oldest() == oldest
    # Summed over country, or over number group: the message counters, after every poll.
    assert summed(ledger.state.by_country) == summed(ledger.state.totals)
    assert summed(ledger.state.by_group) == summed(ledger.state.totals)
    # The plan, from the ledger's index of pending messages, agrees with the tiers in full.
    plan, expected = ledger.plan(now), reference_plan(ledger, now)
    assert plan.listings == expected.listings and plan.timeout_due == expected.timeout_due
    assert sorted(plan.get_ids) == sorted(expected.get_ids)
    # Settled ids are pruned a minute of creation at a time: none kept of a minute that ended
    # before the prune point (items() gives the end of each id's minute).
    assert all(end > delta.prune_settled_before for _, end in ledger.state.settled.items())


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**16),
    count=st.integers(0, 40),
    spread=st.integers(1, 600),
    late=st.sampled_from([0.0, 0.3, 1.0]),
    ops=operations,
)
def test_totals_equal_ground_truth_for_any_interleaving(
    seed: int, count: int, spread: int, late: float, ops: list[tuple[object, ...]]
) -> None:
    rng = random.Random(seed)
    now = [float(T0)]
    sim = Simulator(clock=lambda: now[0], seed=seed)
    sim.add_project(PROJECT, "token")
    for _ in range(count):
        created = T0 - 30 + rng.randrange(spread)  # some before the start point (rule 5)
        shows = rng.uniform(0, MAX_DELAY) if rng.random() < late else 0.0
        sim.add_message(
            PROJECT,
            created_at=created,
            appears_after=shows,
            **random_message_args(rng, PROFILE),
        )

    committed = LedgerState(start_point=T0, cursor=T0)
    ledger = Ledger(RULES, copy.deepcopy(committed))
    settled_ids: list[str] = []

    def invalid(exc: InvalidRecord) -> None:
        raise AssertionError(f"the simulator's records are valid: {exc}")

    def run_poll(fails: bool, order_seed: int, delay: int) -> None:
        nonlocal committed
        plan = ledger.plan(now[0])
        batch = ledger.begin(plan)
        visible = [
            m
            for m in sim.messages(PROJECT)
            if m.created_at <= now[0] - delay
            and m.appears_at <= now[0]
            and any(
                after - 1 <= m.created_at <= (now[0] if before is None else before)
                for after, before in plan.listings
            )
        ]
        order = random.Random(order_seed)
        listing = visible + order.sample(visible, k=len(visible) // 3)  # duplicates
        order.shuffle(listing)
        records = [m.to_json(now[0], "http://sim") for m in listing]
        if order_seed % 2:  # a page at once, as the poller does, or record by record
            batch.observe_all(parse_records(records, invalid, ledger.state.settled), now[0])
        else:
            for record in records:
                batch.observe(parse_message(record), now[0])
        by_id = {m.id: m for m in sim.messages(PROJECT)}
        for message_id in (*plan.get_ids, *batch.unrefreshed_timeout_due()):
            batch.observe(parse_message(by_id[message_id].to_json(now[0], "http://sim")), now[0])
        delta = batch.close(now[0], now[0])
        # Ledger.apply relies on it: a message seen again unchanged is never also removed.
        assert not {as_key(r) for r in delta.pending_seen} & {
            as_key(r) for r in delta.pending_removed
        }
        if fails:
            return
        ledger.apply(delta)
        settled_ids.extend(delta.settled_ids)
        assert_views_agree(ledger, delta, now[0])
        committed = copy.deepcopy(ledger.state)

    for op in ops:
        if op[0] == "advance":
            now[0] += float(op[1])  # type: ignore[arg-type]
        elif op[0] == "poll":
            run_poll(bool(op[1]), int(op[2]), int(op[3]))  # type: ignore[call-overload]
        else:
            ledger = Ledger(RULES, copy.deepcopy(committed))
    # Let everything settle: the API recovers and the exporter keeps polling.
    last_created = max((m.created_at for m in sim.messages(PROJECT)), default=T0)
    # Until the last record has shown and a late sweep has listed it.
    period = ledger.schedule().late_sweep_period
    end = max(now[0], last_created) + MAX_DELAY + period + TIMEOUT + 2 * CURSOR_SAFETY
    while now[0] < end or ledger.state.pending:
        now[0] += RULES.poll_interval
        run_poll(False, 0, 0)
        assert now[0] < end + 10 * TIMEOUT, "pending messages never settle"

    assert len(settled_ids) == len(set(settled_ids)), "a message settled twice"

    def truth(by: Callable[[SimMessage], str] | None = None) -> dict[Any, tuple[int, int, int]]:
        return sim.expected_totals(
            PROJECT,
            final_statuses=RULES.settle.final_statuses,
            final_statuses_by_kind=RULES.settle.final_statuses_by_kind,
            settle_timeout=TIMEOUT,
            start_point=T0,
            now=now[0],
            by=by,
        )

    got = {k: (v.messages, v.segments, v.charge_nano) for k, v in ledger.state.totals.items()}
    assert got == truth()
    assert math.isclose(sum(v[0] for v in got.values()), len(settled_ids))
    for dimension, by in (
        (ledger.state.by_country, lambda m: true_country(remote_of(m))),
        (ledger.state.by_group, lambda m: GROUPS.get(own_of(m), "ungrouped")),
    ):
        want = truth(by)
        assert {k: (v.messages, v.segments, v.charge_nano) for k, v in dimension.items()} == want
