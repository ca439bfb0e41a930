"""Text SFT formats: detect a file's format and turn one of its rows into a dialogue.

Formats (one row = one dialogue):

* ``sharegpt``: ``{"conversations": [{"from": "human"|"gpt"|"system", "value": ...}]}``
  (``from`` also accepts ``user``/``assistant``/``chatgpt``/``bard``/``bing``/``model``;
  a top-level ``system`` string is the system prompt too).
* ``openai``: ``{"messages": [{"role": "system"|"user"|"assistant", "content": ...}]}``
  (``content`` a string or a list of ``{"type": "text", "text": ...}`` parts).
* ``alpaca``: ``{"instruction", "input" (optional), "output"}``: one round whose user
  turn is the instruction, followed by the input on its own paragraph when present.
* ``ultrachat``: ``{"id", "data": [user, assistant, user, ...]}``.

:func:`to_dialogue` returns the dialogue or raises :class:`RowError` with a reject
reason: ``malformed`` (not the format's shape, text that is not valid Unicode, nesting
deeper than :data:`MAX_DEPTH`), ``bad_roles`` (a role the format does not
know, a tool/function turn, a system turn that is not first), ``empty_turn`` (a turn
with no text) or ``no_turns``. A trailing user turn without an answer is dropped (a
dialogue is whole rounds).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

Format = Literal["sharegpt", "openai", "alpaca", "ultrachat"]
FORMATS: tuple[str, ...] = ("sharegpt", "openai", "alpaca", "ultrachat")

SHAREGPT_ROLES = {
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
    "bard": "assistant", "bing": "assistant", "model": "assistant",
    "system": "system",
}
OPENAI_ROLES = {"user": "user", "assistant": "assistant", "system": "system",
                "developer": "system"}
#: a row nested deeper than this is ``malformed`` (a real SFT row is a few levels deep)
MAX_DEPTH = 64
_SURROGATE = re.compile("[\ud800-\udfff]")


class RowError(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass
class Dialogue:
    turns: list[dict[str, str]]  # {"role": "user"|"assistant", "text": ...}
    system: str | None = None
    language: str | None = None
    row_id: str | None = None  # the dataset's own id of the row, if it has one
    extra: dict[str, Any] = field(default_factory=dict)


def _where(path: tuple[Any, ...]) -> str:
    out = "".join(f"[{k}]" if isinstance(k, int) else f".{k}" for k in path).lstrip(".")
    return (out[:80] + "...") if len(out) > 80 else (out or "row")


def _short(v: Any, n: int = 60) -> str:
    """``repr(v)`` of at most about ``n`` characters (a hostile value can be huge)."""
    r = repr(v[: n + 1] if isinstance(v, str) else v)
    return r if len(r) <= n else r[:n] + "..."


def check_row(row: Any) -> None:
    """Raise :class:`RowError` (``malformed``) for a row nested deeper than
    :data:`MAX_DEPTH` or holding a string that is not valid Unicode (a lone surrogate,
    e.g. an escaped ``"\\ud800"`` or a byte that was not UTF-8): such text cannot be
    stored or spoken. Iterative, so a deep row cannot exhaust the stack."""
    stack: list[tuple[Any, int, tuple[Any, ...]]] = [(row, 0, ())]
    while stack:
        v, depth, path = stack.pop()
        if isinstance(v, str):
            m = None if v.isascii() else _SURROGATE.search(v)
            if m is not None:
                raise RowError("malformed", f"{_where(path)}: text is not valid Unicode (a "
                               f"lone surrogate {m.group()!r} at {m.start()}: an escaped "
                               "surrogate or bytes that are not UTF-8)")
            continue
        if isinstance(v, Mapping | list | tuple):
            if depth >= MAX_DEPTH:
                raise RowError("malformed", f"{_where(path)}: nested deeper than {MAX_DEPTH} "
                               "levels")
            items = v.items() if isinstance(v, Mapping) else enumerate(v)
            for k, x in items:
                if isinstance(k, str):
                    stack.append((k, depth + 1, path))
                stack.append((x, depth + 1, (*path, k) if len(path) < 8 else path))


def detect(row: Any) -> str | None:
    """The format whose shape ``row`` has (None: none)."""
    if not isinstance(row, Mapping):
        return None
    if isinstance(row.get("conversations"), list):
        return "sharegpt"
    if isinstance(row.get("messages"), list):
        return "openai"
    if "instruction" in row and "output" in row:
        return "alpaca"
    if isinstance(row.get("data"), list):
        return "ultrachat"
    return None


def _text(value: Any, where: str) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list):  # OpenAI content parts
        parts = []
        for p in value:
            if isinstance(p, Mapping) and p.get("type") == "text" and isinstance(
                    p.get("text"), str):
                parts.append(p["text"])
            elif isinstance(p, str):
                parts.append(p)
            else:
                kind = p.get("type") if isinstance(p, Mapping) else type(p).__name__
                raise RowError("malformed", f"{where}: non-text content part {_short(kind)}")
        return "\n".join(parts)
    raise RowError("malformed", f"{where}: text is a {type(value).__name__}, not a string")


def _finish(turns: list[tuple[str, str]], system: str | None) -> tuple[list[dict[str, str]],
                                                                        str | None]:
    """Split off a leading system turn, check roles and texts, drop a trailing
    unanswered user turn."""
    out: list[dict[str, str]] = []
    for i, (role, text) in enumerate(turns):
        if role == "system":
            if i != 0:
                raise RowError("bad_roles", f"turn {i}: a system turn after the first")
            if text.strip():
                system = text.strip() if system is None else f"{system}\n{text.strip()}"
            continue
        if not text.strip():
            raise RowError("empty_turn", f"turn {i} ({role}) has no text")
        out.append({"role": role, "text": text.strip()})
    if out and out[-1]["role"] == "user" and len(out) % 2 == 1:
        out.pop()
    if not out:
        raise RowError("no_turns", "no user/assistant round")
    return out, system


def _str_or_none(v: Any) -> str | None:
    return v.strip() if isinstance(v, str) and v.strip() else None


def to_dialogue(row: Any, fmt: str) -> Dialogue:
    """The dialogue of one ``fmt`` row; :class:`RowError` when it has none."""
    if not isinstance(row, Mapping):
        raise RowError("malformed", f"row is a {type(row).__name__}, not an object")
    check_row(row)
    system = _str_or_none(row.get("system")) or _str_or_none(row.get("system_prompt"))
    raw_id = row.get("id", row.get("prompt_id"))
    row_id = None if raw_id is None else str(raw_id)
    language = _str_or_none(row.get("language")) or _str_or_none(row.get("lang"))
    turns: list[tuple[str, str]] = []
    if fmt == "sharegpt":
        conv = row.get("conversations")
        if not isinstance(conv, list):
            raise RowError("malformed", "no 'conversations' list")
        for i, m in enumerate(conv):
            if not isinstance(m, Mapping) or "from" not in m or "value" not in m:
                raise RowError("malformed", f"turn {i}: not a {{from, value}} object")
            who = str(m["from"]).strip().lower()
            if who not in SHAREGPT_ROLES:
                raise RowError("bad_roles", f"turn {i}: unknown 'from' {_short(m['from'])}")
            turns.append((SHAREGPT_ROLES[who], _text(m["value"], f"turn {i}")))
    elif fmt == "openai":
        msgs = row.get("messages")
        if not isinstance(msgs, list):
            raise RowError("malformed", "no 'messages' list")
        for i, m in enumerate(msgs):
            if not isinstance(m, Mapping) or "role" not in m:
                raise RowError("malformed", f"message {i}: not a {{role, content}} object")
            role = str(m["role"]).strip().lower()
            if role not in OPENAI_ROLES:
                raise RowError("bad_roles", f"message {i}: role {_short(m['role'])} "
                               "(only system/user/assistant can be spoken)")
            if m.get("tool_calls") or m.get("function_call"):
                raise RowError("bad_roles", f"message {i}: a tool call")
            turns.append((OPENAI_ROLES[role], _text(m.get("content"), f"message {i}")))
    elif fmt == "alpaca":
        if "instruction" not in row or "output" not in row:
            raise RowError("malformed", "needs 'instruction' and 'output'")
        instr = _text(row.get("instruction"), "instruction").strip()
        extra = _text(row.get("input"), "input").strip()
        user = f"{instr}\n\n{extra}" if instr and extra else (instr or extra)
        turns = [("user", user), ("assistant", _text(row.get("output"), "output"))]
    elif fmt == "ultrachat":
        data = row.get("data")
        if not isinstance(data, list):
            raise RowError("malformed", "no 'data' list")
        for i, t in enumerate(data):
            if not isinstance(t, str):
                raise RowError("malformed", f"data[{i}] is a {type(t).__name__}, not a string")
            turns.append(("user" if i % 2 == 0 else "assistant", t))
    else:
        raise ValueError(f"unknown format {fmt!r}")
    out, system = _finish(turns, system)
    return Dialogue(turns=out, system=system, language=language, row_id=row_id)
