"""ASR model adapters: one small interface, two backends (faster-whisper, openai-whisper).

The ``transcribe`` stage (and synthesis QC's round trip) handle rows, batching and
rejects; an adapter only loads one model (through
:func:`speechmill.pipeline.models.resolve`) and turns 16 kHz mono float32 audio into an
:class:`AsrResult`. Both backends fill the same fields.

``language_prob`` is a measurement: the probability of the language the model detected.
When no detection ran (an English-only model, or a fixed ``language``) it is ``None``,
never a made-up 1.0. :func:`is_multilingual` tells, from a model's own files and without
loading it, whether it can detect languages at all.
"""

from __future__ import annotations

import json
import math
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from speechmill.pipeline.models import ModelSpec, Resolved, resolve

SAMPLE_RATE = 16000
#: vocabulary size of Whisper's multilingual models (51865; 51866 for large-v3); the
#: English-only models have 51864. Both libraries decide multilinguality this way.
MULTILINGUAL_VOCAB = 51865


@dataclass
class DecodeOptions:
    language: str | None = None  # None: detect
    beam_size: int = 5
    temperature: tuple[float, ...] = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
    condition_on_previous_text: bool = False
    initial_prompt: str | None = None
    word_timestamps: bool = True
    compression_ratio_threshold: float | None = 2.4
    log_prob_threshold: float | None = -1.0
    no_speech_threshold: float | None = 0.6


@dataclass
class AsrResult:
    text: str
    language: str | None
    language_prob: float | None
    words: list[dict[str, float | str]] = field(default_factory=list)
    avg_logprob: float | None = None
    compression_ratio: float | None = None
    no_speech_prob: float | None = None


class AsrBackend(Protocol):
    resolved: Resolved

    def transcribe(self, audio: np.ndarray, opts: DecodeOptions) -> AsrResult: ...


def _weighted(values: list[tuple[float, float]]) -> float | None:
    """Duration-weighted mean of (value, weight) pairs."""
    tot = sum(w for _, w in values)
    if not values:
        return None
    if tot <= 0:
        return float(np.mean([v for v, _ in values]))
    return float(sum(v * w for v, w in values) / tot)


_BLAS_LIMIT_LOCK = threading.Lock()


class _OneBlasThread:
    """faster-whisper's feature extractor, run with one BLAS thread. Its log-mel is a NumPy
    matmul whose float rounding follows OpenBLAS's thread count, and beam search can turn
    that last-bit difference into other words: a local run (all cores) and a Ray actor
    (``OMP_NUM_THREADS=1``) transcribed the same clip as "out of the history on maps" and
    "out in the history of maps". One thread everywhere gives every executor the same
    transcripts; the matmul is ~50 MFLOP per 30 s window, so it costs nothing measurable."""

    def __init__(self, fe: Any) -> None:
        from threadpoolctl import ThreadpoolController

        self._fe = fe
        self._ctl = ThreadpoolController()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fe, name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        # the limit is process-wide: one holder at a time, so overlapping callers cannot
        # restore each other's setting and leave the process at one thread for good
        with _BLAS_LIMIT_LOCK, self._ctl.limit(limits=1, user_api="blas"):
            return self._fe(*args, **kwargs)


