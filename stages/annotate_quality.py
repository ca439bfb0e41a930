"""Per-clip quality signals and transcript sanity checks for the ``annotate`` stage.

Pure functions over a mono float waveform (values in [-1, 1]) or a transcript; none of
them touches files or pipeline state. Heavy libraries (onnxruntime, lingua, soxr) are
imported lazily, and their models are built once per process and shared by all threads.

Audio:

* :func:`dnsmos` -- DNSMOS P.835 (SIG/BAK/OVRL) and P.808 MOS from the ONNX models that
  ship inside the ``speechmos`` package.
* :func:`snr_db` -- blind SNR estimate (WADA-SNR by default, or an energy-percentile one).
* :func:`clipping_ratio` -- fraction of samples in clipped (flat-topped) runs.
* :func:`bandwidth_hz` -- effective audio bandwidth from the long-term average spectrum.

Text:

* :func:`speaking_rate` -- characters and words per second.
* :func:`text_language` -- offline text language identification with lingua.
* :func:`hallucination_signals` -- repetition, compression ratio and well-known Whisper
  hallucination phrases.

Multi-channel input is accepted as ``(samples, channels)`` and averaged to mono;
integer PCM is scaled to [-1, 1); non-finite samples are treated as 0.
"""

from __future__ import annotations

import math
import os
import threading
import unicodedata
import zlib
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

__all__ = [
    "DNSMOS_SAMPLE_RATE",
    "KNOWN_HALLUCINATIONS",
    "bandwidth_hz",
    "clipping_ratio",
    "dnsmos",
    "hallucination_signals",
    "normalize_text",
    "snr_db",
    "speaking_rate",
    "text_compression_ratio",
    "text_language",
]


def _mono(audio: np.ndarray) -> np.ndarray:
    """``audio`` as 1-D float64 (``(n, channels)`` is averaged), non-finite -> 0.

    Integer PCM is scaled to [-1, 1) by its type's full scale.
    """
    x = np.asarray(audio)
    if np.issubdtype(x.dtype, np.integer):
        info = np.iinfo(x.dtype)
        x = (x.astype(np.float64) - (info.max + 1 + info.min) / 2) / ((info.max - info.min + 1) / 2)
    if x.ndim == 2:
        x = x.mean(axis=1)
    elif x.ndim != 1:
        raise ValueError(f"audio must be 1-D or (samples, channels); got shape {x.shape}")
    x = x.astype(np.float64, copy=False)
    if not np.isfinite(x).all():
        x = np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
    return x


def _check_sr(sr: int) -> None:
    if not sr or sr <= 0:
        raise ValueError(f"sample rate must be positive; got {sr!r}")


# ======================================================================================
# DNSMOS
# ======================================================================================

#: Sample rate of the DNSMOS models; other rates are resampled with soxr.
DNSMOS_SAMPLE_RATE = 16000
_DNSMOS_INPUT_S = 9.01  # model window (s); the P.835 model takes exactly this many samples
_DNSMOS_WINDOW = int(_DNSMOS_INPUT_S * DNSMOS_SAMPLE_RATE)  # 144160
_DNSMOS_BATCH = 16  # windows per ONNX call (bounds memory for long clips)
_P808_N_FFT = 321
_P808_HOP = 160
_P808_N_MELS = 120

# Calibration polynomials that map the raw P.835 network outputs to MOS (DNSMOS,
# non-personalised; numpy.poly1d order: highest power first). From Microsoft's
# DNS-Challenge / speechmos (MIT licence): they are part of the model.
_POLY_SIG = (-0.08397278, 1.22083953, 0.0052439)
_POLY_BAK = (-0.13166888, 1.60915514, -0.39604546)
_POLY_OVRL = (-0.06766283, 1.11546468, 0.04602535)

_dnsmos_lock = threading.Lock()
_dnsmos_models: tuple[Any, Any, np.ndarray, np.ndarray] | None = None


def _hz_to_mel_slaney(f: np.ndarray) -> np.ndarray:
    """Slaney's mel scale (linear to 1 kHz, logarithmic above), as in librosa's default."""
    f = np.asarray(f, dtype=np.float64)
    lin_step = 200.0 / 3.0
    log_step = math.log(6.4) / 27.0
    mel = f / lin_step
    above = f >= 1000.0
    mel[above] = 1000.0 / lin_step + np.log(f[above] / 1000.0) / log_step
    return mel


