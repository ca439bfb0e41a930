"""What a stage attempt leaves behind, and what of it the next attempt retries.

Rejects that are not final (engine reasons, and transient ones a ledger has not yet
retried ``transient_retries`` times) are cleared before a stage runs again
(:func:`clear_engine_failures`). When every batch ran: optional dedup of output ids
(:func:`dedup_outputs`), the stage's metrics (:func:`stage_metrics`) and ``_SUCCESS``
once nothing is left to retry (:func:`mark_complete`).
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from speechmill.pipeline.dag import PlannedStage
from speechmill.pipeline.failures import ENGINE_REASONS, is_transient
from speechmill.pipeline.records import REJECT_SCHEMA, reject, total_seconds
from speechmill.pipeline.stage_input import StageInput
from speechmill.pipeline.store import RunStore


def now_iso() -> str:
    """The current UTC time, ISO 8601 to the second (``finished_at`` and run.json)."""
    return datetime.now(UTC).isoformat(timespec="seconds")


#: per stage: how many runs already retried each row rejected as transient
TRANSIENT_LEDGER = "_transient_retries.parquet"


def _ledger(store: RunStore, stage_id: str) -> dict[str, int]:
    t = store.read_stage_table(stage_id, TRANSIENT_LEDGER)
    if t is None:
        return {}
    return dict(zip(t.column("id").to_pylist(), t.column("retries").to_pylist(), strict=True))


def _retriable(t: pa.Table, ledger: dict[str, int], max_retries: int) -> Any:
    """Mask of the reject rows of ``t`` that run again: engine reasons, and transient
    rejects retried fewer than ``max_retries`` times."""
    retry = pc.fill_null(pc.is_in(t.column("reason"),
                                  value_set=pa.array(ENGINE_REASONS, pa.string())), False)
    if "kind" not in t.column_names:
        return retry
    spent = pa.array([ledger.get(i, 0) < max_retries for i in t.column("id").to_pylist()],
                     pa.bool_())
    return pc.or_(retry, pc.and_(is_transient(t.column("kind")), spent))


def clear_engine_failures(store: RunStore, stage_id: str, max_retries: int = 3) -> int:
    """Remove the stage's rejects that are not final so their rows run again: engine
    reasons (``error``, ``worker_crash``: the stage or its environment failed, often what
    made the last attempt fail) and transient rejects (a service or resource failed after
    its retries) that fewer than ``max_retries`` runs retried already (a ledger in the
    stage's directory counts them; after that the reject is final). Each reject part is
    rewritten atomically (or removed when nothing is left), and the ledger is written
    first, so an interruption here is harmless. Returns how many rows will be retried."""
    ledger = _ledger(store, stage_id)
    todo: list[tuple[Any, pa.Table, Any, int]] = []
    retried: list[str] = []
    for part in store.reject_parts(stage_id):
        t = store.read_outputs_part(part, None)
        retry = _retriable(t, ledger, max_retries)
        bad = int(pc.sum(retry).as_py() or 0)
        if not bad:
            continue
        todo.append((part, t, retry, bad))
        if "kind" in t.column_names:
            trans = pc.and_(retry, is_transient(t.column("kind")))
            retried.extend(t.filter(trans).column("id").to_pylist())
    if retried:
        for i in retried:
            ledger[i] = ledger.get(i, 0) + 1
        store.write_stage_table(stage_id, TRANSIENT_LEDGER, pa.table(
            {"id": pa.array(list(ledger), pa.string()),
             "retries": pa.array(list(ledger.values()), pa.int32())}))
    n = 0
    for part, t, retry, bad in todo:
        n += bad
        if bad == t.num_rows:
            store.remove_part(part)
        else:
            store.replace_part(part, t.filter(pc.invert(retry)))
    return n


def transient_left(store: RunStore, stage_id: str, max_retries: int = 3) -> int:
    """How many of the stage's transient rejects the next run retries."""
    t = store.read_rejects(stage_id, ["id", "reason", "kind"])
    if not t.num_rows or "kind" not in t.column_names:
        return 0
    ledger = _ledger(store, stage_id)
    mask = pc.and_(_retriable(t, ledger, max_retries), is_transient(t.column("kind")))
    return int(pc.sum(mask).as_py() or 0)


def mark_complete(st: PlannedStage, store: RunStore, metrics: dict[str, Any]) -> None:
    """``_SUCCESS`` for a stage that has nothing left to retry: no transient rejects of
    its own and every upstream stage complete. Otherwise the stage stays open, so the
    next run retries those rows and carries what they make downstream."""
    waiting = [n for n in st.spec.needs if not store.is_done(n)]
    if metrics.get("rows_transient") or waiting:
        metrics["incomplete"] = (
            f"{metrics['rows_transient']} transient rejects" if metrics.get("rows_transient")
            else f"upstream {', '.join(waiting)} incomplete")
        store.write_metrics(st.id, metrics)
        return
    store.mark_done(st.id)


def dedup_outputs(st: PlannedStage, store: RunStore) -> None:
    """Keep one output row per id; the others become ``duplicate`` rejects.

    The survivor is chosen by content, not by timing (smallest ``source_url``, then
    ``parent_id``), so a resumed run keeps the same rows as an uninterrupted one. Each
    touched part is rewritten atomically after its rejects are written, so a crash
    in between is repaired by the next run's identical pass.
    """
    parts = store.output_parts(st.id)
    cols = ["id", "parent_id", "source_url"]
    best: dict[str, tuple[str, str]] = {}
    per_part: list[tuple[Any, pa.Table]] = []
    for p in parts:
        t = store.read_outputs_part(p, cols)
        per_part.append((p, t))
        for rid, par, src in zip(*(t.column(c).to_pylist() for c in cols), strict=True):
            key = (src or "", par or "")
            if rid not in best or key < best[rid]:
                best[rid] = key
    for p, t in per_part:
        keep = [
            best[rid] == (src or "", par or "")
            for rid, par, src in zip(*(t.column(c).to_pylist() for c in cols), strict=True)
        ]
        if all(keep):
            continue
        full = store.read_outputs_part(p, None)
        losers = full.filter(pc.invert(pa.array(keep)))
        rows = []
        for r in losers.to_pylist():
            winner_src = best[r["id"]][0]
            rej = reject({**r, "id": r["parent_id"]}, st.id, "duplicate",
                         f"same content as {winner_src} (id {r['id']})")
            rows.append(rej)
        store.write_rejects(st.id, f"dup-{Path(str(p)).stem.removeprefix('part-')}",
                            pa.Table.from_pylist(rows, schema=REJECT_SCHEMA))
        kept = full.filter(pa.array(keep))
        if kept.num_rows:
            store.replace_part(p, kept)
        else:
            store.remove_part(p)


def reason_counts(rejects: pa.Table) -> dict[str, int]:
    """Rejects per reason (Arrow ``value_counts``: no Python object per reject)."""
    if not rejects.num_rows:
        return {}
    vc = pc.value_counts(rejects.column("reason"))
    return {str(v): int(c) for v, c in zip(vc.field("values").to_pylist(),
                                           vc.field("counts").to_pylist(), strict=True)}


def stage_metrics(st: PlannedStage, inp: StageInput, store: RunStore, wall: float,
                  transient_retries: int = 3) -> dict[str, Any]:
    """A plain stage's ``metrics.json`` (before the attempt's own additions)."""
    outs = store.read_outputs(st.id, ["id", "duration"])
    rejects = store.read_rejects(st.id, ["id", "reason", "duration"])
    sec_out = total_seconds(outs)
    sec_rej = float(pc.sum(rejects.column("duration")).as_py() or 0.0) if rejects.num_rows else 0.0
    sec_in = inp.seconds_in
    if st.cls.is_source or not inp.has_duration:
        sec_in = sec_out + sec_rej
    reasons = reason_counts(rejects)
    return {
        "stage": st.id,
        "uses": st.spec.uses,
        "rows_in": inp.rows_in,
        "rows_out": outs.num_rows,
        "rows_rejected": rejects.num_rows,
        "rows_transient": transient_left(store, st.id, transient_retries),
        "audio_hours_in": sec_in / 3600.0,
        "audio_hours_out": sec_out / 3600.0,
        "wall_seconds": round(wall, 3),
        # realtime factor: wall seconds per second of input audio (lower is faster)
        "realtime_factor": (wall / sec_in) if sec_in > 0 else None,
        "speed_x_realtime": (sec_in / wall) if wall > 0 and sec_in > 0 else None,
        "reasons": dict(sorted(reasons.items())),
        "fingerprint": st.fingerprint,
        "finished_at": now_iso(),
    }
