"""A threaded HTTP/1.1 test server on 127.0.0.1 that injects faults and counts requests.

Routes are a plain dict ``path -> handler``; a handler gets a ``Req`` and answers through
it. Route factories below cover the usual faults (status codes, fail-first-N, Retry-After,
stalls, short bodies, redirects, chunked bodies, slow responses, HTML posing as audio),
and ``FaultServer.serve`` answers Range / If-Range requests like a real file server::

    with FaultServer(default_routes(audio)) as srv:
        srv.routes["/odd"] = lambda req: req.send(418, b"teapot")
        fetch(srv.url("/odd"))
        assert srv.hits("/odd") == 1

Every request is logged (path, 1-based hit number for that path, headers, monotonic start
time) before its handler runs, so tests can assert retry counts, Range headers and start
rates; ``Req.track()`` counts requests in flight per path (``max_in_flight``). Handler
threads are daemons and every sleep is cut short by ``stop()``, so a stalled response
never holds up test teardown. GET and POST go through the same routes (a POST's body is
``Req.body``).

Key-leak faults: :func:`leaky_body` is a long error text (> 2000 characters) with a
secret in the middle and straddling the usual truncation points (300, 500, 1000, 1700
characters), and :func:`echo_auth_route` answers with it, built from the request's own
``Authorization`` header, as a careless server that echoes what it was sent.
"""

from __future__ import annotations

import contextlib
import http.server
import re
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

Handler = Callable[["Req"], None]

ETAG = '"v1"'
LAST_MODIFIED = "Mon, 01 Jan 2024 00:00:00 GMT"


@dataclass
class Hit:
    path: str
    n: int                   # 1-based count of requests to this path, this one included
    method: str
    headers: dict[str, str]
    t: float                 # time.monotonic() when the request arrived


class Req:
    """One request as a handler sees it, with helpers to answer (or misbehave)."""

    def __init__(self, h: _Handler, server: FaultServer, hit: Hit, query: str,
                 body: bytes = b"") -> None:
        self.h = h
        self.body = body
        self.server = server
        self.hit = hit
        self.path = hit.path
        self.query = query
        self.n = hit.n
        self.headers = hit.headers

    def header(self, name: str) -> str | None:
        return self.h.headers.get(name)

    def send_head(self, status: int, headers: dict[str, Any] | None = None) -> None:
        self.h.send_response(status)
        for k, v in (headers or {}).items():
            self.h.send_header(k, str(v))
        self.h.end_headers()

    def write(self, data: bytes) -> bool:
        """Write body bytes; False when the client has gone."""
        try:
            self.h.wfile.write(data)
            self.h.wfile.flush()
            return True
        except OSError:
            self.h.close_connection = True
            return False

    def send(self, status: int, body: bytes = b"", headers: dict[str, Any] | None = None,
             content_type: str | None = "application/octet-stream") -> None:
        hdrs: dict[str, Any] = {"Content-Length": len(body)}
        if content_type:
            hdrs["Content-Type"] = content_type
        hdrs.update(headers or {})
        self.send_head(status, hdrs)
        self.write(body)

    def close(self) -> None:
        """Close the connection after this response."""
        self.h.close_connection = True

    def sleep(self, seconds: float) -> bool:
        """Sleep, but wake at once when the server stops; False if it is stopping."""
        return not self.server.stopping.wait(seconds)

    @contextlib.contextmanager
    def track(self) -> Iterator[None]:
        """Count this request as in flight for ``max_in_flight``."""
        self.server._enter(self.path)
        try:
            yield
        finally:
            self.server._leave(self.path)

    def serve(self, data: bytes, content_type: str = "audio/wav", etag: str | None = ETAG,
              last_modified: str | None = LAST_MODIFIED, ranges: bool = True) -> None:
        """Answer like a static file server: 200, or 206/416 for Range (If-Range honoured)."""
        total = len(data)
        hdrs: dict[str, Any] = {}
        if etag:
            hdrs["ETag"] = etag
        if last_modified:
            hdrs["Last-Modified"] = last_modified
        if ranges:
            hdrs["Accept-Ranges"] = "bytes"
        rng = self.header("Range")
        if_range = self.header("If-Range")
        if ranges and rng and (if_range is None or if_range in (etag, last_modified)):
            m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng.strip())
            if m:
                start = int(m[1])
                end = min(int(m[2]) if m[2] else total - 1, total - 1)
                if start >= total or end < start:
                    self.send(416, b"", {**hdrs, "Content-Range": f"bytes */{total}"},
                              content_type=None)
                    return
                self.send(206, data[start:end + 1],
                          {**hdrs, "Content-Range": f"bytes {start}-{end}/{total}"},
                          content_type=content_type)
                return
        self.send(200, data, hdrs, content_type=content_type)


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 5  # idle keep-alive connections go away
    server: _Server

    def do_GET(self) -> None:
        self.server.fault._dispatch(self)

    def do_POST(self) -> None:
        n = int(self.headers.get("Content-Length") or 0)
        self.server.fault._dispatch(self, self.rfile.read(n) if n else b"")

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def handle(self) -> None:
        with contextlib.suppress(OSError):
            super().handle()


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    fault: FaultServer

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # clients hanging up mid-response are part of the game


