"""Stage ``tts``: speak every turn, check every clip, keep what passes.

A model stage (actor pool) over turn rows (:mod:`speechmill.synth.text.turns`, after
``speech_rewrite``). ``setup()`` loads the TTS backend(s) (:func:`speechmill.synth.tts.
load_backend`), the QC models (the ``transcribe`` stage's ASR backend, Resemblyzer, DNSMOS;
:mod:`speechmill.synth.qc.synth_qc`) and the voice bank (:mod:`speechmill.synth.voices.bank`).

Voices. User turns: every dialogue gets one voice of the bank for all its user turns,
spread evenly over the bank (:meth:`VoiceBank.assign_all` over the stage's whole input in
``prepare``: a seeded, balanced deal that no batch, worker count or resume changes; no
voice takes more than ``max_share`` of the dialogues; ``match_language`` /
``match_gender`` prefer voices of the dialogue's language / a ``user_gender`` column).
The voice's best prompt clip that the backend accepts (its ``prompt_seconds``) is the
prompt. A preset backend without ``voice_match`` ignores prompts, so its user turns get
its preset voice (``voice_source: preset``) and no bank is needed. Assistant turns: one
configured voice, ``assistant_voice`` (a bank voice id, left out of the user pool) or the
``assistant_backend``'s (default: ``backend``'s) preset voice.

Per turn: synthesize (the backend splits long text at sentences and joins with pauses),
run the QC, and retry a failing clip with a new seed up to ``max_attempts`` (a backend
that returns the same audio for another seed is not asked again); the best attempt is
kept when it passes, else the turn is rejected with the best attempt's reason
(``qc_duration``, ``qc_clipping``, ``qc_wer``, ``qc_speaker``, ``qc_dnsmos``,
``tts_error``; the detail has its scores). Turns in a language outside ``languages`` are
``unsupported_language``; a user turn whose voice has no clip the backend accepts is
``tts_error``.

Transient and data rejects: a turn none of whose attempts made audio because the TTS
service failed after its retries (server down or refusing connections, timeouts,
408/425/429/5xx: a transient :class:`~speechmill.synth.tts.base.TTSError`) is rejected
as ``tts_error`` with ``kind`` "transient" (counted toward the error budget, retried by a
rerun). Every other reject is data: ``qc_*`` (audio was made and judged), ``tts_error``
for empty text, an unusable prompt, other 4xx answers, undecodable audio or a model
failing on the text, and ``unsupported_language``.

Kept clips are written to ``RUN_DIR/media/<stage id>/<dialogue_id>/<turn id>.<flac|wav>``
(a temporary file renamed into place: a killed run never leaves half a clip, and a resume
overwrites the same name, so there is never a duplicate clip). Output row = the turn's
columns + ``audio_path`` (absolute), ``offset`` 0, ``duration``, ``sample_rate``,
``channels`` 1, ``speaker`` = ``voice_id``, ``voice_source``, ``tts_backend``,
``tts_version``, ``tts_seed``, ``attempts``, ``words`` (the QC round trip's words, clip
times; null without it), ``qc`` (the kept attempt's scores), ``qc_text`` (its transcript),
``synthetic`` true and ``synth`` (JSON provenance: the LLM from the turn's ``source``, the
TTS backend, version and seed, the voice and its source).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field

from speechmill.pipeline.records import WORD_TYPE, conform, rejects_table, stable_hash
from speechmill.pipeline.stage import (
    Resources,
    Stage,
    StageConfig,
    StageContext,
    StageResult,
)
from speechmill.synth.qc.synth_qc import QC_TYPE, QCConfig, QCResult, qc_struct
from speechmill.synth.tts.spec import CLONING_BACKENDS, TTSSpec

#: the sentence a preset voice speaks once per worker: the reference its clips are
#: compared with (speaker QC of voices that were never given a prompt)
REFERENCE_TEXT = ("Thank you for asking. I am happy to help you with that, and I will "
                  "explain everything step by step.")
IN_PROCESS = ("f5_tts", "pocket_tts", "xtts")


class TTSStageConfig(StageConfig):
    backend: TTSSpec = Field(default_factory=lambda: TTSSpec(backend="piper"),
                             description="TTS backend of the user turns (synth.tts.TTSSpec)")
    assistant_backend: TTSSpec | None = Field(None, description="backend of the assistant "
                                              "turns (default: backend)")
    assistant_voice: str | None = Field(None, description="the assistant's voice: a bank "
                                        "voice id (left out of the user pool); null: the "
                                        "assistant backend's preset voice (`voice`), or "
                                        "with a cloning backend the bank's best voice")
    voice_bank: str | None = Field(None, description="a voice_bank stage id of this DAG (list "
                                   "it in needs), or a path to voices.parquet / its folder")
    seed: int = Field(0, description="voice deal and synthesis seeds")
    max_share: float = Field(0.2, gt=0, le=1, description="no voice speaks more than this "
                             "share of the dialogues' user turns")
    match_language: bool = Field(True, description="prefer voices of the dialogue's language")
    match_gender: bool = Field(False, description="prefer voices whose gender estimate "
                               "matches a `user_gender` column")
    languages: list[str] = Field(default_factory=list, description="turns in other languages "
                                 "are unsupported_language rejects (empty: all; turns "
                                 "without a language pass)")
    max_attempts: int = Field(3, ge=1, le=20, description="syntheses per turn (QC retries)")
    audio_format: Literal["flac", "wav"] = "flac"
    sample_rate: int | None = Field(None, ge=8000, le=192000,
                                    description="resample clips (default: the backend's)")
    qc: QCConfig = Field(default_factory=QCConfig)


def uses_bank_voices(spec: TTSSpec) -> bool:
    """Whether the backend does something with a prompt (cloning or voice matching)."""
    return spec.backend in CLONING_BACKENDS or spec.voice_match is not None


def bank_location(value: str | None, run_dir: str | os.PathLike[str] | None) -> Path | None:
    """``voices.parquet`` of ``value``: a voice_bank stage id of the run, or a path."""
    if not value:
        return None
    from speechmill.synth.voices.bank import bank_path
    from speechmill.synth.voices.voice_bank import voice_bank_dir

    if run_dir is not None and "/" not in value and not value.endswith(".parquet"):
        d = voice_bank_dir(run_dir, value)
        if d.exists() or not Path(value).exists():
            return d / "voices.parquet"
    return bank_path(value)


def preset_voice_id(spec: TTSSpec) -> str:
    return f"{spec.backend}:{spec.voice or 'default'}"


def assistant_bank_voice(config: TTSStageConfig, bank: Any) -> str | None:
    """The bank voice the assistant speaks with: ``assistant_voice``, else (a cloning
    backend without a named voice of its own) the bank's best voice, else None (a preset)."""
    if config.assistant_voice is not None:
        return config.assistant_voice
    spec = config.assistant_backend or config.backend
    if bank is not None and spec.backend in CLONING_BACKENDS and spec.voice is None:
        return bank.best_voice()
    return None


