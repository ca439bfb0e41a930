"""Hostile ids (``../../escape``, ``/etc/passwd``, ``''``, ``-rf``, ``a/b``, 400 characters,
``张三``...) through the exporters that name files and tar members after them: every tar
extracts inside its directory, every name is safe, distinct ids get distinct names, and
the outputs still load (Lhotse ``CutSet.from_shar``, the NeMo tarred manifests)."""

from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from speechmill.manifests.lhotse_export import SHAR_ID_BYTES, LhotseShar
from speechmill.manifests.nemo import NemoManifest
from speechmill.manifests.parquet_export import ParquetExport
from speechmill.pipeline.safe_names import is_safe_name, safe_name
from speechmill.pipeline.stage import StageContext

HOSTILE = ["../../escape", "/etc/passwd", "", "-rf", "a/b", "x" * 400, "张三", "李四",
           "Anna Smith", "Anna_Smith", "..", ".hidden", "a\\b", "CON", "utt-0001"]


def _export(cls: Any, cfg: dict[str, Any], table: pa.Table, tmp: Path, sid: str):
    out = tmp / "exports" / sid
    out.mkdir(parents=True)
    st = cls(cls.Config(**cfg), StageContext(sid, str(tmp / "run")))
    return st.export(table, out), out


def _hostile_rows(seg: pa.Table, ids: list[str] = HOSTILE) -> pa.Table:
    rows = seg.slice(0, len(ids)).to_pylist()
    for r, i in zip(rows, ids, strict=True):
        r["id"] = i
    return pa.Table.from_pylist(rows, schema=seg.schema)


def _files(root: Path) -> set[str]:
    return {os.path.relpath(os.path.join(d, f), root)
            for d, _, fs in os.walk(root) for f in fs}


def _extract_all(out: Path, box: Path) -> list[str]:
    """Extract every tar under ``out`` (no safety filter: the names alone must be safe)
    into ``box/<tar>/``; asserts nothing lands outside ``box``. Returns the member names."""
    outside = box.parent
    before = _files(outside) - {p for p in _files(outside) if p.startswith(box.name + os.sep)}
    names = []
    for tar_path in sorted(out.rglob("*.tar")):
        dest = box / tar_path.relative_to(out).as_posix().replace("/", "__")
        dest.mkdir(parents=True)
        with tarfile.open(tar_path) as tar:
            members = tar.getmembers()
            names += [m.name for m in members]
            for m in members:
                assert m.isfile(), m.name
                target = (dest / m.name).resolve()
                assert target.is_relative_to(dest.resolve()), m.name
            kw = {"filter": "fully_trusted"} if hasattr(tarfile, "fully_trusted_filter") else {}
            tar.extractall(dest, **kw)
        assert sorted(_files(dest)) == sorted(m.name for m in members)
    after = {p for p in _files(outside) if not p.startswith(box.name + os.sep)}
    assert after == before, after - before  # nothing escaped the box
    for n in names:
        assert is_safe_name(n) and not n.startswith(("-", ".")), n
    return names


def test_shar_hostile_ids_extract_safely_and_load(tmp_path: Path, segments_dir) -> None:
    from lhotse import CutSet

    _, seg = segments_dir
    t = _hostile_rows(seg)
    res, out = _export(LhotseShar, {"shard_size": 4}, t, tmp_path, "shar")
    assert res.rows_out == len(HOSTILE) and not res.rejects.num_rows
    names = _extract_all(out, tmp_path / "box")
    assert len(names) == 2 * len(HOSTILE) and len(set(names)) == len(names)
    cuts = list(CutSet.from_shar(in_dir=out))
    want = {safe_name(i, max_bytes=SHAR_ID_BYTES): i for i in HOSTILE}
    assert len(want) == len(HOSTILE)  # distinct ids, distinct cut ids
    assert sorted(c.id for c in cuts) == sorted(want)
    for c in cuts:
        row_id = want[c.id]
        # the row id survives: as the supervision id, and in origin when it changed
        assert c.supervisions[0].id == row_id
        assert c.custom["origin"].get("id", c.id) == row_id
        assert c.load_audio().shape[-1] > 0
    # ordinary ids keep their names; Unicode letters stay readable
    ids = {c.id for c in cuts}
    assert {"utt-0001", "张三", "李四", "Anna_Smith"} <= ids
    assert not {"../../escape", "/etc/passwd", "", "-rf", "a/b", "CON"} & ids
    assert all(len(i.encode()) <= SHAR_ID_BYTES for i in ids)


