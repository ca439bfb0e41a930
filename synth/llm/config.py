"""What an LLM-using stage configures: :class:`LLMConfig` (its ``llm`` key), the keys that
never change an answer (:data:`RUNTIME_KEYS`) and the cost estimate of a dry run
(:func:`estimate`).

The client that acts on it is :class:`speechmill.synth.llm.client.LLMClient`.
"""

from __future__ import annotations

import os
import re
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = [
    "DEFAULT_BASE_URL",
    "DEFAULT_REFUSAL_PATTERNS",
    "LLMConfig",
    "RUNTIME_KEYS",
    "estimate",
]

DEFAULT_BASE_URL = "https://api.openai.com/v1"

#: answers that decline instead of giving the requested output (case-insensitive regexes)
DEFAULT_REFUSAL_PATTERNS: tuple[str, ...] = (
    r"\bas an ai(?: language)? model\b",
    r"\bas a large language model\b",
    r"\bI(?:['\u2019]m| am) (?:sorry|afraid),? (?:but )?I (?:can(?:['\u2019]|no)t|cannot|"
    r"am unable to|won['\u2019]t|will not) (?:help|assist|comply|provide|create|write|do "
    r"that|fulfil|generate)",
    r"^\s*I (?:can(?:['\u2019]|no)t|cannot|won['\u2019]t|will not) (?:help|assist|comply) "
    r"with (?:that|this|your request)",
    r"\bI(?:['\u2019]m| am) (?:not able|unable) to (?:help|assist|comply) with (?:that|this|"
    r"your request)",
)

#: LLMConfig keys that change how requests are sent but never what a stage outputs
#: (limits, retries, prices, polling); a resume may change them
RUNTIME_KEYS: frozenset[str] = frozenset({
    "api_key_env", "concurrency", "requests_per_minute", "tokens_per_minute",
    "max_attempts", "timeout_s", "max_retry_after_s", "backoff_base_s", "backoff_max_s",
    "prices", "max_cost_usd", "max_total_tokens", "batch_poll_s",
    "batch_completion_window",
})


