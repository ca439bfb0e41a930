"""stages/download_fetch.py against a fault-injecting HTTP server on 127.0.0.1 (testkit/http_faults.py)."""

from __future__ import annotations

import gzip
import hashlib
import json
import pathlib
import pickle
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import pytest_audioeval

from speechmill.pipeline.http_policy import retry_after_seconds
from speechmill.stages import download_hosts as hostsmod
from speechmill.stages import download_safety as safetymod
from speechmill.stages.download_fetch import Fetcher, sniff_not_audio
from speechmill.stages.download_policy import REASONS, FetchError, FetchPolicy
from speechmill.stages.download_safety import check_url
from testkit.http_faults import (
    ETAG,
    HTML_PAGE,
    LAST_MODIFIED,
    RSS_FEED,
    FaultServer,
    Req,
    default_routes,
    file_route,
)

AUDIO = (pathlib.Path(pytest_audioeval.__path__[0]) / "samples/audio/en/counting.wav").read_bytes()
SHA = hashlib.sha256(AUDIO).hexdigest()


@pytest.fixture(scope="module")
def server() -> Iterator[FaultServer]:
    with FaultServer(default_routes(AUDIO)) as srv:
        yield srv


@pytest.fixture
def srv(server: FaultServer, monkeypatch: pytest.MonkeyPatch) -> FaultServer:
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy",
                "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    server.reset()
    return server


def pol(**kw: Any) -> FetchPolicy:
    """Fast test policy; the test server (127.0.0.1) is exempt from the SSRF guard."""
    base: dict[str, Any] = dict(
        allow_private=("127.0.0.1",), connect_timeout_s=2.0, read_timeout_s=0.5,
        max_retries=2, backoff_base_s=0.01, backoff_max_s=0.05, per_host_rps=0.0,
        per_host_concurrency=16,
    )
    base.update(kw)
    return FetchPolicy(**base)


def fail(fetcher: Fetcher, url: str, dest: Path, **kw: Any) -> FetchError:
    with pytest.raises(FetchError) as ei:
        fetcher.fetch(url, dest, **kw)
    e = ei.value
    assert e.reason in REASONS and e.url == url
    assert not dest.exists()
    return e


