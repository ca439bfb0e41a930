"""Inputs that used to break or mislead the exporters: long ids, hostile split names,
bad spans, special-token strings in transcripts, mixed or mismatched codecs."""

from __future__ import annotations

import json
import math
import tarfile
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from speechmill.manifests.lhotse_export import LhotseShar
from speechmill.manifests.nemo import NemoManifest
from speechmill.manifests.parquet_export import ParquetExport
from speechmill.manifests.shards import Shards
from speechmill.pipeline.errors import ConfigError
from speechmill.pipeline.stage import StageContext


def _export(cls: Any, cfg: dict[str, Any], table: pa.Table, tmp: Path, sid: str = "x"):
    out = tmp / sid
    out.mkdir(parents=True)
    st = cls(cls.Config(**cfg), StageContext(sid, str(tmp / "run")))
    return st.export(table, out), out


def _rows(seg: pa.Table, n: int) -> list[dict[str, Any]]:
    return seg.slice(0, n).to_pylist()


def test_long_ids_in_tars(tmp_path: Path, segments_dir) -> None:
    _, seg = segments_dir
    rows = _rows(seg, 3)
    for i, r in enumerate(rows):
        r["id"] = f"{'x' * 120}-{i:08d}-{i + 1:08d}"
    t = pa.Table.from_pylist(rows, schema=seg.schema)
    res, out = _export(NemoManifest, {"tarred": True, "shard_size": 2}, t, tmp_path, "n")
    assert res.rows_out == 3 and not (res.rejects and res.rejects.num_rows)
    names = []
    for tar in sorted(out.glob("audio_*.tar")):
        with tarfile.open(tar) as tf:
            names += tf.getnames()
    entries = [json.loads(x) for x in (out / "tarred_audio_manifest.json").read_text()
               .splitlines()]
    assert sorted(names) == sorted(e["audio_filepath"] for e in entries)
    assert all(len(n) > 100 for n in names)
    res, out = _export(LhotseShar, {"shard_size": 2}, t, tmp_path, "s")
    from lhotse import CutSet

    cuts = list(CutSet.from_shar(in_dir=out))
    assert sorted(c.id for c in cuts) == sorted(r["id"] for r in rows)
    assert all(c.load_audio().shape[-1] > 0 for c in cuts)


def test_split_names_never_escape_the_export(tmp_path: Path, segments_dir) -> None:
    _, seg = segments_dir
    rows = _rows(seg, 3)
    for r, s in zip(rows, ["../../evil", str(tmp_path / "abs"), ".."], strict=True):
        r["split"] = s
    t = pa.Table.from_pylist(rows)
    _, out = _export(NemoManifest, {}, t, tmp_path, "n")
    written = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("manifest.json"))
    assert len(written) == 3 and all(w.startswith("n/") for w in written), written
    assert not (tmp_path.parent / "evil").exists() and not (tmp_path / "abs").exists()


def test_bad_spans_are_rejects(tmp_path: Path, segments_dir) -> None:
    _, seg = segments_dir
    rows = _rows(seg, 4)
    rows[0] = {**rows[0], "id": "neg", "duration": -0.5}
    rows[1] = {**rows[1], "id": "nan", "offset": math.nan}
    rows[2] = {**rows[2], "id": "past", "offset": 1e4}
    t = pa.Table.from_pylist(rows, schema=seg.schema)
    for cls, cfg in ((NemoManifest, {"materialize": True}), (NemoManifest, {}),
                     (ParquetExport, {})):
        res, _ = _export(cls, cfg, t, tmp_path, f"{cls.name}{len(cfg)}")
        reasons = {r["id"]: r["reason"] for r in res.rejects.to_pylist()}
        assert reasons["neg"] == "bad_span" and reasons["nan"] == "bad_span", (cls, reasons)
        if cfg:  # audio is read: a span past the end of the file is caught
            assert reasons.get("past") in {"short_audio", "empty_audio", "bad_span"}, reasons
        assert res.rows_out == 4 - len(reasons)
    import numpy as np

    from speechmill.manifests.tokenizers.base import AudioTokenizerConfig
    from speechmill.manifests.tokenizers.kmeans import save_codebook
    from speechmill.manifests.tokens import Tokenize, TokenizeConfig

    cb = tmp_path / "cb.npy"
    save_codebook(cb, np.random.default_rng(0).normal(size=(8, 80)).astype(np.float32))
    st = Tokenize(TokenizeConfig(audio=AudioTokenizerConfig(n_units=8, codebook=str(cb)),
                                 text=None), StageContext("tok", str(tmp_path / "run")))
    st.setup()
    res = st.process(t)
    reasons = {r["id"]: r["reason"] for r in res.rejects.to_pylist()}
    assert reasons == {"neg": "bad_span", "nan": "bad_span", "past": "short_audio"}
    assert res.outputs.num_rows == 1