class TTS(Stage):
    #: a voice bank named by stage id is found under RUN_DIR by local path (URL run dirs: refused)
    local_run_dir_only: ClassVar[bool] = True
    name = "tts"
    description = "speak dialogue turns (voice bank, cloning / preset TTS) with QC and retries"
    Config = TTSStageConfig
    resources = Resources(cpus=1, memory_gb=2.0)
    uses_model = True
    default_batch_size = 8
    prepare_columns = ("dialogue_id", "language", "role", "user_gender")
    summary_columns = ("voice_id", "role", "attempts", "qc", "duration", "voice_source",
                       "text", "language")
    version: ClassVar[int] = 1

    config: TTSStageConfig

    # -- configuration ---------------------------------------------------------------------------
    @classmethod
    def validate_config(cls, config: StageConfig) -> None:
        assert isinstance(config, TTSStageConfig)
        b = config.backend
        if b.backend in CLONING_BACKENDS and config.voice_bank is None and b.voice is None:
            raise ValueError(f"key 'with.voice_bank': backend {b.backend!r} clones voices from "
                             "prompt clips: name a voice_bank stage (or voices.parquet)")
        if b.voice_match is not None and config.voice_bank is None:
            raise ValueError("key 'with.voice_bank': voice_match needs prompt speakers: name "
                             "a voice_bank stage (or voices.parquet)")
        a = config.assistant_backend or b
        if a.backend in CLONING_BACKENDS and config.assistant_voice is None and a.voice is None \
                and config.voice_bank is None:
            raise ValueError(f"key 'with.voice_bank': the assistant backend {a.backend!r} "
                             "clones a voice: name a voice_bank (its best voice is the "
                             "assistant's unless assistant_voice names one)")
        if config.assistant_voice is not None and config.voice_bank is None:
            raise ValueError("key 'with.assistant_voice': a bank voice needs `voice_bank`")

    @classmethod
    def validate_dag(cls, config: StageConfig,
                     upstream: dict[str, tuple[type[Stage], StageConfig]]) -> None:
        assert isinstance(config, TTSStageConfig)
        v = config.voice_bank
        if v is None:
            return
        if v in upstream:
            if upstream[v][0].name != "voice_bank":
                raise ValueError(f"key 'with.voice_bank': stage {v!r} is a "
                                 f"{upstream[v][0].name!r} stage, not a voice_bank")
            return
        if not Path(v).exists():
            raise ValueError(f"key 'with.voice_bank': no voice_bank stage {v!r} upstream (list "
                             "it in needs) and no voices.parquet or folder at that path")

    @classmethod
    def gpu_share(cls, config: StageConfig) -> float:
        assert isinstance(config, TTSStageConfig)
        specs = [config.backend, config.assistant_backend or config.backend]
        if any(s.backend in IN_PROCESS and s.device != "cpu" for s in specs):
            return 1.0
        return 0.0

    # -- the voice deal (driver, whole input) ----------------------------------------------------
    @classmethod
    def prepare(cls, config: StageConfig, inputs: pa.Table,
                ctx: StageContext | None = None) -> Any:
        assert isinstance(config, TTSStageConfig)
        if not uses_bank_voices(config.backend) or config.voice_bank is None:
            return None
        from speechmill.pipeline.errors import ConfigError
        from speechmill.synth.voices.bank import VoiceBankError, load_voice_bank

        loc = bank_location(config.voice_bank, ctx.run_dir if ctx else None)
        stage = ctx.stage_id if ctx else None
        try:
            bank = load_voice_bank(loc) if loc is not None else None
        except VoiceBankError as e:
            raise ConfigError(str(e), stage=stage, key="with.voice_bank") from None
        if bank is None or "dialogue_id" not in inputs.column_names:
            return None
        if not len(bank):
            raise ConfigError(f"the voice bank {str(loc)!r} has no voice (see its voices.json "
                              "for what was left out)", stage=stage, key="with.voice_bank")
        cols = {c: inputs.column(c).to_pylist() for c in cls.prepare_columns
                if c in inputs.column_names}
        dialogues: dict[str, dict[str, Any]] = {}
        n = inputs.num_rows
        for i in range(n):
            did = cols["dialogue_id"][i]
            if did is None:
                continue
            d = dialogues.setdefault(str(did), {"dialogue_id": str(did)})
            role = cols.get("role", [None] * n)[i]
            if role in (None, "user"):
                d.setdefault("language", cols.get("language", [None] * n)[i])
                d.setdefault("gender", cols.get("user_gender", [None] * n)[i])
        assistant = assistant_bank_voice(config, bank)
        exclude = [assistant] if assistant else []
        try:
            plan = bank.assign_all(dialogues.values(), seed=config.seed,
                                   max_share=config.max_share,
                                   match_language=config.match_language,
                                   match_gender=config.match_gender, exclude=exclude)
        except VoiceBankError as e:
            raise ConfigError(str(e), stage=stage, key="with.max_share") from None
        return {"voices": plan}

    # -- worker --------------------------------------------------------------------------------
    def setup(self) -> None:
        from speechmill.synth.qc.synth_qc import SynthQC
        from speechmill.synth.tts import load_backend
        from speechmill.synth.voices.bank import load_voice_bank

        c = self.config
        off = self.ctx.offline
        self.user_tts = load_backend(c.backend, offline=off)
        self.asst_tts = (load_backend(c.assistant_backend, offline=off)
                         if c.assistant_backend is not None else self.user_tts)
        loc = bank_location(c.voice_bank, self.ctx.run_dir)
        self.bank = load_voice_bank(loc) if loc is not None else None
        if c.assistant_voice is not None and (self.bank is None
                                              or c.assistant_voice not in self.bank):
            from speechmill.pipeline.errors import ConfigError

            raise ConfigError(f"assistant voice {c.assistant_voice!r} is not in the voice bank "
                              f"{str(loc)!r}", stage=self.ctx.stage_id,
                              key="with.assistant_voice")
        self.plan: dict[str, str] = (self.ctx.prepared or {}).get("voices", {})
        self.assistant_voice = assistant_bank_voice(c, self.bank)
        self.qc = SynthQC(c.qc, offline=off)
        self.qc.load()
        self._references: dict[str, np.ndarray | None] = {}
        self.media = self.ctx.media_dir
        self.media.mkdir(parents=True, exist_ok=True)

    def _preset_reference(self, tts: Any, key: str) -> np.ndarray | None:
        """Embedding of the preset voice speaking :data:`REFERENCE_TEXT` (once per worker)."""
        if key not in self._references:
            ref = None
            if self.qc.cfg.enabled and self.qc.cfg.min_speaker_sim is not None:
                from speechmill.synth.voices.voice_match import embed

                out = tts.synthesize(REFERENCE_TEXT, None, seed=0)
                ref = embed(out.audio, out.sample_rate)
            self._references[key] = ref
        return self._references[key]

    def _voice(self, row: dict[str, Any]) -> tuple[Any, str, Any, np.ndarray | None]:
        """(backend, voice id, prompt or None, prompt embedding or None) of a turn."""
        from speechmill.synth.tts.base import TTSError
        from speechmill.synth.voices.bank import VoiceBankError

        c = self.config
        assistant = row.get("role") == "assistant"
        tts = self.asst_tts if assistant else self.user_tts
        spec = (c.assistant_backend or c.backend) if assistant else c.backend
        if not uses_bank_voices(spec):
            vid = None  # a preset ignores prompts: its own voice
        elif assistant:
            vid = self.assistant_voice
        elif self.bank is not None:
            vid = self.plan.get(str(row.get("dialogue_id")))
            if vid is None:  # a dialogue the plan did not see: hash it on its own
                vid = self.bank.assign(str(row.get("dialogue_id")), c.seed,
                                       language=row.get("language"),
                                       match_language=c.match_language,
                                       exclude=[self.assistant_voice]
                                       if self.assistant_voice else ())
        else:
            vid = None
        if vid is None or self.bank is None:
            return tts, preset_voice_id(spec), None, None
        try:
            clip = self.bank.clip(vid, tuple(tts.prompt_seconds))
        except VoiceBankError as e:
            raise TTSError(str(e)) from None
        prompt = self.bank.prompt(vid, tuple(tts.prompt_seconds))
        return tts, vid, prompt, clip.embedding

    def _measure(self, row: dict[str, Any], tts: Any, syn: Any, prompt_emb: np.ndarray | None,
                 voice_key: str) -> QCResult:
        source = syn.voice_source
        ref = self._preset_reference(tts, voice_key) if source == "preset" else prompt_emb
        return self.qc.measure(syn.audio, syn.sample_rate, str(row.get("text") or ""),
                               row.get("language"), ref, source)

    def process(self, batch: pa.Table) -> StageResult:
        from speechmill.synth.qc.synth_qc import tts_error_result
        from speechmill.synth.tts.base import TTSError, TTSRequest

        c = self.config
        rows = batch.to_pylist()
        outputs: list[dict[str, Any]] = []
        rejects: list[dict[str, Any]] = []
        todo: dict[int, dict[str, Any]] = {}
        for i, row in enumerate(rows):
            lang = row.get("language")
            if c.languages and lang and lang.split("-")[0] not in c.languages:
                rejects.append(self.reject_row(row, "unsupported_language",
                                               f"language {lang!r} not in {c.languages}"))
                continue
            if not str(row.get("text") or "").strip():
                rejects.append(self.reject_row(row, "tts_error", "empty text"))
                continue
            try:
                tts, vid, prompt, emb = self._voice(row)
            except TTSError as e:
                rejects.append(self.reject_row(row, "tts_error", str(e)))
                continue
            base = stable_hash("tts", c.seed, row.get("id")) % (2**31 - 1000)
            todo[i] = {"tts": tts, "voice_id": vid, "prompt": prompt, "emb": emb,
                       "preset_key": f"{id(tts)}:{vid if prompt is None else ''}",
                       "seed": base, "attempts": [], "audio_hashes": set(), "done": False}
        for attempt in range(c.max_attempts):
            live = [i for i, st in todo.items() if not st["done"]]
            if not live:
                break
            by_backend: dict[int, list[int]] = {}
            for i in live:
                by_backend.setdefault(id(todo[i]["tts"]), []).append(i)
            for idxs in by_backend.values():
                tts = todo[idxs[0]]["tts"]
                reqs = [TTSRequest(text=str(rows[i]["text"]), voice=todo[i]["prompt"],
                                   seed=todo[i]["seed"] + attempt,
                                   language=rows[i].get("language")) for i in idxs]
                results = tts.synthesize_batch(reqs)
                for i, res in zip(idxs, results, strict=True):
                    st = todo[i]
                    seed = st["seed"] + attempt
                    if isinstance(res, TTSError):
                        st["attempts"].append((tts_error_result(
                            str(res), getattr(res, "transient", False)), None, seed))
                        continue
                    h = hashlib.sha256(np.ascontiguousarray(res.audio).tobytes()).hexdigest()
                    try:
                        qc = self._measure(rows[i], tts, res, st["emb"], st["preset_key"])
                    except TTSError as e:  # the preset's reference clip could not be made
                        st["attempts"].append((tts_error_result(
                            str(e), getattr(e, "transient", False)), None, seed))
                        continue
                    st["attempts"].append((qc, res, seed))
                    if qc.passed or h in st["audio_hashes"]:
                        st["done"] = True  # passed, or the backend repeats itself
                    st["audio_hashes"].add(h)
        for i, st in todo.items():
            row = rows[i]
            qc, syn, seed = min(st["attempts"], key=lambda a: a[0].rank_key())
            n = len(st["attempts"])
            if not qc.passed or syn is None:
                scores = ", ".join(f"{k} {v:.3g}" for k, v in qc.scores.items()
                                   if v is not None)
                heard = f'; heard "{qc.transcript[:200]}"' if qc.transcript is not None else ""
                detail = (f"{qc.detail()} (best of {n} attempt{'s' * (n > 1)}"
                          + (f"; {scores}" if scores else "") + heard + ")")
                # no attempt made audio, and the service failed: not the turn's fault
                transient = all(a[1] is None for a in st["attempts"]) and any(
                    a[0].transient for a in st["attempts"])
                rejects.append(self.reject_row(row, qc.reason or "tts_error", detail,
                                               transient=transient))
                continue
            try:
                outputs.append(self._kept(row, st, qc, syn, seed, n))
            except OSError:
                raise  # a full or read-only disk stops the stage
        return StageResult(self._table(outputs), rejects_table(rejects))

    def _write(self, row: dict[str, Any], audio: np.ndarray, sr: int) -> Path:
        from speechmill.pipeline.audio_write import write_audio
        from speechmill.pipeline.safe_names import safe_name

        d = self.media / safe_name(row.get("dialogue_id") or "turns")
        d.mkdir(parents=True, exist_ok=True)
        ext = self.config.audio_format
        path = d / safe_name(str(row["id"]), suffix=f".{ext}")
        tmp = d / f".{path.name}.{os.getpid()}.tmp"
        write_audio(tmp, audio, sr, format=ext.upper(), subtype="PCM_16")  # ENOSPC stays fatal
        os.replace(tmp, path)
        return Path(os.path.abspath(path))

    def _kept(self, row: dict[str, Any], st: dict[str, Any], qc: QCResult, syn: Any,
              seed: int, attempts: int) -> dict[str, Any]:
        from speechmill.synth.tts.audio import resample

        audio, sr = syn.audio, syn.sample_rate
        if self.config.sample_rate and self.config.sample_rate != sr:
            audio, sr = resample(audio, sr, self.config.sample_rate), self.config.sample_rate
        path = self._write(row, audio, sr)
        try:
            source = json.loads(row.get("source") or "{}")
        except (TypeError, ValueError):
            source = {}
        llm = {k: source[k] for k in ("model", "prompt_version", "temperature", "seed",
                                      "generator", "format", "dataset") if k in source}
        details = {k: v for k, v in (syn.details or {}).items()
                   if k in ("pitch_factor", "formant_factor", "match_cosine", "plain_cosine")}
        prompt = st["prompt"]
        synth = {"llm": llm or None,
                 "tts": {"backend": syn.backend, "version": syn.backend_version, "seed": seed,
                         "attempts": attempts},
                 "voice_id": st["voice_id"], "voice_source": syn.voice_source,
                 "prompt": None if prompt is None or syn.voice_source == "preset" else
                 {"voice_id": prompt.voice_id, "audio_path": prompt.audio_path},
                 "voice_match": details or None}
        words = None
        if qc.words is not None:
            words = [{"word": str(w["word"]), "start": float(w["start"]),
                      "end": float(w["end"]), "prob": float(w["prob"])} for w in qc.words]
        return {
            **row,
            "parent_id": row.get("id"),
            "audio_path": str(path), "offset": 0.0,
            "duration": round(audio.shape[0] / sr, 6), "sample_rate": int(sr), "channels": 1,
            "speaker": st["voice_id"], "voice_id": st["voice_id"],
            "voice_source": syn.voice_source, "tts_backend": syn.backend,
            "tts_version": syn.backend_version, "tts_seed": int(seed),
            "attempts": int(attempts), "words": words, "qc": qc_struct(qc.scores),
            "qc_text": qc.transcript, "synthetic": True,
            "synth": json.dumps(synth, sort_keys=True, ensure_ascii=False),
        }

    def _table(self, rows: list[dict[str, Any]]) -> pa.Table:
        if not rows:
            return self.outputs_table([])
        t = pa.Table.from_pylist(rows)
        fixed = {"words": pa.list_(WORD_TYPE), "qc": QC_TYPE, "qc_text": pa.string(),
                 "voice_id": pa.string(), "voice_source": pa.string(),
                 "tts_backend": pa.string(), "tts_version": pa.string(),
                 "tts_seed": pa.int64(), "attempts": pa.int32(), "synth": pa.string(),
                 "synthetic": pa.bool_()}
        for name, typ in fixed.items():
            i = t.schema.get_field_index(name)
            if i >= 0 and t.column(i).type != typ:
                t = t.set_column(i, pa.field(name, typ), t.column(i).cast(typ))
        return conform(t)

    # -- summary ---------------------------------------------------------------------------------
    @classmethod
    def summarize(cls, outputs: pa.Table, rejects: pa.Table) -> dict[str, Any] | None:
        from speechmill.synth.qc.synth_qc import normalize_words

        n_out = outputs.num_rows
        reasons = Counter(rejects.column("reason").to_pylist()) if rejects.num_rows else \
            Counter()
        qc_rej = sum(v for k, v in reasons.items() if k.startswith("qc_"))
        s: dict[str, Any] = {"clips": n_out, "qc_rejects": qc_rej,
                             "qc_reject_share": round(qc_rej / max(1, n_out + qc_rej), 4)}
        if not n_out:
            return s
        cols = {c: outputs.column(c).to_pylist() for c in cls.summary_columns
                if c in outputs.column_names}
        roles = cols.get("role", [None] * n_out)
        vids = cols.get("voice_id", [None] * n_out)
        s["voices"] = len({v for v in vids if v})
        s["user_voices"] = len({v for v, r in zip(vids, roles, strict=True)
                                if v and r == "user"})
        s["voice_sources"] = dict(sorted(Counter(str(v) for v in
                                                 cols.get("voice_source", [])).items()))
        errs = words = 0.0
        wers = []
        for q, text, lang in zip(cols.get("qc", [None] * n_out), cols.get("text", [""] * n_out),
                                 cols.get("language", [None] * n_out), strict=True):
            w = (q or {}).get("wer")
            if w is None:
                continue
            nw = len(normalize_words(text or "", lang))
            errs += w * nw
            words += nw
            wers.append(w)
        if words:
            s["wer"] = round(errs / words, 4)  # corpus WER of the kept clips
            s["wer_measured_clips"] = len(wers)
        att = [a for a in cols.get("attempts", []) if a is not None]
        if att:
            s["mean_attempts"] = round(float(np.mean(att)), 3)
        durs = [d for d in cols.get("duration", []) if d is not None]
        s["audio_hours"] = round(sum(durs) / 3600, 4)
        return s

    @classmethod
    def summary_lines(cls, summary: dict[str, Any]) -> list[str]:
        if not summary:
            return []
        wer = summary.get("wer")
        return [f"{summary.get('clips', 0)} clips in {summary.get('voices', 0)} voices "
                f"({summary.get('user_voices', 0)} user voices); kept clips' round-trip WER "
                + (f"{wer:.3f}" if wer is not None else "-")
                + f"; QC rejects {summary.get('qc_rejects', 0)} "
                f"({100 * summary.get('qc_reject_share', 0):.1f}%), "
                f"{summary.get('mean_attempts', 0)} attempts per clip"]
