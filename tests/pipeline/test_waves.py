"""A stage's input runs in waves of ``executor.wave_rows`` rows: the executor never gets
more than that at once, ``prepare`` still sees the whole input (its declared columns), and
a run interrupted between waves resumes to the same outputs without duplicates."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from speechmill.pipeline.dag import loads
from speechmill.pipeline.executors.local import LocalExecutor
from speechmill.pipeline.runner import run
from speechmill.pipeline.stage import Stage, StageConfig
from speechmill.pipeline.store import RunStore


def _dag(tmp_path: Path, run_name: str, wave_rows: int) -> Any:
    rows = pa.table({"id": [f"r{i:02d}" for i in range(10)] + ["r03"],  # r03 twice
                     "audio_path": ["x"] * 11,
                     "duration": [1.0 + i for i in range(10)] + [4.0],
                     "speaker": [f"s{i % 4}" for i in range(10)] + ["s3"]})
    pq.write_table(rows, tmp_path / "rows.parquet")
    return loads(f"""
name: waves
run_dir: {tmp_path / run_name}
executor: {{type: local, progress: false, wave_rows: {wave_rows}}}
stages:
  - {{id: src, uses: read_parquet, with: {{paths: ["{tmp_path / 'rows.parquet'}"]}}}}
  - {{id: split, uses: split, needs: [src], batch_size: 2,
      with: {{dev_fraction: 0.2, test_fraction: 0.2}}}}
""")


def _out(run_dir: Path) -> list[dict[str, Any]]:
    return sorted(RunStore(run_dir).read_outputs("split", ["id", "split"]).to_pylist(),
                  key=lambda r: r["id"])


def test_waves_bound_the_executor_and_match_one_pass(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    assert run(_dag(tmp_path, "one", 1000), progress=False).status == "succeeded"
    calls: list[int] = []
    orig = LocalExecutor.run_stage

    def counting(self, cls, config, ctx, batches, *a, **k):  # noqa: ANN001
        if cls.name == "split":
            calls.append(sum(b.num_rows for b in batches))
        return orig(self, cls, config, ctx, batches, *a, **k)

    monkeypatch.setattr(LocalExecutor, "run_stage", counting)
    assert run(_dag(tmp_path, "waves", 3), progress=False).status == "succeeded"
    assert calls == [3, 3, 3, 1]  # 10 distinct ids (the repeated one is processed once)
    assert _out(tmp_path / "waves") == _out(tmp_path / "one")  # prepare saw everything
    assert len({r["split"] for r in _out(tmp_path / "waves")}) == 3


def test_interrupted_between_waves_resumes(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    assert run(_dag(tmp_path, "one", 1000), progress=False).status == "succeeded"
    orig = LocalExecutor.run_stage
    seen = {"n": 0}

    def dying(self, cls, config, ctx, batches, *a, **k):  # noqa: ANN001
        if cls.name == "split":
            seen["n"] += 1
            if seen["n"] == 3:
                raise RuntimeError("worker host lost")
        return orig(self, cls, config, ctx, batches, *a, **k)

    monkeypatch.setattr(LocalExecutor, "run_stage", dying)
    with pytest.raises(RuntimeError, match="host lost"):
        run(_dag(tmp_path, "waves", 3), progress=False)
    assert len(_out(tmp_path / "waves")) == 6  # two waves committed
    monkeypatch.setattr(LocalExecutor, "run_stage", orig)
    assert run(_dag(tmp_path, "waves", 3), progress=False).status == "succeeded"
    out = _out(tmp_path / "waves")
    assert out == _out(tmp_path / "one") and len({r["id"] for r in out}) == len(out) == 10


class _CountingConfig(StageConfig):
    marker_dir: str


class _Counting(Stage):
    """A model stage whose setup (the model load) leaves a marker file each time."""

    name = "t_counting_model"
    Config = _CountingConfig
    uses_model = True

    def setup(self) -> None:
        import os
        import uuid

        d = Path(self.config.marker_dir)  # type: ignore[attr-defined]
        (d / f"setup-{os.getpid()}-{uuid.uuid4().hex}").write_text("")

    def process_row(self, row: dict[str, Any]) -> dict[str, Any]:
        return {"id": row["id"], "duration": row.get("duration")}


@pytest.mark.ray
def test_ray_streams_a_stage_through_one_pool(tmp_path: Path) -> None:
    """On Ray, a stage larger than wave_rows is one pipeline: workers read the parts,
    and the model loads once per actor for the whole stage, not once per wave (unfused:
    fused, src -> m would be one pipeline anyway)."""
    import sys

    from ray import cloudpickle

    from speechmill.pipeline import registry

    registry.register(_Counting)
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    rows = pa.table({"id": [f"r{i:03d}" for i in range(40)], "duration": [1.0] * 40})
    pq.write_table(rows, tmp_path / "rows.parquet", row_group_size=7)
    markers = tmp_path / "markers"
    markers.mkdir()
    d = loads(f"""
name: stream
run_dir: {tmp_path / 'run'}
executor: {{type: ray, num_cpus: 2, progress: false, wave_rows: 5, stall_timeout_s: 300,
           fuse: false}}
stages:
  - {{id: src, uses: read_parquet, batch_size: 3, with: {{paths: ["{tmp_path / 'rows.parquet'}"]}}}}
  - {{id: m, uses: t_counting_model, needs: [src], batch_size: 2,
      with: {{marker_dir: "{markers}"}}}}
""")
    assert run(d, progress=False).status == "succeeded"
    out = RunStore(tmp_path / "run").read_outputs("m", ["id"]).column("id").to_pylist()
    assert sorted(out) == [f"r{i:03d}" for i in range(40)]
    # 40 rows in waves of 5 would have loaded the model 8 times; one pool loads it once
    # per actor (2 CPUs: two actors reserving 0.87 CPU each, 0.25 left for the reads)
    assert len(list(markers.iterdir())) == 2


def test_stream_groups_split_big_parts_and_join_small_ones(tmp_path: Path) -> None:
    import numpy as np

    from speechmill.pipeline.stage_input import StageInput

    big = np.ones(100, dtype=bool)
    big[::10] = False  # 90 rows to do
    small = [np.ones(7, dtype=bool) for _ in range(5)]
    inp = StageInput(units=["big", *[f"s{i}" for i in range(5)]], masks=[big, *small])
    groups = inp.groups(30)
    per_big = [k for g in groups for u, k in g if u == "big"]
    assert len(per_big) == 3 and all(k.sum() == 30 for k in per_big)
    assert (np.logical_or.reduce(per_big) == big).all() and sum(k.sum() for k in per_big) == 90
    smalls = [g for g in groups if g[0][0] != "big"]
    assert [len(g) for g in smalls] == [5] and sum(k.sum() for _, k in smalls[0]) == 35
    plan = pa.table({"id": [f"p{i}" for i in range(10)]})
    src = StageInput(units=[plan], masks=[np.array([True] * 9 + [False])])
    assert [g[0][0].num_rows for g in src.groups(4)] == [4, 4, 2]
