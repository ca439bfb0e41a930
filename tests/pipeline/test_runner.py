"""Runner and run store: contract enforcement, resume, dedup, metrics (local executor)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from speechmill.pipeline import dag as dagmod
from speechmill.pipeline import registry
from speechmill.pipeline.errors import ConfigError, RunLockedError
from speechmill.pipeline.runner import run
from speechmill.pipeline.stage import Reject, Stage, StageConfig
from speechmill.pipeline.store import RunStore


class NumbersConfig(StageConfig):
    n: int = 10


class Numbers(Stage):
    """Source: rows 0..n-1, duration = i seconds; ids deliberately collide for dedup."""

    name = "t_numbers"
    Config = NumbersConfig
    is_source = True
    unique_output_ids = True

    def plan(self) -> pa.Table:
        n = self.config.n  # type: ignore[attr-defined]
        return pa.table({"id": [f"in{i:03d}" for i in range(n)],
                         "source_url": [f"mem://{i:03d}" for i in range(n)]})

    def process_row(self, row: dict[str, Any]) -> dict[str, Any]:
        i = int(row["id"][2:])
        # 5 and 7 have the same "content" as 3
        cid = "c003" if i in (3, 5, 7) else f"c{i:03d}"
        return {"id": cid, "source_url": row["source_url"], "duration": float(i),
                "audio_path": row["source_url"]}


class PickyConfig(StageConfig):
    explode_on: int = -1
    drop: int = -1


class Picky(Stage):
    """Rejects odd durations, raises on one row, silently drops another."""

    name = "t_picky"
    Config = PickyConfig

    def process(self, batch: pa.Table):  # whole-batch processing, like a model stage
        from speechmill.pipeline.records import rejects_table
        from speechmill.pipeline.stage import StageResult

        outs, rejs = [], []
        for row in batch.to_pylist():
            d = int(row["duration"])
            if d == self.config.explode_on:  # type: ignore[attr-defined]
                raise RuntimeError("model blew up")
            if d == self.config.drop:  # type: ignore[attr-defined]
                continue
            if d % 2:
                rejs.append(self.reject_row(row, "odd", f"duration {d}"))
            else:
                outs.append({**row, "parent_id": row["id"], "text": f"even {d}"})
        return StageResult(self.outputs_table(outs), rejects_table(rejs))


class Splitter(Stage):
    name = "t_split"
    Config = StageConfig

    def process_row(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        if row["duration"] == 4.0:
            raise Reject("four", "no fours")
        return [{**row, "id": f"{row['id']}-{k}", "duration": row["duration"] / 2}
                for k in range(2)]


for _cls in (Numbers, Picky, Splitter):
    registry.register(_cls)


def make_dag(run_dir: Path, n: int = 10, explode: int = -1, drop: int = -1, batch: int = 3):
    return dagmod.loads(f"""
name: unit
run_dir: {run_dir}
executor: {{type: local}}
stages:
  - {{id: nums, uses: t_numbers, batch_size: {batch}, with: {{n: {n}}}}}
  - {{id: picky, uses: t_picky, needs: nums, batch_size: {batch},
      with: {{explode_on: {explode}, drop: {drop}}}}}
  - {{id: split, uses: t_split, needs: picky, batch_size: {batch}}}
