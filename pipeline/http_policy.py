"""How every HTTP client of the project retries, waits and reports a failure.

The crawl downloader (:mod:`speechmill.stages.download_fetch`), the LLM client
(:mod:`speechmill.synth.llm.client`, :mod:`speechmill.synth.llm.batch`) and the TTS
clients (:mod:`speechmill.synth.tts.http`, :mod:`speechmill.synth.tts.openai_tts`) share
one policy:

* **What retries.** No answer at all (a connection error, a timeout: ``status=None``)
  and the statuses of :attr:`RetryPolicy.retry_status`: by default :data:`RETRY_STATUS`
  (408/409/425/429 and every 5xx); the LLM and TTS clients name narrower sets
  (:data:`LLM_RETRY_STATUS`, :data:`TTS_RETRY_STATUS`); the downloader decides by its
  failure reasons and hands the verdict over as :attr:`Failure.retryable`.
* **How long to wait.** The server's ``Retry-After`` (``retry-after-ms``,
  delta-seconds or an HTTP date: :func:`retry_after_seconds`,
  :func:`retry_after_from_headers`), capped at ``max_retry_after_s``; without one,
  exponential backoff with full jitter, ``uniform(0, min(backoff_max_s,
  backoff_base_s * 2 ** (attempt - 1)))`` (:func:`backoff_delay`).
* **How often.** ``max_attempts`` attempts in all, and no retry that would start after
  ``deadline_s`` seconds from the first attempt (when set).
* **Transient or not.** A failure of the service (no answer, or a status of
  :func:`service_failed`) after the retries is *transient*: the stage's reject carries
  ``transient=True`` (:func:`speechmill.pipeline.records.reject`) and a rerun retries the
  row. Other 4xx answers are what the request earns.
* **Error text.** :func:`error_text` redacts a message whole
  (:func:`speechmill.pipeline.redact.redact_text`) and only then cuts it short, so a
  secret cut in half can never slip through; :func:`error_message` finds the message of
  an API error.

Callers that drive their own loop (they count attempts their way, share a semaphore or
a budget) ask :meth:`RetryPolicy.retry_delay` after each failure: the seconds to wait,
or None when the failure is final. :func:`call_with_retries` and
:func:`call_with_retries_async` run that loop for a plain call, with the caller's
``sleep``.
"""

from __future__ import annotations

import asyncio
import email.utils
import random
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC
from typing import Any, TypeVar

from speechmill.pipeline.redact import redact_text

__all__ = [
    "LLM_RETRY_STATUS",
    "RETRY_STATUS",
    "SERVICE_FAILURE_STATUS",
    "TTS_RETRY_STATUS",
    "Failure",
    "RetryPolicy",
    "backoff_delay",
    "call_with_retries",
    "call_with_retries_async",
    "error_message",
    "error_text",
    "retry_after_from_headers",
    "retry_after_seconds",
    "service_failed",
]

_T = TypeVar("_T")

#: 4xx statuses that mean the service, not the request, failed (besides every 5xx)
SERVICE_FAILURE_STATUS: frozenset[int] = frozenset({408, 409, 425, 429})
#: the general rule, :func:`service_failed` as a set: 408/409/425/429 and every 5xx
RETRY_STATUS: frozenset[int] = SERVICE_FAILURE_STATUS | frozenset(range(500, 600))
#: statuses the LLM client retries (chat completions and Batch API calls)
LLM_RETRY_STATUS: frozenset[int] = frozenset(
    {408, 409, 425, 429, 500, 502, 503, 504, 520, 522, 524, 529})
#: statuses the TTS HTTP client retries
TTS_RETRY_STATUS: frozenset[int] = frozenset({408, 425, 429, 500, 502, 503, 504})


