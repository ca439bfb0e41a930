"""Process-wide politeness and per-thread state of the ``download`` stage's fetcher.

The ``download`` stage fetches from a thread pool, so everything here is thread-safe; the
host gates and destination locks are shared by every
:class:`~speechmill.stages.download_fetch.Fetcher` and thread of a process.

Politeness
    Per host (the URL's host name) at most ``FetchPolicy.per_host_concurrency`` requests are
    in flight and request starts are spaced at least ``1 / per_host_rps`` seconds apart; both
    limits live in a module-level registry of ``HostGate`` objects (``host_gate``). A
    ``Retry-After`` from a 429 or 503 (seconds or an HTTP date, capped at
    ``max_retry_after_s``) delays every later request to that host (``HostGate.defer``),
    not only the retry.

``dest_lock`` lets one fetch at a time write a destination; ``thread_session`` is the
thread's ``requests`` session (connection pools are per thread; requests does no retries);
``backoff_sleep`` is the sleep between attempts, a seam for tests.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import requests
from requests.adapters import HTTPAdapter

__all__ = ["HostGate", "backoff_sleep", "dest_lock", "host_gate", "thread_session"]


class HostGate:
    """Concurrency slots and start spacing for one host, shared by the whole process."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._in_flight = 0
        self._next_start = 0.0   # monotonic time of the next free start slot
        self._not_before = 0.0   # set by Retry-After

    def acquire(self, limit: int, rps: float) -> None:
        with self._cond:
            while self._in_flight >= limit:
                self._cond.wait()
            self._in_flight += 1
            now = time.monotonic()
            start = max(now, self._not_before)
            if rps > 0:
                start = max(start, self._next_start)
                self._next_start = start + 1.0 / rps
        if start > now:
            try:
                time.sleep(start - now)
            except BaseException:
                self.release()
                raise

    def release(self) -> None:
        with self._cond:
            self._in_flight -= 1
            self._cond.notify()

    def defer(self, until: float) -> None:
        with self._cond:
            self._not_before = max(self._not_before, until)


_GATES: dict[str, HostGate] = {}
_GATES_LOCK = threading.Lock()


def host_gate(host: str) -> HostGate:
    """The process's gate for ``host`` (created on first use)."""
    with _GATES_LOCK:
        g = _GATES.get(host)
        if g is None:
            g = _GATES[host] = HostGate()
        return g


class _DestLock:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.users = 0


_DEST_LOCKS: dict[str, _DestLock] = {}
_DEST_LOCKS_LOCK = threading.Lock()


@contextlib.contextmanager
def dest_lock(dest: Path) -> Iterator[None]:
    """One fetch per destination at a time within the process."""
    key = os.path.abspath(dest)
    with _DEST_LOCKS_LOCK:
        entry = _DEST_LOCKS.setdefault(key, _DestLock())
        entry.users += 1
    entry.lock.acquire()
    try:
        yield
    finally:
        entry.lock.release()
        with _DEST_LOCKS_LOCK:
            entry.users -= 1
            if entry.users == 0:
                del _DEST_LOCKS[key]


_TLS = threading.local()


def thread_session() -> requests.Session:
    """This thread's session (connection pools are per thread; requests does no retries)."""
    s: requests.Session | None = getattr(_TLS, "session", None)
    if s is None:
        s = requests.Session()
        adapter = HTTPAdapter(pool_connections=32, pool_maxsize=4, max_retries=0)
        s.mount("http://", adapter)
        s.mount("https://", adapter)
        _TLS.session = s
    return s


def backoff_sleep(seconds: float) -> None:
    """Backoff sleep (a seam for tests)."""
    if seconds > 0:
        time.sleep(seconds)
