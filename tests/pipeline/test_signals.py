"""SIGTERM / SIGINT stop a real `speechmill run` process gracefully: workers stopped,
committed batches kept, run.json `interrupted`, exit 130; a second signal exits at once;
a rerun resumes and completes with nothing duplicated."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from speechmill.pipeline.store import RunStore
from tests.conftest import cli_env
from tests.pipeline.fault_stages import write_faults

ROOT = Path(__file__).resolve().parents[2]
N = 30


def _dag(tmp_path: Path, executor: str) -> Path:
    dag = tmp_path / "dag.yaml"
    dag.write_text(f"""
name: signals
run_dir: {tmp_path / 'run'}
executor: {{type: {executor}, stall_timeout_s: 300, num_cpus: 2}}
stages:
  - {{id: src, uses: t_rows, batch_size: 8, with: {{n: {N}}}}}
  - {{id: slow, uses: t_faulty_model, needs: [src], batch_size: 1,
      with: {{faults: "{tmp_path / 'faults.json'}"}}}}
""")
    return dag


def _start(dag: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.pipeline.fault_stages", "run", str(dag), "--no-progress"],
        cwd=ROOT, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True)


def _count_parts(stage_dir: Path) -> int:
    return len(list(stage_dir.glob("part-*.parquet"))) if stage_dir.exists() else 0


def _wait_for_parts(proc: subprocess.Popen[str], stage_dir: Path, n: int) -> None:
    """Until this run committed ``n`` more parts (a resumed run starts with some)."""
    n += _count_parts(stage_dir)
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline and proc.poll() is None:
        if _count_parts(stage_dir) >= n:
            return
        time.sleep(0.02)
    out = proc.communicate(timeout=60)[0] if proc.poll() is not None else ""
    pytest.fail(f"no {n} committed parts before the run ended or timed out:\n{out}")


def _interrupt(proc: subprocess.Popen[str], sig: int, run_dir: Path) -> tuple[str, float]:
    """Send ``sig`` once some batches are committed; (output, seconds to exit)."""
    _wait_for_parts(proc, run_dir / "stages" / "slow", 2)
    os.kill(proc.pid, sig)
    t0 = time.monotonic()
    out = proc.communicate(timeout=300)[0]
    return out, time.monotonic() - t0


def _reap(proc: subprocess.Popen[str]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # whatever the driver left behind


def _check_interrupted(run_dir: Path, out: str, rc: int, name: str) -> set[str]:
    assert rc == 130, out
    assert f"interrupted by {name}" in out and "rerun the same command to resume" in out
    info: dict[str, Any] = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "interrupted" and name in info["error"], info
    store = RunStore(run_dir)
    assert not (run_dir / "stages/slow/_SUCCESS").exists()
    done = set(store.read_outputs("slow", ["id"]).column("id").to_pylist())
    assert 2 <= len(done) < N
    return done


def _rerun_completes(dag: Path, run_dir: Path, kept: set[str], *args: str) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "tests.pipeline.fault_stages", "run", str(dag), "--no-progress",
         *args],
        cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "resuming" in r.stdout
    ids = RunStore(run_dir).read_outputs("slow", ["id"]).column("id").to_pylist()
    assert sorted(ids) == [f"r{i:03d}" for i in range(N)]  # each exactly once
    assert kept <= set(ids)
    assert json.loads((run_dir / "run.json").read_text())["status"] == "succeeded"


@pytest.mark.ray
def test_sigterm_and_sigint_stop_a_ray_run_and_it_resumes(tmp_path: Path) -> None:
    dag, run_dir = _dag(tmp_path, "ray"), tmp_path / "run"
    write_faults(tmp_path / "faults.json", {"slow": {"slow_s": 0.3}})
    kept: set[str] = set()
    for sig, name in ((signal.SIGTERM, "SIGTERM"), (signal.SIGINT, "SIGINT")):
        proc = _start(dag)
        try:
            out, _ = _interrupt(proc, sig, run_dir)
        finally:
            _reap(proc)
        done = _check_interrupted(run_dir, out, proc.returncode, name)
        assert kept < done  # the second attempt resumed and committed more
        kept = done
    write_faults(tmp_path / "faults.json", {})
    # the executor is not part of a run's identity: finish it in-process (one Ray start
    # fewer for this test)
    _rerun_completes(dag, run_dir, kept, "--executor", "local")


def test_second_signal_exits_at_once(tmp_path: Path) -> None:
    """The first SIGINT starts the clean-up (here a teardown that would take a minute);
    a second signal (SIGTERM) exits at once, still 130 and `interrupted`."""
    dag, run_dir = _dag(tmp_path, "local"), tmp_path / "run"
    write_faults(tmp_path / "faults.json", {"slow": {"slow_s": 0.2, "teardown_s": 60}})
    proc = _start(dag)
    try:
        _wait_for_parts(proc, run_dir / "stages" / "slow", 3)
        os.kill(proc.pid, signal.SIGINT)
        time.sleep(1.0)  # in the slow teardown now
        assert proc.poll() is None
        os.kill(proc.pid, signal.SIGTERM)
        t0 = time.monotonic()
        out = proc.communicate(timeout=50)[0]  # well before the teardown would end
        waited = time.monotonic() - t0
    finally:
        _reap(proc)
    assert waited < 30, waited
    assert "interrupted by SIGTERM (a second signal): exiting now" in out
    kept = _check_interrupted(run_dir, out, proc.returncode, "SIGTERM")
    write_faults(tmp_path / "faults.json", {})
    _rerun_completes(dag, run_dir, kept)
