"""Stateful property tests of the rate limiter, on MemoryStore, SQLite and PostgreSQL.

A hypothesis state machine plays several dispatchers (each its own Store handle: for SQL its own
SQLStore, engine and pool, as separate processes would have) sharing one fake clock. Its rules
reserve requests of random sizes (some larger than a whole minute's TPM), reconcile random open
reservations with a smaller (refund) or larger (charge) provider count, advance the clock by
anything from milliseconds to hours across provider midnights on daylight-saving change days,
feed provider 429s (RetryInfo cool-downs and per-day QuotaFailures) through `retry.decide` into
`block_model`, and re-ask at a denial's `retry_at`. `limiter_model.Reference` replays the same
bookings as a plain list and judges every answer.

The guarantee, checked against the whole history after every step (`Reference.violations`), for
each model with limits L, where span = L.window_s + L.window_margin_s (the margin only widens the
window, so this implies the provider's 60-second one) and W(b) is the set of bookings x of b's
model made no later than b with x.at > b.at - span, i.e. the window ending at b as b saw it:

- I1 rpm: |W(b)| <= rpm for every booking b. Every sliding window's bookings are contained in
  the W(b) of its latest booking, so no window of length span ever holds more than rpm.
- I2 tpm: the tokens of W(b) *as the ledger held them when b was admitted* (the reconciled count
  of x if x had been reconciled by then, else x's estimate) plus b's estimate are <= tpm. A
  charge reconciled after b's admission cannot be undone, so the tokens finally counted in W(b)
  may exceed tpm, but (I2') by no more than the charges reconciled after b was admitted; and a
  charge does count for every later admission, since it is what I2 reads for later b.
- I3 rpd: no provider day (local calendar date in L.day_tz, DST-aware) holds more than rpd.
- I4 block: no booking is made before the end of every block (cool-down or day park) issued
  before it.
- I5 in_flight: when b was admitted, at most max_in_flight bookings (b included) were open and
  younger than the store's in-flight TTL.

And step by step:

- S1 a denial is justified: the reference finds that some limit binds right now, and the denial's
  reason is one of the binding ones (so the limiter is not over-conservative).
- S2 a denial's retry_at is the earliest time the request would be admitted if nothing else
  changed (the latest of: the block's end, the next provider midnight if the day is spent, the
  moment enough bookings leave the window). An in-flight limit frees up on reconcile, not with
  time, so there retry_at only has to be later than now and no earlier than that time.
- S3 re-asking at retry_at - 0.01 s is denied and at retry_at admitted.
- S4 a request larger than TPM raises RequestTooLarge and books nothing.
- S5 a 429 never burns the job's retries; RetryInfo cools the model down for exactly that delay,
  a per-day QuotaFailure parks it until the provider's next midnight; every dispatcher's
  `model_state` then shows the block.

The three counterexamples hypothesis found in the library itself are replayed on every store
as plain tests, and `test_a_broken_limiter_is_caught` runs the machine on deliberately broken
limiters and asserts that hypothesis finds a counterexample for each.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import date, datetime, timedelta
from typing import ClassVar, cast
from zoneinfo import ZoneInfo

import pytest
from hypothesis import Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from limiter_model import Booking, Expectation, Reference, first_instant_of, local_date
from sqlalchemy import delete

from llm_batch_queue import limits as limits_module
from llm_batch_queue.errors import QuotaScope, RateLimited, RequestTooLarge
from llm_batch_queue.jobs import Job, JobStatus, Retry
from llm_batch_queue.limits import Deny, ModelLimits, Usage, Verdict
from llm_batch_queue.retry import RetryPolicy, decide
from llm_batch_queue.store import Reservation, Store
from llm_batch_queue.store import memory as memory_module
from llm_batch_queue.store.memory import IN_FLIGHT_TTL_S, MemoryStore
from llm_batch_queue.store.sql import SQLStore
from llm_batch_queue.store.sql.tables import model_state, rate_days, rate_slots

DISPATCHERS = 3
MODELS = ("gemini", "other")  # gemini keeps the default provider day (America/Los_Angeles)
POLICY = RetryPolicy()

# Provider days worth starting near: the local dates on which the clocks change in 2026 (a 23 or
# 25 hour day; in Havana midnight itself is skipped in March and repeated in November), and the
# day after.
CHANGE_DAYS: dict[str, list[date]] = {
    "America/Los_Angeles": [date(2026, 3, 8), date(2026, 11, 1)],
    "America/Havana": [date(2026, 3, 8), date(2026, 11, 1)],
    "Europe/Berlin": [date(2026, 3, 29), date(2026, 10, 25)],
    "Australia/Lord_Howe": [date(2026, 4, 5), date(2026, 10, 4)],  # a half-hour change
    "Asia/Kathmandu": [date(2026, 1, 1)],  # UTC+5:45, no DST
    "UTC": [date(2026, 1, 1)],
}
ZONES = sorted(CHANGE_DAYS)
OTHER_ZONES = [zone for zone in ZONES if zone != "America/Los_Angeles"]


def turning_points(zone: str) -> list[float]:
    """The midnights that begin and end each change day, and the instant the clocks change."""
    points: set[float] = set()
    for day in CHANGE_DAYS[zone]:
        begin, end = first_instant_of(day, zone), first_instant_of(day + timedelta(days=1), zone)
        points |= {begin, end}
        tz = ZoneInfo(zone)
        offset = datetime.fromtimestamp(begin, tz).utcoffset()
        for step in range(int(end - begin) // 900):
            at = begin + 900 * (step + 1)
            if datetime.fromtimestamp(at, tz).utcoffset() != offset:
                lo = at - 900  # the change happened in (lo, at]: bisect to the second
                while at - lo > 1:
                    mid = (lo + at) / 2
                    if datetime.fromtimestamp(mid, tz).utcoffset() == offset:
                        lo = mid
                    else:
                        at = mid
                points.add(float(round(at)))
                break
    return sorted(points)


TURNING_POINTS = {zone: turning_points(zone) for zone in ZONES}


def model_limits(day_tz: str | None) -> st.SearchStrategy[ModelLimits]:
    """Small limits, so that every one of them binds often."""
    return st.builds(
        ModelLimits,
        rpm=st.sampled_from([None, None, 1, 3, 8]),
        tpm=st.one_of(st.none(), *[st.integers(10, 80)] * 3),
        rpd=st.sampled_from([None, None, 1, 3, 10, 30]),
        max_in_flight=st.sampled_from([None, None, None, None, 1, 3]),
        window_margin_s=st.sampled_from([0.0, 0.1, 0.5, 1.0]),
        **({} if day_tz is None else {"day_tz": st.just(day_tz)}),
    )


# mostly requests that fit, some larger than a small TPM; refunds and charges; clock steps from
# milliseconds to hours, and the steps that land right on a window's edge
small_tokens = st.integers(1, 30)
token_sizes = st.one_of(small_tokens, small_tokens, small_tokens, st.integers(1, 160))
token_changes = st.integers(-60, 0) | st.integers(0, 150)
clock_steps = st.one_of(
    st.floats(0.001, 2.0),
    st.floats(1.0, 75.0),
    st.sampled_from([59.5, 60.0, 60.1, 60.5, 61.0]),
    st.floats(60.0, 6 * 3600.0),
)
edge_offsets = st.floats(-90.0, 90.0) | st.integers(-2, 2)  # seconds | clock ticks
quota_scopes = st.sampled_from([QuotaScope.MINUTE] * 5 + [QuotaScope.DAY])  # a park ends the day
retry_info = st.none() | st.floats(0.5, 60.0) | st.floats(0.5, 600.0)


@dataclass
class Denied:
    who: int
    model: str
    tokens: int
    deny: Deny
    expected: Expectation


class LimiterMachine(RuleBasedStateMachine):
    """One run: fresh store handles, limits per model, a start near a provider midnight."""

    runs: ClassVar[int] = 0  # examples started, for the reports of the breakage tests

    def __init__(self) -> None:
        super().__init__()
        type(self).runs += 1
        self.handles = self.fresh_handles()
        self.seq = 0
        self.now = 0.0
        self.limits: dict[str, ModelLimits] = {}
        self.ref = Reference({}, IN_FLIGHT_TTL_S)
        self.by_id: dict[int, Booking] = {}  # by id() of the Reservation the store returned
        self.denied: Denied | None = None
        self.open: list[Reservation] = []  # not reconciled yet, oldest first

    def fresh_handles(self) -> list[Store]:
        """One handle per dispatcher, on a store whose ledger is empty."""
        raise NotImplementedError

    @initialize(
        gemini=model_limits(None),
        other_zone=st.sampled_from(OTHER_ZONES),
        data=st.data(),
        offset=st.floats(-600.0, 600.0) | st.floats(-3 * 3600.0, 3 * 3600.0),
    )
    def start(
        self, gemini: ModelLimits, other_zone: str, data: st.DataObject, offset: float
    ) -> None:
        other = data.draw(model_limits(other_zone), label="other")
        zone = data.draw(st.sampled_from([gemini.day_tz, other_zone, other_zone]), label="zone")
        near = data.draw(st.sampled_from(TURNING_POINTS[zone]), label="near")
        self.set_up({"gemini": gemini, "other": other}, near + offset)

    def set_up(self, limits: dict[str, ModelLimits], now: float) -> None:
        self.limits = self.ref.limits = limits
        self.now = now

    # the rules -----------------------------------------------------------------------------------
    @rule(who=st.integers(0, DISPATCHERS - 1), model=st.sampled_from(MODELS), tokens=token_sizes)
    def reserve(self, who: int, model: str, tokens: int) -> None:
        self.ask(who, model, tokens)

    @rule(
        model=st.sampled_from(MODELS),
        sizes=st.lists(small_tokens, min_size=2, max_size=2 * DISPATCHERS),
    )
    def burst(self, model: str, sizes: list[int]) -> None:
        """The dispatchers all reserve at the same instant, in turn."""
        for i, tokens in enumerate(sizes):
            self.ask(i % DISPATCHERS, model, tokens)
        self.denied = None  # several things happened since any one denial

    @rule(
        who=st.integers(0, DISPATCHERS - 1),
        model=st.sampled_from(MODELS),
        tokens=token_sizes,
        change=token_changes,
        late=st.sampled_from([0.0, 0.0, 0.3, 2.5]),
    )
    def call(self, who: int, model: str, tokens: int, change: int, late: float) -> None:
        """Reserve, call, reconcile: the dispatcher's round trip, the request leaving `late`
        seconds after its booking (the ledger moves the booking to then) and taking no time."""
        if isinstance(self.ask(who, model, tokens), Reservation):
            sent_at = None
            if late:
                self.seq += 1
                self.now = sent_at = self.now + late
            self._reconcile(self.open.pop(), who, change, sent_at)

    @precondition(lambda self: self.open)
    @rule(back=st.integers(0, 50), who=st.integers(0, DISPATCHERS - 1), change=token_changes)
    def reconcile(self, back: int, who: int, change: int) -> None:
        """A call returns (most often a recent one) and any dispatcher reconciles it."""
        self._reconcile(self.open.pop(-1 - back % len(self.open)), who, change)

    def _reconcile(
        self, booking: Reservation, who: int, change: int, sent_at: float | None = None
    ) -> None:
        self.seq += 1
        actual = max(0, booking.tokens + change)
        self.handles[who].reconcile(booking, actual, sent_at)
        ref = self.by_id[id(booking)]
        ref.actual, ref.reconciled_seq = actual, self.seq
        if sent_at is not None:
            ref.at = sent_at
        self.denied = None

    @rule(dt=clock_steps)
    def advance_clock(self, dt: float) -> None:
        self.seq += 1
        self.now += dt  # a denial stays valid: admission only gets easier as time passes

    @rule(model=st.sampled_from(MODELS), offset=edge_offsets)
    def advance_to_a_day_edge(self, model: str, offset: float | int) -> None:
        """Near the model's next provider midnight or change of clocks: seconds, or a few clock
        ticks (the smallest steps a float time can take), either side of it."""
        self.seq += 1
        tz = self.limits[model].day_tz
        midnight = first_instant_of(local_date(self.now, tz) + timedelta(days=1), tz)
        at = min([midnight, *(t for t in TURNING_POINTS.get(tz, []) if t > self.now)])
        if isinstance(offset, int):
            for _ in range(abs(offset)):
                at = math.nextafter(at, math.copysign(math.inf, offset))
        else:
            at += offset
        self.now = max(self.now, at)

    @rule(
        who=st.integers(0, DISPATCHERS - 1),
        model=st.sampled_from(MODELS),
        scope=quota_scopes,
        delay=retry_info,
    )
    def provider_429(self, who: int, model: str, scope: QuotaScope, delay: float | None) -> None:
        """A 429 as the dispatcher handles it: retry.decide, then block_model on the store."""
        self.seq += 1
        tz = self.limits[model].day_tz
        error = RateLimited("429", scope=scope, retry_after_s=delay, quota_id=f"{scope}-quota")
        chain = (model, *(m for m in MODELS if m != model))
        job = Job("j", "r", "i", "analyze", JobStatus.RUNNING, 0, 0, 5, self.now, 0, None)
        decision = decide(POLICY, chain, job, error, self.now, day_tz=tz, rng=random.Random(0))
        assert isinstance(decision.outcome, Retry), f"[S5] a 429 gave up: {decision}"
        assert not decision.outcome.counted, "[S5] a 429 burnt one of the job's retries"
        block = decision.block
        assert block is not None and block.model == model
        if scope is QuotaScope.DAY:
            until = first_instant_of(local_date(self.now, tz) + timedelta(days=1), tz)
        else:
            until = self.now + (POLICY.rate_limit_base_s if delay is None else delay)
        assert block.until == pytest.approx(until, abs=1e-6), f"[S5] blocked until {block}"
        self.handles[who].block_model(block.model, block.until, block.reason)
        self.ref.blocks.append((self.seq, model, block.until, block.reason))
        self.denied = None

    @precondition(
        lambda self: self.denied is not None and not self.denied.expected.binding & {"in_flight"}
    )
    @rule()
    def retry_when_told(self) -> None:
        """S3: nothing else changed since the denial (time passing only helps)."""
        assert self.denied is not None
        who, model, tokens, deny = (
            self.denied.who,
            self.denied.model,
            self.denied.tokens,
            self.denied.deny,
        )
        if deny.retry_at - 0.01 >= self.now:
            self.seq += 1
            self.now = deny.retry_at - 0.01
            early = self.ask(who, model, tokens)
            assert isinstance(early, Deny), f"[S3] admitted 10 ms before retry_at of {deny}"
        self.seq += 1
        self.now = max(self.now, deny.retry_at)
        got = self.ask(who, model, tokens)
        assert isinstance(got, Reservation), f"[S3] denied at retry_at of {deny}: {got}"

    def ask(self, who: int, model: str, tokens: int) -> Reservation | Deny | None:
        """One reserve() call, judged (S1, S2, S4); None for a request larger than TPM."""
        self.seq += 1
        lim, store, now = self.limits[model], self.handles[who], self.now
        self.denied = None
        if lim.tpm is not None and tokens > lim.tpm:
            with pytest.raises(RequestTooLarge, match=f"{tokens} input tokens"):
                store.reserve(model, lim, tokens, now)
            return None  # S4: and, as every later verdict shows, it booked nothing
        expected = self.ref.expect(model, tokens, now)
        got = store.reserve(model, lim, tokens, now)
        if isinstance(got, Reservation):
            assert (got.model, got.tokens, got.at) == (model, tokens, now)
            booking = Booking(self.seq, model, now, tokens)
            self.ref.bookings.append(booking)
            self.by_id[id(got)] = booking
            self.open.append(got)
            return got  # whether it should have been admitted: the invariants judge
        where = f"{model} {tokens} tokens at {now} ({lim}): denied {got}, expected {expected}"
        assert expected.binding, f"[S1] no limit binds, yet {where}"
        assert got.reason in expected.binding, f"[S1] wrong reason: {where}"
        if "in_flight" in expected.binding:
            assert got.retry_at > now and got.retry_at >= expected.earliest - 1e-6, f"[S2] {where}"
        else:
            assert got.retry_at == pytest.approx(expected.earliest, abs=1e-6), f"[S2] {where}"
        self.denied = Denied(who, model, tokens, got, expected)
        return got

    # after every step ---------------------------------------------------------------------------
    @invariant()
    def the_guarantee_holds(self) -> None:
        problems = self.ref.violations()
        assert not problems, "\n".join(problems)

    @invariant()
    def every_dispatcher_sees_the_blocks(self) -> None:
        if not self.limits:
            return
        handle = self.handles[self.seq % DISPATCHERS]
        for model in MODELS:
            state = handle.model_state(model, self.now)
            expected = self.ref.block_state(model, self.now)
            assert (state.blocked_until, state.reason) == expected, f"[S5] {model}: {state}"


def machine(fresh_handles: Callable[[], list[Store]]) -> type[LimiterMachine]:
    class Limiter(LimiterMachine):
        def fresh_handles(self) -> list[Store]:
            return fresh_handles()

    return Limiter


# ------------------------------------------------------------------------------------------------
# the property test, on every store

SETTINGS = {
    # examples x steps, tuned so that the whole file stays well under a minute
    "memory": settings(max_examples=400, stateful_step_count=50, deadline=None),
    "sqlite": settings(max_examples=100, stateful_step_count=40, deadline=None),
    "postgres": settings(max_examples=100, stateful_step_count=40, deadline=None),
}


@pytest.fixture
def fresh_handles(store_url: str, store_factory: Callable[[], Store]) -> Callable[[], list[Store]]:
    """Handles on a clean ledger, for each example: a new MemoryStore (shared by the dispatchers,
    which are threads of one process), or the SQL database's ledger and model_state emptied."""
    if store_url == "memory://":
        return lambda: [MemoryStore()] * DISPATCHERS
    handles = [store_factory() for _ in range(DISPATCHERS)]
    engine = cast(SQLStore, handles[0]).engine

    def fresh() -> list[Store]:
        with engine.begin() as conn:
            conn.execute(delete(rate_slots))
            conn.execute(delete(rate_days))
            conn.execute(delete(model_state))
        return handles

    return fresh


