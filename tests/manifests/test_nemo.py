"""The ``nemo`` exporter: plain, materialised and tarred manifests, checked against NeMo's
reading rules.

NeMo's own parser (``nemo.collections.common.parts.preprocessing.manifest``) cannot be
imported without hydra, omegaconf, lightning, onnx, nv-one-logger, ... so the rules are
checked here as NeMo 3.0 applies them:

- ``manifest.item_iter``/``__parse_item``: one JSON object per line with
  ``audio_filepath`` and ``duration`` (``text`` defaults to ""); a relative path is joined
  to the manifest's directory (``get_full_path``); ``offset`` is optional.
- tarred (``TarredAudioToTextDataset`` + webdataset, and the Lhotse
  ``LazyNeMoTarredIterator``): ``audio_{N}.tar`` pairs with
  ``sharded_manifests/manifest_{N}.json``; a tar member is matched to the entries whose
  ``audio_filepath`` equals its name (Lhotse) or whose ``splitext(basename(...))`` equals the
  member's webdataset key, i.e. its name up to the first dot (NeMo); a name ending in
  ``-sub<N>`` is read as an offset of another file (Lhotse).
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import soundfile as sf

from speechmill.manifests.nemo import NemoManifest
from speechmill.pipeline import dag as dagmod
from speechmill.pipeline.clips import clip_name, read_clip
from speechmill.pipeline.runner import run
from speechmill.pipeline.stage import StageContext
from speechmill.pipeline.store import RunStore
from testkit.segments import make_segments
from tests.manifests.conftest import tones_then

Q = 2.0 / 32768  # 16-bit quantisation (+ rounding) tolerance


@pytest.fixture(scope="module")
def segs(tmp_path_factory: pytest.TempPathFactory) -> pa.Table:
    return make_segments(tmp_path_factory.mktemp("segs"), n_recordings=3, per_recording=3)


def export(table: pa.Table, out: Path, run_dir: Path, **cfg: Any):
    stage = NemoManifest(NemoManifest.Config(**cfg),
                         StageContext(stage_id="nemo", run_dir=str(run_dir)))
    out.mkdir(parents=True, exist_ok=True)
    return stage.export(table, out)


def with_bad_rows(table: pa.Table, tmp: Path) -> pa.Table:
    """Two rows that cannot be cut: a missing file and a text file posing as audio."""
    (tmp / "notaudio.flac").write_text("hello, I am not audio\n" * 50)
    rows = table.slice(0, 2).to_pylist()
    rows[0].update(id="zz-missing", audio_path=str(tmp / "gone.flac"))
    rows[1].update(id="zz-notaudio", audio_path=str(tmp / "notaudio.flac"), offset=0.0)
    return pa.concat_tables([table, pa.Table.from_pylist(rows, schema=table.schema)])


def nemo_entries(manifest: Path) -> list[dict[str, Any]]:
    """Parse ``manifest`` the way NeMo's ``item_iter`` does and check every entry: required
    keys, the path resolved against the manifest's directory exists, and
    offset + duration lie within the file as soundfile decodes it."""
    out = []
    for line in manifest.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        e = json.loads(line)
        assert {"audio_filepath", "duration", "text"} <= set(e), e
        assert isinstance(e["text"], str) and e["duration"] > 0
        p = e["audio_filepath"]
        full = p if os.path.isabs(p) else os.path.join(os.path.dirname(manifest), p)
        assert os.path.isfile(full), full
        info = sf.info(full)
        end = float(e.get("offset") or 0.0) + float(e["duration"])
        assert end <= info.frames / info.samplerate + 1.0 / info.samplerate, (e, info.duration)
        out.append({**e, "_full": full})
    return out


def clip_of(entry: dict[str, Any]) -> tuple[np.ndarray, int]:
    info = sf.info(entry["_full"])
    start = round(float(entry.get("offset") or 0.0) * info.samplerate)
    n = round(float(entry["duration"]) * info.samplerate)
    x, sr = sf.read(entry["_full"], start=start, frames=n, dtype="float32")
    return x, sr


def all_bytes(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_reference_manifest_relative_and_absolute(segs: pa.Table, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # records may hold paths relative to the working directory
    monkeypatch.chdir(Path(segs.column("audio_path")[0].as_py()).parent.parent)
    rel = pa.array([os.path.relpath(p) for p in segs.column("audio_path").to_pylist()])
    table = segs.set_column(segs.schema.get_field_index("audio_path"), "audio_path", rel)
    res = export(table, tmp_path / "rel", tmp_path)
    assert res.rows_out == segs.num_rows and res.rejects.num_rows == 0
    assert res.seconds_out == pytest.approx(sum(segs.column("duration").to_pylist()))
    entries = nemo_entries(tmp_path / "rel" / "manifest.json")
    rows = {r["id"]: r for r in segs.to_pylist()}
    assert [e["id"] for e in entries] == sorted(rows)  # ordered by id
    for e in entries:
        r = rows[e["id"]]
        assert list(e)[:7] == ["audio_filepath", "duration", "offset", "text", "lang",
                               "speaker", "id"]
        assert not os.path.isabs(e["audio_filepath"])
        assert os.path.samefile(e["_full"], r["audio_path"])
        assert (e["offset"], e["duration"], e["text"], e["lang"], e["speaker"]) == (
            r["offset"], r["duration"], r["text"], r["language"], r["speaker"])
        assert e["dnsmos_ovrl"] == pytest.approx(r["scores"]["dnsmos_ovrl"])
        assert e["snr_db"] == 30.0 and "scores" not in e
        x, _ = clip_of(e)
        y, _ = read_clip(r)
        np.testing.assert_allclose(x, y, atol=1e-6)
    export(table, tmp_path / "abs", tmp_path, paths="absolute")
    for e in nemo_entries(tmp_path / "abs" / "manifest.json"):
        assert os.path.isabs(e["audio_filepath"]) and os.path.isfile(e["audio_filepath"])
    # without cutting clips only a missing file is a reject; empty input, empty manifest
    res = export(with_bad_rows(segs, tmp_path), tmp_path / "bad", tmp_path)
    assert [(r["id"], r["reason"]) for r in res.rejects.to_pylist()] == [
        ("zz-missing", "unreadable")]
    res = export(segs.slice(0, 0), tmp_path / "empty", tmp_path)
    assert res.rows_out == 0 and (tmp_path / "empty" / "manifest.json").read_text() == ""
    res = export(segs.slice(0, 0), tmp_path / "empty_t", tmp_path, tarred=True)
    assert (tmp_path / "empty_t" / "tarred_audio_manifest.json").read_text() == ""
    assert not list((tmp_path / "empty_t").glob("*.tar"))


def test_materialized_splits_rejects_and_determinism(segs: pa.Table, tmp_path: Path) -> None:
    splits = ["train", "train", "dev", "test"] * 3
    table = with_bad_rows(segs, tmp_path)
    table = table.append_column("split", pa.array(splits[: table.num_rows]))
    a = export(table, tmp_path / "a", tmp_path, materialize=True, workers=2)
    b = export(table, tmp_path / "b", tmp_path, materialize=True, workers=1)
    assert b.summary == a.summary
    assert all_bytes(tmp_path / "a") == all_bytes(tmp_path / "b")  # byte-identical
    rej = {r["id"]: r["reason"] for r in a.rejects.to_pylist()}
    assert rej == {"zz-missing": "unreadable", "zz-notaudio": "not_audio"}
    assert a.rows_out == segs.num_rows
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["dev", "test", "train"]
    assert a.summary["reasons"] == {"not_audio": 1, "unreadable": 1}
    rows = {r["id"]: r for r in segs.to_pylist()}
    split_of = dict(zip(table.column("id").to_pylist(), table.column("split").to_pylist(),
                        strict=True))
    seen = 0
    for split in ("train", "dev", "test"):
        entries = nemo_entries(tmp_path / "a" / split / "manifest.json")
        assert a.summary["splits"][split]["rows"] == len(entries) > 0
        for e in entries:
            assert "offset" not in e and e["audio_filepath"].startswith("audio/")
            assert split_of[e["id"]] == split
            x, sr = sf.read(e["_full"], dtype="float32")
            y, sry = read_clip(rows[e["id"]])
            assert sr == sry and len(x) == len(y)
            assert e["duration"] == pytest.approx(len(y) / sr)
            np.testing.assert_allclose(x, y, atol=Q)
            seen += 1
    assert seen == segs.num_rows
    assert NemoManifest.summary_lines(a.summary)[0].startswith("train: ")
    # WAV clips, resampled
    export(segs, tmp_path / "wav", tmp_path, materialize=True, audio_format="wav",
           sample_rate=16000)
    for e in nemo_entries(tmp_path / "wav" / "manifest.json"):
        assert e["audio_filepath"].endswith(".wav") and sf.info(e["_full"]).samplerate == 16000


def check_tarred(d: Path) -> list[dict[str, Any]]:
    """Every tar pairs with its sharded manifest one to one under NeMo's and Lhotse's
    matching rules; returns the entries with each member's bytes."""
    tars = sorted(d.glob("audio_*.tar"), key=lambda p: int(p.stem.split("_")[1]))
    shards = sorted((d / "sharded_manifests").glob("manifest_*.json"))
    n = len(tars)
    assert n >= 1 and [p.name for p in tars] == [f"audio_{i}.tar" for i in range(n)]
    assert sorted(p.name for p in shards) == sorted(f"manifest_{i}.json" for i in range(n))
    every = []
    for i in range(n):
        entries = [json.loads(x) for x in
                   (d / "sharded_manifests" / f"manifest_{i}.json").read_text().splitlines()]
        with tarfile.open(d / f"audio_{i}.tar") as tar:
            members = tar.getmembers()
            names = [m.name for m in members]
            data = {m.name: tar.extractfile(m).read() for m in members}
        assert names == [e["audio_filepath"] for e in entries]  # one to one, in order
        for e in entries:
            assert e["shard_id"] == i and "offset" not in e
            name = e["audio_filepath"]
            assert "/" not in name and name.count(".") == 1  # webdataset key = name[:dot]
            assert not re.match(r"^.+-sub\d+(\.\w+)?$", name)  # not an offset marker
            every.append({**e, "_bytes": data[name]})
    stems = [os.path.splitext(os.path.basename(e["audio_filepath"]))[0] for e in every]
    assert len(set(stems)) == len(stems)  # NeMo indexes the manifest by this file id
    whole = [json.loads(x) for x in (d / "tarred_audio_manifest.json").read_text().splitlines()]
    assert whole == [{k: v for k, v in e.items() if k != "_bytes"} for e in every]
    return every


