"""A sink's input beyond ``executor.wave_rows`` rows is sorted on disk and memory-mapped:
the same rows in the same order as the in-memory path, every export byte-identical, and
the Arrow heap bounded by the run size, not by the input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from speechmill.pipeline.dag import load as load_dag
from speechmill.pipeline.records import concat
from speechmill.pipeline.runner import run
from speechmill.pipeline.sink_input import (
    ORDER_KEY,
    SPILL_KEY,
    filter_rows,
    read_sink_input,
    sort_rows,
    split_order,
    unique_by_id,
)


def _parts(tmp: Path) -> list[Path]:
    """Four parts: ids out of order, repeated across parts (the first copy must win),
    splits including none, a column missing from one part and a null-typed one."""
    import random

    rnd = random.Random(7)
    splits = ["train", "dev", "test", "other", None]
    paths = []
    n = 0
    for k in range(4):
        ids = [f"r{rnd.randrange(400):04d}-{rnd.randrange(10)}" for _ in range(150)]
        cols: dict[str, list] = {
            "id": ids,
            "split": [splits[(int(i[1:5]) + k) % 5] for i in ids],  # copies differ
            "duration": [float(len(i) + k) for i in ids],
            "part": [k] * len(ids),
            "row": list(range(n, n + len(ids))),
        }
        if k != 1:
            cols["text"] = [f"{i} from part {k}" for i in ids]
        if k == 3:
            cols["extra"] = [None] * len(ids)
        n += len(ids)
        p = tmp / f"part-{k}.parquet"
        pq.write_table(pa.table(cols), p)
        paths.append(p)
    return paths


@pytest.mark.parametrize("by_split", [True, False])
def test_external_sort_equals_in_memory(tmp_path: Path, by_split: bool) -> None:
    parts = _parts(tmp_path)
    whole = unique_by_id(concat([pq.read_table(p) for p in parts]))
    assert whole.num_rows < 600  # repeats were dropped
    mem = read_sink_input(parts, by_split=by_split, max_rows=10_000, spill=tmp_path / "m")
    ext = read_sink_input(parts, by_split=by_split, max_rows=37, spill=tmp_path / "x")
    assert not (tmp_path / "m").exists()  # small: no spill
    order = b"split,id" if by_split else b"id"
    assert mem.schema.metadata[ORDER_KEY] == ext.schema.metadata[ORDER_KEY] == order
    assert SPILL_KEY in ext.schema.metadata
    # nothing but the sorted per-split files is left in the spill directory
    left = sorted(p.name for p in (tmp_path / "x").iterdir())
    assert left and all(n.startswith("sorted-") for n in left)
    names = split_order(whole.column("split").to_pylist()) if by_split else []
    want = sort_rows(whole, "split,id" if by_split else "id", names).to_pylist()
    assert mem.to_pylist() == want
    assert ext.to_pylist() == want
    # first copy in part order won
    first: dict[str, int] = {}
    for r in concat([pq.read_table(p) for p in parts]).to_pylist():
        first.setdefault(r["id"], r["row"])
    assert {r["id"]: r["row"] for r in ext.to_pylist()} == first


def test_filter_rows_spills_a_mapped_table(tmp_path: Path) -> None:
    import numpy as np

    parts = _parts(tmp_path)
    ext = read_sink_input(parts, by_split=True, max_rows=50, spill=tmp_path / "x")
    mask = np.arange(ext.num_rows) % 3 != 0
    before = set((tmp_path / "x").iterdir())
    got = filter_rows(ext, mask)
    assert len(set((tmp_path / "x").iterdir()) - before) == 1  # written there, mapped
    assert got.to_pylist() == ext.filter(pa.array(mask)).to_pylist()
    assert got.schema.metadata == ext.schema.metadata
    plain = pa.table({"id": ["a", "b"]})
    assert filter_rows(plain, np.array([True, False])).column("id").to_pylist() == ["a"]


DAG = """
name: waves
run_dir: {run}
executor: {{type: local, progress: false, wave_rows: {wave}}}
stages:
  - {{id: src, uses: read_parquet, with: {{paths: ["{src}"]}}}}
  - {{id: split, uses: split, needs: [src], with: {{dev_fraction: 0.2, test_fraction: 0.2}}}}
  - {{id: nemo, uses: nemo, needs: [split]}}
  - {{id: tarred, uses: nemo, needs: [split], with: {{tarred: true, shard_size: 4}}}}
  - {{id: lhotse, uses: lhotse, needs: [split]}}
  - {{id: hf, uses: parquet, needs: [split], with: {{shard_size: 5}}}}
  - {{id: tok, uses: tokenize, needs: [split],
      with: {{audio: {{backend: kmeans-mel, n_units: 16, fit_max_frames: 3000}},
              text: {{backend: whisper, name: gpt2}}}}}}
  - {{id: shards, uses: shards, needs: [tok], with: {{shard_size: 3}}}}
  - {{id: shar, uses: lhotse_shar, needs: [tok], with: {{shard_size: 4}}}}
