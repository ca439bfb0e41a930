"""Offline voice matching (pitch + formant perturbation of a preset voice).

The fast tests check the signal processing and the backend wrapper with a small grid;
the slow one is the measurement the feature is judged by (and the README's table):
over several prompt speakers, matched Piper must be closer (Resemblyzer cosine) to the
prompt speaker than plain Piper by at least 0.05 on average, and every speaker must gain
(by at least 0.02), without hurting the ASR round trip.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from pytest_audioeval.samples import registry

from speechmill.synth.tts import VoicePrompt, load_backend
from speechmill.synth.tts.audio import resample
from speechmill.synth.voices.voice_match import apply_match, embed, f0_track

pytest.importorskip("pyworld")
pytest.importorskip("resemblyzer")

SAMPLES = Path(registry.__file__).parent / "audio"
SMALL_GRID = {"pitch_factors": [0.8, 1.0, 1.4], "formant_factors": [1.0, 1.15]}


def sample_prompt(rel: str) -> VoicePrompt:
    p = SAMPLES / f"{rel}.wav"
    return VoicePrompt(rel, str(p), p.with_suffix(".txt").read_text().strip())


@pytest.fixture(scope="module")
def piper_speech() -> tuple[np.ndarray, int]:
    out = load_backend({"backend": "piper"}, offline=True).synthesize(
        "The museum opens at nine and closes at five on weekdays.", seed=0)
    return out.audio, out.sample_rate


def spectral_centroid(x: np.ndarray, sr: int) -> float:
    spec = np.abs(np.fft.rfft(x * np.hanning(x.shape[0])))
    f = np.fft.rfftfreq(x.shape[0], 1 / sr)
    return float((spec * f).sum() / spec.sum())


def f0_ratio(y: np.ndarray, x: np.ndarray, sr: int) -> float:
    """Median over frames voiced in both of f0(y) / f0(x). Frame by frame, because
    Piper's output differs from call to call (its VITS noise is not seedable) and a ratio
    of whole-clip medians moves by up to ~10% with which frames DIO calls voiced."""
    fy, fx = (f0_track(resample(a, sr, 16000), 16000) for a in (y, x))
    both = (fy > 0) & (fx > 0)
    assert both.sum() >= 50, "too few voiced frames to compare pitch"
    return float(np.median(fy[both] / fx[both]))


def test_apply_match_scales_pitch_and_moves_formants(piper_speech) -> None:
    x, sr = piper_speech
    up = apply_match(x, sr, pitch=1.5, formant=1.0)
    assert up.shape == x.shape and up.dtype == np.float32
    assert f0_ratio(up, x, sr) == pytest.approx(1.5, rel=0.03)
    bright = apply_match(x, sr, pitch=1.0, formant=1.2)
    assert f0_ratio(bright, x, sr) == pytest.approx(1.0, abs=0.03)
    assert spectral_centroid(bright, sr) > 1.08 * spectral_centroid(x, sr)
    rms = lambda a: float(np.sqrt(np.mean(a**2)))  # noqa: E731
    peak = float(np.max(np.abs(bright)))
    assert peak <= 0.99 + 1e-6  # never clips
    # loudness kept (RMS), unless that would have clipped: then the peak is at the limit
    assert rms(bright) == pytest.approx(rms(x), rel=0.02) or peak >= 0.98
    np.testing.assert_array_equal(apply_match(x, sr, 1.0, 1.0), x)


def test_voice_match_backend(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from speechmill.synth.voices import voice_match

    applied: list[tuple[np.ndarray, np.ndarray]] = []
    real_apply = voice_match.apply_match

    def spy(audio, sr, pitch, formant):  # type: ignore[no-untyped-def]
        out = real_apply(audio, sr, pitch, formant)
        applied.append((audio, out))
        return out

    monkeypatch.setattr(voice_match, "apply_match", spy)
    cache = tmp_path / "vm-cache"
    # noise off: Piper samples anew on every call otherwise, and the calibration clip's f0
    # (which picks the pitch window) moved enough to flip the choice between 1.0 and 1.4
    spec = {"backend": "piper", "noise_scale": 0.0, "noise_w_scale": 0.0,
            "voice_match": {**SMALL_GRID, "cache_dir": str(cache)}}
    tts = load_backend(spec, offline=True)
    high = sample_prompt("en/quick_brown_fox")  # a voice well above Piper's joe
    out = tts.synthesize("Could you tell me the way to the station?", high, seed=0)
    assert out.voice_source == "voice_match" and out.backend == "piper"
    assert "+voice_match:" in out.backend_version
    assert "clone" not in repr(out.details) + out.backend_version
    d = out.details
    assert d["pitch_factor"] == 1.4  # the prompt's f0 is well above the preset's
    assert d["match_cosine"] >= d["plain_cosine"]
    # the preset's clip was resynthesised 40% higher, and that clip came back
    (before, after), = applied
    np.testing.assert_array_equal(after, out.audio)
    assert f0_ratio(after, before, out.sample_rate) == pytest.approx(1.4, rel=0.03)
    # ... and is closer to the prompt speaker than the unmatched clip
    x, sr = sf.read(high.audio_path, dtype="float32")
    target = embed(x, sr)
    assert float(embed(after, out.sample_rate) @ target) > \
        float(embed(before, out.sample_rate) @ target)
    # without a prompt: the preset voice, untouched
    bare = tts.synthesize("Could you tell me the way to the station?", seed=0)
    assert bare.voice_source == "preset" and "pitch_factor" not in bare.details
    assert len(applied) == 1
    # the calibration is cached on disk and reused by the next process/actor
    files = list(cache.glob("voice_match-*.npz"))
    assert len(files) == 1
    tts2 = load_backend(spec, offline=True, load=False)
    calls: list[str] = []
    real = tts2.base.synthesize  # type: ignore[attr-defined]
    tts2.base.synthesize = lambda text, *a, **kw: (calls.append(text), real(text, *a, **kw))[1]  # type: ignore[attr-defined]
    tts2.ensure_loaded()
    assert calls == []  # no calibration sentence synthesized
    assert tts2.synthesize("Thanks a lot.", high).details["pitch_factor"] == 1.4


def _bank_prompts(tmp: Path) -> list[VoicePrompt]:
    """Prompt speakers unlike Piper's voice: recorded samples in several languages, and
    eSpeak NG voices when it is installed."""
    prompts = [sample_prompt(r) for r in ("en/quick_brown_fox", "fr/pangrama", "es/pangrama",
                                          "hi/pangrama", "pl/pangrama")]
    if shutil.which("espeak-ng"):
        from speechmill.stages.demo_data import synthesize_espeak

        text = "I started recording audio books when I was still at university."
        for v in ("en-us+f3", "en-gb+m3", "en+f5"):
            a, sr = synthesize_espeak(text, v)
            p = tmp / f"{v}.wav"
            sf.write(p, a, sr)
            prompts.append(VoicePrompt(v, str(p), text))
    return prompts


@pytest.mark.slow
def test_voice_match_gains_speaker_similarity_without_hurting_asr(tmp_path: Path) -> None:
    import jiwer

    from speechmill.pipeline.models import ModelSpec
    from speechmill.stages.audio_models.asr import DecodeOptions, FasterWhisper

    sentences = ["Could you tell me how long it takes to bake a loaf of bread?",
                 "I would like to book a table for four people tomorrow evening."]
    plain = load_backend({"backend": "piper"}, offline=True)
    matched = load_backend({"backend": "piper", "voice_match": {}}, offline=True)
    asr = FasterWhisper(ModelSpec(backend="faster-whisper", name="tiny.en", device="cpu"),
                        offline=True)
    opts = DecodeOptions(language="en", beam_size=1, word_timestamps=False)

    def norm(s: str) -> str:
        return " ".join("".join(c for c in s.lower() if c.isalnum() or c == " ").split())

    def wer(ref: str, audio: np.ndarray, sr: int) -> float:
        hyp = asr.transcribe(resample(audio, sr, 16000), opts).text
        return float(jiwer.wer(norm(ref), norm(hyp) or "-"))

    plain_out = [plain.synthesize(s, seed=0) for s in sentences]
    plain_wer = [wer(s, o.audio, o.sample_rate) for s, o in zip(sentences, plain_out,
                                                                 strict=True)]
    rows, match_wer = [], []
    for v in _bank_prompts(tmp_path):
        x, sr = sf.read(v.audio_path, dtype="float32")
        target = embed(x, sr)
        c_plain, c_match = [], []
        for s, po in zip(sentences, plain_out, strict=True):
            mo = matched.synthesize(s, v, seed=0)
            assert mo.voice_source == "voice_match"
            c_plain.append(float(embed(po.audio, po.sample_rate) @ target))
            c_match.append(float(embed(mo.audio, mo.sample_rate) @ target))
            match_wer.append(wer(s, mo.audio, mo.sample_rate))
        rows.append((v.voice_id, np.mean(c_plain), np.mean(c_match), mo.details))
    gain = float(np.mean([m - p for _, p, m, _ in rows]))
    print("\nvoice match vs plain Piper (Resemblyzer cosine to the prompt speaker):")
    for vid, p, m, d in rows:
        print(f"  {vid:20s} plain {p:.3f}  matched {m:.3f}  pitch x{d['pitch_factor']} "
              f"formant x{d['formant_factor']}")
    print(f"  mean gain {gain:+.3f} over {len(rows)} speakers; ASR round-trip WER "
          f"(tiny.en): plain {np.mean(plain_wer):.3f}, matched {np.mean(match_wer):.3f}")
    assert len(rows) >= 5
    assert gain >= 0.05
    # the README's "every speaker gains": each one's cosine to its prompt speaker rises,
    # by at least 0.02 (less would be lost in Piper's run-to-run noise)
    small = {vid: round(m - p, 3) for vid, p, m, _ in rows if m - p < 0.02}
    assert not small, f"speakers whose similarity did not rise by 0.02: {small}"
    assert np.mean(match_wer) <= np.mean(plain_wer) + 0.05
    # matching spreads the bank over distinct perturbations (distinct user voices)
    assert len({(d["pitch_factor"], d["formant_factor"]) for *_, d in rows}) >= 3
