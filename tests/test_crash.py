"""SIGKILL mid-stage, rerun: same outputs as an uninterrupted run, no duplicates, no loss."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from speechmill.pipeline.store import RunStore
from testkit.audio import load_speech
from tests.conftest import cli_env, dag_yaml

N_FILES = 14


@pytest.fixture(scope="module")
def crash_inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("crash_in")
    for i in range(N_FILES):
        x = load_speech(40.0, 44100, seed=100 + i) * (0.3 + 0.03 * i)
        sf.write(d / f"ep{i:02d}.flac", np.stack([x, x * 0.8], 1), 44100)
    (d / "broken.mp3").write_text("<html>503 Service Unavailable</html>")
    return d


def _cmd(dag: Path, executor: str) -> list[str]:
    return [sys.executable, "-m", "speechmill.pipeline.cli", "run", str(dag),
            "--executor", executor, "--no-progress"]


def _snapshot(run_dir: Path) -> dict[str, list[tuple]]:
    """Every stage's outputs and rejects, made comparable across run directories."""
    store = RunStore(run_dir)
    snap: dict[str, list[tuple]] = {}
    for sid in ("ingest", "standardize"):
        rows = []
        for r in store.read_outputs(sid).to_pylist():
            audio = r["audio_path"]
            if audio.startswith(str(run_dir)):  # media written by the run: compare samples
                x, sr = sf.read(audio, dtype="int16")
                audio = (sr, hashlib.sha256(x.tobytes()).hexdigest())
            rows.append((r["id"], r["parent_id"], r["source_url"], audio,
                         round(r["duration"], 6)))
        snap[sid] = sorted(rows)
        snap[sid + "/rejects"] = sorted(
            (r["id"], r["reason"], r["source_url"]) for r in store.read_rejects(sid).to_pylist()
        )
    return snap


@pytest.mark.parametrize("executor", ["local", "ray"])
def test_sigkill_mid_stage_then_resume(crash_inputs: Path, tmp_path: Path,
                                       executor: str) -> None:
    ref_dir, crash_dir = tmp_path / "ref", tmp_path / "crash"
    (tmp_path / "ref.yaml").write_text(dag_yaml(crash_inputs, ref_dir, executor, batch=1))
    (tmp_path / "crash.yaml").write_text(dag_yaml(crash_inputs, crash_dir, executor, batch=1))

    r = subprocess.run(_cmd(tmp_path / "ref.yaml", executor), capture_output=True, text=True,
                       timeout=600, env=cli_env())
    assert r.returncode == 0, r.stdout + r.stderr
    want = _snapshot(ref_dir)
    assert len(want["standardize"]) == N_FILES and len(want["ingest/rejects"]) == 1

    proc = subprocess.Popen(_cmd(tmp_path / "crash.yaml", executor), env=cli_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    std_dir = crash_dir / "stages" / "standardize"
    deadline = time.monotonic() + 300
    killed_at = -1
    while time.monotonic() < deadline and proc.poll() is None:
        n = len(list(std_dir.glob("part-*.parquet"))) if std_dir.exists() else 0
        if n >= 3:
            os.kill(proc.pid, signal.SIGKILL)  # the driver only: no clean-up of any kind
            killed_at = n
            break
        time.sleep(0.005)
    proc.wait(timeout=60)
    if executor == "ray":  # reap whatever the killed driver left behind
        os.killpg(proc.pid, signal.SIGKILL) if _group_alive(proc.pid) else None
    assert killed_at >= 3, "the run finished before it could be killed"
    assert not (std_dir / "_SUCCESS").exists(), "killed after the stage had finished"
    assert len(list(std_dir.glob("part-*.parquet"))) < N_FILES

    r = subprocess.run(_cmd(tmp_path / "crash.yaml", executor), capture_output=True,
                       text=True, timeout=600, env=cli_env())
    assert r.returncode == 0, r.stdout + r.stderr
    assert "resuming" in r.stdout
    got = _snapshot(crash_dir)
    assert got == want
    ids = [row[0] for row in got["standardize"]]
    assert len(ids) == len(set(ids)) == N_FILES
    # no temporary files survive
    assert not list(crash_dir.rglob("*.tmp"))

    # a finished run: the rerun does no work
    parts = {p: p.stat().st_mtime_ns for p in crash_dir.rglob("part-*.parquet")}
    r = subprocess.run(_cmd(tmp_path / "crash.yaml", executor), capture_output=True,
                       text=True, timeout=600, env=cli_env())
    assert r.returncode == 0 and "done earlier" in r.stdout
    assert parts == {p: p.stat().st_mtime_ns for p in crash_dir.rglob("part-*.parquet")}


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True
