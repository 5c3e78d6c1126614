"""The simulated Gemini API without HTTP: request in, status + body + delay out.

One lock guards quota checks, admissions and counters, so limits hold across all threads of
the server process (and, over HTTP, across every client process).
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any

from llm_batch_queue.simulator import payloads
from llm_batch_queue.simulator.config import ModelConfig
from llm_batch_queue.simulator.faults import Fault, FaultPlan, ForcedFault
from llm_batch_queue.simulator.quota import QuotaKind, QuotaLedger, seconds_until_reset
from llm_batch_queue.simulator.responder import (
    Responder,
    input_tokens,
    lorem_responder,
    parse_request,
    token_count,
)
from llm_batch_queue.simulator.stats import ModelStats, ModelTally

DEFAULT_FORCED_RETRY_S = 30.0
_SERVER_ERRORS = {Fault.SERVER_ERROR: 500, Fault.UNAVAILABLE: 503}
_FORCED_QUOTAS = {
    Fault.RATE_LIMIT_MINUTE: QuotaKind.REQUESTS_PER_MINUTE,
    Fault.RATE_LIMIT_TOKENS: QuotaKind.INPUT_TOKENS_PER_MINUTE,
    Fault.RATE_LIMIT_DAY: QuotaKind.REQUESTS_PER_DAY,
}


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    body: dict[str, Any]
    delay_s: float = 0.0  # how long the server waits before answering (latency or a stall)


@dataclass(slots=True)
class _Model:
    config: ModelConfig
    plan: FaultPlan
    ledger: QuotaLedger
    tally: ModelTally


class GeminiService:
    def __init__(
        self,
        models: Mapping[str, ModelConfig],
        *,
        responder: Responder = lorem_responder,
        clock: Callable[[], float] = time.time,
        seed: int = 0,
        api_keys: Collection[str] | None = None,
    ) -> None:
        self._responder = responder
        self._clock = clock
        self._seed = seed
        self._api_keys = frozenset(api_keys) if api_keys is not None else None
        self._lock = threading.Lock()
        self._response_ids = itertools.count(1)
        self._models: dict[str, _Model] = {}
        for name, config in models.items():
            self.configure(name, config)

    def configure(self, model: str, config: ModelConfig) -> None:
        """Add a model or replace its limits and faults; its counters and windows are kept."""
        with self._lock:
            if model in self._models:
                self._models[model].config = config
                self._models[model].plan.config = config.faults
            else:
                plan = FaultPlan(config.faults, seed=f"{self._seed}:{model}")
                self._models[model] = _Model(config, plan, QuotaLedger(), ModelTally())

    def force(
        self, model: str, fault: Fault, *, times: int = 1, retry_after_s: float | None = None
    ) -> None:
        """Make the next `times` generateContent calls to `model` meet `fault`."""
        with self._lock:
            self._models[model].plan.force(ForcedFault(fault, retry_after_s), times)

    def stats(self) -> dict[str, ModelStats]:
        with self._lock:
            return {name: m.tally.snapshot() for name, m in self._models.items()}

    def admissions(self) -> dict[str, list[tuple[float, int]]]:
        """Every admitted generateContent call per model: (admitted at, input tokens), in order.

        For benchmarks that measure load over windows of their own choosing.
        """
        with self._lock:
            return {name: sorted(m.tally.admissions) for name, m in self._models.items()}

    def reset(self) -> None:
        """Forget all admissions, counters and forced faults; reseed the fault RNGs."""
        with self._lock:
            for m in self._models.values():
                m.ledger, m.tally = QuotaLedger(), ModelTally()
                m.plan.reset()
            self._response_ids = itertools.count(1)

    def handle(
        self,
        *,
        api_version: str,
        model: str,
        method: str,
        body: dict[str, Any] | None,
        api_key: str | None,
    ) -> Reply:
        if not api_key:
            return Reply(403, _UNREGISTERED_CALLER)
        if self._api_keys is not None and api_key not in self._api_keys:
            return Reply(400, _INVALID_KEY)
        entry = self._models.get(model)
        if entry is None or entry.config.not_found:
            if entry is not None and method == "generateContent":
                with self._lock:
                    entry.tally.statuses[404] += 1
            return Reply(404, payloads.model_not_found(model, api_version, method))
        if body is None:
            return Reply(400, payloads.error(400, "INVALID_ARGUMENT", "Invalid JSON payload."))
        if method == "countTokens":
            with self._lock:
                entry.tally.count_tokens_requests += 1
            return Reply(200, {"totalTokens": input_tokens(body)})
        return self._generate(api_version, model, entry, body)

    def _generate(self, api_version: str, model: str, entry: _Model, body: dict[str, Any]) -> Reply:
        tokens = input_tokens(body)
        with self._lock:
            now = self._clock()
            forced = entry.plan.next_forced()
            if forced is not None and forced.fault.is_error:
                reply = self._forced_error(api_version, model, entry, forced, now)
                entry.tally.statuses[reply.status] += 1
                return reply
            if entry.plan.rate_limited():
                entry.tally.statuses[429] += 1
                entry.tally.rate_limited["injected"] += 1
                retry_s = entry.config.faults.rate_limit_retry_s
                return Reply(
                    429,
                    payloads.quota_exceeded(
                        QuotaKind.REQUESTS_PER_MINUTE, model, entry.config.rpm, retry_s
                    ),
                )
            violation = entry.ledger.check(entry.config, now, tokens)
            if violation is not None:
                entry.tally.statuses[429] += 1
                entry.tally.rate_limited[violation.kind.value] += 1
                return Reply(
                    429,
                    payloads.quota_exceeded(
                        violation.kind, model, violation.limit, violation.retry_after_s
                    ),
                )
            entry.ledger.admit(now, tokens)
            entry.tally.admissions.append((now, tokens))
            fault = forced.fault if forced is not None else entry.plan.draw()
            latency = entry.plan.latency()
            if fault in _SERVER_ERRORS:
                entry.tally.statuses[_SERVER_ERRORS[fault]] += 1
                return Reply(
                    _SERVER_ERRORS[fault], payloads.server_error(_SERVER_ERRORS[fault]), latency
                )
            response_id = f"sim-{next(self._response_ids):08d}"

        # The responder is user code and may be slow: it runs outside the lock. Its failure is
        # the client's 500 with the reason (it used to drop the connection, the traceback only
        # on the simulator's stderr)
        try:
            answer = self._responder(parse_request(model, body))
            if not isinstance(answer, str):
                raise TypeError(f"returned {type(answer).__name__}, not str")
        except Exception as exc:
            with self._lock:
                entry.tally.statuses[500] += 1
            reason = f"the simulator's responder failed: {type(exc).__name__}: {exc}"
            return Reply(500, payloads.error(500, "INTERNAL", reason[:500]), latency)
        text, finish_reason = _apply_output_fault(answer, fault)
        max_tokens = (body.get("generationConfig") or {}).get("maxOutputTokens")
        if text is not None and max_tokens is not None and token_count(len(text)) > max_tokens:
            text, finish_reason = text[: int(max_tokens) * 4], "MAX_TOKENS"
        output = token_count(len(text or ""))
        thinking = entry.config.thinking_tokens
        with self._lock:
            entry.tally.statuses[200] += 1
            entry.tally.output_tokens += output
            entry.tally.thinking_tokens += thinking
        generated = payloads.generated(
            model=model,
            text=text,
            finish_reason=finish_reason,
            prompt_tokens=tokens,
            output_tokens=output,
            thinking_tokens=thinking,
            response_id=response_id,
        )
        return Reply(
            200, generated, entry.config.faults.stall_s if fault is Fault.STALL else latency
        )

    def _forced_error(
        self, api_version: str, model: str, entry: _Model, forced: ForcedFault, now: float
    ) -> Reply:
        fault = forced.fault
        if fault is Fault.NOT_FOUND:
            return Reply(404, payloads.model_not_found(model, api_version, "generateContent"))
        if fault in _SERVER_ERRORS:
            return Reply(_SERVER_ERRORS[fault], payloads.server_error(_SERVER_ERRORS[fault]))
        if fault is Fault.RATE_LIMIT_BARE:
            entry.tally.rate_limited["unknown"] += 1
            return Reply(429, payloads.bare_quota_exceeded())
        kind = _FORCED_QUOTAS[fault]
        entry.tally.rate_limited[kind.value] += 1
        if kind is QuotaKind.REQUESTS_PER_DAY:
            delay = seconds_until_reset(now)
        elif forced.retry_after_s is not None:
            delay = forced.retry_after_s
        else:
            delay = DEFAULT_FORCED_RETRY_S
        limit = {
            QuotaKind.REQUESTS_PER_MINUTE: entry.config.rpm,
            QuotaKind.INPUT_TOKENS_PER_MINUTE: entry.config.tpm,
            QuotaKind.REQUESTS_PER_DAY: entry.config.rpd,
        }[kind]
        return Reply(429, payloads.quota_exceeded(kind, model, limit, delay))


def _apply_output_fault(text: str, fault: Fault | None) -> tuple[str | None, str]:
    """The reply text and finish reason after an output fault; None means no parts at all."""
    if fault is Fault.NOT_JSON:
        return f"Sure! Here is the JSON you asked for:\n```json\n{text}\n```", "STOP"
    if fault is Fault.EMPTY:
        return None, "STOP"
    if fault is Fault.TRUNCATED:
        return text[: len(text) // 2], "MAX_TOKENS"
    return text, "STOP"


_UNREGISTERED_CALLER = payloads.error(
    403,
    "PERMISSION_DENIED",
    "Method doesn't allow unregistered callers (callers without established identity). "
    "Please use API Key or other form of API consumer identity to call this API.",
)
_INVALID_KEY = payloads.error(
    400,
    "INVALID_ARGUMENT",
    "API key not valid. Please pass a valid API key.",
    [
        {
            "@type": "type.googleapis.com/google.rpc.ErrorInfo",
            "reason": "API_KEY_INVALID",
            "domain": "googleapis.com",
            "metadata": {"service": "generativelanguage.googleapis.com"},
        }
    ],
)
