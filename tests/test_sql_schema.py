"""The SQL store's schema: migrations match tables.py, run once, and coexist with an app's own."""

from __future__ import annotations

import subprocess
import sys
import threading
from importlib import resources
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Connection, Engine, inspect, text

from llm_batch_queue.limits import Deny, ModelLimits, window_slot
from llm_batch_queue.store import MemoryStore
from llm_batch_queue.store.sql import SQLStore, make_engine, open_store, upgrade
from llm_batch_queue.store.sql.schema import VERSION_TABLE, alembic_config, current, head
from llm_batch_queue.store.sql.tables import metadata

TABLES = {
    "lbq_runs",
    "lbq_items",
    "lbq_jobs",
    "lbq_attempts",
    "lbq_rate_slots",
    "lbq_rate_days",
    "lbq_model_state",
    "lbq_outbox",
}


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def sql_url(request: pytest.FixtureRequest) -> str:
    url: str = request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_url")
    return url


def test_migrations_produce_exactly_the_declared_tables(sql_url: str) -> None:
    store = SQLStore(sql_url)
    try:
        with store.engine.connect() as conn:
            context = MigrationContext.configure(
                conn, opts={"version_table": VERSION_TABLE, "target_metadata": metadata}
            )
            assert compare_metadata(context, metadata) == []
            assert set(inspect(conn).get_table_names()) == TABLES | {VERSION_TABLE}
            assert current(conn) == head()
    finally:
        store.close()


def _index_definitions(conn: Connection, schema: str | None = None) -> dict[str, str]:
    """Every index of our tables as the database itself would create it."""
    if conn.dialect.name == "sqlite":
        query = "SELECT name, sql FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL"
        rows = conn.execute(text(query)).all()
    else:
        schema = schema or "public"
        query = "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = :schema"
        rows = conn.execute(text(query), {"schema": schema}).all()
    return {
        name: definition.replace(f" {schema}.", " ") if schema else definition
        for name, definition in rows
        if name.startswith(("ix_lbq", "uq_lbq", "pk_lbq"))
    }


def test_migrated_indexes_are_exactly_those_tables_py_creates(sql_url: str, tmp_path: Path) -> None:
    # compare_metadata sees neither an index's column directions nor its predicate: SQLite's
    # batch rebuilds (0008) once recreated the claim order without DESC
    SQLStore(sql_url).close()
    engine = make_engine(sql_url)
    try:
        with engine.begin() as conn:
            migrated = _index_definitions(conn)
            if conn.dialect.name == "postgresql":
                conn.execute(text("CREATE SCHEMA declared"))
                metadata.create_all(conn.execution_options(schema_translate_map={None: "declared"}))
                declared = _index_definitions(conn, "declared")
        if engine.dialect.name == "sqlite":
            reference = make_engine(f"sqlite:///{tmp_path / 'declared.db'}")
            metadata.create_all(reference)
            with reference.connect() as conn:
                declared = _index_definitions(conn)
            reference.dispose()
    finally:
        engine.dispose()
    assert migrated and migrated == declared


def test_migrating_is_idempotent_and_leaves_app_tables_alone(sql_url: str) -> None:
    engine = make_engine(sql_url)
    try:
        with engine.begin() as conn:  # the app's own table and alembic history
            conn.execute(text("CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL)"))
            conn.execute(text("INSERT INTO alembic_version VALUES ('app_0042')"))
        upgrade(engine)
        upgrade(engine)
        with engine.connect() as conn:
            assert conn.execute(text("SELECT version_num FROM alembic_version")).all() == [
                ("app_0042",)
            ]
            assert current(conn) == head()
    finally:
        engine.dispose()


def test_stores_starting_at_once_migrate_once(sql_url: str) -> None:
    errors: list[BaseException] = []
    stores: list[SQLStore] = []
    barrier = threading.Barrier(4)

    def start() -> None:
        barrier.wait()
        try:
            stores.append(SQLStore(sql_url))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for store in stores:
        store.close()
    assert errors == []
    engine = make_engine(sql_url)
    try:
        with engine.connect() as conn:
            assert conn.execute(text(f"SELECT count(*) FROM {VERSION_TABLE}")).scalar() == 1
    finally:
        engine.dispose()


def test_migrate_false_leaves_the_database_alone(sqlite_url: str) -> None:
    store = SQLStore(sqlite_url, migrate=False)
    try:
        with store.engine.connect() as conn:
            assert inspect(conn).get_table_names() == []
    finally:
        store.close()


def test_open_store_picks_the_implementation() -> None:
    assert isinstance(open_store("memory://"), MemoryStore)
    store = open_store("sqlite://")  # in-memory SQLite: one shared connection
    try:
        assert isinstance(store, SQLStore)
        assert store.list_runs() == []
    finally:
        store.close()


