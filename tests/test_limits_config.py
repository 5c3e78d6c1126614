"""Limits from JSON text, JSON and TOML files and environment variables; every error names where."""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import fields
from pathlib import Path

import pytest

from examples.elevra_upload.cli import _config, main
from examples.elevra_upload.config import DEFAULT_LIMITS, AppConfig
from llm_batch_queue import ConfigError, ModelLimits, limits_from_env, load_limits
from llm_batch_queue.limits_config import _KEYS

ALLOWED = "allowed keys: rpm, tpm, rpd, max_in_flight, day_tz, window_s, window_margin_s"

FLASH = {
    "rpm": 1000,
    "tpm": 1_000_000,
    "rpd": 10_000,
    "max_in_flight": 50,
    "day_tz": "America/Los_Angeles",
    "window_margin_s": 0.25,
}
FLASH_LIMITS = ModelLimits(
    rpm=1000,
    tpm=1_000_000,
    rpd=10_000,
    max_in_flight=50,
    day_tz="America/Los_Angeles",
    window_margin_s=0.25,
)

TOML = """\
[default]
day_tz = "UTC"
window_s = 30

["gemini-2.5-flash"]
rpm = 1000
tpm = 1_000_000
rpd = 10_000
max_in_flight = 50
day_tz = "America/Los_Angeles"
window_margin_s = 0.25

["gpt-4o.mini"]
rpm = 500
"""


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def _error(source: object) -> str:
    with pytest.raises(ConfigError) as info:
        load_limits(source)  # type: ignore[arg-type]
    return str(info.value)


# --- what is read -------------------------------------------------------------------------------


def test_every_model_limits_field_is_configurable() -> None:
    assert set(_KEYS) == {f.name for f in fields(ModelLimits)}


def test_json_text() -> None:
    assert load_limits(json.dumps({"gemini-2.5-flash": FLASH})) == {
        "gemini-2.5-flash": FLASH_LIMITS
    }


def test_json_text_with_leading_whitespace_and_empty_object() -> None:
    assert load_limits('  \n {"m": {"rpm": 3}}') == {"m": ModelLimits(rpm=3)}
    assert load_limits("{}") == {}


def test_json_file_as_str_and_as_path(tmp_path: Path) -> None:
    path = _write(tmp_path, "limits.json", json.dumps({"gemini-2.5-flash": FLASH}))
    assert load_limits(str(path)) == {"gemini-2.5-flash": FLASH_LIMITS}
    assert load_limits(path) == {"gemini-2.5-flash": FLASH_LIMITS}


def test_a_file_not_ending_in_toml_is_read_as_json(tmp_path: Path) -> None:
    # the example app always accepted any JSON file, whatever its name
    path = _write(tmp_path, "limits.conf", '{"m": {"rpm": 7}}')
    assert load_limits(path) == {"m": ModelLimits(rpm=7)}


def test_toml_file_with_quoted_model_tables_and_default(tmp_path: Path) -> None:
    path = _write(tmp_path, "limits.TOML", TOML)
    limits = load_limits(path)
    assert list(limits) == ["default", "gemini-2.5-flash", "gpt-4o.mini"]
    # the model's own day_tz wins over the default; window_s comes from the default
    assert limits["gemini-2.5-flash"] == ModelLimits(
        rpm=1000,
        tpm=1_000_000,
        rpd=10_000,
        max_in_flight=50,
        day_tz="America/Los_Angeles",
        window_s=30.0,
        window_margin_s=0.25,
    )
    assert limits["gpt-4o.mini"] == ModelLimits(rpm=500, day_tz="UTC", window_s=30.0)
    assert isinstance(limits["gpt-4o.mini"].window_s, float)


