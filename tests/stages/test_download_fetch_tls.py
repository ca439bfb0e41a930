"""The fetcher's second SSRF layer (the connected peer's address) over HTTPS.

A ``TLSFaultServer`` on 127.0.0.1 with a ``trustme`` certificate (trusted through
``REQUESTS_CA_BUNDLE``, as a user would) stands in for remote hosts. Host names are made
to resolve in-process: ``cdn.example`` and ``public.example`` connect to 127.0.0.1, and
the fetcher's first layer (its DNS check) is told that ``public.example`` is the public
address 93.184.215.14, which is what DNS rebinding looks like from the client.
"""

from __future__ import annotations

import hashlib
import pathlib
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_audioeval
import trustme

from speechmill.stages import download_safety as safetymod
from speechmill.stages.download_fetch import Fetcher
from speechmill.stages.download_policy import FetchError, FetchPolicy
from speechmill.stages.download_safety import check_url
from testkit.http_faults import TLSFaultServer, default_routes, redirect_route

AUDIO = (pathlib.Path(pytest_audioeval.__path__[0]) / "samples/audio/en/counting.wav").read_bytes()
SHA = hashlib.sha256(AUDIO).hexdigest()
PUBLIC = "public.example"   # the DNS check sees a public address; connections reach 127.0.0.1
CDN = "cdn.example"         # resolves to 127.0.0.1 everywhere
PUBLIC_IP = "93.184.215.14"


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def tls_server(ca: trustme.CA) -> Iterator[TLSFaultServer]:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", PUBLIC, CDN).configure_cert(ctx)
    routes = default_routes(AUDIO)
    routes["/to-public"] = redirect_route(lambda req: req.server.url_as(PUBLIC, "/audio.wav"))
    with TLSFaultServer(routes, ctx) as srv:
        yield srv


@pytest.fixture
def srv(tls_server: TLSFaultServer, ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory,
        monkeypatch: pytest.MonkeyPatch) -> TLSFaultServer:
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy",
                "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    bundle = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(bundle))
    tls_server.reset()
    return tls_server


@pytest.fixture
def names(monkeypatch: pytest.MonkeyPatch) -> None:
    """Connections to PUBLIC / CDN go to 127.0.0.1; the fetcher's own DNS check
    (download_safety's ``socket`` name) is told PUBLIC is PUBLIC_IP."""
    real = socket.getaddrinfo

    def connect_view(host: Any, port: Any, *a: Any, **kw: Any) -> Any:
        return real("127.0.0.1" if host in (PUBLIC, CDN) else host, port, *a, **kw)

    class CheckView:
        def __getattr__(self, name: str) -> Any:
            return getattr(socket, name)

        @staticmethod
        def getaddrinfo(host: Any, port: Any, *a: Any, **kw: Any) -> Any:
            if host == PUBLIC:
                return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (PUBLIC_IP, port))]
            return connect_view(host, port, *a, **kw)

    monkeypatch.setattr(socket, "getaddrinfo", connect_view)
    monkeypatch.setattr(safetymod, "socket", CheckView())


@pytest.fixture
def body_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """URLs whose response body the fetcher started to read."""
    seen: list[str] = []
    orig = Fetcher._chunks

    def spy(self: Fetcher, resp: Any, *a: Any, **kw: Any) -> Any:
        seen.append(resp.url)
        return orig(self, resp, *a, **kw)

    monkeypatch.setattr(Fetcher, "_chunks", spy)
    return seen


def pol(**kw: Any) -> FetchPolicy:
    base: dict[str, Any] = dict(connect_timeout_s=2.0, read_timeout_s=2.0, max_retries=2,
                                backoff_base_s=0.01, backoff_max_s=0.05, per_host_rps=0.0)
    base.update(kw)
    return FetchPolicy(**base)


