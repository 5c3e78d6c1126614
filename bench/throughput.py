"""Queue throughput on PostgreSQL: no-op jobs through ours, pgqueuer and procrastinate.

    .venv/bin/pip install -q -e '.[dev,bench]'
    .venv/bin/python bench/throughput.py [--json] [--jobs 20000] [--processes 1,2]
        [--systems ours,pgqueuer,procrastinate] [--variants default|all|NAME,...]
        [--pg postgresql+psycopg://postgres@127.0.0.1:5432/postgres]

A burn-down, the method of pgqueuer's and River's own benchmarks. For every system, settings
variant and worker-process count, on the same server and in the same run:

1. a fresh database, the system's schema, all N jobs enqueued in one batch, then VACUUM ANALYZE
   (so no system starts on the planner's guesses about a table it has never seen: without it
   procrastinate's fetch runs at half speed). Not timed.
2. xact_commit + xact_rollback of that database in pg_stat_database is read; the script waits
   (at most 3 min) until other work leaves the CPUs idle (cpu_busy_before: the busy share seen).
3. P worker processes (this file with --worker) start, import, connect, then wait; when all
   are ready they are released at once, and each runs its system's run-until-the-queue-is-
   empty call and exits.
4. Once no client backend of the database is left, the counters are read again, every job is
   checked to have completed (and run exactly once), and the database is dropped.

The jobs:

- ours: one run of N items, one ModelStage each, ScriptedAdapter (zero latency) as the model,
  ModelLimits(rpm=10**7, tpm=10**10): every call books and reconciles in the rate ledger and the
  limits never bind. Dispatchers run `Dispatcher.run_until_idle()`. Each job is the whole
  claim -> reserve -> call -> reconcile -> complete path through the public API.
- pgqueuer: one entrypoint whose handler does nothing; `PgQueuer.run(mode=drain)`, one or more
  PgQueuer instances per process (one connection each, like its benchmark's dequeue tasks).
- procrastinate: one async task that does nothing; `App.run_worker_async(wait=False)`.

The measured span, the same for all: from the first job started (the earliest handler call, or
for ours the earliest JobClaimed event, in any worker) to the queue drained (the last worker's
drain call returned: it found no job left and every completion it made is committed; pgqueuer
flushes its buffered acks before it returns). jobs_per_s = N / span. wall_s runs from the
release to the last worker's exit: it adds what a drain call does before its first job
(pgqueuer checks its schema, procrastinate registers its worker) and interpreter shutdown.

transactions: the difference of the counters, so every transaction of the workers, setup and
teardown included (and autovacuum's few, should it run meanwhile). A PostgreSQL 15 backend
flushes its counters when it goes idle, at most once a second, and always when it exits
(pg_stat_force_next_flush() acts only on the calling session), so the second read waits until
no client backend of the database is left and clears its own stats snapshot first.

CPU: worker_cpu_s is the workers' own CPU time from the release to the drain's end (so
worker_cpu_ms_per_job is the client side's cost of a job); machine_cpu_busy is the busy share of
all CPUs from the release to the last exit (workers, PostgreSQL and anything else: 1.0 = every
core saturated), cpu_busy_before the same over the second before the release. Other work on
the machine shows as a high cpu_busy_before, or as machine_cpu_busy well above what the workers'
and PostgreSQL's share could be. peak_rss_mib is the largest peak RSS (VmHWM) of the workers.

Every system keeps its default durability (logged tables; the server's synchronous_commit) and
runs on plain asyncio. `--variants all` runs the whole settings grid (SWEEP). The default
variants are the fastest of it on the development machine (2 cores, shared by PostgreSQL and
the workers), plus each peer's documented defaults. For each peer, ours is compared with the
peer's fastest run over all variants and process counts ("best"), and with each variant's
fastest run ("by_variant").

Progress goes to stderr; the last line of stdout is a JSON object (with --json, the only line).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

MODEL = "noop-model"
NO_LIMIT = {"rpm": 10**7, "tpm": 10**10}  # high enough never to bind: bookings, no denials
READY, GO = "ready", "go"


def log(message: str) -> None:
    print(f"[throughput] {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Variant:
    system: str
    name: str
    settings: dict[str, Any]

    @property
    def label(self) -> str:
        return f"{self.system}[{self.name}]"


# --variants all runs the grid; DEFAULT names what a plain run uses (see the docstring)
SWEEP: dict[str, list[Variant]] = {
    "ours": [
        Variant("ours", f"c{c}-b{b}", {"concurrency": c, "claim_batch": b, "idle_poll_s": 0.1})
        for c, b in ((16, 4), (32, 16), (64, 32), (128, 64), (256, 128))
    ],
    "pgqueuer": [
        Variant("pgqueuer", f"{d}-q{q}-b{b}", {"driver": d, "queues": q, "batch_size": b})
        for d in ("asyncpg", "psycopg")
        for q, b in ((1, 10), (5, 10), (1, 50), (2, 50), (2, 100))
    ],
    "procrastinate": [
        *(Variant("procrastinate", f"c{c}", {"concurrency": c}) for c in (1, 10, 30)),
        # its documented production option: finished jobs deleted instead of kept
        Variant("procrastinate", "c10-delete", {"concurrency": 10, "delete_jobs": "successful"}),
    ],
}
DEFAULT: dict[str, list[str]] = {
    "ours": ["c32-b16", "c256-b128"],  # the dispatcher's defaults are c16-b32
    "pgqueuer": [
        "asyncpg-q1-b10",  # PgQueuer.run's defaults: one instance, batch_size 10
        "asyncpg-q5-b10",  # its benchmark's: 5 dequeue tasks of batch size 10
        "asyncpg-q2-b50",
        "asyncpg-q2-b100",  # the fastest in the sweep, with q2-b50
        "psycopg-q5-b10",
        "psycopg-q2-b50",  # the fastest with psycopg
    ],
    "procrastinate": ["c1", "c10", "c30"],  # c1: its benchmark's (the default concurrency)
}


# worker processes: one entry point per system --------------------------------------------------
class Tracker:
    """A worker's side of the measurement: the release, its first job, its jobs, the drain."""

    def __init__(self) -> None:
        self.first: float | None = None
        self.jobs = 0
        self._cpu0 = 0.0
        self._report: dict[str, Any] = {}

    def wait_for_go(self) -> None:
        print(READY, flush=True)
        if sys.stdin.readline().strip() != GO:
            raise SystemExit("driver went away")
        self._cpu0 = time.process_time()

    def started(self) -> None:
        if self.first is None:
            self.first = time.time()

    def finished(self) -> None:
        self.jobs += 1

    def drained(self) -> None:
        self._report = {
            "drained_at": time.time(),
            "cpu_s": time.process_time() - self._cpu0,
            "first_start": self.first,
            "jobs": self.jobs,
        }

    def report(self, **extra: Any) -> dict[str, Any]:
        return {**self._report, **extra}


