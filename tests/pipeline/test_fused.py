"""Fusion: standardize -> diarize -> segment -> transcribe run as one streamed pipeline.

Fused and unfused runs give the same run directory contents; a fused run killed with
SIGKILL mid-pipeline resumes to the same outputs (local executor and embedded Ray); on
Ray the stages of a chain overlap in time; ``executor: {fuse: false}`` turns it off.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from speechmill.pipeline import dag as dagmod
from speechmill.pipeline.fused import plan_chains
from speechmill.pipeline.runner import run
from speechmill.pipeline.store import RunStore
from testkit.audio import speech_samples
from tests.conftest import cli_env

CHAIN = ["standardize", "diarize", "segment", "transcribe"]
SPEECH = ["f0.wav", "f1.wav", "f2.wav", "f3.wav"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four short English speech files, digital silence (diarize rejects it: no_speech) and a
    broken file (ingest rejects it)."""
    d = tmp_path_factory.mktemp("fused_in")
    clips = {p.stem: p for p in speech_samples(("en",))}
    orders = [("counting", "quick_brown_fox"), ("quick_brown_fox", "hello_world"),
              ("hello_world", "counting"), ("counting", "hello_world", "quick_brown_fox")]
    for name, order in zip(SPEECH, orders, strict=True):
        parts = []
        for stem in order:  # English speech: stable transcripts
            x, sr = sf.read(clips[stem], dtype="float32", always_2d=True)
            parts += [np.zeros(int(0.3 * sr), np.float32), x.mean(axis=1)]
        sf.write(d / name, np.concatenate([*parts, np.zeros(int(0.3 * sr), np.float32)]), sr)
    sf.write(d / "silence.wav", np.zeros(16000 * 3, np.float32), 16000)
    (d / "broken.mp3").write_text("<html>503</html>")
    return d


def _yaml(inputs: Path, run_dir: Path, executor: str = "local", fuse: bool = True,
          colocate: bool | None = None) -> str:
    co = "" if colocate is None else f", colocate: {str(colocate).lower()}"
    return f"""
name: fused
run_dir: {run_dir}
executor: {{type: {executor}, fuse: {str(fuse).lower()}, num_cpus: 2, stall_timeout_s: 300{co}}}
stages:
  - {{id: ingest, uses: ingest, with: {{inputs: ["{inputs}"]}}}}
  - {{id: standardize, uses: standardize, needs: ingest, batch_size: 1,
      with: {{sample_rate: 16000, silence_dbfs: null}}}}
  - {{id: diarize, uses: diarize, needs: standardize, batch_size: 1}}
  - {{id: segment, uses: segment, needs: diarize, batch_size: 1,
      with: {{min_s: 1.0, max_s: 12.0}}}}
  - {{id: transcribe, uses: transcribe, needs: segment, batch_size: 1,
      with: {{language: en, cpu_threads: 1, temperature: [0.0]}}}}  # no sampling
"""


def _snapshot(run_dir: Path) -> dict[str, list[tuple]]:
    """Every chain stage's outputs (transcripts included) and rejects, comparable across
    run directories."""
    store = RunStore(run_dir)
    snap: dict[str, list[tuple]] = {}
    for sid in CHAIN:
        rows = []
        for r in store.read_outputs(sid).to_pylist():
            audio = r["audio_path"]
            if audio.startswith(str(run_dir)):  # media written by the run: its samples
                x, sr = sf.read(audio, dtype="int16")
                audio = (sr, hashlib.sha256(x.tobytes()).hexdigest())
            rows.append((r["id"], r["parent_id"], Path(r["source_url"]).name, audio,
                         round(r["duration"], 4), round(r.get("offset") or 0.0, 4),
                         r.get("speaker"), r.get("text")))
        snap[sid] = sorted(rows, key=repr)
        snap[sid + "/rejects"] = sorted(
            (r["id"], r["stage"], r["reason"], Path(r["source_url"] or "").name)
            for r in store.read_rejects(sid).to_pylist())
    return snap


def _counts(run_dir: Path) -> dict[str, tuple]:
    store = RunStore(run_dir)
    out = {}
    for sid in CHAIN:
        m = store.read_metrics(sid)
        assert m is not None and store.is_done(sid)
        out[sid] = (m["rows_in"], m["rows_out"], m["rows_rejected"], m["reasons"])
    return out


