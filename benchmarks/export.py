"""Benchmark: utterances/s of every exporter and tokenizer on CPU.

Usage::

    python benchmarks/export.py --recordings 12 --per-recording 5 --workdir /tmp/bexport
    python benchmarks/export.py --skip-codecs          # exporters + k-means units only
    python benchmarks/export.py --exporters-only --tile 10   # 10x the rows, exporters only

What it does
------------
1. **Inputs.** Real speech (Piper's joe voice and, with eSpeak NG installed, two more
   voices), ``--recordings`` 24 kHz FLAC files of ``--per-recording`` sentences each, and
   one segment row per sentence (offset/duration into its recording, text, speaker,
   words, scores): what ``filter`` leaves (``testkit/segments.py``).
   A ``split`` column is added by the ``split`` stage's own assignment.
2. **Exporters, each against its own plain loop.** Each sink stage's ``export()`` over
   the whole table into a fresh directory (what the engine calls, without its
   bookkeeping), and a plain single-threaded loop that writes the same files the way a
   user would without speechmill (rows grouped by split and sorted by id in Python):

   - ``nemo`` (offsets, no audio copied): ``json.dumps`` per row into each split's
     ``manifest.json`` (same keys, relative paths, file existence checked);
   - ``nemo`` tarred: read each clip (``read_clip``), FLAC-encode it, ``tarfile`` it into
     50-row shards, and write the sharded and the full manifest;
   - ``lhotse``: Lhotse's own classes: ``Recording.from_file`` per audio file,
     ``SupervisionSegment`` (words as an alignment) and ``MonoCut`` per row, then
     ``RecordingSet`` / ``SupervisionSet`` / ``CutSet`` ``.to_file(...jsonl.gz)``;
   - ``lhotse_shar`` (audio + token fields): the same cuts with ``codes`` / ``text_ids``
     attached (``attach_tensor``) and Lhotse's ``CutSet.to_shar`` (FLAC recordings,
     numpy fields, 50 cuts per shard): Lhotse decodes and encodes the audio itself;
   - ``parquet`` (Hugging Face, FLAC bytes in an ``audio`` struct): read + FLAC-encode
     each clip, ``pa.Table.from_pylist`` + ``pq.write_table`` (zstd, 100-row groups);
   - ``shards`` (speechgpt layout, no audio): ``pa.Table.from_pylist`` of the token rows
     with the SpeechGPT unit string + ``pq.write_table`` (zstd) + ``index.json`` with
     each file's sha256.

   ``vs plain`` = plain loop wall / exporter wall (above 1: the exporter is faster).
   The exporters cut clips on ``workers: 2`` threads (their default); the plain loops
   use one. After timing, the outputs are compared (``same output``: manifests equal
   line by line, or the same rows / ids / audio bytes).
3. **Order.** Exporter and plain loop alternate within each repeat (the machine's load
   moves both) after one untimed warm-up round of both (imports, page cache); a sample
   is the mean of enough runs to take ``MIN_SAMPLE_S`` (fast exporters run several
   times), and walls are medians over ``--repeat`` samples.
4. **Tokenizers.** Encode every clip with each audio tokenizer: ``kmeans-mel`` (codebook
   fitted first, fit time shown apart), and SNAC / Mimi / EnCodec / HuBERT+k-means built
   at their *published* sizes with random weights (real compute cost; weights cannot be
   downloaded here) and loaded through the same loader a DAG uses; plus whisper text
   ids. ``x realtime`` = audio seconds / wall seconds. The ``tokenize`` stage itself
   (one worker, in process) is compared with a plain loop that reads each clip and
   encodes it with the same tokenizer.
Numbers are medians over ``--repeat`` runs; this machine's other load shows in them.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import math
import os
import re
import shutil
import statistics
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _median_time(fn: Any, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def make_inputs(workdir: Path, recordings: int, per: int) -> Any:
    import pyarrow.parquet as pq

    from testkit.segments import make_segments

    cache = workdir / "segments.parquet"
    want = {"recordings": recordings, "per": per}
    meta = workdir / "segments.json"
    if cache.exists() and meta.exists() and json.loads(meta.read_text()) == want:
        return pq.read_table(cache)
    shutil.rmtree(workdir / "audio", ignore_errors=True)
    t = make_segments(workdir / "audio", n_recordings=recordings, per_recording=per)
    pq.write_table(t, cache)
    meta.write_text(json.dumps(want))
    return t


def _ctx(sid: str, run_dir: Path, prepared: Any = None) -> Any:
    from speechmill.pipeline.stage import StageContext

    return StageContext(stage_id=sid, run_dir=str(run_dir), offline=True, prepared=prepared)


def tile(table: Any, times: int) -> Any:
    """``table``'s rows ``times`` times, ids suffixed ``_t<k>`` (recording ids, the part
    before the first ``-``, stay the same, so the rows still share their recordings)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if times <= 1:
        return table
    i = table.schema.get_field_index("id")
    return pa.concat_tables([
        table.set_column(i, "id", pc.binary_join_element_wise(
            table.column("id"), pa.scalar(f"_t{k}"), "")) for k in range(times)])


