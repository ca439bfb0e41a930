"""A small HTTP client for TTS servers: timeouts, retries with backoff that honour
``Retry-After``, a per-backend concurrency limit, and API keys read from an environment
variable that never reach a log, an error message or a result.

Retried (:mod:`speechmill.pipeline.http_policy`, with :data:`TTS_RETRY_STATUS
<speechmill.pipeline.http_policy.TTS_RETRY_STATUS>`): connection errors, timeouts,
408/425/429 and 500/502/503/504 answers; the server's ``Retry-After`` and the backoff are
both capped at ``max_backoff_s``. Other 4xx answers are permanent (the request is wrong:
retrying cannot help) and fail at once.

Classification of the :class:`TTSError` raised (``transient``): a server that keeps
refusing connections, timing out, breaking off its answer or answering 408/425/429/5xx
after the retries is a failure of the service (``transient=True``: the stage's reject is
retried by a rerun); other 4xx answers and malformed requests are data (``False``).
The key (and the URL's credentials) are registered with :mod:`speechmill.pipeline.redact`
and every message is redacted whole before a server's answer is cut short.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

from speechmill.pipeline.errors import ConfigError
from speechmill.pipeline.http_policy import (
    TTS_RETRY_STATUS,
    Failure,
    RetryPolicy,
    error_text,
    retry_after_seconds,
)
from speechmill.pipeline.redact import register_secret, register_secrets
from speechmill.synth.tts.base import TTSError

log = logging.getLogger(__name__)


def api_key(env: str | None, *, required: bool, what: str) -> str | None:
    """The key in ``$env`` (``ConfigError`` naming the variable, never its value)."""
    if not env:
        if required:
            raise ConfigError(f"{what} needs an API key: set api_key_env to the name of an "
                              "environment variable holding it", key="tts.api_key_env")
        return None
    val = os.environ.get(env)
    if not val:
        if required:
            raise ConfigError(f"{what}: environment variable {env} is not set",
                              key="tts.api_key_env")
        return None
    return val


class HttpClient:
    def __init__(self, base_url: str, *, key: str | None = None, timeout_s: float = 120.0,
                 max_retries: int = 4, backoff_s: float = 1.0, max_backoff_s: float = 30.0,
                 max_concurrency: int = 4) -> None:
        self.base_url = base_url.rstrip("/")
        self._key = key
        register_secret(key)
        register_secrets(self.base_url)
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.max_concurrency = max_concurrency
        self.retry = RetryPolicy(max_attempts=max_retries + 1, backoff_base_s=backoff_s,
                                 backoff_max_s=max_backoff_s,
                                 max_retry_after_s=max_backoff_s,
                                 retry_status=TTS_RETRY_STATUS)
        self._slots = threading.BoundedSemaphore(max_concurrency)
        self._local = threading.local()
        self._stop = threading.Event()

    def _session(self) -> Any:
        import requests

        s = getattr(self._local, "session", None)
        if s is None:
            s = requests.Session()
            s.trust_env = False  # no proxies from the environment for a configured server
            if self._key:
                s.headers["Authorization"] = f"Bearer {self._key}"
            self._local.session = s
        return s

    def url(self, path: str) -> str:
        return f"{self.base_url}/{path.lstrip('/')}" if path else self.base_url

    def redact(self, text: str, limit: int | None = None) -> str:
        """``text`` without the key or any registered secret, then cut to ``limit``."""
        return error_text(text, [self._key] if self._key else [], limit=limit)

    def post(self, path: str, **kw: Any) -> Any:
        """POST with retries; the ``requests.Response`` of a 2xx answer, else
        :class:`TTSError`. ``files`` values may be ``(name, bytes, type)`` tuples (they are
        re-sent on every attempt)."""
        import requests

        url = self.url(path)
        shown = self.redact(url)
        last = ""
        failure: Failure | None = None
        for attempt in range(1, self.retry.max_attempts + 1):
            if failure is not None:
                delay = self.retry.delay(attempt - 1, failure.retry_after)
                log.info("tts http: retry %d/%d of %s in %.1fs (%s)", attempt - 1,
                         self.max_retries, shown, delay, last)
                if self._stop.wait(delay):
                    break
            with self._slots:
                try:
                    r = self._session().post(url, timeout=(min(10.0, self.timeout_s),
                                                           self.timeout_s), **kw)
                except (requests.ConnectionError, requests.Timeout,
                        requests.exceptions.ChunkedEncodingError) as e:
                    last = f"{type(e).__name__}"
                    failure = Failure(status=None)
                    continue
                except requests.RequestException as e:
                    raise TTSError(self.redact(f"POST {shown}: {type(e).__name__}: {e}",
                                               500)) from None
            if 200 <= r.status_code < 300:
                return r
            body = self.redact(r.text if r.content else "", 300)
            failure = Failure(r.status_code, retry_after_seconds(r.headers.get("Retry-After")))
            if not self.retry.retryable(failure):
                raise TTSError(f"POST {shown}: HTTP {r.status_code}: {body}")
            last = f"HTTP {r.status_code}: {body[:200]}"
        raise TTSError(f"POST {shown}: gave up after {self.max_retries + 1} attempts ({last})",
                       transient=failure is None or self.retry.transient(failure))

    def close(self) -> None:
        self._stop.set()
