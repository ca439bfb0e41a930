"""The ``parquet`` exporter: Hugging Face ``datasets`` loads it with an ``Audio`` feature.

``datasets`` >= 4 decodes audio with torchcodec, which needs FFmpeg's shared libraries.
Where torchcodec cannot load in this process, the decode check runs in a subprocess whose
``LD_LIBRARY_PATH`` points at the FFmpeg that PyAV's wheel carries (symlinked under their
usual sonames); only when that fails too is the audio decoded from the loaded bytes with
soundfile (``Audio(decode=False)``).
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from speechmill.manifests.parquet_export import ParquetExport
from speechmill.pipeline import dag as dagmod
from speechmill.pipeline.clips import read_clip
from speechmill.pipeline.runner import run
from speechmill.pipeline.stage import StageContext
from testkit.segments import make_segments
from tests.manifests.conftest import tones_then

datasets = pytest.importorskip("datasets")

Q = 2.0 / 32768  # 16-bit quantisation (+ rounding) tolerance
NAME = re.compile(r"^(?P<split>\w+)-(?P<i>\d{5})-of-(?P<n>\d{5})\.parquet$")

DECODE = r"""
import io, json, sys
import numpy as np
import soundfile as sf
try:  # torchcodec loads FFmpeg on first use
    from torchcodec.decoders import AudioDecoder
    buf = io.BytesIO()
    sf.write(buf, np.zeros(160, np.float32), 16000, format="WAV")
    AudioDecoder(buf.getvalue()).get_all_samples()
except Exception:
    sys.exit(3)
import datasets
files, cache, out = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
ds = datasets.load_dataset("parquet", data_files=files, cache_dir=cache)
arrays, rates = {}, {}
for split in ds:
    assert isinstance(ds[split].features["audio"], datasets.Audio)
    for ex in ds[split]:
        s = ex["audio"].get_all_samples()
        arrays[ex["id"]] = s.data.numpy().mean(axis=0)
        rates[ex["id"]] = int(s.sample_rate)
np.savez(out, **arrays)
print(json.dumps(rates))
"""


@pytest.fixture(scope="module")
def segs(tmp_path_factory: pytest.TempPathFactory) -> pa.Table:
    return make_segments(tmp_path_factory.mktemp("segs"), n_recordings=3, per_recording=3)


def export(table: pa.Table, out: Path, run_dir: Path, **cfg: Any):
    stage = ParquetExport(ParquetExport.Config(**cfg),
                          StageContext(stage_id="parquet", run_dir=str(run_dir)))
    out.mkdir(parents=True, exist_ok=True)
    return stage.export(table, out)


def data_files(out: Path) -> dict[str, list[str]]:
    """Files by split; checks the HF naming and that shards number 0..n-1 of n."""
    files: dict[str, list[str]] = {}
    for p in sorted((out / "data").iterdir()):
        m = NAME.match(p.name)
        assert m, p.name
        files.setdefault(m["split"], []).append(str(p))
    for split, fs in files.items():
        n = len(fs)
        assert [Path(f).name for f in fs] == [f"{split}-{i:05d}-of-{n:05d}.parquet"
                                              for i in range(n)]
    return files


def ffmpeg_env(tmp: Path) -> dict[str, str] | None:
    """An environment in which torchcodec finds PyAV's bundled FFmpeg, if PyAV has one."""
    try:
        import av
    except ImportError:
        return None
    libs = Path(av.__file__).resolve().parent.parent / "av.libs"
    if not libs.is_dir():
        return None
    links = tmp / "ffmpeg-libs"
    links.mkdir(exist_ok=True)
    for name in ("avutil", "avcodec", "avformat", "avdevice", "avfilter", "swscale",
                 "swresample"):
        for f in libs.glob(f"lib{name}-*.so.*"):
            major = f.name.split(".so.", 1)[1].split(".")[0]
            link = links / f"lib{name}.so.{major}"
            if not link.exists():
                link.symlink_to(f)
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(
        [str(links), str(libs)] + [p for p in [env.get("LD_LIBRARY_PATH")] if p])
    return env