def with_splits(table: Any) -> Any:
    from speechmill.manifests.splits import Split, SplitConfig

    cfg = SplitConfig(dev_fraction=0.1, test_fraction=0.1)
    st = Split(cfg, _ctx("split", Path("."), Split.prepare(cfg, table)))
    return st.process(table).outputs


# -- plain loops: the same files as each exporter, written without speechmill's stages --


NEMO_KEYS = ("audio_filepath", "duration", "offset", "text", "lang", "speaker", "id",
             "shard_id")


def by_split(table: Any) -> dict[str, list[dict[str, Any]]]:
    """Rows grouped by ``split`` value, each group sorted by id."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in table.to_pylist():
        groups.setdefault(row.get("split") or "unassigned", []).append(row)
    for rows in groups.values():
        rows.sort(key=lambda r: r["id"])
    return groups


def _nemo_entry(row: dict[str, Any], audio_filepath: str, duration: float,
                offset: float | None, shard_id: int | None = None) -> dict[str, Any]:
    e: dict[str, Any] = {"audio_filepath": audio_filepath, "duration": round(duration, 6)}
    if offset is not None:
        e["offset"] = round(offset, 6)
    e.update(text=row.get("text") or "", lang=row.get("language"),
             speaker=row.get("speaker"), id=row.get("id"))
    for k, v in (row.get("scores") or {}).items():
        if v is not None and math.isfinite(v):
            e[f"score_{k}" if k in NEMO_KEYS else k] = v
    if shard_id is not None:
        e["shard_id"] = shard_id
    return e


def plain_nemo_offsets(table: Any, out: Path) -> int:
    n = 0
    for split, rows in by_split(table).items():
        d = out / split
        d.mkdir(parents=True, exist_ok=True)
        base = os.path.abspath(d)
        with open(d / "manifest.json", "w", encoding="utf-8") as f:
            for r in rows:
                path = os.path.abspath(r["audio_path"])
                if not os.path.isfile(path):
                    continue
                e = _nemo_entry(r, os.path.relpath(path, base), r["duration"],
                                r["offset"] or 0.0)
                f.write(json.dumps(e, ensure_ascii=False) + "\n")
                n += 1
    return n


def _clip_name(row_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", row_id) + ".flac"


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def plain_nemo_tarred(table: Any, out: Path, shard_size: int = 50) -> int:
    from speechmill.pipeline.clips import encode_audio, read_clip

    n = 0
    for split, rows in by_split(table).items():
        d = out / split
        (d / "sharded_manifests").mkdir(parents=True, exist_ok=True)
        with open(d / "tarred_audio_manifest.json", "w", encoding="utf-8") as every:
            for shard, a in enumerate(range(0, len(rows), shard_size)):
                with tarfile.open(d / f"audio_{shard}.tar", "w") as tar, \
                        open(d / "sharded_manifests" / f"manifest_{shard}.json", "w",
                             encoding="utf-8") as f:
                    for r in rows[a:a + shard_size]:
                        x, sr = read_clip(r)
                        name = _clip_name(r["id"])
                        _add(tar, name, encode_audio(x, sr, "flac"))
                        line = json.dumps(_nemo_entry(r, name, len(x) / sr, None, shard),
                                          ensure_ascii=False) + "\n"
                        f.write(line)
                        every.write(line)
                        n += 1
    return n


def _lhotse_cut(row: dict[str, Any], recs: dict[str, Any], start: float,
                ali_base: float) -> tuple[Any, Any]:
    """(SupervisionSegment, MonoCut) of a row, built with Lhotse's classes."""
    from lhotse import MonoCut, Recording, SupervisionSegment
    from lhotse.supervision import AlignmentItem
    from lhotse.utils import fastcopy

    path = os.path.abspath(row["audio_path"])
    if path not in recs:
        recs[path] = Recording.from_file(path, recording_id=row["id"].split("-")[0])
    rec = recs[path]
    words = [AlignmentItem(symbol=w["word"].strip(), start=round(ali_base + w["start"], 6),
                           duration=round(max(0.0, w["end"] - w["start"]), 6),
                           score=w.get("prob"))
             for w in row.get("words") or [] if w.get("start") is not None]
    custom = {k: row[k] for k in ("source_url", "parent_id", "split") if row.get(k)}
    scores = {k: v for k, v in (row.get("scores") or {}).items() if v is not None}
    if scores:
        custom["scores"] = scores
    dur = float(row["duration"])
    sup = SupervisionSegment(
        id=row["id"], recording_id=rec.id, start=start, duration=dur, channel=0,
        text=row.get("text") or "", language=row.get("language"),
        speaker=row.get("speaker"), custom=custom or None,
        alignment={"word": words} if words else None)
    cut = MonoCut(id=row["id"], start=float(row["offset"] or 0.0), duration=dur, channel=0,
                  recording=rec, supervisions=[fastcopy(sup, start=0.0)])
    return sup, cut


