"""Quality signals on real recorded speech and real transcripts
(``speechmill.stages.audio_models.quality``, ``speechmill.stages.text_signals``)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import soxr
from scipy import signal

from speechmill.stages.audio_models.quality import bandwidth_hz, clipping_ratio, dnsmos, snr_db
from speechmill.stages.text_signals import hallucination_signals, speaking_rate, text_language
from testkit.audio import load_speech, speech_samples

SR = 16000


def add_white_noise(x: np.ndarray, snr: float, seed: int) -> np.ndarray:
    """``x`` plus white Gaussian noise at ``snr`` dB relative to the whole clip's power."""
    x = x.astype(np.float64)
    noise = np.random.default_rng(seed).normal(0.0, 1.0, x.size)
    noise *= math.sqrt(np.mean(x**2) / np.mean(noise**2)) * 10.0 ** (-snr / 20.0)
    return x + noise


# --------------------------------------------------------------------------------------
# DNSMOS
# --------------------------------------------------------------------------------------


def test_dnsmos_clean_speech_beats_noisy() -> None:
    clean = load_speech(10.0, seed=0)
    noisy = np.clip(add_white_noise(clean, 0.0, seed=7), -1.0, 1.0)
    a = dnsmos(clean, SR)
    b = dnsmos(noisy, SR)
    assert set(a) == {"dnsmos_sig", "dnsmos_bak", "dnsmos_ovrl", "dnsmos_p808"}
    for scores in (a, b):
        assert all(1.0 <= v <= 5.0 for v in scores.values()), scores
    # measured: clean ovrl 3.13 bak 4.08 sig 3.40 p808 3.88;
    #           0 dB white noise ovrl 1.55 bak 1.45 sig 2.71 p808 2.20
    assert a["dnsmos_ovrl"] > b["dnsmos_ovrl"] + 1.0
    assert a["dnsmos_bak"] > b["dnsmos_bak"] + 1.5
    assert a["dnsmos_p808"] > b["dnsmos_p808"]


def test_dnsmos_matches_reference_implementation() -> None:
    # Reference: speechmos.dnsmos.run (librosa 0.9.2 mel features) on the same arrays;
    # 9.5 s = one model window, 14.2 s = five 1-s-hop windows.
    expected = {
        9.5: (3.6723, 4.1849, 3.4346, 3.8916),
        14.2: (3.6903, 4.1993, 3.4659, 3.9360),
    }
    for seconds, (sig, bak, ovrl, p808) in expected.items():
        got = dnsmos(load_speech(seconds, seed=3), SR)
        assert got["dnsmos_sig"] == pytest.approx(sig, abs=2e-3)
        assert got["dnsmos_bak"] == pytest.approx(bak, abs=2e-3)
        assert got["dnsmos_ovrl"] == pytest.approx(ovrl, abs=2e-3)
        assert got["dnsmos_p808"] == pytest.approx(p808, abs=2e-3)


def test_dnsmos_other_rates_short_clips_and_empty() -> None:
    x16 = load_speech(9.5, seed=2)
    x48 = soxr.resample(x16, SR, 48000)
    a, b = dnsmos(x16, SR), dnsmos(x48, 48000)  # measured ovrl 3.488 vs 3.493
    for key in ("dnsmos_sig", "dnsmos_bak", "dnsmos_ovrl"):
        assert b[key] == pytest.approx(a[key], abs=0.05), key
    assert b["dnsmos_p808"] == pytest.approx(a["dnsmos_p808"], abs=0.3)  # 3.65 vs 3.51
    short = dnsmos(x16[: int(0.6 * SR)], SR)  # 0.6 s: repeated to fill the 9.01 s window
    assert all(1.0 <= v <= 5.0 for v in short.values()), short
    stereo = dnsmos(np.stack([x16, x16], axis=1), SR)
    assert stereo["dnsmos_ovrl"] == pytest.approx(a["dnsmos_ovrl"], abs=1e-3)
    assert all(math.isnan(v) for v in dnsmos(np.zeros(0, np.float32), SR).values())


# --------------------------------------------------------------------------------------
# SNR
# --------------------------------------------------------------------------------------


def test_snr_tracks_added_white_noise() -> None:
    speech = load_speech(10.0, seed=1)
    at20 = add_white_noise(speech, 20.0, seed=11)
    at5 = add_white_noise(speech, 5.0, seed=12)
    # measured (WADA): 20 dB -> 19.9, 5 dB -> 4.5; (energy): 20.1, 5.2
    hi, lo = snr_db(at20, SR), snr_db(at5, SR)
    assert hi - lo > 8.0
    assert hi == pytest.approx(20.0, abs=6.0)
    assert lo == pytest.approx(5.0, abs=6.0)
    hi_e, lo_e = snr_db(at20, SR, method="energy"), snr_db(at5, SR, method="energy")
    assert hi_e == pytest.approx(20.0, abs=3.0)
    assert lo_e == pytest.approx(5.0, abs=3.0)
    # clean recorded speech is far above both; the result is clamped to [-10, 100]
    assert snr_db(speech, SR) > 40.0
    assert snr_db(np.random.default_rng(0).normal(0, 0.1, SR * 5), SR) == pytest.approx(
        -10.0, abs=1.0
    )
    assert math.isnan(snr_db(np.zeros(SR), SR))
    with pytest.raises(ValueError):
        snr_db(speech, SR, method="nope")  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------
# Clipping
# --------------------------------------------------------------------------------------


