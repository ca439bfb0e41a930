"""Silero voice activity detection, from the weights that ship with ``silero-vad``.

Audio is brought to mono float32 at 16 kHz first (:func:`to_mono_16k`: other rates are
resampled with a streaming soxr resampler in blocks, so no intermediate copies beyond the
16 kHz signal). ``silero_vad.get_speech_timestamps`` then runs on a zero-copy tensor view
of the 16 kHz signal (it steps through 512-sample frames and keeps one probability per
frame, ~0.1 MB per hour). Long audio is read :data:`CHUNK_S` seconds at a time
(:func:`speech_regions_chunked`), joining regions cut by a chunk boundary.

The stateful VAD model is kept per thread, so :func:`speech_regions` is thread-safe. Note
that importing ``silero_vad`` calls ``torch.set_num_threads(1)``; this module restores
the previous value.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np

#: ``read(a, b)``: samples ``[a, b)`` of the audio, mono float32 at 16 kHz
Reader = Callable[[int, int], np.ndarray]

__all__ = [
    "CHUNK_S",
    "SAMPLE_RATE",
    "Reader",
    "load_vad",
    "speech_regions",
    "speech_regions_16k",
    "speech_regions_chunked",
    "to_mono_16k",
]

#: Sample rate of the VAD (and of the speaker encoder).
SAMPLE_RATE = 16000
#: Audio longer than this is read, VAD-ed and embedded this many seconds at a time
#: (:func:`speech_regions_chunked`, :func:`speechmill.stages.audio_models.speaker.diarize_stream`),
#: so memory does not grow with a recording's length.
CHUNK_S = 300.0
#: Speech regions of two chunks that meet within this many samples of the boundary
#: are one region (the VAD closes a region at the end of its input).
_JOIN = SAMPLE_RATE // 10

_RESAMPLE_BLOCK = SAMPLE_RATE * 60
_VAD_OPTIONS: dict[str, Any] = {
    "threshold": 0.5,
    "min_speech_duration_ms": 250,
    "min_silence_duration_ms": 100,
    "speech_pad_ms": 30,
}

_load_lock = threading.Lock()
_vad_local = threading.local()


_silero_mod: Any = None


def _import_silero() -> Any:
    """The ``silero_vad`` module, imported once; undoes its ``set_num_threads(1)``."""
    global _silero_mod
    if _silero_mod is None:
        with _load_lock:
            if _silero_mod is None:
                import torch

                n = torch.get_num_threads()
                try:
                    import silero_vad
                finally:
                    torch.set_num_threads(n)
                _silero_mod = silero_vad
    return _silero_mod


def load_vad() -> Any:
    """The Silero VAD model of this thread (loaded once per thread: it is stateful)."""
    model = getattr(_vad_local, "model", None)
    if model is None:
        silero_vad = _import_silero()
        with _load_lock, warnings.catch_warnings():
            # silero's loader uses deprecated importlib/torch.jit APIs; keep logs clean
            warnings.simplefilter("ignore", DeprecationWarning)
            model = silero_vad.load_silero_vad()
        _vad_local.model = model
    return model


def to_mono_16k(audio: np.ndarray, sr: int) -> np.ndarray:
    """``audio`` (1-D or ``(samples, channels)``, float or integer PCM, any rate) as mono
    float32 at :data:`SAMPLE_RATE`; non-finite samples become 0."""
    x = np.asarray(audio)
    if x.ndim == 2:  # (samples, channels), the soundfile layout
        x = x.mean(axis=1)
    elif x.ndim != 1:
        raise ValueError(f"audio must be 1-D or (samples, channels), got shape {x.shape}")
    if np.issubdtype(x.dtype, np.integer):
        x = x.astype(np.float32) / float(np.iinfo(x.dtype).max)
    x = x.astype(np.float32, copy=False)
    for start in range(0, len(x), _RESAMPLE_BLOCK):  # blockwise: no full-size mask
        if not np.all(np.isfinite(x[start:start + _RESAMPLE_BLOCK])):
            x = np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
            break
    if sr == SAMPLE_RATE:
        return x
    import soxr

    out = np.zeros(int(np.ceil(len(x) * SAMPLE_RATE / sr)), dtype=np.float32)
    stream = soxr.ResampleStream(sr, SAMPLE_RATE, 1, dtype="float32", quality="HQ")
    block = max(1, int(_RESAMPLE_BLOCK * sr / SAMPLE_RATE))
    pos = 0
    for start in range(0, max(len(x), 1), block):
        last = start + block >= len(x)
        y = stream.resample_chunk(x[start:start + block], last=last)
        n = min(len(y), len(out) - pos)
        out[pos:pos + n] = y[:n]
        pos += n
    return out


def speech_regions_16k(x: np.ndarray) -> list[tuple[int, int]]:
    """Speech regions ``(start, end)`` in samples of ``x`` (mono float32, 16 kHz)."""
    if len(x) == 0:
        return []
    import torch

    silero_vad = _import_silero()
    model = load_vad()
    with warnings.catch_warnings():  # read-only input: torch warns, but nothing writes
        warnings.simplefilter("ignore", UserWarning)
        tensor = torch.from_numpy(x)  # zero-copy view
    with torch.inference_mode():
        stamps = silero_vad.get_speech_timestamps(tensor, model, sampling_rate=SAMPLE_RATE,
                                                  **_VAD_OPTIONS)
    return [(int(s["start"]), int(s["end"])) for s in stamps if s["end"] > s["start"]]


def speech_regions_chunked(read: Reader, n: int, chunk: int) -> list[tuple[int, int]]:
    """VAD regions of ``n`` samples read ``chunk`` at a time; a region cut by a chunk
    boundary is joined again."""
    regions: list[tuple[int, int]] = []
    for a in range(0, n, chunk):
        for s, e in speech_regions_16k(read(a, min(a + chunk, n))):
            s, e = s + a, e + a
            if regions and a > 0 and regions[-1][1] >= a - _JOIN and s <= a + _JOIN:
                regions[-1] = (regions[-1][0], e)
            else:
                regions.append((s, e))
    return regions


def speech_regions(audio: np.ndarray, sr: int) -> list[tuple[float, float]]:
    """Silero VAD speech regions ``(start_s, end_s)`` of ``audio`` (any rate, mono)."""
    x = to_mono_16k(audio, sr)
    return [(s / SAMPLE_RATE, e / SAMPLE_RATE) for s, e in speech_regions_16k(x)]
