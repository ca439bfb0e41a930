"""The engine's sink path: exports written to a scratch dir, renamed into place, then
``_SUCCESS``; a failed export leaves nothing where users look and a rerun redoes it."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from speechmill.pipeline import registry
from speechmill.pipeline.dag import load as load_dag
from speechmill.pipeline.records import reject, rejects_table
from speechmill.pipeline.runner import run
from speechmill.pipeline.stage import SinkResult, Stage, StageConfig


class CountSinkConfig(StageConfig):
    fail_after: int = -1


class CountSink(Stage):
    name = "test_count_sink"
    Config = CountSinkConfig
    is_sink = True
    calls = 0

    def export(self, inputs: pa.Table, out_dir: Path) -> SinkResult:
        type(self).calls += 1
        ids = sorted(inputs.column("id").to_pylist())
        bad = [r for r in inputs.to_pylist() if r["duration"] is None]
        for i, rid in enumerate(ids):
            if i == self.config.fail_after and os.environ.get("SINK_FAIL") == "1":
                raise RuntimeError("killed mid-export")
            (out_dir / f"{rid}.txt").write_text(rid)
        (out_dir / "list.json").write_text(json.dumps(ids))
        rej = rejects_table(reject(r, self.ctx.stage_id, "no_duration") for r in bad)
        return SinkResult(rows_out=len(ids) - len(bad), seconds_out=1.5 * (len(ids) - len(bad)),
                          rejects=rej, summary={"files": len(ids)})

    @classmethod
    def summary_lines(cls, summary: dict[str, Any]) -> list[str]:
        return [f"{summary['files']} files"]


@pytest.fixture(autouse=True)
def _registered() -> None:
    registry.register(CountSink)


def _dag(tmp_path: Path, fail_after: int = -1) -> Path:
    rows = pa.table({"id": ["c", "a", "b"], "audio_path": ["x", "y", "z"],
                     "duration": [1.5, 1.5, None]})
    pq.write_table(rows, tmp_path / "rows.parquet")
    p = tmp_path / "dag.yaml"
    p.write_text(f"""
name: t
run_dir: {tmp_path / 'run'}
executor: {{type: local, progress: false}}
stages:
  - id: src
    uses: read_parquet
    with: {{paths: ["{tmp_path / 'rows.parquet'}"]}}
  - id: out
    uses: test_count_sink
    needs: [src]
    with: {{fail_after: {fail_after}}}
""")
    return p


def test_sink_writes_into_place_with_metrics(tmp_path: Path) -> None:
    res = run(load_dag(_dag(tmp_path)), progress=False)
    assert res.status == "succeeded"
    out = tmp_path / "run/exports/out"
    assert sorted(p.name for p in out.iterdir()) == ["a.txt", "b.txt", "c.txt", "list.json"]
    m = json.loads((tmp_path / "run/stages/out/metrics.json").read_text())
    assert (m["rows_in"], m["rows_out"], m["rows_rejected"]) == (3, 2, 1)
    assert m["reasons"] == {"no_duration": 1}
    assert m["stage_summary"] == {"files": 3}
    assert m["audio_hours_out"] == pytest.approx(3.0 / 3600)
    assert (tmp_path / "run/stages/out/_SUCCESS").exists()
    calls = CountSink.calls
    run(load_dag(_dag(tmp_path)), progress=False)  # done: not exported again
    assert CountSink.calls == calls


def test_failed_export_leaves_nothing_and_rerun_finishes(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SINK_FAIL", "1")
    with pytest.raises(RuntimeError, match="killed mid-export"):
        run(load_dag(_dag(tmp_path, fail_after=1)), progress=False)
    assert not (tmp_path / "run/exports/out").exists()
    assert not (tmp_path / "run/stages/out/_SUCCESS").exists()
    monkeypatch.setenv("SINK_FAIL", "0")
    res = run(load_dag(_dag(tmp_path, fail_after=1)), progress=False)
    assert res.status == "succeeded"
    out = tmp_path / "run/exports/out"
    assert json.loads((out / "list.json").read_text()) == ["a", "b", "c"]
    assert not list((tmp_path / "run/exports").glob(".*partial"))
    # rejects are not doubled by the second attempt
    m = json.loads((tmp_path / "run/stages/out/metrics.json").read_text())
    assert m["rows_rejected"] == 1


def test_restart_from_clears_the_export(tmp_path: Path) -> None:
    run(load_dag(_dag(tmp_path)), progress=False)
    (tmp_path / "run/exports/out/stale.txt").write_text("x")
    run(load_dag(_dag(tmp_path)), progress=False, restart="out")
    assert not (tmp_path / "run/exports/out/stale.txt").exists()
    assert (tmp_path / "run/exports/out/list.json").exists()


def test_status_and_plan_show_sinks(tmp_path: Path) -> None:
    from speechmill.pipeline.report import status_rows

    run(load_dag(_dag(tmp_path)), progress=False)
    _, rows = status_rows(str(tmp_path / "run"))
    out = {r["stage"]: r for r in rows}["out"]
    assert (out["state"], out["rows_out"], out["rows_rejected"]) == ("done", 2, 1)
    assert out["output_dir"].endswith("exports/out")
