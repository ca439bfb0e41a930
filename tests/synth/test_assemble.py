"""``dialogue_assemble`` on real synthesized turns: conversation audio whose length is the
turns plus the gaps, moshi-finetune's stereo layout (assistant left, user right) with
word alignments shifted to the conversation, dialogues.jsonl timings, Lhotse cuts per
dialogue, whole-dialogue rejects and truncation, byte-identical re-exports."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from speechmill.manifests.dialogue_assemble import AssembleConfig, DialogueAssemble, gaps_for
from speechmill.pipeline.dag import load as load_dag
from speechmill.pipeline.errors import ConfigError
from speechmill.pipeline.runner import run
from speechmill.pipeline.stage import StageContext
from tests.manifests.conftest import dag_with
from tests.synth.dialogue_rows import (
    DialogueSpec,
    clip,
    dropped_rejects,
    make_dialogue_rows,
    write_tts_stage,
)

SR = 24000
Q = 2.0 / 32768  # 16-bit quantisation tolerance
SPECS = [DialogueSpec(2, 0), DialogueSpec(4, 1), DialogueSpec(2, 2),
         DialogueSpec(4, 3, drop=(2,))]


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pa.Table]:
    """A run directory whose ``tts`` stage holds the turns (one dialogue lost round 2 to
    QC), and the rows."""
    d = tmp_path_factory.mktemp("synth")
    rows = make_dialogue_rows(d / "clips", SPECS)
    write_tts_stage(d / "run", rows, dropped_rejects(SPECS))
    return d / "run", rows


@pytest.fixture(scope="module")
def assembled(synth: tuple[Path, pa.Table], tmp_path_factory: pytest.TempPathFactory
              ) -> tuple[Path, dict[str, Any]]:
    """The tts stage -> dialogue_assemble through the runner (jittered gaps)."""
    run_dir, _ = synth
    tmp = tmp_path_factory.mktemp("asm")
    dag = dag_with(tmp, run_dir / "stages" / "tts", """
  - id: asm
    uses: dialogue_assemble
    needs: [src]
    with: {gap_s: 0.3, gap_jitter_s: 0.1, seed: 7}