@pytest.fixture(scope="module")
def reference(inputs: Path, tmp_path_factory: pytest.TempPathFactory
              ) -> tuple[dict, dict, Path]:
    """An unfused run (``fuse: false``): stage after stage."""
    run_dir = tmp_path_factory.mktemp("fused_ref") / "run"
    dag = dagmod.loads(_yaml(inputs, run_dir, fuse=False))
    assert run(dag, progress=False).status == "succeeded"
    store = RunStore(run_dir)
    for sid in CHAIN:  # fuse off: no stage ran fused
        assert "fused" not in (store.read_metrics(sid) or {})
    snap = _snapshot(run_dir)
    assert {r[2] for r in snap["transcribe"]} == set(SPEECH)
    assert all(r[7] for r in snap["transcribe"])  # texts
    assert [r[1:] for r in snap["diarize/rejects"]] == [("diarize", "no_speech",
                                                         "silence.wav")]
    return snap, _counts(run_dir), run_dir


def test_chains_follow_the_stage_contract(inputs: Path, tmp_path: Path) -> None:
    """ingest dedups its outputs when it ends (unique_output_ids): the chain starts after
    it; diarize's prepare() reads no input, so it streams; fuse: false turns it off; a
    stage whose prepare() reads the whole input (link_speakers) is a barrier."""
    extra = """  - {id: link, uses: link_speakers, needs: transcribe}
  - {id: annotate, uses: annotate, needs: link, with: {text_lid: false}}
"""
    dag = dagmod.loads(_yaml(inputs, tmp_path / "run") + extra)
    store = RunStore(tmp_path / "run")
    chains = {h: [s.id for s in c] for h, c in plan_chains(dag, store).items()}
    assert chains == {"standardize": CHAIN, "link": ["link", "annotate"]}
    off = dagmod.loads(_yaml(inputs, tmp_path / "run", fuse=False) + extra)
    assert plan_chains(off, store) == {}


def _drop_parts(run_dir: Path, stages: list[str], files: set[str]) -> int:
    """Delete the output and reject parts of ``stages`` that hold rows of ``files``."""
    import pyarrow.parquet as pq

    store = RunStore(run_dir)
    n = 0
    for sid in stages:
        for p in store.output_parts(sid) + store.reject_parts(sid):
            names = {Path(u or "").name
                     for u in pq.read_table(p, columns=["source_url"]).column(0).to_pylist()}
            if names & files:
                p.unlink()
                n += 1
    return n


def test_fused_local_matches_unfused_and_resumes_both_backlogs(
        inputs: Path, tmp_path: Path, reference: tuple[dict, dict, Path]) -> None:
    want, want_counts, _ = reference
    run_dir = tmp_path / "run"
    dag = dagmod.loads(_yaml(inputs, run_dir))
    assert run(dag, progress=False).status == "succeeded"
    assert _snapshot(run_dir) == want
    assert _counts(run_dir) == want_counts
    store = RunStore(run_dir)
    for sid in CHAIN:
        assert store.read_metrics(sid)["fused"]["chain"] == CHAIN

    # a state a crash leaves: f1 not standardized yet (everything after it redone as
    # standardize commits it); f2 diarized but not segmented (segment's backlog); f3
    # segmented but not transcribed (transcribe's backlog); no stage finished
    assert _drop_parts(run_dir, CHAIN, {"f1.wav"}) >= 4
    assert _drop_parts(run_dir, CHAIN[2:], {"f2.wav"}) >= 2
    assert _drop_parts(run_dir, CHAIN[3:], {"f3.wav"}) >= 1
    for sid in CHAIN:
        (store.stage_dir(sid) / "_SUCCESS").unlink()
    assert run(dag, progress=False).status == "succeeded"
    assert _snapshot(run_dir) == want
    assert _counts(run_dir) == want_counts


def _cmd(dag: Path, executor: str) -> list[str]:
    return [sys.executable, "-m", "speechmill.pipeline.cli", "run", str(dag),
            "--executor", executor, "--no-progress", "--offline"]


def _kill_mid_pipeline(cmd: list[str], run_dir: Path) -> None:
    """Start the run and SIGKILL its driver once the chain's third stage committed a
    part (the stream is under way, no stage of the chain has finished)."""
    log = run_dir.parent / "killed.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=cli_env(), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    seg = run_dir / "stages" / "segment"
    deadline = time.monotonic() + 400
    killed = False
    while time.monotonic() < deadline and proc.poll() is None:
        if seg.exists() and (list(seg.glob("part-*.parquet"))
                             or list(seg.glob("rejects/part-*.parquet"))):
            os.kill(proc.pid, signal.SIGKILL)  # the driver only: no clean-up at all
            killed = True
            break
        time.sleep(0.01)
    proc.wait(timeout=60)
    with contextlib.suppress(ProcessLookupError):  # reap what the driver left (Ray)
        os.killpg(proc.pid, signal.SIGKILL)
    assert killed, "the run ended before it could be killed: " + log.read_text()[-3000:]
    store = RunStore(run_dir)
    assert not any(store.is_done(s) for s in CHAIN), "a chain stage had finished"


