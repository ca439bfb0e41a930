"""``nemo_conversation``: NeMo multimodal conversation JSONL (the schema
``NeMoMultimodalConversationJsonlAdapter`` reads: ``id``, ``conversations`` of ``from`` /
``type`` / ``value`` / ``duration``, optional ``custom``) and per-turn NeMo manifests,
from synthesized dialogues run through the engine."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
import soundfile as sf

from speechmill.manifests.nemo_conversation import (
    NemoConversation,
    NemoConversationConfig,
)
from speechmill.pipeline.dag import load as load_dag
from speechmill.pipeline.runner import run
from speechmill.pipeline.stage import StageContext
from tests.manifests.conftest import dag_with
from tests.synth.dialogue_rows import (
    DialogueSpec,
    dropped_rejects,
    make_dialogue_rows,
    write_tts_stage,
)

SPECS = [DialogueSpec(2, 0), DialogueSpec(4, 1), DialogueSpec(4, 2, drop=(1,))]
TURN_KEYS = ["audio_filepath", "duration", "text", "lang", "speaker", "id", "dialogue_id",
             "round", "role", "synthetic", "voice_source", "tts_backend", "tts_version",
             "llm"]


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pa.Table]:
    d = tmp_path_factory.mktemp("nc")
    rows = make_dialogue_rows(d / "clips", SPECS)
    return write_tts_stage(d / "synth", rows, dropped_rejects(SPECS)), rows


def _lines(p: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in p.read_text().splitlines()]


def test_conversations_as_nemo_reads_them(synth, tmp_path: Path) -> None:
    tts, rows = synth
    by_id = {r["id"]: r for r in rows.to_pylist()}
    dag = dag_with(tmp_path, tts, """
  - id: nc
    uses: nemo_conversation
    needs: [src]
  - id: nc_audio
    uses: nemo_conversation
    needs: [src]
    with: {assistant: audio, paths: absolute, turn_manifest: false}
""")
    assert run(load_dag(dag), progress=False).status == "succeeded"
    out = tmp_path / "run/exports/nc"
    convs = _lines(out / "conversations.jsonl")
    assert len(convs) == 2  # the dialogue that lost round 1 is rejected whole
    m = json.loads((tmp_path / "run/stages/nc/metrics.json").read_text())
    assert m["reasons"] == {"dialogue_incomplete": 3} and m["rows_out"] == 6
    for c in convs:
        assert list(c) == ["id", "conversations", "custom"]
        turns = [r for r in rows.to_pylist() if r["dialogue_id"] == c["id"]]
        assert len(c["conversations"]) == len(turns)
        for e, r in zip(c["conversations"], sorted(turns, key=lambda r: r["round"]),
                        strict=True):
            if r["role"] == "user":  # default: user audio, assistant text
                assert list(e) == ["from", "type", "value", "duration"]
                assert (e["from"], e["type"]) == ("User", "audio")
                path = out / e["value"]  # NeMo resolves it against the manifest's dir
                assert not os.path.isabs(e["value"]) and path.resolve() == \
                    Path(r["audio_path"]).resolve()
                assert e["duration"] == pytest.approx(sf.info(path).duration, abs=1e-5)
            else:
                assert e == {"from": "Assistant", "type": "text", "value": r["text"]}
        cu = c["custom"]
        assert cu["synthetic"] is True and cu["provenance"]["llm"] == "fixture-llm"
        assert [t["voice_id"] for t in cu["provenance"]["turns"]] == \
            [r["voice_id"] for r in sorted(turns, key=lambda r: r["round"])]
    # per-turn NeMo ASR/TTS manifest
    lines = _lines(out / "turns_manifest.json")
    assert len(lines) == 6
    for e in lines:
        r = by_id[e["id"]]
        assert list(e) == TURN_KEYS
        assert (out / e["audio_filepath"]).resolve() == Path(r["audio_path"]).resolve()
        assert (e["text"], e["speaker"], e["lang"], e["role"]) == (
            r["text"], r["voice_id"], "en", r["role"])
        assert e["duration"] == pytest.approx(r["duration"], abs=1e-6)
        assert e["synthetic"] is True and e["tts_backend"] == r["tts_backend"]
    # assistant turns as audio, absolute paths
    out2 = tmp_path / "run/exports/nc_audio"
    assert not (out2 / "turns_manifest.json").exists()
    for c in _lines(out2 / "conversations.jsonl"):
        for e in c["conversations"]:
            assert e["type"] == "audio" and os.path.isabs(e["value"])
            assert e["from"] in ("User", "Assistant")
            assert Path(e["value"]).is_file()


def test_missing_clip_rejects_its_dialogue(synth, tmp_path: Path) -> None:
    _, rows = synth
    table = rows.to_pylist()
    table[1]["audio_path"] = str(tmp_path / "gone.wav")
    st = NemoConversation(NemoConversationConfig(truncate_incomplete=True),
                          StageContext("nc", str(tmp_path)))
    (tmp_path / "o").mkdir()
    res = st.export(pa.Table.from_pylist(table, schema=rows.schema), tmp_path / "o")
    why = {r["id"]: r["reason"] for r in res.rejects.to_pylist()}
    did = table[1]["dialogue_id"]
    assert why[table[1]["id"]] == "unreadable"
    assert why[f"{did}-000"] == "dialogue_incomplete"
    # truncation: the dialogue that lost round 1 keeps nothing (round 0 is a user turn)
    assert sorted(c["id"] for c in _lines(tmp_path / "o/conversations.jsonl")) == \
        sorted({r["dialogue_id"] for r in table} - {did, table[-1]["dialogue_id"]})
