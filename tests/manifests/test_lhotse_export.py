"""Lhotse manifests (``lhotse``) and Lhotse Shar (``lhotse_shar``) exports: they load with
Lhotse's own readers, carry the audio, tokens, words, speakers and languages of the
input, are byte-identical across exports, split into subdirectories, and turn bad audio
into rejects."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import soundfile as sf

from speechmill.manifests.lhotse_export import (
    LhotseConfig,
    LhotseExport,
    LhotseShar,
    LhotseSharConfig,
)
from speechmill.pipeline.clips import read_clip
from speechmill.pipeline.records import recording_id
from speechmill.pipeline.stage import StageContext
from testkit.segments import make_segments

Q16 = 2.0 / 32768  # two 16-bit steps


@pytest.fixture(scope="module")
def segments(tmp_path_factory: pytest.TempPathFactory) -> pa.Table:
    return make_segments(tmp_path_factory.mktemp("segs"), n_recordings=3, per_recording=2)


def _lhotse(table: pa.Table, out: Path, **cfg) -> object:
    out.mkdir(parents=True, exist_ok=True)
    st = LhotseExport(LhotseConfig(**cfg), StageContext(stage_id="lhotse", run_dir=str(out)))
    return st.export(table, out)


def _shar(table: pa.Table, out: Path, **cfg) -> object:
    out.mkdir(parents=True, exist_ok=True)
    st = LhotseShar(LhotseSharConfig(**cfg), StageContext(stage_id="shar", run_dir=str(out)))
    return st.export(table, out)


def _with_tokens(table: pa.Table, ragged: bool) -> pa.Table:
    """Fake tokenize output: ``codes`` (8 codebooks x 50 Hz, or SNAC-like 12/23/47 Hz),
    ``text_ids`` and the tokenizer identity columns."""
    rng = np.random.default_rng(0)
    codes, text_ids = [], []
    for d, text in zip(table.column("duration").to_pylist(), table.column("text").to_pylist(),
                       strict=True):
        if ragged:
            codes.append([rng.integers(0, 4096, int(d * r)).tolist() for r in (12, 23, 47)])
        else:
            n = int(d * 50)
            codes.append([rng.integers(0, 1024, n).tolist() for _ in range(8)])
        text_ids.append(rng.integers(0, 50000, len(text.split()) + 2).tolist())
    codec = {"name": "snac_24khz" if ragged else "fake8", "version": "1", "sample_rate": 24000,
             "frame_rate": 12.0 if ragged else 50.0,
             "codebook_sizes": [4096] * 3 if ragged else [1024] * 8,
             "codebook_frame_rates": [12.0, 23.0, 47.0] if ragged else None, "extra": {}}
    tok = {"name": "hf:fake", "version": "abc", "vocab_size": 50000, "extra": {}}
    n = table.num_rows
    return (table
            .append_column("codes", pa.array(codes, pa.list_(pa.list_(pa.int32()))))
            .append_column("text_ids", pa.array(text_ids, pa.list_(pa.int32())))
            .append_column("audio_tokenizer", pa.array([json.dumps(codec)] * n))
            .append_column("text_tokenizer", pa.array([json.dumps(tok)] * n)))


def _files(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_manifests_load_validate_and_play(segments: pa.Table, tmp_path: Path) -> None:
    from lhotse import load_manifest
    from lhotse.qa import validate_recordings_and_supervisions

    res = _lhotse(segments, tmp_path)
    assert res.rows_out == segments.num_rows and res.rejects.num_rows == 0
    assert res.seconds_out == pytest.approx(sum(segments.column("duration").to_pylist()))
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "cuts.jsonl.gz", "recordings.jsonl.gz", "supervisions.jsonl.gz"]
    recs = load_manifest(tmp_path / "recordings.jsonl.gz")
    sups = load_manifest(tmp_path / "supervisions.jsonl.gz")
    cuts = load_manifest(tmp_path / "cuts.jsonl.gz")
    validate_recordings_and_supervisions(recs, sups)
    rows = {r["id"]: r for r in segments.to_pylist()}
    # one recording per source file, with its real length
    assert len(recs) == 3
    for rec in recs:
        path = rec.sources[0].source
        assert Path(path).is_absolute()
        info = sf.info(path)
        assert (rec.num_samples, rec.sampling_rate) == (info.frames, info.samplerate)
        assert rec.duration == pytest.approx(info.frames / info.samplerate)
    assert {s.id for s in sups} == set(rows) == {c.id for c in cuts}
    for s in sups:
        r = rows[s.id]
        assert s.recording_id == recording_id(r["id"])
        assert (s.start, s.duration, s.channel) == (r["offset"], r["duration"], 0)
        assert (s.text, s.speaker, s.language) == (r["text"], r["speaker"], r["language"])
        words = s.alignment["word"]
        assert [w.symbol for w in words] == [w["word"] for w in r["words"]]
        # alignments on the recording's timeline (lhotse convention)
        assert words[1].start == pytest.approx(r["offset"] + r["words"][1]["start"])
        assert words[1].duration == pytest.approx(r["words"][1]["end"] - r["words"][1]["start"])
        assert words[1].score == pytest.approx(0.9)
        assert s.custom["scores"]["snr_db"] == 30.0
        assert s.custom["source_url"] == r["source_url"]
    for c in cuts:
        r = rows[c.id]
        assert (c.start, c.duration) == (r["offset"], r["duration"])
        assert c.supervisions[0].start == 0 and c.supervisions[0].speaker == r["speaker"]
        audio = c.load_audio()[0]
        clip, _ = read_clip(r)
        n = min(len(audio), len(clip))
        assert abs(len(audio) - len(clip)) <= 1
        assert np.abs(audio[:n] - clip[:n]).max() <= Q16
    # relative paths resolve against the manifest's directory
    rel = tmp_path / "rel"
    _lhotse(segments, rel, relative_paths=True)
    rcuts = load_manifest(rel / "cuts.jsonl.gz")
    assert not Path(rcuts[0].recording.sources[0].source).is_absolute()
    a = rcuts.with_recording_path_prefix(rel)[0].load_audio()
    assert np.array_equal(a, cuts[rcuts[0].id].load_audio())


@pytest.mark.parametrize("ragged", [False, True], ids=["stacked", "multi_rate"])
def test_shar_loads_audio_and_tokens(segments: pa.Table, tmp_path: Path, ragged: bool) -> None:
    from lhotse import CutSet

    table = _with_tokens(segments, ragged)
    res = _shar(table, tmp_path, shard_size=4)
    assert res.rows_out == 6 and res.rejects.num_rows == 0
    fields = ["codes_0", "codes_1", "codes_2"] if ragged else ["codes"]
    assert res.summary["fields"] == ["recording", *fields, "text_ids"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        f"{f}.{i:06d}.{ext}" for i in (0, 1)
        for f, ext in [("cuts", "jsonl.gz"), ("recording", "tar"), ("text_ids", "tar")]
        + [(f, "tar") for f in fields])
    rows = {r["id"]: r for r in table.to_pylist()}
    cuts = list(CutSet.from_shar(in_dir=tmp_path))
    assert [c.id for c in cuts] == sorted(rows)
    for c in cuts:
        r = rows[c.id]
        assert c.start == 0 and c.duration == r["duration"]
        audio = c.load_audio()
        clip, sr = read_clip(r)
        assert c.sampling_rate == sr and audio.shape == (1, len(clip))
        assert np.abs(audio[0] - clip).max() <= Q16
        if ragged:
            for k in range(3):
                got = c.load_custom(f"codes_{k}")
                assert got.dtype == np.int32 and got.tolist() == r["codes"][k]
        else:
            got = c.load_codes()  # the attribute API
            assert got.shape == (8, len(r["codes"][0])) and got.tolist() == r["codes"]
        assert c.load_text_ids().tolist() == r["text_ids"]
        assert c.codec["name"] == ("snac_24khz" if ragged else "fake8")
        assert c.text_tokenizer["vocab_size"] == 50000
        s = c.supervisions[0]
        assert (s.text, s.speaker, s.language) == (r["text"], r["speaker"], r["language"])
        # Shar clips start at 0: alignments relative to the clip
        assert [w.symbol for w in s.alignment["word"]] == [w["word"] for w in r["words"]]
        assert s.alignment["word"][2].start == pytest.approx(r["words"][2]["start"])


def test_exports_are_byte_identical(segments: pa.Table, tmp_path: Path) -> None:
    table = _with_tokens(segments, ragged=True)
    for d in ("a", "b"):
        _lhotse(table, tmp_path / d / "lhotse")
        _shar(table.take(list(range(table.num_rows))[::-1]), tmp_path / d / "shar",
              shard_size=4)
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert len(a) == 3 + 2 * 6 and a.keys() == b.keys()
    for k in a:
        assert a[k] == b[k], k


def test_split_subdirectories(segments: pa.Table, tmp_path: Path) -> None:
    from lhotse import CutSet, load_manifest

    splits = ["train", "train", "dev", "train", "test", "train"]
    table = _with_tokens(segments, ragged=False).append_column("split", pa.array(splits))
    res = _lhotse(table, tmp_path / "lhotse")
    assert res.summary["splits"] == {"train": 4, "dev": 1, "test": 1}
    res = _shar(table, tmp_path / "shar", shard_size=3)
    assert res.summary["splits"] == {"train": 4, "dev": 1, "test": 1}
    for name in ("train", "dev", "test"):
        want = set(pc.filter(table.column("id"), pc.equal(table.column("split"), name))
                   .to_pylist())
        cuts = load_manifest(tmp_path / "lhotse" / name / "cuts.jsonl.gz")
        assert {c.id for c in cuts} == want
        assert {r.id for r in load_manifest(tmp_path / "lhotse" / name / "recordings.jsonl.gz")
                } == {recording_id(i) for i in want}
        shar = tmp_path / "shar" / name
        assert {c.id for c in CutSet.from_shar(in_dir=shar)} == want
    assert len(list((tmp_path / "shar/train").glob("cuts.*.jsonl.gz"))) == 2
    assert not list((tmp_path / "lhotse").glob("*.gz"))


def test_bad_audio_becomes_rejects(segments: pa.Table, tmp_path: Path) -> None:
    from lhotse import CutSet, load_manifest

    rows = segments.to_pylist()
    bad = tmp_path / "garbage.flac"
    bad.write_bytes(b"<html>not audio</html>" * 100)
    rows[0]["audio_path"] = str(tmp_path / "missing.flac")
    rows[2]["audio_path"] = str(bad)
    rows[4]["duration"] = 60.0  # runs far past the end of its file
    table = pa.Table.from_pylist(rows, schema=segments.schema)
    res = _lhotse(table, tmp_path / "lhotse")
    reasons = dict(zip(res.rejects.column("id").to_pylist(),
                       res.rejects.column("reason").to_pylist(), strict=True))
    assert reasons == {rows[0]["id"]: "unreadable", rows[2]["id"]: "not_audio",
                       rows[4]["id"]: "out_of_bounds"}
    assert all(res.rejects.column("stage").to_pylist())
    assert res.rows_out == 3
    assert len(load_manifest(tmp_path / "lhotse/cuts.jsonl.gz")) == 3
    res = _shar(table, tmp_path / "shar")
    reasons = dict(zip(res.rejects.column("id").to_pylist(),
                       res.rejects.column("reason").to_pylist(), strict=True))
    assert reasons == {rows[0]["id"]: "unreadable", rows[2]["id"]: "not_audio",
                       rows[4]["id"]: "short_audio"}
    cuts = list(CutSet.from_shar(in_dir=tmp_path / "shar"))
    assert len(cuts) == 3 and all(c.load_audio().shape[1] > 0 for c in cuts)


def test_in_a_dag_after_standardize(segments: pa.Table, tmp_path: Path) -> None:
    """ingest -> standardize -> lhotse + lhotse_shar through the engine: whole files, no
    transcript, so each cut spans its file with an empty-text supervision."""
    from lhotse import CutSet, load_manifest
    from lhotse.qa import validate_recordings_and_supervisions

    from speechmill.pipeline import dag as dagmod
    from speechmill.pipeline import registry
    from speechmill.pipeline.runner import run

    registry.register(LhotseExport)
    registry.register(LhotseShar)
    src = tmp_path / "in"
    src.mkdir()
    for p in sorted(set(segments.column("audio_path").to_pylist()))[:2]:
        shutil.copy(p, src / Path(p).name)
    run_dir = tmp_path / "run"
    dag = dagmod.loads(f"""
