"""Batch API mode of the LLM client (``batch_api: true``).

The requests of one :meth:`LLMClient.run` call that the cache cannot answer are written
as one JSONL file (``custom_id`` = the request's cache key), uploaded to ``/v1/files``
(purpose ``batch``) and submitted to ``/v1/batches``; the client polls the batch every
``batch_poll_s`` seconds, downloads its output (and error) file and puts every answer in
the same response cache as the online path. Answers that need a follow-up (invalid
output fed back) or a retry (a failed line, an expired batch) go into the next round's
batch, up to ``max_attempts`` / ``max_fix_attempts`` as online.

The batch id and the keys it holds are written to ``cache_dir/_batches/<batch id>.json``
before the first poll, so a process killed while a batch runs (hours, often) resumes by
polling that batch instead of submitting and paying for it again, whichever worker or
batch of rows asks for those keys next. The file goes once the batch's answers are
cached. Set the DAG's ``executor.stall_timeout_s`` above the batch latency you expect.

A request whose batch line kept failing with a retryable status (408/409/425/429/5xx) or
went missing from the output (an expired or cancelled batch) is ``llm_error`` with
``transient`` set, as online; other statuses are data rejects. Error messages of the
batch output are redacted whole before they are cut short
(:func:`speechmill.pipeline.http_policy.error_text`). Calls to the files and batches
endpoints retry as the online path does (:attr:`LLMClient.retry
<speechmill.synth.llm.client.LLMClient.retry>`) and stop the stage
(:class:`~speechmill.synth.llm.budget.LLMUnavailable`) when they keep failing.

The client is passed in as a :class:`BatchHost`: what this module needs of
:class:`~speechmill.synth.llm.client.LLMClient`, which imports this module.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

from speechmill.pipeline.http_policy import (
    Failure,
    RetryPolicy,
    call_with_retries_async,
    error_text,
    retry_after_from_headers,
)
from speechmill.synth.llm.budget import Budget, LLMStop, LLMUnavailable, Spend, SpendLedger
from speechmill.synth.llm.cache import ResponseCache, write_atomic
from speechmill.synth.llm.config import LLMConfig
from speechmill.synth.llm.conversation import UNSUPPORTED_FORMAT, ChatResult, Conversation

__all__ = ["BatchHost", "run_batch_mode"]

log = logging.getLogger("speechmill")

_TERMINAL = {"completed", "failed", "expired", "cancelled"}
_ENDPOINT = "/v1/chat/completions"


class BatchHost(Protocol):
    """What the Batch API mode uses of the LLM client."""

    config: LLMConfig
    stage_id: str
    base_url: str
    cache_dir: Path
    cache: ResponseCache
    ledger: SpendLedger
    budget: Budget
    retry: RetryPolicy
    stop: LLMStop | None

    def body(self, conv: Conversation) -> dict[str, Any]: ...

    def key(self, conv: Conversation, body: dict[str, Any]) -> str: ...

    def check_answer(self, conv: Conversation, resp: dict[str, Any]) -> ChatResult | None: ...

    def downgrade_format(self, conv: Conversation, why: str) -> bool: ...

    def account(self, conv: Conversation, resp: dict[str, Any], body: dict[str, Any],
                batch: bool = False, record: bool = True) -> None: ...

    def worst_case(self, body: dict[str, Any], batch: bool = False) -> tuple[int, float]: ...

    def response_dict(self, completion: Any) -> dict[str, Any]: ...

    def secrets(self) -> list[str]: ...

    def scrub(self, text: str, limit: int | None = None) -> str: ...

    def api_error_text(self, e: BaseException) -> str: ...

    def openai_client(self) -> Any: ...

    async def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any: ...


def _state_dir(client: BatchHost) -> Path:
    return client.cache_dir / "_batches"


def _states(client: BatchHost) -> list[tuple[Path, dict[str, Any]]]:
    out = []
    d = _state_dir(client)
    if not d.is_dir():
        return out
    for p in sorted(d.glob("*.json")):
        try:
            st = json.loads(p.read_bytes())
        except (OSError, ValueError):
            continue
        if isinstance(st, dict) and st.get("batch_id"):
            out.append((p, st))
    return out


async def run_batch_mode(client: BatchHost, convs: list[Conversation]) -> None:
    """Answer ``convs`` through the Batch API, round after round."""
    pending = list(convs)
    while pending:
        need: dict[str, tuple[dict[str, Any], list[Conversation]]] = {}
        for conv in pending:
            while conv.result is None:
                body = client.body(conv)
                key = client.key(conv, body)
                resp = client.cache.get(key)
                if resp is None:
                    need.setdefault(key, (body, []))[1].append(conv)
                    break
                conv.usage["cache_hits"] += 1
                client.check_answer(conv, resp)
        if not need:
            return
        try:
            outcome = await _answers(client, need)
        except LLMStop as e:
            client.stop = client.stop or e
            return
        for key, (body, cs) in need.items():
            o = outcome.get(key, ("error", None, "missing from the batch output"))
            for i, conv in enumerate(cs):
                conv.attempts += 1
                conv.usage["attempts"] += 1
                if o[0] == "ok":
                    if i == 0 and o[2]:
                        conv.usage["requests"] += 1
                        client.account(conv, o[1], body, batch=True, record=False)
                    else:
                        conv.usage["cache_hits"] += 1
                    client.check_answer(conv, o[1])
                    continue
                if i == 0:
                    conv.usage["requests"] += 1
                _, status, msg = o
                last = f"HTTP {status}: {msg}" if status else str(msg)
                if status in (400, 422) and UNSUPPORTED_FORMAT.search(last) and \
                        client.downgrade_format(conv, last):
                    conv.attempts = 0
                    continue
                failure = Failure(status)
                if client.retry.gives_up(conv.attempts, failure):
                    conv.finish(False, None, None, "llm_error", client.scrub(
                        f"{last} (batch API, after {conv.attempts} attempt"
                        f"{'s' if conv.attempts != 1 else ''})"),
                        transient=client.retry.transient(failure))
        pending = [c for c in convs if c.result is None]


async def _answers(client: BatchHost, need: dict[str, tuple[dict[str, Any], list[Conversation]]]
                   ) -> dict[str, tuple[Any, ...]]:
    """Answers for the keys of ``need``: ``("ok", resp, fresh)`` or ``("error", status,
    message)``. Batches submitted earlier (by any process) that hold some of the keys are
    polled and collected first; the rest goes into one new batch."""
    out: dict[str, tuple[Any, ...]] = {}
    left = set(need)
    for path, st in _states(client):
        keys = set(st.get("keys") or [])
        if not keys & left:
            continue
        log.info("stage %s: resuming batch %s (%d requests)", client.stage_id,
                 st["batch_id"], len(keys))
        got = await _collect(client, path, st)
        for k in keys & left:
            out[k] = got.get(k, ("error", None, "missing from the batch output"))
        left -= keys
    if not left:
        return out
    bodies = {k: need[k][0] for k in sorted(left)}
    tokens = cost = 0.0
    for b in bodies.values():
        t, c = client.worst_case(b, batch=True)
        tokens += t
        cost += c
    client.budget.reserve(int(tokens), cost)  # raises BudgetExceeded
    try:
        path, st = await _submit(client, bodies)
        got = await _collect(client, path, st)
    finally:
        client.budget.release(int(tokens), cost)
    for k in left:
        out[k] = got.get(k, ("error", None, "missing from the batch output"))
    return out


async def _submit(client: BatchHost, bodies: dict[str, dict[str, Any]]
                  ) -> tuple[Path, dict[str, Any]]:
    oa = client.openai_client()
    lines = [json.dumps({"custom_id": k, "method": "POST", "url": _ENDPOINT, "body": b},
                        ensure_ascii=False, sort_keys=True) for k, b in bodies.items()]
    data = ("\n".join(lines) + "\n").encode("utf-8")
    tag = hashlib.sha256("\n".join(bodies).encode()).hexdigest()[:16]
    f = await _retrying(client, "upload the batch file", lambda: client.call(
        oa.files.create, purpose="batch",
        file=(f"speechmill-{client.stage_id}-{tag}.jsonl", data, "application/jsonl")))
    b = await _retrying(client, "create the batch", lambda: client.call(
        oa.batches.create, input_file_id=f.id, endpoint=_ENDPOINT,
        completion_window=client.config.batch_completion_window,
        metadata={"speechmill_stage": client.stage_id[:500]}))
    st = {"batch_id": b.id, "input_file_id": f.id, "submitted_at": time.time(),
          "keys": sorted(bodies)}
    path = _state_dir(client) / f"{b.id}.json"
    write_atomic(path, json.dumps(st).encode())
    log.info("stage %s: submitted batch %s (%d requests)", client.stage_id, b.id,
             len(bodies))
    return path, st


async def _collect(client: BatchHost, path: Path, st: dict[str, Any]
                   ) -> dict[str, tuple[Any, ...]]:
    """Poll batch ``st`` to its end and cache its answers; the keys' outcomes."""
    oa = client.openai_client()
    bid = st["batch_id"]
    while True:
        b = await _retrying(client, f"poll batch {bid}",
                            lambda: client.call(oa.batches.retrieve, bid))
        if b.status in _TERMINAL:
            break
        await asyncio.sleep(client.config.batch_poll_s)
    out: dict[str, tuple[Any, ...]] = {}
    if b.status == "failed":
        errs = getattr(b, "errors", None)
        data = getattr(errs, "data", None) or []
        msg = "; ".join(client.scrub(str(getattr(e, "message", e)), 300)
                        for e in data[:3]) or "batch failed"
        path.unlink(missing_ok=True)
        raise LLMUnavailable(client.scrub(
            f"stage {client.stage_id!r}: batch {bid} failed: {msg}"))
    for fid in (b.output_file_id, getattr(b, "error_file_id", None)):
        if not fid:
            continue
        content = await _retrying(client, f"download {fid}",
                                  lambda f=fid: client.call(oa.files.content, f))
        raw = content.content if hasattr(content, "content") else bytes(content)
        for line in raw.decode("utf-8").splitlines():
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            key = obj.get("custom_id")
            if not isinstance(key, str):
                continue
            resp = obj.get("response") or {}
            status = resp.get("status_code")
            body = resp.get("body")
            if status == 200 and isinstance(body, dict):
                fresh = key not in client.cache
                r = client.response_dict(body)
                client.cache.put(key, r)
                if fresh:  # paid for: into the ledger, whichever row asked
                    p, c = r["prompt_tokens"], r["completion_tokens"]
                    client.ledger.record(Spend(1, p, c, client.config.cost(p, c, True)))
                out[key] = ("ok", r, fresh)
            elif key not in out:
                err = obj.get("error") or (body or {}).get("error") or {}
                msg = err.get("message") if isinstance(err, dict) else str(err)
                out[key] = ("error", status, error_text(str(msg or "failed"),
                                                        client.secrets(), limit=300))
    # answers of keys no row of this call asked for (another worker's, or a killed
    # attempt's) are cached above; the batch is finished with
    path.unlink(missing_ok=True)
    if b.status != "completed":
        log.warning("stage %s: batch %s ended %s; %d answers", client.stage_id, bid,
                    b.status, sum(1 for v in out.values() if v[0] == "ok"))
    return out


async def _retrying(client: BatchHost, what: str, fn: Callable[[], Awaitable[Any]]) -> Any:
    """``fn()`` with the client's retry policy; stops the stage when it keeps failing."""
    import openai

    def failure_of(e: Exception) -> Failure | None:
        if isinstance(e, openai.APIStatusError):
            return Failure(e.status_code, retry_after_from_headers(e.response.headers))
        if isinstance(e, openai.APITimeoutError | openai.APIConnectionError):
            return Failure(None)
        return None

    def give_up(attempt: int, failure: Failure, e: Exception) -> BaseException:
        last = (f"HTTP {failure.status}: {client.api_error_text(e)}"
                if failure.status is not None else type(e).__name__)
        return LLMUnavailable(client.scrub(
            f"stage {client.stage_id!r}: Batch API at {client.base_url}: cannot {what}: "
            f"{last} (after {attempt} attempts)"))

    return await call_with_retries_async(lambda attempt: fn(), client.retry, failure_of,
                                         give_up=give_up)
