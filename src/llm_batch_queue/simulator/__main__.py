"""`python -m llm_batch_queue.simulator --port 8765 --model gemini-2.5-flash:rpm=10,tpm=100000`.

Serves until SIGINT or SIGTERM, then prints the final stats as one JSON line. The first line
printed is `listening on URL`, so a parent process started with `--port 0` can read the port.
`--responder pkg.module:function` answers with your own function of a `SimRequest` (a str, JSON
when the request asks for it) instead of generic lorem-ipsum JSON.
"""

from __future__ import annotations

import argparse
import json
import signal
import threading
from types import FrameType
from typing import cast

from llm_batch_queue._imports import load_attribute
from llm_batch_queue.errors import ConfigError
from llm_batch_queue.simulator.config import parse_model_spec
from llm_batch_queue.simulator.responder import Responder, lorem_responder
from llm_batch_queue.simulator.server import Simulator


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m llm_batch_queue.simulator")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765, help="0 picks a free port")
    parser.add_argument(
        "--model",
        dest="models",
        action="append",
        type=parse_model_spec,
        metavar="NAME[:key=value,...]",
        help="repeatable; keys: rpm, tpm, rpd, thinking_tokens, not_found, latency=LOW-HIGH "
        "(seconds), "
        "server_error_rate, unavailable_rate, stall_rate, stall_s, not_json_rate, empty_rate, "
        "rate_limit_rate, rate_limit_retry_s, "
        "truncated_rate",
    )
    parser.add_argument(
        "--responder",
        metavar="MODULE:FUNCTION",
        help="answer each request with FUNCTION(SimRequest) -> str (default: lorem-ipsum JSON)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--api-key", dest="api_keys", action="append", help="repeatable; default: accept any key"
    )
    args = parser.parse_args(argv)
    models = dict(args.models or [parse_model_spec("gemini-2.5-flash")])
    try:
        responder = _responder(args.responder) if args.responder else lorem_responder
    except ConfigError as exc:
        parser.error(str(exc))

    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    with Simulator(
        models,
        responder=responder,
        seed=args.seed,
        api_keys=args.api_keys,
        host=args.host,
        port=args.port,
    ) as sim:
        print(f"listening on {sim.url}", flush=True)
        stop.wait()
        print(json.dumps({m: s.to_json() for m, s in sim.stats().items()}), flush=True)


def _responder(spec: str) -> Responder:
    found = load_attribute(spec, "--responder", "function")
    if not callable(found):
        raise ConfigError(f"--responder {spec}: {spec.partition(':')[2]!r} is not a function")
    return cast(Responder, found)


if __name__ == "__main__":
    main()
