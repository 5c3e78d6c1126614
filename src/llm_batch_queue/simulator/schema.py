"""Smallest valid instance of a JSON Schema, or of Gemini's OpenAPI-style `responseSchema`.

Covers what pydantic's `model_json_schema()` and the SDK's schema conversion emit: $ref/$defs,
anyOf/oneOf/allOf, enum/const, required properties, min lengths/items and numeric bounds.
`pattern` is not honoured.
"""

from __future__ import annotations

import math
from typing import Any

_MAX_DEPTH = 32  # a required self-reference has no finite instance; give up with null
_FORMATS = {
    "date": "2026-01-01",
    "date-time": "2026-01-01T00:00:00Z",
    "time": "00:00:00",
    "email": "user@example.com",
    "uri": "https://example.com/",
    "uuid": "00000000-0000-4000-8000-000000000000",
}


def minimal_instance(schema: dict[str, Any]) -> Any:
    return _instance(schema, schema, 0)


def _instance(node: dict[str, Any], root: dict[str, Any], depth: int) -> Any:
    if depth > _MAX_DEPTH:
        return None
    if "$ref" in node:
        return _instance(_resolve(node["$ref"], root), root, depth + 1)
    if "const" in node:
        return node["const"]
    if node.get("enum"):
        return node["enum"][0]
    for combinator in ("anyOf", "oneOf"):
        if node.get(combinator):
            return _instance(node[combinator][0], root, depth + 1)
    if node.get("allOf"):
        merged = {k: v for k, v in node.items() if k != "allOf"}
        for part in node["allOf"]:
            merged.update(_resolve(part["$ref"], root) if "$ref" in part else part)
        return _instance(merged, root, depth + 1)
    kind = _type_of(node)
    if kind == "object":
        properties = node.get("properties", {})
        return {
            name: _instance(properties.get(name, {}), root, depth + 1)
            for name in node.get("required", [])
        }
    if kind == "array":
        item = _instance(node.get("items", {}), root, depth + 1)
        return [item] * int(node.get("minItems", 0))
    if kind == "string":
        return _string(node)
    if kind in ("integer", "number"):
        return _number(node, integer=kind == "integer")
    if kind == "boolean":
        return False
    return None


def _resolve(ref: str, root: dict[str, Any]) -> dict[str, Any]:
    if not ref.startswith("#/"):
        raise ValueError(f"only local $refs are supported, got {ref!r}")
    target: Any = root
    for key in ref[2:].split("/"):
        target = target[key.replace("~1", "/").replace("~0", "~")]
    if not isinstance(target, dict):
        raise ValueError(f"$ref {ref!r} does not point at a schema")
    return target


def _type_of(node: dict[str, Any]) -> str | None:
    kind = node.get("type")
    if isinstance(kind, list):  # ["string", "null"]: prefer the non-null member
        kind = next((k for k in kind if str(k).lower() != "null"), "null")
    if kind is None:
        return "object" if "properties" in node else None
    return str(kind).lower()  # Gemini's responseSchema spells types in upper case


def _string(node: dict[str, Any]) -> str:
    text = _FORMATS.get(str(node.get("format")), "lorem")
    if "maxLength" in node:
        text = text[: int(node["maxLength"])]
    return text.ljust(int(node.get("minLength", 0)), "x")


def _number(node: dict[str, Any], *, integer: bool) -> int | float:
    # Gemini's schema sends int64 bounds as strings, hence float() on every bound.
    value = 0.0
    if "minimum" in node:
        value = max(value, float(node["minimum"]))
    if "exclusiveMinimum" in node:
        bound = float(node["exclusiveMinimum"])
        value = max(value, math.floor(bound) + 1 if integer else bound + 1)
    if "maximum" in node:
        value = min(value, float(node["maximum"]))
    if "exclusiveMaximum" in node:
        bound = float(node["exclusiveMaximum"])
        value = min(value, math.ceil(bound) - 1 if integer else bound - 1)
    return math.ceil(value) if integer else value
