"""Stage ``separate`` with a tiny random HTDemucs saved in a local demucs repo.

The model is random (its "vocals" are noise-like), so the tests check the plumbing:
lengths, formats, chunk crossfades, files, errors, memory; not separation quality.
The model runs at 16 kHz with nfft 1024 (depth kept at its default 4) so it is fast on
CPU; the inputs are 24 kHz, so resampling in and out is exercised too.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

pytest.importorskip("demucs")
torch = pytest.importorskip("torch")

from speechmill.pipeline.models import ModelNotFoundError  # noqa: E402
from speechmill.pipeline.stage import StageContext  # noqa: E402
from speechmill.stages.separate import Separate, SeparateConfig  # noqa: E402
from tests.audio_factory import load_speech  # noqa: E402

SR = 24000
MODEL = "tiny-random"
SIG = "tinyrnd"  # the single model of the bag; the repo file is <SIG>-<sha256[:8]>.th


def make_repo(root: Path) -> Path:
    """A local demucs repo as ``demucs.pretrained.get_model(MODEL, repo=root)`` reads it:
    ``MODEL.yaml`` (a bag naming one signature) and ``SIG-<checksum>.th`` (the package
    ``demucs.states.load_model`` expects: klass, args, kwargs, state)."""
    from demucs.htdemucs import HTDemucs
    from demucs.states import get_state, save_with_checksum

    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = HTDemucs(sources=["drums", "bass", "other", "vocals"], channels=8, t_layers=1,
                     samplerate=16000, nfft=1024, segment=8)
    args, kwargs = model._init_args_kwargs
    package = {"klass": HTDemucs, "args": args, "kwargs": kwargs,
               "state": get_state(model, None, half=False)}
    save_with_checksum(package, root / f"{SIG}.th")
    (root / f"{MODEL}.yaml").write_text(f"models: ['{SIG}']\n")
    return root


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_repo(tmp_path_factory.mktemp("demucs_repo"))


@pytest.fixture(scope="module")
def speech_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("audio") / "speech.flac"
    sf.write(p, load_speech(20.0, SR), SR, format="FLAC")
    return p


def row_for(path: Path, rid: str = "ab12cd") -> dict:
    info = sf.info(path)
    return {"id": rid, "audio_path": str(path), "offset": 0.0, "duration": info.duration,
            "sample_rate": info.samplerate, "channels": 1}


def run(tmp: Path, repo: Path, row: dict, **cfg: object) -> dict:
    stage = Separate(SeparateConfig(model=MODEL, model_repo=str(repo), **cfg),
                     StageContext("separate", str(tmp), offline=True))
    stage.setup()
    outcome = stage.run_row(row)
    assert outcome.reject is None, outcome.reject
    assert len(outcome.outputs) == 1
    return outcome.outputs[0]


def test_separates_to_mono_flac_of_same_length(tmp_path: Path, repo: Path,
                                               speech_file: Path) -> None:
    row = row_for(speech_file)
    out = run(tmp_path, repo, row)
    p = Path(out["audio_path"])
    assert p.exists() and p.name == "ab12cd.vocals.flac"
    assert p.parent == tmp_path / "media" / "separate" / "ab"
    assert not list(p.parent.glob(".*.tmp"))
    info = sf.info(p)
    assert info.format == "FLAC" and info.channels == 1 and info.samplerate == SR
    assert info.duration == pytest.approx(row["duration"], abs=0.01)
    assert out["duration"] == pytest.approx(row["duration"], abs=0.01)
    y, _ = sf.read(p, dtype="float32")
    assert np.isfinite(y).all() and np.abs(y).max() > 1e-3
    assert out["separated"] is True and out["separation_model"] == MODEL
    assert out["source_audio_path"] == str(speech_file)
    assert out["parent_id"] == "ab12cd" and out["offset"] == 0.0
    assert out["channels"] == 1 and out["sample_rate"] == SR
    assert "accompaniment_path" not in out


def test_chunks_crossfade_without_clicks(tmp_path: Path, repo: Path,
                                         speech_file: Path) -> None:
    row = row_for(speech_file)
    whole = run(tmp_path / "a", repo, row, chunk_s=60.0)
    chunked = run(tmp_path / "b", repo, row, chunk_s=8.0, sample_rate_out=16000)
    y1, sr1 = sf.read(whole["audio_path"], dtype="float32")
    y2, sr2 = sf.read(chunked["audio_path"], dtype="float32")
    assert sr1 == SR and sr2 == 16000
    assert len(y2) / sr2 == pytest.approx(len(y1) / sr1, abs=0.01)
    # compare at the model's rate: one big window vs 8 s windows crossfaded over 2 s
    import soxr

    y1 = soxr.resample(y1, SR, 16000).astype(np.float32)
    n = min(len(y1), len(y2))
    corr = float(np.corrcoef(y1[:n], y2[:n])[0, 1])
    print(f"separate: correlation chunked vs whole {corr:.4f}")
    assert corr > 0.9, corr
    # no steps at the window borders (crossfade 2 s; the hop is one demucs segment
    # stride, 0.75 * 7 s = 5.25 s): the largest sample-to-sample jump near a border is
    # within the signal's ordinary jumps
    hop, xf = int(5.25 * 16000), 2 * 16000
    d = np.abs(np.diff(y2))
    typical = float(np.percentile(d, 99.9))
    for k in range(1, 4):
        for edge in (k * hop, k * hop + xf):
            if edge < n - 100:
                assert d[edge - 50:edge + 50].max() <= 10 * typical + 1e-4


def test_write_accompaniment(tmp_path: Path, repo: Path, speech_file: Path) -> None:
    row = row_for(speech_file)
    out = run(tmp_path, repo, row, write_accompaniment=True)
    acc = Path(out["accompaniment_path"])
    assert acc.exists() and acc.name == "ab12cd.accompaniment.flac"
    assert acc != Path(out["audio_path"])
    info = sf.info(acc)
    assert info.channels == 1 and info.duration == pytest.approx(row["duration"], abs=0.01)
    a, _ = sf.read(acc, dtype="float32")
    assert np.isfinite(a).all() and np.abs(a).max() > 1e-3


def test_segment_rows_use_offset_and_duration(tmp_path: Path, repo: Path,
                                              speech_file: Path) -> None:
    row = {**row_for(speech_file), "offset": 5.0, "duration": 7.5}
    out = run(tmp_path, repo, row, chunk_s=8.0)
    assert sf.info(out["audio_path"]).duration == pytest.approx(7.5, abs=0.01)
    assert out["offset"] == 0.0 and out["duration"] == pytest.approx(7.5, abs=0.01)


def test_music_ratio_precheck_passes_through(tmp_path: Path, repo: Path,
                                             speech_file: Path) -> None:
    row = row_for(speech_file)
    stage = Separate(SeparateConfig(model=MODEL, model_repo=str(repo), probe_s=8.0,
                                    skip_below_music_ratio=1e9),
                     StageContext("separate", str(tmp_path), offline=True))
    stage.setup()
    out = stage.run_row(row).outputs[0]
    assert out["separated"] is False and out["audio_path"] == str(speech_file)
    assert out["music_ratio"] >= 0.0
    assert not (tmp_path / "media" / "separate" / "ab").exists()
    stage2 = Separate(SeparateConfig(model=MODEL, model_repo=str(repo), probe_s=8.0,
                                     skip_below_music_ratio=0.0),
                      StageContext("separate", str(tmp_path), offline=True))
    stage2.setup()
    out2 = stage2.run_row(row).outputs[0]
    assert out2["separated"] is True and out2["music_ratio"] == out["music_ratio"]


def test_missing_model_offline_names_model_and_env(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SPEECHMILL_MODELS", raising=False)
    stage = Separate(SeparateConfig(model="no-such-model"),
                     StageContext("separate", str(tmp_path), offline=True))
    with pytest.raises(ModelNotFoundError) as ei:
        stage.setup()
    msg = str(ei.value)
    assert "no-such-model" in msg and "SPEECHMILL_MODELS" in msg


def test_missing_model_in_local_repo(tmp_path: Path, repo: Path) -> None:
    stage = Separate(SeparateConfig(model="absent", model_repo=str(repo)),
                     StageContext("separate", str(tmp_path), offline=True))
    with pytest.raises(ModelNotFoundError) as ei:
        stage.setup()
    assert "absent" in str(ei.value) and "SPEECHMILL_MODELS" in str(ei.value)


def test_models_dir_is_a_repo(tmp_path: Path, repo: Path, speech_file: Path,
                              monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    shutil.copytree(repo, tmp_path / "models" / "demucs" / MODEL)
    monkeypatch.setenv("SPEECHMILL_MODELS", str(tmp_path / "models"))
    stage = Separate(SeparateConfig(model=MODEL),
                     StageContext("separate", str(tmp_path), offline=True))
    stage.setup()
    assert stage.model_source == "local_dir"


def test_chunk_shorter_than_segment_is_a_config_error() -> None:
    with pytest.raises(ValueError, match="chunk_s"):
        Separate.validate_config(SeparateConfig(chunk_s=5.0, segment_s=7.0))


CHILD = r"""
import json, sys
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
import torch
torch.set_num_threads(2)
from speechmill.pipeline.stage import StageContext
from speechmill.stages.separate import Separate, SeparateConfig
stage = Separate(SeparateConfig(model="tiny-random", model_repo=sys.argv[2], chunk_s=30.0),
                 StageContext("separate", sys.argv[3], offline=True))