name: t
run_dir: {run_dir}
executor: {{type: local, stall_timeout_s: 300}}
stages:
  - {{id: ingest, uses: ingest, with: {{inputs: ["{src}"]}}}}
  - {{id: standardize, uses: standardize, needs: ingest, with: {{sample_rate: 16000}}}}
  - {{id: lhotse, uses: lhotse, needs: standardize, with: {{relative_paths: true}}}}
  - {{id: shar, uses: lhotse_shar, needs: standardize, with: {{shard_size: 1}}}}
""")
    res = run(dag, progress=False)
    assert res.status == "succeeded"
    out = run_dir / "exports" / "lhotse"
    recs = load_manifest(out / "recordings.jsonl.gz")
    sups = load_manifest(out / "supervisions.jsonl.gz")
    validate_recordings_and_supervisions(recs, sups)
    cuts = load_manifest(out / "cuts.jsonl.gz").with_recording_path_prefix(out)
    assert len(cuts) == 2
    for c in cuts:
        assert c.sampling_rate == 16000 and c.start == 0
        assert c.duration == pytest.approx(c.recording.duration, abs=1e-3)
        assert c.supervisions[0].text == "" and c.load_audio().shape[1] > 16000
    m = json.loads((run_dir / "stages/lhotse/metrics.json").read_text())
    assert (m["rows_in"], m["rows_out"], m["rows_rejected"]) == (2, 2, 0)
    assert m["stage_summary"]["recordings"] == 2
    shar = run_dir / "exports" / "shar"
    assert sorted(p.name for p in shar.iterdir()) == [
        "cuts.000000.jsonl.gz", "cuts.000001.jsonl.gz",
        "recording.000000.tar", "recording.000001.tar"]
    scuts = list(CutSet.from_shar(in_dir=shar))
    assert sorted(c.id for c in scuts) == sorted(c.id for c in cuts)
    for sc in scuts:
        assert np.abs(sc.load_audio() - cuts[sc.id].load_audio()).max() <= Q16
    m = json.loads((run_dir / "stages/shar/metrics.json").read_text())
    assert m["rows_out"] == 2 and m["stage_summary"]["shards"] == 2


def test_shar_missing_tokens_are_placeholders(segments: pa.Table, tmp_path: Path) -> None:
    from lhotse import CutSet

    table = _with_tokens(segments, ragged=True)
    rows = table.to_pylist()
    rows[1]["codes"] = rows[1]["text_ids"] = None  # e.g. not tokenized
    table = pa.Table.from_pylist(rows, schema=table.schema)
    res = _shar(table, tmp_path / "auto")
    assert res.summary["codes_layout"] == "per_codebook" and res.rejects.num_rows == 0
    cuts = {c.id: c for c in CutSet.from_shar(in_dir=tmp_path / "auto")}
    assert len(cuts) == 6
    assert not cuts[rows[1]["id"]].has_custom("codes_0")
    assert not cuts[rows[1]["id"]].has_custom("text_ids")
    assert cuts[rows[0]["id"]].load_codes_2().tolist() == rows[0]["codes"][2]
    # ragged codes cannot be stacked: a reject, not a crash
    res = _shar(table, tmp_path / "stacked", codes_layout="stacked")
    assert set(res.rejects.column("reason").to_pylist()) == {"ragged_codes"}
    assert res.rows_out == 1  # only the row without codes


def test_shar_shards_by_bytes(segments: pa.Table, tmp_path: Path) -> None:
    """``shard_bytes``: a new shard starts before one would pass the limit; a cut bigger
    than the limit still gets a shard of its own; everything loads in order."""
    from lhotse import CutSet

    res = _shar(segments, tmp_path, shard_size=1000, shard_bytes=150_000)
    tars = sorted(tmp_path.glob("recording.*.tar"))
    assert len(tars) >= 2 and res.rows_out == segments.num_rows
    sizes = [sum(len(m) for m in _members(t)) for t in tars]
    assert all(s <= 150_000 or n == 1 for s, n in zip(sizes, map(_count, tars), strict=True))
    assert [c.id for c in CutSet.from_shar(in_dir=tmp_path)] == \
        sorted(segments.column("id").to_pylist())


def _members(tar: Path) -> list[bytes]:
    import tarfile

    with tarfile.open(tar) as tf:
        return [tf.extractfile(m).read() for m in tf.getmembers()
                if m.name.endswith((".flac", ".wav"))]


def _count(tar: Path) -> int:
    return len(_members(tar))
