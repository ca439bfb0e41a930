"""The LLM client every synthesis stage uses: OpenAI-compatible chat completions.

It talks to any server with the OpenAI chat API (OpenAI, vLLM, SGLang, Ollama, LiteLLM
proxies) through the ``openai`` package, imported lazily::

    client = LLMClient(LLMConfig(model="gpt-4o-mini"), RUN_DIR / "cache/llm/gen", "gen")
    results = client.run([ChatRequest(key=row_id, messages=[...], schema=Dialogue)])

What it adds around the bare API:

* **Bounded concurrency** (``concurrency`` requests in flight per worker process: an
  asyncio event loop in a background thread keeps the limits, retries and bookkeeping,
  the HTTP calls run on as many threads) and run-wide **requests/tokens per minute**
  (see :mod:`speechmill.synth.llm_budget`).
* **Retries** with exponential backoff and full jitter on 408/409/429/5xx, timeouts and
  connection errors, honouring ``Retry-After`` / ``retry-after-ms`` (capped at
  ``max_retry_after_s``); the ``openai`` client's own retries are off so these are the
  only ones. After ``max_attempts`` the result is ``llm_error`` with the HTTP status.
* **Structured output**: with a pydantic ``schema``, ``response_format`` is a JSON schema
  where the server supports it (``structured: auto`` falls back to ``json_object`` and then
  to plain JSON when the server answers 400 to it, and remembers that in the cache
  directory). The answer is parsed and validated; an invalid, off-schema or truncated
  answer is asked again with the error fed back as a follow-up user message (at most
  ``max_fix_attempts`` times), then it is ``llm_invalid_output``. An answer that is a
  refusal instead of the requested output (``refusal`` from the server, or text matching
  ``refusal_patterns``) is ``llm_refusal``.
* **A persistent response cache** (:mod:`speechmill.synth.llm_cache`): every answer is
  stored under the sha256 of the request as sent plus the prompt version, before it is
  used, so a rerun, or a resume after SIGKILL, sends no request for work already answered
  (follow-up requests with fed-back errors are cached too, so a replay is free).
* **Accounting and a hard budget**: each result carries its ``usage`` (requests sent,
  cache hits, tokens, estimated cost from ``prices``); a run-wide spend ledger stops the
  stage with :class:`BudgetExceeded` before a request that could pass ``max_cost_usd`` /
  ``max_total_tokens``.
* **Batch API** mode (``batch_api: true``): see :mod:`speechmill.synth.llm_batch`.

**Failures of the service are not data rejects.** A failed result carries ``transient``:
True when the service failed after the retries (timeouts, connection errors, HTTP 408,
409, 425, 429 and 5xx after ``max_attempts``, a batch line that kept failing so, or no
answer at all): the stage rejects the row with ``transient=True`` (the engine counts it
toward the error budget and a rerun retries it). False for what the data (or the request
made from it) earns: other 4xx answers, an answer that is not a chat completion,
``llm_invalid_output`` after the allowed re-asks, ``llm_refusal``. 401/403/404 stop the
stage (:class:`LLMUnavailable`) instead of rejecting rows.

The API key is read from the environment variable named by ``api_key_env`` (``EMPTY``
when unset, which local servers accept). It is never logged, never written anywhere and
never part of a cache key. The key, the secret values of ``extra_body`` and credentials
in ``base_url`` are registered with :mod:`speechmill.pipeline.redact`, and every error
detail and message goes through :func:`~speechmill.pipeline.redact.redact_text` before it
is cut short, logged or stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import math
import os
import random
import re
import threading
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from speechmill.pipeline.redact import redact_text, register_secret, register_secrets
from speechmill.synth.llm_budget import (
    Budget,
    BudgetExceeded,
    LLMStop,
    LLMUnavailable,
    RateLimiter,
    Spend,
    SpendLedger,
)
from speechmill.synth.llm_cache import ResponseCache, request_key, write_atomic

__all__ = [
    "DEFAULT_REFUSAL_PATTERNS",
    "BudgetExceeded",
    "ChatRequest",
    "ChatResult",
    "LLMClient",
    "LLMConfig",
    "LLMStop",
    "LLMUnavailable",
    "RUNTIME_KEYS",
    "estimate",
]

log = logging.getLogger("speechmill")

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

_RETRYABLE = {408, 409, 425, 429, 500, 502, 503, 504, 520, 522, 524, 529}
_UNSUPPORTED = re.compile(
    r"response_format|json_schema|json_object|guided|structured output|"
    r"not supported|unsupported|unknown (?:field|parameter)|extra (?:fields|inputs)",
    re.I)


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


@functools.lru_cache(maxsize=64)
def _schema_json(schema: type[BaseModel]) -> dict[str, Any]:
    return schema.model_json_schema()


def strip_fences(text: str) -> str:
    """The JSON inside a ```json ... ``` fence (or the text itself)."""
    t = text.strip()
    m = re.match(r"^```[A-Za-z0-9_-]*\s*\n?(.*?)\n?```\s*$", t, re.S)
    if m:
        return m.group(1).strip()
    if not t.startswith(("{", "[")):  # prose around one JSON object
        a, b = t.find("{"), t.rfind("}")
        if 0 <= a < b:
            return t[a:b + 1]
    return t


class _Conv:
    """One request's state while it is being answered."""

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


