"""``voice_assistant``: VoiceAssistant-400K-style Parquet from synthesized dialogues, run
through the engine after ``tokenize`` with a test-built SNAC 24 kHz (small, random,
saved the way ``SNAC.from_pretrained`` reads it). ``datasets`` loads it, the question
audio decodes to the user turn's clip, and ``answer_snac`` is Mini-Omni's text layout of
the answer turn's SNAC codes."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from speechmill.manifests.tokenizers import layouts
from speechmill.manifests.voice_assistant import (
    VoiceAssistantConfig,
    VoiceAssistantExport,
    parse_snac_text,
    snac_text,
)
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

datasets = pytest.importorskip("datasets")
pytest.importorskip("snac")

Q = 2.0 / 32768
SPECS = [DialogueSpec(2, 0), DialogueSpec(4, 1), DialogueSpec(2, 2),
         DialogueSpec(4, 3, drop=(3,))]
COLUMNS = ["split_name", "index", "round", "question", "question_audio", "answer",
           "answer_snac", "dialogue_id", "question_id", "answer_id", "language",
           "question_duration", "answer_duration", "synthetic", "llm", "question_voice",
           "answer_voice", "question_voice_source", "answer_voice_source", "question_tts",
           "answer_tts", "provenance"]

#: can ``datasets`` decode Audio here: torchcodec (what it decodes with) loads FFmpeg on
#: first use; an error here is the reason the decode test skips
PROBE = r"""
import io
import numpy as np
import soundfile as sf
from torchcodec.decoders import AudioDecoder
buf = io.BytesIO()
sf.write(buf, np.zeros(160, np.float32), 16000, format="WAV")
AudioDecoder(buf.getvalue()).get_all_samples()
"""

DECODE = r"""
import json, sys
import numpy as np
import datasets
files, cache, out = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
ds = datasets.load_dataset("parquet", data_files=files, cache_dir=cache)
arrays, rates = {}, {}
for split in ds:
    assert isinstance(ds[split].features["question_audio"], datasets.Audio)
    for ex in ds[split]:
        s = ex["question_audio"].get_all_samples()
        arrays[ex["question_id"]] = s.data.numpy().mean(axis=0)
        rates[ex["question_id"]] = int(s.sample_rate)
np.savez(out, **arrays)
print(json.dumps(rates))
"""


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pa.Table]:
    """tts turns -> split (dialogue mode) -> tokenize (SNAC) -> voice_assistant; and
    voice_assistant straight after split (no codes)."""
    from testkit.snac import build_snac

    tmp = tmp_path_factory.mktemp("va")
    rows = make_dialogue_rows(tmp / "clips", SPECS)
    tts = write_tts_stage(tmp / "synth", rows, dropped_rejects(SPECS))
    model = build_snac(tmp / "snac")
    dag = dag_with(tmp, tts, f"""
  - id: split
    uses: split
    needs: [src]
    with: {{mode: dialogue, dev_fraction: 0.25, test_fraction: 0.0, seed: 1}}
  - id: tok
    uses: tokenize
    needs: [split]
    with: {{audio: {{backend: snac, path: "{model}", device: cpu}}, text: null}}
  - id: va
    uses: voice_assistant
    needs: [tok]
    with: {{shard_size: 2, answer_audio: true}}
  - id: va_plain
    uses: voice_assistant
    needs: [split]
    with: {{by_split: false, audio_format: wav}}