stage.setup()
base = hwm()  # after imports and model load
out = stage.run_row({"id": "ffee00", "audio_path": sys.argv[1], "offset": 0.0,
                     "duration": float(sys.argv[4])})
assert out.reject is None, out.reject
print(json.dumps({"peak_kib": hwm(), "base_kib": base,
                  "duration": out.outputs[0]["duration"]}))
"""


def test_ten_minute_file_in_bounded_memory(tmp_path: Path, repo: Path) -> None:
    src = tmp_path / "ten_min.flac"
    minute = load_speech(60.0, SR, seed=3)
    with sf.SoundFile(src, "w", samplerate=SR, channels=1, format="FLAC") as f:
        for _ in range(10):
            f.write(minute)
    r = subprocess.run([sys.executable, "-c", CHILD, str(src), str(repo), str(tmp_path),
                        "600.0"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    growth = (res["peak_kib"] - res["base_kib"]) / 1024
    print(f"separate 10 min, chunk_s=30: peak RSS {res['peak_kib'] / 1024:.0f} MiB, "
          f"growth {growth:.0f} MiB over imports + model load")
    # the 10 min at 24 kHz alone is 55 MiB mono float32; the model's tensors for the
    # whole file at once (4 sources x 2 channels at 16 kHz) would be ~600 MiB
    assert growth < 600, growth
    assert res["duration"] == pytest.approx(600.0, abs=0.01)
    assert sf.info(tmp_path / "media" / "separate" / "ff" / "ffee00.vocals.flac").duration \
        == pytest.approx(600.0, abs=0.01)