"""


def test_exports_identical_when_sorted_on_disk(tmp_path: Path, segments_dir) -> None:
    d, seg = segments_dir
    outs = {}
    for name, wave in (("mem", 200_000), ("disk", 4)):
        dag = tmp_path / f"{name}.yaml"
        dag.write_text(DAG.format(run=tmp_path / name, wave=wave, src=d / "segments.parquet"))
        res = run(load_dag(dag), progress=False)
        assert res.status == "succeeded"
        outs[name] = tmp_path / name / "exports"
        assert not (tmp_path / name / "tmp" / "nemo").exists()  # spill removed
    files = sorted(p.relative_to(outs["mem"]) for p in outs["mem"].rglob("*") if p.is_file())
    assert len(files) > 30
    for f in files:
        a, b = (outs["mem"] / f).read_bytes(), (outs["disk"] / f).read_bytes()
        if f.name == "index.json":  # the shard index names the run's own directory
            a, b = (json.dumps(json.loads(x), sort_keys=True) for x in (a, b))
        assert a == b, f
    assert sorted(p.relative_to(outs["disk"]) for p in outs["disk"].rglob("*")
                  if p.is_file()) == files
    manifest = [json.loads(x) for x in (outs["mem"] / "nemo" / "train" / "manifest.json")
                .read_text().splitlines()]
    assert manifest and [e["id"] for e in manifest] == sorted(e["id"] for e in manifest)


MEASURE = r"""
import json, sys
from pathlib import Path
import pyarrow as pa
from speechmill.manifests.nemo import NemoManifest as NemoExport
from speechmill.pipeline.sink_input import read_sink_input
from speechmill.pipeline.stage import StageContext

parts, spill, max_rows, out = json.loads(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4]
t = read_sink_input([Path(p) for p in parts], by_split=True, max_rows=max_rows,
                    spill=Path(spill))
stage = NemoExport(NemoExport.Config(require_text=True), StageContext(stage_id="nemo", run_dir=spill))
res = stage.export(t, Path(out))
print(json.dumps({"peak": pa.default_memory_pool().max_memory(), "rows": res.rows_out,
                  "rejected": res.rejects.num_rows}))
"""


def test_large_export_heap_is_bounded(tmp_path: Path) -> None:
    """40k rows with 4 KB transcripts (~170 MB of Arrow): sorted on disk in runs of 2000
    rows, the export's Arrow heap peak stays a fraction of the input; the in-memory path
    (same process code) needs all of it. Every 50th row has no text (a spilled filter)."""
    import numpy as np
    import soundfile as sf

    wav = tmp_path / "a.wav"
    sf.write(wav, np.zeros(16000 * 20, np.float32), 16000)
    parts = []
    n, per = 40_000, 1_000  # upstream parts are batch-sized
    rng = np.random.default_rng(0)
    order = rng.permutation(n)
    for k in range(n // per):
        idx = order[k * per:(k + 1) * per]
        p = tmp_path / f"part-{k:03d}.parquet"
        pq.write_table(pa.table({
            "id": [f"u{i:07d}" for i in idx],
            "audio_path": [str(wav)] * per,
            "offset": [float(i % 10) for i in idx],
            "duration": [1.5] * per,
            "text": [None if i % 50 == 0 else f"{i} " + "x" * 4000 for i in idx],
            "split": [("train", "dev", "test")[i % 3] for i in idx],
            "speaker": [f"s{i % 7}" for i in idx],
        }), p)
        parts.append(str(p))
    data = sum(pq.read_metadata(p).num_rows for p in parts) * 4000
    peaks = {}
    for name, max_rows in (("mem", 10**9), ("disk", 2000)):
        p = subprocess.run([sys.executable, "-c", MEASURE, json.dumps(parts),
                            str(tmp_path / f"spill-{name}"), str(max_rows),
                            str(tmp_path / f"out-{name}")],
                           capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stderr[-3000:]
        r = json.loads(p.stdout.strip().splitlines()[-1])
        assert r["rows"] == n - n // 50 and r["rejected"] == n // 50
        peaks[name] = r["peak"]
    print("arrow heap peaks", peaks, "data", data)
    assert peaks["mem"] > data  # the measure sees the whole input when it is on the heap
    assert peaks["disk"] < data / 5, peaks  # one part + one run of 2000 rows, ~20 MB
    for split in ("train", "dev", "test"):
        a = (tmp_path / "out-mem" / split / "manifest.json").read_bytes()
        assert a == (tmp_path / "out-disk" / split / "manifest.json").read_bytes()


def test_external_sort_edge_inputs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Dictionary columns whose dictionaries differ between parts, null ids, an empty
    part, a part without ids, and more id ranges than files kept open at once."""
    from speechmill.pipeline import sink_input

    def part(name: str, ids: list, splits: list, **extra) -> Path:
        cols = {"split": pa.array(splits, pa.string()).dictionary_encode(),
                "topic": pa.array([f"t{len(name)}-{i}" for i in range(len(splits))])
                .dictionary_encode(), **extra}
        if ids is not None:
            cols = {"id": pa.array(ids, pa.string()), **cols}
        p = tmp_path / f"{name}.parquet"
        pq.write_table(pa.table(cols), p)
        return p

    parts = [
        part("a", [f"x{i:03d}" for i in range(40)] + [None], ["train", "dev"] * 20 + ["dev"]),
        part("b", [], []),
        part("cc", [f"x{i:03d}" for i in range(30, 70)] + [None], ["test"] * 41),
        part("ddd", None, ["train", None]),
    ]
    monkeypatch.setattr(sink_input, "MAX_OPEN", 3)  # 12 ranges: parts read 4 times
    for by_split in (True, False):
        mem = read_sink_input(parts, by_split=by_split, max_rows=10**6, spill=tmp_path / "m")
        ext = read_sink_input(parts, by_split=by_split, max_rows=8, spill=tmp_path / "x")
        assert ext.to_pylist() == mem.to_pylist()
        assert ext.schema.remove_metadata() == mem.schema.remove_metadata()
        ids = [r["id"] for r in ext.to_pylist()]
        assert ids.count(None) == 1 and len(ids) == 71
    assert pa.types.is_dictionary(ext.schema.field("topic").type)
