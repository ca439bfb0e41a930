"""A stage's input, read part file by part file.

A source stage's input is its plan (kept from the first attempt); any other stage's is
its upstream stages' part files. :func:`read_stage_input` counts the input and marks,
per part, the rows still to do (not consumed by an earlier attempt, not an id seen
before); :class:`StageInput` then hands them out in waves (in-process batches) or as
groups of ``(part, mask)`` that read tasks on workers read (a streamed stage).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from speechmill.pipeline.dag import Dag, PlannedStage
from speechmill.pipeline.errors import ConfigError, SpeechmillError
from speechmill.pipeline.records import concat, first_copies, total_seconds
from speechmill.pipeline.stage import StageContext
from speechmill.pipeline.store import RunStore
from speechmill.pipeline.store.parts import read_unit


def stage_inputs(dag: Dag, st: PlannedStage, store: RunStore, ctx: StageContext) -> pa.Table:
    """A source stage's plan. The first attempt's plan is kept: a resume finishes
    exactly that work even if the sources changed meanwhile (new files, a feed that is
    down or has moved on)."""
    kept = store.read_plan(st.id)
    if kept is not None:
        return kept
    stage = st.cls(st.config, ctx)
    try:
        planned = stage.plan()
    except (ValueError, OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot plan inputs: {e}", stage=st.id) from None
    store.write_plan(st.id, planned)
    return planned


@dataclass
class StageInput:
    """A stage's input, read part file by part file: what the stage still has to do
    comes in waves of at most ``wave_rows`` rows, so no stage ever holds its whole
    upstream in memory (only the ids, to skip consumed and repeated ones)."""

    units: list[Any]  # upstream part files, or a source's plan table
    masks: list[Any]  # per unit: numpy bool array, rows still to process
    rows_in: int = 0
    seconds_in: float = 0.0
    has_duration: bool = False
    repeated: int = 0  # rows whose id an earlier row has (skipped, not work done)

    @property
    def pending(self) -> int:
        return int(sum(int(m.sum()) for m in self.masks))

    def read_all(self, columns: tuple[str, ...] | None) -> pa.Table:
        """Every input row (consumed ones too), only ``columns`` (None: all)."""
        return concat([read_unit(u, columns=None if columns is None else list(columns))
                       for u in self.units])

    def groups(self, target_rows: int) -> list[list[tuple[Any, Any]]]:
        """The rows still to do as groups of ``(unit, mask)`` of about ``target_rows``
        rows each: what read tasks on workers read when a stage is streamed. Small
        parts are grouped; a part (or a source's plan) with more rows than that is
        split by row masks, each read task keeping only its share."""
        import numpy as np

        out: list[list[tuple[Any, Any]]] = []
        cur: list[tuple[Any, Any]] = []
        n = 0
        for unit, keep in zip(self.units, self.masks, strict=True):
            todo = int(keep.sum())
            if not todo:
                continue
            if isinstance(unit, pa.Table):  # a source's plan: slices of it
                for a in range(0, unit.num_rows, target_rows):
                    k = keep[a:a + target_rows]
                    if k.any():
                        out.append([(unit.slice(a, target_rows), k)])
                continue
            if todo > target_rows:  # one part, several read tasks
                rows = np.flatnonzero(keep)
                for a in range(0, len(rows), target_rows):
                    k = np.zeros(len(keep), dtype=bool)
                    k[rows[a:a + target_rows]] = True
                    out.append([(unit, k)])
                continue
            cur.append((unit, keep))
            n += todo
            if n >= target_rows:
                out.append(cur)
                cur, n = [], 0
        if cur:
            out.append(cur)
        return out

    def waves(self, wave_rows: int) -> Iterator[pa.Table]:
        buf: list[pa.Table] = []
        n = 0
        for unit, keep in zip(self.units, self.masks, strict=True):
            if not keep.any():
                continue
            t = read_unit(unit, keep)
            for a in range(0, t.num_rows, wave_rows):
                piece = t.slice(a, wave_rows)
                buf.append(piece)
                n += piece.num_rows
                if n >= wave_rows:
                    yield concat(buf)
                    buf, n = [], 0
        if buf:
            yield concat(buf)


#: rows a read task of a streamed stage reads (whole upstream parts, so about this many)
STREAM_GROUP_ROWS = 2048
#: read tasks a small streamed stage is cut into, at least
STREAM_MIN_GROUPS = 32


def read_stage_input(dag: Dag, st: PlannedStage, store: RunStore,
                     ctx: StageContext) -> StageInput:
    """Count the input and mark, per part, the rows to do: not consumed by an earlier
    attempt (outputs' ``parent_id``, rejects' ``id``) and not an id seen before (an id
    twice upstream would be processed twice: the first is kept). Ids are handled as
    Arrow columns (about 50 bytes per row while the masks are made; one byte per row
    after), never as Python objects."""
    from speechmill.pipeline.store.parts import as_string

    units: list[Any] = ([stage_inputs(dag, st, store, ctx)] if st.cls.is_source else
                        [p for n in st.spec.needs for p in store.output_parts(n)])
    inp = StageInput(units=units, masks=[])
    chunks: list[pa.Array] = []
    sizes: list[int] = []
    for u in units:
        t = read_unit(u, columns=["id", "duration"])
        if t.num_rows and "id" not in t.column_names:
            raise SpeechmillError(f"stage {st.id!r}: its input has no 'id' column")
        if t.num_rows:
            chunks.extend(as_string(t.column("id")).chunks)
        sizes.append(t.num_rows)
        inp.rows_in += t.num_rows
        if "duration" in t.column_names:
            inp.has_duration = True
            inp.seconds_in += total_seconds(t)
    ids = pa.chunked_array(chunks, pa.string())
    keep = first_copies(ids, store.consumed_id_array(st.id))
    inp.repeated = len(ids) - (pc.count_distinct(ids, mode="all").as_py() if len(ids) else 0)
    del ids, chunks
    a = 0
    for n in sizes:
        inp.masks.append(keep[a:a + n])
        a += n
    return inp
