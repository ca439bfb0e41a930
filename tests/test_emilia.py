"""The shipped dags/emilia.yaml end to end offline (test-built demucs model, embed-cluster
diarizer, shipped tiny.en, DNSMOS, lingua), killed with SIGKILL mid-run and resumed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from speechmill.pipeline.store import RunStore
from testkit.conversations import espeak_available, make_conversation
from tests.conftest import cli_env
from tests.stages.test_separate import MODEL, make_repo

pytestmark = [pytest.mark.skipif(not espeak_available(), reason="needs espeak-ng (apt)"),
              pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[1]


def _cmd(run_dir: Path, repo: Path) -> list[str]:
    sets = [
        f"separate.model={MODEL}", f"separate.model_repo={repo}",
        # the random test model cannot separate: every file takes the pass-through path
        # after the model's music/speech pre-check (recorded as separated: false)
        "separate.skip_below_music_ratio=1000000000",
        "segment.min_s=1.0", "annotate.lid_languages=[en,es,fr,de]",
        "filter.min_duration_s=1.0", "filter.min_dnsmos_ovrl=2.0",
        "standardize.sample_rate=16000",
    ]
    out = [sys.executable, "-m", "speechmill.pipeline.cli", "run",
           str(ROOT / "dags" / "emilia.yaml"), "--run-dir", str(run_dir),
           "--executor", "local", "--offline", "--no-progress"]
    for s in sets:
        out += ["--set", s]
    return out


def _final(run_dir: Path) -> tuple[list, list]:
    store = RunStore(run_dir)
    kept = sorted((r["id"], r["speaker"], r["text"])
                  for r in store.read_outputs("filter").to_pylist())
    rejected = sorted((sid, r["id"], r["reason"]) for sid in
                      ("ingest", "standardize", "separate", "diarize", "segment",
                       "transcribe", "annotate", "link_speakers", "filter")
                      for r in store.read_rejects(sid).to_pylist())
    return kept, rejected


def test_emilia_dag_resumes_after_sigkill(tmp_path: Path) -> None:
    inp = tmp_path / "in"
    inp.mkdir()
    make_conversation(inp / "a.wav", 2, 8, seed=11, voices=["piper:joe", "espeak:en-us+f3"])
    make_conversation(inp / "b.wav", 2, 8, seed=12, voices=["piper:joe", "espeak:en-gb+m3"])
    t = np.arange(16000 * 6) / 16000
    sf.write(inp / "tone.wav", (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 16000)
    repo = make_repo(tmp_path / "repo")
    env = {**cli_env(), "INPUT": str(inp)}

    r = subprocess.run(_cmd(tmp_path / "ref", repo), env=env, capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "hours kept" in r.stdout
    kept, rejected = _final(tmp_path / "ref")
    assert len(kept) >= 6
    assert len({spk for _, spk, _ in kept}) == 3  # joe + two eSpeak voices, run-wide
    assert any(reason == "no_speech" for _, _, reason in rejected)  # the tone
    seps = RunStore(tmp_path / "ref").read_outputs("separate").to_pylist()
    assert seps and all(s["separated"] is False and s["music_ratio"] is not None for s in seps)
    # the default ASR model (tiny.en) detects no language: lid_prob is null, never 1.0
    asr = RunStore(tmp_path / "ref").read_outputs("transcribe").to_pylist()
    assert asr and all(r["language"] == "en" and r["scores"]["lid_prob"] is None for r in asr)

    crash = tmp_path / "crash"
    proc = subprocess.Popen(_cmd(crash, repo), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    killed = False
    while time.monotonic() < deadline and proc.poll() is None:
        if list((crash / "stages" / "segment").glob("part-*.parquet")) if (
                crash / "stages" / "segment").exists() else []:
            os.kill(proc.pid, signal.SIGKILL)
            killed = True
            break
        time.sleep(0.01)
    proc.wait(timeout=60)
    assert killed, "the run finished before it could be killed"
    r = subprocess.run(_cmd(crash, repo), env=env, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert _final(crash) == (kept, rejected)