def decode_with_datasets(files: dict[str, list[str]], tmp: Path
                         ) -> tuple[dict[str, np.ndarray], dict[str, int]] | None:
    """Every clip as ``datasets`` decodes it (torchcodec), or None where torchcodec has no
    FFmpeg to load."""
    out = tmp / "decoded.npz"
    for env in (dict(os.environ), ffmpeg_env(tmp)):
        if env is None:
            continue
        p = subprocess.run([sys.executable, "-c", DECODE, json.dumps(files),
                            str(tmp / "hf-cache"), str(out)],
                           capture_output=True, text=True, env=env, timeout=300)
        if p.returncode == 3:
            continue
        assert p.returncode == 0, p.stderr[-3000:]
        rates = json.loads(p.stdout.strip().splitlines()[-1])
        with np.load(out) as z:
            return {k: z[k] for k in z.files}, rates
    return None


def test_datasets_loads_audio(segs: pa.Table, tmp_path: Path) -> None:
    # splits, a bad row, shards of at most 2 rows
    (tmp_path / "notaudio.flac").write_text("not audio\n" * 100)
    bad = segs.slice(0, 2).to_pylist()
    bad[0].update(id="zz-gone", audio_path=str(tmp_path / "gone.flac"))
    bad[1].update(id="zz-text", audio_path=str(tmp_path / "notaudio.flac"), offset=0.0)
    table = pa.concat_tables([segs, pa.Table.from_pylist(bad, schema=segs.schema)])
    split = ["train" if i % 4 else "test" for i in range(table.num_rows)]
    table = table.append_column("split", pa.array(split))
    out = tmp_path / "hf"
    res = export(table, out, tmp_path, shard_size=2, columns=["words", "source_url"])
    assert {r["id"]: r["reason"] for r in res.rejects.to_pylist()} == {
        "zz-gone": "unreadable", "zz-text": "not_audio"}
    assert res.rows_out == segs.num_rows
    files = data_files(out)
    assert set(files) == {"train", "test"} and len(files["train"]) > 1
    assert res.summary["splits"]["train"]["shards"] == len(files["train"])

    # the schema metadata makes `audio` an Audio feature
    ds = datasets.load_dataset("parquet", data_files=files, cache_dir=str(tmp_path / "c1"))
    feats = ds["train"].features
    assert isinstance(feats["audio"], datasets.Audio)
    assert feats["text"] == datasets.Value("string")
    assert feats["dnsmos_ovrl"] == datasets.Value("float64")
    assert ds["train"].num_rows + ds["test"].num_rows == segs.num_rows
    rows = {r["id"]: r for r in segs.to_pylist()}
    raw = {}
    for name in ds:
        d = ds[name].cast_column("audio", datasets.Audio(decode=False))
        for ex in d:
            r = rows[ex["id"]]
            assert split[table.column("id").to_pylist().index(ex["id"])] == name
            assert (ex["text"], ex["speaker"], ex["language"]) == (
                r["text"], r["speaker"], r["language"])
            assert ex["dnsmos_ovrl"] == pytest.approx(r["scores"]["dnsmos_ovrl"])
            assert ex["words"] == r["words"] and ex["source_url"] == r["source_url"]
            assert ex["audio"]["path"] == f"{ex['id']}.flac"
            raw[ex["id"]] = ex

    decoded = decode_with_datasets(files, tmp_path)
    if decoded is None:  # no FFmpeg for torchcodec anywhere: decode the bytes ourselves
        arrays, rates = {}, {}
        for i, ex in raw.items():
            arrays[i], rates[i] = sf.read(io.BytesIO(ex["audio"]["bytes"]), dtype="float32")
    else:
        arrays, rates = decoded
    assert set(arrays) == set(rows)
    for i, x in arrays.items():
        r = rows[i]
        assert rates[i] == r["sample_rate"] == raw[i]["sample_rate"]
        assert abs(len(x) - r["duration"] * rates[i]) <= 1  # +- one frame
        assert raw[i]["duration"] == pytest.approx(len(x) / rates[i])
        y, _ = read_clip(r)
        np.testing.assert_allclose(x, y, atol=Q)

    # the dataset card maps the splits: load_dataset(DIR) works too
    ds2 = datasets.load_dataset(str(out), cache_dir=str(tmp_path / "c2"))
    assert sorted(ds2) == ["test", "train"] and ds2["test"].num_rows == ds["test"].num_rows

    # deterministic: same input, same bytes
    export(table, tmp_path / "again", tmp_path, shard_size=2, columns=["words", "source_url"])
    for f in sorted((out).rglob("*")):
        if f.is_file():
            assert f.read_bytes() == (tmp_path / "again" / f.relative_to(out)).read_bytes()


