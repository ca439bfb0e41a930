"""The dialogue grouping helper every dialogue sink uses (``synth/text/dialogues.py``):
complete dialogues, whole-dialogue rejects naming the missing rounds (and the upstream
reason from the run directory), truncation, mixed splits, and provenance."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from speechmill.manifests.common import split_groups
from speechmill.pipeline.errors import ConfigError
from speechmill.pipeline.records import reject, rejects_table
from speechmill.pipeline.store import RunStore
from speechmill.synth.text.dialogues import (
    check_turn_columns,
    dialogue_provenance,
    iter_dialogues,
    survey,
    turn_provenance,
    user_voice,
)
from speechmill.synth.text.turns import dialogue_id, turn_rows


def _rows(key: str, n: int, drop: tuple[int, ...] = (), split: str | None = None,
          voice: str = "user-a") -> list[dict[str, Any]]:
    did = dialogue_id("t", key)
    turns = [{"role": "user" if i % 2 == 0 else "assistant", "text": f"turn {i}"}
             for i in range(n)]
    out = []
    for r in turn_rows(did, turns, parent_id=did, source={"model": "m1"}):
        if r["round"] in drop:
            continue
        vid = voice if r["role"] == "user" else "assistant-joe"
        r.update(voice_id=vid, speaker=vid, voice_source="clone" if r["role"] == "user"
                 else "preset", tts_backend="f5-tts", tts_version="1.1.0+abc",
                 synth=json.dumps({"llm": {"model": "m1"}}), duration=1.0)
        if split is not None:
            r["split"] = split
        out.append(r)
    return out


def _dialogues(table: pa.Table, truncate: bool = False, run_dir: str | None = None):
    rejects: list[dict[str, Any]] = []
    info = survey(table, run_dir)
    out = []
    for _split, group in split_groups(table):
        out += list(iter_dialogues(group, "sink", rejects, truncate_incomplete=truncate,
                                   info=info))
    return out, rejects


def test_complete_dialogues_come_whole_in_round_order() -> None:
    rows = _rows("a", 4) + _rows("b", 2, voice="user-b")
    table = pa.Table.from_pylist(list(reversed(rows)))  # any order: sinks sort by id
    dlgs, rejects = _dialogues(table)
    assert rejects == []
    assert sorted(d.dialogue_id for d in dlgs) == sorted({r["dialogue_id"] for r in rows})
    for d in dlgs:
        assert [t["round"] for t in d.turns] == list(range(d.n_rounds))
        assert [t["role"] for t in d.turns] == ["user", "assistant"] * (d.n_rounds // 2)
        assert not d.truncated
        assert user_voice(d) in ("user-a", "user-b")
        assert [(q["round"], a["round"]) for q, a in d.pairs()] == \
            [(i, i + 1) for i in range(0, d.n_rounds, 2)]


def test_incomplete_dialogue_is_rejected_whole_naming_the_upstream_reason(
        tmp_path: Path) -> None:
    rows = _rows("a", 4, drop=(2,)) + _rows("b", 2)
    store = RunStore(tmp_path)  # what the tts stage left in the run directory
    missing = f"{rows[0]['dialogue_id']}-002"
    store.write_rejects("tts", "p0", rejects_table(
        [reject({"id": missing}, "tts", "qc_wer", "wer 0.4")]))
    dlgs, rejects = _dialogues(pa.Table.from_pylist(rows), run_dir=str(tmp_path))
    assert [d.dialogue_id for d in dlgs] == [rows[-1]["dialogue_id"]]
    assert sorted(r["id"] for r in rejects) == sorted(
        r["id"] for r in rows if r["dialogue_id"] == rows[0]["dialogue_id"])
    assert {r["reason"] for r in rejects} == {"dialogue_incomplete"}
    assert all("round 2 (user): tts qc_wer" in r["detail"] for r in rejects)
    assert all("1 of 4 rounds missing" in r["detail"] for r in rejects)


def test_truncate_keeps_rounds_before_the_first_gap_ending_on_the_assistant() -> None:
    rows = _rows("a", 6, drop=(3,)) + _rows("b", 4, drop=(1,)) + _rows("c", 6, drop=(4,))
    dlgs, rejects = _dialogues(pa.Table.from_pylist(rows), truncate=True)
    a, b, c = (rows[0]["dialogue_id"], _rows("b", 1)[0]["dialogue_id"],
               _rows("c", 1)[0]["dialogue_id"])
    kept = {d.dialogue_id: [t["round"] for t in d.turns] for d in dlgs}
    # a: round 3 missing -> rounds 0, 1 (round 2 is a user turn without its answer)
    # b: round 1 missing -> nothing left: rejected whole; c: round 4 missing -> 0..3
    assert kept == {a: [0, 1], c: [0, 1, 2, 3]}
    assert all(d.truncated and d.n_rounds == 6 for d in dlgs)
    why = {r["id"]: r["reason"] for r in rejects}
    assert why == {f"{a}-002": "dialogue_truncated", f"{a}-004": "dialogue_truncated",
                   f"{a}-005": "dialogue_truncated", f"{b}-000": "dialogue_incomplete",
                   f"{b}-002": "dialogue_incomplete", f"{b}-003": "dialogue_incomplete",
                   f"{c}-005": "dialogue_truncated"}


def test_turns_of_one_dialogue_in_two_splits_are_rejected() -> None:
    rows = _rows("a", 4, split="train")
    rows[1]["split"] = rows[3]["split"] = "test"  # a speaker split moved the assistant
    rows += _rows("b", 2, split="dev")
    dlgs, rejects = _dialogues(pa.Table.from_pylist(rows))
    assert [d.split for d in dlgs] == ["dev"]
    assert {r["reason"] for r in rejects} == {"dialogue_mixed_splits"}
    assert len(rejects) == 4 and "test, train" in rejects[0]["detail"]
    # a sink that does not write per split keeps them (one group, sorted by id)
    table = pa.Table.from_pylist(rows)
    kept: list[dict[str, Any]] = []
    (_, group), = split_groups(table, by_split=False)
    dlgs = list(iter_dialogues(group, "sink", kept, info=survey(table, splits=False)))
    assert kept == [] and sorted(d.rounds for d in dlgs) == [2, 4]


def test_bad_turns() -> None:
    rows = _rows("a", 2)
    rows[1]["role"] = "user"  # two user turns in a row
    other = _rows("b", 2)
    other[0].update(dialogue_id=None)
    dlgs, rejects = _dialogues(pa.Table.from_pylist(rows + other))
    assert dlgs == []
    why = {r["id"]: r["reason"] for r in rejects}
    assert why[rows[0]["id"]] == why[rows[1]["id"]] == "dialogue_invalid"
    assert why[other[0]["id"]] == "not_a_turn"
    assert why[other[1]["id"]] == "dialogue_incomplete"  # its round 0 is not a turn
    with pytest.raises(ConfigError, match=r"stage 'sink', key 'needs'.*dialogue_id"):
        check_turn_columns(pa.table({"id": ["x"], "text": ["y"]}), "sink")


def test_provenance() -> None:
    rows = _rows("a", 2)
    p = turn_provenance(rows[0])
    assert p == {"synthetic": True, "llm": "m1", "text_source": {"model": "m1"},
                 "tts_backend": "f5-tts", "tts_version": "1.1.0+abc", "voice_id": "user-a",
                 "voice_source": "clone", "synth": {"llm": {"model": "m1"}}}
    # without the flat columns, the synth JSON says it
    bare = {k: v for k, v in rows[1].items() if k not in ("tts_backend", "tts_version",
                                                          "voice_source")}
    bare["synth"] = json.dumps({"tts": {"backend": "piper", "version": "1.2"},
                                "voice_source": "preset"})
    q = turn_provenance(bare)
    assert (q["tts_backend"], q["tts_version"], q["voice_source"], q["llm"]) == (
        "piper", "1.2", "preset", "m1")
    # imported text (sft_import) names a dataset, no model: no LLM
    imported = {**rows[0], "source": json.dumps({"stage": "sft_import", "dataset": "a.jsonl"}),
                "synth": json.dumps({"llm": {"dataset": "a.jsonl", "format": "sharegpt"}})}
    assert turn_provenance(imported)["llm"] is None
    assert turn_provenance(imported)["text_source"]["dataset"] == "a.jsonl"
    d = dialogue_provenance(rows)
    assert d["synthetic"] and d["llm"] == "m1"
    assert [(t["role"], t["voice_id"], t["voice_source"]) for t in d["turns"]] == [
        ("user", "user-a", "clone"), ("assistant", "assistant-joe", "preset")]
