"""How much of a model's rate limit the dispatchers use, with 1 and with 4 worker processes.

    .venv/bin/python bench/utilization.py [--json] [--seconds 245] [--processes 1,4]
        [--configs rpm,tpm,tpm-counted] [--pg postgresql+psycopg://postgres@127.0.0.1:5432/postgres]

Each configuration gets a fresh PostgreSQL database, a simulator process enforcing the limits
itself (exact sliding 60-s windows, 429 for anything over them), one run with more items than
the limits let through in the time, and N dispatcher processes (`run_forever`, the real
google-genai SDK over HTTP). The simulator's first admission is t0; at t0 + seconds the workers
are told to stop (SIGTERM: claim nothing more, finish what is in flight).

Configurations (limits are the same in the simulator and in the dispatchers' ModelLimits):

- rpm:         rpm=120, ~50-token requests: RPM binds.
- tpm:         tpm=100,000 (rpm=1,000 does not bind), requests of 200-4,000 input tokens: TPM
               binds, and the reservation (an estimate from the prompt's length, reconciled with
               the provider's count after the call) decides how densely requests pack.
- tpm-counted: as tpm, with DispatcherSettings(count_tokens=True): each reservation is the
               provider's countTokens answer instead of the estimate.

Utilization, precisely. From the simulator's own record of admitted calls (time, input tokens):

    achieved_rpm = the mean, over every 60-s window [a, a+60) with t0 <= a <= t0 + seconds - 60,
                   of the requests the simulator admitted in that window (the mean over a
                   continuous a, computed exactly); achieved_tpm likewise with input tokens.
    utilization  = achieved / limit of the binding limit (rpm, or tpm for the tpm configurations).

Every 60-s window may carry at most the limit (the provider refuses more), so utilization <= 1
whatever the traffic does: the burst a sliding window allows at the start cannot inflate it
(counting requests in [t0, t0+65) against 65/60 of a limit would report ~1.85). A dispatcher
that reuses a freed slot d seconds late scores about 60/(60+d). The run's opening burst comes
back every 60 + d seconds, and each return opens a gap of about d in the windows that end just
after it; a span of window starts that is not a whole number of those cycles over- or
under-counts gaps (125 s, a 65-s span, holds two of them: ~0.7 % of utilization too little).
The default, 245 s, sweeps three minutes of window starts, so that edge effect is under a
third of that; shorter runs measure one phase of the cycle more than the steady state.

Also reported: provider_429 (the simulator's count of 429 answers), max_requests_any_60s and
max_input_tokens_any_60s (the simulator's exact maxima over any 60-s window of the whole run).

Progress goes to stderr; the last line of stdout is a JSON object (with --json, the only line).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from dataclasses import asdict, dataclass
from typing import Any

MODEL = "gemini-2.5-flash"
WINDOW_S = 60.0
LATENCY = "0.3-1.5"  # seconds per call, uniform: LLM calls take a while
CONCURRENCY = 64  # calls in flight per worker: enough that the limit binds, not concurrency


@dataclass(frozen=True)
class Config:
    name: str
    rpm: int | None
    tpm: int | None
    binding: str  # "rpm" | "tpm"
    min_tokens: int
    max_tokens: int
    count_tokens: bool = False

    def items(self, seconds: float) -> int:
        """Twice what the binding limit lets through in the run: the queue never runs dry."""
        minutes = seconds / WINDOW_S + 1
        if self.binding == "rpm":
            assert self.rpm is not None
            return int(2 * self.rpm * minutes)
        assert self.tpm is not None
        return int(2 * self.tpm * minutes / ((self.min_tokens + self.max_tokens) / 2))


CONFIGS = {
    "rpm": Config("rpm", rpm=120, tpm=None, binding="rpm", min_tokens=40, max_tokens=60),
    "tpm": Config("tpm", rpm=1_000, tpm=100_000, binding="tpm", min_tokens=200, max_tokens=4_000),
    "tpm-counted": Config(
        "tpm-counted",
        rpm=1_000,
        tpm=100_000,
        binding="tpm",
        min_tokens=200,
        max_tokens=4_000,
        count_tokens=True,
    ),
}


def log(message: str) -> None:
    print(f"[utilization] {message}", file=sys.stderr, flush=True)


# the worker process ------------------------------------------------------------------------------
def pipeline() -> Any:
    from llm_batch_queue import ModelStage, Pipeline, Prompt

    return Pipeline(
        "utilization",
        (ModelStage("ask", (MODEL,), lambda ctx: Prompt(str(ctx.payload["text"]))),),
    )


def worker(store_url: str, simulator_url: str, config: Config) -> None:
    import anyio

    from llm_batch_queue import Dispatcher, DispatcherSettings, ModelLimits
    from llm_batch_queue.adapters.gemini import GeminiAdapter
    from llm_batch_queue.store.sql import open_store

    settings = DispatcherSettings(concurrency=CONCURRENCY, count_tokens=config.count_tokens)

    async def work() -> dict[str, Any]:
        store = open_store(store_url)
        adapter = GeminiAdapter(api_key="simulated", base_url=simulator_url, timeout_ms=30_000)
        trace = os.environ.get("LBQ_BENCH_DUMP")  # diagnostics: when each job was claimed
        log_file = open(f"{trace}/events-{os.getpid()}.jsonl", "w") if trace else None  # noqa: SIM115

        def on_event(event: object) -> None:
            if log_file is not None:
                row = [time.time(), type(event).__name__, asdict(event)]  # type: ignore[call-overload]
                log_file.write(json.dumps(row) + "\n")

        dispatcher = Dispatcher(
            store,
            pipeline(),
            adapter,
            limits={MODEL: ModelLimits(rpm=config.rpm, tpm=config.tpm)},
            settings=settings,
            on_event=on_event,
        )
        stop = anyio.Event()
        try:
            async with anyio.create_task_group() as tg:

                async def on_sigterm() -> None:
                    with anyio.open_signal_receiver(signal.SIGTERM) as signals:
                        async for _ in signals:
                            stop.set()
                            return

                tg.start_soon(on_sigterm)
                stats = await dispatcher.run_forever(stop)
                tg.cancel_scope.cancel()
        finally:
            await adapter.aclose()
            store.close()
            if log_file is not None:
                log_file.close()
        return asdict(stats)

    print(json.dumps(anyio.run(work)), flush=True)


# the driver --------------------------------------------------------------------------------------
def texts(config: Config, n: int, seed: int) -> list[str]:
    """Prompts whose simulator token counts (one per 4 characters) are uniform in the range."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        head = f"item {i}: "
        out.append(
            head + "x" * max(0, 4 * rng.randint(config.min_tokens, config.max_tokens) - len(head))
        )
    return out


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.load(response)