def _mel_to_hz_slaney(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, dtype=np.float64)
    lin_step = 200.0 / 3.0
    log_step = math.log(6.4) / 27.0
    break_mel = 1000.0 / lin_step
    f = m * lin_step
    above = m >= break_mel
    f[above] = 1000.0 * np.exp(log_step * (m[above] - break_mel))
    return f


def _slaney_mel_filterbank(sr: int, n_fft: int, n_mels: int) -> np.ndarray:
    """(n_mels, n_fft // 2 + 1) triangular, area-normalised mel filters (0 .. sr/2).

    The same filters librosa builds with ``filters.mel(sr=, n_fft=, n_mels=)`` (its
    defaults: Slaney scale and norm), which the DNSMOS P.808 model was trained on.
    """
    bins = np.fft.rfftfreq(n_fft, d=1.0 / sr)
    mel_lo, mel_hi = _hz_to_mel_slaney(np.array([0.0, sr / 2.0]))
    edges = _mel_to_hz_slaney(np.linspace(mel_lo, mel_hi, n_mels + 2))
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (bins[None, :] - lo) / (mid - lo)
    falling = (hi - bins[None, :]) / (hi - mid)
    fb = np.clip(np.minimum(rising, falling), 0.0, None)
    fb *= (2.0 / (edges[2:] - edges[:-2]))[:, None]
    return fb


def _ort_threads() -> int:
    """Intra-op threads of the DNSMOS sessions: ``OMP_NUM_THREADS`` when set (Ray sets
    it to a worker's CPUs, so workers sharing a machine do not oversubscribe it), else 0,
    onnxruntime's default (one per physical core)."""
    try:
        return max(int(os.environ.get("OMP_NUM_THREADS", "0")), 0)
    except ValueError:
        return 0


def _load_dnsmos() -> tuple[Any, Any, np.ndarray, np.ndarray]:
    """(P.835 session, P.808 session, mel filterbank, analysis window), built once."""
    global _dnsmos_models
    models = _dnsmos_models
    if models is not None:
        return models
    with _dnsmos_lock:
        if _dnsmos_models is None:
            from importlib import resources

            import onnxruntime as ort

            # Only the model files are used: speechmos' own module imports librosa.
            root = resources.files("speechmos") / "dnsmos_models"
            opts = ort.SessionOptions()
            opts.log_severity_level = 3
            opts.intra_op_num_threads = _ort_threads()
            providers = ["CPUExecutionProvider"]
            primary = ort.InferenceSession(
                (root / "sig_bak_ovr.onnx").read_bytes(), sess_options=opts, providers=providers
            )
            p808 = ort.InferenceSession(
                (root / "model_v8.onnx").read_bytes(), sess_options=opts, providers=providers
            )
            fb = _slaney_mel_filterbank(DNSMOS_SAMPLE_RATE, _P808_N_FFT, _P808_N_MELS)
            n = np.arange(_P808_N_FFT)
            window = 0.5 - 0.5 * np.cos(2.0 * np.pi * n / _P808_N_FFT)  # periodic Hann
            _dnsmos_models = (primary, p808, fb.T.astype(np.float32), window)
        return _dnsmos_models


def _p808_features(windows: np.ndarray, fb_t: np.ndarray, hann: np.ndarray) -> np.ndarray:
    """(B, 144160) windows -> (B, 900, 120) P.808 input: dB mel power, scaled (x+40)/40.

    Mirrors DNSMOS: the last 160 samples of each window are dropped, then a centred
    (zero-padded) STFT with n_fft=321, hop=160, a power mel spectrogram, ``power_to_db``
    relative to each window's maximum with an 80 dB floor.
    """
    from numpy.lib.stride_tricks import sliding_window_view

    x = windows[:, :-_P808_HOP]
    pad = _P808_N_FFT // 2
    xp = np.pad(x, ((0, 0), (pad, pad)))
    frames = sliding_window_view(xp, _P808_N_FFT, axis=1)[:, ::_P808_HOP]
    power = np.abs(np.fft.rfft(frames * hann, axis=-1)) ** 2
    mel = (power.astype(np.float32) @ fb_t).astype(np.float64)
    db = 10.0 * np.log10(np.maximum(mel, 1e-10))
    ref = 10.0 * np.log10(np.maximum(mel.max(axis=(1, 2), keepdims=True), 1e-10))
    db -= ref
    db = np.maximum(db, db.max(axis=(1, 2), keepdims=True) - 80.0)
    return ((db + 40.0) / 40.0).astype(np.float32)


