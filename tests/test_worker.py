"""Worker processes (`llm-batch-queue worker`) on a real PostgreSQL: woken by NOTIFY, stopped by
signals without losing or repeating work, and carrying on through dropped connections."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import anyio
import pytest
from _worker_app import PIPELINE, app
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url

from llm_batch_queue import JobStatus, NewItem, RunStatus
from llm_batch_queue.cli import main as cli_main
from llm_batch_queue.store.sql import SQLStore, open_store
from llm_batch_queue.worker import serve

pytestmark = pytest.mark.postgres
TESTS = Path(__file__).parent


def _env(effects: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("GEMINI_API_KEY", "GOOGLE_API_KEY")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS), env.get("PYTHONPATH")]))
    env["LBQ_TEST_EFFECTS"] = str(effects)
    env.update(extra)
    return env


@pytest.fixture
def worker(pg_url: str, tmp_path: Path) -> Iterator[Callable[..., subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []

    def start(**extra: str) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [sys.executable, "-m", "llm_batch_queue.cli", "worker", "--app", "_worker_app:app",
             "--db", pg_url, "--json", "--grace", "20"],
            env=_env(tmp_path / "effects.txt", **extra), stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=30)


def _create(store: SQLStore, keys: list[str]) -> str:
    items = [NewItem(k, k) for k in keys]
    run = store.create_run(
        pipeline=PIPELINE.name,
        name="t",
        stages=PIPELINE.specs,
        items=items,
        meta={},
        now=time.time(),
    )
    return run.id


def _wait_for(check: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _listening(pg_url: str) -> bool:
    engine = create_engine(pg_url)
    try:
        with engine.connect() as conn:
            n = conn.execute(
                text("SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'LISTEN%'"
                     " AND datname = current_database()")
            ).scalar_one()  # fmt: skip
        return bool(n)
    finally:
        engine.dispose()


def _effects(tmp_path: Path) -> list[str]:
    path = tmp_path / "effects.txt"
    return path.read_text().split() if path.exists() else []


def test_an_idle_worker_is_woken_by_new_work(
    pg_url: str, tmp_path: Path, worker: Callable[..., subprocess.Popen[str]]
) -> None:
    """It polls once an hour: finishing a run created after it went idle means NOTIFY woke it."""
    store = SQLStore(pg_url)
    proc = worker(LBQ_TEST_POLL_S="3600")
    _wait_for(lambda: _listening(pg_url), 30, "the worker to LISTEN")
    time.sleep(0.5)  # let it find the queue empty and go to sleep
    run_id = _create(store, ["a", "b", "c"])
    _wait_for(lambda: store.get_run(run_id).status is RunStatus.COMPLETED, 30, "the run")
    proc.send_signal(signal.SIGTERM)
    _out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert sorted(_effects(tmp_path)) == ["a", "b", "c"]
    store.close()


def test_sigterm_lets_the_jobs_in_flight_finish_and_claims_nothing_more(
    pg_url: str, tmp_path: Path, worker: Callable[..., subprocess.Popen[str]]
) -> None:
    store = SQLStore(pg_url)
    run_id = _create(store, ["a", "b", "c", "d"])
    proc = worker(LBQ_TEST_LATENCY_S="2")
    running = lambda: sum(j.status is JobStatus.RUNNING for j in store.jobs(run_id)) == 4  # noqa: E731
    _wait_for(running, 30, "four calls in flight")
    proc.send_signal(signal.SIGTERM)
    _out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    by_stage = {(j.stage, j.status) for j in store.jobs(run_id)}
    # the calls in flight finished; their dependents were left for the next worker
    assert by_stage == {("ask", JobStatus.SUCCEEDED), ("record", JobStatus.READY)}
    assert _effects(tmp_path) == []
    store.close()


@pytest.mark.parametrize("more", [0, 3])
def test_a_second_signal_hands_the_jobs_in_flight_back_at_once(
    pg_url: str, tmp_path: Path, worker: Callable[..., subprocess.Popen[str]], more: int
) -> None:
    store = SQLStore(pg_url)
    run_id = _create(store, ["a", "b"])
    proc = worker(LBQ_TEST_LATENCY_S="60")
    running = lambda: sum(j.status is JobStatus.RUNNING for j in store.jobs(run_id)) == 2  # noqa: E731
    _wait_for(running, 30, "two calls in flight")
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    for _ in range(1 + more):  # more: Ctrl-C pressed again and again, which hung it
        proc.send_signal(signal.SIGINT)
        time.sleep(0.001)
    _out, err = proc.communicate(timeout=20)  # well before the 60-s calls would have finished
    assert proc.returncode == 0, err
    asks = [j for j in store.jobs(run_id) if j.stage == "ask"]
    assert all(j.status is JobStatus.READY and j.attempts == 0 for j in asks)
    assert {j.last_error for j in asks} == {"dispatcher stopped"}
    assert store.attempts(run_id) == []  # handed back unrun: nothing recorded, no retry spent
    store.close()


@pytest.mark.parametrize("burst", [1, 4])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_a_one_shot_dispatch_and_hands_its_jobs_back(
    pg_url: str, tmp_path: Path, sig: signal.Signals, burst: int
) -> None:
    """`dispatch` (cron) died of SIGTERM on the spot, its jobs leased for a minute, and printed a
    KeyboardInterrupt traceback on Ctrl-C (new user's trial): it now stops as `run` does. A
    burst of signals (Ctrl-C pressed again and again) hung it, or left a traceback and its jobs
    leased (adversarial trial): the later ones are taken and ignored."""
    store = SQLStore(pg_url)
    run_id = _create(store, ["a", "b"])
    proc = subprocess.Popen(
        [sys.executable, "-m", "llm_batch_queue.cli", "dispatch", "--app", "_worker_app:app",
         "--db", pg_url, "--json"],
        env=_env(tmp_path / "effects.txt", LBQ_TEST_LATENCY_S="60"), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        running = lambda: sum(j.status is JobStatus.RUNNING for j in store.jobs(run_id)) == 2  # noqa: E731
        _wait_for(running, 30, "two calls in flight")
        for _ in range(burst):
            proc.send_signal(sig)
            time.sleep(0.001)
        out, err = proc.communicate(timeout=20)  # well before the 60-s calls would end
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert "dispatch: interrupted, jobs in flight handed back" in err
    assert '"claimed": 2' in out
    asks = [j for j in store.jobs(run_id) if j.stage == "ask"]
    assert all(j.status is JobStatus.READY and j.attempts == 0 for j in asks)
    store.close()


def test_the_dispatcher_carries_on_through_dropped_database_connections(
    pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every connection of the test's database is killed again and again mid-run (what a
    PostgreSQL restart does to its clients): the run completes, each side effect happens once."""
    monkeypatch.setenv("LBQ_TEST_EFFECTS", str(tmp_path / "effects.txt"))
    monkeypatch.setenv("LBQ_TEST_LATENCY_S", "0.15")  # long enough for several kills
    store = open_store(pg_url)
    assert isinstance(store, SQLStore)
    keys = [f"k{i:02d}" for i in range(40)]
    run_id = _create(store, keys)
    admin = create_engine(make_url(pg_url).set(database="postgres"), isolation_level="AUTOCOMMIT")
    database = make_url(pg_url).database
    kills = 0

    async def killer(stop: anyio.Event) -> None:
        nonlocal kills
        while not stop.is_set() and kills < 8:
            await anyio.sleep(0.4)
            with admin.connect() as conn:
                conn.execute(
                    text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                         " WHERE datname = :db AND pid <> pg_backend_pid()"),
                    {"db": database},
                )  # fmt: skip
            kills += 1

    async def main() -> None:
        stop = anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(killer, stop)

            async def until_done() -> None:
                while store.get_run(run_id).status is RunStatus.RUNNING:
                    await anyio.sleep(0.1)
                stop.set()

            tg.start_soon(until_done)
            with anyio.fail_after(120):
                await serve(store, app(store), stop=stop, handle_signals=False)

    anyio.run(main)
    assert kills >= 3
    assert store.get_run(run_id).status is RunStatus.COMPLETED
    assert sorted(_effects(tmp_path)) == keys  # every item's side effect exactly once
    assert {j.status for j in store.jobs(run_id)} == {JobStatus.SUCCEEDED}
    store.close()
    admin.dispose()


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no_colon", "must look like pkg.module:factory"),
        ("no_such_module_xyz:app", "cannot import 'no_such_module_xyz'"),
        ("_worker_app:nothing", "has no 'nothing'"),
        ("_worker_app:PIPELINE", "'PIPELINE' is neither a WorkerApp nor a factory"),
        ("_worker_app:not_an_app", "returned str, not a WorkerApp"),
    ],
)
def test_a_bad_app_is_named_and_exits_2(
    spec: str, message: str, sqlite_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli_main(["dispatch", "--app", spec, "--db", sqlite_url])
    assert code == 2
    assert message in capsys.readouterr().err


def test_the_console_script_imports_the_app_from_the_working_directory(tmp_path: Path) -> None:
    # a user's own package beside them, no PYTHONPATH: as with `python -m` or uvicorn
    package = tmp_path / "mypkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "jobs.py").write_text((Path(__file__).parent / "_worker_app.py").read_text())
    db = f"sqlite:///{tmp_path / 'q.db'}"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["LBQ_TEST_EFFECTS"] = str(tmp_path / "effects.txt")
    script = Path(sys.executable).parent / "llm-batch-queue"
    store = open_store(db)
    store.create_run(
        pipeline=PIPELINE.name, name="r", stages=PIPELINE.specs,
        items=[NewItem("a", 1)], meta={}, now=time.time(),
    )  # fmt: skip
    store.close()
    done = subprocess.run(
        [str(script), "dispatch", "--app", "mypkg.jobs:app", "--db", db],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "effects.txt").read_text() == "a\n"


def test_the_cli_names_a_database_it_cannot_use_and_one_it_sets_up(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for bad in ("bogus://x", "postgresql+psycopg://postgres@127.0.0.1:1/nothing"):
        assert cli_main(["migrate", "--db", bad]) == 2
        assert f"error: cannot use the database {bad}" in capsys.readouterr().err
    new = tmp_path / "mistyped.db"
    assert cli_main(["migrate", "--db", str(new)]) == 0
    assert "no queue there yet: creating its tables" in capsys.readouterr().err
    assert cli_main(["migrate", "--db", str(new)]) == 0
    assert "no queue there yet" not in capsys.readouterr().err


@pytest.mark.parametrize(
    "flag", [["--time-budget", "-5"], ["--max-jobs", "0"], ["--concurrency", "0"]]
)
def test_the_cli_refuses_a_limit_that_is_not_positive(
    flag: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        cli_main(["dispatch", "--app", "pkg.mod:factory", "--db", "sqlite://", *flag])
    assert exited.value.code == 2
    assert f"{flag[0]} must be positive" in capsys.readouterr().err


def test_a_dispatch_that_finds_only_a_dead_workers_jobs_says_when_they_are_taken_over(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LBQ_TEST_EFFECTS", str(tmp_path / "effects.txt"))
    db = f"sqlite:///{tmp_path / 'q.db'}"
    store = open_store(db)
    _create(store, ["a"])
    (dead,) = store.claim(worker="crashed", now=time.time(), limit=1, lease_s=60)
    store.close()
    assert cli_main(["dispatch", "--app", "_worker_app:app", "--db", db, "--json"]) == 0
    out = capsys.readouterr()
    assert '"claimed": 0' in out.out
    assert "waiting: 1 job running under other workers' leases" in out.err
    at = time.strftime("%H:%M:%S", time.localtime(dead.lease.expires_at))
    assert f"the first ending at {at} (in " in out.err
    assert "so this dispatch ends: a later one takes them over" in out.err  # it does not wait


def test_a_worker_started_before_its_database_is_up_waits_for_it(
    pg_admin: Engine, tmp_path: Path
) -> None:
    """It exited at once ("cannot use the database …"): a worker restarted while PostgreSQL
    restarted stayed down (the chaos bench). Here the database comes into being a moment
    after the worker starts; the worker says it waits, then serves it."""
    import uuid

    from sqlalchemy.engine import make_url

    name = f"lbq_test_{uuid.uuid4().hex}"
    url = make_url(pg_admin.url).set(database=name).render_as_string(hide_password=False)
    proc = subprocess.Popen(
        [sys.executable, "-m", "llm_batch_queue.cli", "worker", "--app", "_worker_app:app",
         "--db", url],
        env=_env(tmp_path / "effects.txt"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        time.sleep(1.5)  # it tries, fails, says so and sleeps
        assert proc.poll() is None
        with pg_admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
        _wait_for(lambda: _listening(url), 30, "the worker to serve the new database")
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert "database not reachable yet, retrying:" in err
        assert f'database "{name}" does not exist' in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=30)
        with pg_admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_a_worker_whose_database_never_comes_says_why_and_exits(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import llm_batch_queue.cli as cli

    monkeypatch.setattr(cli, "WORKER_DB_WAIT_S", 1.0)
    nowhere = "postgresql+psycopg://postgres@127.0.0.1:1/none"  # nothing listens on port 1
    assert cli_main(["worker", "--app", "_worker_app:app", "--db", nowhere]) == 2
    err = capsys.readouterr().err
    assert "database not reachable yet, retrying:" in err
    assert "error: cannot use the database" in err
