"""What the LLM client and its Batch API mode share: the request and result types, one
request's state while it is answered (:class:`Conversation`), usage bookkeeping and the
server answers that mean "this response_format is not supported"
(:data:`UNSUPPORTED_FORMAT`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

__all__ = [
    "UNSUPPORTED_FORMAT",
    "ChatRequest",
    "ChatResult",
    "Conversation",
    "add_usage",
    "empty_usage",
    "estimate_tokens",
]

#: error messages of a server that rejects the requested response_format (HTTP 400/422)
UNSUPPORTED_FORMAT = re.compile(
    r"response_format|json_schema|json_object|guided|structured output|"
    r"not supported|unsupported|unknown (?:field|parameter)|extra (?:fields|inputs)",
    re.I)


@dataclass
class ChatRequest:
    """One conversation to complete."""

    key: str  # the caller's row id, returned on its result (the Batch API's custom_id is
    # the request's cache key, so identical requests go once and a resumed batch matches)
    messages: list[dict[str, str]]
    #: structured output: the answer must be JSON valid against this model
    schema: type[BaseModel] | None = None
    #: extra check of the parsed value (or text without a schema); raise ValueError(msg)
    #: to have the request asked again with ``msg`` fed back. A value it returns (not
    #: None) replaces ``parsed``.
    validate: Callable[[Any], Any] | None = None
    #: the caller's prompt version: part of the cache key
    prompt_version: str = ""
    #: per-request sampling overrides (e.g. ``{"seed": 17}``)
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class ChatResult:
    key: str
    ok: bool
    text: str | None = None
    parsed: Any = None  # the schema instance when a schema was given
    #: why not ok: llm_error (detail: the HTTP status or timeout, attempts),
    #: llm_invalid_output, llm_refusal. A budget never rejects a row: run() raises
    #: BudgetExceeded instead
    reason: str | None = None
    detail: str | None = None
    usage: dict[str, Any] = field(default_factory=dict)
    #: a failure of the service (connection, timeout, 408/409/425/429/5xx after the
    #: retries), not of the data: the stage's reject is transient
    transient: bool = False


def empty_usage() -> dict[str, Any]:
    return {"requests": 0, "cache_hits": 0, "prompt_tokens": 0, "completion_tokens": 0,
            "cost_usd": 0.0, "attempts": 0}


def add_usage(total: dict[str, Any], one: dict[str, Any]) -> dict[str, Any]:
    for k, v in one.items():
        total[k] = total.get(k, 0) + v
    return total


def estimate_tokens(messages: list[dict[str, str]]) -> int:
    """Prompt tokens of ``messages``, roughly (4 characters a token, plus framing)."""
    chars = sum(len(str(m.get("content") or "")) for m in messages)
    return int(math.ceil(chars / 4.0)) + 4 * len(messages) + 3


class Conversation:
    """One request's state while it is being answered (online or through the Batch
    API): the messages sent so far, the response format in use, the attempts and
    re-asks, the usage and, once final, the result."""

    def __init__(self, req: ChatRequest, fmt: str) -> None:
        self.req = req
        self.messages: list[dict[str, str]] = [dict(m) for m in req.messages]
        self.fmt = fmt
        self.fixes = 0
        self.attempts = 0  # HTTP attempts of the current messages
        self.usage = empty_usage()
        self.result: ChatResult | None = None

    def finish(self, ok: bool, text: str | None = None, parsed: Any = None,
               reason: str | None = None, detail: str | None = None, *,
               transient: bool = False) -> ChatResult:
        self.usage["cost_usd"] = round(self.usage["cost_usd"], 8)
        self.result = ChatResult(self.req.key, ok, text, parsed, reason, detail,
                                 dict(self.usage), transient=not ok and transient)
        return self.result
