"""Source stage ``read_parquet``: rows from existing Parquet files.

Re-export or re-tokenize what an earlier run produced (``RUN_DIR/stages/filter``) or
bring in segments made elsewhere, without redoing the cleaning. Every row needs an
``id``. Relative ``audio_path`` values are kept as they are (relative to the working
directory, as a run writes them) unless ``paths_relative_to: file`` resolves them against
the directory of the Parquet file they came from.
"""

from __future__ import annotations

import glob
import os
from typing import Any, Literal

import pyarrow as pa
from pydantic import Field

from speechmill.pipeline.audio import is_url
from speechmill.pipeline.records import concat, conform
from speechmill.pipeline.stage import Resources, Stage, StageConfig


class ReadParquetConfig(StageConfig):
    paths: list[str] = Field(..., min_length=1, description="Parquet files, directories "
                             "(their part-*.parquet / *.parquet) or globs")
    columns: list[str] | None = Field(None, description="columns to keep (default all)")
    paths_relative_to: Literal["file", "cwd"] = "cwd"


def _files(spec: str) -> list[str]:
    if os.path.isdir(spec):
        parts = sorted(glob.glob(os.path.join(spec, "part-*.parquet")))
        return parts or sorted(glob.glob(os.path.join(spec, "*.parquet")))
    return sorted(glob.glob(spec)) if any(c in spec for c in "*?[") else [spec]


class ReadParquet(Stage):
    name = "read_parquet"
    description = "source: rows from Parquet files (e.g. an earlier run's stage outputs)"
    Config = ReadParquetConfig
    resources = Resources(cpus=1)
    is_source = True
    default_batch_size = 4096

    config: ReadParquetConfig

    def plan(self) -> pa.Table:
        import pyarrow.parquet as pq

        tables = []
        for spec in self.config.paths:
            files = _files(os.path.expanduser(spec))
            if not files:
                raise ValueError(f"key 'paths': {spec!r} matches no Parquet file")
            for f in files:
                t = pq.read_table(f, columns=self.config.columns)
                if "id" not in t.column_names:
                    raise ValueError(f"key 'paths': {f!r} has no 'id' column")
                if self.config.paths_relative_to == "file" and "audio_path" in t.column_names:
                    base = os.path.dirname(os.path.abspath(f))
                    col = [p if p is None or is_url(p) or os.path.isabs(p)
                           else os.path.join(base, p)
                           for p in t.column("audio_path").to_pylist()]
                    i = t.schema.get_field_index("audio_path")
                    t = t.set_column(i, "audio_path", pa.array(col, pa.string()))
                tables.append(conform(t))
        return concat(tables)

    def process_row(self, row: dict[str, Any]) -> dict[str, Any]:
        return {**row, "parent_id": row.get("id")}