""")
    assert run(load_dag(dag), progress=False).status == "succeeded"
    return tmp / "run", rows


def _files(d: Path) -> dict[str, list[str]]:
    files: dict[str, list[str]] = {}
    for p in sorted((d / "data").glob("*.parquet")):
        files.setdefault(p.name.split("-", 1)[0], []).append(str(p))
    return files


def _decode(files: dict[str, list[str]], tmp: Path
            ) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Question clips as ``datasets`` decodes them (torchcodec, in a subprocess: with the
    FFmpeg this environment has, else with PyAV's bundled one). Skips, saying why, where
    torchcodec can load neither."""
    from tests.manifests.test_parquet_export import ffmpeg_env

    out = tmp / "decoded.npz"
    why = []
    for where, env in (("this environment", dict(os.environ)),
                       ("PyAV's bundled FFmpeg", ffmpeg_env(tmp))):
        if env is None:
            why.append(f"{where}: PyAV has no bundled FFmpeg")
            continue
        probe = subprocess.run([sys.executable, "-c", PROBE], capture_output=True,
                               text=True, env=env, timeout=300)
        if probe.returncode:
            lines = probe.stderr.strip().splitlines() or [f"exit {probe.returncode}"]
            why.append(f"{where}: {lines[-1]}")
            continue
        p = subprocess.run([sys.executable, "-c", DECODE, json.dumps(files),
                            str(tmp / "hf-cache"), str(out)],
                           capture_output=True, text=True, env=env, timeout=300)
        assert p.returncode == 0, p.stderr[-3000:]
        rates = json.loads(p.stdout.strip().splitlines()[-1])
        with np.load(out) as z:
            return {k: z[k] for k in z.files}, rates
    pytest.skip("datasets cannot decode Audio here: torchcodec cannot load FFmpeg ("
                + "; ".join(why) + ")")


def test_datasets_loads_one_row_per_round(exported, tmp_path: Path) -> None:
    run_dir, rows = exported
    by_id = {r["id"]: r for r in rows.to_pylist()}
    split_of = {r["dialogue_id"]: r["split"] for r in
                pq.read_table(sorted((run_dir / "stages/split").glob("part-*"))).to_pylist()}
    files = _files(run_dir / "exports/va")
    assert set(files) == {"train", "dev"}
    ds = datasets.load_dataset("parquet", data_files=files, cache_dir=str(tmp_path / "c"))
    feats = ds["train"].features
    assert list(feats) == COLUMNS[:6] + ["answer_snac", "answer_audio"] + COLUMNS[7:]
    assert isinstance(feats["question_audio"], datasets.Audio)
    assert isinstance(feats["answer_audio"], datasets.Audio)
    assert feats["index"] == datasets.Value("int64") and feats["synthetic"] == \
        datasets.Value("bool")
    got: dict[tuple[str, int], dict[str, Any]] = {}
    for name in ds:
        d = ds[name].cast_column("question_audio", datasets.Audio(decode=False)) \
            .cast_column("answer_audio", datasets.Audio(decode=False))
        indexes = sorted({ex["index"] for ex in d})
        assert indexes == list(range(len(indexes)))  # dialogues numbered per split
        for ex in d:
            assert split_of[ex["dialogue_id"]] == name
            got[(ex["dialogue_id"], ex["round"])] = ex
    # complete dialogues only (the one that lost round 3 is rejected): 1 + 2 + 1 rounds
    assert len(got) == 4
    for (did, k), ex in got.items():
        q, a = by_id[f"{did}-{2 * k:03d}"], by_id[f"{did}-{2 * k + 1:03d}"]
        assert (ex["question"], ex["answer"]) == (q["text"], a["text"])
        assert (ex["question_id"], ex["answer_id"]) == (q["id"], a["id"])
        assert ex["split_name"] == "dialogue_generate" and ex["llm"] == "fixture-llm"
        assert ex["synthetic"] is True
        assert (ex["question_voice"], ex["answer_voice"]) == (q["voice_id"], a["voice_id"])
        assert ex["question_tts"] == f"{q['tts_backend']} {q['tts_version']}"
        assert json.loads(ex["provenance"])["answer"]["voice_id"] == a["voice_id"]
        y, sr = sf.read(io.BytesIO(ex["answer_audio"]["bytes"]), dtype="float32")
        np.testing.assert_allclose(y, clip(a), atol=Q)