def refused(f: Fetcher, url: str, dest: Path) -> FetchError:
    with pytest.raises(FetchError) as ei:
        f.fetch(url, dest)
    assert not dest.exists() and list(dest.parent.iterdir()) == []  # no part, no record
    return ei.value


def test_https_loopback_needs_allow_private(srv: TLSFaultServer, tmp_path: Path,
                                            body_reads: list[str]) -> None:
    url = srv.url("/audio.wav")
    res = Fetcher(pol(allow_private=("127.0.0.1",))).fetch(url, tmp_path / "ok" / "a.wav")
    assert (res.sha256, res.final_url) == (SHA, url) and url.startswith("https://")
    e = refused(Fetcher(pol()), url, tmp_path / "no" / "a.wav")
    assert (e.reason, e.attempts) == ("private_address", 1)
    assert srv.hits("/audio.wav") == 1  # the refused one never connected


def test_https_peer_check_alone(srv: TLSFaultServer, tmp_path: Path, body_reads: list[str],
                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the DNS check, the TLS connection's own peer address still refuses 127.0.0.1,
    on a plain response and on a redirect (read before requests consumes its body)."""
    monkeypatch.setattr(safetymod, "_check_address", lambda *a: None)
    for path in ("/audio.wav", "/r1"):
        e = refused(Fetcher(pol()), srv.url(path), tmp_path / "x" / "a.wav")
        assert (e.reason, e.attempts) == ("private_address", 1), path
        assert "connected to 127.0.0.1 (loopback)" in e.detail and srv.hits(path) == 1
    assert srv.hits("/r2") == 0 and body_reads == []
    res = Fetcher(pol(allow_private=("127.0.0.0/8",))).fetch(srv.url("/r1"), tmp_path / "y")
    assert res.sha256 == SHA and res.redirects[-1] == srv.url("/audio.wav")


def test_https_rebinding_after_redirect_is_caught(srv: TLSFaultServer, tmp_path: Path,
                                                  names: None, body_reads: list[str]) -> None:
    url = srv.url_as(CDN, "/to-public")
    target = srv.url_as(PUBLIC, "/audio.wav")
    assert check_url(target, FetchPolicy()) == PUBLIC  # the first layer is fooled
    e = refused(Fetcher(pol(allow_private=(CDN,))), url, tmp_path / "x" / "a.wav")
    assert (e.reason, e.attempts) == ("private_address", 1)
    assert f"{PUBLIC} connected to 127.0.0.1" in e.detail
    assert (srv.hits("/to-public"), srv.hits("/audio.wav")) == (1, 1)
    assert body_reads == []
    # the same chain is fine once the host is trusted
    res = Fetcher(pol(allow_private=(CDN, PUBLIC))).fetch(url, tmp_path / "y" / "a.wav")
    assert (res.sha256, res.final_url, res.redirects) == (SHA, target, [target])
    assert body_reads == [target]


def test_unreadable_peer_fails_closed(srv: TLSFaultServer, tmp_path: Path, names: None,
                                      body_reads: list[str],
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(safetymod, "_peer_ip", lambda resp: None)
    url = srv.url_as(PUBLIC, "/audio.wav")
    e = refused(Fetcher(pol()), url, tmp_path / "x" / "a.wav")
    assert (e.reason, e.attempts, e.retryable) == ("unverified_peer", 1, False)
    assert srv.hits("/audio.wav") == 1 and body_reads == []
    with pytest.raises(FetchError) as ei:
        Fetcher(pol()).get_bytes(srv.url_as(PUBLIC, "/feed.rss"))
    assert ei.value.reason == "unverified_peer" and body_reads == []
    # allow_private names the host (or its literal address): nothing to verify
    assert Fetcher(pol(allow_private=(PUBLIC,))).fetch(url, tmp_path / "a.wav").sha256 == SHA
    res = Fetcher(pol(allow_private=("127.0.0.1",))).fetch(srv.url("/audio.wav"),
                                                           tmp_path / "b.wav")
    assert res.sha256 == SHA and len(body_reads) == 2
