"""The shared HTTP policy: Retry-After, backoff, classification, error text and the
retry loops (sync and asyncio)."""

from __future__ import annotations

import asyncio
import time

import pytest

from speechmill.pipeline import http_policy as hp
from speechmill.pipeline.http_policy import (
    LLM_RETRY_STATUS,
    TTS_RETRY_STATUS,
    Failure,
    RetryPolicy,
    backoff_delay,
    call_with_retries,
    call_with_retries_async,
    error_message,
    error_text,
    retry_after_from_headers,
    retry_after_seconds,
    service_failed,
)
from speechmill.pipeline.redact import MASK

# -- Retry-After ---------------------------------------------------------------------------


def test_retry_after_delta_seconds() -> None:
    assert retry_after_seconds("7") == 7.0
    assert retry_after_seconds(" 0 ") == 0.0
    assert retry_after_seconds("1.5") == 1.5
    assert retry_after_seconds("-3") == 0.0  # never negative


@pytest.mark.parametrize("value", [None, "", "soon", "Wed, 99 Foo 20x5", "tomorrow 12:00"])
def test_retry_after_garbage_is_none(value: str | None) -> None:
    assert retry_after_seconds(value) is None


def test_retry_after_http_dates() -> None:
    now = time.time()
    future = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(now + 30))
    assert retry_after_seconds(future, now=now) == pytest.approx(30, abs=1.5)
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # in the past
    # "-0000" is a date without a time zone: read as UTC
    naive = time.strftime("%a, %d %b %Y %H:%M:%S -0000", time.gmtime(now + 60))
    assert retry_after_seconds(naive, now=now) == pytest.approx(60, abs=1.5)


def test_retry_after_from_headers() -> None:
    assert retry_after_from_headers(None) is None
    assert retry_after_from_headers({}) is None
    assert retry_after_from_headers({"retry-after-ms": "250"}) == pytest.approx(0.25)
    # milliseconds win over seconds; unreadable milliseconds fall back to seconds
    assert retry_after_from_headers({"retry-after-ms": "100", "retry-after": "9"}) \
        == pytest.approx(0.1)
    assert retry_after_from_headers({"retry-after-ms": "x", "retry-after": "9"}) == 9.0
    assert retry_after_from_headers({"retry-after": "later"}) is None


# -- backoff and caps ----------------------------------------------------------------------


