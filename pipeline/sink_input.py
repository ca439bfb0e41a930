"""A sink's input: every upstream row once, in the order exports write them, in bounded
memory.

Exports are deterministic because they write rows ordered by (split, id) (or by id), one
row per id. Small inputs (at most ``max_rows`` rows) are read and sorted in memory. Larger
ones get an external sort that never holds more than about ``max_rows`` rows on the heap:

1. ids are sampled (only the ``id`` and ``split`` columns are read) to place the
   boundaries of id ranges of about ``max_rows`` rows each;
2. each upstream part is read once and its rows appended to its range's bucket file;
3. bucket by bucket (in id order) rows are deduplicated, sorted and appended to one
   Arrow IPC file per split.

Those files are memory-mapped and returned as one table: its buffers live in the page
cache (evictable, backed by the run directory's disk), not in the process heap, and
slicing or reading a column of it copies nothing. All copies of an id fall in one bucket,
so deduplication (first copy in upstream order wins) is exactly the in-memory one.

The table carries schema metadata: :data:`ORDER_KEY` (``split,id`` or ``id``) tells
:func:`speechmill.manifests.common.split_groups` that it need not sort again, and
:data:`SPILL_KEY` names the directory where :func:`filter_rows` may spill a filtered copy.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

SPLIT_ORDER = ("train", "dev", "test")
ORDER_KEY = b"speechmill.order"
SPILL_KEY = b"speechmill.spill"
#: most rows per record batch in the spilled files (and fewer when rows are large:
#: about BATCH_BYTES per batch)
BATCH_ROWS = 65536
BATCH_BYTES = 8 << 20
#: ids sampled to place the bucket boundaries
SAMPLE_ROWS = 200_000
#: bucket files open at once (more id ranges: the parts are read once per MAX_OPEN)
MAX_OPEN = 128


def split_order(names: Iterable[Any]) -> list[str]:
    """Split names in export order: train, dev, test, then the others by name."""
    have = {n for n in names if n is not None}
    return [s for s in SPLIT_ORDER if s in have] + sorted(have - set(SPLIT_ORDER))


def order_for(by_split: bool, column_names: Iterable[str]) -> str:
    """The row order an export wants: ``split,id`` when it writes per split and rows have
    a ``split`` column, else ``id``."""
    return "split,id" if by_split and "split" in set(column_names) else "id"


def plain_split(col: Any) -> Any:
    if pa.types.is_dictionary(col.type):
        return col.cast(col.type.value_type)
    return col


def split_rank(col: Any, order: list[str]) -> Any:
    """Each row's position in ``order``; rows without a split get ``len(order)``."""
    col = plain_split(col)
    if not order or pa.types.is_null(col.type):
        return pa.array(np.full(len(col), len(order), dtype=np.int32))
    return pc.fill_null(pc.index_in(col, value_set=pa.array(order, type=col.type)),
                        len(order))


def sort_rows(table: pa.Table, order: str, names: list[str]) -> pa.Table:
    """``table`` sorted (stably) by id, or by (rank of split in ``names``, id)."""
    if table.num_rows == 0:
        return table
    if order == "id":
        keys = table.select(["id"])
        idx = pc.sort_indices(keys, sort_keys=[("id", "ascending")])
    else:
        keys = pa.table({"rank": split_rank(table.column("split"), names),
                         "id": table.column("id")})
        idx = pc.sort_indices(keys, sort_keys=[("rank", "ascending"), ("id", "ascending")])
    return table.take(idx)


def unique_by_id(t: pa.Table) -> pa.Table:
    """One row per id: the first in table order."""
    from speechmill.pipeline.records import first_copies

    if t.num_rows == 0:
        return t
    keep = first_copies(t.column("id"))
    return t if keep.all() else t.filter(pa.array(keep))


def tag(table: pa.Table, order: str, spill: Path | None = None) -> pa.Table:
    meta = dict(table.schema.metadata or {})
    meta[ORDER_KEY] = order.encode()
    if spill is not None:
        meta[SPILL_KEY] = str(spill).encode()
    return table.replace_schema_metadata(meta)


