"""Every DAG in dags/ as shipped: only the inputs and model locations come from the
environment (no ``--set``), through the real CLI.

* each one validates (``speechmill validate``), with every variable it needs and nothing
  else set;
* ``dags/emilia.yaml``'s language gate is refused with the default English-only model and
  accepted with a multilingual one (a random multilingual faster-whisper model built here);
* ``dags/emilia.yaml`` runs end to end offline as shipped, with the test-built demucs model
  found in ``$SPEECHMILL_MODELS`` (a random model: it cannot separate, so its "vocals" hold
  little speech), then its transcribe onwards with the README's multilingual gate.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from speechmill.pipeline.store import RunStore
from tests.conftest import cli_env
from tests.conversation_factory import SENTENCES, synthesize

ROOT = Path(__file__).resolve().parents[1]
DAGS = sorted((ROOT / "dags").glob("*.yaml"))
ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(:-[^}]*)?\}")
#: test values for the variables a shipped DAG has no default for
REQUIRED = {"INPUT": "in", "FEED": "https://example.org/podcast/feed.xml"}
#: the README's command that turns Emilia's language gate on
GATE = ["--set", "transcribe.allowed_languages=[zh,en,fr,ja,ko,de]",
        "--set", "transcribe.min_language_prob=0.8"]


def _env(tmp_path: Path, text: str, **extra: str) -> dict[str, str]:
    """The environment a user has: the DAG's required variables, ``extra``, and none of
    the variables any shipped DAG reads (so their defaults apply)."""
    env = cli_env()
    for dag in DAGS:
        for m in ENV_RE.finditer(dag.read_text()):
            env.pop(m.group(1), None)
    env.pop("SPEECHMILL_MODELS", None)
    for m in ENV_RE.finditer(text):
        if m.group(2) is None:
            var = m.group(1)
            assert var in REQUIRED, f"a shipped DAG needs ${var}: give it a test value"
            value = REQUIRED[var]
            env[var] = value if "://" in value else str(tmp_path / value)
    env.update(extra)
    return env


def _cli(*args: str, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "speechmill.pipeline.cli", *args], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_the_shipped_dags_are_all_here() -> None:
    names = {p.name for p in DAGS}
    assert {"demo.yaml", "emilia.yaml", "podcast.yaml", "standardize.yaml"} <= names


@pytest.mark.parametrize("dag", DAGS, ids=[p.stem for p in DAGS])
def test_shipped_dag_validates(dag: Path, tmp_path: Path) -> None:
    text = dag.read_text()
    (tmp_path / "in").mkdir()
    r = _cli("validate", str(dag), env=_env(tmp_path, text))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "plan" in r.stdout


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``$SPEECHMILL_MODELS`` with the test-built demucs model (``demucs/tiny-random``) and
    a random multilingual faster-whisper model (``faster-whisper/tiny-random-multi``)."""
    from tests.stages.test_separate import MODEL, make_repo
    from tests.stages.whisper_models import make_multilingual_ct2

    root = tmp_path_factory.mktemp("models")
    make_repo(root / "demucs" / MODEL)
    ct2 = make_multilingual_ct2(tmp_path_factory.mktemp("whisper"))
    (root / "faster-whisper").mkdir()
    (root / "faster-whisper" / "tiny-random-multi").symlink_to(ct2)
    return root


def test_emilia_language_gate_needs_a_multilingual_model(models: Path, tmp_path: Path) -> None:
    dag = ROOT / "dags" / "emilia.yaml"
    (tmp_path / "in").mkdir()
    env = _env(tmp_path, dag.read_text(), SPEECHMILL_MODELS=str(models))
    r = _cli("validate", str(dag), *GATE, env=env)  # default ASR model: tiny.en
    assert r.returncode != 0
    assert ("stage 'transcribe': key 'with.allowed_languages' and 'with.min_language_prob'"
            in r.stderr and "English-only" in r.stderr), r.stderr
    r = _cli("validate", str(dag), *GATE, env={**env, "ASR_MODEL": "tiny-random-multi"})
    assert r.returncode == 0, r.stderr[-2000:]


def _inputs(d: Path) -> None:
    """Two files of Piper speech (four sentences each) and a 440 Hz tone."""
    d.mkdir()
    sr = 24000
    for f in range(2):
        parts = [np.zeros(int(0.3 * sr), np.float32)]
        for i in range(4):
            parts += [synthesize("piper:joe", SENTENCES[f * 4 + i], sample_rate=sr),
                      np.zeros(int(0.5 * sr), np.float32)]
        sf.write(d / f"talk{f}.flac", np.concatenate(parts), sr)
    t = np.arange(sr * 6) / sr
    sf.write(d / "tone.wav", (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), sr)


STAGES = ("ingest", "standardize", "separate", "diarize", "segment", "transcribe",
          "annotate", "link_speakers", "filter")


@pytest.mark.slow
def test_emilia_runs_as_shipped(models: Path, tmp_path: Path) -> None:
    from tests.stages.test_separate import MODEL

    dag = ROOT / "dags" / "emilia.yaml"
    _inputs(tmp_path / "in")
    env = _env(tmp_path, dag.read_text(), SPEECHMILL_MODELS=str(models), DEMUCS_MODEL=MODEL)
    run_dir = tmp_path / "run"
    common = ["--run-dir", str(run_dir), "--executor", "local", "--offline", "--no-progress"]
    r = _cli("run", str(dag), *common, env=env, timeout=1200)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    store = RunStore(run_dir)
    assert all(store.is_done(s) for s in STAGES)
    assert json.loads((run_dir / "run.json").read_text())["status"] == "succeeded"
    seps = store.read_outputs("separate").to_pylist()
    assert len(seps) == 3 and all(s["music_ratio"] is not None for s in seps)
    # every input ends in rows that reach the filter or in exactly one reject
    rejected = {Path(r["source_url"]).name: (sid, r["reason"]) for sid in STAGES
                for r in store.read_rejects(sid).to_pylist() if r["source_url"]}
    assert rejected["tone.wav"] == ("diarize", "no_speech")
    kept = {Path(r["source_url"]).name for r in store.read_outputs("filter").to_pylist()}
    assert kept | set(rejected) == {"talk0.flac", "talk1.flac", "tone.wav"}
    assert all(r["scores"]["lid_prob"] is None  # tiny.en: never measured, never 1.0
               for r in store.read_outputs("transcribe").to_pylist())

    # the README's gate with a multilingual model, on the same run from transcribe on;
    # the random demucs model cannot separate, so files pass through it unseparated
    r = _cli("run", str(dag), *common, *GATE, "--restart-from", "separate",
             "--set", "separate.skip_below_music_ratio=1000000000",
             env={**env, "ASR_MODEL": "tiny-random-multi"}, timeout=1200)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    segments = store.read_outputs("segment").num_rows
    assert segments >= 2  # speech passed through: both talks are cut into segments
    out = store.read_outputs("transcribe").to_pylist()
    rej = store.read_rejects("transcribe").to_pylist()
    # every row was judged on a measured language: the random model's detections (a
    # language outside the list, or a probability near 1/99) fail the gate
    assert all(r["scores"]["lid_prob"] is not None for r in out)
    assert rej and {r["reason"] for r in rej} <= {"language_not_allowed", "low_language_prob",
                                                  "empty_text"}
    assert any(r["reason"] != "empty_text" for r in rej)
    assert {r["language"] for r in out} <= {"zh", "en", "fr", "ja", "ko", "de"}
    assert all(r["scores"]["lid_prob"] >= 0.8 for r in out)
