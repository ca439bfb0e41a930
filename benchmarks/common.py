"""Shared helpers of the benchmark scripts: build a small DAG, run it timed."""

from __future__ import annotations

import io
import json
import shutil
import time
from pathlib import Path
from typing import Any


def dag_yaml(name: str, run_dir: Path, stages: list[dict[str, Any]], executor: str,
             num_cpus: int | None = None) -> str:
    """A DAG named ``name`` with ``stages`` (dicts as in a DAG file), no progress bars."""
    import yaml

    ex: dict[str, Any] = {"type": executor, "progress": False}
    if num_cpus:
        ex["num_cpus"] = num_cpus
    return yaml.safe_dump({"name": name, "run_dir": str(run_dir), "executor": ex,
                           "stages": stages}, sort_keys=False)


def ingest_then(stage: dict[str, Any], input_dir: Path,
                batch_size: int | None = None) -> list[dict[str, Any]]:
    """``ingest`` of ``input_dir`` followed by ``stage`` (which needs it)."""
    st = {**stage, "needs": ["ingest"]}
    if batch_size:
        st["batch_size"] = batch_size
    return [{"id": "ingest", "uses": "ingest", "with": {"inputs": [str(input_dir)]}}, st]


def run_timed(text: str, run_dir: Path, executor: str, stage_ids: list[str],
              verbose: bool = False) -> dict[str, Any]:
    """Run the DAG ``text`` into a fresh ``run_dir``; wall time, status, per-stage metrics."""
    from rich.console import Console

    from speechmill.pipeline import dag as dagmod
    from speechmill.pipeline import runner

    shutil.rmtree(run_dir, ignore_errors=True)
    console = Console() if verbose else Console(file=io.StringIO())
    t0 = time.perf_counter()
    dag = dagmod.loads(text)
    result = runner.run(dag, executor=executor, progress=False, console=console)
    wall = time.perf_counter() - t0
    metrics = {sid: json.loads((run_dir / "stages" / sid / "metrics.json").read_text())
               for sid in stage_ids}
    run_info = json.loads((run_dir / "run.json").read_text())
    return {"wall_seconds": wall, "status": result.status, "metrics": metrics,
            "executor": run_info.get("executor", executor), "run_dir": str(run_dir),
            "dag": dag}


INPUTS_MANIFEST = "_inputs.json"


def reuse_inputs(input_dir: Path, want: dict[str, Any], paths: list[Path],
                 what: str) -> bool:
    """True when ``input_dir`` already holds exactly the set ``want`` describes;
    otherwise empty it (ingest walks the whole folder) so the caller writes it anew and
    then calls :func:`mark_inputs`."""
    manifest = input_dir / INPUTS_MANIFEST
    if manifest.exists() and all(p.exists() for p in paths):
        try:
            if json.loads(manifest.read_text()) == want:
                print(f"{what}: reusing {len(paths)} files in {input_dir}")
                return True
        except (OSError, ValueError):
            pass
    shutil.rmtree(input_dir, ignore_errors=True)
    input_dir.mkdir(parents=True)
    return False


def mark_inputs(input_dir: Path, want: dict[str, Any]) -> None:
    (input_dir / INPUTS_MANIFEST).write_text(json.dumps(want, indent=1))


def durations(paths: list[Path]) -> list[float]:
    import soundfile as sf

    return [float(sf.info(str(p)).duration) for p in paths]
