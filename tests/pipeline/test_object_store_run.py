"""A DAG run whose run directory and inputs are on object storage: an S3 server (moto's
server mode, the S3 HTTP API) on 127.0.0.1, credentials only in the environment.

A reduced copy of the demo DAG (ingest -> standardize -> diarize -> segment -> split ->
lhotse + parquet exports) over real speech: a first run is SIGKILLed in the middle of
diarize (a model stage reading the media standardize uploaded), a second run started
while the first holds the lease is refused, and the resumed run ends with the same
segments, splits and exports as an uninterrupted run with a local run directory over the
same inputs. The exports load from the bucket through fsspec (lhotse, ``datasets``), and
no object holds a credential.
"""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

_KEY, _SECRET = "AKIAOBJRUNFAKEKEY01", "0bj-run-s3cr3t-fake-credential"
SPEECHMILL = [sys.executable, "-m", "speechmill.pipeline.cli"]
ROOT = Path(__file__).resolve().parents[2]
N_FILES = 4

_DAG = """
name: objdemo
run_dir: {run_dir}
executor: {{type: local, stall_timeout_s: 300}}
stages:
  - {{id: ingest, uses: ingest, with: {{inputs: ["{inputs}"]}}}}
  - {{id: standardize, uses: standardize, needs: [ingest], batch_size: 2,
      with: {{sample_rate: 16000, loudness: dbfs, target_dbfs: -20.0}}}}
  - {{id: diarize, uses: diarize, needs: [standardize], batch_size: 1}}
  - {{id: segment, uses: segment, needs: [diarize], with: {{min_s: 1.0}}}}
  - {{id: split, uses: split, needs: [segment],
      with: {{dev_fraction: 0.2, test_fraction: 0.2}}}}
  - {{id: lhotse, uses: lhotse, needs: [split]}}
  - {{id: parquet, uses: parquet, needs: [split]}}
"""


def _env(endpoint: str, tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AWS_", "RAY_ADDRESS"))}
    env.update(AWS_ACCESS_KEY_ID=_KEY, AWS_SECRET_ACCESS_KEY=_SECRET,
               AWS_ENDPOINT_URL=endpoint, AWS_DEFAULT_REGION="us-east-1",
               AWS_EC2_METADATA_DISABLED="true", SPEECHMILL_LEASE_TTL_S="4",
               PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT),
               TMPDIR=str(tmp))  # the runs' local cache of media: under the test's dir
    return env


def _fs(endpoint: str) -> Any:
    import s3fs

    return s3fs.S3FileSystem(key=_KEY, secret=_SECRET, skip_instance_cache=True,
                             client_kwargs={"endpoint_url": endpoint,
                                            "region_name": "us-east-1"})


