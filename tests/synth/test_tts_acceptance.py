"""Acceptance of the voice half of dialogue synthesis, offline, through the CLI:

segments of six eSpeak NG speakers (a stand-in for a cleaning run's output) -> ``voice_bank``;
the bundled text set -> ``sft_import`` -> ``speech_rewrite`` (rules) -> ``tts`` with Piper and
voice matching, QC with tiny.en / Resemblyzer / DNSMOS. The run is SIGKILLed while ``tts``
is committing batches and rerun. Then:

- the kept clips' round-trip WER (corpus) is at most 5 % while the QC gate is looser (15 %),
  and QC rejects at most 10 % of the clips: the figure is what the voices achieve, not
  what the gate enforces;
- the ~20 English dialogues use at least 5 distinct user voices, one per dialogue;
- no clip is written twice or left over: one file per kept turn, ids unique.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from speechmill.pipeline.store import RunStore
from tests.conftest import cli_env
from tests.conversation_factory import espeak_available
from tests.synth.voice_bank_data import make_segments

ROOT = Path(__file__).resolve().parents[2]
VOICES = {"spk-f3": "espeak:en-us+f3", "spk-m3": "espeak:en-gb+m3",
          "spk-grandma": "espeak:en-us+grandma", "spk-klatt": "espeak:en-us+klatt2",
          "spk-iven": "espeak:en+iven", "spk-lee": "espeak:en+Lee"}
# the English dialogues of the bundled set (23 of them; German/French ones are rejected
# as unsupported_language: Piper's joe speaks English)
TEXTS = ["alpaca.json", "openai.jsonl", "ultrachat.jsonl"]


def dag(tmp: Path, segments: Path) -> dict:
    return {
        "name": "tts-acceptance", "run_dir": str(tmp / "run"),
        "executor": {"type": "local", "stall_timeout_s": 1200},
        "stages": [
            {"id": "segments", "uses": "read_parquet", "with": {"paths": [str(segments)]}},
            {"id": "voices", "uses": "voice_bank", "needs": ["segments"],
             "with": {"clips_per_voice": 2}},
            {"id": "import", "uses": "sft_import",
             "with": {"paths": [str(ROOT / "dags/data/dialogues" / f) for f in TEXTS],
                      "max_turns": 8, "qc": {"pii": "mask", "max_chars": 4000}}},
            {"id": "rewrite", "uses": "speech_rewrite", "needs": ["import"],
             "with": {"mode": "rules", "max_spoken_seconds": 45}},
            {"id": "tts", "uses": "tts", "needs": ["rewrite", "voices"], "batch_size": 4,
             "with": {"voice_bank": "voices", "languages": ["en"], "max_share": 0.2,
                      "backend": {"backend": "piper",
                                  "voice_match": {"cache_dir": str(tmp / "vm-cache")}},
                      "qc": {"max_wer": 0.15}}},
        ],
    }


def cmd(path: Path) -> list[str]:
    return [sys.executable, "-m", "speechmill.pipeline.cli", "run", str(path), "--offline",
            "--no-progress"]


@pytest.mark.slow
@pytest.mark.skipif(not espeak_available(), reason="needs espeak-ng voices for the bank")
def test_tts_acceptance_wer_rejects_voices_and_sigkill(tmp_path: Path) -> None:
    seg = tmp_path / "segments.parquet"
    pq.write_table(make_segments(tmp_path / "segments", VOICES, clips=2), seg)
    path = tmp_path / "dag.yaml"
    path.write_text(yaml.safe_dump(dag(tmp_path, seg)))
    run = tmp_path / "run"
    tts_dir = run / "stages" / "tts"

    proc = subprocess.Popen(cmd(path), env=cli_env(), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    killed = False
    deadline = time.monotonic() + 1500
    while time.monotonic() < deadline and proc.poll() is None:
        if tts_dir.exists() and len(list(tts_dir.glob("part-*.parquet"))) >= 2:
            os.killpg(proc.pid, signal.SIGKILL)
            killed = True
            break
        time.sleep(0.2)
    proc.wait(timeout=60)
    assert killed, "the run ended before tts committed two batches"
    assert not (tts_dir / "_SUCCESS").exists()

    t0 = time.monotonic()
    r = subprocess.run(cmd(path), env=cli_env(), cwd=ROOT, capture_output=True, text=True,
                       timeout=1800)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]

    store = RunStore(run)
    out = store.read_outputs("tts").to_pylist()
    rejects = store.read_rejects("tts").to_pylist()
    metrics = json.loads((tts_dir / "metrics.json").read_text())
    summary = metrics["stage_summary"]
    # no duplicate clip: one row per turn id, one file per row, nothing else on disk
    ids = [x["id"] for x in out]
    assert len(ids) == len(set(ids))
    clips = sorted(p for p in (run / "media" / "tts").rglob("*") if p.is_file())
    assert sorted(Path(x["audio_path"]) for x in out) == clips
    # every English turn is kept or rejected by QC; the others are unsupported_language
    reasons = Counter(x["reason"] for x in rejects)
    qc_rejects = sum(v for k, v in reasons.items() if k.startswith("qc_"))
    assert set(reasons) <= {"unsupported_language", "qc_wer", "qc_speaker", "qc_dnsmos",
                            "qc_duration", "qc_clipping", "tts_error"}, reasons
    share = qc_rejects / (len(out) + qc_rejects)
    users = [x for x in out if x["role"] == "user"]
    per_dialogue = {}
    for x in users:
        per_dialogue.setdefault(x["dialogue_id"], set()).add(x["voice_id"])
    dialogues = {x["dialogue_id"] for x in out}
    minutes = metrics["wall_seconds"] / 60
    print(f"\ntts acceptance: {len(dialogues)} dialogues, {len(out)} clips kept, QC rejects "
          f"{qc_rejects} ({100 * share:.1f} %: {dict(reasons)}), kept clips' round-trip WER "
          f"{summary['wer']:.4f}, {summary['user_voices']} user voices, "
          f"{summary['mean_attempts']} attempts per clip, "
          f"{len(out) / max(minutes, 1e-9):.1f} clips/min over the tts stage's wall time "
          f"({metrics['wall_seconds']:.0f} s, both attempts; rerun {time.monotonic() - t0:.0f} s)")
    assert 18 <= len(dialogues) <= 23
    assert summary["wer"] <= 0.05 and share <= 0.10
    assert summary["user_voices"] >= 5 and len({x["voice_id"] for x in users}) >= 5
    assert all(len(v) == 1 for v in per_dialogue.values())  # one voice per dialogue
    counts = Counter(next(iter(v)) for v in per_dialogue.values())
    assert max(counts.values()) <= max(1, int(0.2 * len(per_dialogue))) + 1
    assert all(x["voice_source"] == ("voice_match" if x["role"] == "user" else "preset")
               for x in out)
    assert all(x["words"] for x in out)