def test_byte_shards_resample_and_no_split(segs: pa.Table, tmp_path: Path) -> None:
    texts = segs.column("text").to_pylist()
    texts[0] = None
    table = segs.set_column(segs.schema.get_field_index("text"), "text", pa.array(texts))
    res = export(table, tmp_path / "a", tmp_path, shard_bytes=150_000, sample_rate=16000,
                 audio_format="wav", row_group_size=2)
    files = data_files(tmp_path / "a")
    assert list(files) == ["train"] and len(files["train"]) > 1
    t = pa.concat_tables([pq.read_table(f) for f in files["train"]])
    meta = json.loads(pq.read_schema(files["train"][0]).metadata[b"huggingface"])
    assert meta["info"]["features"]["audio"] == {"sampling_rate": 16000, "_type": "Audio"}
    assert t.num_rows == segs.num_rows and t.column("text").to_pylist().count("") == 1
    assert set(t.column("sample_rate").to_pylist()) == {16000}
    for a in t.column("audio").to_pylist():
        assert sf.info(io.BytesIO(a["bytes"])).format == "WAV"
    res = export(table, tmp_path / "b", tmp_path, require_text=True)
    assert res.rejects.column("reason").to_pylist() == ["no_text"]
    assert res.rows_out == segs.num_rows - 1
    res = export(segs.slice(0, 0), tmp_path / "empty", tmp_path)
    assert res.rows_out == 0 and not list((tmp_path / "empty" / "data").iterdir())
    with pytest.raises(ValueError, match="columns"):
        ParquetExport.validate_config(ParquetExport.Config(columns=["text"]))


def test_engine_parquet_sink(tmp_path: Path) -> None:
    """ingest -> standardize -> parquet through the runner (local executor)."""
    run_dir = tmp_path / "run"
    dag = dagmod.loads(tones_then(tmp_path, """
  - {id: hf, uses: parquet, needs: standardize}
""", 24000, "flac"))
    assert run(dag, progress=False).status == "succeeded"
    out = run_dir / "exports" / "hf"
    files = data_files(out)
    assert [Path(f).name for f in files["train"]] == ["train-00000-of-00001.parquet"]
    ds = datasets.load_dataset(str(out), split="train", cache_dir=str(tmp_path / "c"))
    assert ds.num_rows == 2 and isinstance(ds.features["audio"], datasets.Audio)
    ds = ds.cast_column("audio", datasets.Audio(decode=False))
    for ex in ds:
        x, sr = sf.read(io.BytesIO(ex["audio"]["bytes"]))
        assert sr == 16000 and abs(len(x) - 2.0 * sr) <= 1 and ex["text"] == ""
    metrics = json.loads((run_dir / "stages" / "hf" / "metrics.json").read_text())
    assert metrics["rows_out"] == 2
    assert metrics["stage_summary"]["splits"]["train"] == {
        "rows": 2, "hours": pytest.approx(4.0 / 3600), "shards": 1}