def test_default_applies_to_every_model_unless_overridden() -> None:
    text = json.dumps(
        {
            "default": {"day_tz": "Europe/Paris", "rpm": 60, "max_in_flight": 4},
            "a": {},
            "b": {"rpm": 10},
            "c": {"rpm": None, "day_tz": "UTC"},  # null: unlimited, overriding the default
        }
    )
    assert load_limits(text) == {
        "default": ModelLimits(rpm=60, max_in_flight=4, day_tz="Europe/Paris"),
        "a": ModelLimits(rpm=60, max_in_flight=4, day_tz="Europe/Paris"),
        "b": ModelLimits(rpm=10, max_in_flight=4, day_tz="Europe/Paris"),
        "c": ModelLimits(rpm=None, max_in_flight=4, day_tz="UTC"),
    }


def test_default_alone_is_kept_for_the_models_it_does_not_list_and_checked() -> None:
    # it used to give an empty mapping: every model ran unlimited, silently
    assert load_limits('{"default": {"rpm": 5}}') == {"default": ModelLimits(rpm=5)}
    assert _error('{"default": {"rpm": 0}}') == (
        "limits JSON text: default, key 'rpm': rpm must be a positive integer or None, got 0"
    )


def test_env_unset_or_blank_is_empty() -> None:
    assert limits_from_env({}) == {}
    assert limits_from_env({"LBQ_LIMITS": ""}) == {}
    assert limits_from_env({"LBQ_LIMITS": "  "}) == {}


def test_env_json_text() -> None:
    env = {"LBQ_LIMITS": '{"gemini-2.5-flash": {"rpm": 100}}', "OTHER": "{"}
    assert limits_from_env(env) == {"gemini-2.5-flash": ModelLimits(rpm=100)}


def test_env_path_to_json_and_toml(tmp_path: Path) -> None:
    json_path = _write(tmp_path, "l.json", json.dumps({"gemini-2.5-flash": FLASH}))
    toml_path = _write(tmp_path, "l.toml", TOML)
    assert limits_from_env({"LBQ_LIMITS": str(json_path)}) == {"gemini-2.5-flash": FLASH_LIMITS}
    assert set(limits_from_env({"LBQ_LIMITS": str(toml_path)})) == {
        "default",
        "gemini-2.5-flash",
        "gpt-4o.mini",
    }


def test_env_other_variable_name() -> None:
    env = {"LBQ_LIMITS": '{"a": {"rpm": 1}}', "MY_LIMITS": '{"b": {"rpm": 2}}'}
    assert limits_from_env(env, "MY_LIMITS") == {"b": ModelLimits(rpm=2)}


def test_env_defaults_to_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LBQ_LIMITS", '{"m": {"tpm": 9}}')
    assert limits_from_env() == {"m": ModelLimits(tpm=9)}
    monkeypatch.delenv("LBQ_LIMITS")
    assert limits_from_env() == {}


# --- every error names where, which model and which key ------------------------------------------


def test_unknown_key_lists_the_allowed_keys(tmp_path: Path) -> None:
    path = _write(tmp_path, "l.json", '{"gemini-2.5-flash": {"rpm": 5, "rqm": 5}}')
    assert _error(path) == (
        f"limits file '{path}': model 'gemini-2.5-flash': unknown key 'rqm'; {ALLOWED}"
    )


def test_unknown_key_in_toml_names_file_model_and_key(tmp_path: Path) -> None:
    path = _write(tmp_path, "l.toml", '["gemini-2.5-pro"]\nrpm = 5\nrequests = 3\n')
    assert _error(path) == (
        f"limits file '{path}': model 'gemini-2.5-pro': unknown key 'requests'; {ALLOWED}"
    )


