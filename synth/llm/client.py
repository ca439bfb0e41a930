"""The LLM client every synthesis stage uses: OpenAI-compatible chat completions.

It talks to any server with the OpenAI chat API (OpenAI, vLLM, SGLang, Ollama, LiteLLM
proxies) through the ``openai`` package, imported lazily::

    client = LLMClient(LLMConfig(model="gpt-4o-mini"), RUN_DIR / "cache/llm/gen", "gen")
    results = client.run([ChatRequest(key=row_id, messages=[...], schema=Dialogue)])

What it adds around the bare API:

* **Bounded concurrency** (``concurrency`` requests in flight per worker process: an
  asyncio event loop in a background thread keeps the limits, retries and bookkeeping,
  the HTTP calls run on as many threads) and run-wide **requests/tokens per minute**
  (see :mod:`speechmill.synth.llm.budget`).
* **Retries** as :mod:`speechmill.pipeline.http_policy` does them: exponential backoff
  with full jitter on 408/409/429/5xx
  (:data:`~speechmill.pipeline.http_policy.LLM_RETRY_STATUS`), timeouts and connection
  errors, honouring ``Retry-After`` / ``retry-after-ms`` (capped at
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
* **A persistent response cache** (:mod:`speechmill.synth.llm.cache`): every answer is
  stored under the sha256 of the request as sent plus the prompt version, before it is
  used, so a rerun, or a resume after SIGKILL, sends no request for work already answered
  (follow-up requests with fed-back errors are cached too, so a replay is free).
* **Accounting and a hard budget**: each result carries its ``usage`` (requests sent,
  cache hits, tokens, estimated cost from ``prices``); a run-wide spend ledger stops the
  stage with :class:`BudgetExceeded` before a request that could pass ``max_cost_usd`` /
  ``max_total_tokens``.
* **Batch API** mode (``batch_api: true``): see :mod:`speechmill.synth.llm.batch`.

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
detail and message goes through :func:`~speechmill.pipeline.http_policy.error_text`
(redacted whole, then cut short) before it is logged or stored.

The configuration is :class:`~speechmill.synth.llm.config.LLMConfig`; requests, results
and a request's state while it is answered are in :mod:`speechmill.synth.llm.conversation`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import math
import os
import re
import threading
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from speechmill.pipeline.http_policy import (
    LLM_RETRY_STATUS,
    Failure,
    RetryPolicy,
    error_message,
    error_text,
    retry_after_from_headers,
)
from speechmill.pipeline.redact import redact_text, register_secret, register_secrets
from speechmill.synth.llm.budget import (
    Budget,
    BudgetExceeded,
    LLMStop,
    LLMUnavailable,
    RateLimiter,
    Spend,
    SpendLedger,
)
from speechmill.synth.llm.cache import ResponseCache, request_key, write_atomic
from speechmill.synth.llm.config import DEFAULT_REFUSAL_PATTERNS, LLMConfig
from speechmill.synth.llm.conversation import (
    UNSUPPORTED_FORMAT,
    ChatRequest,
    ChatResult,
    Conversation,
    add_usage,
    empty_usage,
    estimate_tokens,
)

__all__ = ["LLMClient", "strip_fences"]

log = logging.getLogger("speechmill")


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
        #: the error that stops the stage (budget reached, endpoint unavailable), once
        #: one request met it: the requests not yet sent raise it instead
        self.stop: LLMStop | None = None
        self.retry = RetryPolicy(max_attempts=config.max_attempts,
                                 backoff_base_s=config.backoff_base_s,
                                 backoff_max_s=config.backoff_max_s,
                                 max_retry_after_s=config.max_retry_after_s,
                                 retry_status=LLM_RETRY_STATUS)
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
    def body(self, conv: Conversation) -> dict[str, Any]:
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

    def key(self, conv: Conversation, body: dict[str, Any]) -> str:
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

    def downgrade_format(self, conv: Conversation, why: str) -> bool:
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

    def check_answer(self, conv: Conversation, resp: dict[str, Any]) -> ChatResult | None:
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
        """``text`` without secrets, then cut to ``limit`` characters
        (:func:`speechmill.pipeline.http_policy.error_text`)."""
        return error_text(text, self.secrets(), limit=limit)

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

    def account(self, conv: Conversation, resp: dict[str, Any], body: dict[str, Any],
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
        self.stop = None
        convs = [Conversation(r, self.start_format()) for r in requests]
        if self.config.batch_api:
            from speechmill.synth.llm.batch import run_batch_mode

            await run_batch_mode(self, convs)
        else:
            outs = await asyncio.gather(*(self._answer(c) for c in convs),
                                        return_exceptions=True)
            for o in outs:
                if isinstance(o, BaseException) and not isinstance(o, LLMStop):
                    raise o
        if self.stop is not None:
            raise self.stop
        return [c.result or c.finish(False, None, None, "llm_error", "no answer",
                                     transient=True)
                for c in convs]

    async def _answer(self, conv: Conversation) -> ChatResult:
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

    async def _fetch_once(self, conv: Conversation, body: dict[str, Any], key: str
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

    async def _send(self, conv: Conversation, body: dict[str, Any], key: str
                    ) -> dict[str, Any] | None:
        import openai

        client = self.openai_client()
        assert self._sem is not None
        last = ""
        while True:
            if self.stop is not None:
                raise self.stop
            tokens, cost = self.worst_case(body)
            async with self._sem:
                if self.stop is not None:
                    raise self.stop
                await self.limiter.acquire(tokens)
                try:
                    self.budget.reserve(tokens, cost)
                except BudgetExceeded as e:
                    self.stop = self.stop or e
                    raise self.stop from None
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
                    last = f"HTTP {status}: {self.api_error_text(e)}"
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
                self.stop = self.stop or LLMUnavailable(self.scrub(
                    f"stage {self.stage_id!r}: the LLM endpoint {self.base_url} answered "
                    f"{last}; check llm.base_url, llm.model and the key in "
                    f"${self.config.api_key_env}"))
                raise self.stop
            if status in (400, 422) and UNSUPPORTED_FORMAT.search(last) and \
                    self.downgrade_format(conv, last):
                raise _Reformat
            failure = Failure(status, retry_after_from_headers(headers))
            delay = self.retry.retry_delay(conv.attempts, failure)
            if delay is None:
                # the service failed (not the row) unless it answered 4xx or nonsense
                conv.finish(False, None, None, "llm_error", self.scrub(
                    f"{last} (after {conv.attempts} attempt"
                    f"{'s' if conv.attempts != 1 else ''})"),
                    transient=self.retry.transient(failure) and not malformed)
                return None
            log.debug("stage %s: %s; retry %d in %.2f s", self.stage_id, last,
                      conv.attempts, delay)
            await asyncio.sleep(delay)

    def delay(self, attempt: int, headers: Any = None) -> float:
        """Seconds before retry ``attempt + 1``: the server's Retry-After (capped) when
        ``headers`` give one, else exponential backoff with full jitter."""
        return self.retry.delay(attempt, retry_after_from_headers(headers))

    def api_error_text(self, e: BaseException) -> str:
        """The message of an API error, redacted whole, then cut to 300 characters."""
        return error_text(error_message(e), self.secrets(), limit=300)

    def openai_client(self) -> Any:
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
        raise ValueError(f"not a chat completion: {error_text(raw.text, limit=200)!r}")
    return completion


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
