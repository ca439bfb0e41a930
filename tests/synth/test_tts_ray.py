"""The ``tts`` stage on the Ray executor (embedded Ray) keeps exactly what the local
executor keeps: the same turns, texts and voices, each clip written once under the run's
media directory.

Piper with voice matching and the full QC (tiny.en, Resemblyzer, DNSMOS), a voice bank
of two eSpeak NG speakers given as a path, two two-turn dialogues read with
``read_parquet``. On Ray the stage is an actor pool: the actor loads its own models in
``setup()`` and gets the driver's voice deal (``prepare``) with its pickled context. One
actor (``num_cpus: 2``, one CPU left to reads and commits) keeps the test cheap; it has
also passed with two (``num_cpus: 3``).
"""

from __future__ import annotations

import io
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from speechmill.pipeline.store import RunStore
from speechmill.synth.text.turns import dialogue_id, turn_rows
from testkit.conversations import espeak_available
from testkit.voice_bank_data import export, make_segments

pytestmark = [pytest.mark.ray,
              pytest.mark.skipif(not espeak_available(), reason="needs espeak-ng voices")]

DIALOGUES = [
    ("Could you tell me how long it takes to bake a loaf of bread?",
     "It usually takes about forty minutes in a hot oven."),
    ("What should I pack for a weekend in the mountains?",
     "Bring warm layers, good shoes and a rain jacket."),
]
VOICES = {"spk-f3": "espeak:en-us+f3", "spk-m3": "espeak:en-gb+m3"}


def turns_file(path: Path) -> pa.Table:
    rows = []
    for i, (q, a) in enumerate(DIALOGUES):
        did = dialogue_id("ray-test", str(i))
        rows += turn_rows(did, [{"role": "user", "text": q}, {"role": "assistant", "text": a}],
                          parent_id=did, language="en", source={"model": "fixture-llm"})
    table = pa.Table.from_pylist(rows)
    pq.write_table(table, path)
    return table


def run(tmp: Path, name: str, turns: Path, bank: Path, executor: dict[str, Any]) -> Path:
    from rich.console import Console

    from speechmill.pipeline import dag as dagmod
    from speechmill.pipeline import runner

    run_dir = tmp / name
    d = {"name": f"tts-{name}", "run_dir": str(run_dir), "executor": executor,
         "stages": [
             {"id": "turns", "uses": "read_parquet", "with": {"paths": [str(turns)]}},
             {"id": "tts", "uses": "tts", "needs": ["turns"], "batch_size": 2,
              "with": {"voice_bank": str(bank), "max_share": 0.5,
                       "backend": {"backend": "piper", "voice_match": {
                           "pitch_factors": [0.8, 1.0, 1.4], "formant_factors": [1.0, 1.15],
                           "cache_dir": str(tmp / "vm-cache")}},
                       "qc": {"asr_beam_size": 1}}}]}
    res = runner.run(dagmod.loads(yaml.safe_dump(d)), offline=True, progress=False,
                     console=Console(file=io.StringIO()))
    assert res.status == "succeeded", res.error
    return run_dir


def kept(run_dir: Path) -> tuple[dict[str, tuple[Any, ...]], list[dict[str, Any]]]:
    out = RunStore(run_dir).read_outputs("tts").to_pylist()
    ids = [r["id"] for r in out]
    assert len(ids) == len(set(ids))
    # each kept clip exists once, under this run's media dir, and nothing else is there
    media = run_dir / "media" / "tts"
    files = sorted(p for p in media.rglob("*") if p.is_file())
    paths = [Path(r["audio_path"]) for r in out]
    assert sorted(paths) == files and len(set(paths)) == len(paths)
    assert all(p.is_absolute() and media in p.parents for p in paths)
    return ({r["id"]: (r["text"], r["role"], r["voice_id"], r["voice_source"]) for r in out},
            out)


def test_tts_on_ray_keeps_what_local_keeps(tmp_path: Path) -> None:
    bank, _ = export(make_segments(tmp_path / "segments", VOICES, clips=1),
                     tmp_path / "cleaning")
    turns = tmp_path / "turns.parquet"
    table = turns_file(turns)
    local = run(tmp_path, "local", turns, bank, {"type": "local", "progress": False})
    ray_run = run(tmp_path, "ray", turns, bank,
                  {"type": "ray", "num_cpus": 2, "progress": False, "stall_timeout_s": 600})

    want, _ = kept(local)
    got, rows = kept(ray_run)
    assert got == want
    assert len(want) >= table.num_rows - 1  # QC keeps (nearly) every turn of these texts
    users = {r["voice_id"] for r in rows if r["role"] == "user"}
    assert users == set(VOICES)  # the driver's deal reached every actor: 2 dialogues, 2 voices
    assert Counter(r["voice_source"] for r in rows)["voice_match"] == \
        sum(r["role"] == "user" for r in rows)
    assert all(r["qc"]["wer"] is not None and r["words"] for r in rows)
