"""The simulator over raw HTTP: wire shapes, auth, control endpoints and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx2
import pytest

from llm_batch_queue.simulator import Fault, FaultConfig, ModelConfig, Simulator

MODEL = "gemini-2.5-flash"
GENERATE = f"/v1beta/models/{MODEL}:generateContent"
KEY = {"x-goog-api-key": "fake-key"}


def prompt(text: str, **generation_config: Any) -> dict[str, Any]:
    return {
        "contents": [{"role": "user", "parts": [{"text": text}]}],
        "generationConfig": generation_config,
    }


@pytest.fixture
def sim() -> Iterator[Simulator]:
    with Simulator({MODEL: ModelConfig(thinking_tokens=4)}, api_keys={"fake-key"}) as sim:
        yield sim


@pytest.fixture
def http(sim: Simulator) -> Iterator[httpx2.Client]:
    with httpx2.Client(base_url=sim.url) as client:
        yield client


def test_generate_content_reply_has_geminis_shape(http: httpx2.Client) -> None:
    reply = http.post(GENERATE, json=prompt("x" * 10), headers=KEY)
    assert reply.status_code == 200
    data = reply.json()
    candidate = data["candidates"][0]
    assert candidate["finishReason"] == "STOP"
    text = candidate["content"]["parts"][0]["text"]
    assert data["usageMetadata"] == {
        "promptTokenCount": 3,
        "candidatesTokenCount": -(-len(text) // 4),
        "thoughtsTokenCount": 4,
        "totalTokenCount": 3 + -(-len(text) // 4) + 4,
        "promptTokensDetails": [{"modality": "TEXT", "tokenCount": 3}],
    }
    assert data["modelVersion"] == MODEL
    assert data["responseId"]


def test_the_key_may_come_as_a_query_parameter(http: httpx2.Client) -> None:
    assert http.post(GENERATE + "?key=fake-key", json=prompt("hi")).status_code == 200


def test_missing_and_invalid_keys_are_refused(http: httpx2.Client) -> None:
    missing = http.post(GENERATE, json=prompt("hi"))
    assert missing.status_code == 403
    assert missing.json()["error"]["status"] == "PERMISSION_DENIED"
    invalid = http.post(GENERATE, json=prompt("hi"), headers={"x-goog-api-key": "other"})
    assert invalid.status_code == 400
    assert invalid.json()["error"]["details"][0]["reason"] == "API_KEY_INVALID"


def test_unknown_models_paths_and_bodies(http: httpx2.Client) -> None:
    unknown = http.post("/v1/models/gemini-0:generateContent", json=prompt("hi"), headers=KEY)
    assert unknown.status_code == 404
    assert unknown.json()["error"]["message"].startswith(
        "models/gemini-0 is not found for API version v1,"
    )
    assert http.post("/v1beta/files", json={}, headers=KEY).status_code == 404
    bad_json = http.post(GENERATE, content=b"{nope", headers=KEY)
    assert bad_json.status_code == 400


def test_max_output_tokens_cuts_the_reply(http: httpx2.Client) -> None:
    data = http.post(GENERATE, json=prompt("x" * 100, maxOutputTokens=2), headers=KEY).json()
    candidate = data["candidates"][0]
    assert candidate["finishReason"] == "MAX_TOKENS"
    assert len(candidate["content"]["parts"][0]["text"]) == 8


def test_marking_a_model_not_found_at_runtime(sim: Simulator, http: httpx2.Client) -> None:
    sim.configure(MODEL, ModelConfig(not_found=True))
    assert http.post(GENERATE, json=prompt("hi"), headers=KEY).status_code == 404
    assert sim.stats()[MODEL].requests_by_status == {404: 1}


def test_control_endpoints_force_report_and_reset(http: httpx2.Client) -> None:
    forced = http.post("/_sim/force", json={"model": MODEL, "fault": "429-day", "times": 2})
    assert forced.status_code == 200
    assert http.post("/_sim/force", json={"model": MODEL, "fault": "nope"}).status_code == 400
    statuses = [http.post(GENERATE, json=prompt("hi"), headers=KEY).status_code for _ in range(3)]
    assert statuses == [429, 429, 200]
    stats = http.get("/_sim/stats").json()[MODEL]
    assert stats["requests_by_status"] == {"200": 1, "429": 2}
    assert stats["rate_limited"] == {"requests_per_day": 2}
    assert http.post("/_sim/reset").status_code == 200
    assert http.get("/_sim/stats").json()[MODEL]["admitted"] == 0


def test_admissions_lists_each_admitted_call_with_its_time_and_tokens(
    sim: Simulator, http: httpx2.Client
) -> None:
    sim.force(MODEL, Fault.RATE_LIMIT_MINUTE)
    before = time.time()
    statuses = [http.post(GENERATE, json=prompt(t), headers=KEY).status_code for t in "ab"]
    assert statuses == [429, 200]  # a refused call is no admission
    (admitted,) = http.get("/_sim/admissions").json()[MODEL]
    assert before <= admitted[0] <= time.time() and admitted[1] == 1
    assert sim.admissions()[MODEL] == [tuple(admitted)]


def test_forced_faults_are_consumed_in_order(sim: Simulator, http: httpx2.Client) -> None:
    sim.force(MODEL, Fault.UNAVAILABLE)
    sim.force(MODEL, Fault.RATE_LIMIT_BARE)
    sim.force(MODEL, Fault.TRUNCATED)
    first, second, third = (
        http.post(GENERATE, json=prompt("hi", responseMimeType="application/json"), headers=KEY)
        for _ in range(3)
    )
    assert first.status_code == 503
    assert second.json()["error"]["details"] == [
        {
            "@type": "type.googleapis.com/google.rpc.Help",
            "links": [
                {
                    "description": "Learn more about Gemini API quotas",
                    "url": "https://ai.google.dev/gemini-api/docs/rate-limits",
                }
            ],
        }
    ]
    assert third.json()["candidates"][0] == {
        "content": {"role": "model", "parts": [{"text": "{"}]},
        "finishReason": "MAX_TOKENS",
        "index": 0,
    }
    assert sim.stats()[MODEL].admitted == 1  # forced errors are refusals, not admissions


def test_cli_serves_until_terminated_and_prints_stats() -> None:
    models = ["--model", f"{MODEL}:rpm=1", "--model", "gemini-2.5-pro"]
    process = subprocess.Popen(
        [sys.executable, "-m", "llm_batch_queue.simulator", "--port", "0", *models],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        banner = process.stdout.readline()
        assert banner.startswith("listening on http://127.0.0.1:")
        url = banner.split()[-1]
        with httpx2.Client(base_url=url, headers=KEY) as http:
            assert http.post(GENERATE, json=prompt("hi")).status_code == 200
            limited = http.post(GENERATE, json=prompt("hi"))
            assert limited.status_code == 429
            assert "Please retry in" in limited.json()["error"]["message"]
        process.terminate()
        out, _ = process.communicate(timeout=10)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0
    final = json.loads(out.strip().splitlines()[-1])
    assert final[MODEL]["requests_by_status"] == {"200": 1, "429": 1}
    assert final["gemini-2.5-pro"]["admitted"] == 0


def test_injected_429s_carry_retry_info_and_admit_nothing() -> None:
    faults = FaultConfig(rate_limit_rate=0.5, rate_limit_retry_s=3.0)
    with Simulator({MODEL: ModelConfig(rpm=100, faults=faults)}, seed=7) as sim:
        with httpx2.Client(base_url=sim.url) as http:
            replies = [http.post(GENERATE, json=prompt(f"{i}"), headers=KEY) for i in range(40)]
        refused = [r for r in replies if r.status_code == 429]
        assert 5 < len(refused) < 35 and all(r.status_code in (200, 429) for r in replies)
        details = {d["@type"].rsplit(".", 1)[-1]: d for d in refused[0].json()["error"]["details"]}
        assert details["RetryInfo"]["retryDelay"] == "3s"
        assert "PerMinute" in details["QuotaFailure"]["violations"][0]["quotaId"]
        assert len(sim.admissions()[MODEL]) == 40 - len(refused)
        assert sim.stats()[MODEL].rate_limited["injected"] == len(refused)


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        (lambda request: 1 / 0, "ZeroDivisionError"),
        (lambda request: {"a": 1}, "TypeError: returned dict, not str"),
    ],
)
def test_a_responder_that_fails_is_the_clients_500_with_the_reason(
    answer: Any, reason: str
) -> None:
    """It dropped the connection, the traceback only on the simulator's stderr (adversarial
    trial of --responder)."""
    with Simulator({MODEL: ModelConfig()}, responder=answer) as sim:
        with httpx2.Client(base_url=sim.url, headers=KEY) as http:
            reply = http.post(GENERATE, json=prompt("hi"))
        assert reply.status_code == 500
        assert f"the simulator's responder failed: {reason}" in reply.json()["error"]["message"]
        assert sim.stats()[MODEL].requests_by_status == {500: 1}
