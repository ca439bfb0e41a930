"""Polite, fault-tolerant, resumable HTTP(S) file fetching for the ``download`` stage.

``Fetcher.fetch(url, dest)`` downloads one file; the ``download`` stage calls it from a
thread pool, so everything here is thread-safe. Every request carries
``FetchPolicy.user_agent`` (:mod:`speechmill.stages.download_policy`) and passes the
process-wide per-host gate (:mod:`speechmill.stages.download_hosts`: concurrency, start
spacing, ``Retry-After``); every URL and every redirect hop is checked before it is sent, and
the connected peer before any body byte is read (:mod:`speechmill.stages.download_safety`).

Bodies
    Redirects are followed by hand. A redirect's body is never read, whatever its size: the
    connection is closed once the Location is known. With ``sniff`` a body that starts like
    HTML, XML, JSON or plain text is refused (``not_audio``), and ``max_bytes`` bounds a body
    by its declared length and while streaming. File names are never derived from URLs: the
    caller picks ``dest``.

Faults and retries
    Timeouts, connection errors, short bodies, 429 and 5xx are retried ``max_retries``
    times with exponential backoff and full jitter (``uniform(0, min(backoff_max_s,
    backoff_base_s * 2**n))``) or the server's ``Retry-After``, as the project's HTTP
    policy does it (:mod:`speechmill.pipeline.http_policy`). Other 4xx, redirect
    problems, policy refusals, ``too_large``, ``not_audio`` and ``checksum_mismatch`` are
    final at once. Failures raise ``FetchError`` whose ``reason`` is one of ``REASONS``
    (``FetchError.transient`` tells a failed service from a bad URL).

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
import hashlib
import http.client
import json
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urljoin, urlsplit, urlunsplit

import requests
from urllib3.exceptions import HTTPError as Urllib3Error
from urllib3.exceptions import ReadTimeoutError

from speechmill.pipeline.http_policy import (
    Failure,
    RetryPolicy,
    call_with_retries,
    error_text,
    retry_after_seconds,
)
from speechmill.stages import download_hosts as hosts
from speechmill.stages.download_policy import RETRYABLE, FetchError, FetchPolicy, FetchResult
from speechmill.stages.download_safety import bad_url, check_peer, check_url

__all__ = ["Fetcher", "sha256_file", "sniff_not_audio"]

CHUNK_BYTES = 64 * 1024
SNIFF_BYTES = 512
_T = TypeVar("_T")


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
    """``e``'s text for a reject detail: redacted whole, then cut to ``n`` characters."""
    return error_text(str(e), limit=n, ellipsis="...") or type(e).__name__


def _status_error(resp: requests.Response, url: str) -> FetchError | None:
    st = resp.status_code
    if 200 <= st < 300:
        return None
    if st in (404, 410):
        return FetchError("not_found", f"HTTP {st}", status=st, url=url)
    retry_after = retry_after_seconds(resp.headers.get("Retry-After"))
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

        with hosts.dest_lock(dest):
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
        retry = RetryPolicy(max_attempts=p.max_retries + 1, backoff_base_s=p.backoff_base_s,
                            backoff_max_s=p.backoff_max_s,
                            max_retry_after_s=p.max_retry_after_s)

        def attempt(n: int) -> _T:
            try:
                return once(n)
            except FetchError as e:
                e.attempts, e.url = n, url
                raise

        def failure_of(e: Exception) -> Failure | None:
            if not isinstance(e, FetchError):
                return None
            return Failure(status=e.status, retry_after=e.retry_after, retryable=e.retryable)

        def before_retry(n: int, failure: Failure, delay: float) -> None:
            if failure.retry_after is not None:  # the whole host waits, not only this URL
                hosts.host_gate(trace.host).defer(time.monotonic() + delay)

        def give_up(n: int, failure: Failure, e: Exception) -> BaseException:
            self._bump(trace.host, failures=1)
            return e

        # the seam is looked up at each sleep, so tests can replace hosts.backoff_sleep
        return call_with_retries(attempt, retry, failure_of,
                                 sleep=lambda d: hosts.backoff_sleep(d),
                                 before_retry=before_retry, give_up=give_up)

    def _send(self, url: str, headers: dict[str, str], host: str) -> requests.Response:
        """GET ``url``, headers only. The peer check runs as requests' response hook:
        after the headers and before anything reads the body. A redirect's body is never
        read: its connection is closed instead (requests would read it whole)."""
        p = self.policy

        def peer_hook(resp: requests.Response, **_: Any) -> None:
            try:
                check_peer(resp, host, url, p)
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
            return hosts.thread_session().get(url, headers=headers, stream=True,
                                              allow_redirects=False,
                                              timeout=(p.connect_timeout_s, p.read_timeout_s),
                                              hooks={"response": [peer_hook]})
        except requests.exceptions.ConnectTimeout as e:
            raise FetchError("timeout", f"connect timeout: {_short(e)}", url=url) from None
        except requests.exceptions.ReadTimeout as e:
            raise FetchError("timeout", f"no response within {p.read_timeout_s:g}s: "
                             f"{_short(e)}", url=url) from None
        except (requests.exceptions.InvalidURL, requests.exceptions.MissingSchema,
                requests.exceptions.InvalidSchema, requests.exceptions.InvalidHeader) as e:
            raise bad_url(url, _short(e)) from None
        except requests.exceptions.RequestException as e:
            raise FetchError("connection_error", _short(e), url=url) from None
        except (Urllib3Error, http.client.HTTPException, OSError, ValueError) as e:
            raise FetchError("connection_error", _short(e), url=url) from None

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
            gate = hosts.host_gate(host)
            gate.acquire(p.per_host_concurrency, p.per_host_rps)
            t0 = time.monotonic()
            try:
                resp = self._send(current, headers, host)  # peer checked, body unread
                try:
                    target = hosts.thread_session().get_redirect_target(resp)
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
