"""The demo exactly as `make demo` runs it (CLI, dags/demo.yaml, Ray, offline): every
stage succeeds, the bad demo files end as rejects, and it ends with exports that load in
their libraries, tokenized shards and a report. (`make demo` then synthesizes a few
dialogues with ``dags/voice_assistant.yaml`` over this run's speakers; that DAG runs end to
end, as shipped, in ``tests/synth/test_voice_assistant_dag.py``.)"""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest

from testkit.conversations import espeak_available
from tests.conftest import cli_env

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.ray
def test_demo_dag_end_to_end(tmp_path: Path) -> None:
    env = {**cli_env(), "SPEECHMILL_DEMO_INPUT": str(tmp_path / "in"),
           "SPEECHMILL_RUN_DIR": str(tmp_path / "run")}
    exe = [sys.executable, "-m", "speechmill.pipeline.cli"]
    subprocess.run([*exe, "demo-data", str(tmp_path / "in")], check=True, env=env, cwd=ROOT,
                   capture_output=True, timeout=300)
    p = subprocess.run([*exe, "run", "dags/demo.yaml", "--offline", "--no-progress"],
                       env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    run = tmp_path / "run"
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "succeeded"
    m = {d.name: json.loads((d / "metrics.json").read_text())
         for d in (run / "stages").iterdir()}
    assert m["ingest"]["reasons"] == {"duplicate": 1, "empty_file": 1, "not_audio": 1}
    assert m["standardize"]["reasons"] == {"nonfinite_samples": 1}
    kept = m["filter"]["rows_out"]
    assert kept >= 8
    for sink in ("nemo", "nemo_tarred", "lhotse", "parquet", "shards", "shar", "report"):
        assert m[sink]["rows_rejected"] == 0, sink
    assert m["shards"]["rows_out"] == kept

    splits = sorted(d.name for d in (run / "exports/nemo").iterdir())
    assert splits == (["dev", "test", "train"] if espeak_available() else ["train"])
    # NeMo: every entry's audio exists (relative to the manifest) and has text
    n = 0
    for s in splits:
        d = run / "exports/nemo" / s
        for line in (d / "manifest.json").read_text().splitlines():
            e = json.loads(line)
            assert (d / e["audio_filepath"]).exists() and e["text"] and e["duration"] > 0
            n += 1
    assert n == kept
    # Lhotse loads and validates
    from lhotse import load_manifest
    from lhotse.qa import validate_recordings_and_supervisions

    d = run / "exports/lhotse" / splits[-1]
    validate_recordings_and_supervisions(load_manifest(d / "recordings.jsonl.gz"),
                                         load_manifest(d / "supervisions.jsonl.gz"))
    # Shar with token fields
    from lhotse import CutSet

    cuts = list(CutSet.from_shar(in_dir=run / "exports/shar" / splits[-1]))
    assert cuts and cuts[0].load_codes().shape[0] == 1 and len(cuts[0].load_text_ids())
    # tokenized shards: k-means units + whisper text ids
    index = json.loads((run / "shards/shards/index.json").read_text())
    assert index["codec"]["name"] == "kmeans-mel" and index["layout"]["name"] == "speechgpt"
    assert index["totals"]["rows"] == kept and index["totals"]["text_tokens"] > 0
    assert (run / "models/tokenize/codebook.npy").exists()
    # report
    rep = json.loads((run / "report/report/report.json").read_text())
    assert rep["totals"]["rows"] == kept and rep["dataset"]["stage"] == "split"
    assert (run / "report/report/index.html").stat().st_size > 10_000
    with gzip.open(run / "exports/lhotse" / splits[-1] / "cuts.jsonl.gz", "rt") as f:
        assert json.loads(f.readline())["type"] == "MonoCut"
    assert "exports" in p.stdout  # the summary says where the exports are
