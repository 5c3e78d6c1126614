"""The Store contract: what every Store must do, asserted through the Protocol only.

`StoreContract` is collected through test_store_contract.py; its `store` / `store_factory`
fixtures (conftest.py) run each case on MemoryStore, SQLStore on a SQLite file and SQLStore on
PostgreSQL. Times are explicit `now` values: nothing here reads a clock.
"""

from __future__ import annotations

import contextlib
import itertools
import random
import threading
from collections.abc import Callable

import pytest

from llm_batch_queue import transitions
from llm_batch_queue.errors import LeaseLost
from llm_batch_queue.jobs import (
    JSON,
    AttemptResult,
    ClaimedJob,
    GiveUp,
    ItemStatus,
    Job,
    JobStatus,
    NewItem,
    Retry,
    Run,
    RunStatus,
    Scope,
    StageSpec,
)
from llm_batch_queue.limits import Deny, ModelLimits, day_start, next_day_start, slot_time
from llm_batch_queue.store import Reservation, Store
from llm_batch_queue.store.base import Booking, Claim, Leased, ModelState, Purge
from llm_batch_queue.store.memory import IN_FLIGHT_TTL_S
from llm_batch_queue.store.milestones import ITEM_FAILED, KINDS, RUN_FINISHED, STAGE_COMPLETE
from llm_batch_queue.summary import ModelPrice

T0 = 1_750_000_000.0  # 2025-06-15, 08:06 in Los Angeles: the provider day is hours old
LEASE_S = 60.0

STAGES = {
    "analyze": StageSpec("analyze", Scope.ITEM, max_attempts=3),
    "structure": StageSpec("structure", Scope.ITEM, after=("analyze",), max_attempts=3),
    "workbook": StageSpec("workbook", Scope.RUN, max_attempts=2),
    "notify": StageSpec("notify", Scope.RUN, after=("workbook",)),
}

ONLY = {"only": StageSpec("only", Scope.ITEM)}
TWO_STEPS = {
    "first": StageSpec("first", Scope.ITEM),
    "second": StageSpec("second", Scope.ITEM, after=("first",)),
    "wrap": StageSpec("wrap", Scope.RUN),
}


def ok(now: float = T0, *, counted: bool = True, model: str | None = "m") -> AttemptResult:
    return AttemptResult(started_at=now, finished_at=now, model=model, counted=counted)


def bad(now: float = T0, *, counted: bool = True) -> AttemptResult:
    return AttemptResult(
        started_at=now, finished_at=now, model="m", error_kind="transient", counted=counted
    )


def new_run(
    store: Store,
    keys: tuple[str, ...] = ("a", "b"),
    stages: dict[str, StageSpec] = STAGES,
    now: float = T0,
) -> Run:
    return store.create_run(
        pipeline="p",
        name="run",
        stages=stages,
        items=[NewItem(k, {"key": k, "n": i}) for i, k in enumerate(keys)],
        meta={"by": "test"},
        now=now,
        notify=KINDS,
    )


def jobs_by(store: Store, run_id: str) -> dict[tuple[str, str | None], Job]:
    keys = {i.id: i.key for i in store.items(run_id)}
    return {(j.stage, keys.get(j.item_id or "")): j for j in store.jobs(run_id)}


def status_of(store: Store, run_id: str) -> dict[tuple[str, str | None], JobStatus]:
    return {k: j.status for k, j in jobs_by(store, run_id).items()}


def item_key(claimed: ClaimedJob) -> str | None:
    return claimed.item.key if claimed.item else None


def claim_one(store: Store, now: float = T0, **kwargs: object) -> ClaimedJob:
    (claimed,) = store.claim(worker="w", now=now, limit=1, lease_s=LEASE_S, **kwargs)  # type: ignore[arg-type]
    return claimed


def drain(
    store: Store, now: float = T0, fail: Callable[[ClaimedJob], bool] = lambda c: False
) -> None:
    """Claim and finish everything runnable at `now`; GiveUp where `fail` says so."""
    while claimed := store.claim(worker="w", now=now, limit=10, lease_s=LEASE_S):
        for c in claimed:
            if fail(c):
                store.fail(c.lease, bad(now), GiveUp("broken"), now)
            else:
                store.complete(c.lease, ok(now), {"stage": c.job.stage, "item": item_key(c)}, now)


def snapshot(store: Store, run_id: str) -> object:
    return (
        store.get_run(run_id),
        store.items(run_id),
        store.jobs(run_id),
        store.attempts(run_id),
        store.notifications(run_id),
    )


def kinds(store: Store, run_id: str) -> list[tuple[str, str]]:
    return [(n.kind, n.key) for n in store.notifications(run_id)]


