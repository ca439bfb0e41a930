"""Offline voice matching: many distinct user voices from one preset voice.

With only preset voices available (Piper, eSpeak NG, OpenAI), each bank speaker is mapped
to a *perturbed* preset voice that sounds closer to it. This is not voice cloning: the
words, rhythm and timbre are the preset's; only the pitch (f0 scale) and the vocal-tract
length (a frequency warp of the spectral envelope, which moves the formants) change.
Outputs say ``voice_source: voice_match``, never ``clone``.

How a speaker's perturbation is chosen:

1. Calibration, once per preset voice: the preset speaks ``calibration_text``; WORLD
   (``pyworld``: DIO + StoneMask f0, CheapTrick envelope, D4C aperiodicity) analyses it,
   and every (pitch factor, formant factor) of the grid is resynthesised and embedded with
   Resemblyzer's speaker encoder. Kept in memory, and in ``cache_dir`` when set.
2. Matching, once per voice: the prompt clip is embedded and its median f0 measured; among
   the grid points whose pitch factor lies within ``pitch_window`` of the prompt/preset f0
   ratio (so the pitch stays plausible), the one whose embedding has the highest cosine
   similarity to the prompt's wins.
3. Every synthesized clip of that voice is analysed with WORLD and resynthesised with
   ``f0 * pitch`` and the envelope and aperiodicity warped by ``formant``.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from speechmill.synth.tts.audio import load_prompt, resample
from speechmill.synth.tts.base import Synthesis, TTSBackend, TTSError, VoicePrompt
from speechmill.synth.tts.spec import VoiceMatchSpec

EMBED_SR = 16000
FRAME_MS = 5.0

_ENCODERS: dict[str, Any] = {}
_ENC_LOCK = threading.Lock()


def speaker_encoder(device: str = "cpu") -> Any:
    """Resemblyzer's GE2E encoder (weights ship in the package), one per process."""
    with _ENC_LOCK:
        if device not in _ENCODERS:
            from resemblyzer import VoiceEncoder

            _ENCODERS[device] = VoiceEncoder(device=device, verbose=False)
        return _ENCODERS[device]


def embed(audio: np.ndarray, sr: int, device: str = "cpu") -> np.ndarray:
    """L2-normalised 256-d Resemblyzer embedding of a clip."""
    from resemblyzer import preprocess_wav

    wav = preprocess_wav(resample(np.asarray(audio, np.float32), sr, EMBED_SR))
    if wav.shape[0] < EMBED_SR // 4:
        raise TTSError("too little speech to embed")
    return np.asarray(speaker_encoder(device).embed_utterance(wav), np.float32)