class FaultServer:
    """Threaded HTTP server on 127.0.0.1, port 0; ``routes`` maps a path to a handler."""

    def __init__(self, routes: dict[str, Handler] | None = None,
                 host: str = "127.0.0.1") -> None:
        self.routes: dict[str, Handler] = dict(routes or {})
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self._log: list[Hit] = []
        self._counts: dict[str, int] = {}
        self._in_flight: dict[str, int] = {}
        self._max_in_flight: dict[str, int] = {}
        self._srv = _Server((host, 0), _Handler)
        self._srv.fault = self
        self._thread: threading.Thread | None = None

    # -- lifecycle --------------------------------------------------------------------------
    def start(self) -> FaultServer:
        self._thread = threading.Thread(target=self._srv.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        self._srv.shutdown()
        self._srv.server_close()

    def __enter__(self) -> FaultServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- addresses ------------------------------------------------------------------------
    @property
    def host(self) -> str:
        return str(self._srv.server_address[0])

    @property
    def port(self) -> int:
        return int(self._srv.server_address[1])

    @property
    def base(self) -> str:
        return f"http://{self.host}:{self.port}"

    def url(self, path: str) -> str:
        return self.base + path

    # -- what happened --------------------------------------------------------------------
    def hits(self, path: str) -> int:
        with self._lock:
            return self._counts.get(path, 0)

    def log(self, path: str | None = None) -> list[Hit]:
        with self._lock:
            return [h for h in self._log if path is None or h.path == path]

    def range_headers(self, path: str) -> list[str | None]:
        return [h.headers.get("Range") for h in self.log(path)]

    def max_in_flight(self, path: str) -> int:
        with self._lock:
            return self._max_in_flight.get(path, 0)

    def reset(self) -> None:
        """Forget counts and logs (route state keyed on hit numbers starts over)."""
        with self._lock:
            self._log.clear()
            self._counts.clear()
            self._in_flight.clear()
            self._max_in_flight.clear()

    # -- internals ------------------------------------------------------------------------
    def _enter(self, path: str) -> None:
        with self._lock:
            n = self._in_flight[path] = self._in_flight.get(path, 0) + 1
            self._max_in_flight[path] = max(self._max_in_flight.get(path, 0), n)

    def _leave(self, path: str) -> None:
        with self._lock:
            self._in_flight[path] -= 1

    def _dispatch(self, h: _Handler, body: bytes = b"") -> None:
        parts = urlsplit(h.path)
        path = parts.path or "/"
        with self._lock:
            n = self._counts[path] = self._counts.get(path, 0) + 1
            hit = Hit(path, n, h.command, dict(h.headers.items()), time.monotonic())
            self._log.append(hit)
        req = Req(h, self, hit, parts.query, body)
        handler = self.routes.get(path)
        try:
            if handler is None:
                req.send(404, b"no such route\n", content_type="text/plain")
            else:
                handler(req)
        except OSError:
            h.close_connection = True


class TLSFaultServer(FaultServer):
    """``FaultServer`` over HTTPS: ``ssl_context`` (a server-side context holding the
    certificate, e.g. from ``trustme``) wraps the listening socket; the TLS handshake of
    each connection runs in its handler thread, so a client that never completes one
    cannot hold up the others. ``url()`` gives ``https://`` addresses."""

    def __init__(self, routes: dict[str, Handler] | None, ssl_context: ssl.SSLContext,
                 host: str = "127.0.0.1") -> None:
        super().__init__(routes, host)
        self._srv.socket = ssl_context.wrap_socket(self._srv.socket, server_side=True,
                                                   do_handshake_on_connect=False)

    @property
    def base(self) -> str:
        return f"https://{self.host}:{self.port}"

    def url_as(self, name: str, path: str) -> str:
        """``path`` on this server addressed by host name ``name`` (which the caller
        makes resolve to this server)."""
        return f"https://{name}:{self.port}{path}"


# --------------------------------------------------------------------------------------
# route factories


def file_route(data: bytes, content_type: str = "audio/wav", etag: str | None = ETAG,
               last_modified: str | None = LAST_MODIFIED, ranges: bool = True) -> Handler:
    """A static file (Range / If-Range aware unless ``ranges=False``)."""
    return lambda req: req.serve(data, content_type, etag, last_modified, ranges)


def status_route(status: int, body: bytes = b"", headers: dict[str, Any] | None = None,
                 content_type: str = "text/plain") -> Handler:
    return lambda req: req.send(status, body, headers, content_type=content_type)


def fail_first(n: int, then: Handler, status: int = 500,
               headers: dict[str, Any] | None = None) -> Handler:
    """The first ``n`` requests get ``status``; later ones go to ``then``."""
    def h(req: Req) -> None:
        if req.n <= n:
            req.send(status, f"fault {status}\n".encode(), headers, content_type="text/plain")
        else:
            then(req)
    return h


def retry_after_route(then: Handler | None, seconds: str | float = 1, first: int = 1,
                      status: int = 429) -> Handler:
    """``status`` with ``Retry-After`` for the first ``first`` requests (all when ``then``
    is None), then ``then``."""
    fault = status_route(status, b"slow down\n", {"Retry-After": seconds})
    if then is None:
        return fault
    return fail_first(first, then, status, {"Retry-After": seconds})


def stall_route(data: bytes, after: int = 1000, stall_s: float = 2.0, once: bool = False,
                content_type: str = "audio/wav") -> Handler:
    """Headers (full Content-Length) and ``after`` bytes, then silence for ``stall_s``
    (cut short when the server stops) and a closed connection. With ``once`` only the
    first request stalls; later ones are served normally (with Range)."""
    def h(req: Req) -> None:
        if once and req.n > 1:
            req.serve(data, content_type)
            return
        req.close()
        req.send_head(200, {"Content-Length": len(data), "Content-Type": content_type,
                            "ETag": ETAG, "Accept-Ranges": "bytes"})
        if req.write(data[:after]):
            req.sleep(stall_s)
    return h


def short_body_route(data: bytes, cut: int, once: bool = False,
                     content_type: str = "audio/wav") -> Handler:
    """Declares ``len(data)`` bytes but sends ``cut`` and hangs up. Every time (ignoring
    Range), or with ``once`` only the first time (later requests: Range-aware file)."""
    def h(req: Req) -> None:
        if once and req.n > 1:
            req.serve(data, content_type)
            return
        req.close()
        hdrs: dict[str, Any] = {"Content-Length": len(data), "Content-Type": content_type}
        if once:
            hdrs.update({"ETag": ETAG, "Last-Modified": LAST_MODIFIED,
                         "Accept-Ranges": "bytes"})
        req.send_head(200, hdrs)
        req.write(data[:cut])
    return h


def redirect_route(location: str | Callable[[Req], str], status: int = 302) -> Handler:
    """Redirect to ``location`` (absolute, relative, or computed from the request)."""
    def h(req: Req) -> None:
        loc = location(req) if callable(location) else location
        req.send(status, b"", {"Location": loc}, content_type=None)
    return h


def chunked_route(data: bytes, chunk: int = 8192, content_type: str = "audio/wav") -> Handler:
    """The body with ``Transfer-Encoding: chunked`` and no Content-Length."""
    def h(req: Req) -> None:
        req.send_head(200, {"Transfer-Encoding": "chunked", "Content-Type": content_type})
        for i in range(0, len(data), chunk):
            piece = data[i:i + chunk]
            if not req.write(b"%x\r\n%s\r\n" % (len(piece), piece)):
                return
        req.write(b"0\r\n\r\n")
    return h


def slow_route(data: bytes, delay_s: float = 0.2, content_type: str = "audio/wav") -> Handler:
    """Waits ``delay_s`` while counted as in flight, then answers (so a client cannot see
    the answer before the server stopped counting it)."""
    def h(req: Req) -> None:
        with req.track():
            req.sleep(delay_s)
        req.serve(data, content_type)
    return h


HTML_PAGE = (b"<!DOCTYPE html>\n<html><head><title>Episode 12</title></head>\n"
             b"<body><p>This episode is not available in your region.</p></body></html>\n")
RSS_FEED = (b'<?xml version="1.0" encoding="UTF-8"?>\n<rss version="2.0"><channel>'
            b"<title>Test feed</title><item><title>One</title>"
            b'<enclosure url="/audio.wav" type="audio/wav" length="1"/></item>'
            b"</channel></rss>\n")


def default_routes(audio: bytes) -> dict[str, Handler]:
    """The standard fault zoo around one real audio file ``audio``."""
    good = file_route(audio)
    return {
        "/audio.wav": good,                                        # Range, ETag, 200/206/416
        "/small.bin": file_route(audio[:2048]),
        "/missing": status_route(404, b"not here\n"),
        "/gone": status_route(410, b"gone\n"),
        "/forbidden": status_route(403, b"no\n"),
        "/flaky": fail_first(2, good, 500),                        # 500, 500, then the file
        "/broken": status_route(500, b"always broken\n"),
        "/unavailable": retry_after_route(good, 1, status=503),    # 503 Retry-After: 1, then ok
        "/rate-limited": retry_after_route(good, 1),               # 429 Retry-After: 1, then ok
        "/always-429": retry_after_route(None, 1),
        "/stall": stall_route(audio, 1000, 2.0),
        "/stall-once": stall_route(audio, len(audio) // 3, 2.0, once=True),
        "/short": short_body_route(audio, len(audio) // 2),        # short every time
        "/short-once": short_body_route(audio, len(audio) // 2, once=True),
        "/r1": redirect_route(lambda req: req.server.url("/r2"), 301),
        "/r2": redirect_route("r3", 302),                          # relative Location
        "/r3": redirect_route("/audio.wav", 307),
        "/loop-a": redirect_route("/loop-b"),
        "/loop-b": redirect_route("/loop-a"),
        "/episode.mp3": file_route(HTML_PAGE, "audio/mpeg"),       # HTML posing as audio
        "/page.mp3": file_route(HTML_PAGE, "text/html"),
        "/feed.json": file_route(b'{"episodes": [1, 2, 3]}\n', "audio/mpeg"),
        "/notes.mp3": file_route(b"Sorry, this file has moved.\n", "audio/mpeg"),
        "/feed.rss": file_route(RSS_FEED, "application/rss+xml"),
        "/chunked": chunked_route(audio),                          # no Content-Length
        "/slow": slow_route(audio[:4096], 0.2),
        "/to-private": redirect_route(lambda req: f"http://127.0.0.2:{req.server.port}"
                                                  "/audio.wav"),
        "/to-metadata": redirect_route("http://169.254.169.254/latest/meta-data/"),
    }


# --------------------------------------------------------------------------------------
# key leaks

#: where clients cut error texts short (characters): a secret straddling each must not
#: leave its first part behind
TRUNCATION_POINTS = (300, 500, 1000, 1700)


def leaky_body(secret: str, size: int = 2600,
               around: tuple[int, ...] = TRUNCATION_POINTS) -> str:
    """A long error text (``size`` characters or more) holding ``secret`` in the middle
    (as an ``Authorization: Bearer`` header line) and, bare, across each of ``around``
    (half of it before the point, half after)."""
    bare = secret.split(" ", 1)[1] if secret.lower().startswith("bearer ") else secret
    filler = ("the server could not process the request because something went wrong "
              "while it was handled; ")
    text = list((filler * (size // len(filler) + 2))[:size])
    mid = size // 2
    marks = [(p - len(bare) // 2, bare) for p in around if p + len(bare) < size]
    marks.append((mid, f"Authorization: Bearer {bare}"))
    for pos, piece in sorted(marks):
        text[pos:pos + len(piece)] = piece
    return "".join(text)


def secret_pieces(secret: str, n: int = 8) -> list[str]:
    """Every ``n``-character piece of ``secret``."""
    return [secret[i:i + n] for i in range(len(secret) - n + 1)]


def find_pieces(secret: str, *texts: str | bytes, n: int = 8) -> list[str]:
    """The ``n``-character pieces of ``secret`` found in ``texts``."""
    out = []
    for piece in secret_pieces(secret, n):
        b = piece.encode()
        for t in texts:
            if (b in t) if isinstance(t, bytes) else (piece in t):
                out.append(piece)
                break
    return out


def leaked_files(root: Any, secret: str, n: int = 8) -> dict[str, list[str]]:
    """Files under ``root`` holding an ``n``-character piece of ``secret``."""
    from pathlib import Path

    out = {}
    for p in Path(root).rglob("*"):
        if p.is_file():
            got = find_pieces(secret, p.read_bytes(), n=n)
            if got:
                out[str(p)] = got
    return out


def echo_auth_route(status: int, size: int = 2600, json_error: bool = True,
                    headers: dict[str, Any] | None = None) -> Handler:
    """Answers ``status`` with :func:`leaky_body` of the request's ``Authorization``
    header (or ``X-Api-Key``), as JSON ``{"error": {"message": ...}}`` or plain text."""
    import json

    def h(req: Req) -> None:
        auth = req.header("Authorization") or req.header("X-Api-Key") or "none"
        text = leaky_body(auth, size)
        if json_error:
            body = json.dumps({"error": {"message": text, "type": "server_error"}}).encode()
            req.send(status, body, headers, content_type="application/json")
        else:
            req.send(status, text.encode(), headers, content_type="text/plain")
    return h