def test_the_limiter_keeps_its_guarantee(
    store_url: str, fresh_handles: Callable[[], list[Store]]
) -> None:
    kind = {"memory": "memory", "sqlite": "sqlite"}.get(store_url.split(":", 1)[0], "postgres")
    run_state_machine_as_test(machine(fresh_handles), settings=SETTINGS[kind])


# ------------------------------------------------------------------------------------------------
# the counterexamples hypothesis found in the library, replayed on every store (too rare in the
# random search to be left to it)

LA = "America/Los_Angeles"


def scenario(
    fresh_handles: Callable[[], list[Store]], now: float, **limits: ModelLimits
) -> LimiterMachine:
    run = machine(fresh_handles)()
    run.set_up({"gemini": ModelLimits(), "other": ModelLimits(), **limits}, now)
    return run


def settle(run: LimiterMachine) -> None:
    run.the_guarantee_holds()
    run.every_dispatcher_sees_the_blocks()
    run.teardown()


def test_a_short_cool_down_on_a_spent_day_waits_for_midnight(
    fresh_handles: Callable[[], list[Store]],
) -> None:
    """admit() used to answer the cool-down's end (5 s), ignoring the spent day (S2)."""
    run = scenario(fresh_handles, 1_773_000_000.0, gemini=ModelLimits(rpd=1))
    run.reserve(0, "gemini", 1)
    run.provider_429(1, "gemini", QuotaScope.MINUTE, None)
    denial = run.ask(2, "gemini", 1)
    assert denial == Deny(limits_module.next_day_start(run.now, LA), "rpd")
    run.retry_when_told()
    settle(run)


