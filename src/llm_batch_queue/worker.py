"""Worker processes: what a worker runs (`WorkerApp`) and how it stops (`serve`).

A worker is a long-running dispatcher: `llm-batch-queue worker --app pkg.module:factory` (cli.py)
opens the store, calls `factory(store)` for a WorkerApp and serves until SIGTERM or SIGINT. The
first signal stops claiming and lets the jobs in flight finish, for up to `grace_s`; a second
signal, or the end of the grace, cancels them, and they are handed back to the queue at once
(each is conditional on its lease, so nothing is recorded twice). A killed worker's jobs are
taken over by any other when their leases expire: nothing needs sweeping.
"""

from __future__ import annotations

import signal
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass, field

import anyio

from llm_batch_queue import events
from llm_batch_queue.adapters.base import ModelAdapter
from llm_batch_queue.dispatch import Dispatcher, DispatcherSettings, DispatchStats, Outbox
from llm_batch_queue.limits import ModelLimits
from llm_batch_queue.pipeline import Pipeline
from llm_batch_queue.retry import RetryPolicy
from llm_batch_queue.store.base import Store

Wakeups = Callable[[Callable[[], None]], Coroutine[object, object, None]]
"""Runs until cancelled, calling its argument whenever new work may be claimable."""


@dataclass
class WorkerApp:
    """Everything a worker needs besides its store, built by the user's factory."""

    pipeline: Pipeline
    adapter: ModelAdapter | Mapping[str, ModelAdapter] | None = None
    limits: Mapping[str, ModelLimits] = field(default_factory=dict)
    settings: DispatcherSettings | None = None
    retry: RetryPolicy | None = None
    outbox: Outbox | None = None
    on_event: events.EventSink | None = None
    close: Callable[[], Awaitable[None]] | None = None  # e.g. the adapter's aclose

    def dispatcher(self, store: Store) -> Dispatcher:
        return Dispatcher(
            store,
            self.pipeline,
            self.adapter,
            limits=self.limits,
            retry=self.retry,
            settings=self.settings,
            on_event=self.on_event,
            outbox=self.outbox,
        )


AppFactory = Callable[[Store], WorkerApp]


async def serve(
    store: Store,
    app: WorkerApp,
    *,
    stop: anyio.Event | None = None,
    wakeups: Wakeups | None = None,
    grace_s: float = 30.0,
    handle_signals: bool = True,
) -> DispatchStats:
    """Run `app` on `store` until `stop` is set (or a signal arrives), then shut down cleanly."""
    stop = stop or anyio.Event()
    dispatcher = app.dispatcher(store)

    async def work() -> None:
        async with anyio.create_task_group() as tg:
            if wakeups is not None:
                tg.start_soon(wakeups, dispatcher.wake)
            tg.start_soon(_grace, stop, grace_s, tg.cancel_scope)
            await dispatcher.run_forever(stop)
            tg.cancel_scope.cancel()

    def on_signal(scope: anyio.CancelScope) -> None:
        if stop.is_set():
            scope.cancel()  # a second signal: hand the jobs in flight back now
        stop.set()

    try:
        await (stoppable(work, on_signal) if handle_signals else work())
    finally:
        if app.close is not None:
            with anyio.CancelScope(shield=True):
                await app.close()
    return dispatcher.stats


async def stoppable(
    work: Callable[[], Awaitable[None]],
    on_signal: Callable[[anyio.CancelScope], None] | None = None,
) -> bool:
    """Run `work` with SIGINT and SIGTERM calling `on_signal` with its cancel scope (by default
    cancelling it: a one-shot dispatch stops at its next await, never halfway through a store
    transaction, and hands its jobs back); True if a signal came. The signals are received
    until `work` has ended, its shielded hand-backs included: a burst of Ctrl-C must not
    become a KeyboardInterrupt halfway through them (it left jobs leased and the process
    hanging on its worker threads)."""
    signalled: list[int] = []
    async with anyio.create_task_group() as outer:
        with anyio.CancelScope() as scope:
            outer.start_soon(_forward_signals, scope, on_signal or _cancel, signalled)
            await work()
        outer.cancel_scope.cancel()
    return bool(signalled)


def _cancel(scope: anyio.CancelScope) -> None:
    scope.cancel()


async def _forward_signals(
    scope: anyio.CancelScope,
    on_signal: Callable[[anyio.CancelScope], None],
    signalled: list[int],
) -> None:
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            signalled.append(signum)
            on_signal(scope)


async def _grace(stop: anyio.Event, grace_s: float, scope: anyio.CancelScope) -> None:
    await stop.wait()
    await anyio.sleep(grace_s)
    scope.cancel()
