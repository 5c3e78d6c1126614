"""A finish's reconciliation waits for an admission of the same model in progress.

A claim holds the model's lock from its admission to its commit. A finish reconciles last,
under that lock: a charge (the call used more tokens than it reserved) seen half-way could let
the claim admit too much, and refunds taken without the lock deadlocked with each other and
with claims over the ledger's rows (adversarial trial). Both wait, and both then go in.
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


def test_a_finish_reconciles_only_after_an_admission_in_progress(store: SQLStore) -> None:
    refunded, charged = claim_two(store)
    engine = create_engine(store.engine.url)
    holder = engine.connect()
    try:
        holder.begin()  # a claim of the model in progress: it holds the model's lock
        holder.execute(select(func.pg_advisory_xact_lock(advisory_key(f"lbq:rate:{MODEL}"))))
        refund = finish_in_thread(store, refunded, 60)
        charge = finish_in_thread(store, charged, 150)
        time.sleep(0.5)
        assert not refund.is_set() and not charge.is_set(), "reconciled under an admission"
        holder.rollback()  # the claim commits: the finishes go in after it
        assert refund.wait(10) and charge.wait(10)
    finally:
        holder.close()
        engine.dispose()
    with store.engine.connect() as conn:
        tokens = conn.execute(text("SELECT sum(tokens), sum(open) FROM lbq_rate_slots")).one()
    assert tuple(tokens) == (60 + 150, 0)  # both reconciled: what the provider counted


def test_settling_never_waits_for_a_sibling_that_was_claimed_meanwhile(store: SQLStore) -> None:
    """Finish A settles item x's job `a` (holding the run's lock) and must lock x's open jobs.
    One is held by a claim in progress (here transaction Z). Before, A waited for it with a
    plain FOR UPDATE while the other open sibling could be claimed and its finish B lock it and
    wait for the run lock; once Z let go, A followed that row to B: a deadlock (adversarial
    trial, seen under load). Now A takes what is free at once, so the sibling cannot be claimed
    from under it, and waits only for the claim."""
    stages = {
        "a": StageSpec("a", Scope.ITEM),
        "b": StageSpec("b", Scope.ITEM),
        "c": StageSpec("c", Scope.ITEM),
        "d": StageSpec("d", Scope.ITEM, after=("a", "b", "c")),
    }
    run = store.create_run(
        pipeline="p", name="r", stages=stages, items=[NewItem("x", 1)], meta={}, now=0.0
    )
    (claimed_a,) = store.claim(worker="w", now=0.0, limit=1, lease_s=60.0, stages=["a"])
    first, second = sorted((j for j in store.jobs(run.id) if j.stage in "bc"), key=lambda j: j.id)
    engine = create_engine(store.engine.url)
    z = engine.connect()
    errors: list[BaseException] = []
    try:
        z.begin()  # a claim holding `first` as its candidate
        z.execute(text("SELECT 1 FROM lbq_jobs WHERE id = :id FOR UPDATE"), {"id": first.id})
        done = threading.Event()

        def finish_a() -> None:
            try:
                result = AttemptResult(started_at=0.0, finished_at=1.0)
                assert store.finish([Completion(claimed_a.lease, result, None)], 1.0) == [True]
                done.set()
            except BaseException as exc:  # reported below
                errors.append(exc)

        threading.Thread(target=finish_a, daemon=True).start()
        time.sleep(0.5)
        assert not done.is_set()  # it waits for the claim...
        # ...holding the free sibling, which no claim can take meanwhile
        got = store.claim(worker="v", now=1.0, limit=1, lease_s=60.0, stages=[second.stage])
        assert got == []
        z.rollback()
        assert done.wait(10), errors
    finally:
        z.close()
        engine.dispose()
    assert errors == []
    statuses = {j.stage: j.status.value for j in store.jobs(run.id)}
    assert statuses == {"a": "succeeded", "b": "ready", "c": "ready", "d": "pending"}
