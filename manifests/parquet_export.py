"""Sink stage ``parquet``: a Hugging Face style Parquet dataset with the audio inside.

Layout (``datasets.load_dataset("parquet", data_files=...)`` or ``load_dataset(DIR)``)::

    README.md                                   dataset card: one config, a split per file set
    data/{split}-{shard:05d}-of-{n:05d}.parquet

Each row is one utterance: ``id``, ``audio`` (struct ``{bytes, path}``: the clip cut from
``audio_path`` at ``offset`` for ``duration``, encoded as 16-bit mono FLAC or WAV, ``path``
its file name), ``text``, ``speaker``, ``language``, ``duration`` (of the clip),
``sample_rate``, one column per score (``dnsmos_ovrl``, ...; a score named like another
column is ``score_<name>``) and the input columns listed in ``columns``. The schema
metadata carries the ``huggingface`` features JSON, so ``datasets`` types ``audio`` as an
``Audio`` feature and decodes it (datasets >= 4 decodes with torchcodec, which needs the
FFmpeg shared libraries; ``Audio(decode=False)`` gives the bytes for soundfile).

Without a ``split`` column everything is the ``train`` split. Shards hold at most
``shard_size`` rows and about ``shard_bytes`` bytes of audio (estimated from durations).
Rows are ordered by id, so the same input gives byte-identical files.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
from pydantic import Field

from speechmill.manifests.common import (
    FLAC_RATIO,
    data_file_split,
    drop_textless,
    output_rate,
    row_columns,
    shard_bounds,
    split_groups,
    summary_text,
    track,
)
from speechmill.pipeline.clips import encode_clips, namer_for
from speechmill.pipeline.records import reject, rejects_table
from speechmill.pipeline.row_slices import iter_rows
from speechmill.pipeline.stage import Resources, SinkResult, Stage, StageConfig

AUDIO_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
BASE_FIELDS: list[tuple[str, pa.DataType]] = [
    ("id", pa.string()),
    ("audio", AUDIO_TYPE),
    ("text", pa.string()),
    ("speaker", pa.string()),
    ("language", pa.string()),
    ("duration", pa.float64()),
    ("sample_rate", pa.int32()),
]
BASE_NAMES = {n for n, _ in BASE_FIELDS}
#: Arrow scalar types -> ``datasets.Value`` dtype names
HF_DTYPES = {
    pa.string(): "string", pa.large_string(): "large_string", pa.bool_(): "bool",
    pa.float16(): "float16", pa.float32(): "float32", pa.float64(): "float64",
    pa.int8(): "int8", pa.int16(): "int16", pa.int32(): "int32", pa.int64(): "int64",
    pa.uint8(): "uint8", pa.uint16(): "uint16", pa.uint32(): "uint32", pa.uint64(): "uint64",
    pa.binary(): "binary",
}
#: output records held as Python dicts before they become an Arrow table (a shard is
#: collected as Arrow and written at once)
RECORD_BATCH_ROWS = 1024


class ParquetConfig(StageConfig):
    audio_format: Literal["flac", "wav"] = Field("flac", description="encoding of the clips")
    sample_rate: int | None = Field(None, gt=0, description="resample clips (default: keep)")
    shard_size: int | None = Field(None, ge=1, description="rows per file")
    shard_bytes: int | None = Field(500_000_000, ge=1,
                                    description="about this many audio bytes per file")
    row_group_size: int = Field(100, ge=1, description="rows per Parquet row group")
    columns: list[str] = Field(default_factory=list, description="extra input columns to "
                               "carry (e.g. words, source_url, codes, text_ids)")
    require_text: bool = Field(False, description="reject rows without text (no_text) "
                               "instead of exporting text \"\"")
    by_split: bool = Field(True, description="one file set (HF split) per value of `split`")
    workers: int = Field(2, ge=1, description="threads cutting and encoding clips")


class ParquetExport(Stage):
    name = "parquet"
    description = "Hugging Face Parquet dataset with an Audio column (FLAC bytes)"
    Config = ParquetConfig
    resources = Resources(cpus=1)
    is_sink = True
    output_root = "exports"

    config: ParquetConfig

    @classmethod
    def validate_config(cls, config: StageConfig) -> None:
        assert isinstance(config, ParquetConfig)
        bad = sorted(set(config.columns) & (BASE_NAMES | {"scores"}))
        if bad:
            raise ValueError(f"key 'columns': {', '.join(bad)} already exported "
                             f"(always: {', '.join(sorted(BASE_NAMES))}, plus each score)")

    def export(self, inputs: pa.Table, out_dir: Path) -> SinkResult:
        cfg = self.config
        out_dir = Path(out_dir)
        data_dir = out_dir / "data"
        data_dir.mkdir(parents=True, exist_ok=True)
        extras = [c for c in cfg.columns if c in inputs.column_names]
        missing = [c for c in cfg.columns if c not in inputs.column_names]
        schema, score_cols = self._schema(inputs.schema, extras)
        rejects: list[dict[str, Any]] = []
        splits: dict[str, dict[str, Any]] = {}
        files: dict[str, list[str]] = {}
        seconds = 0.0
        # rows become Python dicts a slice at a time; a shard's records become Arrow
        # every RECORD_BATCH_ROWS rows, so no split (nor shard) is ever a list of dicts
        taken: set[str] = set()
        for split, group in split_groups(inputs, cfg.by_split):
            name = data_file_split(split, taken)
            table = row_columns(group, extras)
            keep = drop_textless(table, self.ctx.stage_id, rejects) if cfg.require_text \
                else table
            rate = output_rate(table, cfg.sample_rate)
            bps = rate * 2 * (FLAC_RATIO if cfg.audio_format == "flac" else 1.0)
            namer = namer_for(keep)
            tmp: list[Path] = []
            n_rows, secs = 0, 0.0
            for a, b in shard_bounds(keep, cfg.shard_size, cfg.shard_bytes, bps):
                chunk = keep.slice(a, b - a)
                parts: list[pa.Table] = []
                out_rows: list[dict[str, Any]] = []
                clips = encode_clips(iter_rows(chunk), cfg.audio_format, cfg.sample_rate,
                                     cfg.workers)
                for c in track(clips, chunk.num_rows, f"{self.ctx.stage_id} {name}"):
                    if c.data is None:
                        rejects.append(reject(c.row, self.ctx.stage_id,
                                              c.reason or "unreadable", c.detail))
                        continue
                    out_rows.append(self._record(c.row, c.data, c.frames, c.sample_rate,
                                                 namer.name(c.row.get("id"), cfg.audio_format),
                                                 score_cols, extras))
                    secs += c.seconds
                    if len(out_rows) >= RECORD_BATCH_ROWS:
                        parts.append(pa.Table.from_pylist(out_rows, schema=schema))
                        out_rows = []
                if out_rows:
                    parts.append(pa.Table.from_pylist(out_rows, schema=schema))
                    out_rows = []
                if not parts:
                    continue
                # one chunk, as one from_pylist gave: the writer checks its dictionary
                # page limit per chunk, so chunking would change when it falls back to PLAIN
                shard_table = pa.concat_tables(parts).combine_chunks()
                del parts
                path = data_dir / f".{name}-{len(tmp):05d}.parquet.tmp"
                self._write(shard_table, path)
                tmp.append(path)
                n_rows += shard_table.num_rows
                del shard_table
            final = []
            for i, p in enumerate(tmp):
                dst = data_dir / f"{name}-{i:05d}-of-{len(tmp):05d}.parquet"
                p.rename(dst)
                final.append(dst.name)
            if final:
                files[name] = final
            splits[name] = {"rows": n_rows, "hours": secs / 3600.0, "shards": len(tmp)}
            seconds += secs
        (out_dir / "README.md").write_text(_card(files, schema), encoding="utf-8")
        rows_out = sum(s["rows"] for s in splits.values())
        reasons = Counter(r["reason"] for r in rejects)
        summary: dict[str, Any] = {
            "audio_format": cfg.audio_format, "rows": rows_out, "hours": seconds / 3600.0,
            "rejected": len(rejects), "reasons": dict(sorted(reasons.items())),
            "splits": splits,
        }
        if missing:
            summary["missing_columns"] = missing
        return SinkResult(rows_out=rows_out, seconds_out=seconds,
                          rejects=rejects_table(rejects), summary=summary)

    @classmethod
    def summary_lines(cls, summary: dict[str, Any]) -> list[str]:
        lines = summary_text(summary)
        if summary.get("missing_columns"):
            lines.append("columns not in the input: " + ", ".join(summary["missing_columns"]))
        return lines

    # -- internals ----------------------------------------------------------------------
    def _schema(self, in_schema: pa.Schema, extras: list[str]
                ) -> tuple[pa.Schema, list[tuple[str, str]]]:
        """The output schema (with the ``huggingface`` features metadata) and
        ``[(score name, column name)]``."""
        fields = [pa.field(n, t) for n, t in BASE_FIELDS]
        taken = set(BASE_NAMES) | set(extras)
        score_cols: list[tuple[str, str]] = []
        idx = in_schema.get_field_index("scores")
        if idx >= 0 and pa.types.is_struct(in_schema.field(idx).type):
            for f in in_schema.field(idx).type:
                t = f.type
                if pa.types.is_integer(t) or pa.types.is_floating(t):
                    t = pa.float64()
                col = f"score_{f.name}" if f.name in taken else f.name
                taken.add(col)
                fields.append(pa.field(col, t))
                score_cols.append((f.name, col))
        for c in extras:
            fields.append(pa.field(c, in_schema.field(c).type))
        features: dict[str, Any] = {}
        for f in fields:
            if f.name == "audio":
                audio: dict[str, Any] = {"_type": "Audio"}
                if self.config.sample_rate:
                    audio = {"sampling_rate": self.config.sample_rate, "_type": "Audio"}
                features["audio"] = audio
            elif f.type in HF_DTYPES:
                features[f.name] = {"dtype": HF_DTYPES[f.type], "_type": "Value"}
            # other (nested) columns: datasets infers their features from the Arrow type
        meta = {"huggingface": json.dumps({"info": {"features": features}})}
        return pa.schema(fields, metadata=meta), score_cols

    def _record(self, row: dict[str, Any], data: bytes, frames: int, sr: int, name: str,
                score_cols: list[tuple[str, str]], extras: list[str]) -> dict[str, Any]:
        text = row.get("text")
        rec: dict[str, Any] = {
            "id": row.get("id"),
            "audio": {"bytes": data, "path": name},
            "text": text if isinstance(text, str) else "",
            "speaker": row.get("speaker"),
            "language": row.get("language"),
            "duration": round(frames / sr, 6),
            "sample_rate": sr,
        }
        scores = row.get("scores") or {}
        for key, col in score_cols:
            rec[col] = scores.get(key)
        for c in extras:
            rec[c] = row.get(c)
        return rec

    def _write(self, table: pa.Table, path: Path) -> None:
        import pyarrow.parquet as pq

        pq.write_table(table, path, row_group_size=self.config.row_group_size,
                       compression="zstd")


def _card(files: dict[str, list[str]], schema: pa.Schema) -> str:
    """A dataset card whose YAML maps each split to its files (``load_dataset(DIR)``)."""
    lines = ["---", "configs:", "- config_name: default", "  data_files:"]
    for split in files:
        lines += [f"  - split: {split}", f"    path: data/{split}-*"]
    if not files:
        lines[-1] = "  data_files: []"
    lines += ["---", "", "# speechmill export", "",
              "Utterances with their audio (`audio`: encoded clip bytes) and metadata.", "",
              "| split | files |", "|---|---|"]
    lines += [f"| {s} | {len(f)} |" for s, f in files.items()]
    lines += ["", "Columns: " + ", ".join(f"`{n}`" for n in schema.names), ""]
    return "\n".join(lines)
