"""Sink stage ``voice_bank``: the best prompt clips of every speaker a cleaning run found.

Input: a cleaning run's filtered, speaker-linked segments (a DAG dependency such as
``split``/``filter``, or ``read_parquet`` of another run's stage): ``id``, ``audio_path``,
``offset``, ``duration``, ``speaker`` (run-wide, from ``link_speakers``), ``language``,
``text``, ``words``, ``scores`` (``dnsmos_ovrl``, ``asr_avg_logprob``...) and ``split``.
Plus user-supplied voices: ``folders`` of ``<name>/<clip>.wav`` with ``<clip>.txt`` (what
is said in it); the folder name is the voice id. A transcript is read as UTF-8 (a BOM is
dropped; UTF-16 when it starts with a UTF-16 BOM); one that is not UTF-8 is decoded with
``transcript_encoding``, by default ``latin-1`` (which reads any bytes, so such text may
show wrong accents when it was in another code page: set the key to its real encoding,
e.g. ``cp1252``). With ``transcript_encoding: null``, or when that encoding fails too,
the clip is skipped: counted as ``folder_bad_encoding`` in ``skipped``, the file named in
the log and in the summary's ``bad_transcripts``.

Per speaker it keeps the ``clips_per_voice`` best clips that are

- single speaker and without overlap (segments from ``segment`` are; rows that carry
  overlap information (``overlaps`` spans, an ``overlap``/``has_overlap`` flag,
  ``scores.overlap_ratio`` > 0) are skipped);
- ``min_s`` .. ``max_s`` seconds long after their leading/trailing silence is trimmed to
  ``pad_s`` (an energy threshold: 10 ms frames 40 dB under the loudest; ``trim: vad`` uses
Silero VAD for noisy recordings; never cutting into a transcribed word). Defaults come from
  :data:`BACKEND_BOUNDS` for the backend named in ``backend`` (3-10 s otherwise);
- of high quality: ranked by ``dnsmos_ovrl + asr_weight * asr_conf``, where ``asr_conf``
  is the mean word probability of the transcript (``exp(asr_avg_logprob)`` without words);
  ``min_dnsmos`` / ``min_asr_conf`` drop the rest.

Memory stays bounded on big inputs: the (memory-mapped, sorted) input is read in slices
and only a heap of the ``candidates_per_voice`` best candidates per speaker is kept; audio
is read only for those, in rank order, until ``clips_per_voice`` pass.

Never in the bank: speakers with a row in a held-out split (``exclude_splits``: dev, test;
split is speaker-disjoint, so these are the dev/test speakers), ``exclude_speakers`` (ids)
and rows whose ``source_url`` or ``audio_path`` matches an ``exclude_sources`` glob (an
opt-out list), also for folders (the folder name / path).

Writes ``RUN_DIR/voices/<id>/``: ``clips/<voice>/<clip>.wav`` (16-bit mono at the source
rate; ``<voice>`` and ``<clip>`` (the segment id, or a folder clip's file name) made safe
names by :func:`speechmill.pipeline.safe_names.safe_name`: an ordinary name stays as it
is (``张三`` too), any other gets a readable part plus a hash, so ``Anna Smith`` and
``Anna_Smith`` never share a directory) and ``voices.parquet``, one row per clip:
``voice_id``, ``clip_id``, ``audio_path`` (absolute), ``duration``, ``sample_rate``,
``text``, ``language``, ``gender``, ``f0_hz``, ``embedding`` (Resemblyzer, 256 floats,
unit norm), ``dnsmos``, ``asr_conf``, ``source`` (``cleaning`` | ``folder``),
``source_id`` (segment id or file), ``source_url``, ``rank`` (0 = the voice's best clip).
``gender`` is an *estimate*, one per voice, from the median of its clips' median f0
(``f0_hz``, WORLD/pyworld; below ``male_below_hz`` "male", else "female"): pitch is not
gender (Piper's joe speaks at ~160 Hz), so treat it as a hint for matching, nothing more
(null without pyworld). ``voices.json`` summarises the bank and what was left out.
"""

from __future__ import annotations

import codecs
import fnmatch
import heapq
import json
import logging
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field

