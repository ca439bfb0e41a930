"""Helpers shared by the exporters (sink stages under ``manifests/``).

Exports are deterministic: rows are ordered by (split, id), shards are contiguous runs of
that order, JSON is written with a fixed key order, and gzip/tar headers carry no
timestamps or owners, so the same run yields byte-identical files.

Exporters receive a whole split as an Arrow table (compact) but turn rows into Python
objects only a slice at a time (:func:`speechmill.pipeline.row_slices.iter_rows`): shard
boundaries come from Arrow columns (:func:`shard_bounds`) and manifest lines are written
as they are made, so memory does not grow with the number of segments. Clips are read,
encoded and named by :mod:`speechmill.pipeline.clips`; paths into a published export come
from :mod:`speechmill.pipeline.publish`.
"""

from __future__ import annotations

import gzip
import io
import json
import math
import tarfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from speechmill.pipeline.records import reject
from speechmill.pipeline.row_slices import iter_rows, iter_slices
from speechmill.pipeline.safe_names import safe_name
from speechmill.pipeline.sink_input import (
    ORDER_KEY,
    filter_rows,
    order_for,
    plain_split,
    sort_rows,
    split_order,
    split_rank,
)

#: longest split directory name (bytes of UTF-8)
SPLIT_NAME_BYTES = 100
#: durations read into Python at a time when cutting shards by bytes
DURATION_CHUNK = 65536


def split_groups(table: pa.Table, by_split: bool = True) -> list[tuple[str | None, pa.Table]]:
    """``[(split, rows sorted by id)]``: one group per value of the ``split`` column
    (train, dev, test first, then others by name, then rows without a split as
    ``unassigned``), or one group ``(None, all rows)`` when there is no such column or
    ``by_split`` is off. The table is sorted once by (split, id) (stable: rows with equal
    ids keep their input order) and each group is a zero-copy slice of it; a table the
    engine already ordered that way (:mod:`speechmill.pipeline.sink_input`) is not
    sorted again, so a memory-mapped input stays mapped."""
    if table.num_rows == 0:
        return []
    order = order_for(by_split, table.column_names)
    if order == "id":
        return [(None, sort_by_id(table))]
    col = plain_split(table.column("split"))
    order_names = split_order(pc.unique(col).to_pylist())
    safe = {name: safe_split_name(name) for name in order_names}
    if len(set(safe.values())) != len(safe):
        raise ValueError(f"split names {sorted(safe)} collide as directory names")
    if not order_names:  # every row without a split: (split, id) order is id order
        return [("unassigned", table if _ordered_by(table, order) else sort_by_id(table))]
    # each row's rank in ``order_names``; rows without a split go last
    rank = split_rank(col, order_names)
    ordered = table if _ordered_by(table, order) else sort_rows(table, order, order_names)
    counts = np.bincount(np.asarray(rank.to_numpy(zero_copy_only=False)),
                         minlength=len(order_names) + 1)
    out: list[tuple[str | None, pa.Table]] = []
    start = 0
    for k, name in enumerate([*order_names, None]):
        n = int(counts[k])
        if n:
            out.append((safe[name] if name is not None else "unassigned",
                        ordered.slice(start, n)))
        start += n
    return out


def _ordered_by(table: pa.Table, order: str) -> bool:
    return (table.schema.metadata or {}).get(ORDER_KEY) == order.encode()


def safe_split_name(name: str) -> str:
    """A split value as a directory name: :func:`~speechmill.pipeline.safe_names.safe_name`
    (never a path, no leading ``.``/``-``, at most :data:`SPLIT_NAME_BYTES` bytes; ``train``,
    ``dev``, ``test``... stay as they are, other values get a readable part and a hash,
    so two splits never share a directory)."""
    return safe_name(str(name), max_bytes=SPLIT_NAME_BYTES)