class LLMConfig(BaseModel):
    """Where and how to ask an LLM. Stages embed it as their ``llm`` key."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    #: runtime knobs that never change an answer: not part of the resume fingerprint, so
    #: a stage stopped by its budget resumes with a bigger one
    fingerprint_exclude: ClassVar[frozenset[str]] = RUNTIME_KEYS

    base_url: str | None = Field(
        None, description="OpenAI-compatible API base URL; default $OPENAI_BASE_URL, "
        "then https://api.openai.com/v1 (vLLM/SGLang: http://host:8000/v1; Ollama: "
        "http://host:11434/v1)")
    model: str = Field(..., min_length=1, description="model name as the server knows it")
    api_key_env: str = Field(
        "OPENAI_API_KEY", description="name of the environment variable holding the API "
        "key (never the key itself); unset: 'EMPTY', which local servers accept")
    temperature: float = Field(0.8, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int = Field(1024, ge=1, description="answer length limit per request")
    max_tokens_param: Literal["max_tokens", "max_completion_tokens"] = Field(
        "max_tokens", description="request field for max_tokens (newer OpenAI models "
        "want max_completion_tokens)")
    seed: int | None = Field(0, description="sampling seed sent to the server (part of "
                             "the cache key); stages derive one per row from it")
    extra_body: dict[str, Any] = Field(
        default_factory=dict, description="server-specific request fields (e.g. vLLM "
        "top_k, repetition_penalty); part of the cache key")
    concurrency: int = Field(8, ge=1, description="requests in flight per worker process")
    requests_per_minute: float | None = Field(
        None, gt=0, description="run-wide request rate limit (all workers of the stage)")
    tokens_per_minute: float | None = Field(
        None, gt=0, description="run-wide token rate limit (prompt + max_tokens "
        "estimated before sending, corrected by the server's count)")
    max_attempts: int = Field(6, ge=1, description="HTTP attempts per request before "
                              "llm_error")
    timeout_s: float = Field(120.0, gt=0, description="per HTTP request")
    max_retry_after_s: float = Field(120.0, ge=0, description="cap on a server's "
                                     "Retry-After")
    backoff_base_s: float = Field(0.5, ge=0)
    backoff_max_s: float = Field(30.0, ge=0)
    prices: dict[str, dict[str, float]] = Field(
        default_factory=dict, description="model -> {input_per_1m, output_per_1m} in USD "
        "(optional batch_input_per_1m, batch_output_per_1m); '*' matches any model")
    max_cost_usd: float | None = Field(
        None, ge=0, description="hard run-wide budget: the stage stops (resumable) "
        "before a request that could pass it; needs a price for the model")
    max_total_tokens: int | None = Field(None, ge=1, description="hard run-wide token "
                                         "budget (prompt + completion)")
    structured: Literal["auto", "json_schema", "json_object", "none"] = Field(
        "auto", description="response_format for schema requests: auto tries json_schema, "
        "falls back to json_object, then plain JSON, when the server rejects it")
    max_fix_attempts: int = Field(
        2, ge=0, description="follow-up requests with the validation error fed back "
        "before llm_invalid_output")
    refusal_patterns: list[str] | None = Field(
        None, description="regexes (case-insensitive) that mark an answer as a refusal; "
        "default: common 'As an AI language model...' phrasings")
    batch_api: bool = Field(False, description="use the Batch API (/v1/files + "
                            "/v1/batches): cheaper, hours of latency")
    batch_poll_s: float = Field(10.0, gt=0)
    batch_completion_window: str = "24h"

    @field_validator("prices")
    @classmethod
    def _prices(cls, v: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
        allowed = {"input_per_1m", "output_per_1m", "batch_input_per_1m",
                   "batch_output_per_1m"}
        for model, p in v.items():
            missing = {"input_per_1m", "output_per_1m"} - set(p)
            if missing:
                raise ValueError(f"prices[{model!r}] needs {', '.join(sorted(missing))}")
            if set(p) - allowed:
                raise ValueError(f"prices[{model!r}]: unknown keys "
                                 f"{', '.join(sorted(set(p) - allowed))}")
        return v

    @field_validator("refusal_patterns")
    @classmethod
    def _patterns(cls, v: list[str] | None) -> list[str] | None:
        for p in v or []:
            try:
                re.compile(p)
            except re.error as e:
                raise ValueError(f"refusal pattern {p!r}: {e}") from None
        return v

    def resolved_base_url(self) -> str:
        return (self.base_url or os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL
                ).rstrip("/")

    def price(self, batch: bool = False) -> tuple[float, float] | None:
        """(USD per 1M prompt tokens, per 1M completion tokens) of ``model``, or None."""
        p = self.prices.get(self.model) or self.prices.get("*")
        if p is None:
            return None
        if batch:
            return (p.get("batch_input_per_1m", p["input_per_1m"]),
                    p.get("batch_output_per_1m", p["output_per_1m"]))
        return p["input_per_1m"], p["output_per_1m"]

    def cost(self, prompt_tokens: int, completion_tokens: int, batch: bool = False) -> float:
        p = self.price(batch)
        if p is None:
            return 0.0
        return prompt_tokens / 1e6 * p[0] + completion_tokens / 1e6 * p[1]

    def check(self) -> None:
        """Cross-field checks (raise ValueError naming the key)."""
        if self.max_cost_usd is not None and self.price() is None:
            raise ValueError(f"key 'llm.max_cost_usd' needs a price for model "
                             f"{self.model!r} in 'llm.prices' (or a '*' entry)")


def estimate(config: LLMConfig, n_requests: int, prompt_tokens_each: int,
             completion_tokens_each: int) -> dict[str, Any]:
    """What ``n_requests`` would cost (for ``--dry-run``): requests, tokens and USD
    (``cost_usd`` None without a price for the model)."""
    p = n_requests * prompt_tokens_each
    c = n_requests * completion_tokens_each
    price = config.price(batch=config.batch_api)
    return {
        "model": config.model,
        "base_url": config.resolved_base_url(),
        "requests": n_requests,
        "prompt_tokens": p,
        "completion_tokens": c,
        "total_tokens": p + c,
        "cost_usd": None if price is None else round(config.cost(p, c, config.batch_api), 6),
        "max_cost_usd": config.max_cost_usd,
        "max_total_tokens": config.max_total_tokens,
    }
