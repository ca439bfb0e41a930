"""Source stage ``read_parquet``: rows from existing Parquet files.

Re-export or re-tokenize what an earlier run produced (``RUN_DIR/stages/filter``) or
bring in segments made elsewhere, without redoing the cleaning. Every row needs an
``id``. Relative ``audio_path`` values are kept as they are (relative to the working
directory, as a run writes them) unless ``paths_relative_to: file`` resolves them against
the directory of the Parquet file they came from.

What a file's rows cannot be is a configuration error when planning (``key 'paths'``): a
file that is not Parquet, one without an ``id`` column or whose ``id`` cannot be read
as strings, a core column (``duration``, ``words``...) of a type that cannot be cast to
its canonical type, files that disagree on a column's type. What one row is costs that
row: an ``id`` that is null (``missing_id``), a value that does not convert to its core
column's type or is a string that is not UTF-8 (``malformed``, e.g. a ``duration`` of
``"abc"``), a file that changed or
went away after planning (``unreadable``).
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
from speechmill.pipeline.errors import is_fatal
from speechmill.pipeline.records import (
    CORE_TYPES,
    concat,
    conform,
    key_id,
    reject,
    rejects_table,
)
from speechmill.pipeline.stage import Resources, Stage, StageConfig, StageResult


class ReadParquetConfig(StageConfig):
    paths: list[str] = Field(..., min_length=1, description="Parquet files, directories "
                             "(their part-*.parquet / *.parquet) or globs")
    columns: list[str] | None = Field(None, description="columns to keep (default all)")
    paths_relative_to: Literal["file", "cwd"] = "cwd"


def _schema_problem(f: str, schema: pa.Schema, columns: list[str] | None) -> str | None:
    """Why ``f``'s (kept) columns cannot be read as a stage's rows, or None."""
    for field in schema:
        if columns is not None and field.name not in columns and field.name != "id":
            continue
        want = pa.string() if field.name == "id" else CORE_TYPES.get(field.name)
        if want is None or field.type == want:
            continue
        try:  # a cast kernel exists (values may still fail: those rows are rejected)
            pa.array([], field.type).cast(want)
        except (pa.ArrowException, ValueError, TypeError):
            return (f"key 'paths': {f!r}: column {field.name!r} is {field.type}, which "
                    f"cannot be read as {want}")
    return None


def _file_name(f: str) -> str:
    try:
        f.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"key 'paths': the file name {f!r} is not UTF-8; rename it"
                         ) from None
    return os.path.abspath(f)


def _files(spec: str) -> list[str]:
    if os.path.isdir(spec):
        parts = sorted(glob.glob(os.path.join(spec, "part-*.parquet")))
        return parts or sorted(glob.glob(os.path.join(spec, "*.parquet")))
    return sorted(glob.glob(spec)) if any(c in spec for c in "*?[") else [spec]


def _check_merge(schemas: list[tuple[str, pa.Schema]]) -> None:
    """Files whose kept columns cannot be stacked (``tag`` int64 in one, string in
    another) are a configuration error, found before any row is read. (Core columns
    are cast to their canonical types, so only the others can disagree.)"""
    first: dict[str, tuple[str, pa.DataType]] = {}
    for f, sch in schemas:
        for x in sch:
            if x.name == "id" or x.name in CORE_TYPES:
                continue
            seen = first.setdefault(x.name, (f, x.type))
            if seen[1] == x.type:
                continue
            try:
                merged = pa.unify_schemas([pa.schema([pa.field(x.name, seen[1])]),
                                           pa.schema([x])], promote_options="permissive")
            except (pa.ArrowException, ValueError, TypeError):
                raise ValueError(
                    f"key 'paths': column {x.name!r} is {seen[1]} in {seen[0]!r} but "
                    f"{x.type} in {f!r}; keep other columns ('columns') or convert one"
                    ) from None
            first[x.name] = (seen[0], merged.field(x.name).type)


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

        from speechmill.pipeline.store.parts import as_string

        tables = []
        schemas: list[tuple[str, pa.Schema]] = []
        cols = self.config.columns
        for spec in self.config.paths:
            files = _files(os.path.expanduser(spec))
            if not files:
                raise ValueError(f"key 'paths': {spec!r} matches no Parquet file")
            for f in files:
                name = _file_name(f)
                try:
                    schema = pq.read_schema(f)
                except Exception as e:  # Arrow's and the filesystem's errors are many
                    if is_fatal(e):
                        raise
                    raise ValueError(f"key 'paths': {f!r} cannot be read as Parquet: "
                                     f"{type(e).__name__}: {str(e)[:500]}") from None
                if "id" not in schema.names:
                    raise ValueError(f"key 'paths': {f!r} has no 'id' column")
                problem = _schema_problem(f, schema, cols)
                if problem:
                    raise ValueError(problem)
                schemas.append((f, pa.schema([x for x in schema if cols is None
                                              or x.name in cols or x.name == "id"])))
                try:
                    ids = as_string(pq.read_table(f, columns=["id"]).column("id"))
                    ids.validate(full=True)  # (bytes that are not UTF-8)
                except Exception as e:
                    if is_fatal(e):
                        raise
                    raise ValueError(f"key 'paths': {f!r}: its 'id' column cannot be read "
                                     f"as strings: {type(e).__name__}: {str(e)[:500]}"
                                     ) from None
                n = len(ids)
                if ids.null_count:  # planned under a stand-in id; a missing_id reject
                    import pyarrow.compute as pc

                    stand_in = pa.array([key_id("read_parquet", "no id", name, str(i))
                                         for i in range(n)], pa.string())
                    ids = pc.if_else(pc.is_null(ids), stand_in, ids)
                tables.append(pa.table({
                    "id": ids,
                    "_file": pa.DictionaryArray.from_arrays(
                        pa.array(np.zeros(n, np.int32)), pa.array([name])),
                    "_row": pa.array(np.arange(n, dtype=np.int64)),
                }))
        _check_merge(schemas)
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
                t = self._rows(files[a], rows[a:b])
            except Exception as e:  # the file changed or went away after planning
                if is_fatal(e):
                    raise
                for r in batch.slice(a, b - a).select(["id"]).to_pylist():
                    rejects.append(reject(r, self.ctx.stage_id, "unreadable",
                                          f"{files[a]}: {type(e).__name__}: {e}"))
            else:
                t = self._checked(t, batch.slice(a, b - a), files[a], rows[a:b], rejects)
                if t.num_rows:
                    out.append(t)
            a = b
        try:
            outputs = concat(out) if out else self.outputs_table([])
        except pa.ArrowException:  # (a file changed after planning) keep what merges
            keep: list[pa.Table] = []
            for t in out:
                try:
                    concat([*keep, t])
                    keep.append(t)
                except pa.ArrowException as e:
                    for rid in t.column("id").to_pylist():
                        rejects.append(reject({"id": rid}, self.ctx.stage_id, "unreadable",
                                              f"its columns no longer match: {e}"))
            outputs = concat(keep) if keep else self.outputs_table([])
        if outputs.num_rows:
            outputs = outputs.append_column("parent_id", outputs.column("id")) \
                if "parent_id" not in outputs.column_names else outputs.set_column(
                    outputs.schema.get_field_index("parent_id"), "parent_id",
                    outputs.column("id"))
        return StageResult(outputs, rejects_table(rejects))

    def _checked(self, t: pa.Table, planned: pa.Table, f: str, rows: np.ndarray,
                 rejects: list[dict[str, Any]]) -> pa.Table:
        """``t`` with core columns cast to their types, less rows whose ``id`` is null
        (``missing_id``) or with a value that does not cast, a string that is not UTF-8
        or a time (``offset``, ``duration``) that is not a finite number >= 0
        (``malformed``): those are rejected under their planned id."""
        sid = self.ctx.stage_id
        pids = planned.column("id").to_pylist()

        def bad(k: int, reason: str, why: str) -> None:
            rejects.append(reject({"id": pids[k]}, sid, reason, f"{f} row {rows[k]}: {why}"))

        ok = np.ones(t.num_rows, bool)
        if t.column("id").null_count:
            nulls = np.asarray(t.column("id").is_null().to_numpy(zero_copy_only=False), bool)
            for k in np.flatnonzero(nulls):
                bad(int(k), "missing_id", "'id' is null")
            ok &= ~nulls
        try:
            c = conform(t)
            c.validate(full=True)  # (strings that are not UTF-8)
            at = np.flatnonzero(ok)
            c = c.filter(pa.array(ok))
        except (pa.ArrowException, ValueError, TypeError):
            at, parts = [], []  # one value does not cast or is not UTF-8: find its rows
            for k in np.flatnonzero(ok):
                try:
                    one = conform(t.slice(int(k), 1))
                    one.validate(full=True)
                except (pa.ArrowException, ValueError, TypeError) as e:
                    bad(int(k), "malformed", f"{type(e).__name__}: {e}")
                    continue
                parts.append(one)
                at.append(int(k))
            if not parts:
                return t.slice(0, 0)
            c = concat(parts)
        keep = np.ones(c.num_rows, bool)
        for name in ("offset", "duration"):
            if name not in c.column_names:
                continue
            v = np.asarray(c.column(name).to_numpy(zero_copy_only=False), np.float64)
            with np.errstate(invalid="ignore"):
                wrong = ~np.isnan(v) & ~(np.isfinite(v) & (v >= 0))
            wrong |= np.isnan(v) & ~np.asarray(
                c.column(name).is_null().to_numpy(zero_copy_only=False), bool)
            for j in np.flatnonzero(wrong & keep):
                bad(int(at[j]), "malformed", f"{name} is {v[j]}")
            keep &= ~wrong
        if not keep.all():
            c = c.filter(pa.array(keep))
        return self._relative(c, f)

    def _relative(self, t: pa.Table, f: str) -> pa.Table:
        if self.config.paths_relative_to == "file" and "audio_path" in t.column_names:
            root = os.path.dirname(f)
            col = [p if p is None or is_url(p) or os.path.isabs(p) else os.path.join(root, p)
                   for p in t.column("audio_path").to_pylist()]
            i = t.schema.get_field_index("audio_path")
            t = t.set_column(i, "audio_path", pa.array(col, pa.string()))
        return t

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
