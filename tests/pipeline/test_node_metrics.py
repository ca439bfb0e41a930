"""Per-batch ``node_id`` in the stage metrics (local executor: node ``local``), and how
``status`` / the run summary show rows per node and recovered worker failures. The
multi-node behaviour itself is proven on a real cluster in ``test_multinode.py``."""

from __future__ import annotations

import json
from pathlib import Path

from speechmill.pipeline.nodes import NodeTally, cluster_lines, recovery_metrics
from speechmill.pipeline.report import status_rows
from speechmill.pipeline.runner import run
from tests.pipeline.test_runner import make_dag


def test_local_run_records_its_batches_on_node_local(tmp_path: Path) -> None:
    run(make_dag(tmp_path, n=10, batch=3), progress=False)
    m = json.loads((tmp_path / "stages/picky/metrics.json").read_text())
    # 8 unique rows from nums, in batches of 3: 3 batches, all in this process
    assert m["nodes"] == {"local": {"rows": 8, "batches": 3}}
    assert "recovery" not in m
    picky = next(r for r in status_rows(str(tmp_path))[1] if r["stage"] == "picky")
    assert picky["nodes"] == m["nodes"] and "cluster_lines" not in picky  # one node


def test_rows_per_node_and_recovery_lines() -> None:
    tally = NodeTally()
    for node, rows, gpus in (("a" * 56, 3, None), ("b" * 56, 2, ["1"]), ("b" * 56, 1, ["0"])):
        tally.add({"rows_in": rows, "node_id": node, **({"gpu_ids": gpus} if gpus else {})})
    nodes = tally.to_metrics()
    assert nodes == {"a" * 56: {"rows": 3, "batches": 1},
                     "b" * 56: {"rows": 3, "batches": 2, "gpu_ids": ["0", "1"]}}
    rec = recovery_metrics([{"error": "ActorDiedError", "message": "The actor died"}], 5, 4)
    lines = cluster_lines({"nodes": nodes, "recovery": rec})
    assert lines[0] == ("rows per node: aaaaaaaaaaaa 3 rows/1 batches, "
                        "bbbbbbbbbbbb 3 rows/2 batches (GPU 0,1)")
    assert lines[1].startswith("recovered from 1 lost worker(s) (ActorDiedError: The actor")
    assert lines[1].endswith("5 rows in 4 batches not yet committed ran again")
    assert recovery_metrics([], 0, 0) is None
    assert cluster_lines({"nodes": {"local": {"rows": 1, "batches": 1}}}) == []