def data_file_split(split: str | None, taken: set[str]) -> str:
    """A split's name in Hugging Face data file names (``{name}-00000-of-00001.parquet``)
    and dataset cards: ``train`` without a split, else ``split`` with every non-word
    character replaced by ``_`` (``datasets`` wants ``\\w+`` split names); a name an
    earlier split of the export took (``a.b`` and ``a_b``) gets ``_`` and the split's
    hash until it is free. Adds the name to ``taken``."""
    import hashlib
    import re

    name = re.sub(r"\W", "_", split) if split else "train"
    while name in taken:
        name += "_" + hashlib.sha256(str(split).encode("utf-8")).hexdigest()[:8]
    taken.add(name)
    return name


def sort_by_id(table: pa.Table) -> pa.Table:
    if table.num_rows == 0 or _ordered_by(table, "id"):
        return table
    return table.take(pc.sort_indices(table, sort_keys=[("id", "ascending")]))


def shard_bounds(table: pa.Table, shard_size: int | None = None,
                 shard_bytes: int | None = None, bytes_per_second: float = 32000.0
                 ) -> list[tuple[int, int]]:
    """``[(start, stop)]`` row ranges of the shards :func:`shard_slices` cuts; durations
    are read from the Arrow column a chunk at a time (never the whole column as Python
    floats)."""
    n = table.num_rows
    if n == 0:
        return []
    bounds: list[tuple[int, int]] = []
    if shard_bytes:
        col = table.column("duration") if "duration" in table.column_names else None
        start, acc = 0, 0.0
        step = max(1, DURATION_CHUNK)
        for a in range(0, n, step):
            durs = col.slice(a, step).to_pylist() if col is not None \
                else [0.0] * min(step, n - a)
            for j, d in enumerate(durs):
                i = a + j
                b = float(d or 0.0) * bytes_per_second
                too_many = shard_size is not None and i - start >= shard_size
                if i > start and (acc + b > shard_bytes or too_many):
                    bounds.append((start, i))
                    start, acc = i, 0.0
                acc += b
        bounds.append((start, n))
    elif shard_size:
        bounds = [(i, min(n, i + shard_size)) for i in range(0, n, shard_size)]
    else:
        bounds = [(0, n)]
    return bounds


def shard_slices(table: pa.Table, shard_size: int | None = None,
                 shard_bytes: int | None = None, bytes_per_second: float = 32000.0
                 ) -> list[pa.Table]:
    """Cut ``table`` (already ordered) into contiguous shards of at most ``shard_size`` rows
    and about ``shard_bytes`` bytes of audio (estimated from ``duration`` at
    ``bytes_per_second``); one shard when neither is given. Never an empty shard."""
    return [table.slice(a, b - a)
            for a, b in shard_bounds(table, shard_size, shard_bytes, bytes_per_second)]


