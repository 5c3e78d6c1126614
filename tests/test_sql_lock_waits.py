"""Which waits a finish has on PostgreSQL while a claim holds a model's lock.

A claim holds the model's lock from its admission to its commit. A finish that only gives
quota back (the call used fewer tokens than it reserved) must not queue behind it; one that
takes more (a charge) must, or the claim could admit against a window that misses it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
from sqlalchemy import create_engine, func, select, text

from llm_batch_queue import NewItem, Scope
from llm_batch_queue.jobs import AttemptResult, ClaimedJob, StageSpec
from llm_batch_queue.limits import ModelLimits
from llm_batch_queue.store.base import Booking, Completion, Used
from llm_batch_queue.store.sql import SQLStore, open_store
from llm_batch_queue.store.sql.locks import advisory_key

pytestmark = pytest.mark.postgres

MODEL = "m"
LIMITS = ModelLimits(rpm=1000, tpm=1_000_000)


@pytest.fixture
def store(pg_url: str) -> Iterator[SQLStore]:
    s = open_store(pg_url)
    yield s
    s.close()


def claim_two(store: SQLStore) -> list[ClaimedJob]:
    store.create_run(
        pipeline="p", name="r", stages={"s": StageSpec("s", Scope.ITEM)},
        items=[NewItem("a", 1), NewItem("b", 2)], meta={}, now=0.0,
    )  # fmt: skip
    claim = store.claim_work(
        worker="w", now=0.0, limit=2, lease_s=60.0,
        plan=lambda _c, _s: Booking(MODEL, LIMITS, 100),
    )  # fmt: skip
    assert [c.reservation is not None for c in claim.jobs] == [True, True]
    return claim.jobs


def finish_in_thread(store: SQLStore, job: ClaimedJob, tokens: int) -> threading.Event:
    assert job.reservation is not None
    done = threading.Event()
    used = Used(job.reservation, tokens)
    completion = Completion(job.lease, AttemptResult(started_at=0.0, finished_at=1.0), {}, used)

    def run() -> None:
        assert store.finish([completion], 1.0) == [True]
        done.set()

    threading.Thread(target=run, daemon=True).start()
    return done


def test_a_refund_does_not_wait_for_a_claim_but_a_charge_does(store: SQLStore) -> None:
    refunded, charged = claim_two(store)
    engine = create_engine(store.engine.url)
    holder = engine.connect()
    try:
        holder.begin()  # a claim of the model in progress: it holds the model's lock
        holder.execute(select(func.pg_advisory_xact_lock(advisory_key(f"lbq:rate:{MODEL}"))))

        assert finish_in_thread(store, refunded, 60).wait(10), "a refund waited for the claim"

        charge = finish_in_thread(store, charged, 150)
        time.sleep(0.5)
        assert not charge.is_set(), "a charge went in under an admission in progress"
        holder.rollback()  # the claim commits: the charge goes in after it
        assert charge.wait(10)
    finally:
        holder.close()
        engine.dispose()
    with store.engine.connect() as conn:
        tokens = conn.execute(text("SELECT sum(tokens), sum(open) FROM lbq_rate_slots")).one()
    assert tuple(tokens) == (60 + 150, 0)  # both reconciled: what the provider counted
