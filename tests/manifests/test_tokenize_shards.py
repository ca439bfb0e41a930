"""``tokenize`` (k-means units fitted on the corpus, SNAC, whisper text ids) and the
``shards`` sink, run through the engine on real speech."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from speechmill.manifests.tokenizers import layouts
from speechmill.pipeline.dag import load as load_dag
from speechmill.pipeline.errors import ConfigError
from speechmill.pipeline.runner import run
from testkit.conversations import espeak_available
from tests.manifests.conftest import dag_with

TOKENIZE = """
  - id: split
    uses: split
    needs: [src]
    with: {dev_fraction: 0.2, test_fraction: 0.2}
  - id: tok
    uses: tokenize
    needs: [split]
    with:
      audio: {backend: kmeans-mel, n_units: 24, fit_max_frames: 4000}
      text: {backend: whisper, name: gpt2}
  - id: shards
    uses: shards
    needs: [tok]
    with: {shard_size: 2}
  - id: sgpt
    uses: shards
    needs: [tok]
    with: {layout: speechgpt, by_split: false}
"""


def _read(d: Path):
    return pq.read_table(sorted(d.glob("part-*.parquet")))


@pytest.fixture(scope="module")
def tokenized(tmp_path_factory: pytest.TempPathFactory, segments_dir) -> Path:
    tmp = tmp_path_factory.mktemp("tok")
    d, _ = segments_dir
    res = run(load_dag(dag_with(tmp, d / "segments.parquet", TOKENIZE)), progress=False)
    assert res.status == "succeeded"
    return tmp / "run"


def test_codes_and_text_ids(tokenized: Path, segments_dir) -> None:
    from speechmill.manifests.tokenizers.base import TextTokenizerConfig, load_text_tokenizer

    _, seg = segments_dir
    out = _read(tokenized / "stages/tok")
    assert out.num_rows == seg.num_rows
    codec = json.loads(out.column("audio_tokenizer")[0].as_py())
    assert codec["name"] == "kmeans-mel" and codec["frame_rate"] == 50
    assert codec["codebook_sizes"] == [24] and codec["version"].startswith("km-")
    tok = load_text_tokenizer(TextTokenizerConfig(backend="whisper", name="gpt2"))
    for r in out.to_pylist():
        assert len(r["codes"]) == 1
        assert abs(len(r["codes"][0]) - r["duration"] * 50) <= 2
        assert min(r["codes"][0]) >= 0 and max(r["codes"][0]) < 24
        assert len(set(r["codes"][0])) > 3  # speech uses many units
        assert tok.decode(r["text_ids"]).strip() == r["text"]
    # the fitted codebook is kept for reuse
    assert (tokenized / "models/tok/codebook.npy").exists()


def test_shards_index_and_metadata(tokenized: Path) -> None:
    sd = tokenized / "shards/shards"
    index = json.loads((sd / "index.json").read_text())
    files = sorted(p.relative_to(sd).as_posix() for p in sd.rglob("*.parquet"))
    assert files == sorted(s["file"] for s in index["shards"])
    # splits are by speaker: the segments have three speakers with eSpeak NG, one without
    splits = {"train", "dev", "test"} if espeak_available() else {"train"}
    assert {s["split"] for s in index["shards"]} == splits
    total = 0
    for s in index["shards"]:
        t = pq.read_table(sd / s["file"])
        assert t.num_rows == s["rows"] <= 2
        assert set(t.column("split").to_pylist()) == {s["split"]}
        assert str(t.schema.field("codes").type) == "list<element: list<element: int16>>"
        assert sum(len(c) for cs in t.column("codes").to_pylist() for c in cs) == \
            s["audio_tokens"]
        import hashlib

        assert hashlib.sha256((sd / s["file"]).read_bytes()).hexdigest() == s["sha256"]
        meta = json.loads(t.schema.metadata[b"speechmill"])
        assert meta["codec"]["name"] == "kmeans-mel"
        assert meta["text_tokenizer"]["name"] == "whisper:gpt2"
        total += t.num_rows
    assert index["totals"]["rows"] == total
    m = json.loads((tokenized / "stages/shards/metrics.json").read_text())
    assert m["rows_out"] == total and m["rows_rejected"] == 0


def test_speechgpt_units_match_codes(tokenized: Path) -> None:
    t = pq.read_table(tokenized / "shards/sgpt/shard-00000.parquet")
    for r in t.to_pylist():
        assert r["units"].startswith("<sosp>") and r["units"].endswith("<eosp>")
        assert layouts.parse_speechgpt_units(r["units"]).tolist() == r["codes"][0]


def test_same_input_same_bytes(tokenized: Path, tmp_path: Path, segments_dir) -> None:
    d, _ = segments_dir
    res = run(load_dag(dag_with(tmp_path, d / "segments.parquet", TOKENIZE)), progress=False)
    assert res.status == "succeeded"
    a = sorted((tokenized / "shards").rglob("*.*"))
    b = sorted((tmp_path / "run/shards").rglob("*.*"))
    assert [p.relative_to(tokenized) for p in a] == [p.relative_to(tmp_path / "run") for p in b]
    for x, y in zip(a, b, strict=True):
        assert x.read_bytes() == y.read_bytes(), x


def test_mini_omni_needs_snac(tmp_path: Path, segments_dir) -> None:
    d, _ = segments_dir
    dag = dag_with(tmp_path, d / "segments.parquet", """
  - id: tok
    uses: tokenize
    needs: [src]
    with: {audio: {backend: kmeans-mel, n_units: 8, fit_max_frames: 500}, text: null}
  - id: mo
    uses: shards
    needs: [tok]
    with: {layout: mini-omni}
