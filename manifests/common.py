"""Helpers shared by the exporters (sink stages under ``manifests/``).

Exports are deterministic: rows are ordered by (split, id), shards are contiguous runs of
that order, JSON is written with a fixed key order, and gzip/tar headers carry no
timestamps or owners, so the same run yields byte-identical files.

Exporters receive a whole split as an Arrow table (compact) but turn rows into Python
objects only a slice at a time (:func:`iter_rows`, :data:`SLICE_ROWS` rows): shard
boundaries come from Arrow columns (:func:`shard_bounds`) and manifest lines are written
as they are made, so memory does not grow with the number of segments.
"""

from __future__ import annotations

import gzip
import io
import json
import math
import os
import tarfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from speechmill.pipeline.audio import is_url, load_audio, local_path
from speechmill.pipeline.safe_names import safe_name
from speechmill.pipeline.sink_input import (  # noqa: F401 - SPLIT_ORDER, filter_rows re-exported
    ORDER_KEY,
    SPLIT_ORDER,
    filter_rows,
    order_for,
    plain_split,
    sort_rows,
    split_order,
    split_rank,
)

#: longest split directory name (bytes of UTF-8)
SPLIT_NAME_BYTES = 100
#: rows turned into Python dicts at a time (exporters convert a slice, use it, drop it)
SLICE_ROWS = 4096
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


def iter_slices(table: Any, size: int | None = None) -> Iterator[Any]:
    """``table`` (a Table, Array or ChunkedArray) as consecutive zero-copy slices of at
    most ``size`` rows (:data:`SLICE_ROWS`)."""
    step = max(1, size or SLICE_ROWS)
    for a in range(0, len(table), step):
        yield table.slice(a, step)


def iter_rows(table: pa.Table, columns: Iterable[str] | None = None,
              size: int | None = None) -> Iterator[dict[str, Any]]:
    """The rows of ``table`` (only ``columns`` that it has, when given) as dicts, in
    order, converted one slice of ``size`` rows at a time: at most one slice of rows
    exists as Python objects, whatever the table's size."""
    if columns is not None:
        table = table.select([c for c in columns if c in table.column_names])
    for part in iter_slices(table, size):
        yield from part.to_pylist()


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


def abs_audio_path(path: str) -> str:
    """An absolute local path (records may hold paths relative to the run's cwd, or
    ``file://`` URLs: a run directory given as one); other URLs as they are."""
    return path if is_url(path) else os.path.abspath(local_path(path))


def rel_or_abs(path: str, base: Path, relative: bool) -> str:
    """``path`` relative to directory ``base`` (NeMo and Lhotse resolve relative paths
    against the manifest's directory) when ``relative``, else absolute."""
    p = abs_audio_path(path)
    if not relative or is_url(p):
        return p
    return os.path.relpath(p, os.path.abspath(base))


#: a clip may come out this much shorter than its ``duration`` (codec frame padding)
SHORT_CLIP_TOLERANCE_S = 0.05


def check_span(row: Mapping[str, Any]) -> tuple[float, float | None]:
    """``(offset, duration)`` of a row; raises ``AudioError("bad_span")`` when either is
    not finite, the offset is negative or the duration is not positive."""
    from speechmill.pipeline.audio import AudioError

    off_v, dur_v = row.get("offset"), row.get("duration")
    off = 0.0 if off_v is None else float(off_v)
    dur = None if dur_v is None else float(dur_v)
    if not math.isfinite(off) or off < 0:
        raise AudioError("bad_span", f"offset {off_v!r}")
    if dur is not None and (not math.isfinite(dur) or dur <= 0):
        raise AudioError("bad_span", f"duration {dur_v!r}")
    return off, dur


def read_clip(row: Mapping[str, Any], sample_rate: int | None = None) -> tuple[np.ndarray, int]:
    """The row's audio (``audio_path`` from ``offset`` for ``duration``), mono float32.
    Raises :class:`speechmill.pipeline.audio.AudioError` on unreadable audio, a bad span
    (``bad_span``) or a file that ends before the span does (``short_audio``)."""
    from speechmill.pipeline.audio import AudioError

    off, dur = check_span(row)
    x, sr = load_audio(str(row["audio_path"]), offset=off, duration=dur,
                       sample_rate=sample_rate)
    if dur is not None and x.shape[0] < (dur - SHORT_CLIP_TOLERANCE_S) * sr:
        raise AudioError("short_audio", f"{x.shape[0] / sr:.3f} s of audio for a "
                         f"{dur:.3f} s span at {off:.3f} s")
    return x, sr


def encode_audio(x: np.ndarray, sr: int, fmt: str = "flac") -> bytes:
    """Encode mono float32 samples as FLAC (16-bit) or WAV (16-bit PCM) bytes."""
    import soundfile as sf

    buf = io.BytesIO()
    fmt_u = fmt.upper()
    sf.write(buf, np.clip(x, -1.0, 1.0), sr, format=fmt_u, subtype="PCM_16")
    return buf.getvalue()


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