def world_analyze(x: np.ndarray, sr: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    import pyworld as pw

    x64 = np.ascontiguousarray(x, dtype=np.float64)
    f0, t = pw.dio(x64, sr, frame_period=FRAME_MS)
    f0 = pw.stonemask(x64, f0, t, sr)
    sp = pw.cheaptrick(x64, f0, t, sr)
    ap = pw.d4c(x64, f0, t, sr)
    return f0, sp, ap


def f0_track(x: np.ndarray, sr: int) -> np.ndarray:
    """f0 per FRAME_MS frame (DIO refined by StoneMask); 0 where unvoiced."""
    import pyworld as pw

    x64 = np.ascontiguousarray(x, dtype=np.float64)
    f0, t = pw.dio(x64, sr, frame_period=FRAME_MS)
    return pw.stonemask(x64, f0, t, sr)


def median_f0(x: np.ndarray, sr: int) -> float | None:
    f0 = f0_track(x, sr)
    voiced = f0[f0 > 0]
    return float(np.median(voiced)) if voiced.shape[0] >= 10 else None


def warp_frequency(env: np.ndarray, factor: float) -> np.ndarray:
    """``env`` (frames x bins) with its frequency axis scaled by ``factor``: the value at
    bin k moves to bin k * factor (factor > 1: shorter vocal tract, higher formants)."""
    if factor == 1.0:
        return env
    nb = env.shape[1]
    src = np.clip(np.arange(nb) / factor, 0, nb - 1)
    i0 = np.floor(src).astype(int)
    i1 = np.minimum(i0 + 1, nb - 1)
    w = (src - i0)[None, :]
    return np.ascontiguousarray(env[:, i0] * (1 - w) + env[:, i1] * w)


def perturb(analysis: tuple[np.ndarray, np.ndarray, np.ndarray], sr: int, pitch: float,
            formant: float) -> np.ndarray:
    import pyworld as pw

    f0, sp, ap = analysis
    y = pw.synthesize(f0 * pitch, warp_frequency(sp, formant), warp_frequency(ap, formant),
                      sr, FRAME_MS)
    return y.astype(np.float32)


def apply_match(audio: np.ndarray, sr: int, pitch: float, formant: float) -> np.ndarray:
    """``audio`` resynthesised with f0 x ``pitch`` and formants x ``formant``, at the same
    loudness (RMS), peaks kept below full scale."""
    x = np.asarray(audio, np.float32)
    if x.shape[0] < sr // 20 or (pitch == 1.0 and formant == 1.0):
        return x
    y = perturb(world_analyze(x, sr), sr, pitch, formant)[: x.shape[0]]
    rx, ry = float(np.sqrt(np.mean(x**2))), float(np.sqrt(np.mean(y**2)))
    if ry > 1e-8:
        y = y * (rx / ry)
    peak = float(np.max(np.abs(y))) if y.shape[0] else 0.0
    if peak > 0.99:
        y = y * (0.99 / peak)
    return y.astype(np.float32)


@dataclass
class Calibration:
    base_version: str
    base_f0: float | None
    grid: list[tuple[float, float]]
    embeddings: np.ndarray  # len(grid) x 256
    plain: np.ndarray  # the unmodified preset's embedding


@dataclass(frozen=True)
class Match:
    pitch: float
    formant: float
    cosine: float  # calibration sentence, matched, vs the prompt
    plain_cosine: float  # calibration sentence, unmodified preset, vs the prompt
    prompt_f0: float | None


class VoiceMatcher:
    def __init__(self, spec: VoiceMatchSpec, device: str = "cpu") -> None:
        self.spec = spec
        self.device = device
        self.calibration: Calibration | None = None
        self._matches: dict[Any, Match] = {}
        self._lock = threading.Lock()

    def _cache_file(self, base_version: str) -> Path | None:
        if not self.spec.cache_dir:
            return None
        key = json.dumps([base_version, self.spec.pitch_factors, self.spec.formant_factors,
                          self.spec.calibration_text, FRAME_MS], sort_keys=True)
        h = hashlib.sha256(key.encode()).hexdigest()[:16]
        return Path(self.spec.cache_dir).expanduser() / f"voice_match-{h}.npz"

    def calibrate(self, base: TTSBackend) -> Calibration:
        """Embed every grid point of the preset voice (cached per preset version)."""
        with self._lock:
            if self.calibration is not None and self.calibration.base_version == base.version:
                return self.calibration
            grid = [(p, a) for p in self.spec.pitch_factors for a in self.spec.formant_factors]
            cache = self._cache_file(base.version)
            if cache is not None and cache.exists():
                z = np.load(cache)
                f0 = float(z["base_f0"])
                self.calibration = Calibration(base.version, f0 if f0 > 0 else None,
                                               [tuple(g) for g in z["grid"].tolist()],
                                               z["embeddings"], z["plain"])
                return self.calibration
            syn = base.synthesize(self.spec.calibration_text, None, seed=0)
            x = resample(syn.audio, syn.sample_rate, EMBED_SR)
            ana = world_analyze(x, EMBED_SR)
            embs = np.stack([embed(perturb(ana, EMBED_SR, p, a), EMBED_SR, self.device)
                             for p, a in grid])
            plain = embed(x, EMBED_SR, self.device)
            cal = Calibration(base.version, median_f0(x, EMBED_SR), grid, embs, plain)
            if cache is not None:
                cache.parent.mkdir(parents=True, exist_ok=True)
                tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp.npz")
                np.savez(tmp, base_f0=cal.base_f0 or 0.0, grid=np.array(grid),
                         embeddings=embs, plain=plain)
                os.replace(tmp, cache)
            self.calibration = cal
            return cal

    def match(self, voice: VoicePrompt) -> Match:
        """The grid point closest to the prompt speaker (cached per voice)."""
        m = self._matches.get(voice.key)
        if m is not None:
            return m
        cal = self.calibration
        if cal is None:
            raise RuntimeError("calibrate() first")
        audio, sr = load_prompt(voice, EMBED_SR)
        target = embed(audio, sr, self.device)
        f0 = median_f0(audio, sr)
        cos = cal.embeddings @ target
        idx = list(range(len(cal.grid)))
        if f0 and cal.base_f0 and self.spec.pitch_window > 1.0:
            r = f0 / cal.base_f0
            near = [i for i in idx if r / self.spec.pitch_window <= cal.grid[i][0]
                    <= r * self.spec.pitch_window]
            if not near:  # outside the grid: the pitch factors closest to the ratio
                best_gap = min(abs(np.log(cal.grid[i][0] / r)) for i in idx)
                near = [i for i in idx if abs(np.log(cal.grid[i][0] / r)) <= best_gap + 1e-9]
            idx = near
        best = max(idx, key=lambda i: float(cos[i]))
        p, a = cal.grid[best]
        m = Match(pitch=float(p), formant=float(a), cosine=float(cos[best]),
                  plain_cosine=float(cal.plain @ target), prompt_f0=f0)
        self._matches[voice.key] = m
        return m


class VoiceMatchBackend(TTSBackend):
    """A preset backend whose voice is matched to each prompt speaker (see module doc)."""

    prompt_source = "voice_match"

    def __init__(self, base: TTSBackend, spec: VoiceMatchSpec) -> None:
        super().__init__(base.spec, offline=base.offline)
        self.base = base
        self.name = base.name
        self.max_chars = base.max_chars
        self.needs_prompt = False
        self.prompt_seconds = (1.0, 30.0)
        from speechmill.pipeline.models import cuda_available

        dev = base.spec.device
        self.matcher = VoiceMatcher(spec, "cuda" if dev == "cuda" or (
            dev == "auto" and cuda_available()) else "cpu")

    def load(self) -> None:
        self.base.ensure_loaded()
        self.sample_rate = self.base.sample_rate
        self.matcher.calibrate(self.base)
        s = self.matcher.spec
        grid = hashlib.sha256(json.dumps([s.pitch_factors, s.formant_factors, s.pitch_window,
                                          s.calibration_text]).encode()).hexdigest()[:8]
        self.version = f"{self.base.version}+voice_match:{grid}"

    def synthesize(self, text: str, voice: VoicePrompt | None = None, seed: int | None = None,
                   language: str | None = None) -> Synthesis:
        self.ensure_loaded()
        out = self.base.synthesize(text, None, seed, language)
        if voice is None:
            out.backend_version = self.version
            return out
        try:
            m = self.matcher.match(voice)
        except TTSError:
            raise
        except Exception as e:
            raise TTSError(f"voice_match for {voice.voice_id!r}: {type(e).__name__}: {e}") \
                from e
        audio = apply_match(out.audio, out.sample_rate, m.pitch, m.formant)
        return Synthesis(audio=audio, sample_rate=out.sample_rate, backend=self.name,
                         backend_version=self.version, voice_source="voice_match",
                         details={**out.details, "pitch_factor": m.pitch,
                                  "formant_factor": m.formant,
                                  "match_cosine": round(m.cosine, 4),
                                  "plain_cosine": round(m.plain_cosine, 4)})
