"""Stage download against a fault-injecting HTTP server on 127.0.0.1: feeds, URL lists,
yt-dlp, faults, dedup, provenance, resume."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import soundfile as sf

from speechmill.pipeline import dag as dagmod
from speechmill.pipeline.errors import ConfigError, ErrorBudgetExceeded
from speechmill.pipeline.runner import run
from speechmill.pipeline.store import RunStore
from testkit.audio import load_speech
from testkit.http_faults import (
    HTML_PAGE,
    FaultServer,
    fail_first,
    file_route,
    redirect_route,
    retry_after_route,
    short_body_route,
    stall_route,
)
from tests.conftest import cli_env


def mp3(seconds: float, seed: int) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, load_speech(seconds, 16000, seed=seed) * 0.5, 16000, format="MP3")
    return buf.getvalue()


EP = {i: mp3(3.0, seed=10 + i) for i in range(6)}
BIG = mp3(40.0, seed=99)


def rss(base: str, items: list[tuple[str, str]]) -> bytes:
    body = "".join(
        f"<item><title>{t}</title><guid>{t}</guid>"
        f"<pubDate>Mon, 0{i + 1} Jan 2024 10:00:00 GMT</pubDate>"
        f"<itunes:duration>00:00:03</itunes:duration>"
        f'<enclosure url="{base}{p}" type="audio/mpeg" length="1000"/></item>'
        for i, (t, p) in enumerate(items)
    )
    return (
        '<?xml version="1.0"?><rss version="2.0" '
        'xmlns:itunes="http://www.itunes.com/dtds/podcast-1.0.dtd" '
        'xmlns:creativeCommons="http://backend.userland.com/creativeCommonsRssModule">'
        "<channel><title>Speechmill Test Show</title><itunes:author>Ada</itunes:author>"
        "<creativeCommons:license>https://creativecommons.org/licenses/by/4.0/"
        f"</creativeCommons:license>{body}</channel></rss>"
    ).encode()


FEED_ITEMS = [
    ("good one", "/ep0.mp3"),
    ("good two", "/ep1.mp3"),
    ("same bytes as one", "/mirror/ep0-copy.mp3"),
    ("flaky", "/flaky.mp3"),
    ("rate limited", "/limited.mp3"),
    ("redirected", "/r1"),
    ("html error page", "/episode.mp3"),
    ("missing", "/missing.mp3"),
    ("stalled", "/stall.mp3"),
    ("short body", "/short.mp3"),
    ("loop", "/loop-a"),
    ("huge", "/huge.mp3"),
    ("traversal", "/..%2F..%2F..%2Fetc%2Fpasswd.mp3"),
]
EXPECT = {  # path -> reason (None: downloaded)
    "/ep0.mp3": None, "/ep1.mp3": None, "/mirror/ep0-copy.mp3": "duplicate",
    "/flaky.mp3": None, "/limited.mp3": None, "/r1": None, "/episode.mp3": "not_audio",
    "/missing.mp3": "not_found", "/stall.mp3": "timeout", "/short.mp3": "truncated",
    "/loop-a": "redirect_loop", "/huge.mp3": "too_large",
    "/..%2F..%2F..%2Fetc%2Fpasswd.mp3": None,
}


@pytest.fixture
def server() -> FaultServer:
    srv = FaultServer({})
    srv.start()
    base = srv.base
    r = srv.routes
    r["/show.rss"] = file_route(rss(base, FEED_ITEMS), "application/rss+xml")
    r["/ep0.mp3"] = file_route(EP[0], "audio/mpeg")
    r["/ep1.mp3"] = file_route(EP[1], "audio/mpeg")
    r["/mirror/ep0-copy.mp3"] = file_route(EP[0], "audio/mpeg")
    r["/flaky.mp3"] = fail_first(2, file_route(EP[2], "audio/mpeg"), 500)
    r["/limited.mp3"] = retry_after_route(file_route(EP[3], "audio/mpeg"), 1)
    r["/r1"] = redirect_route("/r2", 301)
    r["/r2"] = redirect_route("/r3", 302)
    r["/r3"] = redirect_route("/ep4.mp3", 307)
    r["/ep4.mp3"] = file_route(EP[4], "audio/mpeg")
    r["/episode.mp3"] = file_route(HTML_PAGE, "audio/mpeg")
    r["/stall.mp3"] = stall_route(EP[5], 500, 5.0)
    r["/short.mp3"] = short_body_route(EP[5], len(EP[5]) // 2)
    r["/loop-a"] = redirect_route("/loop-b")
    r["/loop-b"] = redirect_route("/loop-a")
    r["/huge.mp3"] = file_route(BIG, "audio/mpeg")
    r["/..%2F..%2F..%2Fetc%2Fpasswd.mp3"] = file_route(EP[5], "audio/mpeg")
    yield srv
    srv.stop()


def dag_text(run_dir: Path, with_: str, executor: str = "local") -> str:
    return f"""