def test_the_repeated_hour_after_midnight_counts_in_its_day(
    fresh_handles: Callable[[], list[Store]],
) -> None:
    """Havana falls back from 01:00 CDT to 00:00 CST on 2026-11-01; the day began at the first
    midnight, and its first hour's requests count (I3)."""
    havana = "America/Havana"
    second_midnight = first_instant_of(date(2026, 11, 1), havana) + 3600
    run = scenario(fresh_handles, second_midnight - 300, other=ModelLimits(rpd=1, day_tz=havana))
    run.reserve(0, "other", 1)
    run.advance_clock(600)
    assert isinstance(run.ask(1, "other", 1), Deny)
    settle(run)


def test_the_last_instant_before_midnight_is_still_that_day(
    fresh_handles: Callable[[], list[Store]],
) -> None:
    """fromtimestamp rounds to the microsecond: 2**-22 s before midnight must not count as the
    next day (I3), and the day still ends at that midnight (S2)."""
    midnight = first_instant_of(date(2026, 3, 11), LA)
    run = scenario(fresh_handles, midnight - 3600, gemini=ModelLimits(rpd=1))
    run.reserve(0, "gemini", 1)
    run.advance_clock(3600 - 2**-22)
    assert run.now < midnight
    assert run.ask(1, "gemini", 1) == Deny(midnight, "rpd")
    settle(run)