from speechmill.pipeline.stage import Resources, SinkResult, Stage, StageConfig

#: prompt clip length (min_s, max_s) each cloning backend works best with; the bank's
#: defaults when ``backend`` names one. F5-TTS clips references longer than 12 s (with
#: room for the pad: 11.5), Chatterbox wants at least 5 s, CosyVoice takes up to 30 s.
BACKEND_BOUNDS: dict[str, tuple[float, float]] = {
    "default": (3.0, 10.0),
    "f5_tts": (3.0, 11.5),
    "chatterbox": (5.0, 10.0),
    "cosyvoice": (3.0, 30.0),
    "xtts": (3.0, 10.0),
    "pocket_tts": (3.0, 10.0),
    "openai_compat": (3.0, 10.0),
    "multipart": (3.0, 10.0),
}

COLUMNS = ("id", "audio_path", "offset", "duration", "speaker", "language", "text", "words",
           "scores", "split", "source_url", "overlaps", "overlap", "has_overlap")
AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3", ".m4a", ".opus")

BANK_SCHEMA = pa.schema([
    ("voice_id", pa.string()), ("clip_id", pa.string()), ("audio_path", pa.string()),
    ("duration", pa.float64()), ("sample_rate", pa.int32()), ("text", pa.string()),
    ("language", pa.string()), ("gender", pa.string()), ("f0_hz", pa.float64()),
    ("embedding", pa.list_(pa.float32())), ("dnsmos", pa.float64()),
    ("asr_conf", pa.float64()), ("source", pa.string()), ("source_id", pa.string()),
    ("source_url", pa.string()), ("rank", pa.int32()),
])

log = logging.getLogger("speechmill")


class TranscriptEncodingError(ValueError):
    """A folder transcript that is neither UTF-8 nor in ``transcript_encoding``."""


def read_transcript(path: Path, fallback: str | None = "latin-1") -> str:
    """A folder clip's transcript, stripped: UTF-8 (a BOM is dropped), UTF-16 when the file
    starts with a UTF-16 BOM, else decoded with ``fallback`` (the ``transcript_encoding``
    key; latin-1 decodes any bytes, so with it a transcript is always read, possibly with
    wrong accents when it was in another 8-bit code page). Raises
    :class:`TranscriptEncodingError` naming the file when ``fallback`` is None or cannot
    decode it either."""
    raw = path.read_bytes()
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        tried = ["UTF-16"]
        try:
            return raw.decode("utf-16").strip()
        except UnicodeDecodeError:
            pass
    else:
        tried = ["UTF-8"]
        try:
            return raw.decode("utf-8-sig").strip()
        except UnicodeDecodeError:
            pass
    if fallback is not None:
        tried.append(fallback)
        try:
            return raw.decode(fallback).strip()
        except UnicodeDecodeError:
            pass
    raise TranscriptEncodingError(
        f"transcript {str(path)!r} is not {' or '.join(tried)} text (set the voice_bank key "
        "transcript_encoding to the encoding it is in)")