class StoreContract:
    # creating runs ------------------------------------------------------------------------------
    def test_create_run_seeds_jobs_per_the_graph(self, store: Store) -> None:
        run = new_run(store)
        assert run.status is RunStatus.RUNNING and run.finished_at is None
        assert store.get_run(run.id) == run
        assert [r.id for r in store.list_runs()] == [run.id]
        assert [(i.key, i.status, i.payload) for i in store.items(run.id)] == [
            ("a", ItemStatus.QUEUED, {"key": "a", "n": 0}),
            ("b", ItemStatus.QUEUED, {"key": "b", "n": 1}),
        ]
        assert status_of(store, run.id) == {
            ("analyze", "a"): JobStatus.READY,
            ("structure", "a"): JobStatus.PENDING,
            ("analyze", "b"): JobStatus.READY,
            ("structure", "b"): JobStatus.PENDING,
            ("workbook", None): JobStatus.PENDING,
            ("notify", None): JobStatus.PENDING,
        }
        job = jobs_by(store, run.id)[("structure", "a")]
        assert (job.attempts, job.max_attempts, job.next_run_at, job.model_index) == (0, 3, T0, 0)
        counts = store.counts(run.id)
        assert counts.items_by_status == {"queued": 2} and counts.items_total == 2
        assert counts.jobs_by_stage_status[("analyze", "ready")] == 2
        assert kinds(store, run.id) == [("run_queued", "")]
        with pytest.raises(KeyError):
            store.get_run("nope")

    def test_run_without_items_goes_straight_to_run_stages(self, store: Store) -> None:
        run = new_run(store, keys=())
        assert status_of(store, run.id) == {
            ("workbook", None): JobStatus.READY,
            ("notify", None): JobStatus.PENDING,
        }
        empty = new_run(store, keys=(), stages={})
        assert empty.status is RunStatus.COMPLETED
        assert store.get_run(empty.id).status is RunStatus.COMPLETED

    def test_item_keys_are_unique_within_a_run(self, store: Store) -> None:
        with pytest.raises(ValueError):
            new_run(store, keys=("a", "a"))
        assert store.list_runs() == []

    @pytest.mark.parametrize(
        ("items", "meta", "error"),
        [
            ([NewItem("a\x00", 1)], {}, "item key 'a\\x00' cannot be stored as JSON: it "
             "contains U+0000 (NUL)"),
            ([NewItem("a", {"t": "cut \ud83d"})], {}, "item 'a': its payload cannot be stored "
             "as JSON: it contains a lone surrogate, U+D83D"),
            ([NewItem("a", [float("nan")])], {}, "item 'a': its payload cannot be stored as "
             "JSON: Out of range float values are not JSON compliant"),
            ([NewItem("a", 1)], {"by": object()}, "the run's meta cannot be stored as JSON: "
             "Object of type object is not JSON serializable"),
        ],
    )  # fmt: skip
    def test_a_submission_no_store_could_keep_is_refused_whole_and_alike(
        self, store: Store, items: list[NewItem], meta: JSON, error: str
    ) -> None:
        """PostgreSQL refused these with a driver error; memory and SQLite took them, so what
        passed in tests failed in production (adversarial trial). Every store now says which
        item and why, and writes nothing."""
        with pytest.raises(ValueError) as refused:
            store.create_run(
                pipeline="p", name="run", stages=STAGES, items=[NewItem("ok", 0), *items],
                meta=meta, now=T0,
            )  # fmt: skip
        assert str(refused.value) == error
        assert store.list_runs() == []

    # claiming -----------------------------------------------------------------------------------
    def test_claim_takes_by_priority_then_due_time_and_leases(self, store: Store) -> None:
        stages = {
            "low": StageSpec("low", Scope.ITEM, priority=0),
            "high": StageSpec("high", Scope.ITEM, priority=5),
        }
        run = new_run(store, keys=("a", "b"), stages=stages)
        assert store.claim(worker="w", now=T0 - 1, limit=5, lease_s=LEASE_S) == []
        first = store.claim(worker="w", now=T0, limit=2, lease_s=LEASE_S)
        assert [c.job.stage for c in first] == ["high", "high"]
        for c in first:
            assert c.job.status is JobStatus.RUNNING and not c.reclaimed
            assert c.lease.job_id == c.job.id and c.lease.expires_at == T0 + LEASE_S
            assert c.run.id == run.id and c.item is not None
            assert c.item.status is ItemStatus.RUNNING
        rest = store.claim(worker="w", now=T0, limit=5, lease_s=LEASE_S)
        assert [c.job.stage for c in rest] == ["low", "low"]
        assert store.claim(worker="w", now=T0 + 1, limit=5, lease_s=LEASE_S) == []
        assert {i.status for i in store.items(run.id)} == {ItemStatus.RUNNING}

    def test_jobs_whose_booking_is_denied_stay_ready_and_their_items_queued(
        self, store: Store
    ) -> None:
        run = new_run(store, keys=("a", "b", "c"), stages=ONLY)
        one_a_minute = ModelLimits(rpm=1, window_margin_s=0.0)

        def plan(_c: ClaimedJob, _state: Callable[[str], ModelState]) -> Booking:
            return Booking("m", one_a_minute, 10)

        def claim(now: float) -> Claim:
            # a long lease: "a" is still running when the next slot frees up
            return store.claim_work(worker="w", now=now, limit=3, lease_s=600.0, plan=plan)

        first = claim(T0)
        assert [c.item.key for c in first.jobs if c.item] == ["a"]
        assert [d.deny.reason for d in first.denied] == ["rpm"]  # then the model is spent
        status = {i.key: i.status for i in store.items(run.id)}
        assert status == {"a": ItemStatus.RUNNING, "b": ItemStatus.QUEUED, "c": ItemStatus.QUEUED}
        jobs = sorted(j.status.value for j in store.jobs(run.id))
        assert jobs == ["ready", "ready", "running"]
        assert claim(T0 + 1).jobs == []  # still denied, and still as they were
        assert sorted(j.status.value for j in store.jobs(run.id)) == jobs
        second = claim(T0 + 61)  # a minute on: the next one goes
        assert [c.item.key for c in second.jobs if c.item] == ["b"]
        assert second.jobs[0].item is not None
        assert second.jobs[0].item.status is ItemStatus.RUNNING
        assert {i.key: i.status for i in store.items(run.id)}["c"] is ItemStatus.QUEUED

    def test_claim_filters_by_stage(self, store: Store) -> None:
        run = new_run(store)
        assert store.claim(worker="w", now=T0, limit=5, lease_s=LEASE_S, stages=["workbook"]) == []
        assert store.claim(worker="w", now=T0, limit=5, lease_s=LEASE_S, stages=[]) == []
        got = store.claim(worker="w", now=T0, limit=5, lease_s=LEASE_S, stages=["analyze"])
        assert len(got) == 2
        assert {i.status for i in store.items(run.id)} == {ItemStatus.RUNNING}

    # fair order across runs -----------------------------------------------------------------
    def test_claims_take_turns_between_runs(self, store: Store) -> None:
        """A run created while another is being served joins at the current virtual time: job k
        of each run goes before job k+1 of either, instead of after the whole earlier run."""
        big = new_run(store, keys=tuple(f"b{i}" for i in range(10)), stages=ONLY)
        assert [item_key(claim_one(store)) for _ in range(3)] == ["b0", "b1", "b2"]
        small = new_run(store, keys=("s0", "s1", "s2"), stages=ONLY, now=T0 + 1)
        # b3, the next to be served, has key 3: the new run's items are keyed from there
        assert [j.fair_key for j in store.jobs(big.id)] == [float(i) for i in range(10)]
        assert [j.fair_key for j in store.jobs(small.id)] == [3.0, 4.0, 5.0]
        got = [item_key(claim_one(store, T0 + 1)) for _ in range(8)]
        assert got == ["b3", "s0", "b4", "s1", "b5", "s2", "b6", "b7"]

    def test_a_run_created_while_nothing_is_ready_starts_at_zero(self, store: Store) -> None:
        """Nothing ready (all claimed, later stages pending): the virtual time is 0, and the new
        run takes turns with the older run's later stages as they become ready."""
        old = new_run(store, keys=("o0", "o1", "o2"), stages=TWO_STEPS)
        firsts = store.claim(worker="w", now=T0, limit=5, lease_s=LEASE_S)
        assert [item_key(c) for c in firsts] == ["o0", "o1", "o2"]
        new = new_run(store, keys=("n0", "n1", "n2"), stages=TWO_STEPS, now=T0 + 1)
        keys = {k: j.fair_key for k, j in jobs_by(store, new.id).items()}
        assert keys == {
            ("first", "n0"): 0.0,
            ("second", "n0"): 0.0,
            ("first", "n1"): 1.0,
            ("second", "n1"): 1.0,
            ("first", "n2"): 2.0,
            ("second", "n2"): 2.0,
            ("wrap", None): 3.0,  # run-scope jobs come after every item
        }
        for c in firsts:  # the old run's second stages become ready, keys 0, 1, 2
            store.complete(c.lease, ok(T0 + 2), None, T0 + 2)
        runs = {old.id: "old", new.id: "new"}
        got = [
            (runs[c.run.id], c.job.stage, item_key(c))
            for c in store.claim(worker="w", now=T0 + 3, limit=10, lease_s=LEASE_S)
        ]
        assert got == [
            ("new", "first", "n0"),
            ("old", "second", "o0"),
            ("new", "first", "n1"),
            ("old", "second", "o1"),
            ("new", "first", "n2"),
            ("old", "second", "o2"),
        ]

    def test_a_later_stage_of_an_item_goes_before_the_next_items_first_stage(
        self, store: Store
    ) -> None:
        new_run(store, keys=("a0", "a1", "a2", "a3"), stages=TWO_STEPS)
        first, _ = store.claim(worker="w", now=T0, limit=2, lease_s=LEASE_S)
        store.complete(first.lease, ok(T0 + 1), None, T0 + 1)  # second/a0 ready at T0 + 1
        got = [
            (c.job.stage, item_key(c))
            for c in store.claim(worker="w", now=T0 + 1, limit=2, lease_s=LEASE_S)
        ]
        assert got == [("second", "a0"), ("first", "a2")]

    def test_priority_beats_the_fair_order(self, store: Store) -> None:
        bulk = new_run(store, keys=tuple(f"b{i}" for i in range(6)), stages=ONLY)
        assert len(store.claim(worker="w", now=T0, limit=5, lease_s=LEASE_S)) == 5
        urgent = {"only": StageSpec("only", Scope.ITEM, priority=5)}
        hurry = new_run(store, keys=("u0", "u1", "u2"), stages=urgent, now=T0 + 1)
        # keyed after b5 (key 5), yet claimed first
        assert [j.fair_key for j in store.jobs(hurry.id)] == [5.0, 6.0, 7.0]
        got = [item_key(c) for c in store.claim(worker="w", now=T0 + 1, limit=5, lease_s=LEASE_S)]
        assert got == ["u0", "u1", "u2", "b5"]
        assert store.get_run(bulk.id).status is RunStatus.RUNNING

    def test_retry_keeps_the_jobs_place_in_the_fair_order(self, store: Store) -> None:
        once = {"only": StageSpec("only", Scope.ITEM, max_attempts=1)}
        first = new_run(store, keys=("a", "b", "c"), stages=once)
        a, b = store.claim(worker="w", now=T0, limit=2, lease_s=LEASE_S)
        store.complete(a.lease, ok(), None, T0)
        store.fail(b.lease, bad(), GiveUp("broken"), T0)
        later = new_run(store, keys=("x", "y"), stages=once, now=T0 + 1)
        assert [j.fair_key for j in store.jobs(later.id)] == [2.0, 3.0]  # after c (key 2)
        store.retry_item(first.id, "b", T0 + 1)
        assert jobs_by(store, first.id)[("only", "b")].fair_key == 1.0
        got = [item_key(c) for c in store.claim(worker="w", now=T0 + 2, limit=5, lease_s=LEASE_S)]
        assert got == ["b", "c", "x", "y"]

    def test_concurrent_claimers_get_disjoint_jobs(
        self, store_factory: Callable[[], Store]
    ) -> None:
        stages = {"only": StageSpec("only", Scope.ITEM)}
        run = new_run(store_factory(), keys=tuple(f"k{i}" for i in range(40)), stages=stages)
        handles = [store_factory() for _ in range(4)]
        got: list[list[ClaimedJob]] = [[] for _ in handles]
        barrier = threading.Barrier(len(handles))

        def worker(n: int) -> None:
            barrier.wait()
            while claimed := handles[n].claim(worker=f"w{n}", now=T0, limit=3, lease_s=LEASE_S):
                got[n].extend(claimed)

        threads = [threading.Thread(target=worker, args=(n,)) for n in range(len(handles))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        ids = [c.job.id for claimed in got for c in claimed]
        assert len(ids) == len(set(ids)) == 40
        assert {j.status for j in handles[0].jobs(run.id)} == {JobStatus.RUNNING}

    def test_concurrent_workers_leave_a_consistent_graph(
        self, store_factory: Callable[[], Store]
    ) -> None:
        """Workers racing claims, retries, give-ups, abandoned leases and late completions:
        whatever interleaving happened, the end state is one the state machine allows."""
        stages = {
            "a": StageSpec("a", Scope.ITEM, max_attempts=3),
            "b": StageSpec("b", Scope.ITEM, after=("a",), priority=1, max_attempts=3),
            "c": StageSpec("c", Scope.ITEM, after=("a",), max_attempts=3),
            "d": StageSpec("d", Scope.ITEM, after=("b", "c"), max_attempts=3),
            "w": StageSpec("w", Scope.RUN, max_attempts=3),
        }
        keys = tuple(f"k{i}" for i in range(12))
        run = new_run(store_factory(), keys=keys, stages=stages)
        ticks = itertools.count()
        errors: list[BaseException] = []

        def worker(n: int) -> None:
            store, rnd, stale = store_factory(), random.Random(n), []
            try:
                while store.get_run(run.id).status is RunStatus.RUNNING:
                    now = T0 + next(ticks)
                    if now > T0 + 20_000:  # a stuck graph fails the asserts below, not hangs
                        return
                    for c in store.claim(worker=f"w{n}", now=now, limit=2, lease_s=3):
                        roll = rnd.random()
                        with contextlib.suppress(LeaseLost):
                            if roll < 0.7:
                                store.complete(c.lease, ok(now), c.job.stage, now)
                            elif roll < 0.8:
                                store.fail(c.lease, bad(now), Retry(now + 1, 0, "x"), now)
                            elif roll < 0.83:
                                store.fail(c.lease, bad(now), GiveUp("x"), now)
                            else:
                                stale.append(c)  # the worker "dies"; maybe comes back late
                    if stale and rnd.random() < 0.3:
                        with contextlib.suppress(LeaseLost):
                            store.complete(stale.pop().lease, ok(now), "late", now)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert errors == []
        store = store_factory()
        jobs = store.jobs(run.id)
        assert all(j.status.settled for j in jobs)
        for item in store.items(run.id):
            mine = {j.stage: j.status for j in jobs if j.item_id == item.id}
            assert item.status is transitions.item_status(mine)
            assert item.failures == (item.status is ItemStatus.NEEDS_REUPLOAD)
            assert set(item.outputs) == {s for s, st in mine.items() if st is JobStatus.SUCCEEDED}
        run_jobs = {j.stage: j.status for j in jobs if j.item_id is None}
        counts = store.counts(run.id)
        assert store.get_run(run.id).status is transitions.run_status(
            run_jobs, counts.items_by_status
        )
        written = kinds(store, run.id)
        assert len(written) == len(set(written))
        assert {k for kind, k in written if kind == STAGE_COMPLETE} == {"a", "b", "c", "d"}

    # completing ---------------------------------------------------------------------------------
    def test_an_items_outputs_gather_every_stage_it_completed(self, store: Store) -> None:
        # PostgreSQL adds a stage's output to the stored ones in the UPDATE (jsonb ||): the
        # earlier stage's output stays as it was, a null output is kept as null
        run = new_run(store)
        first = claim_one(store, stages=["analyze"])
        key = item_key(first)
        store.complete(first.lease, ok(T0 + 5), {"facts": [1, 2], "n": None}, T0 + 5)
        second = next(c for c in store.claim(worker="w", now=T0 + 6, limit=10, lease_s=60)
                      if item_key(c) == key and c.job.stage == "structure")  # fmt: skip
        assert second.item is not None
        assert second.item.outputs == {"analyze": {"facts": [1, 2], "n": None}}
        store.complete(second.lease, ok(T0 + 7), None, T0 + 7)
        item = next(i for i in store.items(run.id) if i.key == key)
        assert item.outputs == {"analyze": {"facts": [1, 2], "n": None}, "structure": None}

    def test_complete_stores_output_and_releases_the_next_stage(self, store: Store) -> None:
        run = new_run(store)
        c = claim_one(store, stages=["analyze"])
        store.complete(c.lease, ok(T0 + 5), {"facts": [1, 2]}, T0 + 5)
        jobs = jobs_by(store, run.id)
        key = item_key(c)
        done = jobs[("analyze", key)]
        assert (done.status, done.output, done.attempts, done.last_error) == (
            JobStatus.SUCCEEDED,
            {"facts": [1, 2]},
            1,
            None,
        )
        nxt = jobs[("structure", key)]
        assert (nxt.status, nxt.next_run_at) == (JobStatus.READY, T0 + 5)
        item = next(i for i in store.items(run.id) if i.key == key)
        assert item.outputs == {"analyze": {"facts": [1, 2]}}
        assert item.status is ItemStatus.RUNNING
        (attempt,) = store.attempts(run.id)
        assert (attempt.job_id, attempt.stage, attempt.item_key) == (done.id, "analyze", key)
        assert attempt.result == ok(T0 + 5)
        with pytest.raises(LeaseLost):  # finishing twice is a lost lease, not a second success
            store.complete(c.lease, ok(), None, T0 + 6)

    def test_uncounted_success_uses_no_attempt(self, store: Store) -> None:
        run = new_run(store, keys=("a",))
        c = claim_one(store)
        store.complete(c.lease, ok(counted=False), "out", T0)
        assert jobs_by(store, run.id)[("analyze", "a")].attempts == 0

    def test_a_run_completes_when_items_and_run_stages_are_done(self, store: Store) -> None:
        run = new_run(store)
        drain(store, T0, fail=lambda c: False)
        assert {i.status for i in store.items(run.id)} == {ItemStatus.COMPLETED}
        assert set(status_of(store, run.id).values()) == {JobStatus.SUCCEEDED}
        finished = store.get_run(run.id)
        assert (finished.status, finished.finished_at) == (RunStatus.COMPLETED, T0)
        assert kinds(store, run.id) == [
            ("run_queued", ""),
            (STAGE_COMPLETE, "analyze"),
            (STAGE_COMPLETE, "structure"),
            (RUN_FINISHED, ""),
        ]
        assert store.notifications(run.id)[-1].payload == {
            "status": "completed",
            "items": {"completed": 2},
        }

    def test_run_stages_wait_until_every_item_has_settled(self, store: Store) -> None:
        run = new_run(store)
        drain_item(store, "a")
        assert status_of(store, run.id)[("workbook", None)] is JobStatus.PENDING
        assert (STAGE_COMPLETE, "analyze") not in kinds(store, run.id)
        drain_item(store, "b")
        assert status_of(store, run.id)[("workbook", None)] is JobStatus.READY
        assert kinds(store, run.id).count((STAGE_COMPLETE, "structure")) == 1

    def test_a_failed_item_makes_the_run_complete_with_failures(self, store: Store) -> None:
        run = new_run(store)
        drain(store, T0, fail=lambda c: item_key(c) == "b" and c.job.stage == "structure")
        assert store.get_run(run.id).status is RunStatus.COMPLETED_WITH_FAILURES
        statuses = {i.key: i.status for i in store.items(run.id)}
        assert statuses == {"a": ItemStatus.COMPLETED, "b": ItemStatus.NEEDS_REUPLOAD}
        assert status_of(store, run.id)[("notify", None)] is JobStatus.SUCCEEDED

    def test_a_failed_run_stage_fails_the_run(self, store: Store) -> None:
        run = new_run(store)
        drain(store, T0, fail=lambda c: c.job.stage == "workbook")
        finished = store.get_run(run.id)
        assert (finished.status, finished.finished_at) == (RunStatus.FAILED, T0)
        assert status_of(store, run.id)[("notify", None)] is JobStatus.CANCELLED
        assert kinds(store, run.id)[-1] == (RUN_FINISHED, "")

    # failing -------------------------------------------------------------------------------------
    def test_retry_reschedules_and_tracks_the_model(self, store: Store) -> None:
        run = new_run(store, keys=("a",))
        c = claim_one(store)
        store.fail(c.lease, bad(), Retry(at=T0 + 30, model_index=0, reason="503"), T0)
        job = jobs_by(store, run.id)[("analyze", "a")]
        assert (job.status, job.next_run_at, job.attempts) == (JobStatus.READY, T0 + 30, 1)
        assert (job.model_index, job.model_failures, job.last_error) == (0, 1, "503")
        with pytest.raises(LeaseLost):
            store.heartbeat(c.lease, T0, LEASE_S)
        assert store.claim(worker="w", now=T0 + 29, limit=1, lease_s=LEASE_S) == []

        c = claim_one(store, T0 + 30)  # a 429: no attempt used, same model
        store.fail(c.lease, bad(counted=False), Retry(T0 + 40, 0, "429", counted=False), T0 + 30)
        job = jobs_by(store, run.id)[("analyze", "a")]
        assert (job.attempts, job.model_index, job.model_failures) == (1, 0, 1)

        c = claim_one(store, T0 + 40)  # fall back to the next model: its own failure count
        store.fail(c.lease, bad(), Retry(T0 + 50, 1, "fallback"), T0 + 40)
        job = jobs_by(store, run.id)[("analyze", "a")]
        assert (job.attempts, job.model_index, job.model_failures) == (2, 1, 0)
        assert len(store.attempts(run.id)) == 3
        assert store.items(run.id)[0].status is ItemStatus.RUNNING

    def test_give_up_cancels_the_chain_and_asks_for_reupload(self, store: Store) -> None:
        run = new_run(store)
        c = next(
            c
            for c in store.claim(worker="w", now=T0, limit=2, lease_s=LEASE_S)
            if item_key(c) == "a"
        )
        store.fail(c.lease, bad(), GiveUp("unreadable"), T0 + 1)
        statuses = status_of(store, run.id)
        assert statuses[("analyze", "a")] is JobStatus.FAILED
        assert statuses[("structure", "a")] is JobStatus.CANCELLED
        assert statuses[("structure", "b")] is JobStatus.PENDING
        item = next(i for i in store.items(run.id) if i.key == "a")
        assert (item.status, item.error, item.failures) == (
            ItemStatus.NEEDS_REUPLOAD,
            "analyze: unreadable",
            1,
        )
        failed = [n for n in store.notifications(run.id) if n.kind == ITEM_FAILED]
        assert [(n.key, n.payload) for n in failed] == [
            ("a#1", {"item_key": "a", "error": "analyze: unreadable", "failure": 1})
        ]
        assert store.get_run(run.id).status is RunStatus.RUNNING

    def test_release_hands_the_job_back_without_an_attempt(self, store: Store) -> None:
        run = new_run(store, keys=("a",))
        c = claim_one(store)
        store.release(c.lease, T0 + 9, "model cooling down", T0)
        job = jobs_by(store, run.id)[("analyze", "a")]
        assert (job.status, job.next_run_at, job.attempts) == (JobStatus.READY, T0 + 9, 0)
        assert job.last_error == "model cooling down" and store.attempts(run.id) == []
        with pytest.raises(LeaseLost):
            store.complete(c.lease, ok(), None, T0)

    # leases -------------------------------------------------------------------------------------
    def test_an_expired_lease_is_reclaimed_and_the_old_holder_changes_nothing(
        self, store: Store
    ) -> None:
        run = new_run(store, keys=("a",))
        old = claim_one(store, T0)
        assert store.claim(worker="w2", now=T0 + LEASE_S - 1, limit=1, lease_s=LEASE_S) == []
        new = claim_one(store, T0 + LEASE_S)
        assert new.reclaimed and new.job.id == old.job.id and new.lease.token != old.lease.token
        assert (new.job.attempts, new.job.last_error) == (
            1,
            "lease expired: the worker died or stalled",
        )
        (expired,) = store.attempts(run.id)
        assert (expired.result.error_kind, expired.item_key) == ("lease_expired", "a")
        assert expired.result.started_at == T0 + LEASE_S
        before = snapshot(store, run.id)
        with pytest.raises(LeaseLost):
            store.complete(old.lease, ok(), "late", T0 + 61)
        with pytest.raises(LeaseLost):
            store.fail(old.lease, bad(), GiveUp("late"), T0 + 61)
        with pytest.raises(LeaseLost):
            store.fail(old.lease, bad(), Retry(T0 + 99, 0, "late"), T0 + 61)
        with pytest.raises(LeaseLost):
            store.heartbeat(old.lease, T0 + 61, LEASE_S)
        with pytest.raises(LeaseLost):
            store.release(old.lease, T0 + 99, "late", T0 + 61)
        assert snapshot(store, run.id) == before
        store.complete(new.lease, ok(), "on time", T0 + 62)
        assert jobs_by(store, run.id)[("analyze", "a")].output == "on time"

    def test_heartbeat_keeps_the_lease(self, store: Store) -> None:
        new_run(store, keys=("a",))
        c = claim_one(store, T0)
        renewed = store.heartbeat(c.lease, T0 + 50, LEASE_S)
        assert (renewed.token, renewed.expires_at) == (c.lease.token, T0 + 50 + LEASE_S)
        assert store.claim(worker="w2", now=T0 + LEASE_S + 1, limit=1, lease_s=LEASE_S) == []
        assert store.next_due() == T0 + 50 + LEASE_S
        store.complete(renewed, ok(), None, T0 + 70)

    def test_a_job_that_keeps_expiring_ends_failed(self, store: Store) -> None:
        run = new_run(
            store, keys=("a",), stages={"s": StageSpec("s", Scope.ITEM, max_attempts=2, priority=1)}
        )
        other = new_run(store, keys=("z",), stages={"t": StageSpec("t", Scope.ITEM)})
        first = claim_one(store, T0, stages=["s"])
        again = claim_one(store, T0 + LEASE_S, stages=["s"])
        assert again.reclaimed and again.job.attempts == 1
        # the second expiry is its last attempt: the job fails, and does not use up the limit
        (got,) = store.claim(worker="w", now=T0 + 2 * LEASE_S, limit=1, lease_s=LEASE_S)
        assert got.run.id == other.id
        dead = store.jobs(run.id)[0]
        assert (dead.id, dead.status, dead.attempts) == (first.job.id, JobStatus.FAILED, 2)
        (item,) = store.items(run.id)
        assert item.status is ItemStatus.NEEDS_REUPLOAD
        assert item.error == "s: lease expired: the worker died or stalled"
        assert (ITEM_FAILED, "a#1") in kinds(store, run.id)
        assert store.get_run(run.id).status is RunStatus.COMPLETED_WITH_FAILURES
        assert [a.result.error_kind for a in store.attempts(run.id)] == ["lease_expired"] * 2
        with pytest.raises(LeaseLost):
            store.complete(again.lease, ok(), None, T0 + 2 * LEASE_S)

    def test_a_sibling_cancelled_by_an_expiry_is_not_claimed(self, store: Store) -> None:
        stages = {
            "a": StageSpec("a", Scope.ITEM),
            "b": StageSpec("b", Scope.ITEM, after=("a",), max_attempts=1, priority=5),
            "c": StageSpec("c", Scope.ITEM, after=("a",)),
        }
        run = new_run(store, keys=("x",), stages=stages)
        c = claim_one(store)
        store.complete(c.lease, ok(), None, T0)
        assert claim_one(store).job.stage == "b"  # priority 5; c stays READY
        later = T0 + LEASE_S
        # b's lease expired at its last attempt: b fails, which cancels c in the same claim
        assert store.claim(worker="w", now=later, limit=5, lease_s=LEASE_S) == []
        assert status_of(store, run.id) == {
            ("a", "x"): JobStatus.SUCCEEDED,
            ("b", "x"): JobStatus.FAILED,
            ("c", "x"): JobStatus.CANCELLED,
        }
        assert store.get_run(run.id).status is RunStatus.COMPLETED_WITH_FAILURES

    def test_next_due(self, store: Store) -> None:
        assert store.next_due() is None
        run = new_run(store, keys=("a",))
        assert store.next_due() == T0
        assert store.next_due(["workbook"]) is None
        c = claim_one(store)
        assert store.next_due() == T0 + LEASE_S
        store.fail(c.lease, bad(), Retry(T0 + 7, 0, "x"), T0)
        assert store.next_due(["analyze"]) == T0 + 7
        drain(store, T0 + 7)
        assert store.get_run(run.id).status is RunStatus.COMPLETED
        assert store.next_due() is None

    def test_leased_counts_running_jobs_and_their_first_expiry(self, store: Store) -> None:
        assert store.leased() == Leased(0, None)
        new_run(store, keys=("a", "b"))
        assert store.leased() == Leased(0, None)
        first = claim_one(store)
        store.heartbeat(first.lease, T0 + 20, LEASE_S)
        second = claim_one(store, now=T0 + 5)
        assert store.leased() == Leased(2, T0 + 5 + LEASE_S)
        assert store.leased("p") == store.leased()
        assert store.leased("another pipeline") == Leased(0, None)
        store.complete(second.lease, ok(), None, T0 + 6)
        assert store.leased() == Leased(1, T0 + 20 + LEASE_S)

    # admin actions ------------------------------------------------------------------------------
    def test_retry_reruns_the_failed_stage_onward_and_reopens_the_finished_run(
        self, store: Store
    ) -> None:
        run = new_run(store)
        for c in store.claim(worker="w", now=T0, limit=2, lease_s=LEASE_S):
            store.complete(c.lease, ok(), {"stage": "analyze", "item": item_key(c)}, T0)
        for got in store.claim(worker="w", now=T0, limit=2, lease_s=LEASE_S):
            if item_key(got) == "a":  # fall back to the second model, then give up
                store.fail(got.lease, bad(), Retry(T0, 1, "fallback"), T0)
            else:
                store.complete(got.lease, ok(), "b structured", T0)
        drain(store, T0, fail=lambda c: c.job.stage == "structure")
        first = store.get_run(run.id)
        assert (first.status, first.finished_at, first.round) == (
            RunStatus.COMPLETED_WITH_FAILURES,
            T0,
            1,
        )
        failed = jobs_by(store, run.id)[("structure", "a")]
        assert (failed.status, failed.attempts, failed.model_index) == (JobStatus.FAILED, 2, 1)
        history = store.attempts(run.id)

        item = store.retry_item(run.id, "a", T0 + 10)
        assert (item.key, item.status, item.error, item.failures) == (
            "a",
            ItemStatus.RUNNING,  # analyze succeeded, structure is READY again
            None,
            1,
        )
        assert item.outputs == {"analyze": {"stage": "analyze", "item": "a"}}
        assert store.items(run.id)[0] == item
        reopened = store.get_run(run.id)
        assert (reopened.status, reopened.finished_at, reopened.round) == (
            RunStatus.RUNNING,
            None,
            2,
        )
        jobs = jobs_by(store, run.id)
        kept = jobs[("analyze", "a")]
        assert (kept.status, kept.attempts) == (JobStatus.SUCCEEDED, 1)
        again = jobs[("structure", "a")]
        assert (again.status, again.attempts, again.model_index, again.model_failures) == (
            JobStatus.READY,
            0,
            0,
            0,
        )
        assert (again.last_error, again.next_run_at, again.output) == (None, T0 + 10, None)
        for stage in ("workbook", "notify"):
            job = jobs[(stage, None)]
            assert (job.status, job.attempts, job.output) == (JobStatus.PENDING, 0, None)
        assert jobs[("structure", "b")].status is JobStatus.SUCCEEDED
        assert store.attempts(run.id) == history  # the history is kept, never deleted

        (only,) = store.claim(worker="w", now=T0 + 10, limit=10, lease_s=LEASE_S)
        assert (only.job.stage, item_key(only), only.run.round) == ("structure", "a", 2)
        store.complete(only.lease, ok(T0 + 10), "a structured", T0 + 10)
        drain(store, T0 + 10)
        done = store.get_run(run.id)
        assert (done.status, done.finished_at, done.round) == (RunStatus.COMPLETED, T0 + 10, 2)
        assert {i.key: i.status for i in store.items(run.id)} == {
            "a": ItemStatus.COMPLETED,
            "b": ItemStatus.COMPLETED,
        }
        assert store.attempts(run.id)[: len(history)] == history
        assert [(a.stage, a.item_key) for a in store.attempts(run.id)[len(history) :]] == [
            ("structure", "a"),
            ("workbook", None),
            ("notify", None),
        ]
        written = kinds(store, run.id)
        assert written[: written.index((RUN_FINISHED, "")) + 1] == [
            ("run_queued", ""),
            (STAGE_COMPLETE, "analyze"),
            (ITEM_FAILED, "a#1"),
            (STAGE_COMPLETE, "structure"),
            (RUN_FINISHED, ""),
        ]
        # round 2 reports what settled again, and the run's end, once more
        assert written[written.index((RUN_FINISHED, "")) + 1 :] == [
            (STAGE_COMPLETE, "structure@2"),
            (RUN_FINISHED, "@2"),
        ]
        by_key = {n.key: n.payload for n in store.notifications(run.id)}
        assert by_key["structure@2"] == {"stage": "structure", "jobs": {"succeeded": 2}}
        assert by_key["@2"]["status"] == "completed"
        assert by_key[""]["status"] == "completed_with_failures"

    def test_retry_from_an_earlier_stage_reruns_it_and_everything_after_it(
        self, store: Store
    ) -> None:
        run = new_run(store)
        drain(store, T0, fail=lambda c: c.job.stage == "structure" and item_key(c) == "a")
        assert store.items(run.id)[0].status is ItemStatus.NEEDS_REUPLOAD
        before = snapshot(store, run.id)
        for stage, named in (("nope", "'nope'"), ("workbook", "'workbook'")):  # run-scope too
            with pytest.raises(ValueError, match=f"no item stage {named}.*analyze, structure"):
                store.retry_item(run.id, "a", T0 + 10, from_stage=stage)
        assert snapshot(store, run.id) == before  # a refused retry changes nothing

        item = store.retry_item(run.id, "a", T0 + 10, from_stage="analyze")
        assert (item.status, item.outputs, item.error) == (ItemStatus.QUEUED, {}, None)
        jobs = jobs_by(store, run.id)
        assert (jobs[("analyze", "a")].status, jobs[("analyze", "a")].output) == (
            JobStatus.READY,
            None,
        )
        assert jobs[("structure", "a")].status is JobStatus.PENDING  # after analyze, again
        assert jobs[("analyze", "b")].status is JobStatus.SUCCEEDED  # the other item: as it was
        drain(store, T0 + 10)
        assert [(a.stage, a.item_key) for a in store.attempts(run.id)][-4:] == [
            ("analyze", "a"),
            ("structure", "a"),
            ("workbook", None),
            ("notify", None),
        ]
        assert store.get_run(run.id).status is RunStatus.COMPLETED

    def test_retry_refuses_an_item_that_does_not_need_reupload(self, store: Store) -> None:
        run = new_run(store, keys=("q",))
        before = snapshot(store, run.id)
        with pytest.raises(ValueError, match="'q' is queued"):
            store.retry_item(run.id, "q", T0)
        c = claim_one(store)
        with pytest.raises(ValueError, match="'q' is running"):
            store.retry_item(run.id, "q", T0)
        store.release(c.lease, T0, "back", T0)
        drain(store)
        assert store.items(run.id)[0].status is ItemStatus.COMPLETED
        before = snapshot(store, run.id)
        with pytest.raises(ValueError, match="'q' is completed"):
            store.retry_item(run.id, "q", T0 + 1)
        with pytest.raises(ValueError, match="'q' is completed"):
            store.skip_item(run.id, "q", "late", T0 + 1)
        assert snapshot(store, run.id) == before

    def test_admin_actions_on_an_unknown_run_or_item_raise_key_error(self, store: Store) -> None:
        run = new_run(store, keys=("a",))
        with pytest.raises(KeyError, match="nope"):
            store.retry_item("nope", "a", T0)
        with pytest.raises(KeyError, match="'zz'"):
            store.retry_item(run.id, "zz", T0)
        with pytest.raises(KeyError, match="nope"):
            store.skip_item("nope", "a", "x", T0)
        with pytest.raises(KeyError, match="'zz'"):
            store.skip_item(run.id, "zz", "x", T0)
        assert store.items(run.id)[0].status is ItemStatus.QUEUED

    def test_skip_of_a_running_item_cancels_it_and_its_worker_changes_nothing(
        self, store: Store
    ) -> None:
        run = new_run(store)
        claimed = store.claim(worker="w", now=T0, limit=2, lease_s=LEASE_S)
        (mine,) = [c for c in claimed if item_key(c) == "a"]
        for c in claimed:
            if c is not mine:
                store.complete(c.lease, ok(), None, T0)
        item = store.skip_item(run.id, "a", " rows unreadable ", T0 + 1)
        assert (item.status, item.error, item.failures) == (
            ItemStatus.NEEDS_REUPLOAD,
            "skipped: rows unreadable",
            1,
        )
        jobs = jobs_by(store, run.id)
        for stage in ("analyze", "structure"):
            job = jobs[(stage, "a")]
            assert (job.status, job.last_error) == (JobStatus.CANCELLED, "skipped: rows unreadable")
        assert jobs[("structure", "b")].status is JobStatus.READY
        failed = [n for n in store.notifications(run.id) if n.kind == ITEM_FAILED]
        assert [(n.key, n.payload) for n in failed] == [
            ("a#1", {"item_key": "a", "error": "skipped: rows unreadable", "failure": 1})
        ]
        assert (STAGE_COMPLETE, "analyze") in kinds(store, run.id)  # b's analyze was the last
        before = snapshot(store, run.id)
        with pytest.raises(LeaseLost):
            store.complete(mine.lease, ok(), "late", T0 + 2)
        with pytest.raises(LeaseLost):
            store.fail(mine.lease, bad(), GiveUp("late"), T0 + 2)
        with pytest.raises(LeaseLost):
            store.heartbeat(mine.lease, T0 + 2, LEASE_S)
        with pytest.raises(LeaseLost):
            store.release(mine.lease, T0 + 9, "late", T0 + 2)
        assert snapshot(store, run.id) == before
        with pytest.raises(ValueError, match="'a' is needs_reupload already"):
            store.skip_item(run.id, "a", "twice", T0 + 2)
        assert snapshot(store, run.id) == before

        drain(store, T0 + 3)
        assert store.get_run(run.id).status is RunStatus.COMPLETED_WITH_FAILURES
        payload = next(n.payload for n in store.notifications(run.id) if n.key == "analyze")
        assert payload == {"stage": "analyze", "jobs": {"succeeded": 1, "cancelled": 1}}
        # a skipped item can be retried: every stage of it runs again, in round 2
        again = store.retry_item(run.id, "a", T0 + 4)
        assert (again.status, again.error, again.failures) == (ItemStatus.QUEUED, None, 1)
        drain(store, T0 + 4)
        assert store.get_run(run.id).status is RunStatus.COMPLETED
        assert kinds(store, run.id)[-3:] == [
            (STAGE_COMPLETE, "analyze@2"),
            (STAGE_COMPLETE, "structure@2"),
            (RUN_FINISHED, "@2"),
        ]

    def test_skipping_the_last_unsettled_item_starts_the_run_stages(self, store: Store) -> None:
        run = new_run(store, keys=("a", "b"))
        drain_item(store, "b")
        assert status_of(store, run.id)[("workbook", None)] is JobStatus.PENDING
        assert store.items(run.id)[0].status is ItemStatus.RUNNING  # claimed once, handed back
        store.skip_item(run.id, "a", "duplicate upload", T0 + 1)
        statuses = status_of(store, run.id)
        assert (statuses[("workbook", None)], statuses[("notify", None)]) == (
            JobStatus.READY,
            JobStatus.PENDING,
        )
        assert (statuses[("analyze", "a")], statuses[("structure", "a")]) == (
            JobStatus.CANCELLED,
            JobStatus.CANCELLED,
        )
        written = kinds(store, run.id)
        assert written[-3:] == [
            (ITEM_FAILED, "a#1"),
            (STAGE_COMPLETE, "analyze"),
            (STAGE_COMPLETE, "structure"),
        ]
        drain(store, T0 + 2)
        finished = store.get_run(run.id)
        assert (finished.status, finished.round) == (RunStatus.COMPLETED_WITH_FAILURES, 1)
        assert kinds(store, run.id)[-1] == (RUN_FINISHED, "")

    def test_retry_while_the_run_stages_run_restarts_them(self, store: Store) -> None:
        run = new_run(store)
        drain(store, fail=lambda c: item_key(c) == "a")
        assert store.get_run(run.id).status is RunStatus.COMPLETED_WITH_FAILURES
        run = new_run(store)  # again, but hold the workbook job in flight
        for c in store.claim(worker="w", now=T0, limit=2, lease_s=LEASE_S):
            if item_key(c) == "a":
                store.fail(c.lease, bad(), GiveUp("broken"), T0)
            else:
                store.complete(c.lease, ok(), None, T0)
        structure = claim_one(store)
        store.complete(structure.lease, ok(), None, T0)
        workbook = claim_one(store)
        assert workbook.job.stage == "workbook"
        store.retry_item(run.id, "a", T0 + 1)
        assert (store.get_run(run.id).status, store.get_run(run.id).round) == (
            RunStatus.RUNNING,
            1,
        )
        assert status_of(store, run.id)[("workbook", None)] is JobStatus.PENDING
        with pytest.raises(LeaseLost):  # its workbook would lack the retried item
            store.complete(workbook.lease, ok(), "stale", T0 + 1)
        drain(store, T0 + 2)
        assert store.get_run(run.id).status is RunStatus.COMPLETED
        assert kinds(store, run.id).count((RUN_FINISHED, "")) == 1
        assert (RUN_FINISHED, "@2") not in kinds(store, run.id)

    def test_admin_actions_racing_workers_leave_a_consistent_graph(
        self, store_factory: Callable[[], Store]
    ) -> None:
        """Skips and retries while workers claim and finish: no deadlock, no lost update."""
        stages = {
            "a": StageSpec("a", Scope.ITEM, max_attempts=2),
            "b": StageSpec("b", Scope.ITEM, after=("a",), max_attempts=2),
            "w": StageSpec("w", Scope.RUN),
        }
        keys = tuple(f"k{i}" for i in range(16))
        run = new_run(store_factory(), keys=keys, stages=stages)
        ticks = itertools.count()
        errors: list[BaseException] = []
        admin_done = threading.Event()
        done: list[str] = []

        def worker(n: int) -> None:
            store, rnd = store_factory(), random.Random(n)
            try:
                while not admin_done.is_set() or store.get_run(run.id).status is RunStatus.RUNNING:
                    now = T0 + next(ticks)
                    if now > T0 + 20_000:
                        return
                    for c in store.claim(worker=f"w{n}", now=now, limit=2, lease_s=30):
                        with contextlib.suppress(LeaseLost):
                            if rnd.random() < 0.7:  # many give-ups: something to retry
                                store.complete(c.lease, ok(now), c.job.stage, now)
                            else:
                                store.fail(c.lease, bad(now), GiveUp("x"), now)
            except BaseException as exc:
                errors.append(exc)

        def admin() -> None:
            store, rnd = store_factory(), random.Random(99)
            try:
                for _ in range(120):
                    now = T0 + next(ticks)
                    key = rnd.choice(keys)
                    with contextlib.suppress(ValueError):
                        if rnd.random() < 0.5:
                            done.append(store.skip_item(run.id, key, "admin", now).key)
                        else:
                            done.append(store.retry_item(run.id, key, now).key)
            except BaseException as exc:
                errors.append(exc)
            finally:
                admin_done.set()

        threads = [threading.Thread(target=worker, args=(n,)) for n in range(3)]
        threads.append(threading.Thread(target=admin))
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert errors == []
        assert len(done) >= 5  # the admin did act, not only get refused
        store = store_factory()
        jobs = store.jobs(run.id)
        assert all(j.status.settled for j in jobs)
        for item in store.items(run.id):
            mine = {j.stage: j.status for j in jobs if j.item_id == item.id}
            assert item.status is transitions.item_status(mine)
            assert set(item.outputs) == {s for s, st in mine.items() if st is JobStatus.SUCCEEDED}
            failures = [n for n in store.notifications(run.id) if n.key.startswith(f"{item.key}#")]
            assert len(failures) == item.failures
        run_jobs = {j.stage: j.status for j in jobs if j.item_id is None}
        final = store.get_run(run.id)
        assert final.status is transitions.run_status(
            run_jobs, store.counts(run.id).items_by_status
        )
        finished = [n for n in store.notifications(run.id) if n.kind == RUN_FINISHED]
        assert [n.key for n in finished] == [""] + [f"@{r}" for r in range(2, final.round + 1)]

    # rate ledger --------------------------------------------------------------------------------
    def test_reserve_enforces_rpm_over_a_sliding_window(self, store: Store) -> None:
        limits = ModelLimits(rpm=3)
        span = limits.span_s
        booked = [store.reserve("m", limits, 10, T0 + i) for i in range(3)]
        assert all(isinstance(b, Reservation) for b in booked)
        assert store.reserve("m", limits, 10, T0 + 5) == Deny(T0 + span, "rpm")
        assert isinstance(store.reserve("other", limits, 10, T0 + 5), Reservation)
        # the oldest booking leaves the window exactly at the retry_at a denial named
        assert store.reserve("m", limits, 10, T0 + span - 0.01) == Deny(T0 + span, "rpm")
        assert isinstance(store.reserve("m", limits, 10, T0 + span), Reservation)
        assert store.reserve("m", limits, 10, T0 + span + 0.01) == Deny(T0 + 1 + span, "rpm")

    def test_reserve_enforces_tpm_and_rpd(self, store: Store) -> None:
        limits = ModelLimits(tpm=100, rpd=3)
        assert isinstance(store.reserve("m", limits, 60, T0), Reservation)
        assert isinstance(store.reserve("m", limits, 30, T0 + 1), Reservation)
        assert store.reserve("m", limits, 20, T0 + 2) == Deny(T0 + limits.span_s, "tpm")
        assert isinstance(store.reserve("m", limits, 10, T0 + 2), Reservation)
        late = T0 + 3600
        assert store.reserve("m", limits, 1, late) == Deny(
            next_day_start(late, limits.day_tz), "rpd"
        )
        tomorrow = next_day_start(late, limits.day_tz)
        assert day_start(tomorrow, limits.day_tz) == tomorrow
        assert isinstance(store.reserve("m", limits, 1, tomorrow), Reservation)

    def test_reconcile_ends_in_flight_and_corrects_tokens(self, store: Store) -> None:
        limits = ModelLimits(tpm=100, max_in_flight=1)
        first = store.reserve("m", limits, 90, T0)
        assert isinstance(first, Reservation)
        assert first.model == "m" and first.tokens == 90 and first.at == T0
        assert store.reserve("m", limits, 5, T0 + 1) == Deny(T0 + 1 + 0.05, "in_flight")
        store.reconcile(first, 40)  # the provider counted fewer tokens: refunded
        assert isinstance(store.reserve("m", limits, 55, T0 + 2), Reservation)
        # a booking never reconciled (crashed worker) stops counting as in flight
        assert store.reserve("m", ModelLimits(max_in_flight=1), 0, T0 + 3) == Deny(
            T0 + 3 + 0.05, "in_flight"
        )
        assert isinstance(
            store.reserve("m", ModelLimits(max_in_flight=1), 0, T0 + 3 + IN_FLIGHT_TTL_S),
            Reservation,
        )

    def test_reconcile_moves_a_late_send_into_the_window_it_landed_in(
        self, store_factory: Callable[[], Store]
    ) -> None:
        """Booked at T0 but sent 3 s later: the provider counts it until T0 + 3 + 60, so the
        slot frees up then, for every dispatcher; an earlier send time never moves it back."""
        one, two = store_factory(), store_factory()
        limits = ModelLimits(rpm=1, rpd=5)
        late = one.reserve("m", limits, 10, T0)
        assert isinstance(late, Reservation)
        one.reconcile(late, 10, sent_at=T0 + 3)
        assert two.reserve("m", limits, 10, T0 + limits.span_s) == Deny(
            T0 + 3 + limits.span_s, "rpm"
        )
        on_time = two.reserve("m", limits, 10, T0 + 3 + limits.span_s)
        assert isinstance(on_time, Reservation)
        two.reconcile(on_time, 10, sent_at=on_time.at - 1)  # before its booking: ignored
        retry_at = slot_time(on_time.slot) + limits.span_s  # counted from its slot's end
        assert one.reserve("m", limits, 10, retry_at - 0.01) == Deny(retry_at, "rpm")
        assert isinstance(one.reserve("m", limits, 10, retry_at), Reservation)

    def test_block_model_is_shared_and_only_extends(
        self, store_factory: Callable[[], Store]
    ) -> None:
        one, two = store_factory(), store_factory()
        assert one.model_state("m", T0).blocked_until == 0.0
        one.block_model("m", T0 + 60, "minute")
        two.block_model("m", T0 + 30, "shorter")  # never shortens a block
        state = two.model_state("m", T0)
        assert (state.blocked_until, state.reason) == (T0 + 60, "minute")
        assert two.reserve("m", ModelLimits(rpm=5), 1, T0 + 1) == Deny(T0 + 60, "cooldown")
        two.block_model("m", T0 + 3600, "day")
        assert one.model_state("m", T0).reason == "day"
        assert one.model_state("m", T0 + 3600).blocked_until == 0.0
        assert isinstance(one.reserve("m", ModelLimits(rpm=5), 1, T0 + 3600), Reservation)

    def test_concurrent_reservations_never_exceed_the_limit(
        self, store_factory: Callable[[], Store]
    ) -> None:
        limits, threads_n, tries = ModelLimits(rpm=7), 4, 6
        handles = [store_factory() for _ in range(threads_n)]
        booked: list[Reservation] = []
        barrier = threading.Barrier(threads_n)

        def worker(store: Store) -> None:
            barrier.wait()
            for _ in range(tries):
                got = store.reserve("m", limits, 1, T0)
                if isinstance(got, Reservation):
                    booked.append(got)

        threads = [threading.Thread(target=worker, args=(h,)) for h in handles]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(booked) == 7
        assert isinstance(handles[0].reserve("m", limits, 1, T0), Deny)  # all seven were counted

    # outbox -------------------------------------------------------------------------------------
    def test_stage_milestones_are_written_once(self, store: Store) -> None:
        run = new_run(store, keys=tuple(f"k{i}" for i in range(5)))
        drain(store)
        written = kinds(store, run.id)
        assert written.count((STAGE_COMPLETE, "analyze")) == 1
        assert written.count((STAGE_COMPLETE, "structure")) == 1
        assert written.count((RUN_FINISHED, "")) == 1
        payload = next(n.payload for n in store.notifications(run.id) if n.key == "structure")
        assert payload == {"stage": "structure", "jobs": {"succeeded": 5}}

    def test_only_requested_kinds_are_written(self, store: Store) -> None:
        run = store.create_run(
            pipeline="p",
            name="quiet",
            stages=STAGES,
            items=[NewItem("a", None)],
            meta=None,
            now=T0,
            notify={RUN_FINISHED},
        )
        drain(store)
        assert kinds(store, run.id) == [(RUN_FINISHED, "")]

    def test_run_summary_aggregates_the_runs_rows(self, store: Store) -> None:
        run = new_run(store, keys=("a", "b"))
        t = T0
        while claimed := store.claim(worker="w", now=t, limit=10, lease_s=LEASE_S):
            for c in claimed:
                if c.job.stage == "analyze" and item_key(c) == "b":
                    failed = AttemptResult(
                        t, t + 1, "pro", input_tokens=100, error_kind="transient"
                    )
                    store.fail(c.lease, failed, GiveUp("broken"), t + 1)
                elif c.job.stage == "analyze":
                    store.fail(
                        c.lease,
                        AttemptResult(t, t + 1, "pro", input_tokens=100, error_kind="rate_limited"),
                        Retry(t + 2, 1, "429", counted=False),
                        t + 1,
                    )
                    t += 2
                    [again] = store.claim(worker="w", now=t, limit=1, lease_s=LEASE_S)
                    used = AttemptResult(
                        t,
                        t + 3,
                        "flash",
                        True,
                        input_tokens=1000,
                        output_tokens=200,
                        thinking_tokens=50,
                    )
                    store.complete(again.lease, used, {"ok": 1}, t + 3)
                else:
                    store.complete(c.lease, ok(t + 5, model=None), None, t + 5)
            t += 10
        new_run(store, keys=("z",))  # another run's rows (model "m") never leak in
        drain(store, t)
        summary = store.run_summary(run.id)
        assert summary.run.id == run.id and summary.run.status is RunStatus.COMPLETED_WITH_FAILURES
        assert summary.items_by_status == {"completed": 1, "needs_reupload": 1}
        assert summary.item_failures == 1
        assert [s.name for s in summary.stages] == ["analyze", "structure", "workbook", "notify"]
        analyze = summary.stage("analyze")
        assert analyze.jobs_by_status == {"failed": 1, "succeeded": 1}
        assert (analyze.attempts, analyze.failed_attempts, analyze.fallbacks) == (3, 2, 1)
        assert (analyze.first_started_at, analyze.last_finished_at) == (T0, T0 + 5)
        assert analyze.duration_s == 5
        assert summary.stage("structure").jobs_by_status == {"cancelled": 1, "succeeded": 1}
        assert summary.failures_by_kind == {"rate_limited": 1, "transient": 1}
        by_model = {m.model: m for m in summary.models}
        assert set(by_model) == {"flash", "pro"}
        flash = by_model["flash"]
        assert (flash.attempts, flash.succeeded, flash.input_tokens) == (1, 1, 1000)
        assert (flash.output_tokens, flash.thinking_tokens) == (200, 50)
        assert (by_model["pro"].attempts, by_model["pro"].input_tokens) == (2, 200)
        assert summary.notifications_by_status == {"pending": len(store.notifications(run.id))}
        prices = {"flash": ModelPrice(0.30, 2.50), "pro": ModelPrice(1.25, 10.0)}
        # flash: 1000 in, 250 out (thinking billed as output); pro: 200 in
        assert summary.costs(prices) == pytest.approx(
            {"flash": (1000 * 0.30 + 250 * 2.50) / 1e6, "pro": 200 * 1.25 / 1e6}
        )
        assert summary.total_cost_usd({"flash": prices["flash"]}) is None  # pro has no price
        with pytest.raises(KeyError):
            store.run_summary("nope")

    def _send_final(self, store: Store, run_id: str, now: float) -> None:
        for n in store.claim_notifications(now, limit=100):
            store.mark_notification(n.id, sent=n.kind == RUN_FINISHED and n.run_id == run_id,
                                    now=now, error="not this one")  # fmt: skip

    def test_purge_waits_for_the_retention_and_the_final_notification(self, store: Store) -> None:
        run = new_run(store, keys=("a", "b"))
        drain(store, T0 + 10, fail=lambda c: item_key(c) == "b" and c.job.stage == "analyze")
        finished = store.get_run(run.id)
        assert finished.finished_at is not None and finished.purged_at is None
        day = 86400.0
        assert store.purge_finished_runs(day, T0 + 100) == Purge()  # too young
        # old enough, but the final e-mail has not gone out: nothing goes (D-29)
        assert store.purge_finished_runs(day, T0 + 2 * day) == Purge(waiting=[run.id])
        [final] = [n for n in store.notifications(run.id) if n.kind == RUN_FINISHED]
        [claimed] = [n for n in store.claim_notifications(T0 + 2 * day) if n.id == final.id]
        store.mark_notification(claimed.id, sent=False, now=T0 + 2 * day, in_doubt=True)
        assert store.purge_finished_runs(day, T0 + 2 * day) == Purge(waiting=[run.id])
        assert all(i.payload is not None for i in store.items(run.id))

        store.resolve_notification(final.id, resend=False, now=T0 + 2 * day)  # it arrived
        assert store.purge_finished_runs(day, T0 + 2 * day) == Purge(purged=[run.id])
        assert store.get_run(run.id).purged_at == T0 + 2 * day
        assert {(i.key, i.payload, str(i.outputs)) for i in store.items(run.id)} == {
            ("a", None, "{}"),
            ("b", None, "{}"),
        }
        assert all(j.output is None for j in store.jobs(run.id))
        # what the summary and the status pages need is kept
        assert [i.status for i in store.items(run.id)] == [
            ItemStatus.COMPLETED,
            ItemStatus.NEEDS_REUPLOAD,
        ]
        assert store.run_summary(run.id).stage("analyze").attempts == 2
        assert len(store.notifications(run.id)) > 1
        assert store.purge_finished_runs(0.0, T0 + 3 * day) == Purge()  # once
        with pytest.raises(ValueError, match="purged"):
            store.retry_item(run.id, "b", T0 + 3 * day)

    def test_purge_leaves_running_runs_and_needs_no_final_a_run_never_asked_for(
        self, store: Store
    ) -> None:
        running = new_run(store, keys=("a",))
        quiet = store.create_run(
            pipeline="p",
            name="quiet",
            stages=ONLY,
            items=[NewItem("q", {"secret": 1})],
            meta={},
            now=T0,
            notify={"run_queued"},
        )
        [job] = store.claim(worker="w", now=T0, limit=1, lease_s=LEASE_S, stages={"only"})
        store.complete(job.lease, ok(T0), {"out": 1}, T0)
        assert store.purge_finished_runs(0.0, T0 + 1) == Purge(purged=[quiet.id])
        assert store.items(quiet.id)[0].payload is None
        assert store.items(running.id)[0].payload == {"key": "a", "n": 0}

    def test_purge_wants_the_final_notification_of_the_last_round(self, store: Store) -> None:
        run = new_run(store, keys=("a",))
        drain(store, T0, fail=lambda c: c.job.stage == "analyze")
        self._send_final(store, run.id, T0 + 1)
        store.retry_item(run.id, "a", T0 + 2)
        drain(store, T0 + 3)
        assert store.get_run(run.id).round == 2
        # round 1's final e-mail went out; round 2's has not yet
        assert store.purge_finished_runs(0.0, T0 + 4) == Purge(waiting=[run.id])
        self._send_final(store, run.id, T0 + 5)
        assert store.purge_finished_runs(0.0, T0 + 6) == Purge(purged=[run.id])

    def test_outbox_delivery_bookkeeping(self, store: Store) -> None:
        run = new_run(store, keys=("a",))
        drain(store)
        pending = store.pending_notifications(T0, limit=2)
        assert [n.kind for n in pending] == ["run_queued", STAGE_COMPLETE]
        assert all(n.status == "pending" and n.attempts == 0 for n in pending)
        first, second = store.claim_notifications(T0, limit=2, hold_s=30.0)
        assert (first.status, first.next_attempt_at) == ("sending", T0 + 30.0)
        assert store.mark_notification(first.id, sent=True, now=T0 + 1, provider_id="<m1@x>")
        assert store.mark_notification(
            second.id, sent=False, now=T0 + 1, error="smtp down", retry_at=T0 + 60
        )
        assert second.id not in [n.id for n in store.pending_notifications(T0 + 59)]
        assert second.id in [n.id for n in store.pending_notifications(T0 + 60)]
        by_id = {n.id: n for n in store.notifications(run.id)}
        assert (
            by_id[first.id].status,
            by_id[first.id].sent_at,
            by_id[first.id].attempts,
            by_id[first.id].provider_id,
        ) == ("sent", T0 + 1, 1, "<m1@x>")
        assert (by_id[second.id].status, by_id[second.id].error) == ("pending", "smtp down")
        assert by_id[second.id].next_attempt_at == T0 + 60
        [again] = [n for n in store.claim_notifications(T0 + 60) if n.id == second.id]
        assert store.mark_notification(again.id, sent=False, now=T0 + 61, error="bounced")
        failed = next(n for n in store.notifications(run.id) if n.id == second.id)
        assert (failed.status, failed.attempts) == ("failed", 2)
        # a sent row stays as it was sent
        assert not store.mark_notification(first.id, sent=True, now=T0 + 99)
        assert next(n for n in store.notifications(run.id) if n.id == first.id).sent_at == T0 + 1
        with pytest.raises(KeyError):
            store.mark_notification(10**9, sent=True, now=T0)

    def _one_queued_note(self, store: Store) -> str:
        specs = {"a": StageSpec("a", Scope.ITEM)}
        run = store.create_run(
            pipeline="p",
            name="n",
            stages=specs,
            items=[NewItem("x", 1)],
            meta={},
            now=100.0,
            notify={"run_queued"},
        )
        return run.id

    def test_claimed_notifications_are_hidden_from_other_senders(self, store: Store) -> None:
        """Two dispatchers draining one outbox never get the same row (D-26)."""
        run_id = self._one_queued_note(store)
        first = store.claim_notifications(100.0, hold_s=60.0)
        assert [(n.kind, n.status) for n in first] == [("run_queued", "sending")]
        assert store.claim_notifications(100.0) == []  # taken: invisible to a second sender
        assert store.claim_notifications(159.0, idempotent=True) == []  # still held
        [note] = store.notifications(run_id)
        assert (note.status, note.dedupe_key) == ("sending", f"{run_id}/run_queued/")

    def test_a_row_whose_sender_died_is_in_doubt_and_never_sent_again(self, store: Store) -> None:
        run_id = self._one_queued_note(store)
        [claimed] = store.claim_notifications(100.0, hold_s=60.0)
        # the sender dies between send and mark; its hold passes
        assert store.claim_notifications(161.0) == []
        [note] = store.notifications(run_id)
        assert (note.status, note.attempts) == ("in_doubt", 1)
        assert note.error is not None and note.error.startswith("in doubt")
        assert store.claim_notifications(10_000.0) == []
        assert store.claim_notifications(10_000.0, idempotent=True) == []
        assert store.pending_notifications(10_000.0) == []
        # the sender was only slow: a failure it reports now changes nothing, a success does
        assert not store.mark_notification(claimed.id, sent=False, now=170.0, retry_at=200.0)
        assert store.notifications(run_id)[0].status == "in_doubt"
        assert store.mark_notification(claimed.id, sent=True, now=171.0)
        assert store.notifications(run_id)[0].status == "sent"

    def test_an_idempotent_sender_takes_an_expired_row_again(self, store: Store) -> None:
        run_id = self._one_queued_note(store)
        [first] = store.claim_notifications(100.0, hold_s=60.0, idempotent=True)
        [again] = store.claim_notifications(161.0, hold_s=60.0, idempotent=True)
        assert (again.id, again.status, again.next_attempt_at) == (first.id, "sending", 221.0)
        assert again.dedupe_key == first.dedupe_key  # so the provider drops the second copy
        assert store.claim_notifications(161.0, idempotent=True) == []
        assert store.mark_notification(again.id, sent=True, now=162.0, provider_id="e-1")
        assert store.notifications(run_id)[0].status == "sent"

    def test_an_admin_resends_or_marks_a_row_in_doubt(self, store: Store) -> None:
        run_id = self._one_queued_note(store)
        [note] = store.claim_notifications(100.0, hold_s=60.0)
        with pytest.raises(ValueError, match="sending"):
            store.resolve_notification(note.id, resend=True, now=120.0)
        store.claim_notifications(161.0)  # -> in doubt
        resent = store.resolve_notification(note.id, resend=True, now=200.0)
        assert (resent.status, resent.next_attempt_at) == ("pending", 200.0)
        [again] = store.claim_notifications(200.0)
        assert again.id == note.id
        assert store.mark_notification(note.id, sent=False, now=201.0, error="550 no")  # failed
        marked = store.resolve_notification(note.id, resend=False, now=300.0)
        assert (marked.status, marked.sent_at, marked.error) == ("sent", 300.0, None)
        assert store.notifications(run_id) == [marked]
        with pytest.raises(ValueError, match="sent"):
            store.resolve_notification(note.id, resend=True, now=301.0)
        with pytest.raises(KeyError):
            store.resolve_notification(10**9, resend=True, now=301.0)

    def test_a_send_that_may_have_left_is_marked_in_doubt(self, store: Store) -> None:
        run_id = self._one_queued_note(store)
        [note] = store.claim_notifications(100.0, hold_s=60.0)
        assert store.mark_notification(note.id, sent=False, now=101.0, error="lost", in_doubt=True)
        [after] = store.notifications(run_id)
        assert (after.status, after.error, after.attempts) == ("in_doubt", "lost", 1)
        assert store.claim_notifications(10_000.0) == []


def drain_item(store: Store, key: str, now: float = T0) -> None:
    """Finish every job of one item."""
    while True:
        claimed = store.claim(worker="w", now=now, limit=50, lease_s=LEASE_S)
        mine = [c for c in claimed if item_key(c) == key]
        for c in claimed:
            if c not in mine:
                store.release(c.lease, now, "not this one", now)
        if not mine:
            return
        for c in mine:
            store.complete(c.lease, ok(now), None, now)
