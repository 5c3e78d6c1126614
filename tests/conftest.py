"""Shared fixtures. Store fixtures: every contract test runs on memory, SQLite and PostgreSQL.

PostgreSQL comes from LBQ_TEST_PG_URL (default: the local server, user postgres). Each test gets
its own database, dropped afterwards. If the server is unreachable the PostgreSQL cases are
skipped — unless CI is set, where they fail: CI must not go green by skipping them.
"""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from mailservers import EphemeralController, FakeResend, Recorder
from sqlalchemy import Engine, create_engine
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError

from llm_batch_queue.store import Store
from llm_batch_queue.store.sql import open_store

PG_URL = os.environ.get("LBQ_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")

StoreFactory = Callable[[], Store]


@pytest.fixture(scope="session")
def pg_admin() -> Iterator[Engine]:
    """An AUTOCOMMIT engine on the server's maintenance database (CREATE/DROP DATABASE)."""
    engine = create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect():
            pass
    except OperationalError as exc:
        engine.dispose()
        reason = f"PostgreSQL unreachable at LBQ_TEST_PG_URL={PG_URL!r}: {exc.orig}"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    yield engine
    engine.dispose()


@pytest.fixture
def pg_url(pg_admin: Engine) -> Iterator[str]:
    """A fresh, empty database of its own for this test."""
    name = f"lbq_test_{uuid.uuid4().hex}"
    with pg_admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    yield make_url(PG_URL).set(database=name).render_as_string(hide_password=False)
    with pg_admin.connect() as conn:
        conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'lbq.db'}"


@pytest.fixture(params=["memory", "sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store_url(request: pytest.FixtureRequest) -> str:
    if request.param == "memory":
        return "memory://"
    fixture = "sqlite_url" if request.param == "sqlite" else "pg_url"
    url: str = request.getfixturevalue(fixture)
    return url


@pytest.fixture
def store_factory(store_url: str) -> Iterator[StoreFactory]:
    """Opens handles on the test's store. For SQL each handle is its own SQLStore (own engine and
    pool), as separate processes would have; for memory it is always the same MemoryStore."""
    opened: list[Store] = []

    def factory() -> Store:
        if store_url == "memory://" and opened:
            return opened[0]
        opened.append(open_store(store_url))
        return opened[-1]

    yield factory
    for handle in opened:
        handle.close()


@pytest.fixture
def store(store_factory: StoreFactory) -> Store:
    return store_factory()


# mail endpoints (mailservers.py) ------------------------------------------------------------------
@pytest.fixture
def serve() -> Iterator[Callable[..., int]]:
    """Starts real SMTP servers on 127.0.0.1: `serve(Recorder(), **controller_kwargs)` -> port."""
    started: list[EphemeralController] = []

    def start(handler: Recorder, **kwargs: Any) -> int:
        controller = EphemeralController(handler, **kwargs)
        controller.start()
        started.append(controller)
        return int(controller.port)

    yield start
    for controller in started:
        controller.stop()


@pytest.fixture
def resend() -> Iterator[FakeResend]:
    server = FakeResend()
    # a short poll interval: shutdown() waits for the serving loop to look
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join()
