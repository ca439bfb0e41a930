"""Polite, fault-tolerant, resumable HTTP(S) file fetching for the ``download`` stage.

``Fetcher.fetch(url, dest)`` downloads one file; the ``download`` stage calls it from a
thread pool, so everything here is thread-safe and the per-host limits are process-wide.

Politeness
    Every request carries ``FetchPolicy.user_agent``. Per host (the URL's host name) at most
    ``per_host_concurrency`` requests are in flight and request starts are spaced at least
    ``1 / per_host_rps`` seconds apart; both limits live in a module-level registry, so
    they hold across all ``Fetcher`` instances and threads of a process. A ``Retry-After``
    from a 429 or 503 (seconds or an HTTP date, capped at ``max_retry_after_s``) delays
    every later request to that host, not only the retry.

Safety
    Only http and https URLs; ``deny_hosts`` and then ``allow_hosts`` (fnmatch patterns)
    are checked, and every host is resolved with ``socket.getaddrinfo``: an address that is
    loopback, private, link-local, reserved, multicast, unspecified or otherwise not
    globally routable is refused (``private_address``) unless ``allow_private`` names the
    host, the address or a network containing it. Redirects are followed by hand and
    every hop is checked again. As a guard against DNS rebinding the peer address of the
    actual connection (plain or TLS) is checked too, as soon as the response headers are
    in and before any body byte is read, redirect bodies included (not when a proxy from
    the environment is used: the peer is then the proxy). The check fails closed: when
    the peer address cannot be read the response is dropped unread (``unverified_peer``)
    unless ``allow_private`` names the host. A redirect's body is never read, whatever
    its size: the connection is closed once the Location is known.
    With ``sniff`` a body that starts like HTML, XML, JSON or plain text is refused
    (``not_audio``), and ``max_bytes`` bounds a body by its declared length and while
    streaming. File names are never derived from URLs: the caller picks ``dest``.

Faults and retries
    Timeouts, connection errors, short bodies, 429 and 5xx are retried ``max_retries``
    times with exponential backoff and full jitter (``uniform(0, min(backoff_max_s,
    backoff_base_s * 2**n))``) or the server's ``Retry-After``. Other 4xx, redirect
    problems, policy refusals, ``too_large``, ``not_audio`` and ``checksum_mismatch`` are
    final at once. Failures raise ``FetchError`` whose ``reason`` is one of ``REASONS``.
    ``FetchError.transient`` tells the two kinds apart once the retries are spent: True
    when the service failed (``timeout`` -- HTTP 408 included --, ``connection_error``,
    ``rate_limited``, ``http_server_error``, ``truncated``; not a DNS name that does not
    exist), False for what the URL itself earns (the ``download`` stage's rejects are
    transient or data accordingly).

Resume and atomicity
    Bytes arrive in ``<dest>.part``; before the first byte is written ``<dest>.part.json``
    records ``url`` (as requested), ``final_url``, ``etag``, ``last_modified``, ``total``
    (full length or null) and ``content_encoding``. A later attempt -- a retry, a later
    call, another process after a crash -- continues a part whose record names the same
    URL with ``Range: bytes=<size>-`` and ``If-Range`` (a strong ETag, else
    Last-Modified; without either it resumes only when the total length matches). A 200
    answer restarts from byte 0. A part without its record is never trusted. The
    finished part is checked (sha256 over the complete file, ``expected_sha256``),
    fsynced and renamed onto ``dest``, so ``dest`` either does not exist or is complete.
    Parts are kept after transient failures (to resume later) and deleted after final
    ones. Local I/O errors (disk full, permissions) propagate as ``OSError``.
"""

from __future__ import annotations

import contextlib
import email.utils
import fnmatch
import functools
import hashlib
import http.client
import ipaddress
import json
import os
import random
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urljoin, urlsplit, urlunsplit

import requests
from requests.adapters import HTTPAdapter
from urllib3.exceptions import HTTPError as Urllib3Error
from urllib3.exceptions import ReadTimeoutError

