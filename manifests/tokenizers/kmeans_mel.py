"""``kmeans-mel``: the offline default audio tokenizer (k-means units of log-mel frames).

No model weights, no torch: numpy for the features, soxr for resampling. It gives a
pipeline discrete units that work everywhere (tests, the demo, air-gapped clusters) and
have the same shape and rate as HuBERT units, so every layout and exporter can be
exercised without downloading anything; use ``hubert-kmeans`` for semantic units.

Features (``features(audio, sr) -> [frames, n_mels]`` float32):

* audio resampled to 16 kHz with soxr (HQ);
* frames of 25 ms (400 samples), hop 20 ms (320 samples) -> **50 frames/s**, the frame
  rate of HuBERT/wav2vec2 units (``frames = 1 + (n - 400) // 320``, the same count HuBERT
  gives; 1 frame for 0 < n < 400 samples, 0 for empty audio), so
  ``frames = duration * 50 +- 1``;
* per frame: DC removed, Hann window, 512-point FFT power spectrum, ``n_mels`` triangular
  filters on the HTK mel scale over 0-8 kHz, ``log10(max(energy, 1e-10))``;
* optional per-utterance mean/variance normalisation (``cmvn=True``; off by default: it
  removes level and makes any stationary sound, a tone or noise, the zero vector).

Units (``encode(audio, sr) -> [1, frames]`` int64): the nearest centroid of a k-means
codebook ``[n_units, n_mels]`` (:mod:`.kmeans`); with ``dedup: true`` consecutive repeats
are dropped (SpeechGPT-style; fewer frames, recorded in ``info.extra``). The codebook comes from
``cfg.codebook`` (a ``.npy``/``.npz`` written by :func:`.kmeans.save_codebook`) or from
the tokenize stage's fit over its input (:func:`.kmeans.fit_codebook`). ``info.version``
is the codebook's hash, so shards name the exact codebook their units came from.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np
import soxr

from speechmill.manifests.tokenizers.base import (
    AudioTokenizerConfig,
    CodecInfo,
    FeatureKMeansTokenizer,
    register_audio,
)
from speechmill.manifests.tokenizers.kmeans import (
    assign,
    codebook_hash,
    dedup_consecutive,
    load_codebook,
)

NAME = "kmeans-mel"
SAMPLE_RATE = 16000
WIN = 400  # 25 ms
HOP = 320  # 20 ms -> 50 Hz
N_FFT = 512
FMIN, FMAX = 0.0, 8000.0
LOG_FLOOR = 1e-10
FRAME_RATE = SAMPLE_RATE / HOP  # 50.0
_BLOCK = 4096  # frames per STFT block (bounded memory for hour-long audio)


def _hz_to_mel(f: np.ndarray | float) -> np.ndarray:
    return 2595.0 * np.log10(1.0 + np.asarray(f, np.float64) / 700.0)


def _mel_to_hz(m: np.ndarray) -> np.ndarray:
    return 700.0 * (10.0 ** (np.asarray(m, np.float64) / 2595.0) - 1.0)


@lru_cache(maxsize=8)
def mel_filterbank(n_mels: int, n_fft: int = N_FFT, sr: int = SAMPLE_RATE,
                   fmin: float = FMIN, fmax: float = FMAX) -> np.ndarray:
    """``[n_fft // 2 + 1, n_mels]`` float32 triangular filters (HTK mel scale, peak 1).
    A filter too narrow to cover any FFT bin gets weight 1 on the bin nearest its
    centre, so no mel channel is constant."""
    bins = np.linspace(0.0, sr / 2.0, n_fft // 2 + 1)
    pts = _mel_to_hz(np.linspace(_hz_to_mel(fmin), _hz_to_mel(fmax), n_mels + 2))
    lo, ce, hi = pts[:-2, None], pts[1:-1, None], pts[2:, None]
    up = (bins[None, :] - lo) / np.maximum(ce - lo, 1e-9)
    down = (hi - bins[None, :]) / np.maximum(hi - ce, 1e-9)
    fb = np.clip(np.minimum(up, down), 0.0, None)  # [n_mels, bins]
    for i in np.flatnonzero(fb.sum(axis=1) == 0):
        fb[i, int(np.argmin(np.abs(bins - pts[i + 1])))] = 1.0
    out = np.ascontiguousarray(fb.T, dtype=np.float32)
    out.setflags(write=False)
    return out


def n_frames(n_samples: int) -> int:
    """Frames for ``n_samples`` of 16 kHz audio: ``1 + (n - 400) // 320`` (HuBERT's
    count), 1 for ``0 < n < 400``, 0 for ``n == 0``."""
    if n_samples <= 0:
        return 0
    return 1 + max(0, n_samples - WIN) // HOP


def _mono(audio: np.ndarray) -> np.ndarray:
    a = np.asarray(audio)
    if a.ndim == 2 and 1 in a.shape:
        a = a.reshape(-1)
    if a.ndim != 1:
        raise ValueError(f"kmeans-mel: audio must be mono 1-D, got shape {a.shape}")
    a = a.astype(np.float32, copy=False)
    if a.size and not np.all(np.isfinite(a)):
        raise ValueError("kmeans-mel: audio contains NaN or infinite samples")
    return a


def log_mel(audio: np.ndarray, sr: int, n_mels: int = 80, cmvn: bool = False) -> np.ndarray:
    """Log-mel frames ``[frames, n_mels]`` float32 of mono ``audio`` at ``sr`` (see the
    module docstring for the exact recipe)."""
    a = _mono(audio)
    if sr <= 0:
        raise ValueError(f"kmeans-mel: bad sample rate {sr}")
    if sr != SAMPLE_RATE and a.size:
        a = np.asarray(soxr.resample(a, sr, SAMPLE_RATE, quality="HQ"), np.float32)
    nf = n_frames(a.size)
    out = np.empty((nf, n_mels), np.float32)
    if nf == 0:
        return out
    if a.size < WIN:
        a = np.pad(a, (0, WIN - a.size))
    fb = mel_filterbank(n_mels)
    win = np.hanning(WIN + 1)[:-1].astype(np.float32)  # periodic Hann
    frames_view = np.lib.stride_tricks.sliding_window_view(a, WIN)[::HOP]
    for s in range(0, nf, _BLOCK):
        fr = np.array(frames_view[s : s + _BLOCK], dtype=np.float32)
        fr -= fr.mean(axis=1, keepdims=True)
        fr *= win
        spec = np.fft.rfft(fr, n=N_FFT, axis=1)
        power = (spec.real**2 + spec.imag**2).astype(np.float32)
        mel = power @ fb
        np.log10(np.maximum(mel, LOG_FLOOR), out=out[s : s + _BLOCK])
    if cmvn:
        mu = out.mean(axis=0, dtype=np.float64)
        sd = out.std(axis=0, dtype=np.float64)
        out = ((out - mu) / np.maximum(sd, 1e-3)).astype(np.float32)
    return out


class KMeansMelTokenizer(FeatureKMeansTokenizer):
    """Log-mel k-means units, one codebook of ``n_units`` at 50 Hz (16 kHz input).

    ``codebook`` is settable (``tok.codebook = centroids``); ``info`` follows it. Until
    one is set, ``features()`` works and ``encode()`` raises RuntimeError."""

    def __init__(self, n_mels: int = 80, n_units: int = 500, cmvn: bool = False,
                 codebook: np.ndarray | None = None, source: str | None = None,
                 dedup: bool = False) -> None:
        self.n_mels = int(n_mels)
        self.n_units = int(n_units)
        self.cmvn = bool(cmvn)
        self.dedup = bool(dedup)  # encode() drops consecutive repeats (SpeechGPT)
        self.source = source  # where the codebook came from (a path; not in info)
        self._codebook: np.ndarray | None = None
        self._info: CodecInfo | None = None
        if codebook is not None:
            self.codebook = codebook

    @property  # type: ignore[override]
    def codebook(self) -> np.ndarray | None:
        return self._codebook

    @codebook.setter
    def codebook(self, centroids: np.ndarray | None) -> None:
        if centroids is None:
            self._codebook = None
        else:
            c = np.asarray(centroids)
            if c.ndim != 2 or c.shape[0] < 2:
                raise ValueError(f"kmeans-mel: codebook must be [k >= 2, n_mels], got "
                                 f"shape {c.shape}")
            if c.shape[1] != self.n_mels:
                raise ValueError(f"kmeans-mel: codebook has dimension {c.shape[1]} but "
                                 f"n_mels is {self.n_mels}: set `n_mels: {c.shape[1]}` or "
                                 "use a codebook fitted with these features")
            c = np.ascontiguousarray(c, dtype=np.float32)
            if not np.all(np.isfinite(c)):
                raise ValueError("kmeans-mel: codebook contains NaN or infinite values")
            c.setflags(write=False)
            self._codebook = c
            self.n_units = int(c.shape[0])
        self._info = None

    def feature_config(self) -> dict[str, Any]:
        return {"features": "log-mel", "n_mels": self.n_mels, "cmvn": self.cmvn,
                "win_length": WIN, "hop_length": HOP, "n_fft": N_FFT, "fmin": FMIN,
                "fmax": FMAX, "mel_scale": "htk", "log": "log10", "log_floor": LOG_FLOOR,
                "window": "hann"}

    @property  # type: ignore[override]
    def info(self) -> CodecInfo:
        if self._info is None:
            c = self._codebook
            # content only (no paths): the same codebook names itself the same anywhere
            extra = {**self.feature_config(), "dedup": self.dedup}
            self._info = CodecInfo(
                name=NAME,
                version=codebook_hash(c) if c is not None else "unfitted",
                sample_rate=SAMPLE_RATE,
                frame_rate=FRAME_RATE,
                codebook_sizes=[int(c.shape[0]) if c is not None else self.n_units],
                extra=extra,
            )
        return self._info

    def features(self, audio: np.ndarray, sr: int) -> np.ndarray:
        return log_mel(audio, sr, self.n_mels, self.cmvn)

    def encode(self, audio: np.ndarray, sr: int) -> np.ndarray:
        """Units ``[1, frames]`` int64 in ``[0, n_units)``; ``frames = n_frames(n at 16 kHz)``
        (fewer with ``dedup``: consecutive repeats dropped)."""
        if self._codebook is None:
            raise RuntimeError("kmeans-mel: no codebook yet: give `codebook:` (a .npy/.npz "
                               "file) in the tokenizer config, or let the tokenize stage "
                               "fit one on its input (fit_codebook) before encoding")
        units = assign(self.features(audio, sr), self._codebook)
        if self.dedup:
            units = dedup_consecutive(units)
        return units[None, :]


def load(cfg: AudioTokenizerConfig, offline: bool = False) -> KMeansMelTokenizer:
    """The registered loader: a tokenizer with ``cfg.codebook`` loaded, or an unfitted
    one (``cfg.n_units``) when no codebook is given. Needs no network (``offline`` is
    irrelevant). A codebook's recorded feature settings (``n_mels``, ``cmvn``) must match
    the config; a codebook's own size wins over ``n_units``."""
    if cfg.codebook is None:
        return KMeansMelTokenizer(n_mels=cfg.n_mels, n_units=cfg.n_units, dedup=cfg.dedup)
    try:
        centroids, meta = load_codebook(cfg.codebook)
    except FileNotFoundError:
        raise ValueError(f"kmeans-mel: key `codebook`: file {cfg.codebook!r} does not exist "
                         "(omit `codebook` to fit one on the stage's input)") from None
    except ValueError as e:
        raise ValueError(f"kmeans-mel: key `codebook`: {e}") from None
    if meta.get("backend") not in (None, NAME):
        raise ValueError(f"kmeans-mel: key `codebook`: {cfg.codebook!r} was fitted for "
                         f"backend {meta['backend']!r}")
    feats = meta.get("features") if isinstance(meta.get("features"), dict) else meta
    n_mels_meta = feats.get("n_mels")
    if n_mels_meta is not None and int(n_mels_meta) != cfg.n_mels:
        raise ValueError(f"kmeans-mel: key `codebook`: {cfg.codebook!r} was fitted with "
                         f"n_mels={n_mels_meta} but the config says n_mels={cfg.n_mels}")
    if feats.get("features") not in (None, "log-mel"):
        raise ValueError(f"kmeans-mel: key `codebook`: {cfg.codebook!r} holds "
                         f"{feats.get('features')!r} units, not log-mel ones")
    tok = KMeansMelTokenizer(n_mels=cfg.n_mels, n_units=centroids.shape[0],
                             cmvn=bool(feats.get("cmvn", False)), source=str(cfg.codebook),
                             dedup=cfg.dedup)
    try:
        tok.codebook = centroids
    except ValueError as e:
        raise ValueError(f"key `codebook`: {e}") from None
    return tok


def expected_frames(duration_s: float) -> int:
    """Frames ``encode`` gives for ``duration_s`` seconds (at 16 kHz)."""
    return n_frames(int(round(duration_s * SAMPLE_RATE)))


register_audio(NAME, load)
