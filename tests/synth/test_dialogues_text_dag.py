"""``dags/dialogues_text.yaml`` as shipped: the CLI runs it offline over the bundled
dialogue set (sft_import -> speech_rewrite rules); the malformed and unspeakable rows end
as the rejects the data was written to produce, the kept turns are plain spoken text,
and a rerun changes nothing."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from speechmill.pipeline.store import RunStore
from tests.conftest import cli_env

ROOT = Path(__file__).resolve().parents[2]


def _run(run_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "speechmill.pipeline.cli", "run", "dags/dialogues_text.yaml",
         "--offline", "--no-progress", "--run-dir", str(run_dir)],
        env=cli_env(), cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_dialogues_text_dag_runs_offline_as_shipped(tmp_path: Path) -> None:
    run = tmp_path / "run"
    p = _run(run)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    m = {d.name: json.loads((d / "metrics.json").read_text())
         for d in (run / "stages").iterdir()}
    # 45 bundled rows; the rejects are the rows written to be rejected
    assert m["import"]["rows_in"] == 45
    assert m["import"]["reasons"] == {"bad_roles": 2, "duplicate": 1, "empty_turn": 2,
                                      "malformed": 4, "qc_refusal": 1, "qc_repetition": 1}
    assert m["import"]["stage_summary"]["dialogues"] == 34
    assert m["rewrite"]["rows_in"] == m["import"]["rows_out"]
    assert m["rewrite"]["reasons"] == {"too_long_to_speak": 1, "unspeakable_code": 1,
                                       "unspeakable_math": 1, "unspeakable_table": 1}
    store = RunStore(run)
    out = store.read_outputs("rewrite").to_pylist()
    assert len(out) == m["rewrite"]["rows_out"] == m["rewrite"]["rows_in"] - 4
    for r in out:
        assert not re.search(r"[\d*#|`$€£%@]|https?://|\(", r["text"]), r["text"]
        assert r["est_seconds"] <= 45 and r["sentences"]
        assert r["id"].split("-")[0] == r["dialogue_id"]
    by_text = {r["text_original"]: r["text"] for r in out if r["text_original"]}
    assert by_text["Ein Sparpreis kostet oft ab 29,90 €. Der Zug um 14:30 Uhr braucht ca. "
                   "2 Stunden, z.B. mit einem ICE."] == (
        "Ein Sparpreis kostet oft ab neunundzwanzig Euro und neunzig Cent. Der Zug um "
        "vierzehn Uhr dreißig braucht circa zwei Stunden, zum Beispiel mit einem ICE.")
    masked = [r["text"] for r in out if "an email address" in r["text"]]
    assert masked == ["Please send the meeting summary to an email address and confirm."]
    # a rerun finds everything done and keeps the same rows
    p2 = _run(run)
    assert p2.returncode == 0, p2.stdout[-3000:] + p2.stderr[-3000:]
    again = store.read_outputs("rewrite").to_pylist()
    assert sorted(r["id"] for r in again) == sorted(r["id"] for r in out)
