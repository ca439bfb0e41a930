"""What a fetch of the ``download`` stage may do, and how it ends.

``FetchPolicy`` holds every knob of :class:`~speechmill.stages.download_fetch.Fetcher`:
timeouts, retries and backoff, redirects, size limit, per-host politeness
(:mod:`speechmill.stages.download_hosts`), the host lists and SSRF exemptions
(:mod:`speechmill.stages.download_safety`) and sniffing.

A fetch that fails for good raises ``FetchError`` whose ``reason`` is one of ``REASONS``;
``RETRYABLE`` are the reasons worth another attempt (after backoff or ``Retry-After``).
``FetchError.transient`` tells the two kinds apart once the retries are spent: True when the
service failed (``timeout`` -- HTTP 408 included --, ``connection_error``, ``rate_limited``,
``http_server_error``, ``truncated``; not a DNS name that does not exist), False for what the
URL itself earns (the ``download`` stage's rejects are transient or data accordingly).
A fetched file is described by a ``FetchResult``.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "REASONS",
    "RETRYABLE",
    "FetchError",
    "FetchPolicy",
    "FetchResult",
    "IPAddress",
    "IPNetwork",
]

REASONS = frozenset({
    "bad_url", "blocked_host", "private_address", "not_found", "http_client_error",
    "rate_limited", "http_server_error", "timeout", "connection_error",
    "too_many_redirects", "redirect_loop", "truncated", "too_large", "not_audio",
    "checksum_mismatch", "unverified_peer",
})
#: reasons worth another attempt (after backoff / Retry-After)
RETRYABLE = frozenset({
    "rate_limited", "http_server_error", "timeout", "connection_error", "truncated",
})

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class FetchPolicy:
    user_agent: str = "speechmill/0.1 (+https://pypi.org/project/speechmill/)"
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 30.0          # a stalled body (no bytes for this long) is a timeout
    max_retries: int = 4                  # retries after the first attempt
    backoff_base_s: float = 0.5           # exponential backoff base, with full jitter
    backoff_max_s: float = 30.0
    max_retry_after_s: float = 120.0      # cap on honoured Retry-After (seconds or HTTP date)
    max_redirects: int = 5
    max_bytes: int | None = None          # larger bodies -> too_large
    per_host_concurrency: int = 2         # simultaneous requests per host (process-wide)
    per_host_rps: float = 4.0             # request starts per second per host (0 = unlimited)
    allow_hosts: tuple[str, ...] = ()     # fnmatch patterns; empty = all hosts allowed
    deny_hosts: tuple[str, ...] = ()      # fnmatch patterns, checked first
    allow_private: tuple[str, ...] = ()   # hosts / IPs / CIDRs exempt from the SSRF guard
    sniff: bool = True                    # reject bodies that are HTML/XML/JSON/plain text
    min_speed_bps: float = 512.0          # slower than this over a window: timeout (0 = off)
    slow_window_s: float = 30.0           # ... measured over this many seconds

    def __post_init__(self) -> None:
        if self.per_host_concurrency < 1:
            raise ValueError("per_host_concurrency must be >= 1")
        if self.max_retries < 0 or self.max_redirects < 0:
            raise ValueError("max_retries and max_redirects must be >= 0")
        if self.per_host_rps < 0:
            raise ValueError("per_host_rps must be >= 0")
        if min(self.connect_timeout_s, self.read_timeout_s) <= 0:
            raise ValueError("timeouts must be > 0")


class FetchError(Exception):
    """A fetch that failed for good; ``reason`` is one of ``REASONS``."""

    def __init__(self, reason: str, detail: str = "", *, status: int | None = None,
                 attempts: int = 0, url: str = "", retry_after: float | None = None,
                 retry: bool | None = None) -> None:
        super().__init__(reason, detail)
        self.reason = reason
        self.detail = detail
        self.status = status
        self.attempts = attempts
        self.url = url
        self.retry_after = retry_after  # seconds the server asked for (429/503), if any
        self._retry = retry             # None: decided by reason

    @property
    def retryable(self) -> bool:
        return self._retry if self._retry is not None else self.reason in RETRYABLE

    @property
    def transient(self) -> bool:
        """A failure of the service (after the retries), not of the URL: a retryable
        network/server reason (``timeout``, ``connection_error``, ``rate_limited``,
        ``http_server_error``, ``truncated``)."""
        return self.retryable and self.reason in RETRYABLE

    def __str__(self) -> str:
        status = f" [HTTP {self.status}]" if self.status is not None else ""
        return (f"{self.reason}: {self.detail}{status} ({self.url}, "
                f"attempts: {self.attempts})")

    def __reduce__(self) -> tuple[Any, ...]:
        return (self.__class__, (self.reason, self.detail), self.__dict__.copy())


@dataclass
class FetchResult:
    url: str
    final_url: str
    status: int                  # 200, or 206 when the file was completed by a resume
    path: Path
    size: int
    sha256: str
    etag: str | None
    last_modified: str | None
    content_type: str | None
    attempts: int
    resumed: bool                # the file was completed from bytes of an earlier attempt
    fetched_at: str              # ISO-8601 UTC
    redirects: list[str] = field(default_factory=list)