def test_tarred_layout(segs: pa.Table, tmp_path: Path) -> None:
    table = with_bad_rows(segs, tmp_path)
    res = export(table, tmp_path / "t", tmp_path, tarred=True, shard_size=2, workers=2)
    assert res.rows_out == segs.num_rows and res.rejects.num_rows == 2
    every = check_tarred(tmp_path / "t")
    assert res.summary["splits"]["all"]["shards"] == len(list((tmp_path / "t").glob("*.tar")))
    rows = {r["id"]: r for r in segs.to_pylist()}
    assert sorted(e["id"] for e in every) == sorted(rows)
    for e in every:
        x, sr = sf.read(io.BytesIO(e["_bytes"]), dtype="float32")
        y, sry = read_clip(rows[e["id"]])
        assert sr == sry and len(x) == len(y)
        np.testing.assert_allclose(x, y, atol=Q)
        assert e["duration"] == pytest.approx(len(x) / sr) and e["text"] == rows[e["id"]]["text"]
    # same input, same bytes; byte-based shards with a split column
    again = export(table, tmp_path / "t2", tmp_path, tarred=True, shard_size=2)
    assert all_bytes(tmp_path / "t") == all_bytes(tmp_path / "t2") and again.rows_out == 9
    split = pa.array(["train" if i % 3 else "test" for i in range(segs.num_rows)])
    res = export(segs.append_column("split", split), tmp_path / "s", tmp_path, tarred=True,
                 shard_bytes=200_000, audio_format="wav")
    for name in ("train", "test"):
        got = check_tarred(tmp_path / "s" / name)
        assert len(got) == res.summary["splits"][name]["rows"]
    assert res.summary["splits"]["train"]["shards"] > 1