def tar_add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """Add a member with fixed metadata (no mtime/owner), so tars are byte-identical."""
    info = tarfile.TarInfo(name=name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def open_tar(path: Path) -> tarfile.TarFile:
    # GNU format: member names longer than 100 characters (long ids) are fine and
    # webdataset / lhotse read them; headers stay deterministic (mtime 0, no owner)
    return tarfile.open(path, "w", format=tarfile.GNU_FORMAT)


def json_safe(v: Any) -> Any:
    """Plain JSON values: NaN/inf -> None, numpy scalars/arrays -> Python."""
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, np.generic):
        return json_safe(v.item())
    if isinstance(v, np.ndarray):
        return [json_safe(x) for x in v.tolist()]
    if isinstance(v, Mapping):
        return {str(k): json_safe(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [json_safe(x) for x in v]
    return v


def dumps_line(obj: Mapping[str, Any]) -> str:
    return json.dumps(json_safe(obj), ensure_ascii=False, separators=(", ", ": "))


def open_text_out(path: Path, gz: bool | None = None) -> IO[str]:
    """Text writer; ``.gz`` files get a gzip header without name or mtime."""
    gz = path.suffix == ".gz" if gz is None else gz
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        raw = open(path, "wb")  # noqa: SIM115 - closed through the wrapper
        zf = gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0)
        return _ClosingText(zf, raw)
    return open(path, "w", encoding="utf-8", newline="\n")


class _ClosingText(io.TextIOWrapper):
    def __init__(self, zf: gzip.GzipFile, raw: IO[bytes]) -> None:
        super().__init__(zf, encoding="utf-8", newline="\n")
        self._raw = raw

    def close(self) -> None:
        super().close()
        self._raw.close()


def write_jsonl(path: Path, rows: Iterable[Mapping[str, Any]]) -> int:
    n = 0
    with open_text_out(path) as f:
        for r in rows:
            f.write(dumps_line(r) + "\n")
            n += 1
    return n


def track(items: Iterable[Any], total: int, desc: str) -> Iterator[Any]:
    """A progress bar on a terminal (silent otherwise)."""
    import sys

    if not sys.stderr.isatty() or total < 2:
        yield from items
        return
    from rich.progress import track as rtrack

    yield from rtrack(items, total=total, description=desc, transient=True)


def scores_dict(row: Mapping[str, Any]) -> dict[str, Any]:
    s = row.get("scores")
    return {k: v for k, v in (s or {}).items() if v is not None}


#: the columns exporters read (everything else stays behind, to keep memory small)
ROW_COLUMNS = ("id", "source_url", "audio_path", "offset", "duration", "sample_rate",
               "speaker", "language", "text", "scores")
#: FLAC of speech at 16 bits is about this fraction of PCM (used to estimate shard bytes)
FLAC_RATIO = 0.6


def row_columns(table: pa.Table, extras: Iterable[str] = ()) -> pa.Table:
    """``table`` with only the columns exporters read (:data:`ROW_COLUMNS` + ``extras``)."""
    return table.select([c for c in (*ROW_COLUMNS, *extras) if c in table.column_names])


def has_text(row: Mapping[str, Any]) -> bool:
    t = row.get("text")
    return isinstance(t, str) and bool(t.strip())


def text_mask(table: pa.Table) -> np.ndarray:
    """:func:`has_text` of every row (the same test) as a bool array, read a slice at a
    time."""
    out = np.zeros(table.num_rows, dtype=bool)
    if "text" not in table.column_names:
        return out
    a = 0
    for part in iter_slices(table.column("text")):
        vals = part.to_pylist()
        out[a:a + len(vals)] = [isinstance(t, str) and bool(t.strip()) for t in vals]
        a += len(vals)
    return out


def drop_textless(table: pa.Table, stage_id: str, rejects: list[dict[str, Any]]
                  ) -> pa.Table:
    """The rows of ``table`` with text; the others (in order) become ``no_text`` rejects."""
    mask = text_mask(table)
    if mask.all():
        return table
    for r in iter_rows(filter_rows(table, ~mask)):
        rejects.append(reject(r, stage_id, "no_text", "empty transcript"))
    return filter_rows(table, mask)


def flat_scores(row: Mapping[str, Any], reserved: Iterable[str] = ()) -> dict[str, Any]:
    """The row's scores as flat keys (nested structs joined with ``_``); finite values only;
    a name in ``reserved`` gets a ``score_`` prefix."""
    res = set(reserved)
    out: dict[str, Any] = {}

    def put(prefix: str, v: Any) -> None:
        if isinstance(v, Mapping):
            for k, x in v.items():
                put(f"{prefix}_{k}", x)
            return
        v = json_safe(v)
        if v is None:
            return
        out[f"score_{prefix}" if prefix in res else prefix] = v

    for k, v in scores_dict(row).items():
        put(str(k), v)
    return out


def output_rate(table: pa.Table, sample_rate: int | None) -> int:
    """The sample rate clips will have (for shard size estimates)."""
    if sample_rate:
        return int(sample_rate)
    if "sample_rate" in table.column_names and table.num_rows:
        m = pc.max(table.column("sample_rate")).as_py()
        if m:
            return int(m)
    return 16000


def summary_text(summary: Mapping[str, Any]) -> list[str]:
    lines = []
    for name, s in summary.get("splits", {}).items():
        shards = f", {s['shards']} shards" if "shards" in s else ""
        lines.append(f"{name}: {s['rows']} utterances, {s['hours']:.3f} h{shards}")
    if summary.get("rejected"):
        why = ", ".join(f"{k} {v}" for k, v in sorted(summary.get("reasons", {}).items()))
        lines.append(f"rejected: {summary['rejected']} ({why})")
    return lines