def window_mean(
    admissions: list[tuple[float, int]], start: float, stop: float
) -> tuple[float, float]:
    """Mean requests and input tokens over the windows [a, a+60), start <= a <= stop - 60.

    A call admitted at t lies in [a, a+60) for a in (t-60, t]: its weight is the share of the
    range of a that this interval covers.
    """
    lo, hi = start, stop - WINDOW_S
    if hi - lo < 1e-9:  # a single window
        inside = [k for t, k in admissions if start <= t < start + WINDOW_S]
        return float(len(inside)), float(sum(inside))
    requests = tokens = 0.0
    for t, k in admissions:
        share = max(0.0, min(hi, t) - max(lo, t - WINDOW_S)) / (hi - lo)
        requests += share
        tokens += share * k
    return requests, tokens


def run_config(config: Config, processes: int, seconds: float, pg_url: str) -> dict[str, Any]:
    from sqlalchemy import create_engine
    from sqlalchemy.engine import make_url

    from llm_batch_queue import NewItem
    from llm_batch_queue.store.sql import open_store

    label = f"{config.name}/{processes}p"
    env = {k: v for k, v in os.environ.items() if k not in ("GEMINI_API_KEY", "GOOGLE_API_KEY")}
    admin = create_engine(pg_url, isolation_level="AUTOCOMMIT")
    db = f"lbq_bench_{uuid.uuid4().hex[:12]}"
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{db}"')
    store_url = make_url(pg_url).set(database=db).render_as_string(hide_password=False)
    limits = ",".join(f"{k}={v}" for k, v in (("rpm", config.rpm), ("tpm", config.tpm)) if v)
    sim = subprocess.Popen(
        [sys.executable, "-m", "llm_batch_queue.simulator", "--port", "0",
         "--model", f"{MODEL}:{limits},latency={LATENCY}"],
        stdout=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    workers: list[subprocess.Popen[str]] = []
    try:
        assert sim.stdout is not None
        sim_url = sim.stdout.readline().strip().removeprefix("listening on ")
        store = open_store(store_url)
        p = pipeline()
        n = config.items(seconds)
        store.create_run(
            pipeline=p.name,
            name=label,
            stages=p.specs,
            items=[NewItem(str(i), {"text": t}) for i, t in enumerate(texts(config, n, seed=1))],
            meta={},
            now=time.time(),
        )
        store.close()
        log(f"{label}: {n} items queued; limits {limits}; starting {processes} worker(s)")
        spec = json.dumps(asdict(config))
        workers = [
            subprocess.Popen(
                [sys.executable, __file__, "--worker", store_url, sim_url, spec],
                stdout=subprocess.PIPE,
                text=True,
                env=env,
            )
            for _ in range(processes)
        ]
        t0, started = None, time.time()
        while t0 is None:
            time.sleep(0.05)
            if time.time() - started > 120:
                raise RuntimeError(f"{label}: nothing admitted in 120 s")
            admitted = get_json(f"{sim_url}/_sim/admissions")[MODEL]
            t0 = admitted[0][0] if admitted else None
        stop_at = t0 + seconds
        while (left := stop_at - time.time()) > 0:
            time.sleep(min(10.0, left))
            stats = get_json(f"{sim_url}/_sim/stats")[MODEL]
            log(
                f"{label}: {time.time() - t0:5.1f} s, {stats['admitted']} admitted,"
                f" {stats['input_tokens']} tokens,"
                f" 429s: {stats['requests_by_status'].get('429', 0)}"
            )
        stopped_at = time.time()
        for w in workers:
            w.send_signal(signal.SIGTERM)
        client = [
            json.loads(w.communicate(timeout=120)[0].strip().splitlines()[-1]) for w in workers
        ]
        stats = get_json(f"{sim_url}/_sim/stats")[MODEL]
        admissions = [(float(t), int(k)) for t, k in get_json(f"{sim_url}/_sim/admissions")[MODEL]]
        if dump := os.environ.get("LBQ_BENCH_DUMP"):  # diagnostics: the sim's and our ledger's view
            from sqlalchemy import text

            with create_engine(store_url).connect() as conn:
                ledger = [
                    tuple(r)
                    for r in conn.execute(
                        text("SELECT slot, requests, tokens FROM lbq_rate_slots ORDER BY slot")
                    )
                ]
            with open(f"{dump}/{config.name}-{processes}p.json", "w") as f:
                json.dump(
                    {"admissions": admissions, "ledger": ledger, "t0": t0, "stop": stopped_at}, f
                )
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
                w.communicate()
        sim.terminate()
        sim.communicate(timeout=10)
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
        admin.dispose()

    achieved_rpm, achieved_tpm = window_mean(admissions, t0, stopped_at)
    limit = config.rpm if config.binding == "rpm" else config.tpm
    achieved = achieved_rpm if config.binding == "rpm" else achieved_tpm
    assert limit is not None
    result = {
        "processes": processes,
        "binding": config.binding,
        "count_tokens": config.count_tokens,
        "limit_rpm": config.rpm,
        "limit_tpm": config.tpm,
        "achieved_rpm": round(achieved_rpm, 2),
        "achieved_tpm": round(achieved_tpm, 1),
        "utilization": round(achieved / limit, 4),
        "provider_429": stats["requests_by_status"].get("429", 0),
        "max_requests_any_60s": stats["max_requests_per_window"],
        "max_input_tokens_any_60s": stats["max_input_tokens_per_window"],
        "measured_s": round(stopped_at - t0, 1),
        "admitted_in_measured_span": sum(1 for t, _ in admissions if t < stopped_at),
        "deferred": sum(c["deferred"] for c in client),
        "count_tokens_requests": stats["count_tokens_requests"],
    }
    log(f"{label}: {json.dumps(result)}")
    return result


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        store_url, sim_url, spec = sys.argv[2:5]
        worker(store_url, sim_url, Config(**json.loads(spec)))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print only the JSON summary")
    parser.add_argument("--seconds", type=float, default=245.0, help="saturated span, >= 60")
    parser.add_argument("--processes", default="1,4", help="comma-separated worker counts")
    parser.add_argument("--configs", default="rpm,tpm,tpm-counted", help=", ".join(CONFIGS))
    parser.add_argument(
        "--pg",
        default=os.environ.get(
            "LBQ_BENCH_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
        ),
        help="a server where a database per configuration may be created and dropped",
    )
    args = parser.parse_args()
    if args.seconds < WINDOW_S:
        parser.error("--seconds must be at least 60")
    results = {}
    for name in args.configs.split(","):
        for processes in (int(p) for p in args.processes.split(",")):
            results[f"{name}/{processes}p"] = run_config(
                CONFIGS[name], processes, args.seconds, args.pg
            )
    if not args.json:
        for label, r in results.items():
            print(
                f"{label:16} limit {r['limit_' + r['binding']]:>7} {r['binding']}"
                f"  achieved {r['achieved_' + r['binding']]:>9}  utilization {r['utilization']:.4f}"
                f"  429s {r['provider_429']}  max/60s {r['max_requests_any_60s']} req,"
                f" {r['max_input_tokens_any_60s']} tok"
            )
    print(json.dumps({"seconds": args.seconds, "configurations": results}))


if __name__ == "__main__":
    main()
