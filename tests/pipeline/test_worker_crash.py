"""A row that kills its worker process becomes a `worker_crash` reject; the run goes on."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from ray import cloudpickle

from speechmill.pipeline import dag as dagmod
from speechmill.pipeline import registry
from speechmill.pipeline.runner import run
from speechmill.pipeline.stage import Stage, StageConfig
from speechmill.pipeline.store import RunStore


class CrashyConfig(StageConfig):
    n: int = 6
    crash_on: str = "r3"


class Crashy(Stage):
    name = "t_crashy"
    Config = CrashyConfig
    is_source = True

    def plan(self) -> pa.Table:
        return pa.table({"id": [f"r{i}" for i in range(self.config.n)]})  # type: ignore[attr-defined]

    def process_row(self, row: dict[str, Any]) -> dict[str, Any]:
        if row["id"] == self.config.crash_on:  # type: ignore[attr-defined]
            os._exit(11)  # like a segfault in a native decoder: no exception, no cleanup
        return {"id": row["id"], "duration": 1.0}


registry.register(Crashy)
cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers get the class


@pytest.mark.ray
def test_crashing_row_is_isolated(tmp_path: Path) -> None:
    d = dagmod.loads(f"""
name: crash
run_dir: {tmp_path}
executor: {{type: ray, num_cpus: 2, stall_timeout_s: 300}}
stages: [{{id: c, uses: t_crashy, batch_size: 2}}]
""")
    res = run(d, progress=False)
    assert res.status == "succeeded"
    store = RunStore(tmp_path)
    assert sorted(store.read_outputs("c", ["id"]).column("id").to_pylist()) == [
        "r0", "r1", "r2", "r4", "r5"]
    rej = store.read_rejects("c").to_pylist()
    assert [(r["id"], r["reason"]) for r in rej] == [("r3", "worker_crash")]