@pytest.mark.parametrize("layout", ["tarred", "materialize"])
def test_nemo_hostile_ids(tmp_path: Path, segments_dir, layout: str) -> None:
    _, seg = segments_dir
    t = _hostile_rows(seg)
    res, out = _export(NemoManifest, {layout: True, "shard_size": 4}, t, tmp_path, "nemo")
    assert res.rows_out == len(HOSTILE)
    if layout == "tarred":
        names = _extract_all(out, tmp_path / "box")
        entries = [json.loads(x) for x in
                   (out / "tarred_audio_manifest.json").read_text().splitlines()]
    else:
        names = sorted(p.name for p in (out / "audio").iterdir())
        entries = [json.loads(x) for x in (out / "manifest.json").read_text().splitlines()]
        assert _files(out) == {"manifest.json", *(f"audio/{n}" for n in names)}
    assert len(set(names)) == len(HOSTILE)
    assert sorted(e["id"] for e in entries) == sorted(HOSTILE)
    for n in names:
        stem = n.rsplit(".", 1)[0]
        assert is_safe_name(n) and "." not in stem and not n.startswith(("-", "."))


def test_split_values_that_clash_as_file_names(tmp_path: Path, segments_dir) -> None:
    """``a.b`` and ``a_b`` (and ``a b``) are distinct splits: each keeps its own rows in
    Parquet files and directories of their own (they used to overwrite each other)."""
    _, seg = segments_dir
    rows = seg.slice(0, 6).to_pylist()
    splits = ["a.b", "a_b", "a b", "a.b", "-x", "../../up"]
    for r, s in zip(rows, splits, strict=True):
        r["split"] = s
    t = pa.Table.from_pylist(rows)
    res, out = _export(ParquetExport, {}, t, tmp_path, "pq")
    assert res.rows_out == 6
    files = sorted((out / "data").glob("*.parquet"))
    assert len(files) == 5  # one per split
    got = sorted(i for f in files for i in pq.read_table(f).column("id").to_pylist())
    assert got == sorted(r["id"] for r in rows)
    assert all(f.parent == out / "data" and not f.name.startswith(("-", ".")) for f in files)
    _, out = _export(NemoManifest, {}, t, tmp_path, "nm")
    dirs = sorted(p.parent.relative_to(out).as_posix() for p in out.rglob("manifest.json"))
    assert len(dirs) == 5 and all("/" not in d and is_safe_name(d) for d in dirs)
    assert {"a.b", "a_b"} <= set(dirs) and not (tmp_path / "up").exists()


def test_assemble_hostile_dialogue_ids(tmp_path: Path) -> None:
    """``dialogue_assemble`` names each conversation's files after its dialogue id:
    ``张三`` / ``李四`` (used to share ``__.wav``), ``a b`` / ``a_b`` and ``../../escape``
    each get files of their own, inside the export."""
    from speechmill.manifests.dialogue_assemble import AssembleConfig, DialogueAssemble
    from tests.synth.dialogue_rows import DialogueSpec, make_dialogue_rows

    dids = ["张三", "李四", "a b", "a_b", "../../escape"]
    rows = make_dialogue_rows(tmp_path / "clips", [DialogueSpec(2, k) for k in range(5)])
    table = rows.to_pylist()
    old = sorted({r["dialogue_id"] for r in table})
    new = dict(zip(old, dids, strict=True))
    for r in table:
        r["dialogue_id"] = new[r["dialogue_id"]]
    out = tmp_path / "exports" / "asm"
    out.mkdir(parents=True)
    st = DialogueAssemble(AssembleConfig(stereo=True, lhotse=True),
                          StageContext("asm", str(tmp_path / "run")))
    before = _files(tmp_path) - {p for p in _files(tmp_path) if p.startswith("exports")}
    res = st.export(pa.Table.from_pylist(table, schema=rows.schema), out)
    assert res.rows_out == 10, res.rejects.to_pylist()
    after = {p for p in _files(tmp_path) if not p.startswith("exports")}
    assert after == before  # nothing written outside the export
    lines = [json.loads(x) for x in (out / "dialogues.jsonl").read_text().splitlines()]
    assert sorted(d["id"] for d in lines) == sorted(dids)
    audio = [d["audio"] for d in lines]
    assert len(set(audio)) == 5 and all((out / a).is_file() for a in audio)
    assert {"audio/张三.wav", "audio/李四.wav", "audio/a_b.wav"} <= set(audio)
    for key in ("stereo", "alignment"):
        assert len({d[key] for d in lines}) == 5
    for a in audio:
        assert a.count("/") == 1 and is_safe_name(a.split("/")[1]), a
