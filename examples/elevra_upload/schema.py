"""What the model is asked to return, as pydantic models.

Unknown values are null — no "substitute a reasonable value" rule (D-21): an invented bio or URL is
worse than none. Every property is listed as required (and nullable where it may be unknown) so a
schema-constrained model writes every key, while parsing stays lenient about omitted optional keys.
``StructuredOutput.model_json_schema()`` is sent as Gemini's ``responseJsonSchema`` unchanged: it
uses only type/enum/items/maxItems/properties/required/anyOf/title/description and plain ``$ref``s
into ``$defs`` (no recursion, no siblings next to a ``$ref``, no ``default``).
"""

from __future__ import annotations

import datetime as dt
import json
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = [
    "Analysis",
    "AnalysisCandidate",
    "AnalysisElection",
    "CandidateOut",
    "ElectionEntry",
    "ElectionOut",
    "ElectionType",
    "StructuredOutput",
    "parse_analysis",
    "parse_json_reply",
    "parse_structured",
    "structured_output_schema",
]

ElectionType = Literal["LOCAL", "STATE", "UNIVERSITY", "NATIONAL"]
MAX_KEY_POLICIES = 5
_DATE_RE = re.compile(r"^(\d{2})/(\d{2})/(\d{4})$")


def _gemini_schema(schema: dict[str, Any]) -> None:
    """Make every property required and drop defaults: see the module docstring."""
    properties = schema.get("properties", {})
    schema["required"] = list(properties)
    for prop in properties.values():
        prop.pop("default", None)


_STRICT = ConfigDict(extra="ignore", json_schema_extra=_gemini_schema)


class ElectionOut(BaseModel):
    model_config = _STRICT

    title: str = Field(description="The office or contest, e.g. 'Burlington City Council'.")
    type: ElectionType = Field(description="LOCAL for city/county/school offices.")
    date: str | None = Field(None, description="Election day as MM/DD/YYYY, or null if unknown.")
    city: str | None = Field(None, description="Copied from the spreadsheet data.")
    state: str | None = Field(None, description="Copied from the spreadsheet data.")
    number_of_seats: int | None = Field(None, description="Seats to fill, or null if unknown.")
    description: str | None = Field(None, description="One or two neutral sentences, or null.")

    @field_validator("date")
    @classmethod
    def _real_date(cls, value: str | None) -> str | None:
        if value is None:
            return None
        match = _DATE_RE.match(value.strip())
        if not match:
            raise ValueError(f"date must be MM/DD/YYYY, got {value!r}")
        month, day, year = (int(g) for g in match.groups())
        dt.date(year, month, day)  # raises for 02/31: impossible dates fail, they never roll over
        return value.strip()

    @field_validator("number_of_seats")
    @classmethod
    def _positive(cls, value: int | None) -> int | None:
        if value is not None and value < 1:
            raise ValueError("number_of_seats must be at least 1")
        return value

    def parsed_date(self) -> dt.date | None:
        if self.date is None:
            return None
        month, day, year = (int(p) for p in self.date.split("/"))
        return dt.date(year, month, day)


class CandidateOut(BaseModel):
    model_config = _STRICT

    name: str = Field(description="Exactly as in the spreadsheet data.")
    email: str | None = Field(None, description="Only from the spreadsheet data, else null.")
    current_role: str | None = None
    party: str | None = None
    bio: str | None = Field(None, description="Neutral, sourced facts only; null if none found.")
    key_policies: list[str] = Field(default_factory=list, max_length=MAX_KEY_POLICIES)
    home_city: str | None = None
    hometown_state: str | None = None
    campaign_website_url: str | None = None
    linkedin_url: str | None = None
    image_url: str | None = None
    phone: str | None = None
    additional_notes: str | None = None
    sources: list[str] = Field(default_factory=list, description="Where each fact came from.")


class ElectionEntry(BaseModel):
    model_config = _STRICT

    election: ElectionOut
    candidates: list[CandidateOut]


class StructuredOutput(BaseModel):
    model_config = _STRICT

    elections: list[ElectionEntry]


def structured_output_schema() -> dict[str, Any]:
    """The JSON Schema to send as ``responseJsonSchema`` (a fresh copy each call)."""
    return StructuredOutput.model_json_schema()


# The analysis is research notes, passed on to the structure step as data; its shape is a guide
# for the model rather than a contract, so unknown keys are kept.
_NOTES = ConfigDict(extra="allow")


class AnalysisCandidate(BaseModel):
    model_config = _NOTES

    name: str
    row_number: int | None = None
    current_role: str | None = None
    party: str | None = None
    notes: str | None = None
    sources: list[str] = Field(default_factory=list)


class AnalysisElection(BaseModel):
    model_config = _NOTES

    title: str | None = None
    date: str | None = None
    notes: str | None = None
    candidates: list[AnalysisCandidate] = Field(default_factory=list)


class Analysis(BaseModel):
    model_config = _NOTES

    elections: list[AnalysisElection] = Field(default_factory=list)


_FENCE_RE = re.compile(r"^\s*```(?:json|JSON)?\s*\n(.*?)\n?```\s*$", re.DOTALL)


def parse_json_reply(text: str) -> Any:
    """Strict JSON, optionally inside one Markdown code fence. No lossy "repairs" (D-18)."""
    match = _FENCE_RE.match(text)
    return json.loads(match.group(1) if match else text)


def parse_structured(text: str) -> StructuredOutput:
    """Raise ValueError (json.JSONDecodeError or pydantic.ValidationError) on a bad reply."""
    return StructuredOutput.model_validate(parse_json_reply(text))


def parse_analysis(text: str) -> Analysis:
    """Accept the object form or a bare list of elections (the original prompt asked for a list)."""
    value = parse_json_reply(text)
    if isinstance(value, list):
        value = {"elections": value}
    return Analysis.model_validate(value)
