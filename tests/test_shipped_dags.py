"""Every DAG in dags/ as shipped: only the inputs and model locations come from the
environment (no ``--set``), through the real CLI.

* each one validates (``speechmill validate``), with every variable it needs and nothing
  else set;
* ``dags/emilia.yaml``'s language gate is refused with the default English-only model and
  accepted with a multilingual one (a random multilingual faster-whisper model built here);
* ``dags/emilia.yaml`` runs end to end offline as shipped, with a test-built demucs model
  found in ``$SPEECHMILL_MODELS`` that keeps clean speech as the vocals (what a real
  separator does with it): both speech files come out of the filter as segments whose
  text is what was spoken, the tone is rejected as ``no_speech``; then its transcribe
  onwards with the README's multilingual gate (a random multilingual model, whose
  language detections the gate rejects).
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
import torch

from speechmill.pipeline.store import RunStore
from testkit.conversations import SENTENCES, synthesize
from tests.conftest import cli_env

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


class SpeechPassThrough(torch.nn.Module):
    """A demucs model (as ``demucs.states.load_model`` builds one from its package) that
    does what a real separator does with clean speech: the vocals are the mix, and each
    other source a tenth of it (music ratio 0.09, over ``skip_below_music_ratio``: the
    stage really separates, and the accompaniment is written)."""

    def __init__(self, sources: tuple[str, ...] = ("drums", "bass", "other", "vocals"),
                 samplerate: int = 16000, audio_channels: int = 2) -> None:
        super().__init__()
        self.sources = list(sources)
        self.samplerate = samplerate
        self.audio_channels = audio_channels
        self.segment = 8.0
        self.gain = torch.nn.Parameter(torch.tensor(
            [1.0 if s == "vocals" else 0.1 for s in sources]))

    def valid_length(self, length: int) -> int:
        return length

    def forward(self, mix: torch.Tensor) -> torch.Tensor:  # [B, C, T] -> [B, S, C, T]
        return mix[:, None] * self.gain[None, :, None, None]


#: the demucs repo name of :class:`SpeechPassThrough` under ``$SPEECHMILL_MODELS/demucs``
PASS_THROUGH = "speech-passthrough"


def make_pass_through_repo(root: Path) -> Path:
    """A local demucs repo (``PASS_THROUGH.yaml`` and its ``.th`` package) of
    :class:`SpeechPassThrough`; the package names the class, so the CLI imports this
    module to load it (it runs with the repository root as its working directory)."""
    from demucs.states import get_state, save_with_checksum

    root.mkdir(parents=True, exist_ok=True)
    model = SpeechPassThrough()
    package = {"klass": SpeechPassThrough, "args": (), "kwargs": {},
               "state": get_state(model, None, half=False)}
    save_with_checksum(package, root / "passthru.th")
    (root / f"{PASS_THROUGH}.yaml").write_text("models: ['passthru']\n")
    return root


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``$SPEECHMILL_MODELS`` with the test-built demucs models (``demucs/tiny-random``:
    random weights, it cannot separate; ``demucs/speech-passthrough``: clean speech kept
    as vocals) and a random multilingual faster-whisper model
    (``faster-whisper/tiny-random-multi``)."""
    from tests.stages.test_separate import MODEL, make_repo
    from tests.stages.whisper_models import make_multilingual_ct2

    root = tmp_path_factory.mktemp("models")
    make_repo(root / "demucs" / MODEL)
    make_pass_through_repo(root / "demucs" / PASS_THROUGH)
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


def _words(text: str) -> set[str]:
    return set("".join(c for c in text.lower() if c.isalnum() or c.isspace()).split())


@pytest.mark.slow
def test_emilia_runs_as_shipped(models: Path, tmp_path: Path) -> None:
    dag = ROOT / "dags" / "emilia.yaml"
    _inputs(tmp_path / "in")
    env = _env(tmp_path, dag.read_text(), SPEECHMILL_MODELS=str(models),
               DEMUCS_MODEL=PASS_THROUGH)
    run_dir = tmp_path / "run"
    common = ["--run-dir", str(run_dir), "--executor", "local", "--offline", "--no-progress"]
    r = _cli("run", str(dag), *common, env=env, timeout=1200)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    store = RunStore(run_dir)
    assert all(store.is_done(s) for s in STAGES)
    assert json.loads((run_dir / "run.json").read_text())["status"] == "succeeded"
    seps = store.read_outputs("separate").to_pylist()
    assert len(seps) == 3
    # music ratio 0.09 > skip_below_music_ratio 0.05: every file was really separated
    assert all(s["separated"] and s["music_ratio"] == pytest.approx(0.09, abs=0.005)
               and Path(s["accompaniment_path"]).is_file() for s in seps), seps
    # the tone is the only reject; both speech files are kept, as segments of their speech
    rejected = [(Path(r["source_url"]).name, sid, r["reason"]) for sid in STAGES
                for r in store.read_rejects(sid).to_pylist()]
    assert rejected == [("tone.wav", "diarize", "no_speech")]
    kept: dict[str, list[dict]] = {}
    for r in store.read_outputs("filter").to_pylist():
        kept.setdefault(Path(r["source_url"]).name, []).append(r)
    assert sorted(kept) == ["talk0.flac", "talk1.flac"], kept
    for f, rows in kept.items():
        assert all(r["text"].strip() and r["language"] == "en" and 3.0 <= r["duration"] <= 30.0
                   and Path(r["audio_path"]).is_file() for r in rows), rows
        said = _words(" ".join(SENTENCES[4 * int(f[4]): 4 * int(f[4]) + 4]))
        heard = _words(" ".join(r["text"] for r in rows))
        assert len(said & heard) >= 0.8 * len(said), (f, heard)  # the speech was kept
    out = store.read_outputs("transcribe").to_pylist()
    assert len(out) == sum(len(rows) for rows in kept.values())
    assert all(r["scores"]["lid_prob"] is None  # tiny.en: never measured, never 1.0
               for r in out)

    # the README's gate with a multilingual model, on the same run from transcribe on
    r = _cli("run", str(dag), *common, *GATE, "--restart-from", "transcribe",
             env={**env, "ASR_MODEL": "tiny-random-multi"}, timeout=1200)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    segments = store.read_outputs("segment").num_rows
    assert segments == len(out)  # the same segments as above, judged again
    # every segment was judged on a measured language, and the random model's detections
    # (a language outside the list, or a probability near 1/99) fail the gate
    assert store.read_outputs("transcribe").num_rows == 0
    rej = store.read_rejects("transcribe").to_pylist()
    assert len(rej) == segments
    gate = re.compile(r"language_not_allowed: (\w+)$|low_language_prob: (\w+) p=(0\.\d+)$")
    for r in rej:
        m = gate.match(r["detail"])
        assert m and r["reason"] == r["detail"].split(":")[0], r
        if m.group(1):
            assert m.group(1) not in {"zh", "en", "fr", "ja", "ko", "de"}, r
        else:
            assert float(m.group(3)) < 0.8, r
    assert store.read_outputs("filter").num_rows == 0
