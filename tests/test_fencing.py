"""store.sql.fence: an effect written in the queue's database commits only under the lease."""

from __future__ import annotations

import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table, create_engine, func, select

from llm_batch_queue import NewItem, Scope
from llm_batch_queue.errors import LeaseLost
from llm_batch_queue.jobs import Lease, StageSpec
from llm_batch_queue.store.sql import fence, open_store

effects = Table("effects", MetaData(), Column("id", Integer, primary_key=True), Column("k", String))


@pytest.mark.parametrize("where", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_an_effect_commits_only_while_the_lease_holds(
    where: str, request: pytest.FixtureRequest
) -> None:
    url = request.getfixturevalue("sqlite_url" if where == "sqlite" else "pg_url")
    store = open_store(url)
    engine = create_engine(url)
    effects.create(engine)
    stages = {"s": StageSpec("s", Scope.ITEM)}
    run = store.create_run(
        pipeline="p", name="r", stages=stages,
        items=[NewItem("a", 1), NewItem("b", 2)], meta={}, now=0.0,
    )  # fmt: skip

    def write(lease: Lease, key: str) -> None:
        with engine.begin() as conn:
            fence(conn, lease)
            conn.execute(effects.insert().values(k=key))

    first, second = store.claim(worker="w", now=0.0, limit=2, lease_s=10.0)
    write(first.lease, "held")  # still ours: written

    store.skip_item(run.id, second.item.key if second.item else "", "taken away", 1.0)
    with pytest.raises(LeaseLost, match="no longer this worker's"):
        write(second.lease, "skipped")  # the admin took it away: nothing written

    # the first job's lease expires and another worker takes it over
    (taken,) = store.claim(worker="v", now=20.0, limit=1, lease_s=10.0)
    assert taken.job.id == first.job.id
    with pytest.raises(LeaseLost):
        write(first.lease, "stale")
    write(taken.lease, "new owner")
    with engine.connect() as conn:
        assert [r.k for r in conn.execute(select(effects.c.k).order_by(effects.c.id))] == [
            "held",
            "new owner",
        ]
        assert conn.execute(select(func.count()).select_from(effects)).scalar() == 2
    store.close()
    engine.dispose()