def test_clipping_ratio() -> None:
    speech = load_speech(8.0, seed=0)
    assert clipping_ratio(speech) < 1e-4  # measured 0.0; x8 and clipped: 0.142
    assert clipping_ratio(speech / np.abs(speech).max()) == 0.0  # peak-normalised: one peak
    clipped = np.clip(speech * 8.0, -1.0, 1.0)
    ratio = clipping_ratio(clipped)
    assert ratio > 0.01
    # clipped, then attenuated: the flat tops still count
    assert clipping_ratio(clipped * 0.5) == pytest.approx(ratio, rel=0.05)
    assert clipping_ratio(np.zeros(SR)) == 0.0
    assert clipping_ratio(np.zeros(0)) == 0.0


# --------------------------------------------------------------------------------------
# Bandwidth
# --------------------------------------------------------------------------------------


def test_bandwidth() -> None:
    speech = load_speech(8.0, seed=0).astype(np.float64)
    full = bandwidth_hz(speech, SR)
    sos = signal.butter(12, 4000, fs=SR, output="sos")
    lowpassed = signal.sosfiltfilt(sos, speech)
    narrow = bandwidth_hz(lowpassed, SR)
    # measured: full band 8000 Hz, low-passed 4094 Hz, 8 kHz telephone rate 3812 Hz
    assert full > 6000.0
    assert narrow < 4600.0
    assert bandwidth_hz(soxr.resample(soxr.resample(speech, SR, 8000), 8000, SR), SR) < 4100
    # a quiet hiss floor (-70 dBFS) above the cut-off is more than 50 dB below the peak
    hiss = np.random.default_rng(0).normal(0.0, 10 ** (-70 / 20), lowpassed.size)
    assert bandwidth_hz(lowpassed + hiss, SR) < 4600.0  # measured 4094 Hz
    # silence around the speech does not change the answer
    padded = np.concatenate([np.zeros(3 * SR), lowpassed, np.zeros(3 * SR)])
    assert bandwidth_hz(padded, SR) == pytest.approx(narrow, abs=50.0)
    assert bandwidth_hz(np.zeros(SR), SR) == 0.0
    assert bandwidth_hz(np.zeros(0), SR) == 0.0


# --------------------------------------------------------------------------------------
# Text
# --------------------------------------------------------------------------------------


def test_speaking_rate() -> None:
    r = speaking_rate("Hello, world! It's 2024.", 2.0)
    assert r == {"chars_per_s": 8.5, "words_per_s": 2.0}  # 17 chars, 4 words
    assert speaking_rate("你好世界。", 1.0) == {"chars_per_s": 4.0, "words_per_s": 4.0}
    en = speech_samples(("en",))[0]  # counting.wav: 2.99 s, 10 words
    text = en.with_suffix(".txt").read_text(encoding="utf-8")
    rate = speaking_rate(text, 2.99)
    assert rate["words_per_s"] == pytest.approx(10 / 2.99)
    assert rate["chars_per_s"] == pytest.approx(39 / 2.99)
    assert all(math.isnan(v) for v in speaking_rate("hi", 0.0).values())


def _transcripts(lang: str) -> list[str]:
    paths: list[Path] = speech_samples((lang,))
    return [p.with_suffix(".txt").read_text(encoding="utf-8").strip() for p in paths]


def test_text_language_on_real_transcripts() -> None:
    for lang in ("en", "es", "fr"):
        for text in _transcripts(lang):
            code, conf = text_language(text)  # all of lingua's languages
            assert code == lang, (text, code, conf)
            assert 0.0 < conf <= 1.0
    subset = ("en", "es", "fr", "it", "pt", "pl")
    for lang in subset:
        for text in _transcripts(lang):
            assert text_language(text, subset)[0] == lang, text
    assert text_language("") == (None, 0.0)
    assert text_language("  .. ") == (None, 0.0)
    assert text_language("ok") == (None, 0.0)
    with pytest.raises(ValueError):
        text_language("hello there", ("en",))


def test_hallucination_signals() -> None:
    thanks = hallucination_signals("Thanks for watching!")
    assert thanks["hallucination"] and thanks["known_phrase"] == "thanks for watching"
    assert thanks["reasons"] == ["known_phrase"]
    repeated = hallucination_signals("the the the the the the the the")
    assert repeated["hallucination"] and repeated["known_phrase"] is None
    assert repeated["max_repeat_run"] == 8
    assert repeated["repeat_ngram_ratio"] > 0.5
    assert repeated["reasons"] == ["repeated_ngrams"]  # compression ratio 2.21
    normal = hallucination_signals("The quick brown fox jumps over the lazy dog.")
    assert normal == {
        "repeat_ngram_ratio": 0.0,
        "max_repeat_run": 1,
        "known_phrase": None,
        "text_compression_ratio": pytest.approx(44 / 51),
        "hallucination": False,
        "reasons": [],
    }
    # credits count anywhere; outro phrases only when they are (most of) the segment
    assert hallucination_signals("Subtitles by the Amara.org community")["hallucination"]
    assert hallucination_signals("字幕由Amara.org社区提供")["hallucination"]
    long_outro = "So that's all for today, thanks for watching and check the links below."
    assert not hallucination_signals(long_outro)["hallucination"]
    # phrase loops: compression ratio and repeated trigrams
    loop = hallucination_signals("one two three " * 8)
    assert loop["max_repeat_run"] == 8 and loop["text_compression_ratio"] > 2.4
    assert loop["hallucination"]
    # decoder-reported signals
    assert hallucination_signals("ok fine", compression_ratio=3.1)["reasons"] == [
        "compression_ratio"
    ]
    assert hallucination_signals("ok fine", no_speech_prob=0.9)["reasons"] == ["no_speech"]
    assert not hallucination_signals("", no_speech_prob=0.9)["hallucination"]
    assert not hallucination_signals("ok fine", compression_ratio=1.2, no_speech_prob=0.1)[
        "hallucination"
    ]