def plain_lhotse(table: Any, out: Path) -> int:
    from lhotse import CutSet, RecordingSet, SupervisionSet

    n = 0
    for split, rows in by_split(table).items():
        d = out / split
        d.mkdir(parents=True, exist_ok=True)
        recs: dict[str, Any] = {}
        sups, cuts = [], []
        for r in rows:
            off = float(r["offset"] or 0.0)
            sup, cut = _lhotse_cut(r, recs, off, off)
            sups.append(sup)
            cuts.append(cut)
        RecordingSet.from_recordings(sorted(recs.values(), key=lambda x: x.id)).to_file(
            d / "recordings.jsonl.gz")
        SupervisionSet.from_segments(sups).to_file(d / "supervisions.jsonl.gz")
        CutSet.from_cuts(cuts).to_file(d / "cuts.jsonl.gz")
        n += len(cuts)
    return n


def plain_lhotse_shar(tokenized: Any, out: Path, shard_size: int = 50) -> int:
    import numpy as np
    from lhotse import CutSet

    n = 0
    for split, rows in by_split(tokenized).items():
        recs: dict[str, Any] = {}
        cuts = []
        for r in rows:
            _, cut = _lhotse_cut(r, recs, 0.0, 0.0)
            cut = cut.attach_tensor("codes", np.asarray(r["codes"], dtype=np.int32))
            cut = cut.attach_tensor("text_ids", np.asarray(r["text_ids"], dtype=np.int32))
            cuts.append(cut)
        (out / split).mkdir(parents=True, exist_ok=True)
        CutSet.from_cuts(cuts).to_shar(
            out / split, fields={"recording": "flac", "codes": "numpy", "text_ids": "numpy"},
            shard_size=shard_size)
        n += len(cuts)
    return n