def test_clip_names_are_unique_and_safe() -> None:
    used: set[str] = set()
    names = [clip_name(i, "flac", used) for i in ("a/b.c", "a_b_c", "x-sub3", "", "a/b.c")]
    assert names == ["a_b_c.flac", "a_b_c_2.flac", "x-sub3_.flac", "_.flac", "a_b_c_3.flac"]


def test_clip_namer_matches_clip_name() -> None:
    """ClipNamer remembers only the names that can collide, yet names every clip as
    clip_name with a set of every name would, also when some rows are skipped
    (rejected clips take no name)."""
    import random

    from speechmill.pipeline.clips import ClipNamer

    fixed = ["a/b.c", "a_b_c", "a_b_c_2", "x-sub3", "", None, "a/b.c", "a_b_c_3", "q_2",
             "q", "q", "q_02", "q_2_2", "é", "_", "y" * 250, "y" * 200 + "z"]
    rng = random.Random(0)
    rand = ["".join(rng.choice("ab_/.-1") for _ in range(rng.randint(0, 4)))
            for _ in range(3000)]
    for ids in (fixed, rand, sorted(rand, key=str)):
        for skip in (0.0, 0.3):
            used: set[str] = set()
            namer = ClipNamer(pa.array(ids, pa.string()))
            for i in ids:
                if rng.random() < skip:
                    continue
                assert namer.name(i, "flac") == clip_name(i, "flac", used), i
            assert len(namer.used) <= len(used)
    assert not ClipNamer(pa.array([f"r{i:05d}" for i in range(100)])).risky


