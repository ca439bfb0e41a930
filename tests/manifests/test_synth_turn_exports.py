"""The per-utterance exporters on synthesized turns (the ``tts`` stage's rows) as they
are: ``lhotse`` (a cut per turn, supervision speaker = voice id, provenance in
``custom``), ``tokenize`` with SNAC (test-built weights) and k-means units, then
``lhotse_shar`` with token fields and ``shards`` in Mini-Omni and SpeechGPT layouts that
keep the dialogue structure (``dialogue_id``, ``round``, ...)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from speechmill.manifests.tokenizers import layouts
from speechmill.pipeline.dag import load as load_dag
from speechmill.pipeline.runner import run
from tests.manifests.conftest import dag_with
from tests.synth.dialogue_rows import DialogueSpec, clip, make_dialogue_rows, write_tts_stage

pytest.importorskip("snac")

SPECS = [DialogueSpec(2, 0), DialogueSpec(4, 1), DialogueSpec(2, 2), DialogueSpec(2, 3)]
DIALOGUE = ["dialogue_id", "round", "n_rounds", "role", "voice_id", "synthetic", "synth"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pa.Table]:
    from testkit.snac import build_snac

    tmp = tmp_path_factory.mktemp("turns")
    rows = make_dialogue_rows(tmp / "clips", SPECS)
    tts = write_tts_stage(tmp / "synth", rows)
    model = build_snac(tmp / "snac")
    dag = dag_with(tmp, tts, f"""
  - id: split
    uses: split
    needs: [src]
    with: {{mode: dialogue, dev_fraction: 0.3, test_fraction: 0.0, seed: 4}}
  - id: lh
    uses: lhotse
    needs: [split]
  - id: tok
    uses: tokenize
    needs: [split]
    with: {{audio: {{backend: snac, path: "{model}", device: cpu}}, text: null}}
  - id: shar
    uses: lhotse_shar
    needs: [tok]
    with: {{by_split: false}}
  - id: mo
    uses: shards
    needs: [tok]
    with: {{layout: mini-omni, by_split: false}}
  - id: units
    uses: tokenize
    needs: [split]
    with: {{audio: {{backend: kmeans-mel, n_units: 16, fit_max_frames: 2000, dedup: true}},
            text: null}}
  - id: sgpt
    uses: shards
    needs: [units]
    with: {{layout: speechgpt}}
""")
    assert run(load_dag(dag), progress=False).status == "succeeded"
    return tmp / "run", rows


def _stage(run_dir: Path, sid: str) -> dict[str, dict]:
    t = pq.read_table(sorted((run_dir / "stages" / sid).glob("part-*.parquet")))
    return {r["id"]: r for r in t.to_pylist()}


def test_lhotse_cut_per_turn_with_provenance(exported) -> None:
    from lhotse import CutSet

    run_dir, rows = exported
    by_id = {r["id"]: r for r in rows.to_pylist()}
    split = {i: r["split"] for i, r in _stage(run_dir, "split").items()}
    seen = set()
    for d in sorted((run_dir / "exports/lh").iterdir()):
        for cut in CutSet.from_file(d / "cuts.jsonl.gz"):
            r = by_id[cut.id]
            assert split[cut.id] == d.name
            (sup,) = cut.supervisions
            assert (sup.speaker, sup.text, sup.language) == (r["voice_id"], r["text"], "en")
            c = sup.custom
            assert c["synthetic"] is True and c["voice_source"] == r["voice_source"]
            assert (c["dialogue_id"], c["round"], c["role"]) == (
                r["dialogue_id"], r["round"], r["role"])
            assert (c["tts_backend"], c["tts_version"]) == (r["tts_backend"],
                                                            r["tts_version"])
            assert c["synth"] == json.loads(r["synth"])  # parsed provenance JSON
            assert c["text_source"]["model"] == "fixture-llm"
            assert [a.symbol for a in sup.alignment["word"]] == [w["word"]
                                                                 for w in r["words"]]
            np.testing.assert_allclose(cut.load_audio()[0], clip(r), atol=1e-6)
            seen.add(cut.id)
    assert seen == set(by_id)


def test_shar_with_snac_token_fields(exported) -> None:
    from lhotse import CutSet

    run_dir, rows = exported
    tok = _stage(run_dir, "tok")
    cuts = list(CutSet.from_shar(in_dir=run_dir / "exports/shar"))
    assert sorted(c.id for c in cuts) == sorted(tok)
    for cut in cuts:
        codes = tok[cut.id]["codes"]
        assert len(codes) == 3
        for k in range(3):
            assert cut.load_custom(f"codes_{k}").tolist() == codes[k]
        assert cut.custom["codec"] == json.loads(tok[cut.id]["audio_tokenizer"])
        assert len(cut.custom["codec"]["codebook_sizes"]) == 3
        sup = cut.supervisions[0]
        assert sup.custom["synthetic"] is True and sup.speaker == tok[cut.id]["voice_id"]


def test_shards_keep_the_dialogue_structure(exported) -> None:
    run_dir, rows = exported
    tok, units = _stage(run_dir, "tok"), _stage(run_dir, "units")
    by_id = {r["id"]: r for r in rows.to_pylist()}
    t = pq.read_table(run_dir / "shards/mo/shard-00000.parquet")
    assert t.num_rows == rows.num_rows
    assert all(c in t.column_names for c in DIALOGUE)
    out = t.to_pylist()
    for r in out:
        src = by_id[r["id"]]
        assert [r[c] for c in DIALOGUE] == [src[c] for c in DIALOGUE]
        back = layouts.mini_omni_unflatten(np.asarray(r["codes_7"]))
        assert [b.tolist() for b in back] == tok[r["id"]]["codes"]
    # a dialogue's turns are adjacent and in round order
    order = [(r["dialogue_id"], r["round"]) for r in out]
    assert order == sorted(order)
    # SpeechGPT units, per split, with the same structure
    n = 0
    for f in sorted((run_dir / "shards/sgpt").rglob("shard-*.parquet")):
        for r in pq.read_table(f).to_pylist():
            assert r["split"] == f.parent.name
            assert [r[c] for c in DIALOGUE] == [by_id[r["id"]][c] for c in DIALOGUE]
            assert layouts.parse_speechgpt_units(r["units"]).tolist() == \
                units[r["id"]]["codes"][0]
            n += 1
    assert n == rows.num_rows