def test_datasets_decodes_the_question_audio_to_the_user_turn(exported,
                                                              tmp_path: Path) -> None:
    """``datasets``' own Audio decoding (not soundfile on the bytes) gives each round's
    user clip at its sample rate."""
    run_dir, rows = exported
    by_id = {r["id"]: r for r in rows.to_pylist()}
    files = _files(run_dir / "exports/va")
    qids = pa.concat_tables([pq.read_table(f, columns=["question_id"])
                             for fs in files.values() for f in fs]).column(0).to_pylist()
    assert len(qids) == 4
    arrays, rates = _decode(files, tmp_path)
    assert sorted(arrays) == sorted(qids)
    for qid, x in arrays.items():
        assert rates[qid] == by_id[qid]["sample_rate"]
        assert x.shape == clip(by_id[qid]).shape
        np.testing.assert_allclose(x, clip(by_id[qid]), atol=Q)


def test_answer_snac_is_mini_omni_text_of_the_answer_codes(exported) -> None:
    run_dir, _ = exported
    tok = pq.read_table(sorted((run_dir / "stages/tok").glob("part-*"))).to_pylist()
    codes = {r["id"]: r["codes"] for r in tok}
    t = pa.concat_tables([pq.read_table(f) for fs in _files(run_dir / "exports/va").values()
                          for f in fs])
    assert t.num_rows == 4
    for r in t.to_pylist():
        s = r["answer_snac"]
        c0, c1, c2 = codes[r["answer_id"]]
        assert s.startswith("# ") and s.count("#") == len(c0)
        frames = [f.split() for f in s.split("#")[1:]]
        assert all(len(f) == 7 for f in frames)
        back = parse_snac_text(s)
        assert [b.tolist() for b in back] == [c0, c1, c2]
        # frame t's 7 codes are the 7 Mini-Omni streams at step t (delay i + 1)
        streams = layouts.mini_omni_flatten([np.asarray(c) for c in (c0, c1, c2)], shift=0)
        for i in range(7):
            col = streams[i, i + 1:i + 1 + len(c0)] - i * 4160
            assert [int(f[i]) for f in frames] == col.tolist()


def test_without_codes_answer_snac_is_null(exported) -> None:
    run_dir, _ = exported
    files = _files(run_dir / "exports/va_plain")
    assert list(files) == ["train"] and len(files["train"]) == 1
    t = pq.read_table(files["train"][0])
    assert t.column_names == COLUMNS
    assert t.num_rows == 4 and t.column("answer_snac").null_count == 4
    for a in t.column("question_audio").to_pylist():
        assert sf.info(io.BytesIO(a["bytes"])).format == "WAV"
    m = json.loads((run_dir / "stages/va_plain/metrics.json").read_text())
    assert m["stage_summary"]["answer_snac"] is False
    assert m["reasons"] == {"dialogue_incomplete": 3}
    card = (run_dir / "exports/va_plain/README.md").read_text()
    assert "path: data/train-*" in card


def test_snac_text_round_trip_and_bad_codes() -> None:
    rng = np.random.default_rng(0)
    cs = [rng.integers(0, 4096, 5 * 2**j).tolist() for j in range(3)]
    s = snac_text(cs)
    assert [b.tolist() for b in parse_snac_text(s)] == cs
    assert s.split()[:8] == ["#", str(cs[0][0]), str(cs[1][0]), str(cs[2][0]),
                             str(cs[2][1]), str(cs[1][1]), str(cs[2][2]), str(cs[2][3])]
    with pytest.raises(ValueError, match="rates 1:2:4"):
        snac_text([cs[0], cs[1], cs[2][:-1]])
    with pytest.raises(ValueError, match="3 codebooks"):
        snac_text(cs[:2])


def test_codes_of_another_codec_are_a_configuration_error(exported, tmp_path: Path
                                                          ) -> None:
    _, rows = exported
    n = rows.num_rows
    other = json.dumps({"name": "mimi", "codebook_sizes": [2048] * 8})
    t = rows.append_column("codes", pa.array([[[1, 2]] * 8] * n, pa.list_(pa.list_(
        pa.int32())))).append_column("audio_tokenizer", pa.array([other] * n))
    st = VoiceAssistantExport(VoiceAssistantConfig(), StageContext("va", str(tmp_path)))
    with pytest.raises(ConfigError, match=r"stage 'va'.*SNAC 24 kHz.*mimi"):
        st.export(t, tmp_path / "out")