def read_sink_input(parts: list[Path], *, by_split: bool, max_rows: int,
                    spill: Path) -> pa.Table:
    """Every row of the Parquet ``parts`` once (first copy of an id in part order),
    ordered for an export (see :func:`order_for`); external sort through ``spill`` when
    there are more than ``max_rows`` rows."""
    import pyarrow.parquet as pq

    from speechmill.pipeline.records import concat

    parts, fs = _on_filesystem(parts)
    n = sum(pq.ParquetFile(p, filesystem=fs).metadata.num_rows for p in parts)
    if n <= max(1, max_rows):
        t = unique_by_id(concat([pq.read_table(p, filesystem=fs) for p in parts]))
        if t.num_rows == 0:
            return t
        order = order_for(by_split, t.column_names)
        names = split_order(pc.unique(plain_split(t.column("split"))).to_pylist()) \
            if order == "split,id" else []
        return tag(sort_rows(t, order, names), order)
    return _external(parts, n, by_split, max_rows, spill, fs)


def _on_filesystem(parts: list[Any]) -> tuple[list[Any], Any]:
    """Parts named by URL (a run directory on object storage: ``s3://...``) as paths in
    their fsspec filesystem, which pyarrow then reads with ranged reads (footer, the
    columns asked for), never a whole copy; local parts as they are (filesystem None)."""
    from speechmill.pipeline.store.layout import is_url

    urls = [str(p) for p in parts if isinstance(p, str) and is_url(p)]
    if not urls:
        return parts, None
    if len(urls) != len(parts):
        raise ValueError("a sink's input parts are all local or all URLs")
    import fsspec

    fs, _, paths = fsspec.get_fs_token_paths(urls)
    return list(paths), fs


def _align(t: pa.Table, schema: pa.Schema) -> pa.Table:
    cols = []
    for f in schema:
        if f.name in t.column_names:
            c = t.column(f.name)
            cols.append(c if c.type == f.type else c.cast(f.type))
        else:
            cols.append(pa.nulls(t.num_rows, f.type))
    return pa.Table.from_arrays(cols, schema=schema)