def ours_pipeline() -> Any:
    from llm_batch_queue import ModelStage, Pipeline, Prompt

    return Pipeline("throughput", (ModelStage("noop", (MODEL,), lambda ctx: Prompt("no-op")),))


def worker_ours(dsn: str, settings: dict[str, Any]) -> dict[str, Any]:
    import anyio

    from llm_batch_queue import Dispatcher, DispatcherSettings, ModelLimits, events
    from llm_batch_queue.adapters.scripted import ScriptedAdapter
    from llm_batch_queue.store.sql import open_store

    tracker = Tracker()

    def on_event(event: object) -> None:
        tracker.started()
        if isinstance(event, events.CallSucceeded):
            tracker.finished()

    store = open_store(dsn)
    adapter = ScriptedAdapter()
    dispatcher = Dispatcher(
        store,
        ours_pipeline(),
        adapter,
        limits={MODEL: ModelLimits(**NO_LIMIT)},
        settings=DispatcherSettings(**settings),
        on_event=on_event,
    )
    tracker.wait_for_go()
    stats = anyio.run(dispatcher.run_until_idle)
    tracker.drained()
    store.close()
    counts = {k: getattr(stats, k) for k in ("claimed", "succeeded", "deferred")}
    return tracker.report(dispatch_stats=counts)


