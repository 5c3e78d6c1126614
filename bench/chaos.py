"""Chaos on PostgreSQL: Elevra workers killed again and again while the model misbehaves.

    .venv/bin/python bench/chaos.py [--json] [--file ../shared/data/nc_candidates_2025.csv]
        [--workers 4] [--kill-every 2-5] [--pg-restarts 1] [--timeout 1200]
        [--pg postgresql+psycopg://postgres@127.0.0.1:5432/postgres]

What it does:

1. A fresh database; the spreadsheet (default: the NC 2025 listing, 988 batches, 2,965 jobs) is
   read, batched and enqueued by the app, as an upload would be.
2. A Gemini-compatible simulator (a process of its own, answering with the app's offline
   responder) that injects faults into every model: per-minute 429s with RetryInfo, 500s, 503s,
   stalls past the client's timeout, prose instead of JSON, empty and truncated replies.
3. N worker processes (`python -m examples.elevra_upload worker`, the real google-genai SDK over
   HTTP, leases of 6 s), each writing its workbooks and e-mail log into its own directory.
4. A killer: every few seconds it SIGKILLs a random worker and starts a new one in its place,
   until the upload has finished; `--pg-restarts` times during the run it restarts the
   PostgreSQL server itself (`pg_ctlcluster ... restart`: every connection drops).
5. Once the upload has finished and its e-mails have gone out, the workers are stopped
   (SIGTERM) and the database and logs are checked.

The last line is a JSON object with:

- jobs, completed (jobs that succeeded), needs_reupload (batches that gave up, with reasons in
  the store), failed and cancelled jobs, and the run's status;
- lost: jobs neither finished (succeeded, failed, cancelled) nor pending at the end — after the
  run has finished every job must be one of those three, so any other is lost;
- duplicate_effects: election rows sharing a natural key, candidate rows sharing a slug,
  candidate links repeated, e-mails sent more than once (the same outbox key in the logs), and
  jobs with more than one successful attempt on record;
- kills, pg_restarts, provider_429 (attempts that met a 429), attempts, elapsed_s.

Targets: lost = 0 and duplicate_effects = 0, over at least 1,000 jobs and 10 kills.
Progress goes to stderr; with --json the JSON object is the only line on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_FILE = ROOT.parent / "shared" / "data" / "nc_candidates_2025.csv"
MODELS = ("gemini-2.5-pro", "gemini-2.5-flash", "gemini-2.5-flash-lite")
FAULTS = {
    "rate_limit_rate": 0.01,
    "rate_limit_retry_s": 1.0,
    "server_error_rate": 0.02,
    "unavailable_rate": 0.02,
    "stall_rate": 0.005,
    "stall_s": 8.0,  # past the workers' 4-s timeout
    "not_json_rate": 0.02,
    "empty_rate": 0.01,
    "truncated_rate": 0.01,
}
WORKER_ENV = {
    "ELEVRA_LEASE_S": "6",  # a killed worker's jobs are taken over 6 s later
    "GEMINI_TIMEOUT_MS": "4000",
    "ELEVRA_CONCURRENCY": "16",
    # a worker killed between sending an e-mail and recording it leaves the row in doubt once
    # this hold passes (dry-run cannot dedupe a second copy): short, so the run does not wait
    "ELEVRA_EMAIL_HOLD_S": "10",
}


def log(message: str) -> None:
    print(f"[chaos] {message}", file=sys.stderr, flush=True)


# the simulator process ---------------------------------------------------------------------------
def serve_simulator() -> None:
    from examples.elevra_upload.simulate import reply
    from llm_batch_queue.simulator import FaultConfig, ModelConfig, Simulator

    faults = FaultConfig(latency_s=(0.02, 0.2), **FAULTS)  # type: ignore[arg-type]
    configs = {m: ModelConfig(faults=faults) for m in MODELS}
    stop = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    with Simulator(configs, responder=reply, seed=11) as sim:
        print(sim.url, flush=True)
        while not stop:
            time.sleep(0.2)


# the driver --------------------------------------------------------------------------------------
class Workers:
    def __init__(self, n: int, db: str, out: Path, sim_url: str) -> None:
        self.db, self.out, self.n = db, out, n
        self.env = {
            **{
                k: v for k, v in os.environ.items() if k not in ("GEMINI_API_KEY", "GOOGLE_API_KEY")
            },
            **WORKER_ENV,
            "ELEVRA_GEMINI_BASE_URL": sim_url,
        }
        self.procs: list[subprocess.Popen[bytes]] = [self._start(i) for i in range(n)]

    def _start(self, slot: int) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, "-m", "examples.elevra_upload", "worker", "--db", self.db,
             "--out", str(self.out / f"w{slot}"), "--quiet", "--grace", "20"],
            cwd=ROOT, env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip

    def kill_one(self, rng: random.Random) -> int:
        slot = rng.randrange(self.n)
        self.procs[slot].kill()
        self.procs[slot].communicate()
        self.procs[slot] = self._start(slot)
        return slot

    def stop(self) -> list[str]:
        for p in self.procs:
            p.send_signal(signal.SIGTERM)
        errors = []
        for p in self.procs:
            try:
                _, err = p.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
                _, err = p.communicate()
            # -SIGTERM: a worker restarted a moment ago, stopped before its handler was in
            # place (it had claimed nothing yet); any other non-zero exit is an error
            if p.returncode not in (0, -signal.SIGTERM):
                errors.append(err.decode(errors="replace")[-2000:] or f"exit {p.returncode}")
        return errors


def restart_postgres() -> None:
    cluster = sorted(os.listdir("/etc/postgresql"))[0]
    subprocess.run(
        ["pg_ctlcluster", "--skip-systemctl-redirect", cluster, "main", "restart"],
        check=True,
        capture_output=True,
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    from examples.elevra_upload.app import open_app
    from examples.elevra_upload.config import AppConfig

    rng = random.Random(args.seed)
    admin = create_engine(args.pg, isolation_level="AUTOCOMMIT", pool_pre_ping=True)
    name = f"lbq_chaos_{uuid.uuid4().hex[:12]}"
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    db = make_url(args.pg).set(database=name).render_as_string(hide_password=False)
    out = Path(tempfile.mkdtemp(prefix="lbq-chaos-"))
    sim = subprocess.Popen(
        [sys.executable, __file__, "--serve-simulator"], cwd=ROOT, stdout=subprocess.PIPE
    )
    workers: Workers | None = None
    kills = restarts = 0
    try:
        assert sim.stdout is not None
        sim_url = sim.stdout.readline().decode().strip()
        with open_app(AppConfig(), out / "submit", db, simulate=False) as app:
            run_, ingest, batches = app.submit(Path(args.file))
        log(f"{args.file}: {len(ingest.rows)} rows, {batches} batches queued; simulator {sim_url}")
        started = time.monotonic()
        workers = Workers(args.workers, db, out, sim_url)
        engine = create_engine(db, pool_pre_ping=True)
        low, high = (float(x) for x in args.kill_every.split("-"))
        restart_at = {
            int(i * args.expected_s / (args.pg_restarts + 1))
            for i in range(1, args.pg_restarts + 1)
        }
        next_kill = time.monotonic() + rng.uniform(low, high)
        while True:
            time.sleep(0.25)
            elapsed = time.monotonic() - started
            if elapsed > args.timeout:
                log("timed out: the upload did not finish")
                break
            status, pending_mail = _progress(engine, text, run_.id)
            if status != "running" and not pending_mail:
                break
            if status == "running" and time.monotonic() >= next_kill:
                slot = workers.kill_one(rng)
                kills += 1
                next_kill = time.monotonic() + rng.uniform(low, high)
                log(f"{elapsed:6.1f} s: killed worker {slot} (kill {kills})")
            if status == "running" and restart_at and elapsed >= min(restart_at):
                restart_at.discard(min(restart_at))
                log(f"{elapsed:6.1f} s: restarting PostgreSQL")
                restart_postgres()
                restarts += 1
        elapsed = time.monotonic() - started
        errors = workers.stop()
        workers = None
        result = _check(engine, text, run_.id, out)
        engine.dispose()
        result.update(
            kills=kills,
            pg_restarts=restarts,
            elapsed_s=round(elapsed, 1),
            workers=args.workers,
            worker_exit_errors=len(errors),
        )
        for e in errors:
            log(f"a worker exited with an error: {e}")
        return result
    finally:
        if workers is not None:
            for p in workers.procs:
                p.kill()
        sim.terminate()
        sim.communicate(timeout=10)
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


def _progress(engine: Any, text: Any, run_id: str) -> tuple[str, int]:
    try:
        with engine.connect() as conn:
            status = conn.execute(
                text("SELECT status FROM lbq_runs WHERE id = :r"), {"r": run_id}
            ).scalar_one()
            pending = conn.execute(
                text(
                    "SELECT count(*) FROM lbq_outbox"
                    " WHERE run_id = :r AND status IN ('pending', 'sending')"
                ),
                {"r": run_id},
            ).scalar_one()
        return str(status), int(pending)
    except Exception:  # the server is restarting
        return "running", 1


def _check(engine: Any, text: Any, run_id: str, out: Path) -> dict[str, Any]:
    with engine.connect() as conn:

        def one(sql: str) -> Any:
            return conn.execute(text(sql), {"r": run_id}).scalar_one()

        statuses = dict(
            conn.execute(
                text("SELECT status, count(*) FROM lbq_jobs WHERE run_id = :r GROUP BY status"),
                {"r": run_id},
            ).all()
        )
        run_status = one("SELECT status FROM lbq_runs WHERE id = :r")
        needs_reupload = one(
            "SELECT count(*) FROM lbq_items WHERE run_id = :r AND status = 'needs_reupload'"
        )
        double_success = one(
            "SELECT count(*) FROM (SELECT a.job_id FROM lbq_attempts a JOIN lbq_jobs j"
            " ON j.id = a.job_id WHERE j.run_id = :r AND a.error_kind IS NULL"
            " GROUP BY a.job_id HAVING count(*) > 1) d"
        )
        attempts = one(
            "SELECT count(*) FROM lbq_attempts a JOIN lbq_jobs j ON j.id = a.job_id"
            " WHERE j.run_id = :r"
        )
        provider_429 = one(
            "SELECT count(*) FROM lbq_attempts a JOIN lbq_jobs j ON j.id = a.job_id"
            " WHERE j.run_id = :r AND a.error_kind = 'rate_limited'"
        )
        dup_elections = one(
            "SELECT count(*) FROM (SELECT natural_key FROM elevra_elections"
            " GROUP BY natural_key HAVING count(*) > 1) d"
        )
        dup_candidates = one(
            "SELECT count(*) FROM (SELECT slug FROM elevra_candidates"
            " GROUP BY slug HAVING count(*) > 1) d"
        )
        emails_in_doubt = one(
            "SELECT count(*) FROM lbq_outbox WHERE run_id = :r AND status = 'in_doubt'"
        )
        dup_links = one(
            "SELECT count(*) FROM (SELECT election_id, candidate_id FROM elevra_election_links"
            " GROUP BY election_id, candidate_id HAVING count(*) > 1) d"
        )
    sent = Counter(
        json.loads(line)["idempotency_key"]
        for log_file in out.glob("w*/emails.jsonl")
        for line in log_file.read_text(encoding="utf-8").splitlines()
        if line.strip()
    )
    dup_emails = sum(1 for n in sent.values() if n > 1)
    finished = sum(statuses.get(s, 0) for s in ("succeeded", "failed", "cancelled"))
    jobs = sum(statuses.values())
    return {
        "jobs": jobs,
        "completed": statuses.get("succeeded", 0),
        "failed": statuses.get("failed", 0),
        "cancelled": statuses.get("cancelled", 0),
        "needs_reupload": needs_reupload,
        "run_status": run_status,
        "lost": jobs - finished,
        "duplicate_effects": dup_elections
        + dup_candidates
        + dup_links
        + dup_emails
        + double_success,
        "duplicates": {
            "elections": dup_elections,
            "candidates": dup_candidates,
            "links": dup_links,
            "emails": dup_emails,
            "jobs_completed_twice": double_success,
        },
        "emails_sent": sum(sent.values()),
        "emails_in_doubt": emails_in_doubt,  # killed mid-send: never resent, an admin decides
        "attempts": attempts,
        "provider_429": provider_429,
    }


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--serve-simulator":
        sys.path.insert(0, str(ROOT))
        serve_simulator()
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print only the JSON summary")
    parser.add_argument("--file", default=str(DEFAULT_FILE), help="the spreadsheet to upload")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--kill-every", default="2-5", help="seconds between kills, LOW-HIGH")
    parser.add_argument("--pg-restarts", type=int, default=1, help="PostgreSQL restarts mid-run")
    parser.add_argument("--expected-s", type=float, default=90.0, help="spreads the restarts")
    parser.add_argument("--timeout", type=float, default=1200.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--pg",
        default=os.environ.get(
            "LBQ_BENCH_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
        ),
    )
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    result = run(args)
    if not args.json:
        log(json.dumps(result))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
