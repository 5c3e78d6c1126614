"""The offline "model": answers analyze and structure prompts from the rows in the prompt alone.

It researches nothing and says so in every note, so a simulated run can never be mistaken for
real candidate information. It is deterministic: the same prompt always gets the same reply.
"""

from __future__ import annotations

import json
from typing import Any

from .prompts import ROWS_BEGIN, ROWS_END, extract_block, prompt_kind
from .schema import CandidateOut, ElectionEntry, ElectionOut, StructuredOutput

__all__ = ["SIMULATED_BIO", "SIMULATED_NOTE", "respond"]

SIMULATED_NOTE = "Simulated — no research performed."
SIMULATED_BIO = "Simulated: not researched."


def respond(model: str, prompt: str, wants_json: bool) -> str:
    """Reply to an elevra-upload prompt; ValueError for any other prompt.

    ``model`` and ``wants_json`` do not change the reply: both steps answer in JSON.
    """
    kind = prompt_kind(prompt)
    if kind is None:
        raise ValueError("not an elevra-upload prompt (no step marker on its first line)")
    data = extract_block(prompt, ROWS_BEGIN, ROWS_END)
    election: dict[str, Any] = data["election"]
    candidates: list[dict[str, Any]] = data["candidates"]
    if kind == "analyze":
        return json.dumps(_analysis(election, candidates), ensure_ascii=False)
    return _structured(election, candidates).model_dump_json()


def _analysis(election: dict[str, Any], candidates: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "elections": [
            {
                "title": election["contest"],
                "date": election["election_date"],
                "notes": SIMULATED_NOTE,
                "candidates": [
                    {
                        "row_number": c["row_number"],
                        "name": c["name"],
                        "current_role": None,
                        "party": c.get("party"),
                        "notes": SIMULATED_NOTE,
                        "sources": [],
                    }
                    for c in candidates
                ],
            }
        ]
    }


def _structured(election: dict[str, Any], candidates: list[dict[str, Any]]) -> StructuredOutput:
    out = ElectionOut(
        title=election["contest"],
        type="LOCAL",
        date=election["election_date"],
        city=election.get("city"),
        state=election.get("state"),
        number_of_seats=election.get("seats"),
        description=SIMULATED_NOTE,
    )
    people = [
        CandidateOut(
            name=c["name"],
            email=c.get("email"),
            party=c.get("party"),
            bio=SIMULATED_BIO,
            home_city=c.get("home_city"),
            hometown_state=c.get("home_state"),
            phone=c.get("phone"),
            additional_notes=SIMULATED_NOTE,
        )
        for c in candidates
    ]
    return StructuredOutput(elections=[ElectionEntry(election=out, candidates=people)])
