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
from collections import OrderedDict
from typing import Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field

from speechmill.pipeline.audio import is_url
from speechmill.pipeline.records import concat, conform, reject, rejects_table
from speechmill.pipeline.stage import Resources, Stage, StageConfig, StageResult


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

    #: row groups an actor keeps read (batches usually walk a row group in order)
    cache_row_groups: ClassVar[int] = 4

    def plan(self) -> pa.Table:
        """One small row per input row: its ``id``, file and row number (the rows
        themselves are read by the workers, a batch at a time)."""
        import pyarrow.parquet as pq

        from speechmill.pipeline.store import as_string

        tables = []
        for spec in self.config.paths:
            files = _files(os.path.expanduser(spec))
            if not files:
                raise ValueError(f"key 'paths': {spec!r} matches no Parquet file")
            for f in files:
                if "id" not in pq.read_schema(f).names:
                    raise ValueError(f"key 'paths': {f!r} has no 'id' column")
                ids = as_string(pq.read_table(f, columns=["id"]).column("id"))
                n = len(ids)
                name = os.path.abspath(f)
                tables.append(pa.table({
                    "id": ids,
                    "_file": pa.DictionaryArray.from_arrays(
                        pa.array(np.zeros(n, np.int32)), pa.array([name])),
                    "_row": pa.array(np.arange(n, dtype=np.int64)),
                }))
        return concat(tables)

    def setup(self) -> None:
        self._cache: OrderedDict[tuple[str, int], pa.Table] = OrderedDict()

    def process(self, batch: pa.Table) -> StageResult:
        files = batch.column("_file").to_pylist()
        rows = np.asarray(batch.column("_row").to_numpy(zero_copy_only=False), np.int64)
        out: list[pa.Table] = []
        rejects: list[dict[str, Any]] = []
        a = 0
        while a < len(files):  # runs of rows from one file, in batch order
            b = a
            while b < len(files) and files[b] == files[a]:
                b += 1
            try:
                out.append(self._rows(files[a], rows[a:b]))
            except (OSError, ValueError, pa.ArrowException) as e:
                for r in batch.slice(a, b - a).select(["id"]).to_pylist():
                    rejects.append(reject(r, self.ctx.stage_id, "unreadable",
                                          f"{files[a]}: {type(e).__name__}: {e}"))
            a = b
        outputs = conform(concat(out)) if out else self.outputs_table([])
        if outputs.num_rows:
            outputs = outputs.append_column("parent_id", outputs.column("id")) \
                if "parent_id" not in outputs.column_names else outputs.set_column(
                    outputs.schema.get_field_index("parent_id"), "parent_id",
                    outputs.column("id"))
        return StageResult(outputs, rejects_table(rejects))

    def _rows(self, f: str, rows: np.ndarray) -> pa.Table:
        """Rows ``rows`` (in that order) of Parquet file ``f``, read by row group."""
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(f)
        sizes = [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)]
        starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        if len(rows) and (rows.min() < 0 or rows.max() >= starts[-1]):
            raise ValueError(f"has {starts[-1]} rows now; the plan has row {rows.max()}")
        groups = np.searchsorted(starts, rows, side="right") - 1
        need = sorted(set(groups.tolist()))
        cols = None
        if self.config.columns is not None:
            cols = list(dict.fromkeys(["id", *self.config.columns]))
        parts = [self._group(pf, f, g, cols) for g in need]
        t = pa.concat_tables(parts) if len(parts) > 1 else parts[0]
        base = {g: k for g, k in zip(need, np.cumsum([0] + [len(p) for p in parts]),
                                     strict=False)}
        local = np.array([base[g] + r - starts[g] for g, r in zip(groups, rows, strict=True)],
                         dtype=np.int64)
        t = t.take(pa.array(local))
        if self.config.paths_relative_to == "file" and "audio_path" in t.column_names:
            root = os.path.dirname(f)
            col = [p if p is None or is_url(p) or os.path.isabs(p) else os.path.join(root, p)
                   for p in t.column("audio_path").to_pylist()]
            i = t.schema.get_field_index("audio_path")
            t = t.set_column(i, "audio_path", pa.array(col, pa.string()))
        return t.replace_schema_metadata(None)

    def _group(self, pf: Any, f: str, g: int, cols: list[str] | None) -> pa.Table:
        key = (f, g)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        t = pf.read_row_group(g, columns=cols)
        self._cache[key] = t
        while len(self._cache) > self.cache_row_groups:
            self._cache.popitem(last=False)
        return t
