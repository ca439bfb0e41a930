"""Stage ``transcribe``: Whisper ASR (faster-whisper or openai-whisper) per segment.

Input rows are segments (``audio_path`` + ``offset``/``duration``, e.g. from ``segment``)
or whole standardized files. A row longer than ``max_segment_s`` (or every row with
``cut: vad``) is first cut into speech segments by Silero VAD (the ONNX model bundled
with faster-whisper), streamed in windows so long files stay in bounded memory; each
segment becomes an output row with id ``{audio_id}-{start_ms:08d}-{end_ms:08d}``.

Every output carries ``text``, ``language``, ``words`` (word, start, end, prob; seconds
from the segment start) and ``scores`` with ``lid_prob``, ``asr_avg_logprob``,
``asr_compression_ratio`` and ``asr_no_speech_prob``. ``lid_prob`` is the detected
language's probability, or null where no detection ran (an English-only model, or a
fixed ``language``). Language rules reject a segment (``language_not_allowed``,
``low_language_prob``); a segment without text is rejected as ``empty_text``; a file
where VAD finds no speech is rejected as ``no_speech``.

Language rules here or in a downstream ``filter`` need a model that detects languages:
validation reads the model's own files (its vocabulary size, see
:func:`speechmill.stages.audio_models.asr.is_multilingual`; never its name) and refuses an allow-list
or a ``min_language_prob`` with an English-only model, and a ``min_language_prob`` with a
fixed ``language``. A model that is not on this machine yet is not inspected (nothing is
downloaded to validate; setup resolves it).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field

from speechmill.pipeline.audio import AudioError, load_audio
from speechmill.pipeline.models import ModelNotFoundError, ModelSpec, resolve
from speechmill.pipeline.records import recording_id, rejects_table, segment_id
from speechmill.pipeline.stage import Reject, Resources, Stage, StageConfig, StageResult
from speechmill.stages.audio_models.asr import (
    SAMPLE_RATE,
    AsrResult,
    DecodeOptions,
    is_multilingual,
    load_backend,
)

VAD_WINDOW_S = 300.0


class TranscribeConfig(StageConfig):
    backend: Literal["faster-whisper", "whisper"] = "faster-whisper"
    model: str = Field("tiny.en", description="model name (resolved offline-first)")
    model_path: str | None = Field(None, description="local model dir/checkpoint (wins)")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    compute_type: str = Field("default", description="default: int8 on CPU, float16 on GPU")
    cpu_threads: int = Field(
        1, ge=0, description="threads per worker (match resources.cpus); 0: library default, "
        "which follows OMP_NUM_THREADS and so differs between executors"
    )
    language: str | None = Field(None, description="fixed language; None: detect")
    allowed_languages: list[str] = Field(default_factory=list, description="empty: any")
    min_language_prob: float = Field(
        0.0, ge=0, le=1, description="reject segments whose detected language is less "
        "likely (needs a multilingual model and no fixed `language`)"
    )
    beam_size: int = Field(5, ge=1)
    temperature: list[float] = Field(default_factory=lambda: [0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    condition_on_previous_text: bool = False
    initial_prompt: str | None = None
    word_timestamps: bool = True
    batched: bool = Field(
        False, description="faster-whisper only: decode all pieces of a batch together "
        "(BatchedInferencePipeline); needs a fixed language or an English-only model. Its "
        "avg_logprob runs higher than sequential decoding: recalibrate filter thresholds"
    )
    decode_batch: int = Field(8, ge=1, description="pieces per batched decode")
    compression_ratio_threshold: float | None = 2.4
    log_prob_threshold: float | None = -1.0
    no_speech_threshold: float | None = 0.6
    cut: Literal["auto", "vad", "none"] = Field(
        "auto", description="auto: cut rows longer than max_segment_s with VAD"
    )
    max_segment_s: float = Field(30.0, gt=0, le=30.0, description="Whisper's window")
    min_segment_s: float = Field(0.3, ge=0)
    vad_threshold: float = Field(0.5, gt=0, lt=1)
    vad_min_silence_ms: int = Field(500, ge=0)
    vad_speech_pad_ms: int = Field(200, ge=0)


class Transcribe(Stage):
    name = "transcribe"
    description = "Whisper ASR (faster-whisper | whisper): text, language, word times"
    Config = TranscribeConfig
    resources = Resources(cpus=1, memory_gb=1.0)
    uses_model = True
    gpu_when_available = 1.0
    default_batch_size = 32
    default_batch_seconds = 600.0

    #: 2: lid_prob is null where no language detection ran (was 1.0)
    version: ClassVar[int] = 2

    config: TranscribeConfig

    @classmethod
    def validate_config(cls, config: StageConfig) -> None:
        assert isinstance(config, TranscribeConfig)
        if config.batched and config.backend != "faster-whisper":
            raise ValueError("key 'with.batched': only the faster-whisper backend batches")
        if config.batched and config.language is None:
            multilingual = cls.multilingual(config)
            if multilingual is None:  # not local: judge by the name until setup loads it
                multilingual = config.model_path is not None or not config.model.endswith(
                    ".en")
            if multilingual:
                raise ValueError("key 'with.batched': batched decoding needs `language` "
                                 "(it detects one language for the whole batch)")
        cls.check_language_rules(config, config.allowed_languages,
                                 config.min_language_prob or None)

    @classmethod
    def multilingual(cls, config: TranscribeConfig) -> bool | None:
        """Whether the configured model detects languages, read from its files; None when
        it is not on this machine (resolving never downloads here)."""
        spec = ModelSpec(backend=config.backend, name=None if config.model_path else config.model,
                         path=config.model_path, device=config.device,
                         compute_type=config.compute_type)
        try:
            location = resolve(spec, offline=True).location
        except ModelNotFoundError:
            return None
        return is_multilingual(config.backend, location)

    @classmethod
    def check_language_rules(cls, config: StageConfig, allowed_languages: list[str],
                             min_language_prob: float | None,
                             upstream_id: str | None = None) -> None:
        """Raise ValueError (naming the key) when a language rule, here or in a downstream
        stage (``upstream_id`` is then this stage's id), reads what this configuration
        cannot measure."""
        assert isinstance(config, TranscribeConfig)
        keys = [k for k, v in (("allowed_languages", allowed_languages),
                               ("min_language_prob", min_language_prob)) if v]
        if not keys:
            return
        where = "" if upstream_id is None else f" of upstream stage {upstream_id!r}"
        if cls.multilingual(config) is False:
            model = config.model_path or config.model
            named = " and ".join(f"'with.{k}'" for k in keys)
            raise ValueError(
                f"key {named}: model {model!r}{where} is English-only (read from its "
                "vocabulary): it labels every segment 'en' and measures no language "
                "probability, so a language rule cannot work. Use a multilingual model "
                "(e.g. small, large-v3) or drop the rule (annotate's text LID and filter's "
                "lid_mismatch catch foreign speech)")
        if config.language is not None and min_language_prob:
            raise ValueError(
                f"key 'with.min_language_prob': `language` is fixed to "
                f"{config.language!r}{where}, so no language is detected and no language "
                "probability is measured; drop the rule or the fixed language")

    def setup(self) -> None:
        c = self.config
        spec = ModelSpec(backend=c.backend, name=None if c.model_path else c.model,
                         path=c.model_path, device=c.device, compute_type=c.compute_type)
        self.asr = load_backend(spec, offline=self.ctx.offline, cpu_threads=c.cpu_threads)
        self.opts = DecodeOptions(
            language=c.language, beam_size=c.beam_size, temperature=tuple(c.temperature),
            condition_on_previous_text=c.condition_on_previous_text,
            initial_prompt=c.initial_prompt, word_timestamps=c.word_timestamps,
            compression_ratio_threshold=c.compression_ratio_threshold,
            log_prob_threshold=c.log_prob_threshold,
            no_speech_threshold=c.no_speech_threshold,
        )
        self.model_name = c.model_path or c.model

    # -- segmentation ------------------------------------------------------------------
    def _segments(self, row: dict[str, Any]) -> list[tuple[float, float]]:
        """(start, end) in seconds from the row's offset."""
        dur = float(row.get("duration") or 0.0)
        c = self.config
        if c.cut == "none" or (c.cut == "auto" and 0 < dur <= c.max_segment_s):
            return [(0.0, dur)] if dur > 0 else [(0.0, -1.0)]
        return vad_segments(row["audio_path"], float(row.get("offset") or 0.0), dur or None,
                            c.max_segment_s, c.min_segment_s, c.vad_threshold,
                            c.vad_min_silence_ms, c.vad_speech_pad_ms)

    # -- work ------------------------------------------------------------------------------
    def _clips(self, row: dict[str, Any]) -> list[tuple[float, np.ndarray]]:
        """(start seconds from the row's offset, 16 kHz audio) of each piece to decode."""
        try:
            segs = self._segments(row)
        except AudioError as e:
            raise Reject(e.reason, e.detail) from None
        if not segs:
            raise Reject("no_speech", "VAD found no speech")
        base_off = float(row.get("offset") or 0.0)
        clips = []
        for start, end in segs:
            try:
                audio, _ = load_audio(row["audio_path"], base_off + start,
                                      None if end < 0 else end - start, SAMPLE_RATE)
            except AudioError as e:
                raise Reject(e.reason, e.detail) from None
            clips.append((start, audio))
        return clips

    def _assemble(self, row: dict[str, Any], clips: list[tuple[float, np.ndarray]],
                  results: list[AsrResult | None]) -> list[dict[str, Any]]:
        whole = len(clips) == 1 and clips[0][0] == 0.0 and self.config.cut != "vad"
        base_off = float(row.get("offset") or 0.0)
        outs: list[dict[str, Any]] = []
        why: list[str] = []
        for (start, audio), res in zip(clips, results, strict=True):
            if audio.shape[0] == 0 or res is None:
                why.append("empty_audio" if audio.shape[0] == 0 else "empty_text")
                continue
            verdict = self._check(res)
            if verdict:
                why.append(verdict)
                continue
            seg_dur = audio.shape[0] / SAMPLE_RATE
            sid = row["id"] if whole else segment_id(_audio_id(row), base_off + start,
                                                      base_off + start + seg_dur)
            outs.append(self._row(row, sid, base_off + start, seg_dur, res))
        if not outs:
            reason = why[0] if len(set(why)) == 1 else "no_transcript"
            raise Reject(reason.split(":")[0], "; ".join(why)[:500])
        return outs

    def process_row(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        clips = self._clips(row)
        results = [self.asr.transcribe(a, self.opts) if a.shape[0] else None for _, a in clips]
        return self._assemble(row, clips, results)

    def process(self, batch: pa.Table) -> StageResult:
        """With ``batched``: every piece of every row of the batch in one batched
        faster-whisper call; otherwise row by row."""
        if not (self.config.batched and self.config.backend == "faster-whisper"):
            return super().process(batch)
        rows = batch.to_pylist()
        per_row: list[list[tuple[float, np.ndarray]] | dict[str, Any]] = []
        flat: list[np.ndarray] = []
        for row in rows:
            try:
                clips = self._clips(row)
            except Reject as r:
                per_row.append(self.reject_row(row, r.reason, r.detail))
                continue
            per_row.append(clips)
            flat.extend(a for _, a in clips)
        results = iter(self.asr.transcribe_batch(flat, self.opts, self.config.decode_batch)
                       if flat else [])
        outputs: list[dict[str, Any]] = []
        rejects: list[dict[str, Any]] = []
        for row, item in zip(rows, per_row, strict=True):
            if isinstance(item, dict):
                rejects.append(item)
                continue
            res = [next(results) for _ in item]
            try:
                outputs.extend(self._assemble(row, item, res))
            except Reject as r:
                rejects.append(self.reject_row(row, r.reason, r.detail))
        return StageResult(self.outputs_table(outputs), rejects_table(rejects))

    def _check(self, res: AsrResult) -> str | None:
        c = self.config
        if c.allowed_languages and res.language not in c.allowed_languages:
            return f"language_not_allowed: {res.language}"
        if (res.language_prob is not None and c.language is None
                and res.language_prob < c.min_language_prob):
            return f"low_language_prob: {res.language} p={res.language_prob:.2f}"
        if not res.text.strip():
            return "empty_text"
        return None

    def _row(self, row: dict[str, Any], sid: str, offset: float, dur: float,
             res: AsrResult) -> dict[str, Any]:
        scores = dict(row.get("scores") or {})
        scores.update({
            "lid_prob": res.language_prob,
            "asr_avg_logprob": res.avg_logprob,
            "asr_compression_ratio": res.compression_ratio,
            "asr_no_speech_prob": res.no_speech_prob,
            "asr_mean_word_prob": (float(sum(float(w["prob"]) for w in res.words)
                                         / len(res.words)) if res.words else None),
        })
        return {
            **row,
            "id": sid,
            "parent_id": row["id"],
            "offset": round(offset, 3),
            "duration": round(dur, 3),
            "text": res.text,
            "language": res.language,
            "words": res.words,
            "scores": scores,
            "asr_model": f"{self.config.backend}:{self.model_name}",
        }


def _audio_id(row: dict[str, Any]) -> str:
    """The recording id a segment id is built on (the row's own id for whole files)."""
    return recording_id(row["id"]) if row.get("offset") else str(row["id"])


def vad_segments(path: str, offset: float, duration: float | None, max_s: float,
                 min_s: float, threshold: float, min_silence_ms: int,
                 pad_ms: int) -> list[tuple[float, float]]:
    """Speech regions of ``path`` (seconds from ``offset``), at most ``max_s`` long.

    The audio is read in ``VAD_WINDOW_S`` windows, so memory does not grow with the
    file; regions touching a window edge are joined with the next window's.
    """
    from faster_whisper.vad import VadOptions, get_speech_timestamps

    opts = VadOptions(threshold=threshold, min_silence_duration_ms=min_silence_ms,
                      speech_pad_ms=pad_ms, max_speech_duration_s=max_s)
    regions: list[list[float]] = []
    pos = 0.0
    while duration is None or pos < duration:
        length = VAD_WINDOW_S if duration is None else min(VAD_WINDOW_S, duration - pos)
        audio, _ = load_audio(path, offset + pos, length, SAMPLE_RATE)
        if audio.shape[0] == 0:
            break
        win_len = audio.shape[0] / SAMPLE_RATE
        for ts in get_speech_timestamps(audio, opts, sampling_rate=SAMPLE_RATE):
            s, e = pos + ts["start"] / SAMPLE_RATE, pos + ts["end"] / SAMPLE_RATE
            if regions and s - regions[-1][1] < 0.05 and e - regions[-1][0] <= max_s:
                regions[-1][1] = e  # continues across the window edge
            else:
                regions.append([s, e])
        pos += win_len
        if win_len < length - 1e-3:
            break
    return [(round(s, 3), round(e, 3)) for s, e in regions if e - s >= min_s]
