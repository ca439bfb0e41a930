"""A stage's behaviour version (``Stage.version``) is part of its resume fingerprint: a
run directory written by another version is not resumed silently; the message names the
stage and offers ``--restart-from``."""

from __future__ import annotations

from pathlib import Path

import pytest

from speechmill.pipeline import dag as dagmod
from speechmill.pipeline.errors import ConfigError
from speechmill.pipeline.runner import run
from speechmill.pipeline.store import RunStore
from tests.pipeline import fault_stages


def _yaml(run_dir: Path, down: bool = True) -> str:
    return f"""
name: versions
run_dir: {run_dir}
executor: {{type: local}}
stages:
  - {{id: src, uses: t_rows, with: {{n: 3}}}}
  - {{id: v, uses: t_versioned, needs: [src]}}
""" + ("  - {id: down, uses: t_faulty, needs: [v]}\n" if down else "")


def test_version_one_keeps_the_fingerprints_of_earlier_releases() -> None:
    """Version 1 adds nothing to the hash: run directories written before stages had
    versions (these values are what 0.2 computed for this DAG) stay resumable."""
    d = dagmod.loads(_yaml(Path("/tmp/unused"), down=False))
    assert fault_stages.Versioned.version == 1
    assert [(s.id, s.fingerprint, s.legacy_fingerprint) for s in d.stages] == [
        ("src", "29c47483ac3e002c", "fb4303fc95c6b786"),
        ("v", "cb5752923e1e0a1b", "e774af45a56472ed")]


def test_bumped_version_stops_the_resume_and_restart_from_redoes_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    run_dir = tmp_path / "run"
    first = dagmod.loads(_yaml(run_dir))
    assert run(first, progress=False).status == "succeeded"

    monkeypatch.setattr(fault_stages.Versioned, "version", 2)
    bumped = dagmod.loads(_yaml(run_dir))
    fps = {s.id: (a.fingerprint, s.fingerprint) for a, s in zip(first.stages, bumped.stages,
                                                                strict=True)}
    assert fps["src"][0] == fps["src"][1]  # upstream untouched
    assert fps["v"][0] != fps["v"][1] and fps["down"][0] != fps["down"][1]

    msg = (r"stage 'v': its behaviour version changed: '.*stages/v' was written by version 1 "
           r"of stage 't_versioned', this speechmill has version 2; rerun with "
           r"--restart-from v to redo it")
    with pytest.raises(ConfigError, match=msg):
        run(bumped, progress=False)
    # the command line: a configuration error (exit 2), nothing started
    dag_file = tmp_path / "dag.yaml"
    dag_file.write_text(_yaml(run_dir))
    from speechmill.pipeline.cli import main

    assert main(["run", str(dag_file), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "stage 'v': its behaviour version changed" in err and "--restart-from v" in err

    res = run(bumped, progress=False, restart="v")
    assert {s["stage"]: s["state"] for s in res.stages} == {
        "src": "done earlier", "v": "done", "down": "done"}
    texts = RunStore(run_dir).read_outputs("v", ["text"]).column("text").to_pylist()
    assert texts == ["v2"] * 3
    # back at the old version: the directory now holds version 2's outputs
    monkeypatch.setattr(fault_stages.Versioned, "version", 1)
    with pytest.raises(ConfigError, match="written by version 2 of stage 't_versioned', "
                                          "this speechmill has version 1"):
        run(dagmod.loads(_yaml(run_dir)), progress=False)
