"""`llm-batch-queue`: run workers, one-shot dispatches (cron) and migrations from the shell.

    llm-batch-queue worker   --app pkg.module:factory --db URL [--concurrency N] [--grace S]
    llm-batch-queue dispatch --app pkg.module:factory --db URL [--time-budget S] [--max-jobs N]
    llm-batch-queue migrate  --db URL

`factory` is called with the opened Store and returns a `WorkerApp` (worker.py): the pipeline,
adapters, limits and outbox. `--db` defaults to the LBQ_DATABASE_URL environment variable.
On PostgreSQL a worker also listens for new work (LISTEN/NOTIFY) instead of waiting for its next
poll. Exit codes: 0 done, 2 bad arguments or configuration, 130 stopped by a signal mid-dispatch.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace

import anyio

from llm_batch_queue import events
from llm_batch_queue._imports import load_attribute
from llm_batch_queue.dispatch import DispatcherSettings, DispatchStats
from llm_batch_queue.errors import ConfigError
from llm_batch_queue.store.base import Store
from llm_batch_queue.worker import AppFactory, Wakeups, WorkerApp, serve, stoppable


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llm-batch-queue", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    worker = sub.add_parser("worker", help="run until SIGTERM/SIGINT")
    dispatch = sub.add_parser("dispatch", help="run what is due now, then exit (for cron)")
    migrate = sub.add_parser("migrate", help="bring the database schema to the newest revision")
    for p in (worker, dispatch, migrate):
        p.add_argument(
            "--db",
            default=os.environ.get("LBQ_DATABASE_URL"),
            help="database URL, or a SQLite file's path (default: $LBQ_DATABASE_URL)",
        )
    for p in (worker, dispatch):
        p.add_argument("--app", required=True, help="module:attribute of a WorkerApp factory")
        p.add_argument("--concurrency", type=int, help="jobs in flight at once")
        p.add_argument("--json", action="store_true", help="print the stats as JSON at the end")
    worker.add_argument(
        "--grace", type=float, default=30.0, help="seconds to let jobs finish after SIGTERM"
    )
    dispatch.add_argument("--time-budget", type=float, help="start no job after this many s")
    dispatch.add_argument("--max-jobs", type=int, help="start at most this many jobs")
    args = parser.parse_args(argv)
    if not args.db:
        parser.error("--db is required (or set LBQ_DATABASE_URL)")
    for name in ("concurrency", "time_budget", "max_jobs", "grace"):
        value = getattr(args, name, None)
        if value is not None and not value > 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {value}")
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError, OperationalError

    try:
        return _run(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (ArgumentError, NoSuchModuleError, OperationalError) as exc:
        print(f"error: cannot use the database {args.db}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # before the dispatcher ran (importing, opening the store)
        print(f"{args.command}: interrupted before it started", file=sys.stderr)
        return 130


def _run(args: argparse.Namespace) -> int:
    from llm_batch_queue.store.sql import holds_queue, open_store

    if args.command == "worker":
        wait_for_database(args.db)
    if not holds_queue(args.db):  # most often a mistyped --db: say what is being set up
        print(f"{args.db}: no queue there yet: creating its tables", file=sys.stderr)
    store = open_store(args.db)
    stopped = False  # by a signal (dispatch)
    try:
        if args.command == "migrate":
            print(f"{args.db}: schema at the newest revision", file=sys.stderr)
            return 0
        app = _noting_leases(_with_concurrency(load_app(args.app)(store), args.concurrency))
        if args.command == "worker":
            stats = anyio.run(
                lambda: serve(store, app, wakeups=wakeups_for(store), grace_s=args.grace)
            )
        else:
            stats, stopped = anyio.run(lambda: _once(store, app, args.time_budget, args.max_jobs))
    finally:
        store.close()
    summary = asdict(stats)
    if args.command == "dispatch" and stopped:
        print(f"dispatch: interrupted, jobs in flight handed back: {summary}", file=sys.stderr)
    else:
        print(f"{args.command}: {summary}", file=sys.stderr)
    if args.json:
        print(json.dumps(summary))
    return 130 if args.command == "dispatch" and stopped else 0


async def _once(
    store: Store, app: WorkerApp, time_budget_s: float | None, max_jobs: int | None
) -> tuple[DispatchStats, bool]:
    """run_once, stopped by SIGINT/SIGTERM (True then) like a worker, not killed mid-job."""
    dispatcher = app.dispatcher(store)

    async def work() -> None:
        await dispatcher.run_once(time_budget_s=time_budget_s, max_jobs=max_jobs)

    try:
        stopped = await stoppable(work)
    finally:
        if app.close is not None:
            with anyio.CancelScope(shield=True):
                await app.close()
    return dispatcher.stats, stopped


def wait_for_database(url: str) -> None:
    """A worker started while its database is down waits for it (up to WORKER_DB_WAIT_S) and
    says so, instead of exiting: supervisors start workers at boot, and restarts happen."""
    from llm_batch_queue.store.sql.engine import wait_until_reachable

    def say(exc: Exception) -> None:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"database not reachable yet, retrying: {first}", file=sys.stderr, flush=True)

    wait_until_reachable(url, WORKER_DB_WAIT_S, say)


WORKER_DB_WAIT_S = 120.0


def load_app(spec: str) -> AppFactory:
    """`pkg.module:attribute` -> the factory (or a WorkerApp, wrapped as one)."""
    found = load_attribute(spec, "--app", "factory")
    if isinstance(found, WorkerApp):
        return lambda _store: found
    if not callable(found):
        what = spec.partition(":")[2]
        raise ConfigError(f"--app {spec}: {what!r} is neither a WorkerApp nor a factory")

    def build(store: Store) -> WorkerApp:
        app = found(store)
        if not isinstance(app, WorkerApp):
            raise ConfigError(f"--app {spec} returned {type(app).__name__}, not a WorkerApp")
        return app

    return build


def wakeups_for(store: Store) -> Wakeups | None:
    """LISTEN for new work on PostgreSQL; None elsewhere (workers poll)."""
    from llm_batch_queue.store.sql import SQLStore
    from llm_batch_queue.store.sql.wakeups import listen

    if not isinstance(store, SQLStore) or store.engine.dialect.name != "postgresql":
        return None
    url = store.engine.url

    async def run(wake: Callable[[], None]) -> None:
        await listen(url, lambda _pipeline: wake())

    return run


def _noting_leases(app: WorkerApp) -> WorkerApp:
    """Print WaitingForLeases on stderr, then pass every event on to the app's own sink: a
    dispatch after a crash otherwise finds nothing to do and says nothing of why."""
    sink = app.on_event

    def on_event(event: events.Event) -> None:
        if isinstance(event, events.WaitingForLeases):
            print(f"waiting: {event.explain(time.time())}", file=sys.stderr, flush=True)
        if sink is not None:
            sink(event)

    return replace(app, on_event=on_event)


def _with_concurrency(app: WorkerApp, concurrency: int | None) -> WorkerApp:
    if concurrency is None:
        return app
    settings = replace(app.settings or DispatcherSettings(), concurrency=concurrency)
    return replace(app, settings=settings)


if __name__ == "__main__":
    raise SystemExit(main())