class FasterWhisper:
    """CTranslate2 Whisper; int8 on CPU, float16 on GPU by default."""

    def __init__(self, spec: ModelSpec, offline: bool = False, cpu_threads: int = 0) -> None:
        from faster_whisper import WhisperModel

        self.resolved = resolve(spec, offline=offline)
        device = self.resolved.device
        ctype = spec.compute_type
        if ctype == "default":
            ctype = "float16" if device == "cuda" else "int8"
        self.model = WhisperModel(self.resolved.location, device=device, compute_type=ctype,
                                  cpu_threads=cpu_threads, local_files_only=offline)
        self.model.feature_extractor = _OneBlasThread(self.model.feature_extractor)

    def transcribe(self, audio: np.ndarray, opts: DecodeOptions) -> AsrResult:
        segs, info = self.model.transcribe(
            audio, language=opts.language, beam_size=opts.beam_size,
            temperature=list(opts.temperature),
            condition_on_previous_text=opts.condition_on_previous_text,
            initial_prompt=opts.initial_prompt, word_timestamps=opts.word_timestamps,
            compression_ratio_threshold=opts.compression_ratio_threshold,
            log_prob_threshold=opts.log_prob_threshold,
            no_speech_threshold=opts.no_speech_threshold, vad_filter=False,
        )
        segs = list(segs)
        words: list[dict[str, float | str]] = []
        for s in segs:
            for w in s.words or []:
                words.append({"word": w.word.strip(), "start": round(float(w.start), 3),
                              "end": round(float(w.end), 3), "prob": float(w.probability)})
        dur = [(s, max(s.end - s.start, 1e-3)) for s in segs]
        return AsrResult(
            text=" ".join(s.text.strip() for s in segs).strip(),
            language=info.language,
            language_prob=_measured(info),
            words=words,
            avg_logprob=_weighted([(s.avg_logprob, d) for s, d in dur]),
            compression_ratio=_weighted([(s.compression_ratio, d) for s, d in dur]),
            no_speech_prob=_weighted([(s.no_speech_prob, d) for s, d in dur]),
        )


    def transcribe_batch(self, clips: list[np.ndarray], opts: DecodeOptions,
                         batch_size: int = 8) -> list[AsrResult | None]:
        """Decode many short clips (<= 30 s each) in batches: they are laid end to end
        with 0.5 s of silence and handed to faster-whisper's BatchedInferencePipeline as
        clip timestamps; results are mapped back to clips by time."""
        from faster_whisper import BatchedInferencePipeline

        if not hasattr(self, "_batched"):
            self._batched = BatchedInferencePipeline(self.model)
        gap = np.zeros(SAMPLE_RATE // 2, np.float32)
        parts: list[np.ndarray] = []
        spans: list[tuple[float, float]] = []
        pos = 0
        for c in clips:
            spans.append((pos / SAMPLE_RATE, (pos + len(c)) / SAMPLE_RATE))
            parts += [np.asarray(c, np.float32), gap]
            pos += len(c) + len(gap)
        audio = np.concatenate(parts) if parts else np.zeros(0, np.float32)
        segs, info = self._batched.transcribe(
            audio, language=opts.language, beam_size=opts.beam_size,
            temperature=list(opts.temperature), initial_prompt=opts.initial_prompt,
            word_timestamps=opts.word_timestamps, vad_filter=False,
            clip_timestamps=[{"start": s, "end": e} for s, e in spans if e > s],
            batch_size=batch_size, condition_on_previous_text=False,
            compression_ratio_threshold=opts.compression_ratio_threshold,
            log_prob_threshold=opts.log_prob_threshold,
            no_speech_threshold=opts.no_speech_threshold,
        )
        buckets: list[list[Any]] = [[] for _ in clips]
        for sg in segs:
            mid = (sg.start + sg.end) / 2
            for i, (s, e) in enumerate(spans):
                if s - 0.25 <= mid <= e + 0.25:
                    buckets[i].append(sg)
                    break
        out: list[AsrResult | None] = []
        for (s, _), b in zip(spans, buckets, strict=True):
            if not b:
                out.append(None)
                continue
            words = [{"word": w.word.strip(), "start": round(max(float(w.start) - s, 0.0), 3),
                      "end": round(max(float(w.end) - s, 0.0), 3),
                      "prob": float(w.probability)} for sg in b for w in (sg.words or [])]
            dur = [(sg, max(sg.end - sg.start, 1e-3)) for sg in b]
            out.append(AsrResult(
                text=" ".join(sg.text.strip() for sg in b).strip(), language=info.language,
                language_prob=_measured(info), words=words,
                avg_logprob=_weighted([(sg.avg_logprob, d) for sg, d in dur]),
                compression_ratio=_weighted([(sg.compression_ratio, d) for sg, d in dur]),
                no_speech_prob=_weighted([(sg.no_speech_prob, d) for sg, d in dur]),
            ))
        return out


class OpenAIWhisper:
    """openai-whisper (PyTorch); loads checkpoints with ``whisper.load_model``."""

    def __init__(self, spec: ModelSpec, offline: bool = False, cpu_threads: int = 0) -> None:
        import whisper

        self.resolved = resolve(spec, offline=offline)
        self.device = self.resolved.device
        if cpu_threads:
            import torch

            torch.set_num_threads(cpu_threads)
        self.model = whisper.load_model(self.resolved.location, device=self.device)

    def transcribe(self, audio: np.ndarray, opts: DecodeOptions) -> AsrResult:
        import whisper

        lang, lang_prob = opts.language, None
        if lang is None and self.model.is_multilingual:
            mel = whisper.log_mel_spectrogram(whisper.pad_or_trim(audio),
                                              self.model.dims.n_mels).to(self.model.device)
            _, probs = self.model.detect_language(mel)
            lang = max(probs, key=probs.get)
            lang_prob = float(probs[lang])
        elif lang is None:
            lang = "en"  # English-only model: nothing was detected, nothing measured
        out: dict[str, Any] = self.model.transcribe(
            audio, language=lang, beam_size=opts.beam_size if opts.beam_size > 1 else None,
            temperature=tuple(opts.temperature),
            condition_on_previous_text=opts.condition_on_previous_text,
            initial_prompt=opts.initial_prompt, word_timestamps=opts.word_timestamps,
            compression_ratio_threshold=opts.compression_ratio_threshold,
            logprob_threshold=opts.log_prob_threshold,
            no_speech_threshold=opts.no_speech_threshold,
            fp16=self.device == "cuda", verbose=None,
        )
        segs = out.get("segments") or []
        words = [{"word": str(w["word"]).strip(), "start": round(float(w["start"]), 3),
                  "end": round(float(w["end"]), 3), "prob": float(w.get("probability", 0.0))}
                 for s in segs for w in s.get("words", [])]
        dur = [(s, max(float(s["end"]) - float(s["start"]), 1e-3)) for s in segs]

        def finite(v: Any) -> float | None:
            return float(v) if v is not None and math.isfinite(float(v)) else None

        return AsrResult(
            text=str(out.get("text", "")).strip(), language=out.get("language") or lang,
            language_prob=lang_prob, words=words,
            avg_logprob=finite(_weighted([(s["avg_logprob"], d) for s, d in dur])),
            compression_ratio=finite(_weighted([(s["compression_ratio"], d) for s, d in dur])),
            no_speech_prob=finite(_weighted([(s["no_speech_prob"], d) for s, d in dur])),
        )


def _measured(info: Any) -> float | None:
    """faster-whisper's language probability, or None where it detected nothing (it
    reports 1 for an English-only model or a given language; ``all_language_probs`` is
    set only when detection ran)."""
    if getattr(info, "all_language_probs", None) is None:
        return None
    return float(info.language_probability)


BACKENDS = {"faster-whisper": FasterWhisper, "whisper": OpenAIWhisper}


def is_multilingual(backend: str, location: str) -> bool | None:
    """Whether the model at ``location`` (a resolved local path) is multilingual, read from
    its own files without loading it: the size of a CTranslate2 directory's vocabulary
    (``vocabulary.json`` or ``vocabulary.txt``), an openai-whisper checkpoint's
    ``dims.n_vocab``. None: cannot tell (not a local model, unknown layout)."""
    p = Path(location)
    try:
        if backend == "faster-whisper" and p.is_dir():
            if (p / "vocabulary.json").is_file():
                n = len(json.loads((p / "vocabulary.json").read_text(encoding="utf-8")))
            elif (p / "vocabulary.txt").is_file():
                with open(p / "vocabulary.txt", encoding="utf-8") as f:
                    n = sum(1 for _ in f)
            else:
                return None
            return n >= MULTILINGUAL_VOCAB
        if backend == "whisper" and p.is_file():
            import torch

            try:  # mmap: the dims without reading gigabytes of weights
                ckpt = torch.load(p, map_location="cpu", mmap=True, weights_only=True)
            except RuntimeError:  # a checkpoint in torch's legacy (non-zip) format
                ckpt = torch.load(p, map_location="cpu", weights_only=True)
            return int(ckpt["dims"]["n_vocab"]) >= MULTILINGUAL_VOCAB
    except Exception:  # unreadable or not a Whisper model: setup will say what is wrong
        return None
    return None


def load_backend(spec: ModelSpec, offline: bool = False, cpu_threads: int = 0) -> AsrBackend:
    try:
        cls = BACKENDS[spec.backend]
    except KeyError:
        raise ValueError(f"unknown ASR backend {spec.backend!r} (faster-whisper | whisper)"
                         ) from None
    return cls(spec, offline=offline, cpu_threads=cpu_threads)  # type: ignore[return-value]