def test_unquoted_dotted_toml_table_gets_a_hint(tmp_path: Path) -> None:
    path = _write(tmp_path, "l.toml", "[gemini-2.5-flash]\nrpm = 5\n")
    assert _error(path) == (
        f"limits file '{path}': model 'gemini-2': unknown key '5-flash'; {ALLOWED};"
        ' a model name with dots must be quoted in TOML, as in ["gemini-2.5-flash"]'
    )


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("rpm", '"100"', "expected a positive integer (or null for unlimited), got a string '100'"),
        ("tpm", "1.5", "expected a positive integer (or null for unlimited), got a number 1.5"),
        ("rpd", "true", "expected a positive integer (or null for unlimited), got a boolean True"),
        (
            "day_tz",
            "-8",
            "expected a string naming an IANA time zone, such as 'America/Los_Angeles',"
            " got an integer -8",
        ),
        ("window_s", '"60"', "expected a finite number of seconds, got a string '60'"),
        ("window_margin_s", "NaN", "expected a finite number of seconds, got a number nan"),
        ("window_s", "null", "expected a finite number of seconds, got null None"),
    ],
)
def test_wrong_type_says_the_expected_type(key: str, value: str, expected: str) -> None:
    assert _error(f'{{"m-1.0": {{"{key}": {value}}}}}') == (
        f"limits JSON text: model 'm-1.0', key '{key}': {expected}"
    )


def test_wrong_type_in_toml(tmp_path: Path) -> None:
    path = _write(tmp_path, "l.toml", '["m"]\nrpm = "lots"\n')
    assert _error(path) == (
        f"limits file '{path}': model 'm', key 'rpm':"
        " expected a positive integer (or null for unlimited), got a string 'lots'"
    )


def test_negative_rpm_gives_the_model_limits_message(tmp_path: Path) -> None:
    path = _write(tmp_path, "l.json", '{"gemini-2.5-flash": {"rpm": -5}}')
    assert _error(path) == (
        f"limits file '{path}': model 'gemini-2.5-flash', key 'rpm':"
        " rpm must be a positive integer or None, got -5"
    )


def test_negative_window_margin_names_the_key() -> None:
    assert _error('{"m": {"window_margin_s": -0.5}}') == (
        "limits JSON text: model 'm', key 'window_margin_s':"
        " window_s must be positive and window_margin_s not negative"
    )


def test_unknown_time_zone(tmp_path: Path) -> None:
    path = _write(tmp_path, "l.toml", '[default]\nday_tz = "Pacific/Nowhere"\n["m"]\nrpm = 1\n')
    assert _error(path) == (
        f"limits file '{path}': default, key 'day_tz':"
        " unknown time zone for the provider day: 'Pacific/Nowhere'"
    )


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    assert _error(path) == (
        f"limits file '{path}': no such file (limits are JSON text starting with '{{'"
        " or the path of a .json or .toml file)"
    )


def test_a_directory_is_not_a_limits_file(tmp_path: Path) -> None:
    assert (
        _error(tmp_path) == f"limits file '{tmp_path}': is a directory, not a .json or .toml file"
    )


def test_empty_source() -> None:
    assert _error("") == (
        "limits source: empty; give JSON text or the path of a .json or .toml file"
    )


def test_malformed_json_text_and_file(tmp_path: Path) -> None:
    assert _error('{"m": {"rpm": 5,}}') == (
        "limits JSON text: not valid JSON: Expecting property name enclosed in double quotes:"
        " line 1 column 17 (char 16)"
    )
    path = _write(tmp_path, "l.json", '{"m": {"rpm": 5}\n')
    assert _error(path) == (
        f"limits file '{path}': not valid JSON: Expecting ',' delimiter: line 2 column 1 (char 17)"
    )


def test_malformed_toml(tmp_path: Path) -> None:
    path = _write(tmp_path, "l.toml", '["m"]\nrpm = \n')
    message = _error(path)
    assert message.startswith(f"limits file '{path}': not valid TOML: ")
    assert re.search(r"line 2", message)


def test_non_utf8_file(tmp_path: Path) -> None:
    path = tmp_path / "l.json"
    path.write_bytes(b'{"m\xff": {}}')
    assert _error(path).startswith(f"limits file '{path}': not UTF-8 text")


