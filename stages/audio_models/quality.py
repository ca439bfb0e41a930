"""Per-clip audio quality signals (the ``annotate`` stage, voice bank and synthesis QC).

Pure functions over a mono float waveform (values in [-1, 1]); none of them touches files
or pipeline state. Heavy libraries (onnxruntime, soxr) are imported lazily, and their
models are built once per process and shared by all threads.

* :func:`dnsmos` -- DNSMOS P.835 (SIG/BAK/OVRL) and P.808 MOS from the ONNX models that
  ship inside the ``speechmos`` package.
* :func:`snr_db` -- blind SNR estimate (WADA-SNR by default, or an energy-percentile one).
* :func:`clipping_ratio` -- fraction of samples in clipped (flat-topped) runs.
* :func:`bandwidth_hz` -- effective audio bandwidth from the long-term average spectrum.

Multi-channel input is accepted as ``(samples, channels)`` and averaged to mono;
integer PCM is scaled to [-1, 1); non-finite samples are treated as 0.
"""

from __future__ import annotations

import math
import os
import threading
from typing import Any, Literal

import numpy as np

__all__ = [
    "DNSMOS_SAMPLE_RATE",
    "bandwidth_hz",
    "clipping_ratio",
    "dnsmos",
    "snr_db",
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
