"""Arrow tables read a slice at a time.

Stages and exporters keep a whole input as an Arrow table (compact) but turn rows into
Python objects only a slice at a time (:func:`iter_rows`, :data:`SLICE_ROWS` rows), so
memory does not grow with the number of rows.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import pyarrow as pa

#: rows turned into Python dicts at a time (a slice is converted, used and dropped)
SLICE_ROWS = 4096


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