class _Reformat(Exception):  # noqa: N818 - control flow: the server rejected the format
    pass


class _Loop:
    """An asyncio event loop in a daemon thread: ``run`` works from any thread, whether
    or not the caller has an event loop of its own."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True,
                                       name="speechmill-llm")
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        fut = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return fut.result()
        except BaseException:
            fut.cancel()
            raise

    def close(self) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        with contextlib.suppress(RuntimeError):
            self.loop.close()


class LLMClient:
    """Chat completions with cache, retries, limits and accounting (see the module doc).

    ``cache_dir`` holds the response cache, the spend ledger, the rate-limit state and
    the Batch API bookkeeping; stages use ``RUN_DIR/cache/llm/<stage id>``. One client per
    worker process; :meth:`run` may be called many times (one batch of rows each).
    """

    def __init__(self, config: LLMConfig, cache_dir: str | os.PathLike[str],
                 stage_id: str) -> None:
        config.check()
        self.config = config
        self.stage_id = stage_id
        self.base_url = config.resolved_base_url()
        register_secret(os.environ.get(config.api_key_env))
        register_secrets(config.extra_body, "extra_body")
        register_secrets(self.base_url)
        self.cache_dir = Path(cache_dir)
        self.cache = ResponseCache(self.cache_dir)
        self.ledger = SpendLedger(self.cache_dir)
        self.budget = Budget(self.ledger, stage_id, config.max_cost_usd,
                             config.max_total_tokens)
        self.limiter = RateLimiter(self.cache_dir / "_ratelimit.json",
                                   config.requests_per_minute, config.tokens_per_minute)
        self._patterns = [re.compile(p, re.I | re.M) for p in
                          (config.refusal_patterns if config.refusal_patterns is not None
                           else DEFAULT_REFUSAL_PATTERNS)]
        self._fmt_path = self.cache_dir / "_formats.json"
        self._fmt_id = request_key(self.base_url, {"model": config.model}, "format")[:16]
        self._fmt_known: str | None = self._load_format()
        self._loop: _Loop | None = None
        self._client: Any = None
        self._pool: ThreadPoolExecutor | None = None
        self._sem: asyncio.Semaphore | None = None
        self._inflight: dict[str, asyncio.Future[Any]] = {}
        self._stop: LLMStop | None = None
        self.totals = empty_usage()  # this client's usage over every run() call

    # -- public ----------------------------------------------------------------------------
    def run(self, requests: list[ChatRequest]) -> list[ChatResult]:
        """Answer ``requests`` (concurrently, bounded) and return results in their order.

        Raises :class:`LLMStop` (after the requests in flight have finished and their
        answers are cached) when the stage must stop: :class:`BudgetExceeded` when the
        budget is reached, :class:`LLMUnavailable` when the endpoint rejects the key,
        URL or model (401/403/404). The stage lets it through; the engine fails the run
        with its message and a rerun resumes."""
        if not requests:
            return []
        if self._loop is None:
            self._loop = _Loop()
        try:
            results: list[ChatResult] = self._loop.run(self._run_all(list(requests)))
        finally:
            if self.ledger.own.requests:
                self.ledger.flush()
        for r in results:
            add_usage(self.totals, r.usage)
        return results

    def spent(self) -> dict[str, Any]:
        """Run-wide spend of this stage so far (every process, every attempt)."""
        return self.ledger.total(fresh=True).to_dict()

    def close(self) -> None:
        if self.ledger.own.requests:
            self.ledger.flush()
        if self._loop is None:
            return
        if self._client is not None:
            with contextlib.suppress(Exception):
                self._client.close()
            self._client = None
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
        self._loop.close()
        self._loop = None
        self._sem = None

    def __enter__(self) -> LLMClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- request building ------------------------------------------------------------------
    def body(self, conv: _Conv) -> dict[str, Any]:
        """The JSON sent for ``conv`` now (also what the cache key hashes)."""
        cfg = self.config
        req = conv.req
        messages = list(conv.messages)
        body: dict[str, Any] = {"model": cfg.model}
        if req.schema is not None and conv.fmt in ("json_object", "none"):
            schema = json.dumps(_schema_json(req.schema), ensure_ascii=False)
            messages.append({"role": "system", "content": (
                "Reply with one JSON object only (no prose, no code fence) that is valid "
                f"against this JSON schema:\n{schema}")})
        body["messages"] = messages
        body["temperature"] = cfg.temperature
        if cfg.top_p is not None:
            body["top_p"] = cfg.top_p
        body[cfg.max_tokens_param] = cfg.max_tokens
        if cfg.seed is not None:
            body["seed"] = cfg.seed
        if req.schema is not None and conv.fmt == "json_schema":
            body["response_format"] = {"type": "json_schema", "json_schema": {
                "name": re.sub(r"[^A-Za-z0-9_-]", "_", req.schema.__name__)[:64],
                "schema": _schema_json(req.schema), "strict": False}}
        elif req.schema is not None and conv.fmt == "json_object":
            body["response_format"] = {"type": "json_object"}
        body.update(cfg.extra_body)
        body.update(req.overrides)
        return body

    def key(self, conv: _Conv, body: dict[str, Any]) -> str:
        return request_key(self.base_url, body, conv.req.prompt_version)

    def start_format(self) -> str:
        s = self.config.structured
        if s != "auto":
            return s
        return self._fmt_known or "json_schema"

    def _load_format(self) -> str | None:
        try:
            return json.loads(self._fmt_path.read_bytes()).get(self._fmt_id)
        except (OSError, ValueError, AttributeError):
            return None

    def _downgrade(self, conv: _Conv, why: str) -> bool:
        """The server rejected ``conv``'s response_format: use the next one (auto only)."""
        if self.config.structured != "auto" or conv.req.schema is None or conv.fmt == "none":
            return False
        nxt = {"json_schema": "json_object", "json_object": "none"}[conv.fmt]
        log.info("stage %s: the server rejected response_format %s (%s); using %s",
                 self.stage_id, conv.fmt, why[:200], nxt)
        conv.fmt = nxt
        order = ["json_schema", "json_object", "none"]
        if self._fmt_known is None or order.index(nxt) > order.index(self._fmt_known):
            self._fmt_known = nxt
            try:
                known = json.loads(self._fmt_path.read_bytes())
            except (OSError, ValueError):
                known = {}
            known[self._fmt_id] = nxt
            write_atomic(self._fmt_path, json.dumps(known).encode())
        return True

    # -- answers ----------------------------------------------------------------------------
    def is_refusal(self, text: str) -> bool:
        return any(p.search(text) for p in self._patterns)

    def check_answer(self, conv: _Conv, resp: dict[str, Any]) -> ChatResult | None:
        """Judge one answer: a final result, or None after queuing a follow-up request
        with the problem fed back."""
        text = resp.get("text") or ""
        if resp.get("refusal"):
            return conv.finish(False, text or None, None, "llm_refusal",
                               self.scrub(str(resp["refusal"]), 500))
        problem: str | None = None
        value: Any = text
        if resp.get("finish_reason") == "length":
            problem = (f"your answer was cut off at the length limit "
                       f"({self.config.max_tokens} tokens); answer again, shorter, and "
                       "complete" + (" valid JSON" if conv.req.schema else ""))
        elif conv.req.schema is not None:
            try:
                value = conv.req.schema.model_validate_json(strip_fences(text))
            except ValueError as e:
                if self.is_refusal(text) or not text.strip():
                    reason = "llm_refusal" if text.strip() else "llm_invalid_output"
                    return conv.finish(False, text or None, None, reason,
                                       self.scrub(text, 500) or "empty answer")
                problem = _short_error(e)
        elif self.is_refusal(text) or not text.strip():
            reason = "llm_refusal" if text.strip() else "llm_invalid_output"
            return conv.finish(False, text or None, None, reason,
                               self.scrub(text, 500) or "empty answer")
        if problem is None and conv.req.validate is not None:
            try:
                out = conv.req.validate(value)
            except ValueError as e:
                problem = _short_error(e)
            else:
                if out is not None:
                    value = out
        if problem is None:
            return conv.finish(True, text, value if conv.req.schema is not None or
                               conv.req.validate is not None else None)
        if conv.fixes >= self.config.max_fix_attempts:
            detail = f"{self.scrub(problem)} | answer: {self.scrub(text, 300)!r}"
            return conv.finish(False, text or None, None, "llm_invalid_output",
                               self.scrub(detail))
        conv.fixes += 1
        conv.attempts = 0
        conv.messages.append({"role": "assistant", "content": text})
        conv.messages.append({"role": "user", "content": (
            f"That answer cannot be used: {problem}. Reply again with the complete "
            "answer, fixed" + (", as JSON only." if conv.req.schema else "."))})
        return None

    def secrets(self) -> list[str]:
        """This client's secrets (the key as the environment holds it now)."""
        key = os.environ.get(self.config.api_key_env) or ""
        return [key] if len(key) >= 4 else []

    def scrub(self, text: str, limit: int | None = None) -> str:
        """``text`` without secrets (:func:`speechmill.pipeline.redact.redact_text`), then
        cut to ``limit`` characters."""
        return redact_text(text, self.secrets(), limit=limit)

    @staticmethod
    def response_dict(completion: Any) -> dict[str, Any]:
        """What is cached of a chat completion (from the openai object or a plain dict)."""
        d = completion if isinstance(completion, dict) else completion.model_dump()
        choices = d.get("choices") or [{}]
        ch = choices[0] or {}
        msg = ch.get("message") or {}
        usage = d.get("usage") or {}
        text = msg.get("content")
        refusal = msg.get("refusal") or None
        # a server that echoes a secret into its answer: not into the cache, rows or logs
        out = {
            "text": redact_text(text, patterns=False, min_chars=8)
            if isinstance(text, str) else None,
            "refusal": redact_text(refusal, patterns=False, min_chars=8) if refusal else None,
            "finish_reason": ch.get("finish_reason"),
            "model": d.get("model"),
            "prompt_tokens": int(usage.get("prompt_tokens") or 0),
            "completion_tokens": int(usage.get("completion_tokens") or 0),
        }
        return out

    def account(self, conv: _Conv, resp: dict[str, Any], body: dict[str, Any],
                batch: bool = False, record: bool = True) -> None:
        """Add a freshly received answer to ``conv``'s usage (and the ledger)."""
        p = resp["prompt_tokens"] or estimate_tokens(body["messages"])
        c = resp["completion_tokens"] or int(math.ceil(len(resp.get("text") or "") / 4))
        cost = self.config.cost(p, c, batch)
        conv.usage["prompt_tokens"] += p
        conv.usage["completion_tokens"] += c
        conv.usage["cost_usd"] += cost
        if record:
            self.ledger.record(Spend(1, p, c, cost), flush=self.budget.limited)

    def worst_case(self, body: dict[str, Any], batch: bool = False) -> tuple[int, float]:
        """Tokens and USD a request may use at most (prompt estimate + max_tokens)."""
        p = estimate_tokens(body["messages"])
        c = int(body.get(self.config.max_tokens_param) or self.config.max_tokens)
        return p + c, self.config.cost(p, c, batch)

    # -- the direct (online) path -------------------------------------------------------------
    async def _run_all(self, requests: list[ChatRequest]) -> list[ChatResult]:
        if self._sem is None:
            self._sem = asyncio.Semaphore(self.config.concurrency)
        self._stop = None
        convs = [_Conv(r, self.start_format()) for r in requests]
        if self.config.batch_api:
            from speechmill.synth.llm_batch import run_batch_mode

            await run_batch_mode(self, convs)
        else:
            outs = await asyncio.gather(*(self._answer(c) for c in convs),
                                        return_exceptions=True)
            for o in outs:
                if isinstance(o, BaseException) and not isinstance(o, LLMStop):
                    raise o
        if self._stop is not None:
            raise self._stop
        return [c.result or c.finish(False, None, None, "llm_error", "no answer",
                                     transient=True)
                for c in convs]

    async def _answer(self, conv: _Conv) -> ChatResult:
        while True:
            body = self.body(conv)
            key = self.key(conv, body)
            resp = self.cache.get(key)
            if resp is not None:
                conv.usage["cache_hits"] += 1
            else:
                try:
                    resp = await self._fetch_once(conv, body, key)
                except _Reformat:
                    continue
                if resp is None:  # failed for good
                    assert conv.result is not None
                    return conv.result
            done = self.check_answer(conv, resp)
            if done is not None:
                return done

    async def _fetch_once(self, conv: _Conv, body: dict[str, Any], key: str
                          ) -> dict[str, Any] | None:
        """Send ``body`` unless the same request is already in flight (then share its
        answer)."""
        fut = self._inflight.get(key)
        if fut is not None:
            resp = await asyncio.shield(fut)
            if resp is not None:
                conv.usage["cache_hits"] += 1
                return resp
        fut = asyncio.get_running_loop().create_future()
        self._inflight[key] = fut
        try:
            resp = await self._send(conv, body, key)
        except BaseException:
            fut.set_result(None)
            raise
        finally:
            self._inflight.pop(key, None)
        if not fut.done():
            fut.set_result(resp)
        return resp

    async def _send(self, conv: _Conv, body: dict[str, Any], key: str
                    ) -> dict[str, Any] | None:
        import openai

        client = self._openai()
        assert self._sem is not None
        last = ""
        while True:
            if self._stop is not None:
                raise self._stop
            tokens, cost = self.worst_case(body)
            async with self._sem:
                if self._stop is not None:
                    raise self._stop
                await self.limiter.acquire(tokens)
                try:
                    self.budget.reserve(tokens, cost)
                except BudgetExceeded as e:
                    self._stop = self._stop or e
                    raise self._stop from None
                conv.attempts += 1
                conv.usage["attempts"] += 1
                conv.usage["requests"] += 1
                status: int | None = None
                headers: Any = None
                malformed = False
                try:
                    completion = await self.call(_post_chat, client, body)
                except openai.APIStatusError as e:
                    status, headers = e.status_code, e.response.headers
                    last = f"HTTP {status}: {_error_text(e, self.secrets())}"
                except openai.APITimeoutError:
                    last = f"timeout after {self.config.timeout_s:g} s"
                except openai.APIConnectionError as e:
                    last = f"connection error: {type(e.__cause__ or e).__name__}"
                except ValueError as e:  # a 200 whose body is not a chat completion
                    malformed = True
                    last = f"unreadable answer: {self.scrub(str(e), 300)}"
                else:
                    resp = self.response_dict(completion)
                    self.cache.put(key, resp)
                    self.account(conv, resp, body)
                    self.limiter.settle(tokens, resp["prompt_tokens"]
                                        + resp["completion_tokens"] or tokens)
                    return resp
                finally:
                    self.budget.release(tokens, cost)
            if status in (401, 403, 404):
                self._stop = self._stop or LLMUnavailable(self.scrub(
                    f"stage {self.stage_id!r}: the LLM endpoint {self.base_url} answered "
                    f"{last}; check llm.base_url, llm.model and the key in "
                    f"${self.config.api_key_env}"))
                raise self._stop
            if status in (400, 422) and _UNSUPPORTED.search(last) and \
                    self._downgrade(conv, last):
                raise _Reformat
            retryable = status is None or status in _RETRYABLE
            if not retryable or conv.attempts >= self.config.max_attempts:
                # the service failed (not the row) unless it answered 4xx or nonsense
                conv.finish(False, None, None, "llm_error", self.scrub(
                    f"{last} (after {conv.attempts} attempt"
                    f"{'s' if conv.attempts != 1 else ''})"),
                    transient=retryable and not malformed)
                return None
            delay = self.delay(conv.attempts, headers)
            log.debug("stage %s: %s; retry %d in %.2f s", self.stage_id, last,
                      conv.attempts, delay)
            await asyncio.sleep(delay)

    def delay(self, attempt: int, headers: Any = None) -> float:
        """Seconds before retry ``attempt + 1``: the server's Retry-After (capped) when
        given, else exponential backoff with full jitter."""
        ra = _retry_after(headers)
        if ra is not None:
            return min(ra, self.config.max_retry_after_s)
        cap = min(self.config.backoff_max_s, self.config.backoff_base_s * 2 ** (attempt - 1))
        return random.uniform(0, cap)

    def _openai(self) -> Any:
        """The (synchronous, thread-safe) ``openai`` client; requests run on a pool of
        ``concurrency`` threads (:meth:`call`), which costs less CPU per request than the
        async client while the event loop keeps the timers, limits and bookkeeping."""
        if self._client is None:
            import httpx
            import openai

            cfg = self.config
            n = max(cfg.concurrency, 4)
            self._client = openai.OpenAI(
                api_key=os.environ.get(cfg.api_key_env) or "EMPTY",
                base_url=self.base_url,
                max_retries=0,
                timeout=cfg.timeout_s,
                http_client=openai.DefaultHttpxClient(
                    limits=httpx.Limits(max_connections=n, max_keepalive_connections=n),
                    timeout=cfg.timeout_s),
            )
        return self._client

    async def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)`` on the request threads."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max(self.config.concurrency, 4),
                                            thread_name_prefix="speechmill-llm")
        return await asyncio.get_running_loop().run_in_executor(
            self._pool, functools.partial(fn, *args, **kwargs))