def dnsmos(audio: np.ndarray, sr: int, *, hop_s: float = 1.0) -> dict[str, float]:
    """DNSMOS P.835 and P.808 mean opinion scores (about 1-5, higher is better).

    Returns ``dnsmos_sig`` (speech quality), ``dnsmos_bak`` (background noise),
    ``dnsmos_ovrl`` (overall) and ``dnsmos_p808``. Audio at other rates is resampled to
    16 kHz (soxr), clipped to [-1, 1] and scored as DNSMOS does: a clip shorter than the
    9.01 s model window is repeated until it fills one (so sub-second clips work too),
    the model runs on 9.01 s windows every ``hop_s`` seconds (1 s, as DNSMOS) and the
    scores are averaged over windows. Empty audio gives NaN scores.

    Matches ``speechmos.dnsmos.run`` to ~1e-4 (the mel features of the P.808 model are
    computed here with numpy, so librosa is not needed); for clips longer than ~16 s the
    reference silently drops some windows through float truncation of window ends, while
    every window is scored here. Cost is one 9 s model run per window, about 0.1 s of
    CPU per second of audio at the 1 s hop; ``hop_s=9.01`` (non-overlapping windows) is
    ~10x cheaper and changes the scores by a few hundredths.

    The ONNX sessions are created once per process and are safe to share across threads.
    """
    _check_sr(sr)
    if hop_s <= 0:
        raise ValueError("hop_s must be > 0")
    keys = ("dnsmos_sig", "dnsmos_bak", "dnsmos_ovrl", "dnsmos_p808")
    x = _mono(audio)
    if x.size == 0:
        return dict.fromkeys(keys, math.nan)
    if sr != DNSMOS_SAMPLE_RATE:
        import soxr

        x = np.asarray(soxr.resample(x, sr, DNSMOS_SAMPLE_RATE, quality="HQ"), np.float64)
        if x.size == 0:
            return dict.fromkeys(keys, math.nan)
    x = np.clip(x, -1.0, 1.0).astype(np.float32)
    while x.size < _DNSMOS_WINDOW:  # DNSMOS' own rule: repeat the clip
        x = np.concatenate([x, x])

    fs = DNSMOS_SAMPLE_RATE
    hop = max(1, int(round(hop_s * fs)))
    if hop == fs:  # the reference window count (it may leave up to ~2 s unscored)
        n_windows = int(math.floor(x.size / fs) - _DNSMOS_INPUT_S) + 1
    else:
        n_windows = (x.size - _DNSMOS_WINDOW) // hop + 1
    starts = [i * hop for i in range(max(n_windows, 1)) if i * hop + _DNSMOS_WINDOW <= x.size]

    primary, p808, fb_t, hann = _load_dnsmos()
    raw: list[np.ndarray] = []
    p808_scores: list[np.ndarray] = []
    for b in range(0, len(starts), _DNSMOS_BATCH):
        batch = np.stack([x[s : s + _DNSMOS_WINDOW] for s in starts[b : b + _DNSMOS_BATCH]])
        raw.append(np.asarray(primary.run(None, {"input_1": batch})[0], np.float64))
        feats = _p808_features(batch, fb_t, hann)
        p808_scores.append(np.asarray(p808.run(None, {"input_1": feats})[0], np.float64))
    sbo = np.concatenate(raw)  # (windows, 3): raw sig, bak, ovrl
    return {
        "dnsmos_sig": float(np.mean(np.polyval(_POLY_SIG, sbo[:, 0]))),
        "dnsmos_bak": float(np.mean(np.polyval(_POLY_BAK, sbo[:, 1]))),
        "dnsmos_ovrl": float(np.mean(np.polyval(_POLY_OVRL, sbo[:, 2]))),
        "dnsmos_p808": float(np.mean(np.concatenate(p808_scores))),
    }


# ======================================================================================
# SNR
# ======================================================================================

SNR_MIN_DB = -10.0
SNR_MAX_DB = 100.0
_WADA_ALPHA = 0.4  # gamma shape of the speech amplitude distribution (Kim & Stern 2008)
_wada_lock = threading.Lock()
_wada_curve: tuple[np.ndarray, np.ndarray] | None = None