async def pgqueuer_driver(dsn: str, driver: str) -> Any:
    from pgqueuer import AsyncpgDriver, PsycopgDriver

    if driver == "asyncpg":
        import asyncpg

        return AsyncpgDriver(await asyncpg.connect(dsn))
    import psycopg

    return PsycopgDriver(await psycopg.AsyncConnection.connect(dsn, autocommit=True))


def worker_pgqueuer(dsn: str, settings: dict[str, Any]) -> dict[str, Any]:
    import logging

    from pgqueuer import PgQueuer
    from pgqueuer.types import QueueExecutionMode

    logging.getLogger("pgqueuer").setLevel(logging.WARNING)
    tracker = Tracker()

    async def noop(job: Any) -> None:
        tracker.started()
        tracker.finished()

    async def work() -> None:
        pgqs = []
        for _ in range(settings["queues"]):  # like its benchmark's dequeue tasks
            pgq = PgQueuer(await pgqueuer_driver(dsn, settings["driver"]))
            pgq.entrypoint("noop")(noop)
            pgqs.append(pgq)
        await asyncio.to_thread(tracker.wait_for_go)
        mode = QueueExecutionMode.drain
        await asyncio.gather(
            *(pgq.run(batch_size=settings["batch_size"], mode=mode) for pgq in pgqs)
        )
        tracker.drained()

    asyncio.run(work())
    return tracker.report()


def procrastinate_app(dsn: str, pool_size: int, body: Callable[[], None]) -> tuple[Any, Any]:
    import logging

    from procrastinate import App, PsycopgConnector

    logging.getLogger("procrastinate").setLevel(logging.ERROR)  # not "App in __main__"
    app = App(connector=PsycopgConnector(conninfo=dsn, min_size=pool_size, max_size=pool_size))

    @app.task(name="noop")
    async def noop() -> None:
        body()

    return app, noop


def worker_procrastinate(dsn: str, settings: dict[str, Any]) -> dict[str, Any]:
    concurrency = settings["concurrency"]
    tracker = Tracker()

    def body() -> None:
        tracker.started()
        tracker.finished()

    app, _ = procrastinate_app(dsn, concurrency + 1, body)  # a fetch beside finishing jobs

    async def work() -> None:
        async with app.open_async():
            await app.connector.pool.wait()  # every connection open before the release
            await asyncio.to_thread(tracker.wait_for_go)
            await app.run_worker_async(
                concurrency=concurrency,
                wait=False,
                install_signal_handlers=False,
                delete_jobs=settings.get("delete_jobs", "never"),
            )
            tracker.drained()

    asyncio.run(work())
    return tracker.report()


WORKERS: dict[str, Callable[[str, dict[str, Any]], dict[str, Any]]] = {
    "ours": worker_ours,
    "pgqueuer": worker_pgqueuer,
    "procrastinate": worker_procrastinate,
}


def peak_rss_kib() -> int:
    """This process's peak RSS. Not ru_maxrss: a child spawned by vfork+exec starts with its
    parent's (the driver holds all the enqueued jobs by then); VmHWM starts afresh at exec."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def worker_main(system: str, dsn: str, spec: str) -> None:
    result = WORKERS[system](dsn, json.loads(spec))
    result["peak_rss_kib"] = peak_rss_kib()
    print(json.dumps(result), flush=True)


# enqueueing (not timed) and checking afterwards, per system -------------------------------------
def enqueue_ours(dsn: str, n: int) -> None:
    from llm_batch_queue import NewItem
    from llm_batch_queue.store.sql import open_store

    store = open_store(dsn)
    p = ours_pipeline()
    store.create_run(
        pipeline=p.name,
        name="throughput",
        stages=p.specs,
        items=[NewItem(str(i), {}) for i in range(n)],
        meta={},
        now=time.time(),
    )
    store.close()


def enqueue_pgqueuer(dsn: str, n: int) -> None:
    from pgqueuer import Queries

    async def go() -> None:
        queries = Queries(await pgqueuer_driver(dsn, "asyncpg"))
        await queries.install()
        await queries.enqueue(["noop"] * n, [None] * n, [0] * n)

    asyncio.run(go())


def enqueue_procrastinate(dsn: str, n: int) -> None:
    async def go() -> None:
        app, noop = procrastinate_app(dsn, 1, lambda: None)
        async with app.open_async():
            await app.schema_manager.apply_schema_async()
            await noop.batch_defer_async(*({} for _ in range(n)))

    asyncio.run(go())


def check_ours(server: Server, db: str) -> tuple[int, dict[str, Any]]:
    """Jobs not succeeded (public API), and the rate ledger's bookings if its table is there."""
    from llm_batch_queue.store.sql import open_store

    store = open_store(server.dsn(db), migrate=False)
    try:
        (run,) = store.list_runs()
        counts = store.counts(run.id)
    finally:
        store.close()
    left = sum(n for (_, status), n in counts.jobs_by_stage_status.items() if status != "succeeded")
    try:  # internals: reported when present, never required
        booked, reconciled = server.row(
            db, "SELECT count(*), count(*) FILTER (WHERE NOT open) FROM lbq_rate_ledger"
        )
        ledger: dict[str, int] | None = {"bookings": booked, "reconciled": reconciled}
    except Exception:
        ledger = None
    return left, {"run_status": run.status.value, "ledger": ledger}