def service_failed(status: int | None) -> bool:
    """Whether a failure with ``status`` (None: no answer at all) is the service's:
    connection errors, timeouts, 408/409/425/429 and every 5xx."""
    return status is None or status >= 500 or status in SERVICE_FAILURE_STATUS


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """A ``Retry-After`` value as seconds from ``now`` (default: the clock): delta-seconds
    or an HTTP date, never negative; None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    ref = time.time() if now is None else now
    return max(0.0, when.timestamp() - ref)


def retry_after_from_headers(headers: Mapping[str, Any] | None,
                             now: float | None = None) -> float | None:
    """The wait a response's headers ask for: ``retry-after-ms`` (milliseconds) when it
    is readable, else ``Retry-After`` (see :func:`retry_after_seconds`). ``headers``
    must look names up case-insensitively (``requests``/``httpx`` headers do)."""
    if headers is None:
        return None
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    return retry_after_seconds(headers.get("retry-after"), now)


def backoff_delay(attempt: int, base_s: float, max_s: float) -> float:
    """Exponential backoff with full jitter before retry ``attempt`` (1-based):
    uniform over ``[0, min(max_s, base_s * 2 ** (attempt - 1))]``."""
    return random.uniform(0, min(max_s, base_s * 2 ** (attempt - 1)))


def error_text(text: Any, secrets: Iterable[str] = (), *, limit: int | None = None,
               ellipsis: str = "") -> str:
    """``text`` redacted whole (registered secrets, ``secrets``, credential patterns),
    then cut to ``limit`` characters; a cut text ends in ``ellipsis`` (within the
    limit)."""
    out = redact_text(text, secrets)
    if limit is None or len(out) <= limit:
        return out
    if ellipsis and limit >= len(ellipsis):
        return out[:limit - len(ellipsis)] + ellipsis
    return out[:max(0, limit)]


def error_message(e: BaseException) -> str:
    """The message of an API error, not yet redacted: the ``error.message`` (or
    ``message``) of its JSON body when it has one, else its ``message`` or text."""
    body = getattr(e, "body", None)
    if isinstance(body, dict):
        err = body.get("error", body)
        msg = err.get("message") if isinstance(err, dict) else err
        if msg:
            return str(msg)
    return str(getattr(e, "message", "") or e)


@dataclass(frozen=True)
class Failure:
    """One failed attempt as the policy sees it."""

    #: the HTTP status, None when no answer came (connection error, timeout)
    status: int | None = None
    #: seconds the server asked to wait (``Retry-After``), if it did
    retry_after: float | None = None
    #: the caller's own verdict on retrying; None: decided by the status
    retryable: bool | None = None


@dataclass(frozen=True)
class RetryPolicy:
    """Attempts, waits and the statuses worth a retry (see the module doc)."""

    max_attempts: int = 5
    backoff_base_s: float = 0.5
    backoff_max_s: float = 30.0
    max_retry_after_s: float = 120.0
    retry_status: frozenset[int] = RETRY_STATUS
    #: no retry starts later than this many seconds after the first attempt (None: none)
    deadline_s: float | None = None

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")

    def retryable(self, failure: Failure | int | None) -> bool:
        """Whether ``failure`` (or a bare status; None: no answer) is worth a retry."""
        if not isinstance(failure, Failure):
            failure = Failure(status=failure)
        if failure.retryable is not None:
            return failure.retryable
        return failure.status is None or failure.status in self.retry_status

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds before retry ``attempt + 1``: ``retry_after`` capped at
        ``max_retry_after_s`` when given, else :func:`backoff_delay`."""
        if retry_after is not None:
            return min(retry_after, self.max_retry_after_s)
        return backoff_delay(attempt, self.backoff_base_s, self.backoff_max_s)

    def gives_up(self, attempt: int, failure: Failure | int | None) -> bool:
        """Whether ``failure`` of ``attempt`` (1-based) is final: not retryable, or the
        attempts are spent."""
        return not self.retryable(failure) or attempt >= self.max_attempts

    def retry_delay(self, attempt: int, failure: Failure | int | None,
                    started: float | None = None) -> float | None:
        """After ``attempt`` (1-based) failed with ``failure``: the seconds to wait
        before the next attempt, or None when the failure is final (not retryable, the
        attempts spent, or the wait would end past the deadline). ``started``: the
        ``time.monotonic()`` of the first attempt (for ``deadline_s``)."""
        if self.gives_up(attempt, failure):
            return None
        ra = failure.retry_after if isinstance(failure, Failure) else None
        wait = self.delay(attempt, ra)
        if self.deadline_s is not None and started is not None and \
                time.monotonic() + wait - started > self.deadline_s:
            return None
        return wait

    def transient(self, failure: Failure | int | None) -> bool:
        """Whether ``failure``, final after the retries, is the service's (the reject is
        transient) rather than the request's: a retryable failure of the service."""
        if not isinstance(failure, Failure):
            failure = Failure(status=failure)
        return self.retryable(failure) and (failure.retryable is not None
                                            or service_failed(failure.status))


def call_with_retries(fn: Callable[[int], _T], policy: RetryPolicy,
                      failure_of: Callable[[Exception], Failure | None], *,
                      sleep: Callable[[float], object] = time.sleep,
                      before_retry: Callable[[int, Failure, float], None] | None = None,
                      give_up: Callable[[int, Failure, Exception], BaseException] | None
                      = None) -> _T:
    """``fn(attempt)`` until it returns, retrying as ``policy`` says.

    ``failure_of`` reads an exception of ``fn`` (None: not an HTTP failure, raised at
    once). ``before_retry(attempt, failure, wait)`` runs before each wait. When the
    failure is final, ``give_up(attempt, failure, exc)`` names the exception to raise
    (``exc`` itself, the default, is raised as it is; another one without context)."""
    started = time.monotonic()
    attempt = 0
    while True:
        attempt += 1
        try:
            return fn(attempt)
        except Exception as e:
            failure, wait = _wait_or_raise(e, attempt, started, policy, failure_of, give_up)
        if before_retry is not None:
            before_retry(attempt, failure, wait)
        sleep(wait)


def _wait_or_raise(e: Exception, attempt: int, started: float, policy: RetryPolicy,
                   failure_of: Callable[[Exception], Failure | None],
                   give_up: Callable[[int, Failure, Exception], BaseException] | None
                   ) -> tuple[Failure, float]:
    """The failure ``e`` of attempt ``attempt`` and the wait before the next one; raises
    (``e``, or what ``give_up`` names) when ``e`` is not an HTTP failure or is final.
    Called inside the ``except`` block, so a bare ``raise`` re-raises ``e``."""
    failure = failure_of(e)
    if failure is None:
        raise
    wait = policy.retry_delay(attempt, failure, started)
    if wait is None:
        final = e if give_up is None else give_up(attempt, failure, e)
        if final is e:
            raise
        raise final from None
    return failure, wait


async def call_with_retries_async(
        fn: Callable[[int], Awaitable[_T]], policy: RetryPolicy,
        failure_of: Callable[[Exception], Failure | None], *,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
        before_retry: Callable[[int, Failure, float], None] | None = None,
        give_up: Callable[[int, Failure, Exception], BaseException] | None = None) -> _T:
    """:func:`call_with_retries` for a coroutine function (waits with ``await sleep``)."""
    started = time.monotonic()
    attempt = 0
    while True:
        attempt += 1
        try:
            return await fn(attempt)
        except Exception as e:
            failure, wait = _wait_or_raise(e, attempt, started, policy, failure_of, give_up)
        if before_retry is not None:
            before_retry(attempt, failure, wait)
        await sleep(wait)