class VoiceBankConfig(StageConfig):
    clips_per_voice: int = Field(3, ge=1, le=100, description="prompt clips kept per voice")
    candidates_per_voice: int | None = Field(
        None, ge=1, description="best candidates per speaker kept while streaming (default "
        "3 x clips_per_voice): audio is read for these only")
    backend: str | None = Field(None, description="take min_s/max_s defaults from "
                                f"BACKEND_BOUNDS ({', '.join(sorted(BACKEND_BOUNDS))})")
    min_s: float | None = Field(None, gt=0, description="shortest clip after trimming "
                                "(default: the backend's bound, else 3)")
    max_s: float | None = Field(None, gt=0, description="longest clip after trimming "
                                "(default: the backend's bound, else 10)")
    min_dnsmos: float | None = Field(None, description="drop candidates scoring lower "
                                     "(DNSMOS OVRL; the cleaning run's filter already did)")
    min_asr_conf: float | None = Field(0.5, ge=0, le=1, description="drop candidates whose "
                                       "mean word probability is lower")
    asr_weight: float = Field(2.0, ge=0, description="rank = dnsmos + asr_weight * asr_conf")
    trim: Literal["energy", "vad", "none"] = Field(
        "energy", description="how leading/trailing silence is found: energy (frames 40 dB "
        "under the loudest; segments are VAD-cut already) or Silero VAD (noisy audio)")
    pad_s: float = Field(0.15, ge=0, le=2, description="silence kept at each end")
    exclude_splits: list[str] = Field(default_factory=lambda: ["dev", "test"],
                                      description="speakers of these splits never enter")
    exclude_speakers: list[str] = Field(default_factory=list, description="opt-out: ids")
    exclude_sources: list[str] = Field(default_factory=list, description="opt-out: globs "
                                       "on source_url / audio_path (folders: their path)")
    folders: list[str] = Field(default_factory=list, description="user voices: folders of "
                               "<name>/*.wav with same-name .txt")
    folder_language: str | None = Field(None, description="language of the folder voices")
    transcript_encoding: str | None = Field(
        "latin-1", description="how a folder transcript (.txt) that is not UTF-8 is read "
        "(UTF-8, with or without BOM, and UTF-16 with BOM come first); null: such a clip "
        "is skipped (counted as folder_bad_encoding, the file named in the log)")
    estimate_gender: bool = Field(True, description="median-f0 gender estimate (pyworld)")
    male_below_hz: float = Field(165.0, gt=0, description="median f0 below: 'male'")
    max_voices: int | None = Field(None, ge=1, description="keep at most this many voices "
                                   "(those with the best clips)")


@dataclass(order=True)
class _Cand:
    quality: float
    id: str
    row: dict[str, Any] = field(compare=False)


def fit_span(words: list[dict[str, Any]], lo: float, hi: float, pad: float
             ) -> tuple[float, float, str] | None:
    """A segment too long for a prompt: the longest run of its first words (from the first
    word) lasting at most ``hi - 2 * pad`` seconds and at least ``lo``, ending where a
    sentence ends when one does (else at a pause of 0.3 s or more, else at any word).
    ``(start, end, text)`` in seconds from the segment start, or None."""
    ws = [w for w in words if w and w.get("start") is not None and w.get("end") is not None
          and str(w.get("word") or "").strip()]
    if not ws:
        return None
    t0 = float(ws[0]["start"])
    best: dict[str, int] = {}
    for i, w in enumerate(ws):
        end = float(w["end"])
        if end - t0 > hi - 2 * pad:
            break
        if end - t0 + 2 * pad < lo:
            continue
        word = str(w["word"]).strip()
        gap = float(ws[i + 1]["start"]) - end if i + 1 < len(ws) else math.inf
        best["any"] = i
        if gap >= 0.3:
            best["pause"] = i
        if word.endswith((".", "?", "!")):
            best["sentence"] = i
    i = best.get("sentence", best.get("pause", best.get("any")))
    if i is None:
        return None
    text = " ".join(str(w["word"]).strip() for w in ws[: i + 1])
    return t0, float(ws[i]["end"]), text


def bounds_for(cfg: VoiceBankConfig) -> tuple[float, float]:
    lo, hi = BACKEND_BOUNDS.get(cfg.backend or "default", BACKEND_BOUNDS["default"])
    return (cfg.min_s if cfg.min_s is not None else lo,
            cfg.max_s if cfg.max_s is not None else hi)


def asr_conf(words: Any, scores: Any) -> float | None:
    """Mean word probability of the transcript, else exp(avg logprob), else None."""
    probs = [float(w["prob"]) for w in (words or []) if w and w.get("prob") is not None]
    if probs:
        return float(np.mean(probs))
    lp = (scores or {}).get("asr_avg_logprob")
    return float(math.exp(min(0.0, float(lp)))) if lp is not None else None


def has_overlap(row: dict[str, Any]) -> bool:
    if row.get("overlaps"):
        return True
    if row.get("overlap") or row.get("has_overlap"):
        return True
    r = (row.get("scores") or {}).get("overlap_ratio")
    return bool(r and r > 0)


def excluded_source(row: dict[str, Any], globs: list[str]) -> bool:
    return any(fnmatch.fnmatch(str(v), g) for g in globs
               for v in (row.get("source_url"), row.get("audio_path")) if v)


