"""Stage standardize on real speech: formats, rate, mono, loudness, peaks, bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyloudnorm
import pytest
import soundfile as sf

from speechmill.pipeline.stage import Reject, StageContext
from speechmill.stages.standardize import Standardize, StandardizeConfig, standardize_file
from testkit.audio import load_speech
from tests.conftest import EXPECTED_REASON


def rms_dbfs(x: np.ndarray) -> float:
    return float(20 * np.log10(np.sqrt(np.mean(x.astype(np.float64) ** 2))))


def test_every_format_to_mono_flac(media_dir, tmp_path: Path) -> None:
    d, good, _ = media_dir
    cfg = StandardizeConfig(sample_rate=24000)
    for name, meta in good.items():
        out = tmp_path / f"{name}.flac"
        r = standardize_file(str(d / "good" / name), out, cfg, tmp_dir=tmp_path / "tmp")
        info = sf.info(out)
        assert (info.format, info.samplerate, info.channels) == ("FLAC", 24000, 1), name
        assert info.duration == pytest.approx(meta["duration"], rel=0.03, abs=0.08), name
        assert r["duration"] == pytest.approx(info.duration, abs=1e-3)
        x, _ = sf.read(out)
        # Emilia-Pipe: gain towards -20 dBFS, clamped to +-3 dB, peak under -1 dBFS
        expect = r["loudness_in"] + r["gain_db"]
        assert rms_dbfs(x) == pytest.approx(expect, abs=0.15), name
        assert abs(r["gain_db"]) <= 3.0 + 1e-9
        assert 20 * np.log10(np.abs(x).max()) <= -1.0 + 0.01
    assert not list((tmp_path / "tmp").glob("*")), "spool files must be removed"


def test_dbfs_target_reached_when_within_clamp(tmp_path: Path) -> None:
    x = load_speech(6.0, 16000, seed=3)
    x *= 10 ** ((-21.5 - rms_dbfs(x)) / 20)  # 1.5 dB under target, peaks well below -1
    sf.write(tmp_path / "in.wav", x, 16000, subtype="FLOAT")
    r = standardize_file(str(tmp_path / "in.wav"), tmp_path / "o.flac",
                         StandardizeConfig(sample_rate=16000, peak_ceiling_db=0.0))
    y, _ = sf.read(tmp_path / "o.flac")
    assert r["gain_db"] == pytest.approx(1.5, abs=0.05)
    assert rms_dbfs(y) == pytest.approx(-20.0, abs=0.1)


def test_lufs_mode_matches_pyloudnorm(tmp_path: Path) -> None:
    x = load_speech(8.0, 44100, seed=1) * 0.3
    sf.write(tmp_path / "in.flac", x, 44100)
    cfg = StandardizeConfig(sample_rate=48000, loudness="lufs", target_lufs=-26.0,
                            subtype="PCM_24")
    standardize_file(str(tmp_path / "in.flac"), tmp_path / "o.flac", cfg)
    y, sr = sf.read(tmp_path / "o.flac")
    assert sr == 48000
    assert pyloudnorm.Meter(sr).integrated_loudness(y) == pytest.approx(-26.0, abs=0.3)


def test_peak_protection_lowers_gain(tmp_path: Path) -> None:
    x = load_speech(4.0, 16000, seed=2)
    x = x / np.abs(x).max() * 0.05  # very quiet RMS but add a loud click
    x[8000] = 0.95
    sf.write(tmp_path / "in.wav", x, 16000, subtype="FLOAT")
    r = standardize_file(str(tmp_path / "in.wav"), tmp_path / "o.flac",
                         StandardizeConfig(sample_rate=16000, loudness="lufs"))
    y, _ = sf.read(tmp_path / "o.flac")
    assert r["gain_db"] < 1.0  # wanted +20 dB or more, the peak allows < 1 dB
    assert 20 * np.log10(np.abs(y).max()) <= -0.99


def test_stereo_is_downmixed_not_summed(tmp_path: Path) -> None:
    x = load_speech(3.0, 16000, seed=4) * 0.5
    sf.write(tmp_path / "st.wav", np.stack([x, x], 1), 16000, subtype="FLOAT")
    r = standardize_file(str(tmp_path / "st.wav"), tmp_path / "o.flac",
                         StandardizeConfig(sample_rate=16000, loudness="none"))
    y, _ = sf.read(tmp_path / "o.flac")
    assert r["gain_db"] == 0.0
    assert np.abs(y - x).max() < 2e-4  # mean of identical channels is the channel


def test_bad_files_are_rejected_with_reasons(media_dir, tmp_path: Path) -> None:
    d, _, bad = media_dir
    for name, cat in bad.items():
        if name == "truncated.wav":  # FFmpeg hides it; ingest's RIFF header check catches it
            continue
        with pytest.raises(Reject) as e:
            standardize_file(str(d / "bad" / name), tmp_path / f"{name}.flac",
                             StandardizeConfig(), tmp_dir=tmp_path / "tmp")
        if cat == "empty_file":
            assert e.value.reason in {"not_audio", "zero_length"}, (name, e.value)
        else:
            assert e.value.reason in EXPECTED_REASON[cat], (name, e.value)
        assert not (tmp_path / f"{name}.flac").exists()


def test_silence_and_length_limits(tmp_path: Path) -> None:
    sf.write(tmp_path / "silence.wav", np.zeros(16000 * 2, np.float32), 16000)
    with pytest.raises(Reject, match="silent"):
        standardize_file(str(tmp_path / "silence.wav"), tmp_path / "o.flac",
                         StandardizeConfig())
    sf.write(tmp_path / "speech.wav", load_speech(3.0), 16000)
    with pytest.raises(Reject, match="too_long"):
        standardize_file(str(tmp_path / "speech.wav"), tmp_path / "o.flac",
                         StandardizeConfig(max_duration_s=1.0))
    with pytest.raises(Reject, match="too_short"):
        standardize_file(str(tmp_path / "speech.wav"), tmp_path / "o.flac",
                         StandardizeConfig(min_duration_s=10.0))


def test_stage_row_keeps_columns(tmp_path: Path) -> None:
    sf.write(tmp_path / "a.wav", load_speech(2.0), 16000)
    st = Standardize(StandardizeConfig(sample_rate=22050), StageContext("std", str(tmp_path)))
    out = st.process_row({"id": "abc123", "audio_path": str(tmp_path / "a.wav"),
                          "source_url": "x", "speaker": "s1", "sample_rate": 16000})
    assert out["parent_id"] == "abc123" and out["speaker"] == "s1"
    assert out["sample_rate"] == 22050 and out["source_sample_rate"] == 16000
    assert Path(out["audio_path"]).is_relative_to(tmp_path / "media" / "std")
    assert sf.info(out["audio_path"]).samplerate == 22050