""")


def ids(store: RunStore, sid: str) -> list[str]:
    return sorted(store.read_outputs(sid, ["id"]).column("id").to_pylist())


def test_contract_rejects_errors_and_drops(tmp_path: Path) -> None:
    res = run(make_dag(tmp_path, explode=6, drop=8), progress=False)
    assert res.status == "succeeded"
    store = RunStore(tmp_path)
    # nums: 10 in, 8 unique contents out, 2 duplicates of c003 rejected (5 and 7 lose to 3)
    assert ids(store, "nums") == sorted({f"c{i:03d}" for i in range(10)} - {"c005", "c007"})
    rej = store.read_rejects("nums").to_pylist()
    assert sorted(r["id"] for r in rej) == ["in005", "in007"]
    assert all(r["reason"] == "duplicate" and "mem://003" in r["detail"] for r in rej)
    # picky: even kept; odd -> 'odd'; 6 raised -> only that row is 'error'; 8 -> no_output
    reasons = {r["id"]: r["reason"] for r in store.read_rejects("picky").to_pylist()}
    assert reasons == {"c001": "odd", "c003": "odd", "c009": "odd",
                       "c006": "error", "c008": "no_output"}
    assert ids(store, "picky") == ["c000", "c002", "c004"]
    assert ids(store, "split") == ["c000-0", "c000-1", "c002-0", "c002-1"]
    assert {r["reason"] for r in store.read_rejects("split").to_pylist()} == {"four"}
    m = json.loads((tmp_path / "stages/picky/metrics.json").read_text())
    assert (m["rows_in"], m["rows_out"], m["rows_rejected"]) == (8, 3, 5)
    assert m["reasons"] == {"error": 1, "no_output": 1, "odd": 3}
    assert m["audio_hours_in"] == pytest.approx(sum([0, 1, 2, 3, 4, 6, 8, 9]) / 3600)
    assert m["audio_hours_out"] == pytest.approx(6 / 3600)
    for sid in ("nums", "picky", "split"):
        assert (tmp_path / "stages" / sid / "_SUCCESS").exists()
    run_json = json.loads((tmp_path / "run.json").read_text())
    assert run_json["status"] == "succeeded" and run_json["attempt"] == 1
    assert (tmp_path / "dag.yaml").exists()


def test_every_input_accounted_for(tmp_path: Path) -> None:
    run(make_dag(tmp_path, n=23, explode=2, drop=4, batch=4), progress=False)
    store = RunStore(tmp_path)
    for up, sid in (("nums", "picky"), ("picky", "split")):
        inputs = set(store.read_outputs(up, ["id"]).column("id").to_pylist())
        parents = set(store.read_outputs(sid, ["parent_id"]).column("parent_id").to_pylist())
        rejected = store.read_rejects(sid, ["id"]).column("id").to_pylist()
        assert len(rejected) == len(set(rejected))
        assert parents | set(rejected) == inputs
        assert not parents & set(rejected)


def test_resume_skips_consumed_and_rerun_does_nothing(tmp_path: Path) -> None:
    dag = make_dag(tmp_path)
    store = RunStore(tmp_path)
    run(dag, progress=False)
    want = {s: ids(store, s) for s in ("nums", "picky", "split")}
    # simulate a crash in 'picky': drop its marker and half its part files
    parts = store.output_parts("picky")
    for p in parts[: len(parts) // 2 + 1]:
        p.unlink()
    for sid in ("picky", "split"):
        (tmp_path / "stages" / sid / "_SUCCESS").unlink()
    import shutil

    shutil.rmtree(tmp_path / "stages" / "split")
    before = {p.name: p.stat().st_mtime_ns for p in store.output_parts("picky")}
    res = run(dag, progress=False)
    assert {s["stage"]: s["state"] for s in res.stages} == {
        "nums": "done earlier", "picky": "done", "split": "done"}
    assert {s: ids(store, s) for s in want} == want
    # kept parts were not rewritten
    after = {p.name: p.stat().st_mtime_ns for p in store.output_parts("picky")}
    assert all(after[k] == v for k, v in before.items())
    # a finished run: rerun does no work
    snap = {p: p.stat().st_mtime_ns for p in (tmp_path / "stages").rglob("part-*.parquet")}
    res = run(dag, progress=False)
    assert all(s["state"] == "done earlier" for s in res.stages)
    assert snap == {p: p.stat().st_mtime_ns
                    for p in (tmp_path / "stages").rglob("part-*.parquet")}
    assert json.loads((tmp_path / "run.json").read_text())["attempt"] == 3


def test_changed_config_fails_fast_and_restart_from(tmp_path: Path) -> None:
    run(make_dag(tmp_path), progress=False)
    changed = make_dag(tmp_path, drop=2)
    with pytest.raises(ConfigError, match=r"stage 'picky'.*config changed"):
        run(changed, progress=False)
    res = run(changed, progress=False, restart="picky")
    states = {s["stage"]: s["state"] for s in res.stages}
    assert states == {"nums": "done earlier", "picky": "done", "split": "done"}
    reasons = {r["id"]: r["reason"] for r in RunStore(tmp_path).read_rejects("picky").to_pylist()}
    assert reasons["c002"] == "no_output"


def test_run_dir_of_the_old_fingerprint_formula_resumes(tmp_path: Path) -> None:
    dag = make_dag(tmp_path)
    run(dag, progress=False)
    store = RunStore(tmp_path)
    for st in dag.stages:  # as speechmill 0.1 wrote them
        store.write_fingerprint(st.id, st.legacy_fingerprint)
    res = run(make_dag(tmp_path), progress=False)
    assert all(s["state"] == "done earlier" for s in res.stages)
    assert all(store.read_fingerprint(st.id) == st.fingerprint for st in dag.stages)
    with pytest.raises(ConfigError, match=r"stage 'picky'.*config changed"):
        run(make_dag(tmp_path, drop=2), progress=False)


def test_second_live_run_is_refused(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    with store.lock(), pytest.raises(RunLockedError):
        run(make_dag(tmp_path), progress=False)
    # a stale lock from a dead process is taken over
    import socket

    (tmp_path / "run.lock").write_text(
        json.dumps({"pid": 2**22 + 12345, "host": socket.gethostname()}))
    assert run(make_dag(tmp_path), progress=False).status == "succeeded"


def test_lock_is_released_by_a_killed_holder_and_never_shared(tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys

    code = ("import sys, time\nfrom speechmill.pipeline.store import RunStore\n"
            "with RunStore(sys.argv[1]).lock():\n    print('held', flush=True)\n"
            "    time.sleep(60)\n")
    p = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)],
                         stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None and p.stdout.readline().strip() == "held"
        with pytest.raises(RunLockedError, match=f"pid {p.pid}"), RunStore(tmp_path).lock():
            pass
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    # the holder died without cleaning up: its file is still there, its lock is not
    assert (tmp_path / "run.lock").exists()
    # one holder at a time, even in one process
    with RunStore(tmp_path).lock(), pytest.raises(RunLockedError), RunStore(tmp_path).lock():
        pass
    assert not (tmp_path / "run.lock").exists()