def _wada_table() -> tuple[np.ndarray, np.ndarray]:
    """(G values, SNR dB) for speech with gamma(0.4) amplitudes plus Gaussian noise.

    ``G = log E|z| - E log|z|`` of ``z = s + n`` is computed by deterministic quadrature
    over a quantile grid of the two distributions (speech scaled to unit power, noise
    to the SNR); G rises monotonically with SNR, so the curve can be inverted.
    """
    global _wada_curve
    curve = _wada_curve
    if curve is not None:
        return curve
    with _wada_lock:
        if _wada_curve is None:
            from scipy.special import gammaincinv, ndtri

            n = 600
            u = (np.arange(n) + 0.5) / n
            speech = gammaincinv(_WADA_ALPHA, u) / math.sqrt(_WADA_ALPHA * (_WADA_ALPHA + 1))
            noise = ndtri(u)
            snrs = np.arange(-20.0, 100.5, 0.5)
            g = np.empty_like(snrs)
            for i, snr in enumerate(snrs):
                z = np.abs(speech[:, None] + 10.0 ** (-snr / 20.0) * noise[None, :])
                z = np.maximum(z, 1e-300)
                g[i] = math.log(z.mean()) - np.log(z).mean()
            g = np.maximum.accumulate(g)  # guard against quadrature wiggles at the top
            _wada_curve = (g, snrs)
        return _wada_curve


def _snr_wada(x: np.ndarray) -> float:
    z = np.abs(x[x != 0.0])  # digital silence carries no information about the noise
    if z.size < 16:
        return math.nan
    z = z / z.max()
    g_obs = math.log(float(z.mean())) - float(np.log(z).mean())
    g, snrs = _wada_table()
    if g_obs <= g[0]:
        return float(snrs[0])
    if g_obs >= g[-1]:
        return float(snrs[-1])
    return float(np.interp(g_obs, g, snrs))


def _snr_energy(x: np.ndarray, sr: int, frame_s: float = 0.02, percentile: float = 10.0) -> float:
    n = max(1, int(round(frame_s * sr)))
    k = x.size // n
    if k < 10:
        return math.nan
    power = np.mean(x[: k * n].reshape(k, n) ** 2, axis=1)
    noise = float(np.percentile(power, percentile))
    total = float(power.mean())
    if total <= 0.0:
        return math.nan
    if noise <= 0.0:
        return SNR_MAX_DB
    return 10.0 * math.log10(max(total - noise, 1e-30) / noise)


def snr_db(audio: np.ndarray, sr: int, method: Literal["wada", "energy"] = "wada") -> float:
    """Blind (no reference) signal-to-noise ratio in dB, clamped to [-10, 100].

    ``wada`` (default): Kim & Stern's waveform-amplitude-distribution method -- the
    amplitude statistic ``G = log mean|x| - mean log|x|`` of the whole clip is mapped to
    an SNR through the curve for gamma-distributed (shape 0.4) speech in Gaussian noise
    (:func:`_wada_table`). It needs no pauses, assumes roughly stationary noise, and is
    most informative between about -5 and 40 dB (above that the curve is flat).

    ``energy``: 20 ms frame powers; the 10th-percentile frame power is taken as the noise
    power and ``SNR = (mean power - noise) / noise``. It needs pauses (at least ~10 % of
    the frames without speech) and is then accurate for stationary noise.

    Both define SNR as the ratio of the clip's speech power to its noise power (pauses
    included). Empty or all-zero audio gives NaN.
    """
    _check_sr(sr)
    x = _mono(audio)
    if x.size == 0 or not np.any(x):
        return math.nan
    x = x - x.mean()
    if method == "wada":
        value = _snr_wada(x)
    elif method == "energy":
        value = _snr_energy(x, sr)
    else:
        raise ValueError(f"unknown SNR method {method!r}")
    if math.isnan(value):
        return value
    return float(min(max(value, SNR_MIN_DB), SNR_MAX_DB))


# ======================================================================================
# Clipping
# ======================================================================================