@pytest.mark.parametrize("executor", [
    "local",
    # on 2 CPUs a chain runs co-located by default: one operator, every stage per worker
    pytest.param("ray", marks=pytest.mark.ray),
    # one Ray Data operator per stage, as on a cluster
    pytest.param("ray-operators", marks=pytest.mark.ray)])
def test_sigkill_mid_pipeline_then_resume(inputs: Path, tmp_path: Path, executor: str,
                                          reference: tuple[dict, dict, Path]) -> None:
    want, want_counts, _ = reference
    run_dir = tmp_path / "run"
    dag = tmp_path / "dag.yaml"
    colocate = False if executor == "ray-operators" else None
    executor = executor.split("-")[0]
    dag.write_text(_yaml(inputs, run_dir, executor, colocate=colocate))
    _kill_mid_pipeline(_cmd(dag, executor), run_dir)
    r = subprocess.run(_cmd(dag, executor), capture_output=True, text=True, timeout=600,
                       env=cli_env())
    assert r.returncode == 0, r.stdout + r.stderr
    assert "fused: standardize -> diarize -> segment -> transcribe" in r.stdout
    # transcripts too: Whisper's log-mel runs on one BLAS thread on every executor
    assert _snapshot(run_dir) == want
    assert _counts(run_dir) == want_counts
    assert not list(run_dir.rglob("*.tmp"))


@pytest.mark.ray
def test_stages_overlap_on_ray(tmp_path: Path) -> None:
    """Per-batch times in metrics.json: the second stage of a chain starts batches while
    the first is still running (unfused, it would wait for the first to finish)."""
    faults = tmp_path / "faults.json"
    faults.write_text(json.dumps({"a": {"slow_s": 0.3}, "b": {"slow_s": 0.05}}))
    dag = tmp_path / "dag.yaml"
    dag.write_text(f"""
name: overlap
run_dir: {tmp_path / 'run'}
executor: {{type: ray, num_cpus: 2, stall_timeout_s: 300}}
stages:
  - {{id: src, uses: t_rows, with: {{n: 24}}}}
  - {{id: a, uses: t_faulty, needs: src, batch_size: 1, concurrency: 1,
      with: {{faults: "{faults}"}}}}
  - {{id: b, uses: t_faulty, needs: a, batch_size: 1, with: {{faults: "{faults}"}}}}
""")
    r = subprocess.run([sys.executable, "-m", "tests.pipeline.fault_stages", "run", str(dag),
                        "--no-progress"], capture_output=True, text=True, timeout=600,
                       env=cli_env())
    assert r.returncode == 0, r.stdout + r.stderr
    store = RunStore(tmp_path / "run")
    a, b = (store.read_metrics(s)["fused"] for s in ("a", "b"))
    assert a["chain"] == ["src", "a", "b"]
    assert b["first_batch_started_at"] < a["last_batch_ended_at"]
    assert store.count_rows("b") == (24, 0)


def test_a_failing_member_fails_its_own_stage_and_the_rerun_completes(tmp_path: Path) -> None:
    """Local chain src -> a -> b: b's setup() raises: the run fails naming b (not the
    chain's head) before any batch; fixed, the rerun gives b every row a kept, once."""
    import tests.pipeline.fault_stages  # noqa: F401 - registers the test stages
    from speechmill.pipeline.errors import StageFailedError
    from tests.pipeline.fault_stages import write_faults

    faults = tmp_path / "faults.json"
    write_faults(faults, {"b": {"setup": "no model here"}})
    d = dagmod.loads(f"""
name: fail
run_dir: {tmp_path / 'run'}
executor: {{type: local}}
stages:
  - {{id: src, uses: t_rows, with: {{n: 7}}}}
  - {{id: a, uses: t_faulty, needs: src, with: {{faults: "{faults}"}}}}
  - {{id: b, uses: t_faulty, needs: a, with: {{faults: "{faults}"}}}}
""")
    with pytest.raises(StageFailedError, match="stage 'b'.*no model here"):
        run(d, progress=False)
    store = RunStore(tmp_path / "run")
    assert store.count_rows("b") == (0, 0) and not store.is_done("a")
    write_faults(faults, {"a": {"fail_mod": 3, "fail_rem": [1]}})  # a now rejects some
    assert run(d, progress=False).status == "succeeded"
    b = sorted(store.read_outputs("b", ["id"]).column("id").to_pylist())
    rejected = sorted(store.read_rejects("a", ["id"]).column("id").to_pylist())
    assert b == sorted({f"r{i:03d}" for i in range(7)} - set(rejected))
    assert store.read_metrics("b")["rows_in"] == len(b) and store.is_done("b")