def test_backoff_is_full_jitter_under_an_exponential_cap() -> None:
    for attempt, cap in ((1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (7, 4.0)):
        d = [backoff_delay(attempt, 0.5, 4.0) for _ in range(500)]
        assert min(d) >= 0 and max(d) <= cap
        assert min(d) < cap * 0.1 and max(d) > cap * 0.9  # spread over [0, cap]


def test_delay_caps_retry_after_and_uses_backoff_without_it() -> None:
    p = RetryPolicy(backoff_base_s=0.01, backoff_max_s=0.02, max_retry_after_s=5.0)
    assert p.delay(1, 3.0) == 3.0
    assert p.delay(1, 3600.0) == 5.0
    assert p.delay(1, 0.0) == 0.0
    assert all(0 <= p.delay(9) <= 0.02 for _ in range(200))


def test_delay_uses_the_module_random(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hp.random, "uniform", lambda a, b: b)
    assert RetryPolicy(backoff_base_s=1.0, backoff_max_s=100.0).delay(4) == 8.0


# -- classification ------------------------------------------------------------------------


def test_service_failed() -> None:
    assert service_failed(None)
    for st in (408, 409, 425, 429, 500, 501, 503, 529, 599):
        assert service_failed(st), st
    for st in (400, 401, 403, 404, 413, 422):
        assert not service_failed(st), st


def test_retry_sets_per_client() -> None:
    assert {408, 409, 425, 429, 500, 502, 503, 504, 520, 522, 524, 529} == LLM_RETRY_STATUS
    assert {408, 425, 429, 500, 502, 503, 504} == TTS_RETRY_STATUS
    llm = RetryPolicy(retry_status=LLM_RETRY_STATUS)
    tts = RetryPolicy(retry_status=TTS_RETRY_STATUS)
    assert llm.retryable(409) and not tts.retryable(409)
    assert not llm.retryable(501) and not tts.retryable(501)
    assert llm.retryable(None) and tts.retryable(Failure(None))
    assert not llm.retryable(400) and not llm.retryable(404)


def test_default_retry_status_is_every_service_failure() -> None:
    p = RetryPolicy()
    for st in (408, 409, 425, 429, 500, 501, 503, 599):
        assert p.retryable(st) and p.transient(st), st
    for st in (400, 401, 404, 422):
        assert not p.retryable(st) and not p.transient(st), st


def test_callers_verdict_overrides_the_status() -> None:
    p = RetryPolicy()
    assert p.retryable(Failure(status=None, retryable=False)) is False
    assert p.retryable(Failure(status=404, retryable=True)) is True
    assert p.transient(Failure(status=None, retryable=False)) is False
    assert p.transient(Failure(status=None, retryable=True)) is True


def test_transient() -> None:
    p = RetryPolicy(retry_status=LLM_RETRY_STATUS)
    assert p.transient(None) and p.transient(429) and p.transient(Failure(503))
    assert not p.transient(400) and not p.transient(422)
    assert not p.transient(501)  # not retried by this client: the request's failure


def test_attempt_count_and_gives_up() -> None:
    p = RetryPolicy(max_attempts=3, backoff_base_s=0, backoff_max_s=0)
    assert not p.gives_up(1, 503) and not p.gives_up(2, 503) and p.gives_up(3, 503)
    assert p.gives_up(1, 400)
    assert p.retry_delay(1, Failure(503, retry_after=2.0)) == 2.0
    assert p.retry_delay(3, Failure(503)) is None
    assert p.retry_delay(1, Failure(400)) is None
    with pytest.raises(ValueError):
        RetryPolicy(max_attempts=0)


def test_deadline_stops_retries_that_would_end_past_it() -> None:
    p = RetryPolicy(max_attempts=10, max_retry_after_s=60.0, deadline_s=5.0)
    started = time.monotonic()
    assert p.retry_delay(1, Failure(503, retry_after=1.0), started) == 1.0
    assert p.retry_delay(1, Failure(503, retry_after=10.0), started) is None
    assert p.retry_delay(1, Failure(503, retry_after=1.0), started - 4.5) is None
    # no start time given: the deadline cannot apply
    assert p.retry_delay(1, Failure(503, retry_after=10.0)) == 10.0


# -- error text ----------------------------------------------------------------------------


def test_error_text_redacts_before_it_truncates() -> None:
    secret = "sk-proj-ABCDEFGHIJKLMNOPQRSTUVWX"
    text = "x" * 20 + secret + " tail"
    cut = len("x" * 20) + 10  # the cut would fall inside the secret
    out = error_text(text, [secret], limit=cut)
    assert len(out) <= cut
    assert "ABCDEFG"[:5] not in out and "sk-proj-AB" not in out
    assert out.startswith("x" * 20) and out[20:].startswith(MASK[:cut - 20])
    # whole text: the secret is masked, nothing is cut
    assert error_text(text, [secret]) == "x" * 20 + MASK + " tail"


def test_error_text_masks_credential_patterns_without_being_told() -> None:
    out = error_text("boom; Authorization: Bearer abcdefgh12345 at https://u:pw123456@h/x")
    assert "abcdefgh12345" not in out and "pw123456" not in out and out.startswith("boom")


def test_error_text_limits_and_ellipsis() -> None:
    assert error_text("short", limit=10) == "short"
    assert error_text("a" * 20, limit=10) == "a" * 10
    assert error_text("a" * 20, limit=10, ellipsis="...") == "a" * 7 + "..."
    assert error_text("a" * 10, limit=10, ellipsis="...") == "a" * 10
    assert error_text("a" * 20, limit=2, ellipsis="...") == "aa"
    assert error_text(None) == ""


def test_error_message_reads_api_error_bodies() -> None:
    class ApiError(Exception):
        def __init__(self, body: object, message: str = "") -> None:
            super().__init__(message or "plain")
            self.body = body
            self.message = message

    assert error_message(ApiError({"error": {"message": "model overloaded"}})) \
        == "model overloaded"
    assert error_message(ApiError({"message": "flat"})) == "flat"
    assert error_message(ApiError({"error": "just text"})) == "just text"
    assert error_message(ApiError(None, "from message")) == "from message"
    assert error_message(ValueError("bare")) == "bare"


# -- the retry loops -----------------------------------------------------------------------


class Boom(Exception):
    def __init__(self, status: int | None, retry_after: float | None = None) -> None:
        super().__init__(f"status {status}")
        self.status = status
        self.retry_after = retry_after


def failure_of(e: Exception) -> Failure | None:
    return Failure(e.status, e.retry_after) if isinstance(e, Boom) else None


def test_call_with_retries_retries_then_succeeds() -> None:
    sleeps: list[float] = []
    seen: list[tuple[int, int | None, float]] = []
    plan = [Boom(503, 0.25), Boom(None), "ok"]

    def fn(attempt: int) -> str:
        step = plan[attempt - 1]
        if isinstance(step, Exception):
            raise step
        return f"{step}@{attempt}"

    p = RetryPolicy(max_attempts=5, backoff_base_s=0.01, backoff_max_s=0.01)
    out = call_with_retries(fn, p, failure_of, sleep=sleeps.append,
                            before_retry=lambda n, f, d: seen.append((n, f.status, d)))
    assert out == "ok@3"
    assert sleeps[0] == 0.25 and 0 <= sleeps[1] <= 0.01
    assert [(n, st) for n, st, _ in seen] == [(1, 503), (2, None)]


def test_call_with_retries_gives_up_with_the_callers_error() -> None:
    calls: list[int] = []

    def fn(attempt: int) -> None:
        calls.append(attempt)
        raise Boom(503)

    p = RetryPolicy(max_attempts=3, backoff_base_s=0, backoff_max_s=0)
    with pytest.raises(Boom):
        call_with_retries(fn, p, failure_of, sleep=lambda d: None)
    assert calls == [1, 2, 3]

    calls.clear()
    with pytest.raises(RuntimeError, match="gave up after 3: 503") as ei:
        call_with_retries(fn, p, failure_of, sleep=lambda d: None,
                          give_up=lambda n, f, e: RuntimeError(f"gave up after {n}: {f.status}"))
    assert ei.value.__cause__ is None and ei.value.__suppress_context__


def test_call_with_retries_raises_other_errors_and_final_statuses_at_once() -> None:
    calls: list[int] = []

    def fn(attempt: int) -> None:
        calls.append(attempt)
        raise KeyError("not http")

    with pytest.raises(KeyError):
        call_with_retries(fn, RetryPolicy(), failure_of, sleep=lambda d: None)

    def fn400(attempt: int) -> None:
        calls.append(attempt)
        raise Boom(400)

    calls.clear()
    with pytest.raises(Boom):
        call_with_retries(fn400, RetryPolicy(), failure_of, sleep=lambda d: None)
    assert calls == [1]


def test_call_with_retries_async() -> None:
    sleeps: list[float] = []

    async def sleep(d: float) -> None:
        sleeps.append(d)

    async def fn(attempt: int) -> int:
        if attempt < 3:
            raise Boom(429, 0.5)
        return attempt

    p = RetryPolicy(max_attempts=4, max_retry_after_s=0.3)
    assert asyncio.run(call_with_retries_async(fn, p, failure_of, sleep=sleep)) == 3
    assert sleeps == [0.3, 0.3]  # Retry-After capped

    async def always(attempt: int) -> int:
        raise Boom(None)

    with pytest.raises(ValueError, match="after 4"):
        asyncio.run(call_with_retries_async(
            always, p, failure_of, sleep=sleep,
            give_up=lambda n, f, e: ValueError(f"after {n}")))