def _post_chat(client: Any, body: dict[str, Any]) -> dict[str, Any]:
    """One chat completion as a plain dict. ``client.post`` is the documented raw form of
    ``chat.completions.create``: the same client, auth, errors and timeouts, without the
    SDK's per-request parameter transform and response model (much of its CPU time)."""
    import httpx

    raw = client.post("/chat/completions", body=body, cast_to=httpx.Response)
    try:
        completion = raw.json()
    except ValueError:
        completion = None
    if not isinstance(completion, dict) or not completion.get("choices"):
        raise ValueError(f"not a chat completion: {redact_text(raw.text, limit=200)!r}")
    return completion


def _error_text(e: Any, secrets: list[str] | tuple[str, ...] = (), limit: int = 300) -> str:
    """The message of an API error: redacted whole, then cut to ``limit`` characters."""
    body = getattr(e, "body", None)
    if isinstance(body, dict):
        err = body.get("error", body)
        msg = err.get("message") if isinstance(err, dict) else err
        if msg:
            return redact_text(str(msg), secrets, limit=limit)
    return redact_text(str(getattr(e, "message", "") or e), secrets, limit=limit)


def _retry_after(headers: Any) -> float | None:
    if headers is None:
        return None
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    ra = headers.get("retry-after")
    if not ra:
        return None
    try:
        return max(0.0, float(ra))
    except ValueError:
        pass
    from email.utils import parsedate_to_datetime

    try:
        import time

        return max(0.0, parsedate_to_datetime(ra).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def _short_error(e: Exception) -> str:
    """A validation error as one readable line for the follow-up message."""
    from pydantic import ValidationError

    if isinstance(e, ValidationError):
        parts = []
        for err in e.errors()[:5]:
            loc = ".".join(str(x) for x in err.get("loc", ())) or "answer"
            parts.append(f"{loc}: {err.get('msg')}")
        return "; ".join(parts)[:600]
    return str(e)[:600] or type(e).__name__