def test_missing_text_exported_or_rejected(segs: pa.Table, tmp_path: Path) -> None:
    texts = segs.column("text").to_pylist()
    texts[0], texts[1] = None, "  "
    table = segs.set_column(segs.schema.get_field_index("text"), "text", pa.array(texts))
    res = export(table, tmp_path / "a", tmp_path)
    entries = nemo_entries(tmp_path / "a" / "manifest.json")
    assert res.rows_out == segs.num_rows and sum(e["text"] == "" for e in entries) == 1
    res = export(table, tmp_path / "b", tmp_path, require_text=True, tarred=True)
    assert res.rows_out == segs.num_rows - 2
    assert set(res.rejects.column("reason").to_pylist()) == {"no_text"}
    assert res.summary["splits"]["all"]["shards"] == 1


def test_engine_exports_standardized_files(tmp_path: Path) -> None:
    """ingest -> standardize -> two nemo sinks through the runner (local executor)."""
    run_dir = tmp_path / "run"
    dag = dagmod.loads(tones_then(tmp_path, """
  - {id: nemo, uses: nemo, needs: standardize}
  - {id: nemo_cut, uses: nemo, needs: standardize,
     with: {materialize: true, paths: absolute}}
"""))
    res = run(dag, progress=False)
    assert res.status == "succeeded"
    n = RunStore(run_dir).read_outputs("standardize").num_rows
    assert n == 2
    ref = nemo_entries(run_dir / "exports" / "nemo" / "manifest.json")
    assert len(ref) == 2 and all(e["text"] == "" and e["offset"] == 0.0 for e in ref)
    assert all(not os.path.isabs(e["audio_filepath"]) for e in ref)
    cut = nemo_entries(run_dir / "exports" / "nemo_cut" / "manifest.json")
    final = (run_dir / "exports" / "nemo_cut").resolve()
    assert all(Path(e["audio_filepath"]).parent == final / "audio" for e in cut)
    metrics = json.loads((run_dir / "stages" / "nemo_cut" / "metrics.json").read_text())
    assert metrics["rows_out"] == 2 and metrics["stage_summary"]["mode"] == "materialized"
    assert metrics["audio_hours_out"] == pytest.approx(4.0 / 3600, rel=1e-3)
    assert not list((run_dir / "exports").glob(".*partial"))