def speech_span(x: np.ndarray, sr: int, how: str) -> tuple[float, float] | None:
    """(start, end) seconds of the speech in ``x``; None when there is none."""
    dur = x.shape[0] / sr
    if how == "none":
        return (0.0, dur)
    if how == "vad":
        from speechmill.stages.audio_models.vad import speech_regions

        regions = speech_regions(x, sr)
        if not regions:
            return None
        return (max(0.0, regions[0][0]), min(dur, regions[-1][1]))
    from speechmill.synth.qc.synth_qc import silence_bounds

    lead, trail = silence_bounds(x, sr)
    if lead + trail >= dur:
        return None
    return (lead, dur - trail)


def estimate_f0(x: np.ndarray, sr: int) -> float | None:
    try:
        import pyworld  # noqa: F401 - optional (tts extra)
    except ImportError:
        return None
    from speechmill.synth.tts.audio import resample
    from speechmill.synth.voices.voice_match import median_f0

    return median_f0(resample(x, sr, 16000), 16000)


class VoiceBank(Stage):
    #: the bank is published under RUN_DIR by local path (URL run dirs: refused)
    local_run_dir_only: ClassVar[bool] = True
    name = "voice_bank"
    description = "voice bank for dialogue synthesis: best prompt clips per speaker (sink)"
    Config = VoiceBankConfig
    resources = Resources(cpus=1, memory_gb=1.0)
    is_sink = True
    output_root = "voices"
    inputs_optional = True  # a bank of voice folders alone needs no cleaning run
    version: ClassVar[int] = 1

    config: VoiceBankConfig

    @classmethod
    def validate_dag(cls, config: StageConfig,
                     upstream: dict[str, tuple[type[Stage], StageConfig]]) -> None:
        assert isinstance(config, VoiceBankConfig)
        if not upstream and not config.folders:
            raise ValueError("key 'with.folders': a voice bank needs voices: an upstream "
                             "stage with a cleaning run's segments (needs), or folders")

    @classmethod
    def validate_config(cls, config: StageConfig) -> None:
        assert isinstance(config, VoiceBankConfig)
        if config.backend is not None and config.backend not in BACKEND_BOUNDS:
            raise ValueError(f"key 'with.backend': unknown backend {config.backend!r} "
                             f"(known: {', '.join(sorted(BACKEND_BOUNDS))})")
        lo, hi = bounds_for(config)
        if lo >= hi:
            raise ValueError(f"key 'with.min_s': {lo:g} s is not below max_s {hi:g} s")
        if config.transcript_encoding is not None:
            try:
                codecs.lookup(config.transcript_encoding)
            except LookupError:
                raise ValueError(f"key 'with.transcript_encoding': unknown encoding "
                                 f"{config.transcript_encoding!r}") from None
        for f in config.folders:
            if not Path(f).is_dir():
                raise ValueError(f"key 'with.folders': {f!r} is not a directory")

    # -- candidates from the cleaning run -----------------------------------------------------
    def _candidates(self, inputs: pa.Table, stats: Counter[str]
                    ) -> tuple[dict[str, list[_Cand]], set[str], set[str]]:
        from speechmill.pipeline.row_slices import iter_slices

        c = self.config
        lo, hi = bounds_for(c)
        k = c.candidates_per_voice or 3 * c.clips_per_voice
        heaps: dict[str, list[_Cand]] = {}
        held_out: set[str] = set()
        seen: set[str] = set()
        splits_out = set(c.exclude_splits)
        opt_out = set(c.exclude_speakers)
        cols = [x for x in COLUMNS if x in inputs.column_names]
        if not inputs.num_rows or "speaker" not in cols:
            return heaps, held_out, seen
        for part in iter_slices(inputs.select(cols)):
            for row in part.to_pylist():
                spk = row.get("speaker")
                if not spk:
                    stats["no_speaker"] += 1
                    continue
                seen.add(spk)
                if row.get("split") in splits_out:
                    held_out.add(spk)
                    continue
                if spk in opt_out:
                    stats["opted_out_rows"] += 1
                    continue
                if c.exclude_sources and excluded_source(row, c.exclude_sources):
                    stats["opted_out_rows"] += 1
                    continue
                if has_overlap(row):
                    stats["overlap"] += 1
                    continue
                dur = float(row.get("duration") or 0.0)
                # trimming only shortens a clip (by at most its silence)
                if dur < lo or not row.get("audio_path") or not str(row.get("text") or "").strip():
                    stats["too_short_or_no_text"] += 1
                    continue
                scores = row.get("scores") or {}
                dn = scores.get("dnsmos_ovrl")
                conf = asr_conf(row.get("words"), scores)
                if c.min_dnsmos is not None and dn is not None and dn < c.min_dnsmos:
                    stats["low_dnsmos"] += 1
                    continue
                if c.min_asr_conf is not None and conf is not None and conf < c.min_asr_conf:
                    stats["low_asr_conf"] += 1
                    continue
                words = row.get("words") or []
                text = " ".join(str(row["text"]).split())
                offset = float(row.get("offset") or 0.0)
                if dur > hi + 2 * c.pad_s + 1.0:  # too long even without its silences:
                    span = fit_span(words, lo, hi, c.pad_s)  # its first sentence(s)
                    if span is None:
                        stats["too_long"] += 1
                        continue
                    a, b, text = span
                    a = max(0.0, a - c.pad_s)
                    b = min(dur, b + c.pad_s)
                    words = [{**w, "start": float(w["start"]) - a, "end": float(w["end"]) - a}
                             for w in words if w and w.get("end") is not None
                             and float(w["end"]) <= b]
                    offset, dur = offset + a, b - a
                q = (float(dn) if dn is not None else 3.0) + c.asr_weight * (
                    conf if conf is not None else 0.5)
                cand = _Cand(round(q, 9), str(row["id"]), {
                    "id": str(row["id"]), "audio_path": row["audio_path"],
                    "offset": offset, "duration": dur, "text": text,
                    "language": row.get("language"), "source_url": row.get("source_url"),
                    "dnsmos": float(dn) if dn is not None else None, "asr_conf": conf,
                    "speech_end": max((float(w["end"]) for w in words
                                       if w and w.get("end") is not None), default=None),
                    "speech_start": min((float(w["start"]) for w in words
                                         if w and w.get("start") is not None), default=None),
                })
                h = heaps.setdefault(spk, [])
                if len(h) < k:
                    heapq.heappush(h, cand)
                elif cand > h[0]:
                    heapq.heapreplace(h, cand)
        return heaps, held_out, seen

    # -- clips ---------------------------------------------------------------------------------
    def _trimmed(self, x: np.ndarray, sr: int, cand: dict[str, Any]) -> np.ndarray | None:
        """The clip without its leading/trailing silence beyond ``pad_s`` (never cutting
        into a transcribed word); None when it holds no speech."""
        span = speech_span(x, sr, self.config.trim)
        if span is None:
            return None
        start, end = span
        if cand.get("speech_start") is not None:
            start = min(start, float(cand["speech_start"]))
        if cand.get("speech_end") is not None:
            end = max(end, float(cand["speech_end"]))
        pad = self.config.pad_s
        a = max(0, int((start - pad) * sr))
        b = min(x.shape[0], int(math.ceil((end + pad) * sr)))
        return x[a:b] if b > a else None

    def _make_clip(self, voice_id: str, cand: dict[str, Any], out_dir: Path, final: Path,
                   stats: Counter[str]) -> dict[str, Any] | None:
        from speechmill.pipeline.audio import load_audio
        from speechmill.pipeline.safe_names import safe_name
        from speechmill.stages.audio_models.quality import clipping_ratio, dnsmos
        from speechmill.synth.voices.voice_match import embed

        c = self.config
        lo, hi = bounds_for(c)
        try:
            x, sr = load_audio(str(cand["audio_path"]), offset=float(cand.get("offset") or 0),
                               duration=cand.get("duration"))
        except Exception:  # unreadable audio: not this voice's clip
            stats["unreadable"] += 1
            return None
        x = np.asarray(x, np.float32)
        y = self._trimmed(x, sr, cand) if x.shape[0] else None
        if y is None:
            stats["no_speech"] += 1
            return None
        dur = y.shape[0] / sr
        if not lo <= dur <= hi:
            stats["out_of_bounds"] += 1
            return None
        if clipping_ratio(y) > 0.001:
            stats["clipped"] += 1
            return None
        try:
            emb = embed(y, sr)
        except Exception:
            stats["no_embedding"] += 1
            return None
        dn = cand.get("dnsmos")
        if dn is None:
            v = dnsmos(y, sr)["dnsmos_ovrl"]
            dn = float(v) if math.isfinite(v) else None
        f0 = estimate_f0(y, sr) if c.estimate_gender else None
        # distinct voices / clips, distinct files (张三 and 李四, "Anna Smith" and "Anna_Smith")
        rel = (Path("clips") / safe_name(voice_id)
               / safe_name(cand.get("file_key") or cand["id"], suffix=".wav"))
        from speechmill.pipeline.audio_write import write_audio

        (out_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        write_audio(out_dir / rel, y, sr, format="WAV", subtype="PCM_16")
        return {"voice_id": voice_id, "clip_id": str(cand["id"]),
                "audio_path": str(final / rel), "duration": round(dur, 4),
                "sample_rate": int(sr), "text": cand["text"], "language": cand.get("language"),
                "gender": None, "f0_hz": None if f0 is None else round(float(f0), 2),
                "embedding": [float(v) for v in np.asarray(emb, np.float32)],
                "dnsmos": None if dn is None else round(float(dn), 4),
                "asr_conf": None if cand.get("asr_conf") is None
                else round(float(cand["asr_conf"]), 4),
                "source": cand.get("source", "cleaning"), "source_id": str(cand["id"]),
                "source_url": cand.get("source_url")}

    def _folder_candidates(self, stats: Counter[str], bad_text: list[str] | None = None
                           ) -> dict[str, list[dict[str, Any]]]:
        """``{voice: [candidate]}`` of the user folders (every clip with a transcript);
        transcripts that cannot be decoded are appended to ``bad_text``."""
        c = self.config
        bad_text = [] if bad_text is None else bad_text
        out: dict[str, list[dict[str, Any]]] = {}
        for root in c.folders:
            base = Path(root)
            dirs = sorted(d for d in base.iterdir() if d.is_dir())
            if any(p.suffix.lower() in AUDIO_EXTENSIONS for p in base.iterdir()):
                dirs = [base, *dirs]  # the folder itself is one voice
            for d in dirs:
                voice = d.name
                if voice in c.exclude_speakers or any(
                        fnmatch.fnmatch(str(d), g) or fnmatch.fnmatch(voice, g)
                        for g in c.exclude_sources):
                    stats["opted_out_folders"] += 1
                    continue
                for p in sorted(d.iterdir()):
                    if p.suffix.lower() not in AUDIO_EXTENSIONS or not p.is_file():
                        continue
                    txt = p.with_suffix(".txt")
                    try:
                        text = read_transcript(txt, c.transcript_encoding) \
                            if txt.is_file() else ""
                    except TranscriptEncodingError as e:
                        stats["folder_bad_encoding"] += 1
                        bad_text.append(str(txt))
                        log.warning("voice_bank: %s: clip skipped", e)
                        continue
                    if not text:
                        stats["folder_no_text"] += 1
                        continue
                    if any(fnmatch.fnmatch(str(p), g) for g in c.exclude_sources):
                        stats["opted_out_rows"] += 1
                        continue
                    out.setdefault(voice, []).append({
                        "id": f"{voice}/{p.name}", "audio_path": str(p.resolve()),
                        "offset": 0.0, "duration": None, "text": " ".join(text.split()),
                        "language": c.folder_language, "source_url": str(p.resolve()),
                        "dnsmos": None, "asr_conf": None, "source": "folder",
                        "file_key": p.name})
        return out

    # -- export ---------------------------------------------------------------------------------
    def export(self, inputs: pa.Table, out_dir: Path) -> SinkResult:
        import pyarrow.parquet as pq

        from speechmill.pipeline.publish import published_dir

        c = self.config
        final = published_dir(out_dir, self.ctx, self.output_root)
        stats: Counter[str] = Counter()
        heaps, held_out, seen = self._candidates(inputs, stats)
        voices: dict[str, list[dict[str, Any]]] = {}
        for spk in sorted(heaps):
            if spk in held_out:
                continue
            cands = sorted(heaps[spk], reverse=True)
            clips = []
            for cand in cands:
                clip = self._make_clip(spk, cand.row, out_dir, final, stats)
                if clip is not None:
                    clips.append(clip)
                if len(clips) >= c.clips_per_voice:
                    break
            if clips:
                voices[spk] = clips
            else:
                stats["speakers_without_clip"] += 1
        bad_text: list[str] = []
        for voice, cands in sorted(self._folder_candidates(stats, bad_text).items()):
            if voice in voices:
                stats["folder_name_taken"] += 1
                continue
            clips = [x for cand in cands
                     if (x := self._make_clip(voice, cand, out_dir, final, stats)) is not None]
            clips.sort(key=lambda r: (-(r["dnsmos"] or 0.0), r["clip_id"]))
            if clips:
                voices[voice] = clips[: c.clips_per_voice]
            else:
                stats["speakers_without_clip"] += 1
        if c.max_voices is not None and len(voices) > c.max_voices:
            best = sorted(voices, key=lambda v: (-(voices[v][0]["dnsmos"] or 0.0), v))
            for v in best[c.max_voices:]:
                for r in voices.pop(v):
                    Path(out_dir / Path(r["audio_path"]).relative_to(final)).unlink()
                stats["over_max_voices"] += 1
        rows: list[dict[str, Any]] = []
        for voice in sorted(voices):
            f0s = [r["f0_hz"] for r in voices[voice] if r["f0_hz"] is not None]
            gender = None if not f0s else (
                "male" if float(np.median(f0s)) < c.male_below_hz else "female")
            for i, r in enumerate(voices[voice]):
                r["gender"] = gender  # one estimate per voice: the median of its clips' f0
                rows.append({**r, "rank": i})
        pq.write_table(pa.Table.from_pylist(rows, schema=BANK_SCHEMA), out_dir / "voices.parquet")
        genders = Counter(str(voices[v][0]["gender"]) for v in voices)
        summary: dict[str, Any] = {
            "voices": len(voices),
            "clips": len(rows),
            "bounds_s": list(bounds_for(c)),
            "from_cleaning": sum(1 for v in voices.values() if v[0]["source"] == "cleaning"),
            "from_folders": sum(1 for v in voices.values() if v[0]["source"] == "folder"),
            "speakers_seen": len(seen),
            "held_out_speakers": len(held_out),
            "opted_out_speakers": len(set(c.exclude_speakers) & seen),
            "genders": dict(sorted(genders.items())),
            "skipped": dict(sorted(stats.items())),
        }
        if bad_text:  # transcripts neither UTF-8 nor transcript_encoding: their files
            summary["bad_transcripts"] = bad_text[:20]
        listing = {**summary, "voice_list": [
            {"voice_id": v, "clips": len(voices[v]), "source": voices[v][0]["source"],
             "gender": voices[v][0]["gender"], "language": voices[v][0]["language"],
             "seconds": round(sum(r["duration"] for r in voices[v]), 3)}
            for v in sorted(voices)]}
        (out_dir / "voices.json").write_text(json.dumps(listing, indent=2, sort_keys=True)
                                             + "\n", encoding="utf-8")
        return SinkResult(rows_out=len(rows), seconds_out=float(sum(r["duration"] for r in rows)),
                          summary=summary)

    @classmethod
    def summary_lines(cls, summary: dict[str, Any]) -> list[str]:
        if not summary:
            return []
        return [f"{summary.get('voices', 0)} voices, {summary.get('clips', 0)} prompt clips "
                f"({summary.get('from_cleaning', 0)} from the cleaning run, "
                f"{summary.get('from_folders', 0)} from folders); held out (dev/test): "
                f"{summary.get('held_out_speakers', 0)} speakers, opted out: "
                f"{summary.get('opted_out_speakers', 0)}"]


def voice_bank_dir(run_dir: str | os.PathLike[str], stage_id: str) -> Path:
    """Where the ``voice_bank`` stage ``stage_id`` of a run writes its bank."""
    return Path(run_dir) / VoiceBank.output_root / stage_id