def clipping_ratio(audio: np.ndarray, *, level: float = 0.999, min_run: int = 3) -> float:
    """Fraction of samples that sit in clipped runs (0 for clean audio).

    A sample counts when it belongs to a run of at least ``min_run`` consecutive samples
    of one sign whose magnitude is at the clip level, where the clip level is
    ``min(level, 0.9999 * peak)``: full-scale clipping (|x| >= 0.999) as well as
    flat tops of audio that was clipped and then scaled down (runs at the clip's own
    peak). Isolated peaks, like a peak-normalised clip's single sample at 1.0, do not
    count; unclipped speech practically never holds its peak for 3 samples. Silent
    (peak < 1e-3) or empty audio gives 0.
    """
    if min_run < 1:
        raise ValueError("min_run must be >= 1")
    x = _mono(audio)
    if x.size == 0:
        return 0.0
    peak = float(np.max(np.abs(x)))
    if peak < 1e-3:
        return 0.0
    thr = min(level, peak * 0.9999)
    state = np.where(x >= thr, 1, np.where(x <= -thr, -1, 0)).astype(np.int8)
    # run-length encode the states and keep non-zero runs of length >= min_run
    change = np.flatnonzero(np.diff(state)) + 1
    starts = np.concatenate([[0], change])
    lengths = np.diff(np.concatenate([starts, [state.size]]))
    values = state[starts]
    clipped = int(lengths[(values != 0) & (lengths >= min_run)].sum())
    return clipped / x.size


# ======================================================================================
# Bandwidth
# ======================================================================================


def bandwidth_hz(
    audio: np.ndarray, sr: int, *, floor_db: float = 50.0, gate_db: float = 60.0
) -> float:
    """Effective bandwidth: the highest frequency whose long-term level is within
    ``floor_db`` (50 dB) of the spectrum's peak.

    The long-term average spectrum is the mean power of ~32 ms Hann frames (50 %
    overlap), using only frames within ``gate_db`` of the loudest frame (digital
    silence and near-silent gaps are ignored), smoothed over ~100 Hz. The peak is
    searched above 40 Hz so DC offset or rumble cannot hide the band edge. Audio band-
    limited by a codec or a lower original sample rate (e.g. 8 kHz telephone speech
    upsampled to 16 kHz) gives about that original Nyquist frequency; full-band speech
    gives close to ``sr / 2``. Empty or silent audio gives 0.
    """
    _check_sr(sr)
    x = _mono(audio)
    if x.size == 0 or not np.any(x):
        return 0.0
    x = x - x.mean()
    n_fft = 1 << max(6, int(math.ceil(math.log2(0.032 * sr))))
    if x.size < n_fft:
        x = np.pad(x, (0, n_fft - x.size))
    hop = n_fft // 2
    n_frames = 1 + (x.size - n_fft) // hop
    from numpy.lib.stride_tricks import sliding_window_view

    frames = sliding_window_view(x, n_fft)[::hop][:n_frames]
    window = np.hanning(n_fft + 2)[1:-1]
    spec = np.abs(np.fft.rfft(frames * window, axis=-1)) ** 2
    energy = spec.sum(axis=1)
    if energy.max() <= 0.0:
        return 0.0
    active = energy >= energy.max() * 10.0 ** (-gate_db / 10.0)
    ltas = spec[active].mean(axis=0)
    freqs = np.fft.rfftfreq(n_fft, d=1.0 / sr)
    width = max(1, int(round(100.0 / (sr / n_fft))))
    if width > 1:
        ltas = np.convolve(ltas, np.ones(width) / width, mode="same")
    level = 10.0 * np.log10(np.maximum(ltas, 1e-300))
    search = freqs >= 40.0
    peak = float(level[search].max())
    above = np.flatnonzero(search & (level >= peak - floor_db))
    return float(freqs[above[-1]]) if above.size else 0.0


# ======================================================================================
# Text: normalisation, speaking rate
# ======================================================================================

_APOSTROPHES = "'\u2019\u02bc`\u00b4"


def _is_cjk(ch: str) -> bool:
    """Han ideographs and kana: scripts written without spaces between words."""
    o = ord(ch)
    return (
        0x3040 <= o <= 0x30FF  # hiragana, katakana
        or 0x31F0 <= o <= 0x31FF  # katakana extensions
        or 0x3400 <= o <= 0x4DBF  # CJK extension A
        or 0x4E00 <= o <= 0x9FFF  # CJK unified ideographs
        or 0xF900 <= o <= 0xFAFF  # compatibility ideographs
        or 0xFF66 <= o <= 0xFF9F  # half-width katakana
        or 0x20000 <= o <= 0x3134F  # extensions B-G
    )