__all__ = [
    "REASONS",
    "RETRYABLE",
    "FetchError",
    "FetchPolicy",
    "FetchResult",
    "Fetcher",
    "check_url",
    "sniff_not_audio",
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

CHUNK_BYTES = 64 * 1024
SNIFF_BYTES = 512
_T = TypeVar("_T")
_IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


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


# --------------------------------------------------------------------------------------
# process-wide per-host limits


class _HostGate:
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


_GATES: dict[str, _HostGate] = {}
_GATES_LOCK = threading.Lock()


def _gate(host: str) -> _HostGate:
    with _GATES_LOCK:
        g = _GATES.get(host)
        if g is None:
            g = _GATES[host] = _HostGate()
        return g


class _DestLock:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.users = 0


_DEST_LOCKS: dict[str, _DestLock] = {}
_DEST_LOCKS_LOCK = threading.Lock()


@contextlib.contextmanager
def _dest_lock(dest: Path) -> Iterator[None]:
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


def _session() -> requests.Session:
    """This thread's session (connection pools are per thread; requests does no retries)."""
    s: requests.Session | None = getattr(_TLS, "session", None)
    if s is None:
        s = requests.Session()
        adapter = HTTPAdapter(pool_connections=32, pool_maxsize=4, max_retries=0)
        s.mount("http://", adapter)
        s.mount("https://", adapter)
        _TLS.session = s
    return s


def _sleep(seconds: float) -> None:
    """Backoff sleep (a seam for tests)."""
    if seconds > 0:
        time.sleep(seconds)


# --------------------------------------------------------------------------------------
# URL and address checks


def _bad_url(url: str, detail: str) -> FetchError:
    return FetchError("bad_url", detail, url=url)


def _split_url(url: str) -> tuple[str, int]:
    """(host, port) of an http(s) URL, or ``bad_url``."""
    if not isinstance(url, str) or not url:
        raise _bad_url(str(url), "empty URL")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in url):
        raise _bad_url(url, "control character in URL")
    try:
        parts = urlsplit(url)
        port = parts.port
        host = parts.hostname
    except ValueError as e:
        raise _bad_url(url, f"malformed URL: {e}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise _bad_url(url, f"unsupported scheme {scheme or '(none)'!r}; http and https only")
    if not host:
        raise _bad_url(url, "URL has no host")
    if port == 0:
        raise _bad_url(url, "port 0")
    return host.rstrip(".").lower() or host, port or (443 if scheme == "https" else 80)


def _matches(host: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(host, p.strip().lower()) for p in patterns)


def _check_lists(url: str, host: str, policy: FetchPolicy) -> None:
    if policy.deny_hosts and _matches(host, policy.deny_hosts):
        raise FetchError("blocked_host", f"host {host} is on the deny list", url=url)
    if policy.allow_hosts and not _matches(host, policy.allow_hosts):
        raise FetchError("blocked_host", f"host {host} is not on the allow list", url=url)


def _private_kind(ip: _IPAddress) -> str | None:
    """Why ``ip`` is not a public unicast address, or None."""
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if embedded is not None:
            return _private_kind(embedded)
    for kind in ("loopback", "unspecified", "link_local", "multicast", "private", "reserved"):
        if getattr(ip, f"is_{kind}"):
            return kind.replace("_", "-")
    if not ip.is_global:
        return "not globally routable"
    return None


@functools.lru_cache(maxsize=64)
def _exemptions(entries: tuple[str, ...]) -> tuple[tuple[_IPNetwork, ...], tuple[str, ...]]:
    nets: list[_IPNetwork] = []
    names: list[str] = []
    for e in entries:
        e = e.strip().lower()
        try:
            nets.append(ipaddress.ip_network(e.strip("[]"), strict=False))
        except ValueError:
            names.append(e.rstrip("."))
    return tuple(nets), tuple(names)


def _exempt(host: str, ip: _IPAddress, policy: FetchPolicy) -> bool:
    nets, names = _exemptions(policy.allow_private)
    if any(fnmatch.fnmatchcase(host, n) for n in names):
        return True
    cands: list[_IPAddress] = [ip]
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        cands.append(ip.ipv4_mapped)
    return any(c.version == n.version and c in n for c in cands for n in nets)


def _parse_ip(addr: str) -> _IPAddress | None:
    try:
        return ipaddress.ip_address(addr.split("%", 1)[0])
    except ValueError:
        return None


def _check_address(url: str, host: str, port: int, policy: FetchPolicy) -> None:
    """Resolve ``host``; refuse it if any address is non-public and not exempt."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except UnicodeError as e:
        raise _bad_url(url, f"bad host name {host!r}: {e}") from None
    except socket.gaierror as e:
        # a temporary resolver failure is worth a retry; "no such name" is not
        temporary = e.errno in (socket.EAI_AGAIN,)
        raise FetchError("connection_error", f"cannot resolve {host}: {e.strerror or e}",
                         url=url, retry=temporary) from None
    except OSError as e:
        raise FetchError("connection_error", f"cannot resolve {host}: {e}", url=url) from None
    for info in infos:
        ip = _parse_ip(str(info[4][0]))
        if ip is None:
            continue
        kind = _private_kind(ip)
        if kind and not _exempt(host, ip, policy):
            raise FetchError("private_address",
                             f"{host} resolves to {ip} ({kind}); not in allow_private", url=url)


def check_url(url: str, policy: FetchPolicy, *, resolve: bool = True) -> str:
    """Refuse what ``policy`` would refuse before sending anything; returns the host.

    Raises ``FetchError`` with ``bad_url``, ``blocked_host`` or (when ``resolve``)
    ``private_address`` / ``connection_error`` (the name does not resolve).
    """
    host, port = _split_url(url)
    _check_lists(url, host, policy)
    if resolve:
        _check_address(url, host, port, policy)
    return host


def _norm_url(url: str) -> str:
    """A URL's identity for loop detection (no fragment, default port, lower-case host)."""
    try:
        p = urlsplit(url)
        host = (p.hostname or "").lower()
        port = p.port
    except ValueError:
        return url
    scheme = p.scheme.lower()
    netloc = f"[{host}]" if ":" in host else host
    if port and port != {"http": 80, "https": 443}.get(scheme):
        netloc += f":{port}"
    return urlunsplit((scheme, netloc, p.path or "/", p.query, ""))


def _proxied(url: str) -> bool:
    try:
        proxies = requests.utils.get_environ_proxies(url, no_proxy=None)
        return bool(requests.utils.select_proxy(url, proxies))
    except Exception:
        return True  # unknown: do not second-guess the connection


def _host_exempt(host: str, policy: FetchPolicy) -> bool:
    """``allow_private`` names ``host`` (a name pattern, or an address it covers)."""
    _, names = _exemptions(policy.allow_private)
    if any(fnmatch.fnmatchcase(host, n) for n in names):
        return True
    ip = _parse_ip(host.strip("[]"))
    return ip is not None and _exempt(host, ip, policy)


def _response_sockets(resp: requests.Response) -> Iterator[Any]:
    """The sockets a response may be read from (urllib3 2.x first, then the
    http.client reader underneath), without raising."""
    raw = resp.raw
    for path in (("connection", "sock"), ("_connection", "sock"),
                 ("_fp", "fp", "raw", "_sock")):
        obj: Any = raw
        for attr in path:
            obj = getattr(obj, attr, None)
            if obj is None:
                break
        if obj is not None:
            yield obj
            inner = getattr(obj, "socket", None)  # urllib3's SSLTransport (TLS in TLS)
            if inner is not None:
                yield inner


def _peer_ip(resp: requests.Response) -> _IPAddress | None:
    """The address the response's connection is connected to (plain or TLS: an
    ``ssl.SSLSocket`` answers ``getpeername`` too), or None when it cannot be read."""
    for sock in _response_sockets(resp):
        try:
            ip = _parse_ip(str(sock.getpeername()[0]))
        except Exception:  # noqa: BLE001 - closed, not a socket: try the next one
            continue
        if ip is not None:
            return ip
    return None


# --------------------------------------------------------------------------------------
# HTTP helpers


def _retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """``Retry-After`` as seconds from now (delta-seconds or an HTTP date), or None."""
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


def _int_header(resp: requests.Response, name: str) -> int | None:
    v = resp.headers.get(name)
    if v is None:
        return None
    try:
        n = int(v.strip())
    except ValueError:
        return None
    return n if n >= 0 else None


_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$", re.IGNORECASE)
_UNSATISFIED = re.compile(r"bytes\s+\*/(\d+)\s*$", re.IGNORECASE)


def _content_range(value: str | None) -> tuple[int, int, int | None] | None:
    m = _CONTENT_RANGE.match((value or "").strip())
    if not m:
        return None
    start, end = int(m[1]), int(m[2])
    total = None if m[3] == "*" else int(m[3])
    if end < start or (total is not None and end >= total):
        return None
    return start, end, total


def _encoded(resp: requests.Response) -> bool:
    enc = resp.headers.get("Content-Encoding", "").strip().lower()
    return enc not in ("", "identity")


def _short(e: BaseException, n: int = 200) -> str:
    from speechmill.pipeline.redact import redact_text

    s = redact_text(str(e)) or type(e).__name__  # redacted whole, then cut
    return s if len(s) <= n else s[: n - 3] + "..."


def _status_error(resp: requests.Response, url: str) -> FetchError | None:
    st = resp.status_code
    if 200 <= st < 300:
        return None
    if st in (404, 410):
        return FetchError("not_found", f"HTTP {st}", status=st, url=url)
    retry_after = _retry_after_seconds(resp.headers.get("Retry-After"))
    if st == 408:  # the server timed the request out: the service's failure, retried
        return FetchError("timeout", "HTTP 408 Request Timeout", status=st, url=url,
                          retry_after=retry_after)
    if st == 429:
        return FetchError("rate_limited", "HTTP 429 Too Many Requests", status=st, url=url,
                          retry_after=retry_after)
    if st >= 500:
        return FetchError("http_server_error", f"HTTP {st} {resp.reason or ''}".strip(),
                          status=st, url=url, retry_after=retry_after if st == 503 else None)
    if 300 <= st < 400:
        return FetchError("http_client_error", f"HTTP {st} without a usable Location",
                          status=st, url=url)
    return FetchError("http_client_error", f"HTTP {st} {resp.reason or ''}".strip(),
                      status=st, url=url)


def sniff_not_audio(head: bytes) -> str | None:
    """Why the first bytes of a body look like a document rather than media, or None."""
    if not head:
        return "empty body"
    for bom, codec in ((b"\xff\xfe", "utf-16-le"), (b"\xfe\xff", "utf-16-be")):
        if head.startswith(bom):
            body = head[2:]
            try:
                text = body[: len(body) // 2 * 2].decode(codec)
            except UnicodeDecodeError:
                break
            if text and sum(c.isascii() for c in text) >= 0.9 * len(text):
                return "UTF-16 text"
            break
    h = head[3:] if head.startswith(b"\xef\xbb\xbf") else head
    s = h.lstrip(b" \t\r\n\f\v")
    if not s:
        return "blank body"
    if s[:1] == b"<" and (s[1:2].isalpha() or s[1:2] in (b"!", b"?", b"/")):
        return "HTML/XML markup"
    text: str | None = None
    for cut in range(4):  # the head may end inside a multi-byte character
        try:
            text = h[: len(h) - cut].decode("utf-8")
            break
        except UnicodeDecodeError:
            continue
    if text is not None:
        if all(c.isprintable() or c in "\t\n\r\f\v" for c in text):
            return "JSON" if s[:1] in (b"{", b"[") else "plain text"
        return None
    # 8-bit text in some legacy charset: no C0 control bytes besides whitespace
    if not any(b < 0x20 and b not in (9, 10, 12, 13) or b == 0x7F for b in h):
        return "plain text"
    return None


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _discard(*paths: Path) -> None:
    for p in paths:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def _write_meta(path: Path, meta: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(meta, sort_keys=True))
    os.replace(tmp, path)


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def sha256_file(path: Path) -> tuple[str, int]:
    h = hashlib.sha256()
    n = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            n += len(chunk)
    return h.hexdigest(), n


def _if_range(meta: dict[str, Any]) -> str | None:
    etag = meta.get("etag")
    if isinstance(etag, str) and etag and not etag.startswith("W/"):
        return etag
    lm = meta.get("last_modified")
    return lm if isinstance(lm, str) and lm else None


def _resume_state(url: str, part: Path, meta_path: Path) -> tuple[int, dict[str, Any]]:
    """(bytes already in ``part``, its record) when the part can be continued; else (0, {})
    after removing whatever is there."""
    try:
        size = part.stat().st_size
    except FileNotFoundError:
        size = -1
    meta: Any = None
    with contextlib.suppress(OSError, ValueError):
        meta = json.loads(meta_path.read_text())
    ok = (size > 0 and isinstance(meta, dict) and meta.get("url") == url
          and not meta.get("content_encoding"))
    if ok:
        total = meta.get("total")
        if isinstance(total, int) and size > total:
            ok = False
        elif _if_range(meta) is None and not isinstance(total, int):
            ok = False  # no validator and no length: nothing to check the old bytes against
    if not ok:
        if size >= 0 or meta is not None:
            _discard(part, meta_path)
        return 0, {}
    return size, meta


@dataclass
class _Trace:
    host: str  # host of the latest hop (for stats and Retry-After)


@dataclass
class _Got:
    status: int
    final_url: str
    redirects: list[str]
    etag: str | None
    last_modified: str | None
    content_type: str | None
    resumed: bool


# --------------------------------------------------------------------------------------


class Fetcher:
    """Fetches files and small documents under one ``FetchPolicy``; thread-safe."""

    def __init__(self, policy: FetchPolicy) -> None:
        self.policy = policy
        self._stats: dict[str, dict[str, float]] = {}
        self._stats_lock = threading.Lock()

    # -- public ---------------------------------------------------------------------------
    def fetch(self, url: str, dest: Path, *,
              expected_sha256: str | None = None) -> FetchResult:
        """Download url to dest atomically. Partial data lives in
        dest.with_name(dest.name + '.part') (+ a small '.part.json' with
        etag/last-modified/url) and is continued with HTTP Range (If-Range) by a later
        call, even in another process after a crash. Raises FetchError."""
        dest = Path(dest)
        host = self._precheck(url)
        expected = expected_sha256.strip().lower() if expected_sha256 else None
        part = dest.with_name(dest.name + ".part")
        meta_path = dest.with_name(dest.name + ".part.json")
        trace = _Trace(host)

        def once(attempt: int) -> FetchResult:
            got = self._download(url, part, meta_path, trace)
            if self.policy.sniff and got.resumed:
                with open(part, "rb") as f:
                    why = sniff_not_audio(f.read(SNIFF_BYTES))
                if why:
                    raise FetchError("not_audio", why, status=got.status, url=url)
            sha, size = sha256_file(part)
            if expected and sha != expected:
                _discard(part, meta_path)
                # bytes stitched from an earlier attempt may be the culprit: one clean retry
                raise FetchError("checksum_mismatch", f"sha256 {sha} != expected {expected}",
                                 status=got.status, url=url, retry=got.resumed)
            os.replace(part, dest)
            _discard(meta_path)
            _fsync_dir(dest.parent)
            self._bump(trace.host, files=1)
            return FetchResult(
                url=url, final_url=got.final_url, status=got.status, path=dest, size=size,
                sha256=sha, etag=got.etag, last_modified=got.last_modified,
                content_type=got.content_type, attempts=attempt, resumed=got.resumed,
                fetched_at=_now_iso(), redirects=got.redirects,
            )

        with _dest_lock(dest):
            dest.parent.mkdir(parents=True, exist_ok=True)
            try:
                return self._with_retries(url, trace, once)
            except FetchError as e:
                if e.reason not in RETRYABLE:  # a later call could not use the part
                    _discard(part, meta_path)
                raise

    def get_bytes(self, url: str, max_bytes: int = 20 * 2**20) -> tuple[bytes, str]:
        """Small documents (RSS feeds): same policy/retries/guards, returns
        (body, final_url); no sniffing."""
        trace = _Trace(self._precheck(url))

        def once(attempt: int) -> tuple[bytes, str]:
            headers = self._headers(identity=False)
            with self._open(url, headers, trace) as (resp, final_url, _):
                err = _status_error(resp, url)
                if err:
                    raise err
                decode = _encoded(resp)
                declared = None if decode else _int_header(resp, "Content-Length")
                if declared is not None and declared > max_bytes:
                    raise FetchError("too_large", f"Content-Length {declared} > {max_bytes}",
                                     status=resp.status_code, url=url)
                buf = bytearray()
                for chunk in self._chunks(resp, decode, 0, url):
                    buf += chunk
                    self._bump(trace.host, bytes=len(chunk))
                    if len(buf) > max_bytes:
                        raise FetchError("too_large", f"body exceeds {max_bytes} bytes",
                                         status=resp.status_code, url=url)
                if declared is not None and len(buf) < declared:
                    raise FetchError("truncated", f"got {len(buf)} of {declared} bytes",
                                     status=resp.status_code, url=url)
                resp.raw.release_conn()
            self._bump(trace.host, files=1)
            return bytes(buf), final_url

        return self._with_retries(url, trace, once)

    def host_stats(self) -> dict[str, dict[str, float]]:
        """Per host (of each hop): files, bytes, failures, requests, seconds (busy)."""
        with self._stats_lock:
            return {h: dict(s) for h, s in self._stats.items()}

    # -- internals ------------------------------------------------------------------------
    def _bump(self, host: str, **inc: float) -> None:
        with self._stats_lock:
            s = self._stats.get(host)
            if s is None:
                s = self._stats[host] = {"files": 0.0, "bytes": 0.0, "failures": 0.0,
                                         "requests": 0.0, "seconds": 0.0}
            for k, v in inc.items():
                s[k] += v

    def _precheck(self, url: str) -> str:
        """Scheme and host lists, before any attempt (``attempts`` stays 0)."""
        try:
            return check_url(url, self.policy, resolve=False)
        except FetchError as e:
            with contextlib.suppress(ValueError):
                self._bump((urlsplit(url).hostname or "").lower(), failures=1)
            e.url = url
            raise

    def _headers(self, *, identity: bool) -> dict[str, str]:
        return {"User-Agent": self.policy.user_agent, "Accept": "*/*",
                # files: byte offsets must mean the stored bytes, so no transfer coding
                "Accept-Encoding": "identity" if identity else "gzip, deflate"}

    def _with_retries(self, url: str, trace: _Trace, once: Callable[[int], _T]) -> _T:
        p = self.policy
        attempt = 0
        while True:
            attempt += 1
            try:
                return once(attempt)
            except FetchError as e:
                e.attempts, e.url = attempt, url
                if not e.retryable or attempt > p.max_retries:
                    self._bump(trace.host, failures=1)
                    raise
                if e.retry_after is not None:
                    delay = min(e.retry_after, p.max_retry_after_s)
                    _gate(trace.host).defer(time.monotonic() + delay)
                else:
                    cap = min(p.backoff_max_s, p.backoff_base_s * 2 ** (attempt - 1))
                    delay = random.uniform(0, cap)
                _sleep(delay)

    def _send(self, url: str, headers: dict[str, str], host: str) -> requests.Response:
        """GET ``url``, headers only. The peer check runs as requests' response hook:
        after the headers and before anything reads the body. A redirect's body is never
        read: its connection is closed instead (requests would read it whole)."""
        p = self.policy

        def peer_hook(resp: requests.Response, **_: Any) -> None:
            try:
                self._check_peer(resp, host, url)
            except FetchError:
                resp.close()  # the connection goes away with its unread body
                raise
            if resp.is_redirect:
                # requests reads a redirect's whole body after the hooks (to reuse the
                # connection), however large; drop the connection instead, body unread
                resp.close()
                resp._content = b""
                resp._content_consumed = True

        try:
            return _session().get(url, headers=headers, stream=True, allow_redirects=False,
                                  timeout=(p.connect_timeout_s, p.read_timeout_s),
                                  hooks={"response": [peer_hook]})
        except requests.exceptions.ConnectTimeout as e:
            raise FetchError("timeout", f"connect timeout: {_short(e)}", url=url) from None
        except requests.exceptions.ReadTimeout as e:
            raise FetchError("timeout", f"no response within {p.read_timeout_s:g}s: "
                             f"{_short(e)}", url=url) from None
        except (requests.exceptions.InvalidURL, requests.exceptions.MissingSchema,
                requests.exceptions.InvalidSchema, requests.exceptions.InvalidHeader) as e:
            raise _bad_url(url, _short(e)) from None
        except requests.exceptions.RequestException as e:
            raise FetchError("connection_error", _short(e), url=url) from None
        except (Urllib3Error, http.client.HTTPException, OSError, ValueError) as e:
            raise FetchError("connection_error", _short(e), url=url) from None

    def _check_peer(self, resp: requests.Response, host: str, url: str) -> None:
        """Second SSRF layer (DNS rebinding): the connected address must be public or
        exempt. Fails closed: an unreadable peer address is ``unverified_peer`` unless
        ``allow_private`` names the host."""
        ip = _peer_ip(resp)
        kind = _private_kind(ip) if ip is not None else None
        if ip is not None and kind is None:
            return
        if _proxied(url):
            return  # the peer is the proxy, not the host
        if ip is None:
            if _host_exempt(host, self.policy):
                return
            raise FetchError("unverified_peer", f"cannot read the address {host} is "
                             "connected to; response dropped unread (list the host in "
                             "allow_private to skip this check)", status=resp.status_code,
                             url=url)
        if not _exempt(host, ip, self.policy):
            raise FetchError("private_address", f"{host} connected to {ip} ({kind}); "
                             "not in allow_private", status=resp.status_code, url=url)

    @contextlib.contextmanager
    def _open(self, url: str, headers: dict[str, str],
              trace: _Trace) -> Iterator[tuple[requests.Response, str, list[str]]]:
        """The final response of ``url`` after redirects, each hop checked and gated.
        The host's concurrency slot is held until the caller is done with the body."""
        p = self.policy
        current = url
        redirects: list[str] = []
        seen = {_norm_url(url)}
        while True:
            host = check_url(current, p)
            trace.host = host
            gate = _gate(host)
            gate.acquire(p.per_host_concurrency, p.per_host_rps)
            t0 = time.monotonic()
            try:
                resp = self._send(current, headers, host)  # peer checked, body unread
                try:
                    target = _session().get_redirect_target(resp)
                    if target is None:
                        yield resp, current, redirects
                        return
                    status = resp.status_code
                finally:
                    resp.close()
            finally:
                gate.release()
                self._bump(host, requests=1, seconds=time.monotonic() - t0)
            nxt = urljoin(current, target)
            if _norm_url(nxt) in seen:
                raise FetchError("redirect_loop", f"{current} redirects back to {nxt}",
                                 status=status, url=url)
            if len(redirects) >= p.max_redirects:
                raise FetchError("too_many_redirects", f"more than {p.max_redirects} "
                                 f"redirects (next: {nxt})", status=status, url=url)
            seen.add(_norm_url(nxt))
            redirects.append(nxt)
            current = nxt

    def _chunks(self, resp: requests.Response, decode: bool, done: int,
                url: str) -> Iterator[bytes]:
        """The body in chunks as they arrive; a stall is ``timeout``, a broken body
        ``truncated``. ``read1`` hands over whatever arrived, so the bytes received before
        a stall reach the part file; ``stream`` (old urllib3) would buffer up to a chunk."""
        raw = resp.raw
        if hasattr(raw, "read1"):
            def pieces() -> Iterator[bytes]:
                while data := raw.read1(CHUNK_BYTES, decode_content=decode):
                    yield data
            it = pieces()
        else:  # pragma: no cover - urllib3 < 2.3
            it = raw.stream(16 * 1024, decode_content=decode)
        n = done
        min_bps, window = self.policy.min_speed_bps, self.policy.slow_window_s
        w_start, w_bytes = time.monotonic(), n
        while True:
            now = time.monotonic()
            if min_bps > 0 and now - w_start >= window:  # a drip-feeding server
                if (n - w_bytes) / (now - w_start) < min_bps:
                    raise FetchError(
                        "timeout", f"slower than {min_bps:g} B/s for {window:g}s after {n} "
                        "bytes", status=resp.status_code, url=url)
                w_start, w_bytes = now, n
            try:
                chunk = next(it)
            except StopIteration:
                return
            except ReadTimeoutError:
                raise FetchError("timeout", f"no data for {self.policy.read_timeout_s:g}s "
                                 f"after {n} bytes", status=resp.status_code,
                                 url=url) from None
            except (Urllib3Error, http.client.HTTPException, OSError) as e:
                raise FetchError("truncated", f"body broke off after {n} bytes: {_short(e)}",
                                 status=resp.status_code, url=url) from None
            if chunk:
                n += len(chunk)
                yield chunk

    def _download(self, url: str, part: Path, meta_path: Path, trace: _Trace) -> _Got:
        """One attempt: bring ``part`` to the complete body (or raise)."""
        p = self.policy
        offset, meta = _resume_state(url, part, meta_path)
        headers = self._headers(identity=True)
        validator = _if_range(meta) if offset else None
        if offset:
            headers["Range"] = f"bytes={offset}-"
            if validator:
                headers["If-Range"] = validator
        with self._open(url, headers, trace) as (resp, final_url, redirects):
            st = resp.status_code
            if st == 416 and offset:
                m = _UNSATISFIED.match(resp.headers.get("Content-Range", "").strip())
                total = int(m[1]) if m else None
                if total == offset and meta.get("total") in (None, total):
                    # an earlier attempt had every byte; it just was not committed
                    return _Got(206, final_url, redirects, meta.get("etag"),
                                meta.get("last_modified"), meta.get("content_type"), True)
                _discard(part, meta_path)
                raise FetchError("truncated", f"server cannot resume at byte {offset} "
                                 "(416); starting over", status=st, url=url)
            err = _status_error(resp, url)
            if err:
                raise err
            encoded = _encoded(resp)
            etag = resp.headers.get("ETag")
            last_modified = resp.headers.get("Last-Modified")
            content_type = resp.headers.get("Content-Type")
            if st == 206:
                cr = _content_range(resp.headers.get("Content-Range"))
                if cr is None or cr[0] != offset or encoded:
                    _discard(part, meta_path)
                    raise FetchError("truncated", "unusable partial response (Content-Range "
                                     f"{resp.headers.get('Content-Range')!r} for offset "
                                     f"{offset})", status=st, url=url)
                total = cr[2]
                if offset and meta.get("total") is not None and total != meta.get("total"):
                    _discard(part, meta_path)
                    raise FetchError("truncated", f"resource length changed ({meta['total']}"
                                     f" -> {total}); starting over", status=st, url=url)
                resumed = offset > 0
                etag = etag or meta.get("etag")
                last_modified = last_modified or meta.get("last_modified")
                content_type = content_type or meta.get("content_type")
            else:  # 200 (or another 2xx): the whole body from byte 0
                offset, resumed = 0, False
                total = None if encoded else _int_header(resp, "Content-Length")
            if p.max_bytes is not None and total is not None and total > p.max_bytes:
                raise FetchError("too_large", f"length {total} > max_bytes {p.max_bytes}",
                                 status=st, url=url)
            if not offset:
                _write_meta(meta_path, {
                    "url": url, "final_url": final_url, "etag": etag,
                    "last_modified": last_modified, "total": total,
                    "content_type": content_type,
                    "content_encoding": resp.headers.get("Content-Encoding") if encoded
                    else None,
                    "started_at": _now_iso(),
                })
            received = self._stream_to_part(resp, part, offset, encoded, url, trace.host)
            size = offset + received
            if total is not None and size < total:
                raise FetchError("truncated", f"got {size} of {total} bytes", status=st,
                                 url=url)
            resp.raw.release_conn()
        return _Got(st, final_url, redirects, etag, last_modified, content_type, resumed)

    def _stream_to_part(self, resp: requests.Response, part: Path, offset: int,
                        decode: bool, url: str, host: str) -> int:
        p = self.policy
        received = 0
        head = bytearray()
        sniffed = offset > 0 or not p.sniff
        with open(part, "r+b" if offset else "wb") as f:
            if offset:
                f.seek(offset)
                f.truncate()
            try:
                for chunk in self._chunks(resp, decode, offset, url):
                    received += len(chunk)
                    if p.max_bytes is not None and offset + received > p.max_bytes:
                        raise FetchError("too_large", f"body exceeds max_bytes {p.max_bytes}",
                                         status=resp.status_code, url=url)
                    if not sniffed:
                        head += chunk[: SNIFF_BYTES - len(head)]
                        if len(head) >= SNIFF_BYTES:
                            sniffed = True
                            self._sniff(bytes(head), resp, url)
                    f.write(chunk)
                    self._bump(host, bytes=len(chunk))
                if not sniffed:
                    self._sniff(bytes(head), resp, url)
            finally:
                f.flush()
                os.fsync(f.fileno())
        return received

    @staticmethod
    def _sniff(head: bytes, resp: requests.Response, url: str) -> None:
        why = sniff_not_audio(head)
        if why:
            ctype = resp.headers.get("Content-Type") or "no Content-Type"
            raise FetchError("not_audio", f"body is {why} ({ctype})", status=resp.status_code,
                             url=url)