def plain_parquet(table: Any, out: Path) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from speechmill.pipeline.clips import encode_audio, read_clip

    (out / "data").mkdir(parents=True, exist_ok=True)
    n = 0
    for split, rows in by_split(table).items():
        recs = []
        for r in rows:
            x, sr = read_clip(r)
            recs.append({"id": r["id"],
                         "audio": {"bytes": encode_audio(x, sr, "flac"),
                                   "path": _clip_name(r["id"])},
                         "text": r.get("text") or "", "speaker": r.get("speaker"),
                         "language": r.get("language"), "duration": round(len(x) / sr, 6),
                         "sample_rate": sr, **(r.get("scores") or {})})
        pq.write_table(pa.Table.from_pylist(recs),
                       out / "data" / f"{split}-00000-of-00001.parquet",
                       row_group_size=100, compression="zstd")
        n += len(recs)
    (out / "README.md").write_text("---\nconfigs:\n- config_name: default\n---\n")
    return n


def plain_shards(tokenized: Any, out: Path) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("id", pa.string()), ("split", pa.string()),
                        ("speaker", pa.string()), ("language", pa.string()),
                        ("duration", pa.float64()), ("text", pa.string()),
                        ("source_url", pa.string()), ("text_ids", pa.list_(pa.int32())),
                        ("codes", pa.list_(pa.list_(pa.int16()))), ("n_frames", pa.int32()),
                        ("units", pa.string())])
    index = []
    for split, rows in by_split(tokenized).items():
        recs = [{**{k: r.get(k) for k in ("id", "split", "speaker", "language", "duration",
                                          "text", "source_url", "text_ids", "codes")},
                 "n_frames": len(r["codes"][0]),
                 "units": "<sosp>" + "".join(f"<{u}>" for u in r["codes"][0]) + "<eosp>"}
                for r in rows]
        path = out / split / "shard-00000.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(recs, schema=schema), path, compression="zstd")
        index.append({"file": f"{split}/{path.name}", "rows": len(recs),
                      "sha256": hashlib.sha256(path.read_bytes()).hexdigest()})
    (out / "index.json").write_text(json.dumps({"shards": index}, indent=2))
    return sum(s["rows"] for s in index)


# -- comparing the outputs ----------------------------------------------------------------


