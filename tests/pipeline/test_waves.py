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
from speechmill.pipeline.executors import LocalExecutor
from speechmill.pipeline.runner import run
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