# ------------------------------------------------------------------------------------------------
# ... and the tests bite: each broken limiter below is caught


def _fixed_minute(admit: Callable[..., Verdict]) -> Callable[..., Verdict]:
    """Counts only the current clock minute (the classic fixed-window limiter)."""

    def broken(limits: ModelLimits, usage: Usage, tokens: int, now: float) -> Verdict:
        minute = now - now % 60
        return admit(
            limits, replace(usage, window=[e for e in usage.window if e.at >= minute]), tokens, now
        )

    return broken


def _rpm_off_by_one(admit: Callable[..., Verdict]) -> Callable[..., Verdict]:
    """`len(window) > rpm` where `len(window) + 1 > rpm` is meant."""

    def broken(limits: ModelLimits, usage: Usage, tokens: int, now: float) -> Verdict:
        if limits.rpm is not None:
            limits = replace(limits, rpm=limits.rpm + 1)
        return admit(limits, usage, tokens, now)

    return broken


def _retry_at_late(admit: Callable[..., Verdict]) -> Callable[..., Verdict]:
    """Says to come back a second later than needed."""

    def broken(limits: ModelLimits, usage: Usage, tokens: int, now: float) -> Verdict:
        verdict = admit(limits, usage, tokens, now)
        return (
            replace(verdict, retry_at=verdict.retry_at + 1)
            if isinstance(verdict, Deny)
            else verdict
        )

    return broken


