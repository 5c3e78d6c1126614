"""Price tables for RunSummary costs: JSON text or a .json/.toml file, mistakes named clearly."""

from __future__ import annotations

from pathlib import Path

import pytest

from llm_batch_queue.errors import ConfigError
from llm_batch_queue.summary import ModelPrice, ModelUsage, load_prices


def test_json_text_and_a_toml_file_give_the_same_table(tmp_path: Path) -> None:
    text = '{"gemini-2.5-pro": {"input": 1.25, "output": 10}}'
    toml = tmp_path / "prices.toml"
    toml.write_text('["gemini-2.5-pro"]\ninput = 1.25\noutput = 10\n', encoding="utf-8")
    expected = {"gemini-2.5-pro": ModelPrice(1.25, 10.0)}
    assert load_prices(text) == load_prices(toml) == expected


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("[1]", "expected an object of models"),
        ('{"m": {"input": 1}}', "exactly the keys 'input' and 'output'"),
        ('{"m": {"input": 1, "output": -2}}', "model 'm'.*>= 0"),
        ('{"m": {"input": "1", "output": 2}}', "a price is a number"),
        ('{"m": {"input": true, "output": 2}}', "a price is a number"),
        ("{nope", "not valid JSON"),
    ],
)
def test_mistakes_are_config_errors_naming_the_place(text: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match) as err:
        load_prices(text, "ELEVRA_PRICES")
    assert "ELEVRA_PRICES" in str(err.value)


def test_thinking_tokens_are_billed_as_output() -> None:
    usage = ModelUsage(
        "m", 1, 1, input_tokens=2_000_000, output_tokens=500_000, thinking_tokens=500_000
    )
    assert usage.cost_usd(ModelPrice(1.0, 10.0)) == pytest.approx(2.0 + 10.0)
