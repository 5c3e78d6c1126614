"""Per-model limits read from JSON text, a JSON file or a TOML file, or named by an environment
variable.

One document, two syntaxes. The top level maps model names to tables of `ModelLimits` fields; the
reserved name `default` holds values every model gets unless it sets them itself, and is kept in
the result under that name: a Dispatcher gives it to the models the document does not list::

    {"default": {"day_tz": "America/Los_Angeles"},
     "gemini-2.5-flash": {"rpm": 1000, "tpm": 1000000, "rpd": 10000, "max_in_flight": 50}}

    [default]
    day_tz = "America/Los_Angeles"

    ["gemini-2.5-flash"]
    rpm = 1000
    tpm = 1_000_000

A path ending in `.toml` is read as TOML, any other path as JSON. Every mistake raises
`ConfigError` naming where the document came from, the model and the key.
"""

from __future__ import annotations

import json
import math
import os
import reprlib
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from llm_batch_queue.errors import ConfigError
from llm_batch_queue.limits import ModelLimits

DEFAULT_KEY = "default"
ENV_VAR = "LBQ_LIMITS"

# each ModelLimits field: the Python type a value must have, and how to say so in an error
_KEYS: dict[str, tuple[type, str]] = {
    "rpm": (int, "a positive integer (or null for unlimited)"),
    "tpm": (int, "a positive integer (or null for unlimited)"),
    "rpd": (int, "a positive integer (or null for unlimited)"),
    "max_in_flight": (int, "a positive integer (or null for unlimited)"),
    "day_tz": (str, "a string naming an IANA time zone, such as 'America/Los_Angeles'"),
    "window_s": (float, "a finite number of seconds"),
    "window_margin_s": (float, "a finite number of seconds"),
}


def load_limits(source: str | os.PathLike[str]) -> dict[str, ModelLimits]:
    """Limits per model from JSON text (a string starting with `{` or `[`) or a file path.

    A path ending in `.toml` (any case) is parsed as TOML, any other as JSON. Raises ConfigError.
    """
    return _load(source, None)


def limits_from_env(
    env: Mapping[str, str] | None = None, var: str = ENV_VAR
) -> dict[str, ModelLimits]:
    """Limits from the variable `var` of `env` (default: os.environ): JSON text or the path of a
    .json/.toml file.

    Unset or blank gives {}. Errors name the variable as well as the file, model and key.
    """
    # not a default argument: help() and API docs would print the whole environment, secrets too
    value = (os.environ if env is None else env).get(var, "")
    if not value.strip():
        return {}
    return _load(value, var)


def _load(source: str | os.PathLike[str], var: str | None) -> dict[str, ModelLimits]:
    data, origin = read_document(source, var, "limits")
    return _build(data, origin)


def read_document(source: str | os.PathLike[str], var: str | None, what: str) -> tuple[Any, str]:
    """JSON text (starting with `{` or `[`), or a .toml or JSON file, parsed; and where it came
    from, for error messages. Shared with the other settings documents (prices.py)."""
    if isinstance(source, str) and source.lstrip().startswith(("{", "[")):
        origin = f"{var} (JSON text)" if var else f"{what} JSON text"
        return _parse_json(source, origin), origin
    if not os.fspath(source).strip():
        raise ConfigError(
            f"{var or what + ' source'}: empty; give JSON text or the path of a .json or .toml file"
        )
    path = Path(source).expanduser()
    origin = f"{var} ({what} file '{path}')" if var else f"{what} file '{path}'"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            f"{origin}: no such file ({what} are JSON text starting with '{{'"
            " or the path of a .json or .toml file)"
        ) from None
    except IsADirectoryError:
        raise ConfigError(f"{origin}: is a directory, not a .json or .toml file") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{origin}: not UTF-8 text ({exc.reason})") from None
    except OSError as exc:
        raise ConfigError(f"{origin}: cannot be read: {exc.strerror or exc}") from None
    if path.suffix.lower() == ".toml":
        try:
            return tomllib.loads(text), origin
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{origin}: not valid TOML: {exc}") from None
    return _parse_json(text, origin), origin


def _parse_json(text: str, origin: str) -> Any:
    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in pairs:
            if key in out:
                raise ConfigError(f"{origin}: key {key!r} appears twice in one JSON object")
            out[key] = value
        return out

    try:
        return json.loads(text, object_pairs_hook=no_duplicates)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{origin}: not valid JSON: {exc}") from None


def _build(data: Any, origin: str) -> dict[str, ModelLimits]:
    if not isinstance(data, dict):
        raise ConfigError(
            f"{origin}: the top level must be an object mapping model names to their limits,"
            f' like {{"gemini-2.5-flash": {{"rpm": 1000}}}}; got {_kind(data)}'
        )
    default: dict[str, Any] = {}
    out: dict[str, ModelLimits] = {}
    if DEFAULT_KEY in data:
        default = _entry(data[DEFAULT_KEY], origin, "default")
        out[DEFAULT_KEY] = ModelLimits(**default)
    for model, values in data.items():
        if model == DEFAULT_KEY:
            continue
        if not model.strip():
            raise ConfigError(f"{origin}: a model name is empty")
        out[model] = ModelLimits(**{**default, **_entry(values, origin, f"model {model!r}")})
    return out


def _entry(values: Any, origin: str, where: str) -> dict[str, Any]:
    """One model's (or the default's) table, each key checked for name, type and value."""
    if not isinstance(values, dict):
        raise ConfigError(
            f"{origin}: {where}: expected an object (a TOML table) of limits with keys"
            f" {', '.join(_KEYS)}; got {_kind(values)} {reprlib.repr(values)}"
        )
    out: dict[str, Any] = {}
    for key, value in values.items():
        if key not in _KEYS:
            # TOML reads an unquoted [gemini-2.5-flash] as table "gemini-2" holding "5-flash"
            hint = (
                '; a model name with dots must be quoted in TOML, as in ["gemini-2.5-flash"]'
                if isinstance(value, dict)
                else ""
            )
            raise ConfigError(
                f"{origin}: {where}: unknown key {key!r}; allowed keys: {', '.join(_KEYS)}{hint}"
            )
        kind, expected = _KEYS[key]
        if kind is int:
            ok = value is None or (isinstance(value, int) and not isinstance(value, bool))
        elif kind is float:
            number = isinstance(value, int | float) and not isinstance(value, bool)
            ok = number and math.isfinite(value)
        else:
            ok = isinstance(value, str)
        if not ok:
            raise ConfigError(
                f"{origin}: {where}, key {key!r}: expected {expected}, got {_kind(value)}"
                f" {reprlib.repr(value)}"
            )
        try:
            ModelLimits(**{key: value})  # its own message for a negative count or unknown zone
        except ConfigError as exc:
            raise ConfigError(f"{origin}: {where}, key {key!r}: {exc}") from None
        out[key] = float(value) if kind is float else value
    return out


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__
