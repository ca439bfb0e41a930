"""Tests for the streaming BS.1770 loudness meter."""

from __future__ import annotations

import math
import pathlib
from functools import cache

import numpy as np
import pyloudnorm
import pytest
import pytest_audioeval
import soundfile as sf
from scipy.signal import resample_poly

from speechmill.pipeline.loudness import LoudnessMeter, clamp_gain_db

RATES = (16000, 24000, 44100, 48000)
SPEECH_DIR = pathlib.Path(pytest_audioeval.__path__[0]) / "samples" / "audio" / "en"
SPEECH_FILES = sorted(SPEECH_DIR.glob("*.wav"))


def _measure(x: np.ndarray, rate: int) -> LoudnessMeter:
    meter = LoudnessMeter(rate)
    meter.update(x)
    return meter


def _sine(rate: int, seconds: float, freq: float = 997.0, dbfs: float = -20.0) -> np.ndarray:
    t = np.arange(int(round(seconds * rate))) / rate
    return 10.0 ** (dbfs / 20.0) * np.sin(2.0 * np.pi * freq * t)


def _pink(rate: int, seconds: float, rms_dbfs: float = -23.0, seed: int = 7) -> np.ndarray:
    """Pink-ish noise: white noise shaped to a 1/f power spectrum in the frequency domain."""
    n = int(round(seconds * rate))
    spectrum = np.fft.rfft(np.random.default_rng(seed).standard_normal(n))
    bins = np.arange(spectrum.size, dtype=np.float64)
    bins[0] = 1.0
    y = np.fft.irfft(spectrum / np.sqrt(bins), n)
    return y * 10.0 ** (rms_dbfs / 20.0) / np.sqrt(np.mean(y * y))


