"""Run one batch of one stage and commit it to the run store.

This is what executors call on workers. It enforces the stage contract: an exception
from a whole-batch ``process`` is retried row by row so only the guilty row becomes a
reject; an input row with neither an output nor a reject becomes a ``no_output`` reject;
rejects are written before outputs, each part atomically, so a crash between the two
writes leaves a state that resume completes without duplicates.

Failures that are not a row's fault are never turned into rejects: an engine error or a
full / read-only disk raised by the stage (:func:`~speechmill.pipeline.errors.is_fatal`)
propagates, and so does a failed write of the batch's parts (as
:class:`~speechmill.pipeline.errors.StoreError`). The returned stats count engine rejects
by exception type (``errors``) for the stage's error budget.
"""

from __future__ import annotations

import hashlib
import time
import traceback
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from speechmill.pipeline.errors import StoreError, is_fatal
from speechmill.pipeline.failures import error_counts, transient_counts
from speechmill.pipeline.records import (
    REJECT_SCHEMA,
    concat,
    conform,
    reject,
    rejects_table,
    total_seconds,
)
from speechmill.pipeline.stage import Stage, StageResult
from speechmill.pipeline.store import RunStore


def batches_of(table: pa.Table, size: int, seconds: float | None = None
               ) -> Iterator[pa.Table]:
    """Batches of at most ``size`` rows and, when ``seconds`` is given, about that much
    audio (a longer row is a batch of its own), so model batches take similar time."""
    if not seconds or "duration" not in table.column_names:
        for start in range(0, table.num_rows, size):
            yield table.slice(start, size)
        return
    durs = [float(d or 0.0) for d in table.column("duration").to_pylist()]
    start, acc = 0, 0.0
    for i, d in enumerate(durs):
        if i > start and (i - start >= size or acc + d > seconds):
            yield table.slice(start, i - start)
            start, acc = i, 0.0
        acc += d
    if start < table.num_rows:
        yield table.slice(start, table.num_rows - start)


def part_name(batch: pa.Table) -> str:
    ids = sorted(str(x) for x in batch.column("id").to_pylist())
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()[:16]


def run_batch(stage: Stage, batch: pa.Table, store: RunStore) -> dict[str, Any]:
    """Process ``batch`` with ``stage`` and write its parts; returns batch stats."""
    t0 = time.perf_counter()
    sid = stage.ctx.stage_id
    try:
        result = stage.process(batch)
    except Exception as e:
        if is_fatal(e):
            raise
        result = _row_by_row(stage, batch, traceback.format_exc(limit=2))
    outputs = conform(result.outputs) if result.outputs.num_columns else result.outputs
    rejects = _conform_rejects(result.rejects)

    # contract: every input row -> >=1 output or exactly one reject
    in_ids = batch.column("id").to_pylist()
    if outputs.num_rows:  # outputs must name one of this batch's inputs as parent
        if "parent_id" not in outputs.column_names:
            outputs = outputs.slice(0, 0)
        else:
            ok = pc.is_in(outputs.column("parent_id"), value_set=pa.array(in_ids, pa.string()))
            outputs = outputs.filter(pc.fill_null(ok, False))
    got: set[str] = set()
    if outputs.num_rows and "parent_id" in outputs.column_names:
        got.update(x for x in outputs.column("parent_id").to_pylist() if x is not None)
    rej_ids = rejects.column("id").to_pylist()
    seen_rej: set[str] = set()
    keep = []
    for rid in rej_ids:
        keep.append(rid not in seen_rej and rid not in got)
        seen_rej.add(rid)
    if not all(keep):
        rejects = rejects.filter(pa.array(keep))
    got.update(seen_rej)
    missing = [r for r in batch.to_pylist() if r["id"] not in got]
    if missing:
        extra = rejects_table(
            reject(r, sid, "no_output", "stage returned neither an output nor a reject")
            for r in missing
        )
        rejects = pa.concat_tables([rejects, extra])

    name = part_name(batch)
    try:
        if rejects.num_rows:
            store.write_rejects(sid, name, rejects)
        if outputs.num_rows:
            store.write_outputs(sid, name, outputs)
    except OSError as e:  # disk full, read-only, permission denied: stop, never reject
        raise StoreError(f"cannot write to the run directory {str(store.root)!r}: "
                         f"{type(e).__name__}: {e}", errno=e.errno) from e
    reasons = Counter(rejects.column("reason").to_pylist()) if rejects.num_rows else Counter()
    return {
        "rows_in": batch.num_rows,
        "rows_out": outputs.num_rows,
        "rows_rejected": rejects.num_rows,
        "seconds_in": total_seconds(batch),
        "seconds_out": total_seconds(outputs),
        "seconds_rejected": _rejected_seconds(rejects),
        "reasons": dict(reasons),
        "errors": error_counts(rejects),
        "transient": transient_counts(rejects),
        "busy_s": time.perf_counter() - t0,
        **where_run(),
    }


def where_run() -> dict[str, Any]:
    """Where this batch ran: the Ray node's id (``"local"`` outside Ray) and, when Ray
    gave this worker GPUs, their ids and the ``CUDA_VISIBLE_DEVICES`` it set."""
    import os
    import sys

    ray = sys.modules.get("ray")  # never imports Ray: a local run stays light
    if ray is None or not ray.is_initialized():
        return {"node_id": "local"}
    out: dict[str, Any] = {"node_id": ray.get_runtime_context().get_node_id()}
    gpus = ray.get_gpu_ids()
    if gpus:
        out["gpu_ids"] = [str(g) for g in gpus]
        out["cuda_visible_devices"] = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    return out


def _row_by_row(stage: Stage, batch: pa.Table, batch_error: str) -> StageResult:
    outs: list[pa.Table] = []
    rejs: list[dict[str, Any]] = []
    for i in range(batch.num_rows):
        one = batch.slice(i, 1)
        try:
            r = stage.process(one)
        except Exception as e:
            if is_fatal(e):
                raise
            row = one.to_pylist()[0]
            detail = f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=3)}"
            rejs.append(reject(row, stage.ctx.stage_id, "error", detail))
            continue
        if r.outputs.num_rows:
            outs.append(conform(r.outputs))
        rejs.extend(r.rejects.to_pylist())
    out = concat(outs) if outs else pa.table({"id": pa.array([], pa.string())})
    return StageResult(out, rejects_table(rejs))


def _conform_rejects(t: pa.Table) -> pa.Table:
    if t.schema.equals(REJECT_SCHEMA):
        return t
    cols = {}
    for f in REJECT_SCHEMA:
        cols[f.name] = (
            t.column(f.name).cast(f.type)
            if f.name in t.column_names
            else pa.nulls(t.num_rows, f.type)
        )
    return pa.table(cols, schema=REJECT_SCHEMA)


def _rejected_seconds(rejects: pa.Table) -> float:
    if not rejects.num_rows:
        return 0.0
    return float(pc.sum(rejects.column("duration")).as_py() or 0.0)
