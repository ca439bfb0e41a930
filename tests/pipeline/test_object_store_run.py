"""A DAG run whose run directory and inputs are on object storage: an S3 server (moto's
server mode, the S3 HTTP API) on 127.0.0.1, credentials only in the environment.

The full demo DAG (dags/demo.yaml: ingest -> standardize -> diarize -> segment ->
transcribe -> annotate -> link_speakers -> filter -> split, then the NeMo, tarred NeMo,
Lhotse, Parquet exports, tokenize -> shards + Lhotse Shar, and the report) over real
speech: a first run is SIGKILLed in the middle of diarize (a model stage reading the media
standardize uploaded), a second run started while the first holds the lease is refused,
the rerun takes the killed run's lease over at once (its pid is gone on this host),
and the resumed run ends with the same segments as an uninterrupted run with a local run
directory over the same inputs. Every export loads from the bucket through fsspec
(lhotse, ``datasets``, the NeMo manifest's audio, the token shards, the report), and no
object holds a credential.
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

DEMO = ROOT / "dags" / "demo.yaml"
#: the demo DAG with the in-process executor (no Ray start-up) and diarize one file a
#: batch (so the run can be killed between two of its parts)
DEMO_SET = ["--set", "executor.type=local", "--set", "executor.stall_timeout_s=300",
            "--set", "diarize.batch_size=1"]
#: the reference: the demo's stages up to segment, uninterrupted, with a local run dir
UPSTREAM = ("ingest", "standardize", "diarize", "segment")


def _reference_dag(run_dir: Path, inputs: str) -> str:
    import yaml

    raw = yaml.safe_load(DEMO.read_text())
    raw["run_dir"] = str(run_dir)
    raw["executor"] = {"type": "local", "stall_timeout_s": 300}
    raw["stages"] = [st for st in raw["stages"] if st["id"] in UPSTREAM]
    raw["stages"][0]["with"]["inputs"] = [inputs]
    raw["stages"][2]["batch_size"] = 1
    return yaml.safe_dump(raw)


def _demo_speech() -> list[tuple[Any, int]]:
    """N_FILES clips made as the demo's input is (offline): two sentences by the Piper
    voice, and two of the demo's guest files (eSpeak NG voices, two sentences each):
    three speakers, so the speaker-disjoint splits are not all train, and clean enough
    to pass the demo's filter."""
    import shutil

    import numpy as np
    import soxr

    from speechmill.stages.demo_data import GUEST_SENTENCES, GUESTS, SENTENCES, synthesize
    from speechmill.stages.demo_data import synthesize_espeak as espeak

    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (the demo's guest voices)")

    def at16k(x: Any, sr: int) -> Any:
        return soxr.resample(x, sr, 16000).astype(np.float32)

    out = [(at16k(*synthesize(SENTENCES[i])) * 0.5, 16000) for i in (1, 4)]
    for voice, pitch, _ in (GUESTS[0], GUESTS[6]):  # the demo's guest_*_00 files
        parts = [np.zeros(4000, np.float32)]
        for k, text in enumerate(GUEST_SENTENCES[0]):
            parts += [at16k(*espeak(text, voice, 150 + 10 * (k % 2), pitch)) * 0.5,
                      np.zeros(6400, np.float32)]
        out.append((np.concatenate(parts), 16000))
    return out


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


def _run(dag: Path, env: dict[str, str], cwd: Path, *args: str
         ) -> subprocess.CompletedProcess:
    return subprocess.run([*SPEECHMILL, "run", str(dag), "--offline", "--no-progress", *args],
                          env=env, cwd=cwd, capture_output=True, text=True, timeout=1200)


def _rows(store: Any, stage: str, cols: list[str]) -> list[tuple]:
    t = store.read_outputs(stage, cols)
    return sorted(zip(*(t.column(c).to_pylist() for c in cols), strict=True))


@pytest.mark.slow
@pytest.mark.timeout(1500)  # four CLI runs (one refused) of the demo DAG
def test_demo_dag_on_s3_sigkill_resume_exports(s3_server: str, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import tempfile

    import soundfile as sf

    from speechmill.pipeline.store import RunStore

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
    for i, (x, sr) in enumerate(_demo_speech()):
        sf.write(local_in / f"talk{i}.flac", x, sr)
    (local_in / "notes.wav").write_bytes(b"this is not audio at all" * 40)  # -> reject
    fs.put(str(local_in) + "/", f"{bucket}/in/", recursive=True)
    inputs = f"s3://{bucket}/in/"
    url = f"s3://{bucket}/runs/demo"
    cwd = tmp_path / "cwd"
    cwd.mkdir()

    # 1. the full demo DAG on the bucket, SIGKILLed in the middle of diarize
    ref_env = env
    env = {**env, "SPEECHMILL_DEMO_INPUT": inputs}
    cmd = [*SPEECHMILL, "run", str(DEMO), "--offline", "--no-progress", "--run-dir", url,
           *DEMO_SET]
    store = RunStore(url)
    assert not store.local
    # its lease lives 10 min after the kill, longer than this test: the rerun on this host
    # takes it over at once because its pid is gone (so the first run is killed only once
    # the second was refused)
    p = subprocess.Popen(cmd, env={**env, "SPEECHMILL_LEASE_TTL_S": "600"}, cwd=cwd,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    killed_mid_stage = False
    second: subprocess.Popen | None = None
    try:
        deadline = time.time() + 900  # minutes on a loaded 2-CPU machine; seconds idle
        while time.time() < deadline and p.poll() is None:
            if second is None and store.read_file(store.layout.lock) is not None:
                # a second run on the same prefix while the first holds the lease (started
                # beside it, so the watch for the kill goes on meanwhile)
                second = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, text=True)
            if (second is not None and second.poll() is not None
                    and store.output_parts("diarize") and not store.is_done("diarize")):
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
    # standardize -> ... -> annotate run fused: standardize may still have files to do
    assert not store.is_done("diarize")
    n_before = len(store.output_parts("diarize"))
    assert 1 <= n_before < N_FILES
    assert not (cwd / "s3:").exists() and list(cwd.iterdir()) == []  # nothing local

    # media went up with standardize's batches; rows name the objects
    std = store.read_outputs("standardize", ["audio_path"]).column("audio_path").to_pylist()
    assert n_before <= len(std) <= N_FILES
    assert all(a.startswith(f"{url}/media/standardize/") and fs.exists(a) for a in std)

    # 2. the reference (the dead run's lease still live meanwhile): the demo's stages up to
    # segment, uninterrupted, with a local run directory
    ref_dag = tmp_path / "ref.yaml"
    ref_dag.write_text(_reference_dag(tmp_path / "ref", inputs))
    r = _run(ref_dag, ref_env, tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ref = RunStore(tmp_path / "ref")

    # 3. resume: the dead run's lease (10 min from its last renewal) names a pid of this
    # host that is gone, so it is taken over at once; the whole DAG runs
    lease = json.loads(fs.cat_file(f"{bucket}/runs/demo/run.lock"))
    assert lease["pid"] == p.pid and lease["expires"] > time.time() + 60
    r = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"took over the lease of pid {p.pid}" in r.stderr, r.stderr[-3000:]
    info = store.read_run()
    assert info["status"] == "succeeded" and info["attempt"] == 2
    assert not fs.exists(f"{bucket}/runs/demo/run.lock")  # released

    # identical segments (ids, spans, speakers) to the local run, no duplicate
    cols = ["id", "parent_id", "offset", "duration", "speaker"]
    segs = _rows(store, "segment", cols)
    assert segs == _rows(ref, "segment", cols) and len(segs) >= N_FILES
    assert len({s[0] for s in segs}) == len(segs)
    for sid in UPSTREAM:
        assert store.count_rows(sid) == ref.count_rows(sid), sid
    assert store.read_rejects("ingest").column("reason").to_pylist() == ["not_audio"]
    # the dataset: split's rows (transcribed, annotated, filtered)
    data = _rows(store, "split", ["id", "split", "text", "audio_path", "offset", "duration"])
    assert data and all(d[2] for d in data)  # every kept row has a transcript
    ids = sorted(d[0] for d in data)
    assert set(ids) <= {s[0] for s in segs} and len(ids) == len(set(ids))
    splits = sorted({d[1] for d in data})
    m = store.read_metrics("lhotse")
    assert m["output_dir"] == f"{url}/exports/lhotse" and m["rows_rejected"] == 0
    assert m["rows_out"] == len(data)

    # 4. exports load from the bucket through fsspec: lhotse (audio from the bucket too)
    from lhotse import CutSet

    run_fs = f"{bucket}/runs/demo"
    assert sorted(x.rsplit("/", 1)[1] for x in fs.ls(f"{run_fs}/exports/lhotse")
                  if fs.isdir(x)) == splits
    n_cuts = 0
    for split in splits:
        with fs.open(f"{run_fs}/exports/lhotse/{split}/cuts.jsonl.gz", "rb") as f, \
                gzip.open(f, "rt") as lines:
            cuts = CutSet.from_dicts([json.loads(x) for x in lines])
        n_cuts += len(cuts)
        cut = next(iter(cuts))
        src = cut.recording.sources[0]
        assert src.type == "url" and src.source.startswith(f"{url}/media/standardize/")
        audio = cut.load_audio()
        assert audio.shape[-1] == pytest.approx(cut.duration * cut.sampling_rate, abs=2)
        assert float(abs(audio).max()) > 0.01
    assert n_cuts == len(data)

    # ... the NeMo manifest: each line's audio_filepath opens from the bucket and holds
    # the utterance's span
    import io

    by_id = {d[0]: d for d in data}
    nemo_ids = []
    for split in splits:
        for line in fs.cat_file(f"{run_fs}/exports/nemo/{split}/manifest.json").splitlines():
            e = json.loads(line)
            nemo_ids.append(e["id"])
            d = by_id[e["id"]]
            assert e["audio_filepath"] == d[3] and e["text"] == d[2]
            assert e["audio_filepath"].startswith(f"{url}/media/standardize/")
            x, sr = sf.read(io.BytesIO(fs.cat_file(e["audio_filepath"])))
            assert sr == 24000 and len(x) / sr >= e["offset"] + e["duration"] - 0.01
            seg = x[int(e["offset"] * sr):int((e["offset"] + e["duration"]) * sr)]
            assert float(abs(seg).max()) > 0.01
    assert sorted(nemo_ids) == ids
    tar_lines = sum(len(fs.cat_file(f"{run_fs}/exports/nemo_tarred/{s}/"
                                    "tarred_audio_manifest.json").splitlines())
                    for s in splits)
    assert tar_lines == len(data) and fs.glob(f"{run_fs}/exports/nemo_tarred/*/audio_0.tar")

    # ... the token shards (speechgpt units of the k-means codebook fitted on this corpus,
    # kept in the bucket) and the Lhotse Shar
    import pyarrow.parquet as pq

    from speechmill.manifests.tokenizers import layouts
    from speechmill.manifests.tokenizers.kmeans import load_codebook

    centroids, meta = load_codebook(f"{url}/models/tokenize/codebook.npy")
    assert centroids.shape[0] == 64 and meta["backend"] == "kmeans-mel"
    index = json.loads(fs.cat_file(f"{run_fs}/shards/shards/index.json"))
    n_shard_rows = 0
    for sh in index["shards"]:
        with fs.open(f"{run_fs}/shards/shards/{sh['file']}", "rb") as f:
            t = pq.read_table(f)
        assert t.num_rows == sh["rows"]
        for row in t.to_pylist():
            units = layouts.parse_speechgpt_units(row["units"]).tolist()
            assert units == row["codes"][0] and max(units) < 64
        n_shard_rows += t.num_rows
    assert n_shard_rows == len(data)
    shar = tmp_path / "shar"
    fs.get(f"{run_fs}/exports/shar/", str(shar), recursive=True)
    shar_cuts = [c for split in splits for c in CutSet.from_shar(in_dir=shar / split)]
    assert sorted(c.id for c in shar_cuts) == ids
    assert float(abs(shar_cuts[0].load_audio()).max()) > 0.01

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
    assert sorted(i for s in splits for i in ds[s]["id"]) == ids

    # 5. the report, made from the bucket at the end of the run
    rep = json.loads(fs.cat_file(f"{run_fs}/report/report/report.json"))
    assert rep["run"]["run_dir"] == url and rep["dataset"]["stage"] == "split"
    assert rep["totals"]["rows"] == len(data)
    assert rep["totals"]["seconds"] == pytest.approx(sum(d[5] for d in data), abs=0.01)
    assert sorted(rep["hours_by"]["split"]) == splits
    assert {s["stage"]: s["rows_out"] for s in rep["stages"]}["segment"] == len(segs)
    html = fs.cat_file(f"{run_fs}/report/report/index.html").decode()
    assert html.startswith("<!DOCTYPE html>") and "data:image/png;base64," in html

    # 6. `speechmill status` reads the run from the bucket
    st = subprocess.run([*SPEECHMILL, "status", url, "--json"], env=env, cwd=cwd,
                        capture_output=True, text=True, timeout=600)
    assert st.returncode == 0, st.stderr
    status = json.loads(st.stdout)
    assert status["run"]["status"] == "succeeded"
    states = {r["stage"]: r["state"] for r in status["stages"]}
    assert len(states) == 17 and set(states.values()) == {"done"}

    # 7. no credential in any object written, no temp objects left
    objs = fs.find(run_fs)
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
    URL; exports and the report published file by file; rerun does nothing; status and
    ``speechmill report`` read it."""
    import soundfile as sf

    from speechmill.pipeline import dag as dagmod
    from speechmill.pipeline.runner import run
    from speechmill.pipeline.store import RunStore
    from speechmill.pipeline.store.layout import local_cache_dir
    from testkit.audio import load_speech

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
    d = dagmod.loads(text)
    assert run(d, progress=False).status == "succeeded"
    store = RunStore(url)
    assert not store.local
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
    assert [s["state"] for s in again.stages] == ["done earlier"] * 4
    from speechmill.pipeline.report import status_rows

    info, rows = status_rows(url)
    assert info["status"] == "succeeded" and [r["state"] for r in rows] == ["done"] * 4
    # the report stage read the run through fsspec; `speechmill report URL` does the same
    # and uploads its files to RUN_DIR/report/cli/
    rep = json.loads((tmp_path / "bucket/run/report/report/report.json").read_text())
    assert rep["run"]["run_dir"] == url and rep["dataset"]["stage"] == "standardize"
    assert rep["totals"]["rows"] == 2 and rep["rejects"]["rows"] == 0
    from speechmill.pipeline.cli import main

    assert main(["report", url, "--stage", "standardize"]) == 0
    cli = json.loads((tmp_path / "bucket/run/report/cli/report.json").read_text())
    assert cli["totals"] == rep["totals"]
    assert (tmp_path / "bucket/run/report/cli/index.html").is_file()


def test_lost_lease_stops_the_run(s3_server: str, tmp_path: Path,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A run whose lease was taken over by another run (it expired while the first was
    paused, as a frozen VM or a long GC pause would) stops with an error naming the run
    directory and the new holder, and writes nothing more there (no part, no run.json)."""
    import socket

    from speechmill.pipeline.cli import EXIT_FAILED
    from speechmill.pipeline.store import RunStore
    from speechmill.pipeline.store.lock import RunLease
    from tests.pipeline.fault_stages import write_faults

    env = {**_env(s3_server, tmp_path), "SPEECHMILL_LEASE_TTL_S": "3"}
    for k, v in env.items():
        if k.startswith("AWS_"):
            monkeypatch.setenv(k, v)
    fs = _fs(s3_server)
    bucket = f"lease-{uuid.uuid4().hex[:10]}"
    fs.call_s3("create_bucket", Bucket=bucket)
    url = f"s3://{bucket}/run"
    faults = tmp_path / "faults.json"
    write_faults(faults, {"f": {"slow_s": 0.1}})  # 40 rows, a part every 0.2 s
    dag = tmp_path / "lease.yaml"
    dag.write_text(f"""
name: lease
run_dir: {url}
executor: {{type: local, stall_timeout_s: 120}}
stages:
  - {{id: src, uses: t_rows, batch_size: 40, with: {{n: 40}}}}
  - {{id: f, uses: t_faulty, needs: [src], batch_size: 2, with: {{faults: "{faults}"}}}}
""")
    store = RunStore(url)
    assert not store.local
    p = subprocess.Popen([sys.executable, "-m", "tests.pipeline.fault_stages", "run",
                          str(dag), "--no-progress"], env=env, cwd=tmp_path,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    taker: RunLease | None = None
    try:
        deadline = time.time() + 300
        while not store.output_parts("f") and p.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        os.kill(p.pid, signal.SIGSTOP)  # paused mid-stage: its lease is not renewed
        assert not store.is_done("f")
        lease = json.loads(fs.cat_file(f"{bucket}/run/run.lock"))
        assert lease["pid"] == p.pid
        time.sleep(max(0.0, lease["expires"] - time.time()) + 0.3)
        taker = RunLease(store, ttl_s=60).__enter__()  # another run takes it over
        n_parts = len(store.output_parts("f"))
        os.kill(p.pid, signal.SIGCONT)
        _, err = p.communicate(timeout=120)
        assert p.returncode == EXIT_FAILED, err[-3000:]
        assert "lost its lease" in err and url in err, err[-3000:]
        assert f"pid {os.getpid()} on {socket.gethostname()}" in err, err[-3000:]
        # nothing written beside the new holder: no part, no marker, run.json as it was
        assert len(store.output_parts("f")) == n_parts < 20 and not store.is_done("f")
        info = store.read_run()
        assert info["pid"] == p.pid and info["status"] == "running"
        assert json.loads(fs.cat_file(f"{bucket}/run/run.lock"))["owner"] == taker.owner
    finally:
        if p.poll() is None:
            os.kill(p.pid, signal.SIGCONT)
            p.kill()
            p.communicate()
        if taker is not None:
            taker.__exit__(None, None, None)


def test_nemo_absolute_clip_paths_refused_on_object_storage(tmp_path: Path) -> None:
    """Cut clips named by absolute path would name the local export cache of a bucket run:
    refused naming the stage and key (relative paths, the default, work there)."""
    import pyarrow as pa

    from speechmill.manifests.nemo import NemoConfig, NemoManifest
    from speechmill.pipeline.errors import ConfigError
    from speechmill.pipeline.stage import StageContext

    cfg = NemoConfig(materialize=True, paths="absolute")
    stage = NemoManifest(cfg, StageContext(stage_id="nemo", run_dir="s3://bucket/run"))
    with pytest.raises(ConfigError, match="paths: relative") as ei:
        stage.export(pa.table({"id": pa.array([], pa.string())}), tmp_path / "out")
    assert ei.value.stage == "nemo" and ei.value.key == "paths"
