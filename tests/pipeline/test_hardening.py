"""Regression tests: secrets, overrides, env typing, FIFOs, BOM lists, watchdog, contract."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from speechmill.pipeline import dag as dagmod
from speechmill.pipeline import registry
from speechmill.pipeline.errors import StallError
from speechmill.pipeline.runner import run
from speechmill.pipeline.runner import safe_argv as _safe_argv
from speechmill.pipeline.stage import Stage, StageConfig, StageContext, StageResult
from speechmill.pipeline.store import RunStore
from speechmill.stages.ingest import Ingest, IngestConfig

BASE = """
name: h
run_dir: {run_dir}
executor: {{type: local, stall_timeout_s: 1}}
stages:
  - id: ingest
    uses: ingest
    with:
      inputs: ["{inp}"]
      storage_options: {{key: AKIAXXXX, secret: s3cr3t-value, token: {{type: sa, private_key: PEM}}}}
  - id: std
    uses: standardize
    needs: [ingest]
    with:
"""


def test_secret_subtrees_and_storage_keys_redacted(tmp_path: Path) -> None:
    d = dagmod.loads(BASE.format(run_dir=tmp_path, inp=tmp_path))
    out = d.resolved_yaml()
    for s in ("AKIAXXXX", "s3cr3t-value", "PEM"):
        assert s not in out
    argv = ["speechmill", "run", "x.yaml", "--set", "ingest.storage_options.password=hunter2",
            "--set=ingest.storage_options.key=AKIA2", "--set", "std.sample_rate=16000"]
    safe = _safe_argv(d, argv)
    assert "hunter2" not in " ".join(safe) and "AKIA2" not in " ".join(safe)
    assert "std.sample_rate=16000" in safe


def test_rotating_credentials_keep_fingerprint(tmp_path: Path) -> None:
    a = dagmod.loads(BASE.format(run_dir=tmp_path, inp=tmp_path))
    b = dagmod.loads(BASE.format(run_dir=tmp_path, inp=tmp_path).replace("s3cr3t", "rotated"))
    assert a.stage("ingest").fingerprint == b.stage("ingest").fingerprint


def test_set_into_empty_with_and_env_strings(tmp_path: Path) -> None:
    d = dagmod.loads(BASE.format(run_dir=tmp_path, inp=tmp_path),
                     overrides=["std.sample_rate=16000"])
    assert d.stage("std").config.sample_rate == 16000  # type: ignore[attr-defined]
    text = BASE.format(run_dir=tmp_path, inp="${IN}")
    d = dagmod.loads(text, env={"IN": "0777"})
    assert d.stage("ingest").config.inputs == ["0777"]  # type: ignore[attr-defined]


def test_fifo_is_a_reject_not_a_hang(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe.wav")
    st = Ingest(IngestConfig(inputs=[str(tmp_path)]), StageContext("ingest", str(tmp_path)))
    res = st.process(st.plan())
    assert [r["reason"] for r in res.rejects.to_pylist()] == ["unreadable"]
    assert "not a regular file" in res.rejects.to_pylist()[0]["detail"]


def test_csv_list_with_bom(tmp_path: Path, media_dir) -> None:
    d, _, _ = media_dir
    lst = tmp_path / "l.csv"
    lst.write_text(f"path,speaker\n{d / 'good' / 'speech.wav'},s1\n", encoding="utf-8-sig")
    rows = Ingest(IngestConfig(file_list=str(lst)), StageContext("i", str(tmp_path))).plan()
    assert rows.column("speaker").to_pylist() == ["s1"]


class SleepyConfig(StageConfig):
    n: int = 3


class Sleepy(Stage):
    name = "t_sleepy"
    Config = SleepyConfig
    is_source = True

    def plan(self) -> pa.Table:
        return pa.table({"id": [f"r{i}" for i in range(self.config.n)]})  # type: ignore[attr-defined]

    def process_row(self, row: dict[str, Any]) -> dict[str, Any]:
        if row["id"] == "r1":
            time.sleep(4)  # stands in for a hung decoder / deadlocked worker
        return {"id": row["id"]}


class Orphans(Stage):
    name = "t_orphans"
    Config = StageConfig
    is_source = True

    def plan(self) -> pa.Table:
        return pa.table({"id": ["a", "b"]})

    def process(self, batch: pa.Table) -> StageResult:
        from speechmill.pipeline.records import empty_rejects

        out = pa.table({"id": ["x", "y"], "parent_id": ["a", "zzz"]})
        return StageResult(out, empty_rejects())


registry.register(Sleepy)
registry.register(Orphans)


def test_watchdog_fails_a_stalled_stage_loudly(tmp_path: Path) -> None:
    d = dagmod.loads(f"""
name: stall
run_dir: {tmp_path}
executor: {{type: local, stall_timeout_s: 1}}
stages: [{{id: s, uses: t_sleepy, batch_size: 1}}]
""")
    with pytest.raises(StallError, match=r"stage 's': no batch finished for 1 s"):
        run(d, progress=False)
    info = json.loads((tmp_path / "run.json").read_text())
    assert info["status"] == "failed" and "StallError" in info["error"]
    # the batch finished before the stall is kept for the resume
    assert RunStore(tmp_path).consumed_ids("s") >= {"r0"}


def test_outputs_with_foreign_parent_are_dropped(tmp_path: Path) -> None:
    d = dagmod.loads(f"""
name: orph
run_dir: {tmp_path}
executor: {{type: local}}
stages: [{{id: o, uses: t_orphans, batch_size: 2}}]
""")
    run(d, progress=False)
    m = json.loads((tmp_path / "stages/o/metrics.json").read_text())
    assert (m["rows_in"], m["rows_out"], m["rows_rejected"]) == (2, 1, 1)
    assert m["reasons"] == {"no_output": 1}