def _is_wordchar(ch: str) -> bool:
    """Letters (with their combining marks) and digits; not spaces, punctuation, symbols."""
    return unicodedata.category(ch)[0] in "LMN"


def normalize_text(text: str) -> str:
    """NFKC, case-folded, apostrophes removed, other punctuation/symbols -> space,
    whitespace collapsed. Used to compare transcripts with the known phrases."""
    text = unicodedata.normalize("NFKC", text).casefold()
    out = []
    for ch in text:
        if ch in _APOSTROPHES:
            continue
        out.append(ch if _is_wordchar(ch) else " ")
    return " ".join("".join(out).split())


def _tokens(text: str) -> list[str]:
    """Words of normalised text; CJK characters (written without spaces) are one each."""
    tokens: list[str] = []
    for word in normalize_text(text).split():
        if not any(_is_cjk(c) for c in word):
            tokens.append(word)
            continue
        buf = ""
        for c in word:
            if _is_cjk(c):
                if buf:
                    tokens.append(buf)
                    buf = ""
                tokens.append(c)
            else:
                buf += c
        if buf:
            tokens.append(buf)
    return tokens


def speaking_rate(text: str, duration: float) -> dict[str, float]:
    """``chars_per_s`` and ``words_per_s`` of a transcript spoken in ``duration`` seconds.

    Characters are letters, combining marks and digits (no spaces, punctuation or
    symbols). Words are whitespace-separated tokens, except that each CJK character
    (Han, hiragana, katakana -- scripts written without spaces) counts as one word.
    A non-positive or non-finite duration gives NaN rates.
    """
    if not (duration > 0 and math.isfinite(duration)):
        return {"chars_per_s": math.nan, "words_per_s": math.nan}
    norm = unicodedata.normalize("NFKC", text)
    chars = sum(1 for c in norm if _is_wordchar(c))
    words = len(_tokens(text))
    return {"chars_per_s": chars / duration, "words_per_s": words / duration}


# ======================================================================================
# Text: language identification
# ======================================================================================

_lingua_lock = threading.Lock()
_detectors: dict[tuple[tuple[str, ...] | None, bool], Any] = {}


def _detector(languages: tuple[str, ...] | None, low_accuracy: bool) -> Any:
    key = (tuple(sorted({c.lower() for c in languages})) if languages else None, low_accuracy)
    det = _detectors.get(key)
    if det is not None:
        return det
    with _lingua_lock:
        det = _detectors.get(key)
        if det is None:
            from lingua import IsoCode639_1, LanguageDetectorBuilder

            if key[0] is None:
                builder = LanguageDetectorBuilder.from_all_languages()
            else:
                if len(key[0]) < 2:
                    raise ValueError("text_language needs at least two candidate languages")
                try:
                    codes = [IsoCode639_1.from_str(c) for c in key[0]]
                except ValueError as exc:
                    raise ValueError(f"unknown ISO 639-1 code in {languages!r}") from exc
                builder = LanguageDetectorBuilder.from_iso_codes_639_1(*codes)
            if low_accuracy:
                builder = builder.with_low_accuracy_mode()
            det = builder.build()
            _detectors[key] = det
        return det


def text_language(
    text: str,
    languages: tuple[str, ...] | None = None,
    *,
    min_chars: int = 3,
    low_accuracy: bool = False,
) -> tuple[str | None, float]:
    """Language of ``text`` as (ISO 639-1 code, confidence in [0, 1]), offline (lingua).

    ``languages`` restricts the candidates to those ISO 639-1 codes (at least two); by
    default all of lingua's 75 languages compete. A detector is built once per
    (languages, low_accuracy) and cached; its n-gram models load lazily on first use
    (all languages, high accuracy: ~6 s and ~0.9 GB once per process; a small subset or
    ``low_accuracy=True`` is much lighter, but low accuracy is poor on short text).
    Text with fewer than ``min_chars`` letters, or that lingua cannot score, gives
    ``(None, 0.0)``.
    """
    letters = sum(1 for c in text if unicodedata.category(c).startswith("L"))
    if letters < min_chars:
        return None, 0.0
    values = _detector(languages, low_accuracy).compute_language_confidence_values(text)
    if not values or values[0].value <= 0.0:
        return None, 0.0
    best = values[0]
    return best.language.iso_code_639_1.name.lower(), float(best.value)


