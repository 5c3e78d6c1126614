"""Wake-ups without polling on PostgreSQL: NOTIFY when jobs become claimable, LISTEN in workers.

A transaction that makes jobs READY now (a new run, dependents released, a job handed back, an
admin retry) announces the pipeline on the `lbq_jobs` channel; PostgreSQL delivers it at commit,
once per transaction and payload. Workers still poll (DispatcherSettings.idle_poll_s) for jobs
that become due by time — retries, rate-limit waits — and in case a notification is missed while
their listening connection is down. SQLite has no such channel: there, workers only poll.
"""

from __future__ import annotations

from collections.abc import Callable

import anyio
from sqlalchemy import Connection, func, select
from sqlalchemy.engine import URL

CHANNEL = "lbq_jobs"


def announce(conn: Connection, pipeline: str) -> None:
    if conn.dialect.name == "postgresql":
        conn.execute(select(func.pg_notify(CHANNEL, pipeline)))


async def listen(
    url: URL, wake: Callable[[str], None], *, channel: str = CHANNEL, max_delay_s: float = 10.0
) -> None:
    """Call `wake(pipeline)` for every announcement, until cancelled.

    Reconnects with backoff when the connection drops (a database restart), and wakes once
    after every (re)connection: what was announced while it was away is not delivered later.
    """
    import psycopg  # the PostgreSQL driver; only workers on PostgreSQL get here

    conninfo = url.set(drivername="postgresql").render_as_string(hide_password=False)
    delay = 0.2
    while True:
        try:
            async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True) as conn:
                await conn.execute(f'LISTEN "{channel}"')
                delay = 0.2
                wake("")
                async for note in conn.notifies():
                    wake(note.payload)
        except psycopg.OperationalError:
            await anyio.sleep(delay)
            delay = min(delay * 2, max_delay_s)