@pytest.mark.parametrize(("text", "kind"), [("[1, 2]", "an array"), ('["m"]', "an array")])
def test_non_object_top_level(text: str, kind: str) -> None:
    assert _error(text) == (
        "limits JSON text: the top level must be an object mapping model names to their limits,"
        f' like {{"gemini-2.5-flash": {{"rpm": 1000}}}}; got {kind}'
    )


def test_non_object_top_level_in_a_file(tmp_path: Path) -> None:
    path = _write(tmp_path, "l.json", "42")
    assert _error(path).startswith(f"limits file '{path}': the top level must be an object")
    assert _error(path).endswith("got an integer")


def test_model_entry_that_is_not_a_table(tmp_path: Path) -> None:
    keys = "rpm, tpm, rpd, max_in_flight, day_tz, window_s, window_margin_s"
    assert _error('{"gemini-2.5-pro": 150}') == (
        "limits JSON text: model 'gemini-2.5-pro': expected an object (a TOML table) of limits"
        f" with keys {keys}; got an integer 150"
    )
    path = _write(tmp_path, "l.toml", "rpm = 150\n")  # a key outside any model's table
    assert _error(path) == (
        f"limits file '{path}': model 'rpm': expected an object (a TOML table) of limits"
        f" with keys {keys}; got an integer 150"
    )
    assert _error('{"default": [1]}').startswith("limits JSON text: default: expected an object")


def test_duplicate_json_keys_are_refused() -> None:
    assert _error('{"m": {"rpm": 1}, "m": {"rpm": 2}}') == (
        "limits JSON text: key 'm' appears twice in one JSON object"
    )


def test_empty_model_name() -> None:
    assert _error('{"": {"rpm": 1}}') == "limits JSON text: a model name is empty"


def test_env_errors_name_the_variable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        limits_from_env({"LBQ_LIMITS": '{"m": {"rpm": 0}}'})
    assert str(info.value) == (
        "LBQ_LIMITS (JSON text): model 'm', key 'rpm':"
        " rpm must be a positive integer or None, got 0"
    )
    path = _write(tmp_path, "l.toml", '["m"]\nburst = 3\n')
    with pytest.raises(ConfigError) as info:
        limits_from_env({"MY_LIMITS": str(path)}, "MY_LIMITS")
    assert str(info.value) == (
        f"MY_LIMITS (limits file '{path}'): model 'm': unknown key 'burst'; {ALLOWED}"
    )
    with pytest.raises(ConfigError) as info:
        limits_from_env({"LBQ_LIMITS": str(tmp_path / "missing.json")})
    assert str(info.value).startswith(
        f"LBQ_LIMITS (limits file '{tmp_path / 'missing.json'}'): no such file"
    )


# --- the example app reads its limits through the library ----------------------------------------


def test_app_env_limits_accept_toml_and_keep_the_other_defaults(tmp_path: Path) -> None:
    path = _write(tmp_path, "l.toml", '["gemini-2.5-pro"]\nrpm = 150\n')
    config = AppConfig.from_env({"ELEVRA_LIMITS": str(path)})
    assert config.limits["gemini-2.5-pro"] == ModelLimits(rpm=150)
    assert config.limits["gemini-2.5-flash"] == DEFAULT_LIMITS["gemini-2.5-flash"]
    assert AppConfig.from_env({"ELEVRA_LIMITS": ""}).limits == DEFAULT_LIMITS


def test_app_env_limits_errors_name_the_variable() -> None:
    with pytest.raises(ConfigError, match=r"^ELEVRA_LIMITS \(JSON text\): model 'x', key 'rpm'"):
        AppConfig.from_env({"ELEVRA_LIMITS": '{"x": {"rpm": -1}}'})