# ======================================================================================
# Text: hallucination signals
# ======================================================================================

#: Well-known Whisper hallucinations (subtitle credits and video outros learnt from web
#: subtitles). "Anywhere" phrases are credits that do not occur in real speech and count
#: wherever they appear; "whole" phrases can be genuine speech, so they count only when
#: they make up most of the transcript (see :func:`hallucination_signals`).
KNOWN_HALLUCINATIONS: dict[str, tuple[str, ...]] = {
    "anywhere": (
        "amara.org",
        "subtitles by the amara.org community",
        "subtitles by",
        "subtitled by",
        "transcribed by",
        "transcription by castingwords",
        "captioning by",
        "captions by",
        "subtítulos realizados por la comunidad de amara.org",
        "subtítulos por la comunidad de amara.org",
        "sous-titres réalisés par la communauté d'amara.org",
        "sous-titrage société radio-canada",
        "sous-titrage st' 501",
        "untertitel der amara.org-community",
        "untertitel im auftrag des zdf",
        "untertitelung des zdf",
        "untertitelung aufgrund der amara.org-community",
        "sottotitoli creati dalla comunità amara.org",
        "sottotitoli a cura di qtss",
        "legendas pela comunidade amara.org",
        "napisy stworzone przez społeczność amara.org",
        "ondertiteling door de amara.org gemeenschap",
        "субтитры создавались сообществом amara.org",
        "субтитры сделал dimatorzok",
        "редактор субтитров",
        "字幕由amara.org社区提供",
        "字幕志愿者",
        "请不吝点赞 订阅 转发 打赏支持明镜与点点栏目",
    ),
    "whole": (
        "thanks for watching",
        "thank you for watching",
        "thank you so much for watching",
        "thank you very much for watching",
        "thanks for watching and see you next time",
        "please subscribe",
        "please subscribe to my channel",
        "like and subscribe",
        "dont forget to like and subscribe",
        "subscribe to my channel",
        "see you in the next video",
        "see you next time",
        "i'll see you in the next video",
        "gracias por ver",
        "gracias por ver el video",
        "merci d'avoir regardé",
        "merci d'avoir regardé cette vidéo",
        "danke fürs zuschauen",
        "vielen dank fürs zuschauen",
        "grazie per la visione",
        "obrigado por assistir",
        "продолжение следует",
        "спасибо за просмотр",
        "ご視聴ありがとうございました",
        "시청해주셔서 감사합니다",
        "谢谢观看",
        "感谢观看",
    ),
}

_COMPRESSION_LIMIT = 2.4  # Whisper's default compression_ratio_threshold
_NO_SPEECH_LIMIT = 0.6  # Whisper's default no_speech_threshold
_REPEAT_LIMIT = 0.5
_MIN_TRIGRAMS = 4
_WHOLE_COVERAGE = 0.6  # a "whole" phrase must cover this share of the transcript's chars

_phrase_cache: tuple[tuple[tuple[str, str], ...], tuple[tuple[str, str], ...]] | None = None


def _phrases() -> tuple[tuple[tuple[str, str], ...], tuple[tuple[str, str], ...]]:
    """(anywhere, whole) as (original, normalised) pairs, longest first."""
    global _phrase_cache
    if _phrase_cache is None:
        def prep(items: Sequence[str]) -> tuple[tuple[str, str], ...]:
            pairs = {(p, normalize_text(p)) for p in items}
            return tuple(sorted(pairs, key=lambda pn: (-len(pn[1]), pn[1])))

        _phrase_cache = (prep(KNOWN_HALLUCINATIONS["anywhere"]), prep(KNOWN_HALLUCINATIONS["whole"]))
    return _phrase_cache


def _contains(haystack: str, needle: str) -> bool:
    """``needle`` occurs in ``haystack`` on word boundaries (both normalised).

    Phrases of space-less scripts (CJK) match as plain substrings.
    """
    if not needle:
        return False
    if any(_is_cjk(c) for c in needle):
        return needle.replace(" ", "") in haystack.replace(" ", "")
    return f" {needle} " in f" {haystack} "