def _external(parts: list[Path], n: int, by_split: bool, max_rows: int,
              spill: Path, fs: Any = None) -> pa.Table:
    import pyarrow.parquet as pq

    spill.mkdir(parents=True, exist_ok=True)
    schema = pa.unify_schemas([pq.read_schema(p, filesystem=fs) for p in parts],
                              promote_options="permissive").remove_metadata()
    if "id" not in schema.names:
        raise ValueError("the input has no 'id' column")
    order = order_for(by_split, schema.names)

    # 1. split names and a positional sample of ids -> id ranges of ~max_rows rows
    stride = max(1, n // SAMPLE_ROWS)
    names: set[Any] = set()
    sample: list[str] = []
    for p in parts:
        have = set(pq.read_schema(p, filesystem=fs).names)
        cols = [c for c in ("id", "split") if c in have
                and (c == "id" or order == "split,id")]
        if not cols:
            continue
        t = pq.read_table(p, columns=cols, filesystem=fs)
        if "split" in t.column_names:
            names.update(pc.unique(plain_split(t.column("split"))).to_pylist())
        if "id" in t.column_names and t.num_rows:
            ids = t.column("id")
            pick = pa.array(np.arange(0, len(ids), stride, dtype=np.int64))
            sample.extend(x for x in ids.take(pick).to_pylist() if x is not None)
    split_names = split_order(names)
    sample.sort()
    n_buckets = max(1, math.ceil(n / max_rows))
    per = len(sample) / n_buckets
    bounds = sorted({sample[int(k * per)] for k in range(1, n_buckets)
                     if int(k * per) < len(sample)})
    edges = np.array(bounds, dtype=object)
    last = len(edges)  # null ids go to the last range (Arrow sorts nulls last)

    # 2 + 3, for at most MAX_OPEN ranges at a time (open files stay few): each part's
    # rows go to their range's bucket file in upstream order; then bucket by bucket,
    # rows are deduplicated, sorted and appended to the file of their split
    n_files = len(split_names) + 1 if order == "split,id" else 1
    tag_ = uuid.uuid4().hex[:8]  # fresh names: never truncate a file someone maps
    paths = [spill / f"sorted-{tag_}-{k:03d}.arrow" for k in range(n_files)]
    outs: dict[int, Any] = {}
    try:
        for lo in range(0, last + 1, MAX_OPEN):
            hi = min(last + 1, lo + MAX_OPEN)
            written = _fill_buckets(parts, schema, edges, lo, hi, spill, fs)
            for b in written:
                path = spill / f"bucket-{b:05d}.arrow"
                with pa.memory_map(str(path)) as src:
                    t = pa.ipc.open_stream(src).read_all()
                path.unlink()
                t = sort_rows(unique_by_id(t), order, split_names)
                if order == "id":
                    ranks = np.zeros(t.num_rows, dtype=np.int64)
                else:
                    ranks = np.asarray(split_rank(t.column("split"), split_names)
                                       .to_numpy(zero_copy_only=False), dtype=np.int64)
                counts = np.bincount(ranks, minlength=n_files)
                a = 0
                for k, c in enumerate(counts):
                    if not c:
                        continue
                    if k not in outs:  # streams: dictionaries may differ between batches
                        outs[k] = pa.ipc.new_stream(str(paths[k]), schema)
                    outs[k].write_table(t.slice(a, int(c)), max_chunksize=batch_rows(t))
                    a += int(c)
                del t
    finally:
        for w in outs.values():
            w.close()
    tables = [open_mapped(paths[k]) for k in sorted(outs)]
    return tag(pa.concat_tables(tables) if tables else schema.empty_table(), order, spill)


def _fill_buckets(parts: list[Path], schema: pa.Schema, edges: np.ndarray, lo: int,
                  hi: int, spill: Path, fs: Any = None) -> list[int]:
    """Rows of every part whose id range is in ``[lo, hi)`` appended to
    ``bucket-<range>.arrow``, in part order; the ranges written, in order."""
    import pyarrow.parquet as pq

    writers: dict[int, Any] = {}
    try:
        for p in parts:
            t = _align(pq.read_table(p, filesystem=fs), schema)
            if t.num_rows == 0:
                continue
            col = t.column("id")
            ids = np.array(col.to_pylist(), dtype=object)
            null = np.asarray(col.is_null().to_numpy(zero_copy_only=False), dtype=bool)
            ids[null] = ""
            bucket = np.searchsorted(edges, ids, side="right") if len(edges) \
                else np.zeros(len(ids), dtype=np.int64)
            bucket[null] = len(edges)
            mine = (bucket >= lo) & (bucket < hi)
            if not mine.any():
                continue
            sel = np.flatnonzero(mine)
            sel = sel[np.argsort(bucket[sel], kind="stable")]
            t = t.take(pa.array(sel))
            counts = np.bincount(bucket[sel] - lo, minlength=hi - lo)
            a = 0
            for k, c in enumerate(counts):
                if not c:
                    continue
                b = lo + k
                if b not in writers:
                    writers[b] = pa.ipc.new_stream(str(spill / f"bucket-{b:05d}.arrow"),
                                                   schema)
                writers[b].write_table(t.slice(a, int(c)))
                a += int(c)
    finally:
        for w in writers.values():
            w.close()
    return sorted(writers)


def batch_rows(table: pa.Table) -> int:
    """Rows per batch for ``table``: at most :data:`BATCH_ROWS`, about
    :data:`BATCH_BYTES`."""
    if table.num_rows == 0:
        return BATCH_ROWS
    per_row = max(1, table.nbytes // table.num_rows)
    return int(max(1, min(BATCH_ROWS, BATCH_BYTES // per_row)))


def open_mapped(path: Path) -> pa.Table:
    """An uncompressed Arrow IPC stream file as a table whose buffers are the mapped
    file."""
    return pa.ipc.open_stream(pa.memory_map(str(path))).read_all()


def filter_rows(table: pa.Table, mask: np.ndarray) -> pa.Table:
    """``table.filter(mask)``; when ``table`` was spilled (:data:`SPILL_KEY`), the result
    is written slice by slice to a new mapped file there instead of onto the heap."""
    mask = np.asarray(mask, dtype=bool)
    if mask.all():
        return table
    spill = (table.schema.metadata or {}).get(SPILL_KEY)
    if spill is None:
        return table.filter(pa.array(mask))
    path = Path(spill.decode()) / f"filtered-{uuid.uuid4().hex}.arrow"
    step = batch_rows(table)
    with pa.ipc.new_stream(str(path), table.schema) as w:
        for a in range(0, table.num_rows, step):
            part = table.slice(a, step)
            w.write_table(part.filter(pa.array(mask[a:a + part.num_rows])))
    return open_mapped(path)
