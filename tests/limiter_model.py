"""A reference model of the rate limiter, written independently of `llm_batch_queue.limits`.

The property tests (test_limiter_properties.py) drive a Store and this model side by side. The
model keeps every booking in a plain list, in the order it was made, with the step (`seq`) at
which it was made and the step at which it was reconciled, so that what the ledger held at any
earlier moment can be recomputed. It reads provider days from local calendar dates, never from
the library's `day_start`, so a wrong day in the library cannot hide behind the same wrong day
here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from fractions import Fraction
from zoneinfo import ZoneInfo

from llm_batch_queue.limits import ModelLimits

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass
class Booking:
    seq: int  # the step at which the store admitted it
    model: str
    at: float
    reserved: int  # the estimate booked at admission
    actual: int | None = None  # the provider's count, once reconciled
    reconciled_seq: int | None = None

    @property
    def window_at(self) -> float:
        """Where the ledger counts it in the minute window: from the end of its tenth of a
        second (the library's SLOTS_PER_S), the first k/10 s (as a float) not before `at`."""
        k = math.floor(Fraction(self.at) * 10) - 1
        while k / 10 < self.at:
            k += 1
        return k / 10

    @property
    def tokens(self) -> int:
        """What the ledger holds for it now."""
        return self.reserved if self.actual is None else self.actual

    def tokens_before(self, seq: int) -> int:
        """What the ledger held for it just before step `seq` ran."""
        if self.actual is None or self.reconciled_seq is None or self.reconciled_seq >= seq:
            return self.reserved
        return self.actual

    def open_before(self, seq: int) -> bool:
        return self.reconciled_seq is None or self.reconciled_seq >= seq

    @property
    def charged(self) -> int:
        """Tokens the provider counted beyond the estimate (0 for a refund or while open)."""
        return max(0, (self.actual or 0) - self.reserved)


def local_date(at: float, tz: str) -> date:
    """The calendar date in `tz` at `at`, exactly: the instant is floored to the microsecond
    first (datetime.fromtimestamp would round it, carrying a day's last instant into the next)."""
    micros = math.floor(Fraction(at) * 1_000_000)
    return (EPOCH + timedelta(microseconds=micros)).astimezone(ZoneInfo(tz)).date()


def first_instant_of(day: date, tz: str) -> float:
    """The earliest epoch second whose local date is `day` (midnight, or the end of a DST gap)."""
    guess = datetime.combine(day, time(0), tzinfo=ZoneInfo(tz)).timestamp()
    # walk to the exact first instant, whatever the zone's rules do around midnight
    lo, hi = guess - 2 * 3600, guess + 2 * 3600
    assert local_date(lo, tz) < day <= local_date(hi, tz)
    while hi - lo > 1e-3:
        mid = (lo + hi) / 2
        if local_date(mid, tz) < day:
            lo = mid
        else:
            hi = mid
    return float(round(hi))  # local midnights fall on whole seconds in every zone we use


@dataclass(frozen=True)
class Expectation:
    """What a correct limiter must answer to reserve(model, tokens) at `now`."""

    binding: frozenset[str]  # every limit that denies the request now (empty: admit)
    earliest: float  # the earliest time >= now at which the time-bound limits all allow it

    @property
    def admit(self) -> bool:
        return not self.binding


@dataclass
class Reference:
    limits: dict[str, ModelLimits]
    in_flight_ttl_s: float
    bookings: list[Booking] = field(default_factory=list)
    blocks: list[tuple[int, str, float, str]] = field(
        default_factory=list
    )  # seq, model, until, why

    def of(self, model: str) -> list[Booking]:
        return [b for b in self.bookings if b.model == model]

    def blocked_until(self, model: str, before_seq: int | None = None) -> float:
        return max(
            (
                until
                for seq, m, until, _ in self.blocks
                if m == model and (before_seq is None or seq < before_seq)
            ),
            default=0.0,
        )

    def block_state(self, model: str, now: float) -> tuple[float, str | None]:
        """What model_state must say: the longest block (the first to reach it), if not over."""
        longest: tuple[float, str | None] = (0.0, None)
        for _, m, until, why in self.blocks:
            if m == model and until > longest[0]:
                longest = (until, why)
        return longest if longest[0] > now else (0.0, None)

    def window(self, model: str, t: float) -> list[Booking]:
        """What the ledger counts at `t`: bookings made by then, counted from their window_at."""
        span = self.limits[model].span_s
        return [b for b in self.of(model) if b.at <= t and b.window_at > t - span]

    def window_allows(self, model: str, tokens: int, t: float) -> set[str]:
        """The window limits that would deny the request at `t` (bookings frozen as now)."""
        lim, inside = self.limits[model], self.window(model, t)
        denied = set()
        if lim.rpm is not None and len(inside) + 1 > lim.rpm:
            denied.add("rpm")
        if lim.tpm is not None and sum(b.tokens for b in inside) + tokens > lim.tpm:
            denied.add("tpm")
        return denied

    def day_count(self, model: str, t: float) -> int:
        tz = self.limits[model].day_tz
        today = local_date(t, tz)
        return sum(1 for b in self.of(model) if local_date(b.at, tz) == today)

    def in_flight(self, model: str, t: float) -> int:
        return sum(
            1 for b in self.of(model) if b.actual is None and b.window_at > t - self.in_flight_ttl_s
        )

    def expect(self, model: str, tokens: int, now: float) -> Expectation:
        lim = self.limits[model]
        binding: set[str] = set()
        earliest = now
        blocked = self.blocked_until(model)
        if blocked > now:
            binding.add("cooldown")
            earliest = max(earliest, blocked)
        if lim.rpd is not None and self.day_count(model, now) + 1 > lim.rpd:
            binding.add("rpd")
            tomorrow = local_date(now, lim.day_tz) + timedelta(days=1)
            earliest = max(earliest, first_instant_of(tomorrow, lim.day_tz))
        window_denies = self.window_allows(model, tokens, now)
        if window_denies:
            binding |= window_denies
            # the window only empties as time passes: try each moment a booking leaves it
            leaving = sorted({b.window_at + lim.span_s for b in self.window(model, now)})
            free = next((t for t in leaving if not self.window_allows(model, tokens, t)), None)
            assert free is not None, "[ref] the window never frees up (float rounding?)"
            earliest = max(earliest, free)
        if lim.max_in_flight is not None and self.in_flight(model, now) >= lim.max_in_flight:
            binding.add("in_flight")
        return Expectation(frozenset(binding), earliest)

    # the guarantee, over the whole history ---------------------------------------------------
    def violations(self) -> list[str]:
        """Every way the bookings made so far break the guarantee (see the test's docstring)."""
        found: list[str] = []
        for model, lim in self.limits.items():
            mine = self.of(model)
            days: dict[date, int] = {}
            for b in mine:
                # the bookings in the window that ends at b, as the ledger held them then
                inside = [x for x in mine if x.seq <= b.seq and x.at > b.at - lim.span_s]
                if lim.rpm is not None and len(inside) > lim.rpm:
                    found.append(f"[I1 rpm] {len(inside)} requests in the window ending {b}")
                if lim.tpm is not None:
                    booked = sum(x.tokens_before(b.seq) for x in inside if x is not b)
                    booked += b.reserved
                    if booked > lim.tpm:
                        found.append(f"[I2 tpm] {booked} tokens at admission of {b}")
                    # the past cannot be undone, but it is off only by what was charged later
                    later = [x for x in inside if x is b or x.open_before(b.seq)]
                    final = sum(x.tokens for x in inside)
                    if final > lim.tpm + sum(x.charged for x in later):
                        found.append(f"[I2' tpm] {final} tokens, more than charges explain, {b}")
                if lim.max_in_flight is not None:
                    flying = [
                        x
                        for x in mine
                        if x.seq <= b.seq
                        and (x is b or x.open_before(b.seq))
                        and x.at > b.at - self.in_flight_ttl_s
                    ]
                    if len(flying) > lim.max_in_flight:
                        found.append(f"[I5 in_flight] {len(flying)} open at admission of {b}")
                blocked = self.blocked_until(model, before_seq=b.seq)
                if b.at < blocked:
                    found.append(f"[I4 block] admitted while blocked until {blocked}: {b}")
                day = local_date(b.at, lim.day_tz)
                days[day] = days.get(day, 0) + 1
            if lim.rpd is not None:
                found += [
                    f"[I3 rpd] {n} requests on {model}'s provider day {day} ({lim.day_tz})"
                    for day, n in days.items()
                    if n > lim.rpd
                ]
        return found