def leftovers(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


# -- the good path -------------------------------------------------------------------------


def test_fetch_good_file(srv: FaultServer, tmp_path: Path) -> None:
    f = Fetcher(pol())
    dest = tmp_path / "deep" / "dir" / "x.wav"
    res = f.fetch(srv.url("/audio.wav"), dest, expected_sha256=SHA.upper())
    assert dest.read_bytes() == AUDIO
    assert (res.size, res.sha256, res.status, res.attempts) == (len(AUDIO), SHA, 200, 1)
    assert res.path == dest and res.final_url == res.url == srv.url("/audio.wav")
    assert (res.etag, res.content_type, res.resumed, res.redirects) == \
        (ETAG, "audio/wav", False, [])
    assert res.last_modified and datetime.fromisoformat(res.fetched_at).utcoffset().seconds == 0
    assert leftovers(dest.parent) == ["x.wav"]  # no .part / .part.json / tmp files
    (hit,) = srv.log("/audio.wav")
    assert "speechmill" in hit.headers["User-Agent"]
    assert hit.headers["Accept-Encoding"] == "identity" and "Range" not in hit.headers
    stats = f.host_stats()["127.0.0.1"]
    assert stats["files"] == 1 and stats["bytes"] == len(AUDIO) and stats["failures"] == 0
    assert stats["seconds"] > 0 and stats["requests"] == 1


def test_chunked_body_without_content_length(srv: FaultServer, tmp_path: Path) -> None:
    res = Fetcher(pol()).fetch(srv.url("/chunked"), tmp_path / "c.wav")
    assert res.sha256 == SHA and res.size == len(AUDIO)


def test_same_dest_from_two_threads(srv: FaultServer, tmp_path: Path) -> None:
    f = Fetcher(pol())
    dest = tmp_path / "same.wav"
    with ThreadPoolExecutor(4) as ex:
        results = list(ex.map(lambda _: f.fetch(srv.url("/audio.wav"), dest), range(4)))
    assert all(r.sha256 == SHA for r in results) and dest.read_bytes() == AUDIO
    assert leftovers(tmp_path) == ["same.wav"]


def test_checksum_mismatch(srv: FaultServer, tmp_path: Path) -> None:
    dest = tmp_path / "x.wav"
    e = fail(Fetcher(pol()), srv.url("/audio.wav"), dest, expected_sha256="0" * 64)
    assert e.reason == "checksum_mismatch" and e.attempts == 1
    assert leftovers(tmp_path) == [] and srv.hits("/audio.wav") == 1


# -- status codes and retries ------------------------------------------------------------


@pytest.mark.parametrize(("path", "reason", "status"), [
    ("/missing", "not_found", 404), ("/gone", "not_found", 410),
    ("/forbidden", "http_client_error", 403), ("/nothing-here", "not_found", 404),
])
def test_client_errors_are_not_retried(srv: FaultServer, tmp_path: Path, path: str,
                                       reason: str, status: int) -> None:
    e = fail(Fetcher(pol(max_retries=3)), srv.url(path), tmp_path / "x.wav")
    assert (e.reason, e.status, e.attempts) == (reason, status, 1)
    assert srv.hits(path) == 1 and leftovers(tmp_path) == []


def test_server_error_then_success(srv: FaultServer, tmp_path: Path) -> None:
    res = Fetcher(pol(max_retries=2)).fetch(srv.url("/flaky"), tmp_path / "x.wav")
    assert res.sha256 == SHA and res.attempts == 3 and srv.hits("/flaky") == 3


def test_server_error_after_retries_with_jittered_backoff(
        srv: FaultServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sleeps: list[float] = []
    monkeypatch.setattr(hostsmod, "backoff_sleep", sleeps.append)
    f = Fetcher(pol(max_retries=3, backoff_base_s=0.01, backoff_max_s=0.03))
    e = fail(f, srv.url("/broken"), tmp_path / "x.wav")
    assert (e.reason, e.status, e.attempts) == ("http_server_error", 500, 4)
    assert srv.hits("/broken") == 4
    assert len(sleeps) == 3
    assert all(0 <= s <= cap for s, cap in zip(sleeps, (0.01, 0.02, 0.03), strict=True))
    assert f.host_stats()["127.0.0.1"]["failures"] == 1


@pytest.mark.parametrize("path", ["/rate-limited", "/unavailable"])
def test_retry_after_is_honoured(srv: FaultServer, tmp_path: Path, path: str) -> None:
    t0 = time.monotonic()
    res = Fetcher(pol(backoff_max_s=0.01)).fetch(srv.url(path), tmp_path / "x.wav")
    t1, t2 = (h.t for h in srv.log(path))
    assert res.sha256 == SHA and res.attempts == 2
    assert t2 - t1 >= 0.9 and time.monotonic() - t0 >= 0.9  # Retry-After: 1, not the backoff


def test_rate_limited_after_retries_and_cap(srv: FaultServer, tmp_path: Path) -> None:
    t0 = time.monotonic()
    f = Fetcher(pol(max_retries=2, max_retry_after_s=0.05))
    e = fail(f, srv.url("/always-429"), tmp_path / "x.wav")
    assert (e.reason, e.status, e.attempts) == ("rate_limited", 429, 3)
    assert srv.hits("/always-429") == 3 and time.monotonic() - t0 < 0.8


def test_retry_after_parsing() -> None:
    parse = retry_after_seconds
    assert parse("7") == 7.0 and parse(" 0 ") == 0.0 and parse(None) is None
    assert parse("soon") is None
    assert parse("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # in the past
    now = time.time()
    http_date = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(now + 30))
    assert parse(http_date, now=now) == pytest.approx(30, abs=1.5)


def test_connection_refused(srv: FaultServer, tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    e = fail(Fetcher(pol(max_retries=1)), f"http://127.0.0.1:{port}/x.wav", tmp_path / "x")
    assert e.reason == "connection_error" and e.attempts == 2 and e.status is None


# -- timeouts and short bodies -------------------------------------------------------------


def test_stalled_body_times_out(srv: FaultServer, tmp_path: Path) -> None:
    t0 = time.monotonic()
    dest = tmp_path / "x.wav"
    e = fail(Fetcher(pol(read_timeout_s=0.3, max_retries=1)), srv.url("/stall"), dest)
    assert (e.reason, e.attempts, srv.hits("/stall")) == ("timeout", 2, 2)
    assert time.monotonic() - t0 < 1.8
    # the bytes that did arrive are kept for a later call to resume
    assert (tmp_path / "x.wav.part").stat().st_size == 1000
    assert json.loads((tmp_path / "x.wav.part.json").read_text())["url"] == srv.url("/stall")


def test_stall_then_resume_with_range(srv: FaultServer, tmp_path: Path) -> None:
    res = Fetcher(pol(read_timeout_s=0.3)).fetch(srv.url("/stall-once"), tmp_path / "x.wav")
    assert res.sha256 == SHA and res.attempts == 2 and res.resumed and res.status == 206
    assert srv.range_headers("/stall-once") == [None, f"bytes={len(AUDIO) // 3}-"]
    assert srv.log("/stall-once")[1].headers["If-Range"] == ETAG


def test_truncated_every_time(srv: FaultServer, tmp_path: Path) -> None:
    e = fail(Fetcher(pol(max_retries=2)), srv.url("/short"), tmp_path / "x.wav")
    assert (e.reason, e.attempts, srv.hits("/short")) == ("truncated", 3, 3)
    # each retry asked to continue; the server ignored Range, so each restarted at 0
    assert srv.range_headers("/short") == [None] + [f"bytes={len(AUDIO) // 2}-"] * 2
    assert (tmp_path / "x.wav.part").exists()  # kept for a later resume


def test_truncated_once_continues_with_range(srv: FaultServer, tmp_path: Path) -> None:
    res = Fetcher(pol()).fetch(srv.url("/short-once"), tmp_path / "x.wav")
    assert res.sha256 == SHA and res.attempts == 2 and res.resumed
    assert srv.range_headers("/short-once") == [None, f"bytes={len(AUDIO) // 2}-"]


# -- resume across Fetchers / processes -----------------------------------------------------


def test_resume_across_two_fetchers_after_a_crash(srv: FaultServer, tmp_path: Path) -> None:
    dest = tmp_path / "x.wav"
    url = srv.url("/short-once")
    e = fail(Fetcher(pol(max_retries=0)), url, dest)
    assert e.reason == "truncated" and e.attempts == 1
    assert (tmp_path / "x.wav.part").stat().st_size == len(AUDIO) // 2
    res = Fetcher(pol()).fetch(url, dest, expected_sha256=SHA)
    assert res.resumed and res.attempts == 1 and res.sha256 == SHA
    assert dest.read_bytes() == AUDIO and leftovers(tmp_path) == ["x.wav"]
    second = srv.log("/short-once")[1].headers
    assert second["Range"] == f"bytes={len(AUDIO) // 2}-" and second["If-Range"] == ETAG


def write_part(dest: Path, data: bytes, **meta: Any) -> None:
    dest.with_name(dest.name + ".part").write_bytes(data)
    if meta:
        dest.with_name(dest.name + ".part.json").write_text(json.dumps(meta))


def test_resume_precreated_part(srv: FaultServer, tmp_path: Path) -> None:
    dest, url, half = tmp_path / "x.wav", srv.url("/audio.wav"), len(AUDIO) // 2
    write_part(dest, AUDIO[:half], url=url, etag=ETAG, total=len(AUDIO))
    res = Fetcher(pol()).fetch(url, dest)
    assert res.resumed and res.status == 206 and res.sha256 == SHA and res.size == len(AUDIO)
    assert srv.range_headers("/audio.wav") == [f"bytes={half}-"]
    assert leftovers(tmp_path) == ["x.wav"]
    assert Fetcher(pol()).host_stats() == {}  # stats are per Fetcher


def test_resume_with_changed_etag_starts_over(srv: FaultServer, tmp_path: Path) -> None:
    dest, url = tmp_path / "x.wav", srv.url("/audio.wav")
    write_part(dest, b"\x00" * 5000, url=url, etag='"old"')
    res = Fetcher(pol()).fetch(url, dest)
    assert not res.resumed and res.status == 200 and res.sha256 == SHA
    (hit,) = srv.log("/audio.wav")
    assert hit.headers["If-Range"] == '"old"'  # asked; the server sent the new whole file


@pytest.mark.parametrize("meta", [{}, {"url": "http://elsewhere.example/x.wav", "etag": ETAG},
                                  {"url": "SELF"}])
def test_untrusted_part_is_not_resumed(srv: FaultServer, tmp_path: Path,
                                       meta: dict[str, Any]) -> None:
    """No record, a record for another URL, or no validator and no length: start over."""
    dest, url = tmp_path / "x.wav", srv.url("/audio.wav")
    write_part(dest, b"\x00" * 5000, **{k: url if v == "SELF" else v for k, v in meta.items()})
    res = Fetcher(pol()).fetch(url, dest)
    assert not res.resumed and res.sha256 == SHA and srv.range_headers("/audio.wav") == [None]


@pytest.mark.parametrize(("etag", "last_modified", "meta", "if_range"), [
    (None, LAST_MODIFIED, {"last_modified": LAST_MODIFIED}, LAST_MODIFIED),
    ('W/"weak"', LAST_MODIFIED, {"etag": 'W/"weak"', "last_modified": LAST_MODIFIED},
     LAST_MODIFIED),
    (None, None, {"total": len(AUDIO)}, None),  # no validator: the length must match
])
def test_resume_validators(srv: FaultServer, tmp_path: Path, etag: str | None,
                           last_modified: str | None, meta: dict[str, Any],
                           if_range: str | None) -> None:
    srv.routes["/plain.wav"] = file_route(AUDIO, etag=etag, last_modified=last_modified)
    dest, url, third = tmp_path / "x.wav", srv.url("/plain.wav"), len(AUDIO) // 3
    write_part(dest, AUDIO[:third], url=url, **meta)
    res = Fetcher(pol()).fetch(url, dest, expected_sha256=SHA)
    assert res.resumed and res.status == 206
    (hit,) = srv.log("/plain.wav")
    assert hit.headers["Range"] == f"bytes={third}-" and hit.headers.get("If-Range") == if_range


def test_complete_but_uncommitted_part(srv: FaultServer, tmp_path: Path) -> None:
    dest, url = tmp_path / "x.wav", srv.url("/audio.wav")
    write_part(dest, AUDIO, url=url, etag=ETAG, total=len(AUDIO))
    res = Fetcher(pol()).fetch(url, dest)
    assert res.sha256 == SHA and res.resumed and res.attempts == 1
    assert srv.range_headers("/audio.wav") == [f"bytes={len(AUDIO)}-"]  # answered 416


# -- redirects --------------------------------------------------------------------------------


def test_redirect_chain(srv: FaultServer, tmp_path: Path) -> None:
    res = Fetcher(pol()).fetch(srv.url("/r1"), tmp_path / "x.wav")
    assert res.redirects == [srv.url("/r2"), srv.url("/r3"), srv.url("/audio.wav")]
    assert res.final_url == srv.url("/audio.wav") and res.url == srv.url("/r1")
    assert res.sha256 == SHA and res.attempts == 1


def test_too_many_redirects(srv: FaultServer, tmp_path: Path) -> None:
    e = fail(Fetcher(pol(max_redirects=2)), srv.url("/r1"), tmp_path / "x.wav")
    assert (e.reason, e.attempts, e.status) == ("too_many_redirects", 1, 307)
    assert srv.hits("/audio.wav") == 0 and srv.hits("/r1") == 1


def test_redirect_loop(srv: FaultServer, tmp_path: Path) -> None:
    e = fail(Fetcher(pol()), srv.url("/loop-a"), tmp_path / "x.wav")
    assert (e.reason, e.attempts) == ("redirect_loop", 1)
    assert srv.hits("/loop-a") == 1 and srv.hits("/loop-b") == 1


def test_redirect_body_is_never_read(srv: FaultServer, tmp_path: Path) -> None:
    """A redirect that declares a 1 GiB body (and keeps sending it): the fetcher follows
    the Location without downloading the body, so a hostile redirect cannot make a worker
    read gigabytes (requests alone reads every redirect body whole)."""
    sent = {"bytes": 0}
    block = b"\0" * 65536

    def huge_redirect(req: Req) -> None:
        req.send_head(302, {"Location": "/audio.wav", "Content-Length": 2**30})
        while sent["bytes"] < 2**30 and req.write(block):
            sent["bytes"] += len(block)
        req.close()

    srv.routes["/huge-redirect"] = huge_redirect
    try:
        res = Fetcher(pol()).fetch(srv.url("/huge-redirect"), tmp_path / "x.wav")
    finally:
        del srv.routes["/huge-redirect"]
    assert res.sha256 == SHA and res.redirects == [srv.url("/audio.wav")]
    # what the kernel's socket buffers absorbed before the client hung up, not the body
    assert sent["bytes"] < 32 * 2**20, sent["bytes"]


# -- content checks -----------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/episode.mp3", "/page.mp3", "/feed.json", "/notes.mp3",
                                  "/feed.rss"])
def test_documents_are_not_audio(srv: FaultServer, tmp_path: Path, path: str) -> None:
    e = fail(Fetcher(pol()), srv.url(path), tmp_path / "x.mp3")
    assert (e.reason, e.attempts, e.status) == ("not_audio", 1, 200)
    assert leftovers(tmp_path) == []


def test_sniff_off_keeps_anything(srv: FaultServer, tmp_path: Path) -> None:
    res = Fetcher(pol(sniff=False)).fetch(srv.url("/episode.mp3"), tmp_path / "x.mp3")
    assert (tmp_path / "x.mp3").read_bytes() == HTML_PAGE and res.content_type == "audio/mpeg"


def test_sniffer() -> None:
    for media in (AUDIO[:512], b"ID3\x04\x00\x00\x00\x00\x01\x00TIT2",
                  b"fLaC\x00\x00\x00\x22\x10\x00", b"OggS\x00\x02\x00\x00",
                  b"\x00\x00\x00\x20ftypM4A \x00\x00\x02\x00", b"\xff\xfb\x90\x64\x00\x0f",
                  b"\x1aE\xdf\xa3\x9fB\x86\x81\x01"):
        assert sniff_not_audio(media) is None, media
    for doc in (HTML_PAGE, b"\xef\xbb\xbf  <?xml version='1.0'?><rss/>", b'{"a": 1}',
                b"[1, 2]", b"Access denied\n", "Caf\u00e9 ferm\u00e9".encode("latin-1"),
                "<html>".encode("utf-16"), b"", b"   \n", b"<!-- c -->"):
        assert sniff_not_audio(doc), doc


@pytest.mark.parametrize("path", ["/audio.wav", "/chunked"])
def test_too_large(srv: FaultServer, tmp_path: Path, path: str) -> None:
    """Content-Length is checked before reading; a chunked body while streaming."""
    e = fail(Fetcher(pol(max_bytes=100_000)), srv.url(path), tmp_path / "x.wav")
    assert (e.reason, e.attempts) == ("too_large", 1) and srv.hits(path) == 1
    assert leftovers(tmp_path) == []


# -- URL policy and SSRF ------------------------------------------------------------------------


@pytest.mark.parametrize("url", ["ftp://example.com/a.mp3", "file:///etc/passwd",
                                 "http://", "not a url", "http://example.com:99999/a",
                                 "http://exa\nmple.com/a.mp3", "gopher://x/", "//example.com/a"])
def test_bad_url(tmp_path: Path, url: str) -> None:
    e = fail(Fetcher(pol()), url, tmp_path / "x")
    assert (e.reason, e.attempts) == ("bad_url", 0)


def test_host_lists(srv: FaultServer, tmp_path: Path) -> None:
    url = srv.url("/audio.wav")
    for kw in ({"deny_hosts": ("127.0.0.*",)}, {"allow_hosts": ("*.example.org",)},
               {"allow_hosts": ("127.0.0.1",), "deny_hosts": ("127.*",)}):
        e = fail(Fetcher(pol(**kw)), url, tmp_path / "x")
        assert (e.reason, e.attempts) == ("blocked_host", 0)
    assert srv.hits("/audio.wav") == 0
    assert Fetcher(pol(allow_hosts=("127.0.0.1",))).fetch(url, tmp_path / "x").sha256 == SHA
    # every hop is checked against the lists
    e = fail(Fetcher(pol(allow_hosts=("127.0.0.1",))), srv.url("/to-private"), tmp_path / "y")
    assert e.reason == "blocked_host" and e.attempts == 1


def test_private_addresses_refused_by_default(srv: FaultServer, tmp_path: Path) -> None:
    f = Fetcher(FetchPolicy(max_retries=3))
    for url in (srv.url("/audio.wav"), f"http://localhost:{srv.port}/audio.wav",
                f"http://[::1]:{srv.port}/audio.wav"):
        e = fail(f, url, tmp_path / "x")
        assert (e.reason, e.attempts) == ("private_address", 1), url
    assert srv.hits("/audio.wav") == 0  # never connected


@pytest.mark.parametrize("allow", [("127.0.0.1",), ("127.0.0.0/8",), ("::1", "127.0.0.1/32")])
def test_allow_private(srv: FaultServer, tmp_path: Path, allow: tuple[str, ...]) -> None:
    res = Fetcher(pol(allow_private=allow)).fetch(srv.url("/audio.wav"), tmp_path / "x")
    assert res.sha256 == SHA


@pytest.mark.parametrize("path", ["/to-private", "/to-metadata"])
def test_redirect_to_private_address(srv: FaultServer, tmp_path: Path, path: str) -> None:
    e = fail(Fetcher(pol()), srv.url(path), tmp_path / "x")
    assert (e.reason, e.attempts) == ("private_address", 1) and srv.hits(path) == 1
    assert srv.hits("/audio.wav") == 0


@pytest.mark.parametrize("host", ["10.0.0.1", "192.168.1.1", "172.16.5.5", "169.254.169.254",
                                  "0.0.0.0", "224.0.0.1", "100.64.0.1", "[::1]", "[fe80::1]",
                                  "[fd00::1]", "[::ffff:127.0.0.1]", "[::]", "[ff02::1]"])
def test_check_url_private(host: str) -> None:
    with pytest.raises(FetchError) as ei:
        check_url(f"http://{host}/x.mp3", FetchPolicy())
    assert ei.value.reason == "private_address"


def test_check_url_public_literal() -> None:
    assert check_url("https://93.184.215.14/a.mp3", FetchPolicy()) == "93.184.215.14"
    assert check_url("http://[2606:4700::1111]/a", FetchPolicy()) == "2606:4700::1111"
    with pytest.raises(FetchError):
        check_url("http://10.1.2.3/a", FetchPolicy(allow_private=("10.0.0.0/16",)))
    assert check_url("http://10.0.2.3/a", FetchPolicy(allow_private=("10.0.0.0/16",)))


# -- politeness: per-host concurrency and rate, process-wide ------------------------------------


def test_per_host_concurrency_is_process_wide(srv: FaultServer, tmp_path: Path) -> None:
    fetchers = [Fetcher(pol(per_host_concurrency=2)), Fetcher(pol(per_host_concurrency=2))]

    def one(i: int) -> str:
        return fetchers[i % 2].fetch(srv.url("/slow"), tmp_path / f"{i}.wav").sha256

    with ThreadPoolExecutor(8) as ex:
        shas = list(ex.map(one, range(8)))
    assert len(set(shas)) == 1 and srv.hits("/slow") == 8
    assert srv.max_in_flight("/slow") == 2


def test_per_host_rate_limit(srv: FaultServer) -> None:
    f = Fetcher(pol(per_host_rps=5.0))
    with ThreadPoolExecutor(10) as ex:
        bodies = list(ex.map(lambda _: f.get_bytes(srv.url("/small.bin"))[0], range(10)))
    assert all(b == AUDIO[:2048] for b in bodies)
    starts = sorted(h.t for h in srv.log("/small.bin"))
    assert len(starts) == 10
    assert max(sum(1 for t in starts if s <= t < s + 1.0) for s in starts) <= 6


# -- small documents ------------------------------------------------------------------------------


def test_get_bytes(srv: FaultServer) -> None:
    f = Fetcher(pol())
    body, final = f.get_bytes(srv.url("/feed.rss"))
    assert body.startswith(b"<?xml") and final == srv.url("/feed.rss")
    body, final = f.get_bytes(srv.url("/r1"))  # redirects, no sniffing needed
    assert body == AUDIO and final == srv.url("/audio.wav")
    assert f.get_bytes(srv.url("/episode.mp3"))[0] == HTML_PAGE  # never sniffed
    assert f.get_bytes(srv.url("/flaky"))[0] == AUDIO and srv.hits("/flaky") == 3
    assert "speechmill" in srv.log("/feed.rss")[0].headers["User-Agent"]


@pytest.mark.parametrize(("path", "reason", "attempts"), [
    ("/audio.wav", "too_large", 1), ("/chunked", "too_large", 1), ("/missing", "not_found", 1),
    ("/short", "truncated", 2), ("/loop-a", "redirect_loop", 1),
    ("/to-metadata", "private_address", 1), ("/always-429", "rate_limited", 2),
])
def test_get_bytes_failures(srv: FaultServer, path: str, reason: str, attempts: int) -> None:
    limit = 50_000 if reason == "too_large" else 10 * len(AUDIO)
    f = Fetcher(pol(max_retries=1, max_retry_after_s=0.01))
    with pytest.raises(FetchError) as ei:
        f.get_bytes(srv.url(path), max_bytes=limit)
    assert (ei.value.reason, ei.value.attempts) == (reason, attempts)
    assert srv.hits(path) == attempts


def test_get_bytes_refuses_private_by_default(srv: FaultServer) -> None:
    with pytest.raises(FetchError) as ei:
        Fetcher(FetchPolicy()).get_bytes(srv.url("/feed.rss"))
    assert ei.value.reason == "private_address" and srv.hits("/feed.rss") == 0


def test_content_encoding_is_decoded(srv: FaultServer, tmp_path: Path) -> None:
    """Servers that compress anyway: documents and files arrive decoded."""
    def gz(data: bytes, ctype: str) -> Any:
        def h(req: Req) -> None:
            req.send(200, gzip.compress(data), {"Content-Encoding": "gzip"}, content_type=ctype)
        return h

    srv.routes["/feed.rss.gz"] = gz(RSS_FEED, "application/rss+xml")
    srv.routes["/audio.wav.gz"] = gz(AUDIO, "audio/wav")
    f = Fetcher(pol())
    assert f.get_bytes(srv.url("/feed.rss.gz"))[0] == RSS_FEED
    assert "gzip" in srv.log("/feed.rss.gz")[0].headers["Accept-Encoding"]
    assert f.fetch(srv.url("/audio.wav.gz"), tmp_path / "x.wav").sha256 == SHA


def test_connected_peer_is_checked_too(srv: FaultServer, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """DNS rebinding: even if the name check passed, a private peer address is refused."""
    monkeypatch.setattr(safetymod, "_check_address", lambda *a: None)
    e = fail(Fetcher(FetchPolicy(max_retries=0)), srv.url("/audio.wav"), tmp_path / "x")
    assert e.reason == "private_address" and "connected to 127.0.0.1" in e.detail


def test_fetch_error_pickles() -> None:
    e = FetchError("timeout", "stalled", status=None, attempts=3, url="http://x/y")
    e2 = pickle.loads(pickle.dumps(e))
    assert (e2.reason, e2.detail, e2.attempts, e2.url, e2.retryable) == \
        ("timeout", "stalled", 3, "http://x/y", True)
    assert "timeout" in str(e2)


def test_host_gate_counts_threads() -> None:
    """The gate itself: never more than the limit inside, whatever the number of threads."""
    gate = hostsmod.host_gate("gate-test.invalid")
    inside, peak, lock = 0, 0, threading.Lock()

    def work() -> None:
        nonlocal inside, peak
        gate.acquire(3, 0.0)
        with lock:
            inside += 1
            peak = max(peak, inside)
        time.sleep(0.01)
        with lock:
            inside -= 1
        gate.release()

    threads = [threading.Thread(target=work) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert peak == 3
