"""Run directories named by URL (``s3://bucket/run``).

A URL run dir goes to the object store (a :class:`RunStore` over its filesystem); one the store cannot
write to (an unknown scheme, a filesystem whose package is missing, an fsspec chain) is
refused before any work starts, never taken as a relative local path (which used to create
a directory named ``s3:`` under the working directory). A whole DAG run on a bucket is in
``test_object_store_run.py``."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from speechmill.pipeline import dag as dagmod
from speechmill.pipeline.errors import ConfigError
from speechmill.pipeline.store import RunStore
from speechmill.pipeline.store.layout import is_url

_DAG = """
name: t
run_dir: {run_dir}
executor: {{type: local}}
stages:
  - id: ingest
    uses: ingest
    with: {{inputs: [{inputs}]}}
"""


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


_REFUSED = ["nosuchfs://bucket/run", "simplecache::s3://b/p"] + [
    u for u, mod in (("gs://b/p", "gcsfs"), ("abfs://c@acct/p", "adlfs"))
    if not _installed(mod)]


@pytest.mark.parametrize("url", _REFUSED)
def test_url_run_dir_refused_by_dag(url: str, tmp_path: Path) -> None:
    """Unknown schemes, filesystems that are not installed and fsspec chains."""
    with pytest.raises(ConfigError) as ei:
        dagmod.loads(_DAG.format(run_dir=url, inputs=tmp_path))
    assert ei.value.key == "run_dir"
    assert "run_dir" in str(ei.value) and url in str(ei.value)
    assert any(w in str(ei.value) for w in ("unknown filesystem", "not installed", "chain"))
    # the --run-dir override and -o run_dir=... go through the same check
    with pytest.raises(ConfigError, match="run_dir"):
        dagmod.loads(_DAG.format(run_dir=tmp_path / "r", inputs=tmp_path), run_dir=url)
    with pytest.raises(ConfigError, match="run_dir"):
        dagmod.loads(_DAG.format(run_dir=tmp_path / "r", inputs=tmp_path),
                     overrides=[f"run_dir={url}"])
    with pytest.raises(ConfigError, match="run_dir"):
        RunStore(url)


@pytest.mark.parametrize("url", ["s3://bucket/run", "file:///tmp/speechmill-x/run"])
def test_url_run_dir_of_a_known_filesystem_is_an_object_store(url: str,
                                                              tmp_path: Path) -> None:
    from speechmill.pipeline.store import open_store

    d = dagmod.loads(_DAG.format(run_dir=url, inputs=tmp_path))
    assert d.run_dir == url
    for st in (RunStore(url), open_store(url)):  # never a local path named `s3:`
        assert not st.local and st.root == url


def test_local_paths_are_not_urls(tmp_path: Path) -> None:
    for p in ["runs/demo", "/abs/run", "./s3-like", "C:\\runs\\x", "weird:name/run",
              tmp_path]:
        assert not is_url(p), p
    d = dagmod.loads(_DAG.format(run_dir=tmp_path / "r", inputs=tmp_path))
    assert RunStore(d.run_dir).root == tmp_path / "r"


def test_cli_refuses_unknown_url_run_dir_and_writes_nothing(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    dag = tmp_path / "d.yaml"
    dag.write_text(_DAG.format(run_dir="runs/x", inputs=tmp_path / "in"))
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    r = subprocess.run([sys.executable, "-m", "speechmill.pipeline.cli", "run", str(dag),
                        "--run-dir", "nosuchfs://bucket/run"],
                       cwd=cwd, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert r.returncode == 2, r.stderr
    assert "key 'run_dir'" in r.stderr and "nosuchfs://bucket/run" in r.stderr
    assert os.listdir(cwd) == []  # no `nosuchfs:` directory, nothing at all


@pytest.mark.parametrize("uses", ["sft_import", "speech_rewrite", "dialogue_generate",
                                  "voice_bank", "tts"])
def test_stages_that_keep_local_files_are_refused_on_a_url_run_dir(
        uses: str, tmp_path: Path) -> None:
    """Stages that keep caches or a published bank under the run dir by local path stop
    before anything runs (they would write a local ``s3:`` directory), naming the stage."""
    from types import SimpleNamespace

    from speechmill.pipeline.registry import get
    from speechmill.pipeline.runner import check_store_support

    cls = get(uses)
    assert cls.local_run_dir_only
    url = "file:///nonexistent/run"
    dag = SimpleNamespace(run_dir=url, stages=[
        SimpleNamespace(id="ingest", spec=SimpleNamespace(uses="ingest"), cls=get("ingest")),
        SimpleNamespace(id="the_stage", spec=SimpleNamespace(uses=uses), cls=cls)])
    with pytest.raises(ConfigError) as ei:
        check_store_support(dag, RunStore(url))  # type: ignore[arg-type]
    assert "stage 'the_stage', key 'run_dir'" in str(ei.value)
    assert "object storage" in str(ei.value)


# -- the store's object-storage half, against a real S3 server (moto) on 127.0.0.1 -------
# The commit semantics and the lock, store by store (a whole run: test_object_store_run.py).

_KEY, _SECRET = "AKIAFAKEFAKEFAKE", "s3cr3t-fake-credential-1234"


def _opts(endpoint: str) -> dict[str, Any]:
    return {"key": _KEY, "secret": _SECRET,
            "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}}


@pytest.fixture
def bucket(s3_server: str) -> str:
    import s3fs

    fs = s3fs.S3FileSystem(**_opts(s3_server))
    name = f"run-{uuid.uuid4().hex[:12]}"
    fs.call_s3("create_bucket", Bucket=name)
    return name


def _table(ids: list[str]) -> pa.Table:
    return pa.table({"id": [f"{i}.o" for i in ids], "parent_id": ids,
                     "text": [f"words of {i}" for i in ids]})


def test_object_store_parts_markers_and_listings(s3_server: str, bucket: str) -> None:

    st = RunStore(f"s3://{bucket}/runs/a", _opts(s3_server))
    st.write_outputs("asr", "0001", _table(["a", "b"]))
    st.write_outputs("asr", "0002", _table(["c"]))
    st.write_rejects("asr", "0001", pa.table({"id": ["d"], "stage": ["asr"],
                                              "reason": ["bad_audio"], "detail": ["x"]}))
    # what resume must not take for a part: dot/tmp names, and an upload still in flight
    st.fs.pipe_file(f"{bucket}/runs/a/stages/asr/.part-0003.parquet.tmp", b"partial")
    mpu = st.fs.call_s3("create_multipart_upload", Bucket=bucket,
                        Key="runs/a/stages/asr/part-0004.parquet")
    st.fs.call_s3("upload_part", Bucket=bucket, Key="runs/a/stages/asr/part-0004.parquet",
                  UploadId=mpu["UploadId"], PartNumber=1, Body=b"PAR1 half a file")
    assert [p.rsplit("/", 1)[1] for p in st.output_parts("asr")] == \
        ["part-0001.parquet", "part-0002.parquet"]
    assert st.consumed_ids("asr") == {"a", "b", "c", "d"}
    assert st.count_rows("asr") == (3, 1)
    assert st.read_outputs("asr", ["parent_id", "nope"]).column_names == ["parent_id"]
    assert st.read_rejects("asr").column("reason").to_pylist() == ["bad_audio"]
    assert not st.is_done("asr") and st.read_metrics("asr") is None
    st.write_fingerprint("asr", "fp1")
    st.write_metrics("asr", {"rows_out": 3})
    st.mark_done("asr")
    assert st.is_done("asr") and st.read_metrics("asr") == {"rows_out": 3}
    assert st.read_fingerprint("asr") == "fp1"
    assert st.add_wall_seconds("asr", 1.5) == 1.5 and st.add_wall_seconds("asr", 2) == 3.5
    st.write_run({"status": "done"})
    # another process (a fresh filesystem object, no shared cache) sees the same
    again = RunStore(f"s3://{bucket}/runs/a/", _opts(s3_server))
    assert again.read_run() == {"status": "done"} and again.is_done("asr")
    # media and exports: finished local files uploaded whole, markers last
    local = again.scratch_dir() / "exp"
    (local / "cuts").mkdir(parents=True, exist_ok=True)
    (local / "cuts" / "a.jsonl").write_text("{}\n")
    (local / "_SUCCESS").write_text("")
    url = again.put_dir(local, again.layout.at("exports", "lhotse"))
    assert url == f"s3://{bucket}/runs/a/exports/lhotse"
    assert st.fs.cat_file(f"{bucket}/runs/a/exports/lhotse/cuts/a.jsonl") == b"{}\n"
    shutil.rmtree(again.scratch_dir())
    # no credential in any object written
    for p in st.fs.find(f"{bucket}/runs/a"):
        assert _SECRET.encode() not in st.fs.cat_file(p) and _KEY.encode() not in \
            st.fs.cat_file(p), p


_WRITER = """
import sys, pyarrow as pa
from speechmill.pipeline.store import RunStore
url, endpoint = sys.argv[1], sys.argv[2]
st = RunStore(url, {"key": "k", "secret": "s",
                          "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}})
big = "x" * 40_000
with st.lock(ttl_s=float(sys.argv[3])):
    print("locked", flush=True)
    for n in range(10_000):
        ids = [f"{n}-{i}" for i in range(50)]
        st.write_outputs("seg", f"{n:05d}", pa.table({"parent_id": ids, "blob": [big] * 50}))
        print(n, flush=True)
"""


def test_object_store_sigkill_mid_write_and_lease(s3_server: str, bucket: str) -> None:
    """A writer SIGKILLed mid-stage leaves only whole parts; while it lives a second run is
    refused, once it is dead the next run on this host takes its lease over at once (no
    wait for the expiry); another host's lease is taken over once it expired."""
    import socket

    from speechmill.pipeline.errors import RunLockedError

    url = f"s3://{bucket}/runs/k"
    p = subprocess.Popen([sys.executable, "-c", _WRITER, url, s3_server, "60"],
                         stdout=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONPATH": os.getcwd()})
    try:
        assert p.stdout is not None
        assert p.stdout.readline().strip() == "locked"
        for _ in range(3):  # a few parts committed, the next one mid-upload
            p.stdout.readline()
        with pytest.raises(RunLockedError, match=f"in use by pid {p.pid} .*still running "
                           "on this host"), RunStore(url, _opts(s3_server)).lock():
            pass
        os.kill(p.pid, signal.SIGKILL)
    finally:
        p.kill()
        p.wait()
    st = RunStore(url, _opts(s3_server))
    parts = st.output_parts("seg")
    assert len(parts) >= 3
    ids = st.consumed_id_array("seg").to_pylist()
    assert len(ids) == 50 * len(parts) and len(set(ids)) == len(ids)  # whole parts only
    lease = json.loads(st.fs.cat_file(st.layout.lock))
    assert lease["pid"] == p.pid and lease["expires"] > time.time() + 30  # still live
    with st.lock(ttl_s=30) as lk:  # its pid is gone: taken over at once
        assert lk.took_over.startswith(f"took over the lease of pid {p.pid} on ")
        assert json.loads(st.fs.cat_file(lk.path))["owner"] == lk.owner
    assert not st.fs.exists(st.layout.lock)  # released
    # another host's lease: refused while live, taken over once expired
    now = time.time()
    other = {"owner": "o", "pid": 1, "host": f"not-{socket.gethostname()}", "since": now}
    st.fs.pipe_file(st.layout.lock, json.dumps({**other, "expires": now + 60}).encode())
    with pytest.raises(RunLockedError, match="--break-lease"), st.lock():
        pass
    st.fs.pipe_file(st.layout.lock, json.dumps({**other, "expires": now - 1}).encode())
    with st.lock(ttl_s=30) as lk:
        assert lk.took_over == ""
    assert not st.fs.exists(st.layout.lock)


def test_object_store_lock_one_of_two_concurrent(s3_server: str, bucket: str) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from speechmill.pipeline.errors import RunLockedError

    url = f"s3://{bucket}/runs/c"
    locks = [RunStore(url, _opts(s3_server)).lock(ttl_s=1.5) for _ in range(4)]

    def take(lk: Any) -> Any:
        try:
            lk.__enter__()
            return lk
        except RunLockedError:
            return None

    with ThreadPoolExecutor(4) as ex:
        won = [x for x in ex.map(take, locks) if x is not None]
    assert len(won) == 1
    time.sleep(2.5)  # longer than the ttl: the holder's renewals keep its lease alive
    assert not won[0].lost
    with pytest.raises(RunLockedError), RunStore(url, _opts(s3_server)).lock():
        pass
    won[0].__exit__(None, None, None)
    with RunStore(url, _opts(s3_server)).lock():
        pass


def test_object_store_media_uploaded_and_read_back_ranged(
        s3_server: str, bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Media a stage writes to the local media dir goes up with its batch's part; rows name
    the object's URL; audio.load_audio and read_unit read them from the bucket."""
    import numpy as np
    import soundfile as sf

    from speechmill.pipeline.audio import load_audio
    from speechmill.pipeline.store import open_store
    from speechmill.pipeline.store.parts import read_unit
    from testkit.audio import load_speech

    # workers get credentials from the environment, as on a cluster
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", _KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", _SECRET)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    url = f"s3://{bucket}/runs/m"
    st = open_store(url)
    assert not st.local
    media = st.local_media_dir("standardize")
    media.mkdir(parents=True, exist_ok=True)
    x = load_speech(3.0, 16000, seed=1)
    sf.write(media / "a.flac", x, 16000)
    st.write_outputs("standardize", "0001", pa.table(
        {"id": ["a"], "parent_id": ["a0"], "audio_path": [str(media / "a.flac")],
         "duration": [3.0]}))
    [part] = st.output_parts("standardize")
    row = read_unit(part).to_pylist()[0]
    assert row["audio_path"] == f"{url}/media/standardize/a.flac"
    assert not (media / "a.flac").exists()  # no local copy kept
    y, sr = load_audio(row["audio_path"], offset=1.0, duration=0.5)
    assert sr == 16000 and y.shape == (8000,)
    want, _ = sf.read(io.BytesIO(st.fs.cat_file(row["audio_path"])), dtype="float32")
    assert np.allclose(y, want[16000:24000], atol=1e-4)
    assert read_unit(part, columns=["id", "nope"]).column_names == ["id"]
    shutil.rmtree(st.scratch_dir())


def test_dialogue_sinks_read_upstream_reasons_from_object_storage(
        s3_server: str, bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A dialogue sink names why a missing turn is missing by reading the run's rejects;
    on object storage it reads them through the store, not as a local path."""
    from speechmill.pipeline.records import reject, rejects_table
    from speechmill.pipeline.store import open_store
    from speechmill.synth.text.dialogues import upstream_reasons

    for k, v in (("AWS_ACCESS_KEY_ID", _KEY), ("AWS_SECRET_ACCESS_KEY", _SECRET),
                 ("AWS_ENDPOINT_URL", s3_server), ("AWS_DEFAULT_REGION", "us-east-1")):
        monkeypatch.setenv(k, v)
    url = f"s3://{bucket}/runs/synth"
    st = open_store(url)
    st.write_rejects("tts", "p0", rejects_table(
        [reject({"id": "d1-002"}, "tts", "qc_wer", "wer 0.4"),
         reject({"id": "d2-000"}, "tts", "tts_error", "empty text")]))
    st.write_rejects("generate", "p0", rejects_table(
        [reject({"id": "d3-001"}, "generate", "llm_refusal", "")]))
    assert upstream_reasons(url, ["d1-002", "d3-001", "d9-000"]) == {
        "d1-002": "tts qc_wer", "d3-001": "generate llm_refusal"}
    assert upstream_reasons(f"s3://{bucket}/runs/nothing-here", ["d1-002"]) == {}