def _known_phrase(norm: str) -> str | None:
    if not norm:
        return None
    anywhere, whole = _phrases()
    for original, phrase in anywhere:
        if _contains(norm, phrase):
            return original
    total = len(norm.replace(" ", ""))
    # outro phrases count when together they make up most of the transcript
    # ("thank you very much for watching and i'll see you in the next video")
    covered = [False] * len(norm)
    first: str | None = None
    for original, phrase in whole:
        if not _contains(norm, phrase):
            continue
        start = f" {norm} ".find(f" {phrase} ") if not any(_is_cjk(c) for c in phrase) else -1
        if start < 0:
            if len(phrase.replace(" ", "")) >= _WHOLE_COVERAGE * total:
                return original
            continue
        for i in range(start, min(start + len(phrase), len(norm))):
            covered[i] = True
        first = first or original
    n_cov = sum(1 for i, c in enumerate(covered) if c and norm[i] != " ")
    if first is not None and n_cov >= _WHOLE_COVERAGE * total:
        return first
    return None


def max_repeat_run(tokens: Sequence[str], max_phrase: int = 10) -> int:
    """Longest run of one word or phrase repeated back to back (1 if nothing repeats)."""
    if not tokens:
        return 0
    best = 1
    n_tok = len(tokens)
    for size in range(1, min(max_phrase, n_tok // 2) + 1):
        # tokens[i] == tokens[i + size] for a stretch of m positions means the phrase of
        # length ``size`` starting there repeats 1 + m // size times
        run = 0
        for i in range(n_tok - size):
            if tokens[i] == tokens[i + size]:
                run += 1
                best = max(best, 1 + run // size)
            else:
                run = 0
    return best


def text_compression_ratio(text: str) -> float:
    """Whisper's gzip compression ratio: UTF-8 bytes / zlib-compressed bytes."""
    data = text.encode("utf-8")
    return len(data) / len(zlib.compress(data))


def hallucination_signals(
    text: str,
    compression_ratio: float | None = None,
    no_speech_prob: float | None = None,
) -> dict[str, Any]:
    """Signals that an ASR transcript (one segment) is a hallucination.

    * ``repeat_ngram_ratio``: share of word 3-grams that repeat an earlier 3-gram
      (0 with fewer than two 3-grams).
    * ``max_repeat_run``: the most back-to-back repetitions of one word or phrase of up
      to 10 words ("the the the" -> 3; 0 for empty text).
    * ``known_phrase``: the matching entry of :data:`KNOWN_HALLUCINATIONS` or None;
      matching is on normalised text (:func:`normalize_text`: case, punctuation and
      apostrophes ignored) and on word boundaries. "Whole" phrases must cover >= 60 %
      of the transcript's characters ("Thanks for watching!" counts, a long sentence
      ending with "thanks for watching" does not).
    * ``text_compression_ratio``: Whisper's zlib ratio computed on ``text``.
    * ``hallucination``: any of: a known phrase; compression ratio > 2.4 (the given
      ``compression_ratio`` if not None, as the decoder reported it, else the computed
      one); ``repeat_ngram_ratio`` > 0.5 over >= 4 trigrams; ``no_speech_prob`` > 0.6
      with non-empty text.
    * ``reasons``: which of those fired, in that order, as ``known_phrase``,
      ``compression_ratio``, ``repeated_ngrams``, ``no_speech`` (empty when none).
    """
    norm = normalize_text(text)
    tokens = _tokens(text)
    trigrams = [tuple(tokens[i : i + 3]) for i in range(len(tokens) - 2)]
    repeat_ratio = 1.0 - len(set(trigrams)) / len(trigrams) if trigrams else 0.0
    phrase = _known_phrase(norm)
    computed = text_compression_ratio(text)
    ratio = computed if compression_ratio is None else float(compression_ratio)
    reasons: list[str] = []
    if phrase is not None:
        reasons.append("known_phrase")
    if ratio > _COMPRESSION_LIMIT:
        reasons.append("compression_ratio")
    if repeat_ratio > _REPEAT_LIMIT and len(trigrams) >= _MIN_TRIGRAMS:
        reasons.append("repeated_ngrams")
    if no_speech_prob is not None and no_speech_prob > _NO_SPEECH_LIMIT and norm:
        reasons.append("no_speech")
    return {
        "repeat_ngram_ratio": float(repeat_ratio),
        "max_repeat_run": int(max_repeat_run(tokens)),
        "known_phrase": phrase,
        "text_compression_ratio": float(computed),
        "hallucination": bool(reasons),
        "reasons": reasons,
    }

