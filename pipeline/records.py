"""The record model: core columns, their Arrow types, ids and reject rows.

Records are rows of Arrow tables. Audio never travels inside a record: ``audio_path``
(+ ``offset``/``duration``) points at a file. Stages add columns but never rename or
retype the core ones; :func:`conform` casts the core columns a table carries so every
part file of a stage has the same types.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from typing import Any

import pyarrow as pa

WORD_TYPE = pa.struct(
    [
        ("word", pa.string()),
        ("start", pa.float64()),
        ("end", pa.float64()),
        ("prob", pa.float64()),
    ]
)

#: Core columns and their types. ``scores`` is a struct whose fields grow as stages
#: add scores (dnsmos, snr, lid_prob, ...), so its type is not fixed here.
CORE_TYPES: dict[str, pa.DataType] = {
    "id": pa.string(),
    "parent_id": pa.string(),
    "source_url": pa.string(),
    "audio_path": pa.string(),
    "offset": pa.float64(),
    "duration": pa.float64(),
    "sample_rate": pa.int32(),
    "channels": pa.int16(),
    "speaker": pa.string(),
    "language": pa.string(),
    "text": pa.string(),
    "words": pa.list_(WORD_TYPE),
}

REJECT_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("stage", pa.string()),
        ("reason", pa.string()),
        ("detail", pa.string()),
        ("source_url", pa.string()),
        ("audio_path", pa.string()),
        ("duration", pa.float64()),
        # "data" (the input is bad: final) or "transient" (a service or resource failed
        # after its retries: counts toward the error budget and a plain rerun retries it)
        ("kind", pa.string()),
    ]
)

#: reject kinds (the ``kind`` column; null in parts written before it existed = data)
DATA = "data"
TRANSIENT = "transient"


def content_id(sha256_hex: str) -> str:
    """Record id of a file: the first 20 hex digits (80 bits) of its content sha256."""
    return sha256_hex[:20]


def stable_hash(*parts: Any) -> int:
    """A 64-bit hash of ``parts`` that is the same in every process (Python's own ``hash``
    is salted per process): seeds and deterministic orderings."""
    blob = "\x1f".join(str(p) for p in parts).encode("utf-8")
    return int.from_bytes(hashlib.sha256(blob).digest()[:8], "big")


def key_id(*parts: str) -> str:
    """Deterministic id for a non-file key (e.g. a planned input URL)."""
    h = hashlib.sha256("\x1f".join(parts).encode("utf-8")).hexdigest()
    return h[:20]


def segment_id(audio_id: str, start: float, end: float) -> str:
    """Id of a segment of ``audio_id`` between ``start`` and ``end`` seconds."""
    return f"{audio_id}-{round(start * 1000):08d}-{round(end * 1000):08d}"


def recording_id(row_id: str) -> str:
    """The recording a row belongs to: a segment id's part before its first ``-`` (content
    ids are hex, so a file's own id is returned unchanged)."""
    return str(row_id).split("-", 1)[0]


def reject(
    row: Mapping[str, Any], stage: str, reason: str, detail: str = "", *,
    transient: bool = False,
) -> dict[str, Any]:
    """A reject row for input ``row``: it keeps the input's id so resume sees it consumed.

    ``transient=True`` when a service or resource failed after its retries (connection
    refused, timeout, HTTP 5xx, 429 beyond the retry budget): such a row counts toward the
    stage's error budget and is not final (a plain rerun retries it)."""
    dur = row.get("duration")
    return {
        "id": row.get("id"),
        "stage": stage,
        "reason": reason,
        "detail": (detail or "")[:2000],
        "source_url": row.get("source_url"),
        "audio_path": row.get("audio_path"),
        "duration": float(dur) if isinstance(dur, int | float) else None,
        "kind": TRANSIENT if transient else DATA,
    }


def rejects_table(rows: Iterable[Mapping[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(list(rows), schema=REJECT_SCHEMA)


def empty_rejects() -> pa.Table:
    return REJECT_SCHEMA.empty_table()


def conform(table: pa.Table) -> pa.Table:
    """Cast core columns to their canonical types; other columns are left alone."""
    for name, typ in CORE_TYPES.items():
        idx = table.schema.get_field_index(name)
        if idx < 0:
            continue
        col = table.column(idx)
        if col.type != typ:
            table = table.set_column(idx, pa.field(name, typ), col.cast(typ))
    return table


def concat(tables: list[pa.Table]) -> pa.Table:
    """Concatenate tables whose schemas differ only by missing/null columns."""
    tables = [t for t in tables if t is not None]
    if not tables:
        return pa.table({})
    return pa.concat_tables(tables, promote_options="permissive")


def first_copies(ids: Any, consumed: Any = None) -> Any:
    """Bool mask over the id column ``ids``: the first row of each id (a null id counts
    as one value) and, when given, not in ``consumed``. Arrow only (``is_in``, a stable
    sort): no Python object per row."""
    import numpy as np
    import pyarrow.compute as pc

    n = len(ids)
    keep = np.ones(n, dtype=bool)
    if n == 0:
        return keep
    if consumed is not None and len(consumed):
        if isinstance(consumed, pa.ChunkedArray):
            consumed = consumed.combine_chunks()
        hit = pc.fill_null(pc.is_in(ids, value_set=consumed), False)
        keep &= ~np.asarray(hit.to_numpy(zero_copy_only=False), dtype=bool)
    if pc.count_distinct(ids, mode="all").as_py() < n:
        idx = pc.sort_indices(ids)  # stable: the copies of an id keep their order
        s = ids.take(idx)
        same = pc.or_(pc.fill_null(pc.equal(s.slice(1), s.slice(0, n - 1)), False),
                      pc.and_(pc.is_null(s.slice(1)), pc.is_null(s.slice(0, n - 1))))
        dup = np.concatenate([[False], np.asarray(same.to_numpy(zero_copy_only=False),
                                                  dtype=bool)])
        keep[np.asarray(idx.to_numpy(zero_copy_only=False))[dup]] = False
    return keep


def total_seconds(table: pa.Table) -> float:
    if "duration" not in table.column_names or table.num_rows == 0:
        return 0.0
    import pyarrow.compute as pc

    s = pc.sum(table.column("duration")).as_py()
    return float(s or 0.0)
