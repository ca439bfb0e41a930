"""Stage ingest: input discovery, content ids, probing, bad inputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from speechmill.pipeline.stage import StageContext
from speechmill.stages.ingest import Ingest, IngestConfig
from tests.conftest import EXPECTED_REASON


def make(tmp_path: Path, **cfg) -> Ingest:
    return Ingest(IngestConfig(**cfg), StageContext("ingest", str(tmp_path / "run")))


def test_plan_dirs_globs_and_lists(media_dir, tmp_path: Path) -> None:
    d, good, bad = media_dir
    st = make(tmp_path, inputs=[str(d / "good")])
    urls = st.plan().column("source_url").to_pylist()
    assert sorted(Path(u).name for u in urls) == sorted(good)
    st = make(tmp_path, inputs=[str(d / "**" / "*.flac")])
    names = sorted(Path(u).name for u in st.plan().column("source_url").to_pylist())
    assert names == sorted(n for n in {**good, **bad} if n.endswith(".flac"))
    # file lists: txt (relative to the list), csv and jsonl with metadata
    lst = tmp_path / "lists"
    lst.mkdir()
    shutil.copy(d / "good" / "speech.wav", lst / "a.wav")
    (lst / "files.txt").write_text("# comment\na.wav\n\n")
    (lst / "files.csv").write_text("path,speaker,episode\na.wav,spk1,42\n")
    (lst / "files.jsonl").write_text(json.dumps({"audio_filepath": "a.wav", "text": "hi",
                                                 "license": "cc-by"}) + "\n")
    for name in ("files.txt", "files.csv", "files.jsonl"):
        rows = make(tmp_path, file_list=str(lst / name)).plan().to_pylist()
        assert [r["source_url"] for r in rows] == [str(lst / "a.wav")]
    row = make(tmp_path, file_list=str(lst / "files.csv")).plan().to_pylist()[0]
    assert row["speaker"] == "spk1" and json.loads(row["meta"]) == {"episode": "42"}
    row = make(tmp_path, file_list=str(lst / "files.jsonl")).plan().to_pylist()[0]
    assert row["text"] == "hi" and json.loads(row["meta"]) == {"license": "cc-by"}
    # planned ids are deterministic
    a = make(tmp_path, inputs=[str(d)]).plan()
    b = make(tmp_path, inputs=[str(d)]).plan()
    assert a.column("id").to_pylist() == b.column("id").to_pylist()


def test_probe_every_format(media_dir, tmp_path: Path) -> None:
    d, good, _ = media_dir
    st = make(tmp_path, inputs=[str(d / "good")])
    res = st.process(st.plan())
    assert res.rejects.num_rows == 0, res.rejects.to_pylist()
    by_name = {Path(r["source_url"]).name: r for r in res.outputs.to_pylist()}
    assert set(by_name) == set(good)
    for name, meta in good.items():
        r = by_name[name]
        assert r["sample_rate"] == meta["sample_rate"], name
        assert r["channels"] == meta["channels"], name
        assert r["duration"] == pytest.approx(meta["duration"], rel=0.1, abs=0.1), name
        assert len(r["id"]) == 20 and r["sha256"].startswith(r["id"])
        assert r["has_video"] == bool(meta.get("has_video")), name
        assert r["codec"] and r["container"] and r["size_bytes"] > 0
    assert len({r["id"] for r in by_name.values()}) == len(good)


def test_bad_inputs_become_rejects(media_dir, tmp_path: Path) -> None:
    d, _, bad = media_dir
    st = make(tmp_path, inputs=[str(d / "bad")])
    res = st.process(st.plan())
    outs = {Path(r["source_url"]).name for r in res.outputs.to_pylist()}
    rej = {Path(r["source_url"]).name: r for r in res.rejects.to_pylist()}
    assert outs.isdisjoint(rej)
    assert outs | set(rej) == set(bad)
    # what ingest can tell from the container alone it rejects right away
    for name in ("empty.wav", "episode.mp3", "notes.wav", "weird_codec.wav", "zero.wav",
                 "zero.flac", "unreadable.wav", "truncated.wav", "header_only.mp3"):
        assert name in rej, name
        assert rej[name]["reason"] in EXPECTED_REASON[bad[name]], (name, rej[name])
        assert rej[name]["stage"] == "ingest" and rej[name]["detail"]


def test_too_large_and_unreachable_url(media_dir, tmp_path: Path) -> None:
    d, _, _ = media_dir
    st = make(tmp_path, inputs=[str(d / "good" / "speech.wav"),
                                "http://127.0.0.1:9/nothing-listens-here.wav"],
              max_bytes=1000)
    res = st.process(st.plan())
    reasons = sorted(r["reason"] for r in res.rejects.to_pylist())
    assert reasons == ["too_large", "unreadable"]


def test_config_needs_inputs() -> None:
    from speechmill.pipeline import dag as dagmod
    from speechmill.pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match=r"stage 'ingest'.*with.inputs"):
        dagmod.loads("name: x\nrun_dir: /tmp/x\nstages:\n  - {id: ingest, uses: ingest}\n")
