"""``split`` with ``mode: dialogue``: all turns of a dialogue in one split, user voices
disjoint across splits where the bank allows, sized by hours, seeded; the assistant
voice is shared. The default (speaker) mode is unchanged (tests/manifests/test_splits.py)
and, on dialogues, separates the assistant's turns from the users' (the dialogue sinks
then reject those dialogues)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from speechmill.manifests.splits import Split, SplitConfig
from speechmill.pipeline.dag import load as load_dag
from speechmill.pipeline.errors import ConfigError
from speechmill.pipeline.runner import run
from speechmill.pipeline.stage import StageContext
from tests.manifests.conftest import dag_with
from tests.synth.dialogue_rows import DialogueSpec, make_dialogue_rows, write_tts_stage


def _turns(n_dialogues: int, voices: list[str], rounds: int = 2,
           seconds: float = 60.0) -> pa.Table:
    """Turn rows (no audio needed: split reads ids, voices and durations)."""
    rows: list[dict[str, Any]] = []
    for i in range(n_dialogues):
        did = f"{i:016x}"
        for r in range(rounds):
            user = r % 2 == 0
            v = voices[i % len(voices)] if user else "assistant-joe"
            rows.append({"id": f"{did}-{r:03d}", "dialogue_id": did, "round": r,
                         "n_rounds": rounds, "role": "user" if user else "assistant",
                         "voice_id": v, "speaker": v, "duration": seconds + i})
    return pa.Table.from_pylist(rows)


def _assign(table: pa.Table, **cfg: Any) -> tuple[dict[str, str], dict[str, Any]]:
    config = SplitConfig(mode="dialogue", **cfg)
    prepared = Split.prepare(config, table, StageContext("split", "."))
    st = Split(config, StageContext("split", ".", prepared=prepared))
    out = {r["id"]: st.process_row(r)["split"] for r in table.to_pylist()}
    return out, prepared


def _by(table: pa.Table, split: dict[str, str], key: str) -> dict[str, set[str]]:
    got: dict[str, set[str]] = {}
    for r in table.to_pylist():
        if key == "voice" and r["role"] != "user":
            continue
        got.setdefault(r["dialogue_id"] if key == "dialogue" else r["voice_id"],
                       set()).add(split[r["id"]])
    return got


def test_dialogues_whole_and_user_voices_disjoint() -> None:
    voices = [f"user-{k}" for k in range(6)]
    t = _turns(18, voices, rounds=4)
    split, prepared = _assign(t, dev_fraction=0.2, test_fraction=0.2, seed=5)
    assert prepared["voices_disjoint"] is True
    assert all(len(s) == 1 for s in _by(t, split, "dialogue").values())
    per_voice = _by(t, split, "voice")
    assert all(len(s) == 1 for s in per_voice.values()), per_voice
    assert {next(iter(s)) for s in per_voice.values()} == {"train", "dev", "test"}
    # the assistant voice is in every split (shared by design)
    assert {split[r["id"]] for r in t.to_pylist() if r["role"] == "assistant"} == \
        {"train", "dev", "test"}
    # sized by hours: held-out splits never overshoot their targets
    hours: dict[str, float] = {}
    for r in t.to_pylist():
        hours[split[r["id"]]] = hours.get(split[r["id"]], 0.0) + r["duration"] / 3600
    total = sum(hours.values())
    assert hours["dev"] <= 0.2 * total + 1e-9 and hours["test"] <= 0.2 * total + 1e-9
    # seeded: the same seed gives the same splits, another seed other ones
    assert _assign(t, dev_fraction=0.2, test_fraction=0.2, seed=5)[0] == split
    others = [_assign(t, dev_fraction=0.2, test_fraction=0.2, seed=s)[0] for s in range(4)]
    assert any(o != split for o in others)


def test_dialogues_sharing_a_user_voice_stay_together() -> None:
    t = _turns(12, [f"user-{k}" for k in range(6)]).to_pylist()
    # dialogue 0 has user turns in voices 0 and 1: their dialogues form one group
    t.extend([{**t[0], "id": f"{t[0]['dialogue_id']}-002", "round": 2, "voice_id": "user-1",
               "speaker": "user-1"},
              {**t[1], "id": f"{t[0]['dialogue_id']}-003", "round": 3}])
    table = pa.Table.from_pylist(t)
    split, _ = _assign(table, dev_fraction=0.3, test_fraction=0.3)
    voices = _by(table, split, "voice")
    assert voices["user-0"] == voices["user-1"]
    assert all(len(s) == 1 for s in voices.values())


def test_too_few_voices_fall_back_to_dialogues() -> None:
    t = _turns(10, ["user-a", "user-b"])
    split, prepared = _assign(t, dev_fraction=0.2, test_fraction=0.2)
    assert prepared["voices_disjoint"] is False
    assert all(len(s) == 1 for s in _by(t, split, "dialogue").values())
    assert set(split.values()) == {"train", "dev", "test"}
    # train + test only: two voice groups suffice
    split2, prepared2 = _assign(t, dev_fraction=0.0, test_fraction=0.3)
    assert prepared2["voices_disjoint"] is True
    assert all(len(s) == 1 for s in _by(t, split2, "voice").values())
    assert set(split2.values()) == {"train", "test"}


def test_dialogue_mode_needs_turn_rows() -> None:
    t = pa.table({"id": ["a-1"], "speaker": ["s"], "duration": [1.0]})
    with pytest.raises(ConfigError, match=r"stage 'split', key 'mode'.*dialogue_id"):
        Split.prepare(SplitConfig(mode="dialogue"), t, StageContext("split", "."))


def test_in_a_dag_then_assembled_per_split(tmp_path: Path) -> None:
    specs = [DialogueSpec(2, k % 4, key=f"d{k}") for k in range(8)]
    rows = make_dialogue_rows(tmp_path / "clips", specs)
    tts = write_tts_stage(tmp_path / "synth", rows)
    dag = dag_with(tmp_path, tts, """
  - id: split
    uses: split
    needs: [src]
    with: {mode: dialogue, dev_fraction: 0.25, test_fraction: 0.25, seed: 2}
  - id: asm
    uses: dialogue_assemble
    needs: [split]
    with: {stereo: false, lhotse: false}
  - id: by_speaker
    uses: split
    needs: [src]
    with: {dev_fraction: 0.25, test_fraction: 0.25, seed: 2}
  - id: asm_speaker
    uses: dialogue_assemble
    needs: [by_speaker]
    with: {stereo: false, lhotse: false, mono: false}