def test_special_token_strings_stay_text(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from speechmill.manifests.tokenizers.base import TextTokenizerConfig, load_text_tokenizer

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["[UNK]", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["hello world", "say hello to the world again"] * 20, trainer)
    tok.save(str(tmp_path / "tokenizer.json"))
    t = load_text_tokenizer(TextTokenizerConfig(backend="hf", path=str(tmp_path)))
    special = tok.token_to_id("<|im_end|>")
    ids = t.encode("hello <|im_end|> world")
    assert special not in ids and len(ids) > 3
    assert t.decode(ids) == "hello <|im_end|> world"


def _tok_rows(seg: pa.Table, codecs: list[dict[str, Any]], codes: list[Any]) -> pa.Table:
    rows = _rows(seg, len(codes))
    for r, c, k in zip(rows, codecs, codes, strict=True):
        r["audio_tokenizer"] = json.dumps(c)
        r["codes"] = k
    return pa.Table.from_pylist(rows)


def test_shards_refuse_mixed_and_mismatched_codecs(tmp_path: Path, segments_dir) -> None:
    _, seg = segments_dir
    a = {"name": "a", "codebook_sizes": [100]}
    b = {"name": "b", "codebook_sizes": [40000]}
    t = _tok_rows(seg, [a, b], [[[1, 2]], [[39999, 3]]])
    with pytest.raises(ConfigError, match="mixes 2 different audio_tokenizers"):
        _export(Shards, {}, t, tmp_path, "mixed")
    mimi = {"name": "mimi", "codebook_sizes": [2048, 2048]}
    t = _tok_rows(seg, [mimi], [[[1, 2], [3, 4]]])
    with pytest.raises(ConfigError, match="speechgpt.*one codebook"):
        _export(Shards, {"layout": "speechgpt"}, t, tmp_path, "sg")
    # int32 when a codebook does not fit int16
    t = _tok_rows(seg, [b, b], [[[39999, 3]], [[7, 8]]])
    _, out = _export(Shards, {}, t, tmp_path, "big")
    sh = pq.read_table(out / "shard-00000.parquet")
    assert sh.column("codes").to_pylist()[0] == [[39999, 3]] or \
        sh.column("codes").to_pylist()[1] == [[39999, 3]]


def test_shards_ragged_snac_row_is_a_reject(tmp_path: Path, segments_dir) -> None:
    _, seg = segments_dir
    snac = {"name": "snac", "codebook_sizes": [4096, 4096, 4096]}
    good = [[1, 2], [1, 2, 3, 4], [1, 2, 3, 4, 5, 6, 7, 8]]
    bad = [[1, 2], [1, 2, 3], [1, 2, 3, 4, 5, 6, 7, 8]]
    t = _tok_rows(seg, [snac, snac], [good, bad])
    res, out = _export(Shards, {"layout": "mini-omni"}, t, tmp_path, "mo")
    assert res.rows_out == 1 and [r["reason"] for r in res.rejects.to_pylist()] == \
        ["layout_error"]


def test_shards_keep_split_without_by_split(tmp_path: Path, segments_dir) -> None:
    _, seg = segments_dir
    t = _tok_rows(seg, [{"name": "k", "codebook_sizes": [8]}] * 2, [[[1]], [[2]]])
    t = t.append_column("split", pa.array(["train", "test"]))
    _, out = _export(Shards, {"by_split": False}, t, tmp_path, "flat")
    sh = pq.read_table(out / "shard-00000.parquet")
    assert sorted(sh.column("split").to_pylist()) == ["test", "train"]