""")
    res = run(load_dag(dag), progress=False)
    assert res.status == "succeeded"
    metrics = json.loads((tmp / "run/stages/asm/metrics.json").read_text())
    return tmp / "run/exports/asm", metrics


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_conversation_audio_is_the_turns_and_the_gaps(synth, assembled) -> None:
    _, rows = synth
    out, metrics = assembled
    by_id = {r["id"]: r for r in rows.to_pylist()}
    lines = _lines(out / "dialogues.jsonl")
    assert len(lines) == 3 and metrics["rows_out"] == 8
    assert metrics["stage_summary"]["dialogues"] == 3
    assert metrics["reasons"] == {"dialogue_incomplete": 3}
    gaps = []
    for d in lines:
        assert d["synthetic"] is True and d["provenance"]["llm"] == "fixture-llm"
        mono, sr = sf.read(out / d["audio"], dtype="float32")
        assert sr == SR and mono.ndim == 1
        clips = [clip(by_id[t["id"]], SR) for t in d["turns"]]
        starts = [round(t["start"] * SR) for t in d["turns"]]
        g = [starts[i + 1] - starts[i] - len(clips[i]) for i in range(len(clips) - 1)]
        gaps += g
        # exactly the turns and the gaps, nothing before, between or after
        assert len(mono) == sum(len(c) for c in clips) + sum(g)
        assert starts[0] == 0
        assert round(d["duration"] * SR) == len(mono)
        for s, c, t in zip(starts, clips, d["turns"], strict=True):
            np.testing.assert_allclose(mono[s:s + len(c)], c, atol=Q)
            assert t["clip_duration"] == pytest.approx(len(c) / SR, abs=1e-6)
            assert t["end"] == pytest.approx(t["start"] + t["clip_duration"], abs=2e-6)
        for s, c, gap in zip(starts, clips, g, strict=False):
            assert not np.any(mono[s + len(c):s + len(c) + gap])  # the gaps are silence
        assert [t["gap_after"] for t in d["turns"]][-1] == 0.0
        want = gaps_for(d["id"], len(clips) - 1, 0.3, 0.1, 7)
        assert g == [round(x * SR) for x in want]
    # jittered within gap_s +- gap_jitter_s, and not all alike
    assert all(0.2 * SR - 1 <= x <= 0.4 * SR + 1 for x in gaps)
    assert len(set(gaps)) > 1


def test_moshi_stereo_layout_and_alignments(synth, assembled) -> None:
    _, rows = synth
    out, _ = assembled
    by_id = {r["id"]: r for r in rows.to_pylist()}
    lines = {d["id"]: d for d in _lines(out / "dialogues.jsonl")}
    entries = _lines(out / "moshi" / "data.jsonl")
    assert len(entries) == len(lines)
    for e in entries:
        assert set(e) == {"path", "duration"}
        wav = out / "moshi" / e["path"]  # relative to data.jsonl, as sphn resolves it
        x, sr = sf.read(wav, dtype="float32", always_2d=True)
        assert sr == SR and x.shape[1] == 2
        assert e["duration"] == pytest.approx(x.shape[0] / sr, abs=1e-6)
        d = lines[wav.stem]
        mono, _ = sf.read(out / d["audio"], dtype="float32")
        np.testing.assert_allclose(x.sum(axis=1), mono, atol=2 * Q)
        for t in d["turns"]:
            a, b = round(t["start"] * SR), round(t["end"] * SR)
            left, right = x[a:b, 0], x[a:b, 1]
            c = clip(by_id[t["id"]], SR)
            if t["role"] == "assistant":  # assistant: left only (moshi's own channel)
                np.testing.assert_allclose(left, c, atol=Q)
                assert not np.any(right) and np.sqrt(np.mean(left ** 2)) > 0.01
            else:  # user: right only
                np.testing.assert_allclose(right, c, atol=Q)
                assert not np.any(left) and np.sqrt(np.mean(right ** 2)) > 0.01
        # the alignment JSON next to the wav: every turn's ASR words, shifted
        ali = json.loads(wav.with_suffix(".json").read_text())["alignments"]
        want = []
        for t in d["turns"]:
            label = "SPEAKER_MAIN" if t["role"] == "assistant" else "SPEAKER_OTHER"
            for w in by_id[t["id"]]["words"]:
                want.append([w["word"], [round(t["start"] + w["start"], 3),
                                         round(t["start"] + w["end"], 3)], label])
        assert ali == want
        starts = [a[1][0] for a in ali]
        assert starts == sorted(starts)
        assert all(a[1][1] <= e["duration"] + 1e-3 for a in ali)


def test_lhotse_cut_per_dialogue(synth, assembled) -> None:
    from lhotse import CutSet

    _, rows = synth
    out, _ = assembled
    by_id = {r["id"]: r for r in rows.to_pylist()}
    lines = {d["id"]: d for d in _lines(out / "dialogues.jsonl")}
    cuts = CutSet.from_file(out / "lhotse" / "cuts.jsonl.gz")
    assert sorted(c.id for c in cuts) == sorted(lines)
    for cut in cuts:
        d = lines[cut.id]
        mono, _ = sf.read(out / d["audio"], dtype="float32")
        np.testing.assert_allclose(cut.load_audio()[0], mono, atol=1e-6)
        assert cut.custom["synthetic"] is True
        assert [s.id for s in cut.supervisions] == [t["id"] for t in d["turns"]]
        for s, t in zip(cut.supervisions, d["turns"], strict=True):
            r = by_id[t["id"]]
            assert (s.speaker, s.text) == (r["voice_id"], r["text"])
            assert s.start == pytest.approx(t["start"]) and s.duration == pytest.approx(
                t["clip_duration"])
            assert s.custom["role"] == r["role"] and s.custom["synthetic"] is True
            assert s.custom["tts_backend"] == r["tts_backend"]
            w0 = s.alignment["word"][0]
            assert w0.start == pytest.approx(t["start"] + r["words"][0]["start"], abs=1e-6)


def _export(rows: pa.Table, out: Path, run_dir: Path, **cfg: Any):
    out.mkdir(parents=True, exist_ok=True)
    st = DialogueAssemble(AssembleConfig(**cfg), StageContext("asm", str(run_dir)))
    return st.export(rows, out)


def test_truncation_unreadable_clips_and_same_bytes(synth, tmp_path: Path) -> None:
    run_dir, rows = synth
    # a dialogue whose round 3 clip is gone; the incomplete one truncated to rounds 0-1
    table = rows.to_pylist()
    broken = next(r for r in table if r["n_rounds"] == 4 and r["round"] == 3)
    gone = tmp_path / "gone.wav"
    shutil.copy(broken["audio_path"], gone)
    broken["audio_path"] = str(gone)
    t = pa.Table.from_pylist(table, schema=rows.schema)
    gone.unlink()
    res = _export(t, tmp_path / "a", run_dir, truncate_incomplete=True, gap_s=0.25)
    why = {r["id"]: (r["reason"], r["detail"]) for r in res.rejects.to_pylist()}
    did_b = broken["dialogue_id"]
    assert why[broken["id"]][0] == "unreadable"
    assert {why[f"{did_b}-{k:03d}"][0] for k in (0, 1, 2)} == {"dialogue_incomplete"}
    trunc = [r for r in table if r["n_rounds"] == 4 and r["dialogue_id"] != did_b]
    did_t = trunc[0]["dialogue_id"]
    assert why[f"{did_t}-003"][0] == "dialogue_truncated"
    assert "round 2 (user): tts qc_wer" in why[f"{did_t}-003"][1]
    lines = {d["id"]: d for d in _lines(tmp_path / "a" / "dialogues.jsonl")}
    assert did_b not in lines
    assert lines[did_t]["truncated"] is True and lines[did_t]["rounds"] == 2
    assert lines[did_t]["n_rounds"] == 4
    assert res.summary["truncated"] == 1 and res.rows_out == 2 + 2 + 2

    # the same input exports the same bytes
    _export(t, tmp_path / "b", run_dir, truncate_incomplete=True, gap_s=0.25)
    a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*")
               if p.is_file())
    b = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*")
               if p.is_file())
    assert a == b and len(a) > 8
    for p in a:
        if p.parts[0] == "lhotse" and p.name.startswith(("recordings", "cuts")):
            continue  # absolute audio paths name the export directory
        assert (tmp_path / "a" / p).read_bytes() == (tmp_path / "b" / p).read_bytes(), p


def test_no_audio_options_and_misconfiguration(synth, tmp_path: Path) -> None:
    run_dir, rows = synth
    res = _export(rows, tmp_path / "o", run_dir, mono=False, stereo=False, lhotse=False)
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["dialogues.jsonl"]
    d = _lines(tmp_path / "o" / "dialogues.jsonl")[0]
    assert d["audio"] is None and d["stereo"] is None and d["turns"][1]["start"] > 0
    assert res.summary["dialogues"] == 3
    with pytest.raises(ConfigError, match="lhotse"):
        load_dag(dag_with(tmp_path, tmp_path / "x.parquet", """
  - id: asm
    uses: dialogue_assemble
    needs: [src]
    with: {mono: false}
"""))
    # rows that are not turns: a configuration error naming the stage
    pq.write_table(pa.table({"id": ["a-1"], "audio_path": ["x.wav"], "duration": [1.0]}),
                   tmp_path / "seg.parquet")
    dag = dag_with(tmp_path, tmp_path / "seg.parquet", """
  - id: asm
    uses: dialogue_assemble
    needs: [src]
""")
    with pytest.raises(ConfigError, match=r"stage 'asm', key 'needs'.*dialogue_id"):
        run(load_dag(dag), progress=False)