def check_pgqueuer(server: Server, db: str) -> tuple[int, dict[str, Any]]:
    (left,) = server.row(db, "SELECT count(*) FROM pgqueuer")  # finished jobs leave the queue
    return left, {}


def check_procrastinate(server: Server, db: str) -> tuple[int, dict[str, Any]]:
    (left,) = server.row(db, "SELECT count(*) FROM procrastinate_jobs WHERE status <> 'succeeded'")
    return left, {}


ENQUEUE = {
    "ours": enqueue_ours,
    "pgqueuer": enqueue_pgqueuer,
    "procrastinate": enqueue_procrastinate,
}
CHECK = {"ours": check_ours, "pgqueuer": check_pgqueuer, "procrastinate": check_procrastinate}


# the driver ------------------------------------------------------------------------------------
class Server:
    """The PostgreSQL server: databases to create and drop, and their transaction counters."""

    def __init__(self, url: str) -> None:
        import psycopg
        from sqlalchemy.engine import make_url

        self._url = make_url(url).set(drivername="postgresql")
        self.admin = psycopg.connect(self.dsn(self._url.database or "postgres"), autocommit=True)
        self.version = self._scalar("SHOW server_version")

    def _scalar(self, sql: str, *params: Any) -> Any:
        row = self.admin.execute(sql, params or None).fetchone()
        assert row is not None
        return row[0]

    def dsn(self, database: str) -> str:
        return self._url.set(database=database).render_as_string(hide_password=False)

    def create(self) -> str:
        db = f"lbq_tput_{uuid.uuid4().hex[:12]}"
        self.admin.execute(f'CREATE DATABASE "{db}"')
        return db

    def drop(self, db: str) -> None:
        self.admin.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')

    def quiet(self, db: str, timeout_s: float = 30.0) -> None:
        """Wait until no client is connected to `db`: their counters are flushed by then."""
        deadline = time.time() + timeout_s
        while self._scalar(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE datname = %s AND backend_type = 'client backend'",
            db,
        ):
            if time.time() > deadline:
                raise RuntimeError(f"clients still connected to {db} after {timeout_s} s")
            time.sleep(0.05)

    def transactions(self, db: str) -> int:
        self.quiet(db)
        self.admin.execute("SELECT pg_stat_clear_snapshot()")
        return int(
            self._scalar(
                "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = %s", db
            )
        )

    def execute(self, db: str, sql: str) -> None:
        import psycopg

        with psycopg.connect(self.dsn(db), autocommit=True) as conn:
            conn.execute(sql)

    def row(self, db: str, sql: str) -> tuple[Any, ...]:
        import psycopg

        with psycopg.connect(self.dsn(db), autocommit=True) as conn:
            row = conn.execute(sql).fetchone()
        assert row is not None
        return tuple(row)


def cpu_times() -> tuple[int, int] | None:
    """All CPUs' (total, idle + iowait) jiffies so far (Linux /proc/stat), or None."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except OSError:
        return None
    return sum(fields), fields[3] + fields[4]


def busy_share(since: tuple[int, int] | None, until: tuple[int, int] | None) -> float | None:
    """The machine's non-idle share of all CPU time between two cpu_times() readings, 0..1."""
    if since is None or until is None:
        return None
    return 1 - (until[1] - since[1]) / max(1, until[0] - since[0])


