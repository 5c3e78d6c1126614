"""What bookings and reconciliations change in the rate ledger, for every Store to apply.

The ledger holds, per model and window slot (limits.window_slot), the requests booked, their
input tokens and how many are still open (not reconciled); and per model and provider day, the
requests booked. Both stores apply these changes, so they cannot count differently.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

from llm_batch_queue.jobs import Reservation
from llm_batch_queue.limits import day_start, window_slot
from llm_batch_queue.store.base import Used

SlotKey = tuple[str, int]  # model, slot
DayKey = tuple[str, float]  # model, the provider day's first instant


def _counts() -> list[int]:
    return [0, 0, 0]


@dataclass
class LedgerChange:
    # [requests, tokens, open] to add to slots that exist (a pruned one no longer counts)...
    existing: defaultdict[SlotKey, list[int]] = field(default_factory=lambda: defaultdict(_counts))
    # ... and to slots that may not exist yet
    created: defaultdict[SlotKey, list[int]] = field(default_factory=lambda: defaultdict(_counts))
    days: Counter[DayKey] = field(default_factory=Counter)

    @property
    def models(self) -> set[str]:
        return {m for m, _ in (*self.existing, *self.created)}


def _add(row: list[int], requests: int, tokens: int, open_: int) -> None:
    row[0] += requests
    row[1] += tokens
    row[2] += open_


def booked(reservations: Iterable[Reservation]) -> LedgerChange:
    change = LedgerChange()
    for r in reservations:
        _add(change.created[(r.model, r.slot)], 1, r.tokens, 1)
        change.days[(r.model, r.day)] += 1
    return change


def reconciled(used: Iterable[Used]) -> LedgerChange:
    """The estimate is replaced by the provider's count (a negative count, from a broken
    adapter, frees nothing), and a request that left in a later slot than it was booked in moves
    there: the provider's window counts it from its arrival. One that never left is undone."""
    change = LedgerChange()
    for u in used:
        r, sent_at, tokens = u.reservation, u.sent_at, max(0, u.tokens)
        if not u.sent:
            _add(change.existing[(r.model, r.slot)], -1, -r.tokens, -1)
            change.days[(r.model, r.day)] -= 1
            continue
        slot = r.slot if sent_at is None else max(r.slot, window_slot(sent_at))
        if slot == r.slot:
            _add(change.existing[(r.model, r.slot)], 0, tokens - r.tokens, -1)
        else:
            _add(change.existing[(r.model, r.slot)], -1, -r.tokens, -1)
            _add(change.created[(r.model, slot)], 1, tokens, 0)
        if sent_at is not None and sent_at > r.at:
            day = day_start(sent_at, r.day_tz)
            if day != r.day:
                change.days[(r.model, r.day)] -= 1
                change.days[(r.model, day)] += 1
    return change
