"""The simulator's default responder, schema instances, token rule, faults and CLI specs."""

from __future__ import annotations

import json
from datetime import date
from enum import Enum
from typing import Annotated, Any, Literal

import pydantic
import pytest

from llm_batch_queue.simulator import (
    Fault,
    FaultConfig,
    ModelConfig,
    lorem_responder,
    minimal_instance,
    parse_model_spec,
)
from llm_batch_queue.simulator.faults import FaultPlan
from llm_batch_queue.simulator.responder import input_tokens, parse_request
from llm_batch_queue.simulator.service import GeminiService


class Colour(Enum):
    RED = "red"
    BLUE = "blue"


class Address(pydantic.BaseModel):
    street: Annotated[str, pydantic.Field(min_length=8, max_length=12)]
    number: Annotated[int, pydantic.Field(gt=10, le=20)]


class Person(pydantic.BaseModel):
    name: str
    born: date
    colour: Colour
    kind: Literal["customer", "vendor"]
    address: Address
    previous: Address | None
    tags: Annotated[list[str], pydantic.Field(min_length=2)]
    score: Annotated[float, pydantic.Field(ge=1.5)]
    nickname: str = "none"
    manager: Person | None = None


def test_minimal_instance_of_a_pydantic_schema_validates() -> None:
    instance = minimal_instance(Person.model_json_schema())
    person = Person.model_validate(instance)
    assert person.address.number == 11
    assert len(person.tags) == 2
    assert "nickname" not in instance  # only required properties are filled


def test_minimal_instance_of_a_gemini_response_schema() -> None:
    schema = {
        "type": "OBJECT",
        "required": ["name", "population", "districts"],
        "properties": {
            "name": {"type": "STRING"},
            "population": {"type": "INTEGER", "minimum": "1000"},
            "districts": {"type": "ARRAY", "minItems": "1", "items": {"type": "STRING"}},
            "capital": {"type": "BOOLEAN"},
        },
    }
    assert minimal_instance(schema) == {"name": "lorem", "population": 1000, "districts": ["lorem"]}


def test_lorem_responder_answers_json_only_when_asked() -> None:
    schema = Address.model_json_schema()
    structured = parse_request("m", {"generationConfig": {"responseJsonSchema": schema}})
    Address.model_validate_json(lorem_responder(structured))
    plain = parse_request("m", {"contents": [{"parts": [{"text": "hello"}]}]})
    assert "hello" in lorem_responder(plain)
    with pytest.raises(ValueError):
        json.loads(lorem_responder(plain))


def test_parse_request_collects_prompt_system_and_schema() -> None:
    request = parse_request(
        "m",
        {
            "contents": [
                {"role": "user", "parts": [{"text": "a"}, {"text": "b"}]},
                {"role": "user", "parts": [{"inlineData": {"data": "..."}}]},
            ],
            "systemInstruction": {"role": "user", "parts": [{"text": "sys"}]},
            "generationConfig": {"responseMimeType": "application/json", "responseSchema": {}},
        },
    )
    assert (request.prompt, request.system, request.wants_json) == ("a\nb", "sys", True)
    assert request.json_schema == {}


def test_count_tokens_body_matches_what_generate_charges() -> None:
    generate = {
        "contents": [{"parts": [{"text": "x" * 21}]}],
        "systemInstruction": {"parts": [{"text": "y" * 6}]},
    }
    count = {"contents": [{"parts": [{"text": "y" * 6}]}, {"parts": [{"text": "x" * 21}]}]}
    assert input_tokens(generate) == input_tokens(count) == 7  # ceil(27 / 4)


def test_fault_draws_are_reproducible_per_seed() -> None:
    config = FaultConfig(server_error_rate=0.3, not_json_rate=0.3)
    plan_a, plan_b = FaultPlan(config, "0:m"), FaultPlan(config, "0:m")
    draws_a = [plan_a.draw() for _ in range(200)]
    assert draws_a == [plan_b.draw() for _ in range(200)]
    assert set(draws_a) == {Fault.SERVER_ERROR, Fault.NOT_JSON, None}
    plan_a.reset()
    assert [plan_a.draw() for _ in range(200)] == draws_a


def test_random_faults_hit_admitted_requests() -> None:
    service = GeminiService({"m": ModelConfig(faults=FaultConfig(unavailable_rate=1.0))})
    reply = service.handle(
        api_version="v1beta", model="m", method="generateContent", body={}, api_key="k"
    )
    assert reply.status == 503
    assert reply.body["error"]["status"] == "UNAVAILABLE"
    assert service.stats()["m"].admitted == 1  # the provider spent quota on it


def test_latency_and_stall_are_returned_as_delays() -> None:
    faults = FaultConfig(latency_s=(0.25, 0.25), stall_s=9.0)
    service = GeminiService({"m": ModelConfig(faults=faults)})

    def delay() -> float:
        return service.handle(
            api_version="v1", model="m", method="generateContent", body={}, api_key="k"
        ).delay_s

    assert delay() == 0.25
    service.force("m", Fault.STALL)
    assert delay() == 9.0


@pytest.mark.parametrize("rates", [{"stall_rate": 0.7, "empty_rate": 0.4}, {"empty_rate": -0.1}])
def test_fault_rates_are_validated(rates: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        FaultConfig(**rates)


def test_model_spec_parses_limits_faults_and_latency() -> None:
    name, config = parse_model_spec(
        "gemini-2.5-pro:rpm=5,tpm=1000,rpd=50,unavailable_rate=0.1,latency=0.1-0.3,not_found=true"
    )
    assert name == "gemini-2.5-pro"
    assert (config.rpm, config.tpm, config.rpd, config.not_found) == (5, 1000, 50, True)
    assert config.faults.unavailable_rate == 0.1
    assert config.faults.latency_s == (0.1, 0.3)
    assert parse_model_spec("m") == ("m", ModelConfig())


@pytest.mark.parametrize("spec", ["m:rpm", "m:speed=3", ":rpm=3", "m:rpm=0"])
def test_bad_model_specs_are_rejected(spec: str) -> None:
    with pytest.raises(ValueError):
        parse_model_spec(spec)