def _run(dag: Path, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([*SPEECHMILL, "run", str(dag), "--offline", "--no-progress"],
                          env=env, cwd=cwd, capture_output=True, text=True, timeout=1200)


def _segments(store: Any) -> list[tuple]:
    t = store.read_outputs("split", ["id", "parent_id", "offset", "duration", "speaker",
                                     "split"])
    return sorted(zip(*(t.column(c).to_pylist() for c in t.column_names), strict=True))


@pytest.mark.slow
@pytest.mark.timeout(1500)  # four CLI runs (one refused) of a DAG with two model stages
def test_demo_dag_on_s3_sigkill_resume_exports(s3_server: str, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import tempfile

    import soundfile as sf

    from speechmill.pipeline.store import ObjectRunStore, RunStore
    from tests.audio_factory import load_speech

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = _env(s3_server, tmp)
    for k, v in env.items():
        if k.startswith("AWS_"):
            monkeypatch.setenv(k, v)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    fs = _fs(s3_server)
    bucket = f"objrun-{uuid.uuid4().hex[:10]}"
    fs.call_s3("create_bucket", Bucket=bucket)
    local_in = tmp_path / "in"
    local_in.mkdir()
    for i in range(N_FILES):
        sf.write(local_in / f"talk{i}.flac", load_speech(3.0 + i % 2, 16000, seed=10 + i),
                 16000)
    (local_in / "notes.wav").write_bytes(b"this is not audio at all" * 40)  # -> reject
    fs.put(str(local_in) + "/", f"{bucket}/in/", recursive=True)
    inputs = f"s3://{bucket}/in/"
    url = f"s3://{bucket}/runs/demo"
    cwd = tmp_path / "cwd"
    cwd.mkdir()

    # 1. the reference: an uninterrupted run with a local run directory, same inputs
    ref_dag = tmp_path / "ref.yaml"
    ref_dag.write_text(_DAG.format(run_dir=tmp_path / "ref", inputs=inputs))
    r = _run(ref_dag, env, cwd)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ref = RunStore(tmp_path / "ref")

    # 2. the run on the bucket, SIGKILLed in the middle of diarize
    dag = tmp_path / "s3.yaml"
    dag.write_text(_DAG.format(run_dir=url, inputs=inputs))
    store = RunStore(url)
    assert isinstance(store, ObjectRunStore)
    # its lease lives 30 s after the kill: long enough for the second run below to find
    # it held, whenever that run gets to look (the resume then waits for it to expire)
    p = subprocess.Popen([*SPEECHMILL, "run", str(dag), "--offline", "--no-progress"],
                         env={**env, "SPEECHMILL_LEASE_TTL_S": "30"}, cwd=cwd,
                         stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    killed_mid_stage = False
    second: subprocess.Popen | None = None
    try:
        deadline = time.time() + 900  # minutes on a loaded 2-CPU machine; seconds idle
        while time.time() < deadline and p.poll() is None:
            if second is None and store._get(store._p("run.lock")) is not None:
                # a second run on the same prefix while the first holds the lease (started
                # beside it, so the watch for the kill goes on meanwhile)
                second = subprocess.Popen(
                    [*SPEECHMILL, "run", str(dag), "--offline", "--no-progress"],
                    env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                    text=True)
            if store.output_parts("diarize") and not store.is_done("diarize"):
                os.kill(p.pid, signal.SIGKILL)
                killed_mid_stage = True
                break
            time.sleep(0.05)
    finally:
        if p.poll() is None:
            p.kill()
        out = p.communicate()[0]
    assert second is not None
    refused_err = second.communicate(timeout=600)[1]
    assert killed_mid_stage, out[-3000:]
    assert second.returncode != 0
    assert "in use by pid" in refused_err, refused_err[-2000:]
    # standardize -> diarize -> segment run fused: standardize may still have files to do
    assert not store.is_done("diarize")
    n_before = len(store.output_parts("diarize"))
    assert 1 <= n_before < N_FILES
    assert not (cwd / "s3:").exists() and list(cwd.iterdir()) == []  # nothing local

    # media went up with standardize's batches; rows name the objects
    std = store.read_outputs("standardize", ["audio_path"]).column("audio_path").to_pylist()
    assert n_before <= len(std) <= N_FILES
    assert all(a.startswith(f"{url}/media/standardize/") and fs.exists(a) for a in std)

    # 3. resume once the dead run's lease (4 s here) has expired
    lease = json.loads(fs.cat_file(f"{bucket}/runs/demo/run.lock"))
    time.sleep(max(0.0, lease["expires"] - time.time()) + 0.5)
    r = _run(dag, env, cwd)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    info = store.read_run()
    assert info["status"] == "succeeded" and info["attempt"] == 2
    assert not fs.exists(f"{bucket}/runs/demo/run.lock")  # released

    # identical outputs: segments (ids, spans, speakers) and splits, no duplicate
    segs = _segments(store)
    assert segs == _segments(ref) and len(segs) >= N_FILES
    assert len({s[0] for s in segs}) == len(segs)
    for sid in ("ingest", "standardize", "diarize", "segment", "split"):
        assert store.count_rows(sid) == ref.count_rows(sid), sid
    assert store.read_rejects("ingest").column("reason").to_pylist() == ["not_audio"]
    m = store.read_metrics("lhotse")
    assert m["output_dir"] == f"{url}/exports/lhotse" and m["rows_rejected"] == 0
    assert m["rows_out"] == ref.read_metrics("lhotse")["rows_out"] == len(segs)

    # 4. exports load from the bucket through fsspec: lhotse (audio from the bucket too)
    from lhotse import CutSet

    splits = sorted(x.rsplit("/", 1)[1] for x in fs.ls(f"{bucket}/runs/demo/exports/lhotse")
                    if fs.isdir(x))
    assert splits == sorted(set(s[5] for s in segs))
    n_cuts = 0
    for split in splits:
        with fs.open(f"{bucket}/runs/demo/exports/lhotse/{split}/cuts.jsonl.gz", "rb") as f, \
                gzip.open(f, "rt") as lines:
            cuts = CutSet.from_dicts([json.loads(x) for x in lines])
        n_cuts += len(cuts)
        cut = next(iter(cuts))
        src = cut.recording.sources[0]
        assert src.type == "url" and src.source.startswith(f"{url}/media/standardize/")
        audio = cut.load_audio()
        assert audio.shape[-1] == pytest.approx(cut.duration * cut.sampling_rate, abs=2)
        assert float(abs(audio).max()) > 0.01
    assert n_cuts == len(segs)

    # ... and datasets (parquet with the audio inside); its offline switch (set for the
    # whole suite) also bars fsspec URLs: this one is a server on 127.0.0.1
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)

    ds = datasets.load_dataset(
        "parquet", data_files={s: f"{url}/exports/parquet/data/{s}-*.parquet" for s in splits},
        storage_options={"key": _KEY, "secret": _SECRET,
                         "client_kwargs": {"endpoint_url": s3_server}},
        cache_dir=str(tmp_path / "hf"))
    assert sorted(ds) == splits
    got = sorted(i for s in splits for i in ds[s]["id"])
    assert got == sorted(s[0] for s in segs)

    # 5. `speechmill status` reads the run from the bucket
    st = subprocess.run([*SPEECHMILL, "status", url, "--json"], env=env, cwd=cwd,
                        capture_output=True, text=True, timeout=600)
    assert st.returncode == 0, st.stderr
    rep = json.loads(st.stdout)
    assert rep["run"]["status"] == "succeeded"
    assert {r["stage"]: r["state"] for r in rep["stages"]} == {
        s: "done" for s in ("ingest", "standardize", "diarize", "segment", "split",
                            "lhotse", "parquet")}

    # 6. no credential in any object written, no temp objects left
    objs = fs.find(f"{bucket}/runs/demo")
    assert not [o for o in objs if o.rsplit("/", 1)[1].startswith(".")]
    for o in objs:
        body = fs.cat_file(o)
        assert _KEY.encode() not in body and _SECRET.encode() not in body, o
    # standardize wrote its media to the local cache; every file went with the uploads
    cache = store.scratch_dir() / "media" / "standardize"
    assert cache.is_dir() and not [x for x in cache.rglob("*") if x.is_file()]


def test_file_url_run_dir_goes_through_the_object_store(tmp_path: Path) -> None:
    """A ``file://`` run dir takes the object-store path (fsspec's local filesystem, no
    server): media made in the local cache, uploaded with the batch, rows naming the
    URL; exports published file by file; rerun does nothing; status reads it."""
    import soundfile as sf

    from speechmill.pipeline import dag as dagmod
    from speechmill.pipeline.runner import run
    from speechmill.pipeline.store import ObjectRunStore, RunStore, local_cache_dir
    from tests.audio_factory import load_speech

    local_in = tmp_path / "in"
    local_in.mkdir()
    for i in range(2):
        sf.write(local_in / f"a{i}.wav", load_speech(1.5, 16000, seed=i), 16000)
    url = f"file://{tmp_path}/bucket/run"
    text = f"""
name: filerun
run_dir: {url}
executor: {{type: local}}
stages:
  - {{id: ingest, uses: ingest, with: {{inputs: ["{local_in}"]}}}}
  - {{id: standardize, uses: standardize, needs: [ingest], batch_size: 1,
      with: {{sample_rate: 16000}}}}
  - {{id: parquet, uses: parquet, needs: [standardize]}}
  - {{id: report, uses: report, needs: [parquet]}}
"""
    from speechmill.pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match="object storage") as ei:  # refused up front
        run(dagmod.loads(text), progress=False)
    assert ei.value.stage == "report"
    assert not (tmp_path / "bucket").exists()
    d = dagmod.loads(text.split("  - {id: report")[0])
    assert run(d, progress=False).status == "succeeded"
    store = RunStore(url)
    assert isinstance(store, ObjectRunStore)
    paths = store.read_outputs("standardize", ["audio_path"]).column("audio_path").to_pylist()
    assert len(paths) == 2
    for pth in paths:
        assert pth.startswith(f"{url}/media/standardize/")
        assert Path(pth[len("file://"):]).is_file()
    assert not [x for x in (local_cache_dir(url) / "media").rglob("*") if x.is_file()]
    m = store.read_metrics("parquet")
    assert m["output_dir"] == f"{url}/exports/parquet" and m["rows_out"] == 2
    assert (tmp_path / "bucket/run/exports/parquet/README.md").is_file()
    assert not list((tmp_path / "bucket/run").rglob(".*"))  # no temp or partial names
    again = run(d, progress=False)
    assert [s["state"] for s in again.stages] == ["done earlier"] * 3
    from speechmill.pipeline.report import status_rows

    info, rows = status_rows(url)
    assert info["status"] == "succeeded" and [r["state"] for r in rows] == ["done"] * 3