name: crawl
run_dir: {run_dir}
executor: {{type: {executor}, stall_timeout_s: 120}}
stages:
  - id: download
    uses: download
    batch_size: 8
    with:
      allow_private: ["127.0.0.1"]
      threads: 8
      per_host_concurrency: 4
      per_host_rps: 0
      read_timeout_s: 0.5
      connect_timeout_s: 2
      backoff_base_s: 0.01
      max_retries: 2
      max_retry_after_s: 2
      max_bytes: 100000
{with_}
  - id: standardize
    uses: standardize
    needs: [download]
    with: {{sample_rate: 16000}}
"""


def by_path(url: str) -> str:
    from urllib.parse import urlsplit

    return urlsplit(url).path


def test_feed_crawl_faults_dedup_provenance_and_no_refetch(server: FaultServer,
                                                          tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    text = dag_text(run_dir, f'      feeds: ["{server.url("/show.rss")}"]\n'
                             f'      urls: ["{server.url("/ep1.mp3")}"]')
    res = run(dagmod.loads(text), progress=False)
    assert res.status == "succeeded"
    store = RunStore(run_dir)
    outs = store.read_outputs("download").to_pylist()
    rej = store.read_rejects("download").to_pylist()
    got: dict[str, str | None] = {}
    for o in outs:
        got[by_path(o["source_url"])] = None
    for r in rej:
        got.setdefault(by_path(r["source_url"]), r["reason"])
    # the same URL given twice (feed + urls) is one download, the other a duplicate_url
    assert sorted(r["reason"] for r in rej if r["reason"] == "duplicate_url") == ["duplicate_url"]
    assert {p: got.get(p, "MISSING") for p in EXPECT} == EXPECT

    media = (run_dir / "media" / "download").resolve()
    for o in outs:
        p = Path(o["audio_path"]).resolve()
        assert p.is_relative_to(media), p  # path traversal in the URL stays harmless
        assert hashlib.sha256(p.read_bytes()).hexdigest() == o["sha256"]
        assert o["id"] == o["sha256"][:20] and o["http_status"] in (200, 206)
        assert o["fetched_at"] and o["etag"] and o["size_bytes"] == p.stat().st_size
    ep0 = next(o for o in outs if o["source_url"].endswith("/ep0.mp3"))
    assert ep0["title"] == "good one" and ep0["feed_title"] == "Speechmill Test Show"
    assert ep0["published"].startswith("2024-01-01T10:00:00")
    assert ep0["rights"] == "https://creativecommons.org/licenses/by/4.0/"
    assert ep0["author"] == "Ada" and ep0["declared_duration"] == 3.0
    assert ep0["duration"] == pytest.approx(3.0, abs=0.1)
    redirected = next(o for o in outs if o["source_url"].endswith("/r1"))
    assert redirected["final_url"].endswith("/ep4.mp3")
    # retries: 500, 500, 200; 429 then 200; 4xx never retried; stall: 1 + max_retries
    assert server.hits("/flaky.mp3") == 3
    assert next(o for o in outs if o["source_url"].endswith("/flaky.mp3"))["attempts"] == 3
    assert server.hits("/limited.mp3") == 2
    assert server.hits("/missing.mp3") == 1
    assert server.hits("/stall.mp3") == 3
    assert server.hits("/short.mp3") == 3
    # everything downloaded was standardized
    std = store.read_outputs("standardize").to_pylist()
    assert len(std) == len(outs) == 6
    m = json.loads((run_dir / "stages/download/metrics.json").read_text())
    hosts = m["stage_summary"]["hosts"]
    assert hosts["127.0.0.1"]["files"] == 6 and hosts["127.0.0.1"]["failures"]["timeout"] == 1
    # the stall and the short body are the server's failures (transient rejects: a
    # rerun retries them); every other verdict is the data's and final
    kinds = {by_path(r["source_url"]): r["kind"] for r in rej}
    assert {p for p, k in kinds.items() if k == "transient"} == {"/stall.mp3", "/short.mp3"}
    assert set(kinds.values()) == {"data", "transient"}
    # a second run of the same DAG fetches nothing but those two again
    before = len(server.log())
    run(dagmod.loads(text), progress=False)
    again = [h.path for h in server.log()[before:]]
    assert sorted(set(again)) == ["/short.mp3", "/stall.mp3"] and len(again) == 6
    assert len(store.read_outputs("download").to_pylist()) == 6


def test_ssrf_guard_on_by_default_and_host_lists(server: FaultServer, tmp_path: Path) -> None:
    text = dag_text(tmp_path / "run", f'      urls: ["{server.url("/ep0.mp3")}"]')
    text = text.replace('allow_private: ["127.0.0.1"]', "allow_private: []")
    run(dagmod.loads(text), progress=False)
    rej = RunStore(tmp_path / "run").read_rejects("download").to_pylist()
    assert [r["reason"] for r in rej] == ["private_address"]
    assert server.hits("/ep0.mp3") == 0
    text = dag_text(tmp_path / "run2", f'      urls: ["{server.url("/ep0.mp3")}"]\n'
                                       '      deny_hosts: ["127.0.0.*"]')
    run(dagmod.loads(text), progress=False)
    rej = RunStore(tmp_path / "run2").read_rejects("download").to_pylist()
    assert [r["reason"] for r in rej] == ["blocked_host"]


def test_url_list_and_bad_feed(server: FaultServer, tmp_path: Path) -> None:
    lst = tmp_path / "urls.csv"
    lst.write_text(f"url,speaker\n{server.url('/ep0.mp3')},host1\n{server.url('/ep1.mp3')},x\n")
    server.routes["/bad.rss"] = file_route(b"<rss><channel><item>", "application/rss+xml")
    text = dag_text(tmp_path / "run", f'      url_lists: ["{lst}"]\n'
                                      f'      feeds: ["{server.url("/bad.rss")}", '
                                      f'"{server.url("/nofeed.rss")}"]')
    run(dagmod.loads(text), progress=False)
    store = RunStore(tmp_path / "run")
    outs = store.read_outputs("download").to_pylist()
    assert sorted(json.loads(o["meta"])["speaker"] for o in outs) == ["host1", "x"]
    reasons = sorted(r["reason"] for r in store.read_rejects("download").to_pylist())
    assert reasons == ["bad_feed", "feed_not_found"]


def test_ytdlp_generic_extractor_and_archive(server: FaultServer, tmp_path: Path) -> None:
    archive = tmp_path / "archive.txt"
    w = (f'      ytdlp: ["{server.url("/ep0.mp3")}"]\n'
         f'      ytdlp_options: {{archive: "{archive}", format: "bestaudio/best"}}')
    run(dagmod.loads(dag_text(tmp_path / "a", w)), progress=False)
    outs = RunStore(tmp_path / "a").read_outputs("download").to_pylist()
    assert len(outs) == 1
    assert hashlib.sha256(EP[0]).hexdigest() == outs[0]["sha256"]
    assert archive.read_text().split() == ["generic", "ep0"]
    hits = server.hits("/ep0.mp3")
    # another crawl with the same archive fetches nothing again
    run(dagmod.loads(dag_text(tmp_path / "b", w)), progress=False)
    rej = RunStore(tmp_path / "b").read_rejects("download").to_pylist()
    assert [r["reason"] for r in rej] == ["archived"]
    assert server.hits("/ep0.mp3") - hits <= 1  # at most yt-dlp's metadata probe


def test_ytdlp_options_are_an_allow_list(tmp_path: Path) -> None:
    w = ('      ytdlp: ["http://127.0.0.1:1/x"]\n'
         '      ytdlp_options: {exec: "rm -rf /"}')
    with pytest.raises(ConfigError, match=r"stage 'download'.*ytdlp_options.exec"):
        dagmod.loads(dag_text(tmp_path, w))


def test_sigkill_mid_download_resumes_with_range(tmp_path: Path) -> None:
    big = mp3(60.0, seed=7)

    def slow_file(req) -> None:  # 64 KiB/s so the kill lands mid-file; honours Range
        rng = req.header("Range")
        start = int(rng.split("=")[1].split("-")[0]) if rng else 0
        body = big[start:]
        hdrs = {"Content-Length": len(body), "ETag": '"big1"', "Accept-Ranges": "bytes",
                "Content-Type": "audio/mpeg"}
        if start:
            hdrs["Content-Range"] = f"bytes {start}-{len(big) - 1}/{len(big)}"
        req.send_head(206 if start else 200, hdrs)
        for i in range(0, len(body), 8192):
            if not req.write(body[i:i + 8192]):
                return
            if not start:
                req.sleep(0.12)

    with FaultServer({"/big.mp3": slow_file}) as srv:
        dag = tmp_path / "dag.yaml"
        dag.write_text(dag_text(tmp_path / "run", f'      urls: ["{srv.url("/big.mp3")}"]')
                       .replace("read_timeout_s: 0.5", "read_timeout_s: 5")
                       .replace("max_bytes: 100000", "max_bytes: 10000000"))
        cmd = [sys.executable, "-m", "speechmill.pipeline.cli", "run", str(dag),
               "--no-progress"]
        proc = subprocess.Popen(cmd, env=cli_env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        media = tmp_path / "run" / "media" / "download"
        deadline = time.monotonic() + 60
        part_size = 0
        while time.monotonic() < deadline and proc.poll() is None:
            parts = list(media.rglob("*.part")) if media.exists() else []
            if parts and parts[0].stat().st_size > len(big) // 4:
                part_size = parts[0].stat().st_size
                os.kill(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.02)
        proc.wait(timeout=30)
        assert part_size > 0, "the download finished before the kill"
        r = subprocess.run(cmd, env=cli_env(), capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
        ranges = [h for h in srv.range_headers("/big.mp3") if h]
        assert ranges and int(ranges[0].split("=")[1].split("-")[0]) >= part_size // 2
    outs = RunStore(tmp_path / "run").read_outputs("download").to_pylist()
    assert len(outs) == 1 and outs[0]["sha256"] == hashlib.sha256(big).hexdigest()
    assert outs[0]["resumed"] is True
    assert hashlib.sha256(Path(outs[0]["audio_path"]).read_bytes()).hexdigest() == \
        outs[0]["sha256"]


def test_drip_feeding_server_times_out(server: FaultServer, tmp_path: Path) -> None:
    def drip(req) -> None:
        req.send_head(200, {"Content-Length": 100000, "Content-Type": "audio/mpeg"})
        req.write(b"ID3\x04\x00\x00\x00\x00\x00\x00")
        for _ in range(200):
            if not req.write(b"\x00") or not req.sleep(0.05):
                return

    server.routes["/drip.mp3"] = drip
    w = (f'      urls: ["{server.url("/drip.mp3")}"]\n'
         "      min_speed_bps: 1000\n      slow_window_s: 1.0")
    t0 = time.monotonic()
    # the server's failure (transient) on every row of the stage: the run fails
    with pytest.raises(ErrorBudgetExceeded, match="timeout"):
        run(dagmod.loads(dag_text(tmp_path / "run", w).replace("max_retries: 2",
                                                               "max_retries: 0")),
            progress=False)
    assert time.monotonic() - t0 < 8
    rej = RunStore(tmp_path / "run").read_rejects("download").to_pylist()
    assert [r["reason"] for r in rej] == ["timeout"] and "slower than" in rej[0]["detail"]
    assert rej[0]["kind"] == "transient"


def test_remote_url_list_cannot_name_local_files(server: FaultServer, tmp_path: Path) -> None:
    secret = tmp_path / "secret.mp3"
    secret.write_bytes(EP[0])
    server.routes["/list.txt"] = file_route(
        f"{server.url('/ep1.mp3')}\nfile://{secret}\nsimplecache::{server.url('/x')}\n"
        .encode(), "text/plain")
    run(dagmod.loads(dag_text(tmp_path / "run",
                              f'      url_lists: ["{server.url("/list.txt")}"]')),
        progress=False)
    store = RunStore(tmp_path / "run")
    assert [o["source_url"] for o in store.read_outputs("download").to_pylist()] == [
        server.url("/ep1.mp3")]
    assert sorted(r["reason"] for r in store.read_rejects("download").to_pylist()) == [
        "bad_url", "bad_url"]


def test_resume_uses_the_first_plan_even_if_the_feed_is_gone(server: FaultServer,
                                                             tmp_path: Path) -> None:
    items = [("a", "/ep0.mp3"), ("b", "/ep1.mp3")]
    server.routes["/mini.rss"] = file_route(rss(server.base, items), "application/rss+xml")
    dag = dagmod.loads(dag_text(tmp_path / "run", f'      feeds: ["{server.url("/mini.rss")}"]'))
    store = RunStore(tmp_path / "run")
    run(dag, progress=False)
    want = sorted(o["id"] for o in store.read_outputs("download").to_pylist())
    # crash simulation: lose one committed part and the markers, and the feed goes away
    for p in store.output_parts("download"):
        p.unlink()
    for sid in ("download", "standardize"):
        (tmp_path / "run" / "stages" / sid / "_SUCCESS").unlink()
    server.routes["/mini.rss"] = lambda req: req.send(500, b"down")
    run(dag, progress=False)
    assert sorted(o["id"] for o in store.read_outputs("download").to_pylist()) == want
    assert store.read_rejects("download").num_rows == 0


def test_stored_urls_carry_no_credentials() -> None:
    from speechmill.stages.download import redact_url

    u = redact_url("https://user:pw@cdn.example.org/a.mp3?X-Amz-Signature=abc&ep=3&token=t")
    assert "pw" not in u and "abc" not in u and "=t" not in u and "ep=3" in u


def test_fsspec_objects_and_globs(tmp_path: Path) -> None:
    import fsspec

    mem = fsspec.filesystem("memory")
    for i in range(3):
        mem.pipe(f"/bucket/show/ep{i}.mp3", EP[i])
    mem.pipe("/bucket/show/notes.txt", b"not audio")
    text = dag_text(tmp_path / "run", '      fsspec: ["memory://bucket/show/*.mp3", '
                                      '"memory://bucket/show/missing.mp3"]')
    run(dagmod.loads(text), progress=False)
    store = RunStore(tmp_path / "run")
    outs = store.read_outputs("download").to_pylist()
    assert sorted(o["sha256"] for o in outs) == sorted(
        hashlib.sha256(EP[i]).hexdigest() for i in range(3))
    assert [r["reason"] for r in store.read_rejects("download").to_pylist()] == ["not_found"]


def test_shipped_podcast_dag_crawls_a_feed(server: FaultServer, tmp_path: Path) -> None:
    items = [("a", "/ep0.mp3"), ("b", "/ep1.mp3"), ("c", "/episode.mp3")]
    server.routes["/pod.rss"] = file_route(rss(server.base, items), "application/rss+xml")
    root = Path(__file__).resolve().parents[2]
    env = {**cli_env(), "FEED": server.url("/pod.rss")}
    r = subprocess.run(
        [sys.executable, "-m", "speechmill.pipeline.cli", "run", str(root / "dags/podcast.yaml"),
         "--run-dir", str(tmp_path / "run"), "--executor", "local",
         "--set", "download.allow_private=[127.0.0.1]"],
        capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    store = RunStore(tmp_path / "run")
    std = store.read_outputs("standardize").to_pylist()
    assert sorted(o["title"] for o in std) == ["a", "b"]
    assert all(sf.info(o["audio_path"]).samplerate == 24000 for o in std)
    assert [x["reason"] for x in store.read_rejects("download").to_pylist()] == ["not_audio"]
    assert "127.0.0.1:" in r.stdout and "files" in r.stdout  # per-host summary line