def _first_limit_answers(admit: Callable[..., Verdict]) -> Callable[..., Verdict]:
    """The admit() before retry_at was fixed: a cool-down, then a spent day, answer alone."""

    def broken(limits: ModelLimits, usage: Usage, tokens: int, now: float) -> Verdict:
        verdict = admit(limits, usage, tokens, now)
        if isinstance(verdict, Deny) and usage.blocked_until > now:
            return Deny(usage.blocked_until, "cooldown")
        if (
            isinstance(verdict, Deny)
            and limits.rpd is not None
            and usage.day_requests >= limits.rpd
        ):
            return Deny(limits_module.next_day_start(now, limits.day_tz), "rpd")
        return verdict

    return broken


def _break(monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    admit = limits_module.admit
    if how == "fixed clock-minute window":
        monkeypatch.setattr(memory_module, "admit", _fixed_minute(admit))
    elif how == "rpm off by one":
        monkeypatch.setattr(memory_module, "admit", _rpm_off_by_one(admit))
    elif how == "a cool-down or spent day answers alone":
        monkeypatch.setattr(memory_module, "admit", _first_limit_answers(admit))
    elif how == "retry_at a second late":
        monkeypatch.setattr(memory_module, "admit", _retry_at_late(admit))
    elif how == "provider day in UTC":
        day_start = limits_module.day_start
        monkeypatch.setattr(memory_module, "day_start", lambda now, tz: day_start(now, "UTC"))
    elif how == "reconcile ignores charges":
        reconcile = MemoryStore.reconcile

        def refund_only(
            self: MemoryStore, reservation: Reservation, tokens: int, sent_at: float | None = None
        ) -> None:
            reconcile(self, reservation, min(tokens, reservation.tokens), sent_at)

        monkeypatch.setattr(MemoryStore, "reconcile", refund_only)
    elif how == "reconcile ignores refunds":
        reconcile = MemoryStore.reconcile

        def charge_only(
            self: MemoryStore, reservation: Reservation, tokens: int, sent_at: float | None = None
        ) -> None:
            reconcile(self, reservation, max(tokens, reservation.tokens), sent_at)

        monkeypatch.setattr(MemoryStore, "reconcile", charge_only)
    elif how == "late sends ignored":
        reconcile = MemoryStore.reconcile

        def booking_stands(
            self: MemoryStore, reservation: Reservation, tokens: int, sent_at: float | None = None
        ) -> None:
            reconcile(self, reservation, tokens)

        monkeypatch.setattr(MemoryStore, "reconcile", booking_stands)
    elif how == "429 blocks ignored":
        monkeypatch.setattr(MemoryStore, "block_model", lambda self, model, until, reason: None)
    else:
        raise AssertionError(how)


BREAKAGES = [
    "fixed clock-minute window",
    "rpm off by one",
    "a cool-down or spent day answers alone",
    "retry_at a second late",
    "provider day in UTC",
    "reconcile ignores charges",
    "reconcile ignores refunds",
    "late sends ignored",
    "429 blocks ignored",
]


@pytest.mark.parametrize("how", BREAKAGES)
def test_a_broken_limiter_is_caught(how: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _break(monkeypatch, how)
    broken = machine(lambda: [MemoryStore()] * DISPATCHERS)
    hunt = settings(
        max_examples=1000,
        stateful_step_count=40,
        deadline=None,
        derandomize=True,  # the same hunt on every CI run
        database=None,
        phases=[Phase.generate],  # no shrinking: finding one is the point
        report_multiple_bugs=False,
        print_blob=False,
    )
    with pytest.raises(AssertionError, match=r"\[(I\d'?|S\d)") as caught:
        run_state_machine_as_test(broken, settings=hunt)
    check = str(caught.value).split("]", 1)[0] + "]"
    print(f"{how}: caught by {check} after {broken.runs} examples")
