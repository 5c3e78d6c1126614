"""Per-model limits and the admission policy over a sliding window.

`admit` is pure: a Store gathers the model's recent reservations inside one transaction (or under
one lock) and applies the verdict in that same transaction, so the check and the booking are atomic.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from zoneinfo import ZoneInfo

from llm_batch_queue._frozen import fast_init
from llm_batch_queue.errors import ConfigError, RequestTooLarge

GEMINI_DAY_TZ = "America/Los_Angeles"  # Gemini resets requests-per-day at midnight Pacific


@dataclass(frozen=True, slots=True)
class ModelLimits:
    """Provider limits for one model; None means unlimited.

    `window_margin_s` widens the minute window a little so that requests sent 60 s apart but
    delayed differently on the wire (or timed by hosts whose clocks differ a little) never
    land in the provider's same minute. A booking is moved to when its request really left
    (Store.reconcile), so the margin need not cover time spent before the send.
    """

    rpm: int | None = None
    tpm: int | None = None  # input tokens, as the provider counts them
    rpd: int | None = None
    max_in_flight: int | None = None
    day_tz: str = GEMINI_DAY_TZ
    window_s: float = 60.0
    window_margin_s: float = 0.25

    def __post_init__(self) -> None:
        for name in ("rpm", "tpm", "rpd", "max_in_flight"):
            value = getattr(self, name)
            if value is None:
                continue
            # bool is an int and NaN compares false to everything: both would slip through
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer or None, got {value!r}")
        if not self.window_s > 0 or not self.window_margin_s >= 0:
            raise ConfigError("window_s must be positive and window_margin_s not negative")
        try:
            ZoneInfo(self.day_tz)
        except Exception:
            raise ConfigError(f"unknown time zone for the provider day: {self.day_tz!r}") from None

    @property
    def span_s(self) -> float:
        return self.window_s + self.window_margin_s


@fast_init
@dataclass(frozen=True, slots=True)
class WindowEntry:
    """`requests` bookings holding `tokens` input tokens in all, counted in the window from `at`."""

    at: float
    tokens: int
    requests: int = 1


SLOTS_PER_S = 10
"""The ledger's resolution. A booking is counted from the end of its 0.1-second slot, never from
an earlier moment than it was made, so it leaves the window no sooner than the request does (the
guarantee holds) and at most 0.1 s later (under 0.2 % of a minute's quota). One row per model
and slot keeps the ledger small at any request rate."""


def window_slot(now: float) -> int:
    """The slot a booking made at `now` is counted in: the first whose end is not before `now`."""
    slot = math.ceil(now * SLOTS_PER_S)
    while slot_time(slot) < now:  # now * 10 may round down
        slot += 1
    return slot


def slot_time(slot: int) -> float:
    return slot / SLOTS_PER_S


@fast_init
@dataclass(frozen=True, slots=True)
class Usage:
    """The model's bookings that matter for a decision at `now`."""

    window: Sequence[WindowEntry]  # reservations with at > now - span_s, any order
    day_requests: int  # reservations since the provider day began
    in_flight: int  # reservations not yet reconciled
    blocked_until: float = 0.0  # provider cool-down or daily park


@fast_init
@dataclass(frozen=True, slots=True)
class Admit:
    pass


@fast_init
@dataclass(frozen=True, slots=True)
class Deny:
    retry_at: float
    reason: str  # rpm | tpm | rpd | in_flight | cooldown


Verdict = Admit | Deny


def admit(limits: ModelLimits, usage: Usage, tokens: int, now: float) -> Verdict:
    """Would one more request of `tokens` input tokens keep every window within its limit?

    A denial's `retry_at` is the earliest time the request would be admitted if nothing else
    changed: every limit is checked and the latest wait wins (a cool-down that ends before the
    window frees up, or on a spent day, must not send the caller back too early). On a tie the
    spent day is named, so the caller can fall back at once.
    """
    if limits.tpm is not None and tokens > limits.tpm:
        raise RequestTooLarge(
            f"request needs {tokens} input tokens but the model allows {limits.tpm} per minute;"
            " it can never be admitted — split the input"
        )
    waits: list[Deny] = []
    if limits.rpd is not None and usage.day_requests + 1 > limits.rpd:
        waits.append(Deny(next_day_start(now, limits.day_tz), "rpd"))
    if usage.blocked_until > now:
        waits.append(Deny(usage.blocked_until, "cooldown"))
    window = sorted((e for e in usage.window if e.at > now - limits.span_s), key=lambda e: e.at)
    requests = sum(e.requests for e in window)
    if limits.rpm is not None and requests + 1 > limits.rpm:
        # admitted once all but rpm - 1 of the window's requests have left it
        excess = requests + 1 - limits.rpm
        for entry in window:
            excess -= entry.requests
            if excess <= 0:
                waits.append(Deny(entry.at + limits.span_s, "rpm"))
                break
    if limits.tpm is not None:
        used = sum(e.tokens for e in window)
        if used + tokens > limits.tpm:
            excess = used + tokens - limits.tpm
            for entry in window:
                excess -= entry.tokens
                if excess <= 0:
                    waits.append(Deny(entry.at + limits.span_s, "tpm"))
                    break
    if limits.max_in_flight is not None and usage.in_flight >= limits.max_in_flight:
        waits.append(Deny(now + 0.05, "in_flight"))
    if waits:
        return max(waits, key=lambda d: d.retry_at)
    return Admit()


Admission = Callable[[ModelLimits, Usage, int, float], Verdict]


class Quota:
    """One model's usage as one transaction read it, booking requests one after another.

    Each admitted request counts against the next (a claim books many jobs at once). After the
    first denial of a request-slot or token wait, later requests are admitted only if they fit
    in what the window will still have free when the denied one may go (backfilling): a small
    request does not wait behind a large one, and never delays it. `admission` is the policy
    (`admit`, unless a test swaps in a broken one).
    """

    def __init__(
        self, limits: ModelLimits, usage: Usage, now: float, admission: Admission | None = None
    ) -> None:
        self.limits, self.now = limits, now
        self._admit = admission or admit
        self._window = [e for e in usage.window if e.at > now - limits.span_s]
        self._day, self._in_flight = usage.day_requests, usage.in_flight
        self._blocked = usage.blocked_until
        self._at = slot_time(window_slot(now))  # where this transaction's bookings count
        # this transaction's bookings, one entry (they share a slot); running totals so that a
        # claim of n jobs costs O(window + n), not n full admissions over a growing window
        self._booked = WindowEntry(self._at, 0, 0)
        self._requests = sum(e.requests for e in self._window)
        self._tokens = sum(e.tokens for e in self._window)
        self.head: Deny | None = None
        self._room = (math.inf, math.inf)  # requests, tokens left for backfilling

    def _usage(self) -> Usage:
        window = [*self._window, self._booked] if self._booked.requests else self._window
        return Usage(window, self._day, self._in_flight, self._blocked)

    def _fits(self, tokens: int) -> bool:
        """`admit`'s verdict when it is Admit, without walking the window (a shortcut taken
        only for the real policy: a test's policy sees every request)."""
        limits = self.limits
        return (
            self._admit is admit
            and (limits.rpm is None or self._requests + 1 <= limits.rpm)
            and (limits.tpm is None or self._tokens + tokens <= limits.tpm)
            and (limits.rpd is None or self._day + 1 <= limits.rpd)
            and self._blocked <= self.now
            and (limits.max_in_flight is None or self._in_flight < limits.max_in_flight)
        )

    @property
    def can_backfill(self) -> bool:
        """After a denial: is there room for a smaller request that would not delay it?"""
        return self.head is not None and self._room[0] >= 1 and self._room[1] >= 1

    def book(self, tokens: int) -> Verdict:
        verdict = (
            Admit()
            if self._fits(tokens)
            else self._admit(self.limits, self._usage(), tokens, self.now)
        )
        if self.head is not None and isinstance(verdict, Admit):
            requests, room = self._room
            if requests < 1 or tokens > room:
                return self.head
            self._room = (requests - 1, room - tokens)
        if isinstance(verdict, Deny):
            if self.head is None:
                self.head = verdict
                if verdict.reason in ("rpm", "tpm"):
                    self._room = room_at(self.limits, self._usage(), verdict.retry_at, tokens)
                else:  # a cool-down, spent day or in-flight cap holds for every request
                    self._room = (0.0, 0.0)
            return verdict
        booked = self._booked
        self._booked = WindowEntry(self._at, booked.tokens + tokens, booked.requests + 1)
        self._requests += 1
        self._tokens += tokens
        self._day += 1
        self._in_flight += 1
        return verdict


def room_at(limits: ModelLimits, usage: Usage, at: float, tokens: int) -> tuple[float, float]:
    """Requests and tokens the window still has free at `at` once a request of `tokens` is
    booked then (inf where unlimited): what may be booked before `at` without delaying it."""
    inside = [e for e in usage.window if e.at > at - limits.span_s]
    requests = math.inf
    if limits.rpm is not None:
        requests = limits.rpm - sum(e.requests for e in inside) - 1
    room = math.inf
    if limits.tpm is not None:
        room = limits.tpm - sum(e.tokens for e in inside) - tokens
    return max(0.0, requests), max(0.0, room)


def day_start(now: float, tz: str) -> float:
    """Epoch seconds of the provider's current day start (DST-aware)."""
    zone = ZoneInfo(tz)
    return _midnight(_provider_date(now, zone), zone)


def next_day_start(now: float, tz: str) -> float:
    zone = ZoneInfo(tz)
    return _midnight(_provider_date(now, zone) + timedelta(days=1), zone)


def _midnight(day: date, zone: ZoneInfo) -> float:
    """The first instant of `day`: fold=0 takes a repeated midnight's first occurrence, and a
    midnight skipped by DST maps to the instant the clocks jump."""
    return datetime(day.year, day.month, day.day, tzinfo=zone).timestamp()


def _provider_date(now: float, zone: ZoneInfo) -> date:
    today = datetime.fromtimestamp(now, zone).date()
    # fromtimestamp rounds to the microsecond, carrying a day's last instant into the next day
    return today if _midnight(today, zone) <= now else today - timedelta(days=1)


def estimate_tokens(text: str, ratio: float = 0.25) -> int:
    """A cheap input-token estimate (~4 characters a token), corrected by observed usage."""
    return max(1, math.ceil(len(text) * ratio))