def cpu_busy(sample_s: float = 1.0) -> float | None:
    start = cpu_times()
    time.sleep(sample_s)
    return busy_share(start, cpu_times())


def wait_quiet(label: str, busy_max: float = 0.1, patience_s: float = 180.0) -> float | None:
    """Wait (at most patience_s) until other work leaves the CPUs idle; the busy share seen."""
    deadline = time.time() + patience_s
    while (busy := cpu_busy()) is not None and busy > busy_max and time.time() < deadline:
        log(f"{label}: the machine is {busy:.0%} busy with other work; waiting")
    return busy


def spawn_workers(variant: Variant, dsn: str, processes: int) -> list[subprocess.Popen[str]]:
    spec = json.dumps(variant.settings)
    workers = [
        subprocess.Popen(
            [sys.executable, __file__, "--worker", variant.system, dsn, spec],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(processes)
    ]
    for w in workers:
        assert w.stdout is not None
        if (line := w.stdout.readline().strip()) != READY:
            raise RuntimeError(f"{variant.label}: a worker did not get ready ({line!r})")
    return workers


def release(workers: list[subprocess.Popen[str]]) -> float:
    released = time.time()
    for w in workers:
        assert w.stdin is not None
        w.stdin.write(GO + "\n")
        w.stdin.flush()
    return released


def run_config(server: Server, variant: Variant, processes: int, n: int) -> dict[str, Any]:
    """One burn-down in a fresh database: enqueue, drain with `processes` workers, check."""
    label = f"{variant.label}/{processes}p"
    db = server.create()
    dsn = server.dsn(db)
    workers: list[subprocess.Popen[str]] = []
    try:
        started = time.time()
        ENQUEUE[variant.system](dsn, n)
        log(f"{label}: {n} jobs enqueued in {time.time() - started:.1f} s; {variant.settings}")
        server.execute(db, "VACUUM ANALYZE")  # no system starts on the planner's guesses
        before = server.transactions(db)
        busy = wait_quiet(label)
        workers = spawn_workers(variant, dsn, processes)
        released, cpu_at_release = release(workers), cpu_times()
        outs = [w.communicate(timeout=3600)[0] for w in workers]
        exited, busy_during = time.time(), busy_share(cpu_at_release, cpu_times())
        if codes := [w.returncode for w in workers if w.returncode]:
            raise RuntimeError(f"{label}: a worker failed (exit codes {codes})")
        reports = [json.loads(out.strip().splitlines()[-1]) for out in outs]
        xacts = server.transactions(db) - before
        left_over, extra = CHECK[variant.system](server, db)
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
                w.communicate()
        server.drop(db)
    if left_over or (ran := sum(r["jobs"] for r in reports)) != n:
        raise RuntimeError(f"{label}: handlers ran {ran} of {n} jobs, {left_over} not completed")
    first = min(r["first_start"] for r in reports if r["first_start"] is not None)
    span = max(r["drained_at"] for r in reports) - first
    result = {
        "label": label,
        "system": variant.system,
        "variant": variant.name,
        "settings": variant.settings,
        "processes": processes,
        "jobs": n,
        "jobs_per_s": round(n / span, 1),
        "span_s": round(span, 3),
        "wall_s": round(exited - released, 3),
        "first_job_after_release_s": round(first - released, 3),
        "transactions": xacts,
        "transactions_per_job": round(xacts / n, 3),
        "peak_rss_mib": round(max(r["peak_rss_kib"] for r in reports) / 1024, 1),
        "worker_cpu_s": round(sum(r["cpu_s"] for r in reports), 2),
        "worker_cpu_ms_per_job": round(1000 * sum(r["cpu_s"] for r in reports) / n, 3),
        "machine_cpu_busy": rounded(busy_during),
        "cpu_busy_before": rounded(busy),
        "jobs_per_process": [r["jobs"] for r in reports],
        **summed_stats(reports),
        **extra,
    }
    log(f"{label}: {json.dumps(result)}")
    return result


def rounded(share: float | None) -> float | None:
    return None if share is None else round(share, 3)


def summed_stats(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """Ours: the dispatchers' own counts, summed (deferred > 0 would mean a limit bound)."""
    stats = [r["dispatch_stats"] for r in reports if "dispatch_stats" in r]
    if not stats:
        return {}
    return {"dispatch_stats": {k: sum(s[k] for s in stats) for k in stats[0]}}


def fastest(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return max(runs, key=lambda r: r["jobs_per_s"])


def compare(runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Ours (its fastest run per process count) against each peer's fastest run over all its
    variants and process counts, and against the fastest run of each peer variant."""
    ours_runs = [r for r in runs.values() if r["system"] == "ours"]
    ours = {
        p: fastest([r for r in ours_runs if r["processes"] == p])
        for p in sorted({r["processes"] for r in ours_runs})
    }

    def ratios(peer: dict[str, Any]) -> dict[str, float]:
        return {
            f"ours_{p}p": round(r["jobs_per_s"] / peer["jobs_per_s"], 4) for p, r in ours.items()
        }

    out: dict[str, Any] = {"ours": {f"{p}p": r["label"] for p, r in ours.items()}}
    for peer in ("pgqueuer", "procrastinate"):
        peer_runs = [r for r in runs.values() if r["system"] == peer]
        if not peer_runs:
            continue
        best = fastest(peer_runs)
        by_variant = {}
        for name in dict.fromkeys(r["variant"] for r in peer_runs):
            top = fastest([r for r in peer_runs if r["variant"] == name])
            by_variant[name] = {
                "processes": top["processes"],
                "jobs_per_s": top["jobs_per_s"],
                "ratio": ratios(top),
            }
        out[peer] = {
            "best": best["label"],
            "best_settings": best["settings"],
            "best_jobs_per_s": best["jobs_per_s"],
            "ratio": ratios(best),
            "by_variant": by_variant,
        }
    return out


def chosen(variant: Variant, spec: str) -> bool:
    if spec == "all":
        return True
    names = DEFAULT[variant.system] if spec == "default" else spec.split(",")
    return variant.name in names


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker_main(*sys.argv[2:5])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print only the JSON summary")
    parser.add_argument("--jobs", type=int, default=20_000, help="jobs per configuration")
    parser.add_argument("--processes", default="1,2", help="comma-separated worker counts")
    parser.add_argument("--systems", default="ours,pgqueuer,procrastinate", help=", ".join(SWEEP))
    parser.add_argument(
        "--variants",
        default="default",
        help="settings variants: 'default' (the best found), 'all' (the sweep) or names",
    )
    parser.add_argument(
        "--pg",
        default=os.environ.get(
            "LBQ_BENCH_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
        ),
        help="a server where a database per configuration may be created and dropped",
    )
    args = parser.parse_args()
    processes = [int(p) for p in args.processes.split(",")]
    systems = args.systems.split(",")
    if unknown := set(systems) - set(SWEEP):
        parser.error(f"unknown system(s): {', '.join(sorted(unknown))}")
    server = Server(args.pg)
    runs: dict[str, dict[str, Any]] = {}
    for system in systems:
        variants = [v for v in SWEEP[system] if chosen(v, args.variants)]
        for variant in variants:
            for p in processes:
                runs[f"{variant.label}/{p}p"] = run_config(server, variant, p, args.jobs)
    summary = {
        "jobs": args.jobs,
        "postgresql": server.version,
        "cpus": os.cpu_count(),
        "runs": runs,
        "comparison": compare(runs),
    }
    if not args.json:
        for label, r in runs.items():
            print(
                f"{label:42} {r['jobs_per_s']:>9.1f} jobs/s  {r['span_s']:>8.2f} s"
                f"  {r['transactions_per_job']:>6.3f} xact/job  {r['peak_rss_mib']:>6.1f} MiB"
            )
        for peer, c in summary["comparison"].items():
            if peer != "ours":
                ratios = ", ".join(f"{k} {v}" for k, v in c["ratio"].items())
                print(f"vs {peer} (best: {c['best']}, {c['best_jobs_per_s']} jobs/s): {ratios}")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