def test_a_bare_path_is_a_sqlite_file_created_on_first_use(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "queue.db"
    store = SQLStore(str(path))
    try:
        assert path.exists()
        with store.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    finally:
        store.close()


def test_migrations_ship_inside_the_package_without_an_ini() -> None:
    root = resources.files("llm_batch_queue.store.sql") / "migrations"
    assert (root / "env.py").is_file() and (root / "script.py.mako").is_file()
    assert (root / "versions" / "0001_initial.py").is_file()
    assert (root / "versions" / "0002_fair_order.py").is_file()
    assert (root / "versions" / "0003_rate_slots.py").is_file()
    assert (root / "versions" / "0004_claim_order_index.py").is_file()
    assert not (root / "alembic.ini").is_file()


def test_the_store_package_does_not_import_sqlalchemy() -> None:
    code = "import sys, llm_batch_queue.store; print('sqlalchemy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def _seed_at_0001(engine: Engine) -> None:
    """A run with two items (one stage each) and a run-scope job, written as 0001 had them."""
    job = {
        "pipeline": "p",
        "status": "ready",
        "priority": 0,
        "attempts": 0,
        "max_attempts": 3,
        "next_run_at": 1.0,
        "model_index": 0,
        "model_failures": 0,
        "created_at": 1.0,
        "updated_at": 1.0,
    }
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO lbq_runs (id, pipeline, name, status, stages, notify, created_at,"
                " round) VALUES ('r', 'p', 'old', 'running', '[]', '[]', 1.0, 1)"
            )
        )
        for position, key in enumerate(["x", "y"]):
            conn.execute(
                text(
                    "INSERT INTO lbq_items (id, run_id, position, key, status, outputs, failures)"
                    " VALUES (:id, 'r', :position, :key, 'queued', '{}', 0)"
                ),
                {"id": f"i{key}", "position": position, "key": key},
            )
        for jid, item, position in [("jx", "ix", 0), ("jy", "iy", 1), ("jr", None, 2)]:
            conn.execute(
                text(
                    "INSERT INTO lbq_jobs (id, run_id, item_id, scope_key, position, pipeline,"
                    " stage, status, priority, attempts, max_attempts, next_run_at, model_index,"
                    " model_failures, created_at, updated_at) VALUES (:id, 'r', :item, :scope,"
                    " :position, :pipeline, :stage, :status, :priority, :attempts,"
                    " :max_attempts, :next_run_at, :model_index, :model_failures, :created_at,"
                    " :updated_at)"
                ),
                {
                    **job,
                    "id": jid,
                    "item": item,
                    "scope": item or "",
                    "position": position,
                    "stage": "run" if item is None else "ask",
                    "status": "pending" if item is None else "ready",
                },
            )
        conn.execute(
            text(
                "INSERT INTO lbq_attempts (job_id, stage, is_fallback, started_at, finished_at,"
                " input_tokens, output_tokens, thinking_tokens, counted)"
                " VALUES ('jx', 'ask', false, 1.0, 1.0, 0, 0, 0, true)"
            )
        )


def test_a_database_at_0001_upgrades_to_the_fair_order_and_back(sql_url: str) -> None:
    engine = make_engine(sql_url)
    try:
        upgrade(engine, "0001")
        _seed_at_0001(engine)
        store = SQLStore(engine)  # migrates on open
        with engine.connect() as conn:
            assert current(conn) == head()
            indexes = {ix["name"] for ix in inspect(conn).get_indexes("lbq_jobs")}
            assert "ix_lbq_jobs_claim_order" in indexes  # 0002's index, as 0004 replaced it
        # existing jobs keyed as if their run had been created with nothing else queued
        assert [(j.id, j.fair_key) for j in store.jobs("r")] == [
            ("jx", 0.0),
            ("jy", 1.0),
            ("jr", 2.0),
        ]
        (claimed,) = store.claim(worker="w", now=2.0, limit=1, lease_s=60.0)
        assert claimed.job.id == "jx"
        store.close()  # the engine stays open: it is ours

        with engine.begin() as conn:
            command.downgrade(alembic_config(conn), "0001")
        with engine.connect() as conn:
            assert current(conn) == "0001"
            columns = {c["name"] for c in inspect(conn).get_columns("lbq_jobs")}
            assert "fair_key" not in columns and "priority" in columns
            indexes = {ix["name"] for ix in inspect(conn).get_indexes("lbq_jobs")}
            assert not indexes & {"ix_lbq_jobs_status_priority_fair_key", "ix_lbq_jobs_claim_order"}
            # nothing cascaded: the jobs and their attempts are all still there
            assert conn.execute(text("SELECT count(*) FROM lbq_jobs")).scalar() == 3
            assert conn.execute(text("SELECT count(*) FROM lbq_attempts")).scalar() == 1
        upgrade(engine)  # and up again
        with engine.connect() as conn:
            assert current(conn) == head()
    finally:
        engine.dispose()


def test_bookings_of_the_last_minute_survive_the_move_to_slots(sql_url: str) -> None:
    """0003 turns the row-per-request ledger into slot counters: a model that was at its limit
    just before the upgrade is still at it after."""
    engine = make_engine(sql_url)
    now = 1_767_225_600.0
    try:
        upgrade(engine, "0002")
        with engine.begin() as conn:
            old = [(now - 30.0, 10, False), (now - 0.05, 5, True)]
            for i, (at, tokens, open_) in enumerate(old):
                conn.execute(
                    text(
                        "INSERT INTO lbq_rate_ledger (id, model, at, tokens, open)"
                        " VALUES (:id, 'm', :at, :tokens, :open)"
                    ),
                    {"id": i + 1, "at": at, "tokens": tokens, "open": open_},
                )
        store = SQLStore(engine)
        with engine.connect() as conn:
            rows = conn.execute(
                text("SELECT slot, requests, tokens, open FROM lbq_rate_slots ORDER BY slot")
            ).all()
        assert [tuple(r) for r in rows] == [
            (window_slot(now - 30.0), 1, 10, 0),
            (window_slot(now - 0.05), 1, 5, 1),
        ]
        assert store.reserve("m", ModelLimits(rpm=2), 1, now) == Deny(now - 30.0 + 60.25, "rpm")
        store.close()
    finally:
        engine.dispose()
