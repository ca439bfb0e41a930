"""Part files: writing them whole, listing the committed ones, reading them, and what
resume reads from them (the input ids a stage consumed, row counts).

A part is a parquet file ``part-<name>.parquet``. Locally it is written to a temp file
beside it, synced and renamed into place (:func:`atomic_write_parquet`); on an object store
it is uploaded whole by the store. Either way a reader sees a complete part or none.
Local parts are read by pyarrow straight from their paths; parts on an object store
(``s3://...``, read with a filesystem) with ranged reads, never a whole copy.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from speechmill.pipeline.records import concat
from speechmill.pipeline.store.layout import PART_PREFIX, PART_SUFFIX, is_part_name, is_url

#: a part: a local path, or a URL read through a filesystem
Part = Path | str


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` whole: a synced temp file renamed into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk leaves no half-written temp file
        raise


def atomic_write_parquet(path: Path, table: pa.Table) -> None:
    """Write ``table`` to the local ``path`` whole (zstd): a synced temp file renamed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    pq.write_table(table, tmp, compression="zstd")
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def local_parts(d: Path) -> list[Path]:
    """The committed parts in the local folder ``d``, sorted (none when it is missing)."""
    if not d.is_dir():
        return []
    return sorted(p for p in d.glob(f"{PART_PREFIX}*{PART_SUFFIX}") if p.is_file())


def listed_parts(fs: Any, d: str) -> list[str]:
    """The committed parts under the filesystem path ``d``, as filesystem paths, sorted.
    The listing bypasses fsspec's cache (other processes write parts too) and skips
    dot-names and temp names."""
    fs.invalidate_cache(d)
    try:
        names = fs.ls(d, detail=False)
    except FileNotFoundError:
        return []
    return sorted(n.rstrip("/") for n in names if is_part_name(n.rstrip("/").rsplit("/", 1)[-1]))


def as_string(col: pa.ChunkedArray | pa.Array) -> pa.ChunkedArray:
    """An id column as ``string`` chunks (ids may come as dictionary, large or null)."""
    if isinstance(col, pa.Array):
        col = pa.chunked_array([col])
    if pa.types.is_dictionary(col.type):
        col = col.cast(col.type.value_type)
    return col if col.type == pa.string() else col.cast(pa.string())


def _is_local(part: Part, fs: Any) -> bool:
    """Whether ``part`` is read by pyarrow from a local path (not through a filesystem)."""
    return isinstance(part, Path) or (fs is None and not is_url(part))


def _open(fs: Any, part: Part) -> Any:
    if fs is None:
        import fsspec

        return fsspec.open(os.fspath(part), "rb").open()
    return fs.open(part, "rb")


def read_part(part: Part, columns: Sequence[str] | None, fs: Any = None) -> pa.Table:
    """One part: only the ``columns`` it has (None: all). A local path is read by pyarrow;
    a URL through ``fs`` (None: the filesystem fsspec gives for the URL, credentials from
    the environment)."""
    if _is_local(part, fs):
        if columns is None:
            return pq.read_table(part)
        have = set(pq.read_schema(part).names)
        return pq.read_table(part, columns=[c for c in columns if c in have])
    with _open(fs, part) as f:
        pf = pq.ParquetFile(f)
        return pf.read(columns=None if columns is None else
                       [c for c in columns if c in pf.schema_arrow.names])


def read_parts(parts: Iterable[Part], columns: Sequence[str] | None,
               fs: Any = None) -> pa.Table:
    """Several parts as one table (see :func:`read_part`)."""
    return concat([read_part(p, columns, fs) for p in parts])


def read_unit(unit: Part | pa.Table, keep: Any = None,
              columns: list[str] | None = None) -> pa.Table:
    """One unit of a stage's input (an upstream part file, or a source's plan table):
    only ``columns`` it has (None: all), only the rows ``keep`` (a bool mask) marks.
    A part named by URL (``s3://...``) is read with ranged reads through fsspec
    (credentials from the environment)."""
    if isinstance(unit, pa.Table):
        t = unit if columns is None else unit.select(
            [c for c in columns if c in unit.column_names])
    else:
        t = read_part(unit, columns)
    if keep is not None and not keep.all():
        t = t.filter(pa.array(keep))
    return t


def id_column(parts: Iterable[Part], name: str, fs: Any = None) -> list[pa.Array]:
    """The chunks of column ``name`` (as strings) of every part that has it."""
    chunks: list[pa.Array] = []
    for p in parts:
        if _is_local(p, fs):
            if name not in pq.read_schema(p).names:
                continue
            col = pq.read_table(p, columns=[name]).column(name)
        else:
            with _open(fs, p) as f:
                pf = pq.ParquetFile(f)
                if name not in pf.schema_arrow.names:
                    continue
                col = pf.read(columns=[name]).column(name)
        chunks.extend(as_string(col).chunks)
    return chunks


def count_rows(parts: Iterable[Part], fs: Any = None) -> int:
    """The rows of ``parts``, from their footers."""
    total = 0
    for p in parts:
        if _is_local(p, fs):
            total += pq.ParquetFile(p).metadata.num_rows
        else:
            with _open(fs, p) as f:
                total += pq.ParquetFile(f).metadata.num_rows
    return total
