"""fsspec inputs: an HTTP server on 127.0.0.1 and file:// URLs, through ingest + standardize."""

from __future__ import annotations

import functools
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import soundfile as sf

from speechmill.pipeline import dag as dagmod
from speechmill.pipeline.runner import run
from speechmill.pipeline.store import RunStore


@pytest.fixture
def http_root(media_dir) -> Iterator[str]:
    d, _, _ = media_dir

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    handler = functools.partial(Quiet, directory=str(d))
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()


def test_http_and_file_urls(http_root: str, media_dir, tmp_path: Path) -> None:
    d, good, _ = media_dir
    inputs = [f"{http_root}/good/speech.mp3", f"{http_root}/good/speech.flac",
              f"{http_root}/bad/episode.mp3", f"{http_root}/missing.wav",
              f"file://{d}/good/speech.ogg"]
    dag = dagmod.loads(f"""
name: remote
run_dir: {tmp_path / 'run'}
executor: {{type: local}}
stages:
  - {{id: ingest, uses: ingest, with: {{inputs: {inputs}}}}}
  - {{id: standardize, uses: standardize, needs: ingest, with: {{sample_rate: 16000}}}}
""")
    run(dag, progress=False)
    store = RunStore(tmp_path / "run")
    outs = {r["source_url"]: r for r in store.read_outputs("standardize").to_pylist()}
    # file:// URLs are recorded as the local path they name
    assert set(outs) == {inputs[0], inputs[1], str(d / "good" / "speech.ogg")}
    for url, r in outs.items():
        name = url.rsplit("/", 1)[1]
        info = sf.info(r["audio_path"])
        assert info.samplerate == 16000 and info.channels == 1
        assert info.duration == pytest.approx(good[name]["duration"], rel=0.03, abs=0.08)
    rej = {r["source_url"]: r["reason"] for r in store.read_rejects("ingest").to_pylist()}
    assert rej == {inputs[2]: "not_audio", inputs[3]: "unreadable"}
