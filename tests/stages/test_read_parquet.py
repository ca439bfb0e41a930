"""``read_parquet``: the plan holds ids and row numbers only; workers read the rows by
row group, with every column and type as the file has it."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from speechmill.pipeline.dag import load as load_dag
from speechmill.pipeline.runner import run
from speechmill.pipeline.store import RunStore


def _dag(tmp_path: Path, paths: list[str], extra: str = "", executor: str = "local") -> Path:
    p = tmp_path / "dag.yaml"
    p.write_text(f"""
name: rp
run_dir: {tmp_path / 'run'}
executor: {{type: {executor}, progress: false}}
stages:
  - id: src
    uses: read_parquet
    batch_size: 7
    with: {{paths: {json.dumps(paths)}{extra}}}
""")
    return p


def _rows(n: int, start: int = 0) -> pa.Table:
    return pa.table({
        "id": [f"r{i:04d}" for i in range(start, start + n)],
        "audio_path": [f"audio/{i}.flac" for i in range(start, start + n)],
        "duration": pa.array([1.0 + i / 10 for i in range(start, start + n)], pa.float32()),
        "words": [[{"word": f"w{i}", "start": 0.0, "end": 0.5}] for i in range(n)],
        "tag": pa.array([f"t{i % 3}" for i in range(n)]).dictionary_encode(),
    })


@pytest.mark.parametrize("executor", ["local", "ray"])
def test_rows_come_back_whole_in_order_from_many_row_groups(tmp_path: Path,
                                                            executor: str) -> None:
    a, b = tmp_path / "a.parquet", tmp_path / "sub" / "b.parquet"
    b.parent.mkdir()
    pq.write_table(_rows(50), a, row_group_size=8)
    # b repeats r0045..r0049 (the first copy, from a, wins) and adds r0050..r0069
    pq.write_table(_rows(25, start=45), b, row_group_size=6)
    res = run(load_dag(_dag(tmp_path, [str(a), str(b)], executor=executor)), progress=False)
    assert res.status == "succeeded"
    store = RunStore(tmp_path / "run")
    plan = pq.read_table(tmp_path / "run/stages/src/_plan.parquet")
    assert plan.column_names == ["id", "_file", "_row"] and plan.num_rows == 75
    out = store.read_outputs("src")
    got = {r["id"]: r for r in out.to_pylist()}
    assert len(got) == out.num_rows == 70
    want = {r["id"]: r for r in _rows(50).to_pylist()}
    want.update({r["id"]: r for r in _rows(25, start=45).to_pylist()[5:]})
    for rid, r in want.items():
        g = got[rid]
        assert g["parent_id"] == rid
        assert {k: g[k] for k in ("audio_path", "tag")} == {k: r[k] for k in ("audio_path", "tag")}
        assert [{k: w[k] for k in ("word", "start", "end")} for w in g["words"]] == r["words"]
        assert g["duration"] == pytest.approx(r["duration"])
    assert pa.types.is_dictionary(out.schema.field("tag").type)  # as the file has it
    m = json.loads((tmp_path / "run/stages/src/metrics.json").read_text())
    assert (m["rows_in"], m["rows_out"]) == (75, 70)


def test_columns_relative_paths_and_a_file_gone_after_planning(tmp_path: Path) -> None:
    a, b = tmp_path / "x" / "a.parquet", tmp_path / "b.parquet"
    a.parent.mkdir()
    pq.write_table(_rows(10), a, row_group_size=4)
    pq.write_table(_rows(5, start=10), b)
    extra = ', columns: ["audio_path"], paths_relative_to: file'
    dag = _dag(tmp_path, [str(a), str(b)], extra)
    from speechmill.pipeline import stage_input as runner

    # plan, then lose b before its rows are read: they become rejects, the run goes on
    real = runner.stage_inputs

    def plan_then_delete(*args, **kw):
        t = real(*args, **kw)
        b.unlink(missing_ok=True)
        return t

    runner.stage_inputs = plan_then_delete
    try:
        res = run(load_dag(dag), progress=False)
    finally:
        runner.stage_inputs = real
    assert res.status == "succeeded"
    store = RunStore(tmp_path / "run")
    out = store.read_outputs("src")
    assert sorted(out.column_names) == ["audio_path", "id", "parent_id"]
    assert sorted(out.column("audio_path").to_pylist()) == sorted(
        str(a.parent / f"audio/{i}.flac") for i in range(10))
    rej = store.read_rejects("src").to_pylist()
    assert sorted(r["id"] for r in rej) == [f"r{i:04d}" for i in range(10, 15)]
    assert {r["reason"] for r in rej} == {"unreadable"}


def test_hostile_rows_are_rejects_and_hostile_files_config_errors(tmp_path: Path) -> None:
    """Issue 21: a null id, a value that does not convert, a string that is not UTF-8 cost
    their row; a file that is not Parquet, an id of lists, files that disagree on a
    column's type fail the plan naming the stage and the key."""
    from speechmill.pipeline.errors import ConfigError

    text = pa.array([b"ok", b"bad \xff", b"ok", b"ok", b"ok"], pa.binary()).view(pa.string())
    a = tmp_path / "a.parquet"
    pq.write_table(pa.table({
        "id": ["r0", "r1", None, "r3", "r4"], "text": text,
        "duration": ["1.5", "2", "3", "abc", "1e400"],
    }), a, row_group_size=2)
    res = run(load_dag(_dag(tmp_path, [str(a)])), progress=False)
    assert res.status == "succeeded"
    store = RunStore(tmp_path / "run")
    out = store.read_outputs("src")
    assert out.column("id").to_pylist() == ["r0"] and out.schema.field("duration").type == (
        pa.float64())
    rej = sorted((r["id"], r["reason"], r["detail"]) for r in store.read_rejects("src").to_pylist())
    assert [(r[0], r[1]) for r in rej if r[0] in ("r1", "r3", "r4")] == [
        ("r1", "malformed"), ("r3", "malformed"), ("r4", "malformed")]
    missing = [r for r in rej if r[1] == "missing_id"]
    assert len(missing) == 1 and "row 2: 'id' is null" in missing[0][2]

    bad = tmp_path / "notes.parquet"
    bad.write_bytes(b"PAR1 this is not parquet PAR1")
    lists = tmp_path / "lists.parquet"
    pq.write_table(pa.table({"id": [[1], [2]]}), lists)
    t1, t2 = tmp_path / "t1.parquet", tmp_path / "t2.parquet"
    pq.write_table(pa.table({"id": ["x"], "tag": [1]}), t1)
    pq.write_table(pa.table({"id": ["y"], "tag": ["one"]}), t2)
    for k, (paths, says) in enumerate([
            ([bad], "cannot be read as Parquet"), ([lists], "column 'id' is list"),
            ([t1, t2], "column 'tag' is int64 in")]):
        (tmp_path / "run").rename(tmp_path / f"run.{k}")
        with pytest.raises(ConfigError, match=f"stage 'src'.*key 'paths'.*{says}"):
            run(load_dag(_dag(tmp_path, [str(p) for p in paths])), progress=False)
