"""Dialogue turn records: ids and row shape shared by every synthesis stage.

One row per turn. A dialogue's turns come from one input row (one LLM answer or one
imported conversation), so a source stage emits them together and they are committed
in the same part. Ids are deterministic: ``dialogue_id`` is 16 hex digits (no ``-``),
a turn's id is ``{dialogue_id}-{round:03d}``, so :func:`speechmill.pipeline.records.
recording_id` groups a dialogue's turns as one recording.

Columns of a turn row (besides the core ``id``/``parent_id``/``text``/``language``):
``dialogue_id``, ``round`` (0-based), ``role`` (``user`` | ``assistant``),
``text_original`` (before rewriting; null until a rewrite changes the text),
``system`` (the dialogue's system prompt, repeated on each turn; may be null),
``n_rounds`` (turns in the dialogue, so later stages can tell a dialogue is complete),
``topic``, ``persona`` and ``source`` (a JSON string with provenance: the LLM model,
prompt version hash, seed, input dataset and row), and ``synthetic`` (true: text made
or rewritten by a machine, or imported for synthesis).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

ROLES = ("user", "assistant")


def dialogue_id(*parts: str) -> str:
    """Deterministic dialogue id from its provenance key (16 hex digits, no ``-``)."""
    return hashlib.sha256("\x1f".join(parts).encode("utf-8")).hexdigest()[:16]


def turn_id(dlg_id: str, round_: int) -> str:
    return f"{dlg_id}-{round_:03d}"


def alternation_error(turns: Sequence[Mapping[str, Any]]) -> str | None:
    """Why a turn list is not a user/assistant alternation starting with the user
    (``None`` when it is)."""
    if not turns:
        return "no turns"
    for i, t in enumerate(turns):
        want = ROLES[i % 2]
        if t.get("role") != want:
            return f"turn {i} is {t.get('role')!r}, expected {want!r}"
        if not str(t.get("text") or "").strip():
            return f"turn {i} ({want}) is empty"
    return None


def turn_rows(
    dlg_id: str,
    turns: Sequence[Mapping[str, Any]],
    *,
    parent_id: str,
    language: str | None = None,
    system: str | None = None,
    topic: str | None = None,
    persona: str | None = None,
    source: Mapping[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """The rows of one dialogue: ``turns`` are ``{"role", "text"}`` mappings in order."""
    src = json.dumps(dict(source or {}), sort_keys=True, ensure_ascii=False)
    n = len(turns)
    return [
        {
            "id": turn_id(dlg_id, i),
            "parent_id": parent_id,
            "dialogue_id": dlg_id,
            "round": i,
            "n_rounds": n,
            "role": str(t["role"]),
            "text": str(t["text"]),
            "text_original": None,
            "language": t.get("language") or language,
            "system": system,
            "topic": topic,
            "persona": persona,
            "source": src,
            "synthetic": True,
        }
        for i, t in enumerate(turns)
    ]