def many_rows(audio_path: str, n: int) -> pa.Table:
    """``n`` rows over one real file (reference exports read no audio), built as Arrow
    columns: 3 splits, 40 recording ids, text, speaker and two scores."""
    k = np.arange(n)
    return pa.table({
        "id": pa.array([f"{i % 40:04x}-{i:08d}-{i + 1:08d}" for i in range(n)]),
        "source_url": pa.array(["https://example.org/a.mp3"] * n),
        "audio_path": pa.array([audio_path] * n),
        "offset": pa.array((k % 10) * 0.1),
        "duration": pa.array(0.5 + (k % 7) * 0.05),
        "sample_rate": pa.array(np.full(n, 24000, np.int32)),
        "speaker": pa.array(np.array(["spk-a", "spk-b", "spk-c"])[k % 3]),
        "language": pa.array(["en"] * n),
        "text": pa.array([f"utterance number {i}" for i in range(n)]),
        "scores": pa.StructArray.from_arrays([pa.array(3.0 + (k % 100) * 0.01),
                                              pa.array(20.0 + k % 10)],
                                             names=["dnsmos_ovrl", "snr_db"]),
        "split": pa.array(np.array(["train", "train", "dev", "test"])[k % 4]),
    })


N_MANY = 20_000


def test_reference_exports_hold_one_slice_of_rows(segs: pa.Table, tmp_path: Path) -> None:
    """Exporters turn rows into Python objects a slice at a time (``SLICE_ROWS``) and
    stream manifest lines to disk, so their peak Python memory is about one slice of row
    dicts, whatever the size of a split. 20k rows over one short FLAC (3 splits, the
    largest 10k rows) in reference mode (nemo, lhotse: no audio is cut).

    Bound: 1.5 slices, a slice's cost measured here (4096 rows as dicts: 4.2 MiB on
    CPython 3.11). Measured: nemo 4.3 MiB (1.0 slice), lhotse 1.7 MiB (0.4: it converts
    256 rows at a time); the code before this change peaked at 18.7 MiB in nemo (4.4
    slices: a split's rows and entries as dicts) and 3.7 MiB in lhotse (every id and path
    as a list)."""
    from speechmill.manifests.common import row_columns
    from speechmill.manifests.lhotse_export import LhotseExport
    from speechmill.pipeline.row_slices import SLICE_ROWS

    table = many_rows(segs.column("audio_path")[0].as_py(), N_MANY)
    tracemalloc.start()
    try:
        row_columns(table).slice(0, SLICE_ROWS).to_pylist()
        one_slice = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    peaks: dict[str, int] = {}
    for cls in (NemoManifest, LhotseExport):
        stage = cls(cls.Config(), StageContext(stage_id=cls.name, run_dir=str(tmp_path)))
        warm = tmp_path / f"warm_{cls.name}"  # imports and first-use caches, unmeasured
        warm.mkdir()
        stage.export(table.slice(0, 8), warm)
        out = tmp_path / cls.name
        out.mkdir()
        tracemalloc.start()
        try:
            res = stage.export(table, out)
            peaks[cls.name] = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert res.rows_out == N_MANY and res.rejects.num_rows == 0
    lines = sum(len((tmp_path / "nemo" / s / "manifest.json").read_text().splitlines())
                for s in ("train", "dev", "test"))
    assert lines == N_MANY
    assert all(p < 1.5 * one_slice for p in peaks.values()), (one_slice, peaks)