@cache
def _speech(name: str, rate: int) -> np.ndarray:
    x, sr = sf.read(SPEECH_DIR / name, dtype="float64", always_2d=False)
    if x.ndim > 1:
        x = x.mean(axis=1)
    if sr == rate:
        return x
    g = math.gcd(rate, sr)
    return resample_poly(x, rate // g, sr // g)


def _signals(rate: int) -> dict[str, np.ndarray]:
    out = {
        "sine997_-20dBFS": _sine(rate, 3.0),
        "pink": _pink(rate, 2.5),
    }
    for path in SPEECH_FILES:
        out[path.name] = _speech(path.name, rate)
    return out


def test_speech_samples_present() -> None:
    assert len(SPEECH_FILES) >= 1


@pytest.mark.parametrize("rate", RATES)
def test_integrated_matches_pyloudnorm(rate: int) -> None:
    for name, x in _signals(rate).items():
        ours = _measure(x, rate).integrated_lufs
        ref = pyloudnorm.Meter(rate).integrated_loudness(x)
        assert math.isfinite(ours), name
        assert abs(ours - ref) < 0.1, (name, ours, ref)


@pytest.mark.parametrize("rate", RATES)
def test_sine_reads_about_minus_23_lufs(rate: int) -> None:
    # BS.1770: a 0 dBFS 1 kHz sine in one channel reads -3.01 LUFS, so -20 dBFS -> ~-23.
    lufs = _measure(_sine(rate, 2.0), rate).integrated_lufs
    assert lufs == pytest.approx(-23.0, abs=0.15)


def test_float32_input_matches_float64() -> None:
    x = _speech(SPEECH_FILES[0].name, 16000)
    a = _measure(x, 16000).integrated_lufs
    b = _measure(x.astype(np.float32), 16000).integrated_lufs
    assert abs(a - b) < 1e-3


@pytest.mark.parametrize("rate", [16000, 44100, 11025])
def test_random_chunking_is_exact(rate: int) -> None:
    rng = np.random.default_rng(rate)
    x = np.concatenate([_pink(rate, 1.3, seed=1), _sine(rate, 1.1, dbfs=-35.0)])
    x[rng.integers(0, x.size, 5)] = np.nan
    whole = _measure(x, rate)

    chunked = LoudnessMeter(rate)
    pos = 0
    sizes = [0, 1, 1, 0, 3, 1]
    while pos < x.size:
        size = sizes.pop(0) if sizes else int(rng.choice([0, 1, 2, 7, 160, 1601, 4409, 9000]))
        chunked.update(x[pos : pos + size].astype(np.float32 if size == 7 else np.float64))
        pos += size

    assert chunked.n_samples == whole.n_samples == x.size
    assert chunked.nonfinite == whole.nonfinite == 5
    assert math.isfinite(whole.integrated_lufs)
    assert chunked.integrated_lufs == pytest.approx(whole.integrated_lufs, abs=1e-6)
    assert chunked.rms_dbfs == pytest.approx(whole.rms_dbfs, abs=1e-6)
    assert chunked.peak_dbfs == pytest.approx(whole.peak_dbfs, abs=1e-6)


def test_silence_and_empty_are_minus_inf() -> None:
    empty = LoudnessMeter(48000)
    assert empty.n_samples == 0
    assert empty.integrated_lufs == -math.inf
    assert empty.rms_dbfs == -math.inf
    assert empty.peak_dbfs == -math.inf

    silent = _measure(np.zeros(48000 * 2), 48000)
    assert silent.n_samples == 96000
    assert silent.integrated_lufs == -math.inf
    assert silent.rms_dbfs == -math.inf
    assert silent.peak_dbfs == -math.inf


def test_below_absolute_gate_is_minus_inf() -> None:
    quiet = _sine(16000, 2.0, dbfs=-80.0)
    meter = _measure(quiet, 16000)
    assert meter.integrated_lufs == -math.inf
    assert meter.rms_dbfs == pytest.approx(-83.01, abs=0.02)


def test_shorter_than_one_block_is_minus_inf() -> None:
    rate = 16000
    short = _measure(_sine(rate, 0.399, dbfs=0.0), rate)
    assert short.integrated_lufs == -math.inf
    assert math.isfinite(short.rms_dbfs)
    exact = _measure(_sine(rate, 0.4, dbfs=0.0), rate)
    assert math.isfinite(exact.integrated_lufs)


def test_relative_gate_ignores_quiet_tail() -> None:
    rate = 24000
    loud = _sine(rate, 2.0)
    quiet = _sine(rate, 6.0, dbfs=-60.0)
    loud_only = _measure(loud, rate).integrated_lufs
    with_tail = _measure(np.concatenate([loud, quiet]), rate).integrated_lufs
    # Only blocks straddling the transition can pass the relative gate at a reduced level.
    assert abs(with_tail - loud_only) < 0.5
    ungated = 10.0 * math.log10((2.0 + 6.0 * 1e-4) / 8.0)
    assert with_tail - loud_only > ungated + 5.0


def test_nan_and_inf_are_counted_and_do_not_poison() -> None:
    rate = 16000
    x = _speech(SPEECH_FILES[0].name, rate).copy()
    bad = np.array([10, 500, 4000, 12345, x.size - 1])
    x[bad[:3]] = np.nan
    x[bad[3]] = np.inf
    x[bad[4]] = -np.inf
    meter = _measure(x, rate)
    assert meter.nonfinite == 5
    assert meter.n_samples == x.size
    for value in (meter.integrated_lufs, meter.rms_dbfs, meter.peak_dbfs):
        assert math.isfinite(value)

    zeroed = x.copy()
    zeroed[bad] = 0.0
    ref = _measure(zeroed, rate)
    assert meter.integrated_lufs == pytest.approx(ref.integrated_lufs, abs=1e-9)
    assert meter.peak_dbfs == pytest.approx(ref.peak_dbfs, abs=1e-12)
    assert meter.integrated_lufs == pytest.approx(
        pyloudnorm.Meter(rate).integrated_loudness(zeroed), abs=0.1
    )


def test_all_nonfinite() -> None:
    meter = _measure(np.full(16000, np.nan), 16000)
    assert meter.nonfinite == 16000
    assert meter.integrated_lufs == -math.inf
    assert meter.rms_dbfs == -math.inf
    assert meter.peak_dbfs == -math.inf


@pytest.mark.parametrize("rate", RATES)
def test_rms_and_peak_of_full_scale_sine(rate: int) -> None:
    meter = _measure(_sine(rate, 1.0, dbfs=0.0), rate)
    assert meter.rms_dbfs == pytest.approx(-3.0103, abs=0.01)
    assert meter.peak_dbfs == pytest.approx(0.0, abs=0.01)
    assert meter.peak_dbfs <= 0.0


def test_rms_and_peak_of_dc() -> None:
    meter = _measure(np.full(1000, -0.5, dtype=np.float32), 48000)
    assert meter.rms_dbfs == pytest.approx(20.0 * math.log10(0.5))
    assert meter.peak_dbfs == pytest.approx(20.0 * math.log10(0.5))


def test_rejects_multichannel_and_bad_rate() -> None:
    with pytest.raises(ValueError):
        LoudnessMeter(16000).update(np.zeros((10, 2)))
    with pytest.raises(ValueError):
        LoudnessMeter(0)


def test_clamp_gain_db() -> None:
    assert clamp_gain_db(3.5, 10.0) == 3.5
    assert clamp_gain_db(-3.5, 10.0) == -3.5
    assert clamp_gain_db(25.0, 10.0) == 10.0
    assert clamp_gain_db(-25.0, 10.0) == -10.0
    assert clamp_gain_db(10.0, 10.0) == 10.0
    assert clamp_gain_db(4.0, 0.0) == 0.0
    assert clamp_gain_db(math.nan, 10.0) == 0.0
    assert clamp_gain_db(math.inf, 10.0) == 0.0
    assert clamp_gain_db(-math.inf, 10.0) == 0.0
    # A meter that never saw a loud enough block yields -inf loudness; the gain derived
    # from it must not blow up.
    assert clamp_gain_db(-23.0 - LoudnessMeter(16000).integrated_lufs, 12.0) == 0.0
    assert isinstance(clamp_gain_db(1, 2), float)
