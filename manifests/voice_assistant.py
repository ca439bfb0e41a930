"""Sink stage ``voice_assistant``: a VoiceAssistant-400K-style Parquet dataset.

Mini-Omni's VoiceAssistant-400K has one row per (question, answer) round of a dialogue:
``split_name``, ``index``, ``round``, ``question``, ``question_audio`` (Hugging Face
``Audio``), ``answer`` and ``answer_snac`` (the answer's SNAC 24 kHz codes as text). This
sink writes the same columns from synthesized dialogues (complete ones; see
:mod:`speechmill.synth.text.dialogues`), loadable with ``datasets.load_dataset("parquet",
...)`` or ``load_dataset(DIR)``::

    README.md                                     dataset card (a split per file set)
    data/{split}-{shard:05d}-of-{n:05d}.parquet

- ``split_name``: the ``split_name`` key, else where the dialogue's text came from (the
  ``sft_import`` dataset's file name, or ``dialogue_generate``), else ``synthetic``.
- ``index``: the dialogue's position in its split (0-based, rows ordered by dialogue id);
  ``round``: the pair's position in the dialogue (turns ``2*round`` and ``2*round+1``).
- ``question_audio``: the user turn's clip (``{bytes, path}``, 16-bit FLAC or WAV, the
  ``tts`` sample rate unless ``sample_rate`` is set); ``answer_audio`` too with
  ``answer_audio: true``.
- ``answer_snac``: Mini-Omni's text layout of SNAC codes (``utils/snac_utils.py``): per
  ~12 Hz frame ``t`` a ``#`` then its 7 codes in SNAC's depth-first order ``c0[t]
  c1[2t] c2[4t] c2[4t+1] c1[2t+1] c2[4t+2] c2[4t+3]``, space-separated:
  ``"# 12 7 ... # 40 ..."``. The codes are the ``codes`` column the ``tokenize`` stage
  adds with a SNAC 24 kHz codec (``audio: {backend: snac}``) before this sink. Without a
  ``codes`` column ``answer_snac`` is null (add tokenize with SNAC); other codecs are a
  configuration error.
- Provenance (every row is synthetic): ``synthetic`` (true), ``llm``, per side
  ``question_voice``/``answer_voice`` (voice ids), ``question_voice_source``/
  ``answer_voice_source`` (``clone`` | ``preset`` | ``voice_match``),
  ``question_tts``/``answer_tts`` (TTS backend and version) and ``provenance`` (JSON of
  both turns' full provenance); also ``dialogue_id``, ``question_id``, ``answer_id``,
  ``language`` and the clip durations.

Rows are ordered by (split, dialogue id, round); the same input gives byte-identical
files. A pair whose question clip cannot be read is a reject of both turns (the question
with the decoder's reason, the answer ``question_unreadable``).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field

from speechmill.manifests.common import data_file_split, split_groups, track
from speechmill.pipeline.clips import Clip, encode_clip, namer_for
from speechmill.pipeline.errors import ConfigError
from speechmill.pipeline.records import reject, rejects_table
from speechmill.pipeline.stage import Resources, SinkResult, Stage, StageConfig
from speechmill.synth.text.dialogues import (
    DIALOGUE_COLUMNS,
    PROVENANCE_COLUMNS,
    Dialogue,
    check_turn_columns,
    iter_dialogues,
    parse_json,
    survey,
    tts_label,
    turn_provenance,
)

AUDIO_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
FIELDS: list[tuple[str, pa.DataType]] = [
    ("split_name", pa.string()),
    ("index", pa.int64()),
    ("round", pa.int64()),
    ("question", pa.string()),
    ("question_audio", AUDIO_TYPE),
    ("answer", pa.string()),
    ("answer_snac", pa.string()),
    ("dialogue_id", pa.string()),
    ("question_id", pa.string()),
    ("answer_id", pa.string()),
    ("language", pa.string()),
    ("question_duration", pa.float64()),
    ("answer_duration", pa.float64()),
    ("synthetic", pa.bool_()),
    ("llm", pa.string()),
    ("question_voice", pa.string()),
    ("answer_voice", pa.string()),
    ("question_voice_source", pa.string()),
    ("answer_voice_source", pa.string()),
    ("question_tts", pa.string()),
    ("answer_tts", pa.string()),
    ("provenance", pa.string()),
]
HF_DTYPES = {pa.string(): "string", pa.int64(): "int64", pa.float64(): "float64",
             pa.bool_(): "bool"}
READ_COLUMNS = ("audio_path", "offset", "duration", "sample_rate", "speaker", "text",
                "codes", "audio_tokenizer", *PROVENANCE_COLUMNS, *DIALOGUE_COLUMNS)
#: Mini-Omni frame order: (codebook, position within the ~12 Hz frame) of each code
SNAC_ORDER = ((0, 0), (1, 0), (2, 0), (2, 1), (1, 1), (2, 2), (2, 3))


def snac_text(codes: Sequence[Sequence[int]]) -> str:
    """SNAC 24 kHz codes ``[c0 [T], c1 [2T], c2 [4T]]`` as Mini-Omni's text layout:
    ``"# c0[0] c1[0] c2[0] c2[1] c1[1] c2[2] c2[3] # c0[1] ..."`` (see the module
    docstring). Raises ValueError unless there are 3 codebooks at rates 1:2:4."""
    if len(codes) != 3:
        raise ValueError(f"SNAC 24 kHz has 3 codebooks, got {len(codes)}")
    cs = [np.asarray(c, dtype=np.int64).reshape(-1) for c in codes]
    t = cs[0].size
    for j, c in enumerate(cs):
        if c.size != t * 2**j:
            raise ValueError(f"codebook {j} has {c.size} codes; with {t} in codebook 0 it "
                             f"must have {t * 2**j} (rates 1:2:4)")
    if t == 0:
        raise ValueError("no SNAC frames")
    frames = np.empty((t, 7), np.int64)
    for i, (cb, pos) in enumerate(SNAC_ORDER):
        frames[:, i] = cs[cb][pos::2**cb]
    return " ".join("# " + " ".join(map(str, f)) for f in frames.tolist())


def parse_snac_text(s: str) -> list[np.ndarray]:
    """The inverse of :func:`snac_text`: ``[c0, c1, c2]`` int64 arrays."""
    frames = [f.split() for f in s.split("#") if f.strip()]
    if any(len(f) != 7 for f in frames):
        raise ValueError("every frame needs 7 codes after its '#'")
    t = len(frames)
    cs = [np.empty(t * 2**j, np.int64) for j in range(3)]
    a = np.asarray(frames, dtype=np.int64).reshape(t, 7)
    for i, (cb, pos) in enumerate(SNAC_ORDER):
        cs[cb][pos::2**cb] = a[:, i]
    return cs


class VoiceAssistantConfig(StageConfig):
    split_name: str | None = Field(None, description="value of the split_name column "
                                   "(default: the text's source: dataset file or generator)")
    audio_format: Literal["flac", "wav"] = Field("flac", description="encoding of the clips")
    sample_rate: int | None = Field(None, gt=0, description="resample clips (default: keep)")
    answer_audio: bool = Field(False, description="also carry the answer's clip "
                               "(answer_audio, an Audio column)")
    shard_size: int | None = Field(None, ge=1, description="rows (rounds) per file")
    shard_bytes: int | None = Field(500_000_000, ge=1, description="about this many audio "
                                    "bytes per file")
    row_group_size: int = Field(100, ge=1, description="rows per Parquet row group")
    truncate_incomplete: bool = Field(False, description="keep the rounds before a "
                                      "dialogue's first missing one instead of rejecting it")
    by_split: bool = Field(True, description="one file set (HF split) per value of `split`")


def _split_name(cfg_name: str | None, row: Mapping[str, Any]) -> str:
    if cfg_name:
        return cfg_name
    src = parse_json(row.get("source"))
    if src.get("dataset"):
        name = str(src["dataset"]).rstrip("/").rsplit("/", 1)[-1]
        return re.sub(r"\.(jsonl?|parquet|csv|tsv|txt)(\.gz)?$", "", name) or "synthetic"
    return str(src.get("generator") or src.get("stage") or "synthetic")


def check_snac_codec(inputs: pa.Table, stage_id: str) -> bool:
    """Whether the input has SNAC codes; a codec other than SNAC 24 kHz (3 codebooks) is a
    configuration error naming the stage."""
    import pyarrow.compute as pc

    if "codes" not in inputs.column_names or inputs.num_rows == 0:
        return False
    if inputs.column("codes").null_count == inputs.num_rows:
        return False
    if "audio_tokenizer" in inputs.column_names:
        for v in pc.unique(inputs.column("audio_tokenizer")).to_pylist():
            info = parse_json(v)
            n = len(info.get("codebook_sizes") or [])
            if info and n != 3:
                raise ConfigError(f"answer_snac needs SNAC 24 kHz codes (3 codebooks); the "
                                  f"tokenize stage's codec {info.get('name')!r} has {n}: use "
                                  "tokenize with `audio: {backend: snac}`",
                                  stage=stage_id, key="needs")
    return True


class VoiceAssistantExport(Stage):
    name = "voice_assistant"
    description = ("VoiceAssistant-400K-style Parquet: question audio + text, answer text "
                   "+ SNAC (Mini-Omni), one row per round")
    Config = VoiceAssistantConfig
    resources = Resources(cpus=1)
    is_sink = True
    output_root = "exports"

    config: VoiceAssistantConfig

    def export(self, inputs: pa.Table, out_dir: Path) -> SinkResult:
        cfg = self.config
        sid = self.ctx.stage_id
        check_turn_columns(inputs, sid)
        has_codes = check_snac_codec(inputs, sid)
        out_dir = Path(out_dir)
        data_dir = out_dir / "data"
        data_dir.mkdir(parents=True, exist_ok=True)
        schema = self._schema()
        info = survey(inputs, self.ctx.run_dir, splits=cfg.by_split)
        rejects: list[dict[str, Any]] = []
        splits: dict[str, dict[str, Any]] = {}
        files: dict[str, list[str]] = {}
        seconds = 0.0
        no_snac = 0
        taken: set[str] = set()
        for split, group in split_groups(inputs, cfg.by_split):
            name = data_file_split(split, taken)
            namer = namer_for(group)
            writer = _Shards(data_dir, name, schema, cfg)
            n_rows, n_dlg, secs = 0, 0, 0.0
            dialogues = iter_dialogues(group, sid, rejects,
                                       truncate_incomplete=cfg.truncate_incomplete,
                                       columns=READ_COLUMNS, info=info)
            for d in track(dialogues, group.num_rows // 2, f"{sid} {name}"):
                rows = self._rows(d, n_dlg, has_codes, namer, rejects)
                if not rows:
                    continue
                n_dlg += 1
                for r in rows:
                    writer.add(r)
                    n_rows += 1
                    secs += float(r["question_duration"] or 0.0)
                    no_snac += r["answer_snac"] is None
            final = writer.close()
            if final:
                files[name] = final
            splits[name] = {"rows": n_rows, "dialogues": n_dlg, "hours": secs / 3600.0,
                            "shards": len(final)}
            seconds += secs
        (out_dir / "README.md").write_text(_card(files, schema), encoding="utf-8")
        rows_out = sum(s["rows"] for s in splits.values())
        reasons = Counter(r["reason"] for r in rejects)
        summary: dict[str, Any] = {
            "rows": rows_out, "dialogues": sum(s["dialogues"] for s in splits.values()),
            "hours": seconds / 3600.0, "answer_snac": has_codes,
            "rows_without_snac": no_snac, "rejected": len(rejects),
            "reasons": dict(sorted(reasons.items())), "splits": splits,
            "audio_format": cfg.audio_format,
        }
        return SinkResult(rows_out=rows_out, seconds_out=seconds,
                          rejects=rejects_table(rejects), summary=summary)

    @classmethod
    def summary_lines(cls, summary: dict[str, Any]) -> list[str]:
        lines = [f"{n}: {s['rows']} rounds of {s['dialogues']} dialogues, "
                 f"{s['hours']:.3f} h of questions, {s['shards']} files"
                 for n, s in summary.get("splits", {}).items()]
        if not summary.get("answer_snac"):
            lines.append("answer_snac is null: add a tokenize stage with a SNAC codec "
                         "before this sink")
        if summary.get("rejected"):
            why = ", ".join(f"{k} {v}" for k, v in summary.get("reasons", {}).items())
            lines.append(f"rejected: {summary['rejected']} turns ({why})")
        return lines

    # -- internals --------------------------------------------------------------------------
    def _schema(self) -> pa.Schema:
        fields = list(FIELDS)
        if self.config.answer_audio:
            fields.insert(fields.index(("answer_snac", pa.string())) + 1,
                          ("answer_audio", AUDIO_TYPE))
        features: dict[str, Any] = {}
        for n, t in fields:
            if t == AUDIO_TYPE:
                a: dict[str, Any] = {"_type": "Audio"}
                if self.config.sample_rate:
                    a = {"sampling_rate": self.config.sample_rate, "_type": "Audio"}
                features[n] = a
            else:
                features[n] = {"dtype": HF_DTYPES[t], "_type": "Value"}
        meta = {"huggingface": json.dumps({"info": {"features": features}})}
        return pa.schema([pa.field(n, t) for n, t in fields], metadata=meta)

    def _clip(self, row: Mapping[str, Any]) -> Clip:
        return encode_clip(row, self.config.audio_format, self.config.sample_rate)

    def _rows(self, d: Dialogue, index: int, has_codes: bool, namer: Any,
              rejects: list[dict[str, Any]]) -> list[dict[str, Any]]:
        cfg = self.config
        sid = self.ctx.stage_id
        if d.rounds % 2:  # a complete dialogue that ends on the user: no answer for it
            last = d.turns[-1]
            rejects.append(reject(last, sid, "no_answer", f"round {last['round']} is the "
                                  f"user's last turn of dialogue {d.dialogue_id}"))
        out: list[dict[str, Any]] = []
        for k, (q, a) in enumerate(d.pairs()):
            qc = self._clip(q)
            if qc.data is None:
                rejects.append(reject(q, sid, qc.reason or "unreadable", qc.detail))
                rejects.append(reject(a, sid, "question_unreadable",
                                      f"question {q['id']}: {qc.reason}"))
                continue
            ac = self._clip(a) if cfg.answer_audio else None
            if ac is not None and ac.data is None:
                rejects.append(reject(a, sid, ac.reason or "unreadable", ac.detail))
                rejects.append(reject(q, sid, "answer_unreadable",
                                      f"answer {a['id']}: {ac.reason}"))
                continue
            snac = None
            if has_codes and a.get("codes"):
                try:
                    snac = snac_text(a["codes"])
                except ValueError as e:
                    rejects.append(reject(a, sid, "layout_error", f"answer_snac: {e}"))
                    rejects.append(reject(q, sid, "answer_rejected",
                                          f"answer {a['id']}: layout_error"))
                    continue
            pq_, pa_ = turn_provenance(q), turn_provenance(a)
            rec: dict[str, Any] = {
                "split_name": _split_name(cfg.split_name, q), "index": index, "round": k,
                "question": q.get("text") or "",
                "question_audio": {"bytes": qc.data,
                                   "path": namer.name(q.get("id"), cfg.audio_format)},
                "answer": a.get("text") or "", "answer_snac": snac,
                "dialogue_id": d.dialogue_id, "question_id": q["id"], "answer_id": a["id"],
                "language": q.get("language") or a.get("language"),
                "question_duration": round(qc.seconds, 6),
                "answer_duration": round(ac.seconds, 6) if ac is not None
                else (float(a["duration"]) if a.get("duration") is not None else None),
                "synthetic": bool(pq_["synthetic"] or pa_["synthetic"]),
                "llm": pq_["llm"] or pa_["llm"],
                "question_voice": pq_["voice_id"], "answer_voice": pa_["voice_id"],
                "question_voice_source": pq_["voice_source"],
                "answer_voice_source": pa_["voice_source"],
                "question_tts": tts_label(pq_), "answer_tts": tts_label(pa_),
                "provenance": json.dumps({"question": pq_, "answer": pa_}, sort_keys=True,
                                         ensure_ascii=False),
            }
            if ac is not None:
                rec["answer_audio"] = {"bytes": ac.data,
                                       "path": namer.name(a.get("id"), cfg.audio_format)}
            out.append(rec)
        return out


def _card(files: dict[str, list[str]], schema: pa.Schema) -> str:
    """A dataset card whose YAML maps each split to its files (``load_dataset(DIR)``)."""
    lines = ["---", "configs:", "- config_name: default", "  data_files:"]
    for split in files:
        lines += [f"  - split: {split}", f"    path: data/{split}-*"]
    if not files:
        lines[-1] = "  data_files: []"
    lines += ["---", "", "# speechmill voice-assistant export (synthetic speech)", "",
              "VoiceAssistant-400K-style rounds: a spoken question (`question_audio`) and "
              "its answer (`answer`, `answer_snac`: Mini-Omni's SNAC text layout). Every "
              "row is synthetic: `synthetic`, `llm`, `*_voice`, `*_voice_source`, `*_tts` "
              "and `provenance` say how it was made.", "",
              "| split | files |", "|---|---|"]
    lines += [f"| {s} | {len(f)} |" for s, f in files.items()]
    lines += ["", "Columns: " + ", ".join(f"`{n}`" for n in schema.names), ""]
    return "\n".join(lines)


class _Shards:
    """One HF split's Parquet files: rows collected into shards of ``shard_size`` rows
    and about ``shard_bytes`` audio bytes, each written as a temp file and renamed to
    ``{split}-{k:05d}-of-{n:05d}.parquet`` at the end."""

    def __init__(self, data_dir: Path, name: str, schema: pa.Schema,
                 cfg: VoiceAssistantConfig) -> None:
        self.data_dir, self.name, self.schema, self.cfg = data_dir, name, schema, cfg
        self.rows: list[dict[str, Any]] = []
        self.bytes = 0
        self.tmp: list[Path] = []

    def add(self, rec: dict[str, Any]) -> None:
        b = len(rec["question_audio"]["bytes"]) + len((rec.get("answer_audio") or
                                                       {}).get("bytes") or b"")
        full = (self.cfg.shard_size is not None and len(self.rows) >= self.cfg.shard_size) \
            or (self.cfg.shard_bytes is not None and self.bytes + b > self.cfg.shard_bytes)
        if self.rows and full:
            self._flush()
        self.rows.append(rec)
        self.bytes += b

    def _flush(self) -> None:
        import pyarrow.parquet as pq

        t = pa.Table.from_pylist(self.rows, schema=self.schema)
        path = self.data_dir / f".{self.name}-{len(self.tmp):05d}.parquet.tmp"
        pq.write_table(t, path, row_group_size=self.cfg.row_group_size, compression="zstd")
        self.tmp.append(path)
        self.rows, self.bytes = [], 0

    def close(self) -> list[str]:
        if self.rows:
            self._flush()
        final = []
        for i, p in enumerate(self.tmp):
            dst = self.data_dir / f"{self.name}-{i:05d}-of-{len(self.tmp):05d}.parquet"
            p.rename(dst)
            final.append(dst.name)
        return final