""")
    with pytest.raises(ConfigError, match=r"stage 'mo'.*layout|layout.*stage 'mo'"):
        run(load_dag(dag), progress=False)


def test_snac_mini_omni_shards(tmp_path: Path, segments_dir) -> None:
    """A small random SNAC saved the way SNAC.from_pretrained reads it, through tokenize
    and the Mini-Omni 7-stream layout; the streams unflatten back to the codes."""
    from testkit.snac import build_snac

    d, seg = segments_dir
    model = build_snac(tmp_path / "snac")
    dag = dag_with(tmp_path, d / "segments.parquet", f"""
  - id: tok
    uses: tokenize
    needs: [src]
    with: {{audio: {{backend: snac, path: "{model}", device: cpu}}, text: null}}
  - id: mo
    uses: shards
    needs: [tok]
    with: {{layout: mini-omni}}
""")
    assert run(load_dag(dag), progress=False).status == "succeeded"
    t = pq.read_table(tmp_path / "run/shards/mo/shard-00000.parquet")
    assert t.num_rows == seg.num_rows
    for r in t.to_pylist()[:4]:
        c0, c1, c2 = (np.asarray(c) for c in r["codes"])
        assert len(c1) == 2 * len(c0) and len(c2) == 4 * len(c0)
        streams = np.asarray(r["codes_7"])
        assert streams.shape[0] == 7
        back = layouts.mini_omni_unflatten(streams)
        assert [b.tolist() for b in back] == [c0.tolist(), c1.tolist(), c2.tolist()]
    meta = json.loads(t.schema.metadata[b"speechmill"])
    assert meta["layout"]["name"] == "mini-omni"
    assert meta["layout"]["params"]["padded_text_vocab_size"] == 152000


def test_unreadable_audio_is_a_reject(tmp_path: Path, segments_dir) -> None:
    import pyarrow as pa

    d, seg = segments_dir
    rows = seg.slice(0, 3).to_pylist()
    rows[1] = {**rows[1], "id": "bad-00000000-00001000", "audio_path": str(tmp_path / "nope.flac")}
    (tmp_path / "html.flac").write_text("<html>404</html>")
    rows[2] = {**rows[2], "id": "html-00000000-00001000", "audio_path": str(tmp_path / "html.flac")}
    pq.write_table(pa.Table.from_pylist(rows, schema=seg.schema), tmp_path / "few.parquet")
    cb = tmp_path / "cb.npy"
    from speechmill.manifests.tokenizers.kmeans import save_codebook

    save_codebook(cb, np.random.default_rng(0).normal(size=(8, 80)).astype(np.float32))
    dag = dag_with(tmp_path, tmp_path / "few.parquet", f"""
  - id: tok
    uses: tokenize
    needs: [src]
    with: {{audio: {{backend: kmeans-mel, n_units: 8, codebook: "{cb}"}}}}
""")
    assert run(load_dag(dag), progress=False).status == "succeeded"
    m = json.loads((tmp_path / "run/stages/tok/metrics.json").read_text())
    assert (m["rows_out"], m["rows_rejected"]) == (1, 2)
    assert m["reasons"] == {"not_audio": 1, "unreadable": 1}


def test_fitted_codebook_is_reused_on_resume(tmp_path: Path, segments_dir,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The k-means fit runs once per (config, input ids); a resumed run reuses the saved
    codebook; other inputs fit anew."""
    from speechmill.manifests import tokens as tk
    from speechmill.manifests.tokenizers import kmeans
    from speechmill.pipeline.stage import StageContext

    _, seg = segments_dir
    cfg = tk.TokenizeConfig(audio={"n_units": 8, "fit_max_frames": 1000}, text=None)
    ctx = StageContext("tok", str(tmp_path / "run"))
    first = tk.Tokenize.prepare(cfg, seg, ctx)
    saved = Path(first["codebook"]).read_bytes()

    def no_fit(*a, **k):
        raise AssertionError("refitted")

    monkeypatch.setattr(kmeans, "fit_codebook", no_fit)
    again = tk.Tokenize.prepare(cfg, seg.take(list(reversed(range(seg.num_rows)))), ctx)
    assert again == first and Path(again["codebook"]).read_bytes() == saved
    with pytest.raises(AssertionError, match="refitted"):
        tk.Tokenize.prepare(cfg, seg.slice(0, 5), ctx)