def _jsonl(path: Path) -> list[Any]:
    op = gzip.open if path.suffix == ".gz" else open
    with op(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def same_jsonl(a: Path, b: Path, pattern: str) -> str:
    """Every ``pattern`` file under ``a`` and ``b``: the same names and parsed lines."""
    fa = sorted(p.relative_to(a) for p in a.rglob(pattern))
    fb = sorted(p.relative_to(b) for p in b.rglob(pattern))
    if fa != fb:
        return f"files differ ({len(fa)} vs {len(fb)})"
    diff = [str(f) for f in fa if _jsonl(a / f) != _jsonl(b / f)]
    return f"{len(fa)} files differ: {diff[:2]}" if diff else f"same lines ({len(fa)} files)"


def same_parquet(a: Path, b: Path, columns: list[str]) -> str:
    import pyarrow.parquet as pq

    def load(d: Path) -> dict[str, Any]:
        rows: dict[str, Any] = {}
        for p in sorted(d.rglob("*.parquet")):
            t = pq.read_table(p, columns=columns)
            for r in t.to_pylist():
                rows[r["id"]] = r
        return rows

    ra, rb = load(a), load(b)
    if ra != rb:
        bad = sum(ra.get(k) != rb.get(k) for k in set(ra) | set(rb))
        return f"{bad} of {len(ra)} rows differ in {columns}"
    return f"same {', '.join(columns)} ({len(ra)} rows)"


def same_shar(a: Path, b: Path) -> str:
    """Same cut ids per split, and the same decoded samples and codes for every cut."""
    import numpy as np
    from lhotse import CutSet

    def load(d: Path) -> dict[str, Any]:
        out = {}
        for sub in sorted(p for p in d.iterdir() if p.is_dir()):
            for c in CutSet.from_shar(in_dir=sub):
                out[c.id] = (c.load_audio(), c.load_custom("codes"),
                             c.load_custom("text_ids"))
        return out

    ca, cb = load(a), load(b)
    if sorted(ca) != sorted(cb):
        return f"cut ids differ ({len(ca)} vs {len(cb)})"
    bad = sum(not all(np.array_equal(x, y) for x, y in zip(ca[k], cb[k], strict=True))
              for k in ca)
    return f"{bad} of {len(ca)} cuts differ" if bad else \
        f"same cuts, audio and codes ({len(ca)} cuts)"

def run_sink(cls: Any, cfg: dict[str, Any], table: Any, out: Path) -> int:
    st = cls(cls.Config(**cfg), _ctx(out.name, out.parent))
    st.setup()
    res = st.export(table, out)
    st.teardown()
    if res.rejects is not None and res.rejects.num_rows:
        raise SystemExit(f"{out.name}: {res.rejects.num_rows} rejects")
    return int(res.rows_out)


MIN_SAMPLE_S = 0.3


def _timed(write: Any, out: Path, n: int, label: str) -> float:
    """Seconds ``write(out)`` takes into a fresh empty ``out``; it must write ``n`` rows."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    t0 = time.perf_counter()
    written = write(out)
    secs = time.perf_counter() - t0
    if written != n:
        raise SystemExit(f"{label}: {written} of {n} rows written to {out}")
    return secs


def build_codecs(d: Path) -> dict[str, Path]:
    """Published-size configs, random weights, saved the way the loaders read them."""
    import torch
    from snac import SNAC
    from transformers import (
        EncodecConfig,
        EncodecModel,
        HubertConfig,
        HubertModel,
        MimiConfig,
        MimiModel,
    )

    out = {}
    torch.manual_seed(0)
    p = d / "snac_24khz"
    if not (p / "pytorch_model.bin").exists():
        conf = {"sampling_rate": 24000, "encoder_dim": 48, "encoder_rates": [2, 4, 8, 8],
                "decoder_dim": 1024, "decoder_rates": [8, 8, 4, 2], "attn_window_size": None,
                "codebook_size": 4096, "codebook_dim": 8, "vq_strides": [4, 2, 1],
                "noise": True, "depthwise": True}
        p.mkdir(parents=True, exist_ok=True)
        (p / "config.json").write_text(json.dumps(conf))
        torch.save(SNAC(**conf).state_dict(), p / "pytorch_model.bin")
    out["snac"] = p
    for name, cfg_cls, model_cls in (("mimi", MimiConfig, MimiModel),
                                     ("encodec_24khz", EncodecConfig, EncodecModel),
                                     ("hubert-base", HubertConfig, HubertModel)):
        p = d / name
        if not (p / "config.json").exists():
            model_cls(cfg_cls()).save_pretrained(p)
        out[name] = p
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recordings", type=int, default=12)
    ap.add_argument("--per-recording", type=int, default=5)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=Path("runs/bench-export"))
    ap.add_argument("--skip-codecs", action="store_true")
    ap.add_argument("--exporters-only", action="store_true",
                    help="only the exporters against their plain loops (no tokenizer timings)")
    ap.add_argument("--tile", type=int, default=1,
                    help="repeat the segment rows this many times (ids suffixed _t<k>, the "
                    "same audio): more rows without synthesizing more speech")
    args = ap.parse_args()
    import numpy as np

    from speechmill.manifests.lhotse_export import LhotseExport, LhotseShar
    from speechmill.manifests.nemo import NemoManifest
    from speechmill.manifests.parquet_export import ParquetExport
    from speechmill.manifests.shards import Shards
    from speechmill.manifests.tokenizers.base import (
        AudioTokenizerConfig,
        TextTokenizerConfig,
        load_audio_tokenizer,
        load_text_tokenizer,
    )
    from speechmill.manifests.tokens import Tokenize, TokenizeConfig
    from speechmill.pipeline.clips import read_clip

    wd = args.workdir
    wd.mkdir(parents=True, exist_ok=True)
    table = with_splits(tile(make_inputs(wd, args.recordings, args.per_recording),
                             args.tile))
    n = table.num_rows
    audio_s = float(sum(table.column("duration").to_pylist()))
    print(f"{n} utterances, {audio_s / 60:.1f} min of audio, {args.repeat} repeats\n")

    rows: list[tuple[str, float, str]] = []

    # tokenize once (k-means units + whisper text ids) so token-carrying exports have input
    tcfg = TokenizeConfig(audio=AudioTokenizerConfig(n_units=100, fit_max_frames=50_000),
                          text=TextTokenizerConfig(backend="whisper"))
    shutil.rmtree(wd / "fit", ignore_errors=True)  # a kept codebook would be reused
    t0 = time.perf_counter()
    prepared = Tokenize.prepare(tcfg, table, _ctx("tokenize", wd / "fit"))
    fit_s = time.perf_counter() - t0
    tok = Tokenize(tcfg, _ctx("tokenize", wd, prepared))
    tok.setup()
    tokenized = tok.process(table).outputs
    tok.teardown()

    def check_nemo(a: Path, b: Path) -> str:
        return same_jsonl(a, b, "*.json")

    def check_lhotse(a: Path, b: Path) -> str:
        return same_jsonl(a, b, "*.jsonl.gz")

    def check_parquet(a: Path, b: Path) -> str:
        return same_parquet(a, b, ["id", "audio", "text", "duration", "sample_rate"])

    def check_shards(a: Path, b: Path) -> str:
        return same_parquet(a, b, ["id", "split", "text_ids", "codes", "n_frames", "units"])

    # (label, stage class, config, input, plain loop, plain loop's description, check)
    sinks: list[tuple[str, Any, dict[str, Any], Any, Any, str, Any]] = [
        ("nemo (offsets)", NemoManifest, {}, table, plain_nemo_offsets,
         "json.dumps lines", check_nemo),
        ("nemo tarred", NemoManifest, {"tarred": True, "shard_size": 50}, table,
         plain_nemo_tarred, "read + FLAC + tarfile + manifests", check_nemo),
        ("lhotse", LhotseExport, {}, table, plain_lhotse,
         "lhotse Recording.from_file + *Set.to_file", check_lhotse),
        ("lhotse_shar (+tokens)", LhotseShar, {"shard_size": 50}, tokenized,
         plain_lhotse_shar, "lhotse CutSet.to_shar", same_shar),
        ("parquet (HF datasets)", ParquetExport, {}, table, plain_parquet,
         "read + FLAC + pq.write_table", check_parquet),
        ("shards (speechgpt)", Shards, {"layout": "speechgpt"}, tokenized, plain_shards,
         "pq.write_table + index", check_shards),
    ]
    exports: list[tuple[str, float, float, str, str]] = []
    for label, cls, cfg, inp, plain, how, check in sinks:
        out = wd / "out" / label.split()[0]
        plain_out = wd / "plain" / label.split()[0]
        def sink(d: Path, cls: Any = cls, cfg: Any = cfg, inp: Any = inp) -> int:
            return run_sink(cls, cfg, inp, d)

        def loop(d: Path, plain: Any = plain, inp: Any = inp) -> int:
            return plain(inp, d)

        # round 0 warms up both sides (imports, page cache) and sets how many runs make
        # one sample (fast exporters: at least MIN_SAMPLE_S of work per sample)
        w_exp, w_plain = _timed(sink, out, n, label), _timed(loop, plain_out, n, label)
        k = max(1, min(50, math.ceil(MIN_SAMPLE_S / max(1e-6, min(w_exp, w_plain)))))
        t_exp, t_plain = [], []
        for _ in range(args.repeat):  # alternate, so load changes hit both sides
            t_exp.append(statistics.fmean(_timed(sink, out, n, label) for _ in range(k)))
            t_plain.append(statistics.fmean(_timed(loop, plain_out, n, label)
                                            for _ in range(k)))
        se, sp = statistics.median(t_exp), statistics.median(t_plain)
        exports.append((label, n / se, n / sp, how, check(out, plain_out)))
    if args.exporters_only:
        print_tables(exports, rows)
        return 0

    clips = [read_clip(r) for r in table.to_pylist()]

    def encode_all(t: Any) -> None:
        for x, sr in clips:
            t.encode(x, sr)

    km = load_audio_tokenizer(tcfg.audio.model_copy(update={"codebook": prepared["codebook"]}))
    secs = _median_time(lambda: encode_all(km), args.repeat)
    rows.append(("tokenizer kmeans-mel (100 units)", n / secs,
                 f"{audio_s / secs:.0f}x realtime; fit {fit_s:.1f} s"))

    def stage_run() -> None:
        st = Tokenize(TokenizeConfig(audio=km_cfg, text=None), _ctx("t", wd))
        st.setup()
        st.process(table)
        st.teardown()

    km_cfg = tcfg.audio.model_copy(update={"codebook": prepared["codebook"]})

    def read_encode_loop() -> None:
        sr = km.info.sample_rate
        for r in table.to_pylist():
            x, _ = read_clip(r, sample_rate=sr)
            km.encode(x, sr)

    s_loop = _median_time(read_encode_loop, args.repeat)
    s_stage = _median_time(stage_run, args.repeat)
    rows.append(("plain loop: read clip + kmeans-mel encode", n / s_loop, ""))
    rows.append(("tokenize stage (kmeans-mel), one worker", n / s_stage,
                 f"{(n / s_stage) / (n / s_loop):.2f}x of the plain loop"))
    text = load_text_tokenizer(TextTokenizerConfig(backend="whisper"))
    texts = table.column("text").to_pylist()
    secs = _median_time(lambda: [text.encode(t) for t in texts], args.repeat)
    rows.append(("text tokenizer whisper", n / secs, ""))

    if not args.skip_codecs:
        paths = build_codecs(wd / "codecs")
        import numpy as np  # noqa: F811

        specs = [("snac", "snac", {}), ("mimi", "mimi", {}),
                 ("encodec", "encodec_24khz", {}), ("hubert-kmeans", "hubert-base", {})]
        for backend, key, extra in specs:
            cfg = AudioTokenizerConfig(backend=backend, path=str(paths[key]), device="cpu",
                                       **extra)
            t = load_audio_tokenizer(cfg, offline=True)
            if backend == "hubert-kmeans":
                rng = np.random.default_rng(0)
                t.codebook = rng.normal(size=(500, 768)).astype(np.float32)
            few = clips[: min(len(clips), 12)]
            few_s = sum(len(x) / sr for x, sr in few)

            def enc(t: Any = t, few: Any = few) -> None:
                for x, sr in few:
                    t.encode(x, sr)

            secs = _median_time(enc, max(1, args.repeat - 1))
            rows.append((f"tokenizer {backend} (published size, random weights)",
                         len(few) / secs, f"{few_s / secs:.1f}x realtime"))
            t.close()
    print_tables(exports, rows)
    return 0


def print_tables(exports: list[tuple[str, float, float, str, str]],
                 rows: list[tuple[str, float, str]]) -> None:
    w = max(len(e[0]) for e in exports)
    print(f"{'exporter':<{w}}  {'utt/s':>8}  {'plain utt/s':>11}  {'vs plain':>8}  "
          "plain loop; same output")
    for label, ups, plain_ups, how, same in exports:
        print(f"{label:<{w}}  {ups:8.1f}  {plain_ups:11.1f}  {ups / plain_ups:7.2f}x  "
              f"{how}; {same}")
    if not rows:
        return
    print()
    w = max(len(r[0]) for r in rows)
    print(f"{'what':<{w}}  {'utt/s':>8}  notes")
    for label, ups, note in rows:
        print(f"{label:<{w}}  {ups:8.1f}  {note}")


if __name__ == "__main__":
    raise SystemExit(main())
