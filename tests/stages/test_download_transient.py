"""Stage ``download``: a server or object store that failed after the retries is a
*transient* reject (refused connections, 503 / 429 forever, 408, bodies that keep
breaking off), what the URL itself earns is a *data* reject (404, HTML instead of audio,
a missing object); credentials in URLs and ``storage_options`` never reach a reject."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pyarrow as pa

from speechmill.pipeline.stage import StageContext
from speechmill.stages.download import Download, DownloadConfig
from testkit.http_faults import (
    HTML_PAGE,
    FaultServer,
    echo_auth_route,
    file_route,
    find_pieces,
    retry_after_route,
    short_body_route,
    status_route,
)
from tests.stages.test_download import EP

SECRET = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY-0123"  # 45 characters


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def process(tmp_path: Path, **with_: Any) -> tuple[pa.Table, pa.Table, Download]:
    """plan -> setup -> process, as the engine runs a source stage."""
    cfg = {"allow_private": ["127.0.0.1"], "threads": 8, "per_host_concurrency": 8,
           "per_host_rps": 0, "read_timeout_s": 1, "connect_timeout_s": 2,
           "backoff_base_s": 0.01, "backoff_max_s": 0.02, "max_retries": 1,
           "max_retry_after_s": 0.1, "max_bytes": 200_000, **with_}
    config = DownloadConfig(**cfg)
    Download.validate_config(config)
    stage = Download(config, StageContext("download", str(tmp_path)))
    plan = stage.plan()
    stage.setup()
    res = stage.process(plan)
    return res.outputs, res.rejects, stage


def by_path(rejects: pa.Table) -> dict[str, tuple[str, str]]:
    from urllib.parse import urlsplit

    return {urlsplit(r["source_url"]).path: (r["reason"], r["kind"])
            for r in rejects.to_pylist()}


def test_http_failures_of_the_server_are_transient(tmp_path: Path) -> None:
    routes = {
        "/ok.mp3": file_route(EP[0], "audio/mpeg"),
        "/down.mp3": status_route(503),
        "/limited.mp3": retry_after_route(None, 0),
        "/slow-down.mp3": status_route(408),
        "/short.mp3": short_body_route(EP[1], len(EP[1]) // 2),
        "/missing.mp3": status_route(404),
        "/gone.mp3": status_route(410),
        "/forbidden.mp3": echo_auth_route(403),
        "/page.mp3": file_route(HTML_PAGE, "audio/mpeg"),
    }
    refused = f"http://127.0.0.1:{free_port()}/nothing.mp3"
    with FaultServer(routes) as srv:
        urls = [srv.url(p) for p in routes] + [refused]
        out, rej, stage = process(tmp_path, urls=urls)
        assert srv.hits("/down.mp3") == 2 and srv.hits("/missing.mp3") == 1
    assert out.num_rows == 1
    assert by_path(rej) == {
        "/down.mp3": ("http_server_error", "transient"),
        "/limited.mp3": ("rate_limited", "transient"),
        "/slow-down.mp3": ("timeout", "transient"),
        "/short.mp3": ("truncated", "transient"),
        "/nothing.mp3": ("connection_error", "transient"),
        "/missing.mp3": ("not_found", "data"),
        "/gone.mp3": ("not_found", "data"),
        "/forbidden.mp3": ("http_client_error", "data"),
        "/page.mp3": ("not_audio", "data"),
    }
    # a transient failure keeps its part file: the rerun resumes it; a final one does not
    parts = {p.name for p in stage.ctx.media_dir.rglob("*.part")}
    assert len(parts) == 1  # the short body's


def test_unreachable_object_store_is_transient_and_its_secrets_stay_out(
        tmp_path: Path) -> None:
    import fsspec

    mem = fsspec.filesystem("memory")
    mem.pipe("/transient-test/ep0.mp3", EP[0])
    port = free_port()
    so = {"key": "AKIAEXAMPLETRANSIENT", "secret": SECRET,
          "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{port}"},
          "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 1}}
    out, rej, _ = process(tmp_path / "s3", fsspec=["s3://bucket/show/ep1.mp3"],
                          storage_options=so)
    assert out.num_rows == 0
    (r,) = rej.to_pylist()
    assert (r["reason"], r["kind"]) == ("unreadable", "transient"), r
    assert not find_pieces(SECRET, str(r))
    # fsspec's HTTP store turns a refused connection into FileNotFoundError: still transient
    out, rej, _ = process(tmp_path / "http", fsspec=[
        f"http://user:{SECRET}@127.0.0.1:{port}/ep.mp3", "memory://transient-test/ep0.mp3",
        "memory://transient-test/missing.mp3"])
    assert out.num_rows == 1
    got = {r["source_url"]: (r["reason"], r["kind"]) for r in rej.to_pylist()}
    # the URL's credentials are not stored with its reject
    assert got == {f"http://127.0.0.1:{port}/ep.mp3": ("connection_error", "transient"),
                   "memory://transient-test/missing.mp3": ("not_found", "data")}
    assert not find_pieces(SECRET, str(rej.to_pylist()))


def test_fsspec_http_refusal_is_recognised_through_file_not_found() -> None:
    """fsspec's HTTP store raises FileNotFoundError for a refused connection (the cause
    says what happened) and for a 404 (it does not)."""
    import fsspec
    import pytest

    from speechmill.stages.download import transient_error

    def read(url: str) -> None:
        with fsspec.open(url, "rb") as f:
            f.read()

    with pytest.raises(FileNotFoundError) as ei:
        read(f"http://127.0.0.1:{free_port()}/x.mp3")
    assert transient_error(ei.value)
    with FaultServer({"/x.mp3": status_route(404)}) as srv, \
            pytest.raises(FileNotFoundError) as ei:
        read(srv.url("/x.mp3"))
    assert not transient_error(ei.value)
    assert not transient_error(FileNotFoundError("no such object"))
