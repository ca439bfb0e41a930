"""Where a stage's batches ran, and what was run again after a lost worker.

Workers put the Ray node's id (``"local"`` outside Ray) and any GPU ids Ray gave them in
each batch's stats (:func:`speechmill.pipeline.batch.where_run`); the runner tallies
them per stage into ``metrics.json`` (``nodes``: rows and batches per node, for the
batches this attempt ran) next to ``recovery``: the worker failures the executor
recovered from (a dead actor or a lost node: system failures, never a row's fault) and
how many rows and batches not yet committed ran again. ``status`` and the run summary
show both for stages that ran on more than one node or recovered.
"""

from __future__ import annotations

from typing import Any


class NodeTally:
    """Rows, batches and GPU ids per node, from batch stats."""

    def __init__(self) -> None:
        self.nodes: dict[str, dict[str, Any]] = {}
        #: batch processing + commit seconds, summed over this attempt's batches
        self.busy_s = 0.0

    def add(self, stats: dict[str, Any]) -> None:
        self.busy_s += float(stats.get("busy_s") or 0.0)
        node = str(stats.get("node_id") or "unknown")
        n = self.nodes.setdefault(node, {"rows": 0, "batches": 0})
        n["rows"] += int(stats.get("rows_in", 0))
        n["batches"] += 1
        for g in stats.get("gpu_ids") or []:
            ids = n.setdefault("gpu_ids", [])
            if str(g) not in ids:
                ids.append(str(g))

    def to_metrics(self) -> dict[str, dict[str, Any]]:
        return {k: dict(v, gpu_ids=sorted(v["gpu_ids"])) if "gpu_ids" in v else dict(v)
                for k, v in sorted(self.nodes.items())}


def recovery_metrics(failures: list[dict[str, Any]], rows: int, batches: int
                     ) -> dict[str, Any] | None:
    """``metrics.json``'s ``recovery``: None when no worker was lost."""
    if not failures:
        return None
    return {"failures": failures, "rows_rerun": rows, "batches_rerun": batches}


def cluster_lines(m: dict[str, Any]) -> list[str]:
    """Readable lines for a stage's metrics: rows per node when more than one node ran
    it, and the worker failures it recovered from."""
    lines = []
    nodes = m.get("nodes") or {}
    if len(nodes) > 1:
        per = ", ".join(f"{k[:12]} {v['rows']} rows/{v['batches']} batches"
                        + (f" (GPU {','.join(v['gpu_ids'])})" if v.get("gpu_ids") else "")
                        for k, v in sorted(nodes.items()))
        lines.append(f"rows per node: {per}")
    rec = m.get("recovery")
    if rec:
        why = "; ".join(f"{f['error']}: {f['message'][:120]}" for f in rec["failures"][:3])
        lines.append(f"recovered from {len(rec['failures'])} lost worker(s) ({why}): "
                     f"{rec['rows_rerun']} rows in {rec['batches_rerun']} batches not yet "
                     "committed ran again")
    return lines
