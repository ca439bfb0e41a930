"""Stage ``shards``: tokenized training shards (Parquet) plus an index.

A sink over ``tokenize``'s output. One row per utterance: ``id``, ``split``, ``speaker``,
``language``, ``duration``, ``text``, ``text_ids`` (int32), ``codes`` (one list per
codebook, int16 when every codebook fits, else int32), ``n_frames``, the dialogue
structure of synthesized turns when the input has it (``dialogue_id``, ``round``,
``n_rounds``, ``role``, ``voice_id``, ``synthetic``, ``synth``), and the layout's own
column:

- ``plain``: nothing more; codes as the codec gave them.
- ``speechgpt``: ``units``, SpeechGPT's unit string ``<sosp><u1><u2>...<eosp>`` over the
  first codebook (k-means/HuBERT units; set ``dedup: true`` on the tokenizer for
  SpeechGPT-style deduplicated units).
- ``mini-omni``: ``codes_7``, SNAC's 3 codebooks flattened into Mini-Omni's 7 streams
  with per-stream delay and vocabulary offsets (constants in the shard metadata).

Files: ``[<split>/]shard-NNNNN.parquet`` (shards by ``shard_size`` rows and/or
``shard_bytes`` of token data), the codec / text tokenizer / layout identity in each
file's schema metadata (key ``speechmill``), and ``index.json`` with per-shard rows,
hours, audio and text tokens and sha256, plus totals.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
from pydantic import Field

from speechmill.pipeline.errors import ConfigError
from speechmill.pipeline.records import reject
from speechmill.pipeline.stage import SinkResult, Stage, StageConfig

KEEP = ("id", "split", "speaker", "language", "duration", "text", "source_url")
#: dialogue structure and provenance of synthesized turns, carried when the input has them
DIALOGUE_KEEP = ("dialogue_id", "round", "n_rounds", "role", "voice_id", "synthetic",
                 "synth")


class ShardsConfig(StageConfig):
    layout: Literal["plain", "speechgpt", "mini-omni"] = "plain"
    shard_size: int = Field(1000, ge=1, description="utterances per shard")
    shard_bytes: int | None = Field(None, ge=1024, description="token bytes per shard "
                                    "(whichever limit comes first)")
    by_split: bool = Field(True, description="one directory per split when rows have one")
    require_text: bool = Field(False, description="reject rows without text ids")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class Shards(Stage):
    name = "shards"
    description = "tokenized Parquet shards (codes + text ids) with an index"
    Config = ShardsConfig
    is_sink = True
    output_root = "shards"

    config: ShardsConfig

    def _layout_column(self, codes: list[list[int]]) -> Any:
        from speechmill.manifests.tokenizers import layouts

        if self.config.layout == "speechgpt":
            return layouts.speechgpt_units(codes[0])
        if self.config.layout == "mini-omni":
            import numpy as np

            return layouts.mini_omni_flatten([np.asarray(c) for c in codes]).tolist()
        return None

    def _identity(self, inputs: pa.Table, column: str) -> dict[str, Any] | None:
        """The one tokenizer identity (JSON column) of the input; mixing is an error."""
        import pyarrow.compute as pc

        if column not in inputs.column_names or inputs.num_rows == 0:
            return None
        vals = [v for v in pc.unique(inputs.column(column)).to_pylist() if v]
        if len(vals) > 1:
            names = sorted({json.loads(v).get("name", "?") for v in vals})
            raise ConfigError(f"the input mixes {len(vals)} different {column}s ({names}); "
                              "shard each tokenizer's output separately",
                              stage=self.ctx.stage_id, key="needs")
        return json.loads(vals[0]) if vals else None

    def _check_layout(self, has_codes: bool, codec: dict[str, Any] | None) -> None:
        layout = self.config.layout
        if layout == "plain":
            return
        if not has_codes:
            raise ConfigError(f"layout {layout!r} needs audio codes: the input has no "
                              "`codes` column (add a tokenize stage with `audio`)",
                              stage=self.ctx.stage_id, key="layout")
        want = {"speechgpt": 1, "mini-omni": 3}[layout]
        got = len((codec or {}).get("codebook_sizes") or [])
        if codec is not None and got != want:
            what = "one codebook of units" if want == 1 else "SNAC's 3 codebooks"
            raise ConfigError(f"layout {layout!r} needs {what}; the codec "
                              f"{codec.get('name')!r} has {got}",
                              stage=self.ctx.stage_id, key="layout")

    def export(self, inputs: pa.Table, out_dir: Path) -> SinkResult:
        import pyarrow.parquet as pq

        from speechmill.manifests.common import split_groups
        from speechmill.manifests.tokenizers import layouts
        from speechmill.pipeline.records import rejects_table

        has_codes = "codes" in inputs.column_names
        has_text = "text_ids" in inputs.column_names
        self._extra = [inputs.schema.field(c) for c in DIALOGUE_KEEP
                       if c in inputs.column_names]
        codec = self._identity(inputs, "audio_tokenizer") if has_codes else None
        text_tok = self._identity(inputs, "text_tokenizer") if has_text else None
        if inputs.num_rows:
            self._check_layout(has_codes, codec)
        small = codec is not None and max(codec.get("codebook_sizes") or [0]) <= 32768
        code_type = pa.list_(pa.list_(pa.int16() if small else pa.int32()))
        layout_meta: dict[str, Any] = {"name": self.config.layout}
        if self.config.layout == "mini-omni":
            layout_meta["params"] = layouts.MINI_OMNI
        meta = {"codec": codec, "text_tokenizer": text_tok, "layout": layout_meta,
                "format": "speechmill-shards/1"}
        schema_meta = {b"speechmill": json.dumps(meta, sort_keys=True).encode()}

        rejects: list[dict[str, Any]] = []
        index: list[dict[str, Any]] = []

        def flush(chunk: list[dict[str, Any]], split: str | None) -> None:
            i = sum(1 for s in index if s["split"] == split)
            rel = (f"{split}/" if split else "") + f"shard-{i:05d}.parquet"
            path = out_dir / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            t = self._table(chunk, code_type).replace_schema_metadata(schema_meta)
            pq.write_table(t, path, compression="zstd")
            secs = sum(float(r["duration"] or 0.0) for r in chunk)
            index.append({
                "file": rel, "split": split, "rows": len(chunk),
                "hours": round(secs / 3600, 6), "seconds": secs,
                "audio_tokens": sum(sum(len(c) for c in r["codes"] or []) for r in chunk),
                "text_tokens": sum(len(r["text_ids"] or []) for r in chunk),
                "sha256": _sha256(path)})

        step = 4096  # rows turned into Python objects at a time: memory stays bounded
        for split, table in split_groups(inputs, self.config.by_split):
            cur: list[dict[str, Any]] = []
            size = 0
            for a in range(0, table.num_rows, step):
                for r in table.slice(a, step).to_pylist():
                    out = self._row(r, split, has_codes, has_text, rejects)
                    if out is None:
                        continue
                    b = 2 * sum(len(c) for c in out["codes"] or []) \
                        + 4 * len(out["text_ids"] or [])
                    full = len(cur) >= self.config.shard_size or (
                        self.config.shard_bytes is not None
                        and size + b > self.config.shard_bytes)
                    if cur and full:
                        flush(cur, split)
                        cur, size = [], 0
                    cur.append(out)
                    size += b
            if cur:
                flush(cur, split)
        n_out = sum(s["rows"] for s in index)
        sec_out = sum(s.pop("seconds") for s in index)
        totals: dict[str, Any] = {
            "rows": n_out, "hours": round(sec_out / 3600, 6), "shards": len(index),
            "audio_tokens": sum(s["audio_tokens"] for s in index),
            "text_tokens": sum(s["text_tokens"] for s in index),
        }
        by_split: dict[str, dict[str, Any]] = {}
        for s in index:
            d = by_split.setdefault(s["split"] or "all", {"rows": 0, "hours": 0.0, "shards": 0})
            d["rows"] += s["rows"]
            d["hours"] = round(d["hours"] + s["hours"], 6)
            d["shards"] += 1
        doc = {**meta, "totals": totals, "splits": by_split, "shards": index}
        (out_dir / "index.json").write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
        return SinkResult(rows_out=n_out, seconds_out=sec_out,
                          rejects=rejects_table(rejects),
                          summary={**totals, "splits": by_split})

    def _row(self, r: dict[str, Any], split: str | None, has_codes: bool, has_text: bool,
             rejects: list[dict[str, Any]]) -> dict[str, Any] | None:
        if has_codes and not r.get("codes"):
            rejects.append(reject(r, self.ctx.stage_id, "no_codes",
                                  "the tokenize stage gave no codes"))
            return None
        if self.config.require_text and not r.get("text_ids"):
            rejects.append(reject(r, self.ctx.stage_id, "no_text",
                                  "require_text is set and the row has no text ids"))
            return None
        out = {k: r.get(k) for k in KEEP}
        for f in getattr(self, "_extra", []):
            out[f.name] = r.get(f.name)
        out["split"] = split if split is not None else r.get("split")
        out["text_ids"] = r.get("text_ids") if has_text else None
        out["codes"] = r.get("codes") if has_codes else None
        out["n_frames"] = len(r["codes"][0]) if has_codes else None
        if has_codes and self.config.layout != "plain":
            try:
                extra = self._layout_column(r["codes"])
            except ValueError as e:
                rejects.append(reject(r, self.ctx.stage_id, "layout_error", str(e)))
                return None
            out["units" if self.config.layout == "speechgpt" else "codes_7"] = extra
        return out

    def _table(self, rows: list[dict[str, Any]], code_type: pa.DataType) -> pa.Table:
        fields = [pa.field("id", pa.string()), pa.field("split", pa.string()),
                  pa.field("speaker", pa.string()), pa.field("language", pa.string()),
                  pa.field("duration", pa.float64()), pa.field("text", pa.string()),
                  pa.field("source_url", pa.string()),
                  pa.field("text_ids", pa.list_(pa.int32())), pa.field("codes", code_type),
                  pa.field("n_frames", pa.int32())]
        fields += [pa.field(f.name, f.type.value_type if pa.types.is_dictionary(f.type)
                            else f.type) for f in getattr(self, "_extra", [])]
        if self.config.layout == "speechgpt":
            fields.append(pa.field("units", pa.string()))
        elif self.config.layout == "mini-omni":
            fields.append(pa.field("codes_7", pa.list_(pa.list_(pa.int32()))))
        schema = pa.schema(fields)
        return pa.Table.from_pylist([{f.name: r.get(f.name) for f in fields} for r in rows],
                                    schema=schema)

    @classmethod
    def summary_lines(cls, summary: dict[str, Any]) -> list[str]:
        if not summary:
            return []
        return [f"{summary['rows']} utterances in {summary['shards']} shards, "
                f"{summary['audio_tokens']} audio + {summary['text_tokens']} text tokens"]