""")
    assert run(load_dag(dag), progress=False).status == "succeeded"
    out = pq.read_table(sorted((tmp_path / "run/stages/split").glob("part-*.parquet")))
    assert out.num_rows == rows.num_rows
    split = dict(zip(out.column("id").to_pylist(), out.column("split").to_pylist(),
                     strict=True))
    assert all(len(s) == 1 for s in _by(out, split, "dialogue").values())
    voices = _by(out, split, "voice")
    assert len(voices) == 4 and all(len(s) == 1 for s in voices.values())
    assert set(split.values()) == {"train", "dev", "test"}
    m = json.loads((tmp_path / "run/stages/split/metrics.json").read_text())["stage_summary"]
    assert m["user_voices_in_several_splits"] == 0
    assert sum(m["dialogues"].values()) == 8 and set(m["user_voices"]) == set(m["hours"])
    # the assembled dialogues land in their split's directory
    for s in ("train", "dev", "test"):
        lines = (tmp_path / f"run/exports/asm/{s}/dialogues.jsonl").read_text().splitlines()
        for line in lines:
            d = json.loads(line)
            assert d["split"] == s and {split[t["id"]] for t in d["turns"]} == {s}
    # a speaker split puts every assistant turn in one split: those dialogues are
    # rejected by the dialogue sinks
    ms = json.loads((tmp_path / "run/stages/asm_speaker/metrics.json").read_text())
    assert ms["reasons"].get("dialogue_mixed_splits", 0) > 0