def test_app_cli_limits_flag(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("ELEVRA_LIMITS", raising=False)
    path = _write(tmp_path, "l.toml", '["gemini-2.5-flash"]\nrpm = 9\n')
    config = _config(argparse.Namespace(limits=str(path)))
    assert config.limits["gemini-2.5-flash"] == ModelLimits(rpm=9)
    assert config.limits["gemini-2.5-pro"] == DEFAULT_LIMITS["gemini-2.5-pro"]
    # a bad --limits is reported before any database or model is touched
    assert main(["dispatch", "--out", str(tmp_path), "--limits", '{"m": {"rpm": "x"}}']) == 2
    assert capsys.readouterr().err.startswith(
        "error: limits JSON text: model 'm', key 'rpm': expected a positive integer"
    )
    assert not (tmp_path / "elevra.db").exists()


def test_help_does_not_print_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    import inspect

    monkeypatch.setenv("GEMINI_API_KEY", "secret-in-the-environment")
    assert "secret-in-the-environment" not in str(inspect.signature(limits_from_env))
    monkeypatch.setenv("LBQ_LIMITS", '{"m": {"rpm": 5}}')
    assert limits_from_env()["m"].rpm == 5  # os.environ, read when called


def test_app_refuses_limits_for_a_model_no_chain_uses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # a typo would otherwise leave the real model on the limits the user meant to change
    with pytest.raises(ConfigError, match=r"^ELEVRA_LIMITS sets limits for 'gemini-2.5-flsh'"):
        AppConfig.from_env({"ELEVRA_LIMITS": '{"gemini-2.5-flsh": {"rpm": 5}}'})
    # a model is fine once a chain uses it
    config = AppConfig.from_env(
        {"ELEVRA_LIMITS": '{"m2": {"rpm": 5}}', "ELEVRA_STRUCTURE_MODELS": "m2"}
    )
    assert config.limits["m2"] == ModelLimits(rpm=5)
    monkeypatch.delenv("ELEVRA_LIMITS", raising=False)
    monkeypatch.delenv("ELEVRA_STRUCTURE_MODELS", raising=False)
    assert main(["dispatch", "--out", str(tmp_path), "--limits", '{"pro": {"rpm": 5}}']) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --limits sets limits for 'pro', which no model chain uses")
    assert not (tmp_path / "elevra.db").exists()  # refused before any database was made


def test_app_refuses_a_chain_model_without_limits() -> None:
    # unlimited, the dispatcher would send as fast as it can: a 429 storm
    with pytest.raises(ConfigError, match=r"^ELEVRA_STRUCTURE_MODELS uses 'm3', which has no"):
        AppConfig.from_env({"ELEVRA_STRUCTURE_MODELS": "gemini-2.5-flash,m3"})
    # an entry that sets no rate limit is no limit either (adversarial trial)
    with pytest.raises(
        ConfigError, match=r"^ELEVRA_ANALYZE_MODELS uses 'gemini-2.5-pro', whose limits set none"
    ):
        AppConfig.from_env({"ELEVRA_LIMITS": '{"gemini-2.5-pro": {"max_in_flight": 4}}'})
    with pytest.raises(ConfigError, match=r"give rpm, tpm or rpd in ELEVRA_LIMITS"):
        AppConfig.from_env({"ELEVRA_ANALYZE_MODELS": "m", "ELEVRA_LIMITS": '{"m": {}}'})


def test_app_refuses_a_default_entry_it_would_apply_to_no_model() -> None:
    # every model here has limits of its own, so a default changed nothing, silently
    with pytest.raises(ConfigError, match=r"^ELEVRA_LIMITS: 'default' is not taken here"):
        AppConfig.from_env({"ELEVRA_LIMITS": '{"default": {"rpm": 5}}'})


def test_app_refuses_a_model_twice_in_a_chain() -> None:
    with pytest.raises(ConfigError, match=r"^ELEVRA_ANALYZE_MODELS names 'gemini-2.5-pro' more"):
        AppConfig.from_env({"ELEVRA_ANALYZE_MODELS": "gemini-2.5-pro, gemini-2.5-pro"})
