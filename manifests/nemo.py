"""Sink stage ``nemo``: NeMo ASR/TTS manifests, plain or tarred.

A manifest is JSON lines, one utterance per line, keys in a fixed order::

    {"audio_filepath": ..., "duration": ..., "offset": ..., "text": ..., "lang": ...,
     "speaker": ..., "id": ..., "dnsmos_ovrl": ..., ...}

Three layouts (per split, in ``<split>/`` when the input has a ``split`` column):

- reference (default): ``manifest.json`` points at the pipeline's own audio files with
  ``offset``/``duration``; paths relative to the manifest's directory (NeMo resolves a
  relative ``audio_filepath`` against it) or absolute (``paths: absolute``).
- ``materialize: true``: each utterance is cut into its own clip under ``audio/`` (FLAC or
  WAV, 16-bit, mono, optionally resampled) and ``offset`` is dropped.
- ``tarred: true``: clips go into ``audio_{shard}.tar`` (shard ids from 0), with
  ``sharded_manifests/manifest_{shard}.json`` and ``tarred_audio_manifest.json`` whose
  entries carry ``shard_id``. As NeMo's ``TarredAudioToTextDataset`` and its Lhotse adapter
  read them, a tar member's name is the entry's ``audio_filepath`` (a bare file name) and
  its stem (up to the extension) is the key the manifest is indexed by, so every name is
  ``<id>.<ext>`` made unique and safe: no ``/``, no ``.`` before the extension, and never
  ending in ``-sub<N>`` (the suffix NeMo uses for several offsets of one file).

Scores become top-level keys (``dnsmos_ovrl``, ``snr_db``, ...; a score named like a
NeMo key is written as ``score_<name>``). Rows without text are exported with ``"text":
""`` (NeMo's own default; useful for self-supervised and unlabeled data) unless
``require_text: true`` rejects them (``no_text``). Clips that cannot be cut become
rejects with the decoder's reason (``unreadable``, ``not_audio``, ...) or
``empty_audio``; in the reference layout a missing local file is ``unreadable``.
"""

from __future__ import annotations

import os
import re
from collections import Counter, deque
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field

from speechmill.manifests.common import (
    check_span,
    encode_audio,
    json_safe,
    open_tar,
    read_clip,
    rel_or_abs,
    scores_dict,
    shard_slices,
    split_groups,
    tar_add_bytes,
    track,
    write_jsonl,
)
from speechmill.pipeline.audio import AudioError, is_url
from speechmill.pipeline.records import reject, rejects_table
from speechmill.pipeline.stage import (
    Resources,
    SinkResult,
    Stage,
    StageConfig,
    StageContext,
)

#: the columns exporters read (everything else stays behind, to keep memory small)
ROW_COLUMNS = ("id", "source_url", "audio_path", "offset", "duration", "sample_rate",
               "speaker", "language", "text", "scores")
NEMO_KEYS = ("audio_filepath", "duration", "offset", "text", "lang", "speaker", "id",
             "shard_id")
#: FLAC of speech at 16 bits is about this fraction of PCM (used to estimate shard bytes)
FLAC_RATIO = 0.6


# -- helpers shared with the other clip-writing exporters ---------------------------------
@dataclass
class Clip:
    """One row's encoded clip, or why it could not be made."""

    row: dict[str, Any]
    data: bytes | None = None
    frames: int = 0
    sample_rate: int = 0
    reason: str | None = None
    detail: str = ""

    @property
    def seconds(self) -> float:
        return self.frames / self.sample_rate if self.sample_rate else 0.0


def encode_clip(row: Mapping[str, Any], fmt: str, sample_rate: int | None) -> Clip:
    """Cut ``row``'s audio and encode it; problems are returned, never raised."""
    r = dict(row)
    if not r.get("audio_path"):
        return Clip(r, reason="no_audio", detail="the row has no audio_path")
    try:
        x, sr = read_clip(r, sample_rate)
    except AudioError as e:
        return Clip(r, reason=e.reason, detail=e.detail or str(e))
    except Exception as e:  # a decoder failure on one row never stops the export
        return Clip(r, reason="unreadable", detail=f"{type(e).__name__}: {e}")
    if x.shape[0] == 0:
        return Clip(r, reason="empty_audio",
                    detail=f"no samples at offset {r.get('offset')} for {r.get('duration')} s")
    if not np.isfinite(x).all():
        return Clip(r, reason="nonfinite_samples", detail="NaN or inf samples")
    try:
        data = encode_audio(x, sr, fmt)
    except Exception as e:
        return Clip(r, reason="encode_failed", detail=f"{type(e).__name__}: {e}")
    return Clip(r, data=data, frames=int(x.shape[0]), sample_rate=int(sr))


def encode_clips(rows: Iterable[Mapping[str, Any]], fmt: str, sample_rate: int | None,
                 workers: int = 1) -> Iterator[Clip]:
    """:func:`encode_clip` over ``rows`` on ``workers`` threads (decoders release the
    GIL), yielded in input order with a bounded number in flight."""
    if workers <= 1:
        for r in rows:
            yield encode_clip(r, fmt, sample_rate)
        return
    window: deque[Future[Clip]] = deque()
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="clip") as pool:
        for r in rows:
            window.append(pool.submit(encode_clip, r, fmt, sample_rate))
            if len(window) >= 4 * workers:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()


def clip_name(row_id: str, ext: str, used: set[str]) -> str:
    """A unique, portable file name for a clip: ``<id>.<ext>`` with anything outside
    ``[A-Za-z0-9_-]`` replaced, no ``-sub<N>`` ending (NeMo's offset marker), and a
    ``_<k>`` suffix when two ids map to the same name."""
    stem = re.sub(r"[^A-Za-z0-9_-]", "_", str(row_id or "")) or "_"
    stem = stem[:200]
    if re.search(r"-sub\d+$", stem):
        stem += "_"
    name, k = stem, 1
    while name in used:
        k += 1
        name = f"{stem}_{k}"
    used.add(name)
    return f"{name}.{ext}"


def published_dir(out_dir: Path, ctx: StageContext, output_root: str) -> Path:
    """Where ``out_dir`` ends up: the engine exports into ``.<id>.partial`` next to
    ``RUN_DIR/<output_root>/<id>`` and renames it afterwards, so absolute paths into the
    export must name the final directory. Any other ``out_dir`` is its own final place."""
    final = Path(os.path.abspath(Path(ctx.run_dir) / output_root / ctx.stage_id))
    if (out_dir.name == f".{ctx.stage_id}.partial"
            and out_dir.parent.resolve() == final.parent.resolve()):
        return final  # abspath, not resolve(): relative paths survive moving the run dir
    return Path(os.path.abspath(out_dir))


def input_rows(table: pa.Table) -> list[dict[str, Any]]:
    cols = [c for c in ROW_COLUMNS if c in table.column_names]
    return table.select(cols).to_pylist()


def has_text(row: Mapping[str, Any]) -> bool:
    t = row.get("text")
    return isinstance(t, str) and bool(t.strip())


def flat_scores(row: Mapping[str, Any], reserved: Iterable[str] = ()) -> dict[str, Any]:
    """The row's scores as flat keys (nested structs joined with ``_``); finite values only;
    a name in ``reserved`` gets a ``score_`` prefix."""
    res = set(reserved)
    out: dict[str, Any] = {}

    def put(prefix: str, v: Any) -> None:
        if isinstance(v, Mapping):
            for k, x in v.items():
                put(f"{prefix}_{k}", x)
            return
        v = json_safe(v)
        if v is None:
            return
        out[f"score_{prefix}" if prefix in res else prefix] = v

    for k, v in scores_dict(row).items():
        put(str(k), v)
    return out


def output_rate(table: pa.Table, sample_rate: int | None) -> int:
    """The sample rate clips will have (for shard size estimates)."""
    if sample_rate:
        return int(sample_rate)
    if "sample_rate" in table.column_names and table.num_rows:
        import pyarrow.compute as pc

        m = pc.max(table.column("sample_rate")).as_py()
        if m:
            return int(m)
    return 16000


def summary_text(summary: Mapping[str, Any]) -> list[str]:
    lines = []
    for name, s in summary.get("splits", {}).items():
        shards = f", {s['shards']} shards" if "shards" in s else ""
        lines.append(f"{name}: {s['rows']} utterances, {s['hours']:.3f} h{shards}")
    if summary.get("rejected"):
        why = ", ".join(f"{k} {v}" for k, v in sorted(summary.get("reasons", {}).items()))
        lines.append(f"rejected: {summary['rejected']} ({why})")
    return lines


# -- the stage --------------------------------------------------------------------------
class NemoConfig(StageConfig):
    paths: Literal["relative", "absolute"] = Field(
        "relative", description="audio_filepath relative to the manifest's directory "
        "(NeMo resolves it there) or absolute")
    materialize: bool = Field(False, description="cut one clip per utterance under audio/ "
                              "(drops offset)")
    audio_format: Literal["flac", "wav"] = Field("flac", description="format of cut clips")
    sample_rate: int | None = Field(None, gt=0, description="resample clips (default: keep)")
    tarred: bool = Field(False, description="NeMo tarred dataset (implies cut clips)")
    shard_size: int | None = Field(None, ge=1, description="tarred: utterances per shard")
    shard_bytes: int | None = Field(
        500_000_000, ge=1, description="tarred: about this many audio bytes per shard")
    require_text: bool = Field(False, description="reject rows without text (no_text) "
                               "instead of exporting text \"\"")
    by_split: bool = Field(True, description="one subdirectory per value of `split`")
    workers: int = Field(2, ge=1, description="threads cutting and encoding clips")


class NemoManifest(Stage):
    name = "nemo"
    description = "NeMo manifest (JSON lines), optionally with cut clips or tarred shards"
    Config = NemoConfig
    resources = Resources(cpus=1)
    is_sink = True
    output_root = "exports"

    config: NemoConfig

    def export(self, inputs: pa.Table, out_dir: Path) -> SinkResult:
        cfg = self.config
        out_dir = Path(out_dir)
        pub_root = published_dir(out_dir, self.ctx, self.output_root)
        relative = cfg.paths == "relative"
        mode = "tarred" if cfg.tarred else "materialized" if cfg.materialize else "reference"
        rejects: list[dict[str, Any]] = []
        splits: dict[str, dict[str, Any]] = {}
        seconds = 0.0
        groups = split_groups(inputs, cfg.by_split) or [(None, inputs)]
        for split, table in groups:
            sub = out_dir / split if split else out_dir
            pub = pub_root / split if split else pub_root
            sub.mkdir(parents=True, exist_ok=True)
            rows = input_rows(table) if table.num_rows else []
            keep = []
            for r in rows:
                if cfg.require_text and not has_text(r):
                    rejects.append(reject(r, self.ctx.stage_id, "no_text", "empty transcript"))
                else:
                    keep.append(r)
            if cfg.tarred:
                n, secs, shards = self._tarred(keep, table, sub, rejects, split)
                splits[split or "all"] = {"rows": n, "hours": secs / 3600.0, "shards": shards}
                seconds += secs
                continue
            if cfg.materialize:
                entries = self._materialized(keep, sub, pub, relative, rejects, split)
            else:
                entries = self._reference(keep, pub, relative, rejects)
            write_jsonl(sub / "manifest.json", entries)
            secs = sum(float(e["duration"]) for e in entries)
            splits[split or "all"] = {"rows": len(entries), "hours": secs / 3600.0}
            seconds += secs
        rows_out = sum(s["rows"] for s in splits.values())
        reasons = Counter(r["reason"] for r in rejects)
        summary = {
            "mode": mode, "paths": "bare" if cfg.tarred else cfg.paths,
            "rows": rows_out, "hours": seconds / 3600.0, "rejected": len(rejects),
            "reasons": dict(sorted(reasons.items())), "splits": splits,
        }
        if cfg.tarred or cfg.materialize:
            summary["audio_format"] = cfg.audio_format
        return SinkResult(rows_out=rows_out, seconds_out=seconds,
                          rejects=rejects_table(rejects), summary=summary)

    @classmethod
    def summary_lines(cls, summary: dict[str, Any]) -> list[str]:
        return summary_text(summary)

    # -- layouts ------------------------------------------------------------------------
    def _entry(self, row: Mapping[str, Any], audio_filepath: str, duration: float,
               offset: float | None, shard_id: int | None = None) -> dict[str, Any]:
        e: dict[str, Any] = {"audio_filepath": audio_filepath, "duration": round(duration, 6)}
        if offset is not None:
            e["offset"] = round(offset, 6)
        text = row.get("text")
        e["text"] = text if isinstance(text, str) else ""
        e["lang"] = row.get("language")
        e["speaker"] = row.get("speaker")
        e["id"] = row.get("id")
        e.update(flat_scores(row, NEMO_KEYS))
        if shard_id is not None:
            e["shard_id"] = shard_id
        return e

    def _reference(self, rows: list[dict[str, Any]], pub: Path, relative: bool,
                   rejects: list[dict[str, Any]]) -> list[dict[str, Any]]:
        entries = []
        for r in rows:
            path = r.get("audio_path")
            if not path:
                rejects.append(reject(r, self.ctx.stage_id, "no_audio", "no audio_path"))
                continue
            if not is_url(path) and not os.path.isfile(path):
                rejects.append(reject(r, self.ctx.stage_id, "unreadable",
                                      f"no such file: {path}"))
                continue
            if r.get("duration") is None:
                rejects.append(reject(r, self.ctx.stage_id, "no_duration", "duration is null"))
                continue
            try:
                off, dur = check_span(r)
            except AudioError as e:
                rejects.append(reject(r, self.ctx.stage_id, e.reason, e.detail))
                continue
            entries.append(self._entry(r, rel_or_abs(path, pub, relative), float(dur or 0.0),
                                       off))
        return entries

    def _materialized(self, rows: list[dict[str, Any]], sub: Path, pub: Path, relative: bool,
                      rejects: list[dict[str, Any]], split: str | None
                      ) -> list[dict[str, Any]]:
        cfg = self.config
        audio_dir = sub / "audio"
        audio_dir.mkdir(parents=True, exist_ok=True)
        used: set[str] = set()
        entries = []
        clips = encode_clips(rows, cfg.audio_format, cfg.sample_rate, cfg.workers)
        for c in track(clips, len(rows), f"{self.ctx.stage_id} {split or ''} clips"):
            if c.data is None:
                rejects.append(reject(c.row, self.ctx.stage_id, c.reason or "unreadable",
                                      c.detail))
                continue
            name = clip_name(c.row.get("id"), cfg.audio_format, used)
            (audio_dir / name).write_bytes(c.data)
            afp = f"audio/{name}" if relative else str(pub / "audio" / name)
            entries.append(self._entry(c.row, afp, c.seconds, None))
        return entries

    def _tarred(self, rows: list[dict[str, Any]], table: pa.Table, sub: Path,
                rejects: list[dict[str, Any]], split: str | None) -> tuple[int, float, int]:
        cfg = self.config
        rate = output_rate(table, cfg.sample_rate)
        bps = rate * 2 * (FLAC_RATIO if cfg.audio_format == "flac" else 1.0)
        durs = pa.table({"duration": pa.array([r.get("duration") for r in rows], pa.float64())})
        slices = shard_slices(durs, cfg.shard_size, cfg.shard_bytes, bps)
        used: set[str] = set()
        every: list[dict[str, Any]] = []
        shard, start, secs = 0, 0, 0.0
        (sub / "sharded_manifests").mkdir(parents=True, exist_ok=True)
        for sl in slices:
            chunk = rows[start:start + sl.num_rows]
            start += sl.num_rows
            tar_path = sub / f"audio_{shard}.tar"
            entries = []
            with open_tar(tar_path) as tar:
                clips = encode_clips(chunk, cfg.audio_format, cfg.sample_rate, cfg.workers)
                for c in track(clips, len(chunk), f"{self.ctx.stage_id} shard {shard}"):
                    if c.data is None:
                        rejects.append(reject(c.row, self.ctx.stage_id,
                                              c.reason or "unreadable", c.detail))
                        continue
                    name = clip_name(c.row.get("id"), cfg.audio_format, used)
                    tar_add_bytes(tar, name, c.data)
                    entries.append(self._entry(c.row, name, c.seconds, None, shard))
                    secs += c.seconds
            if not entries:  # every row of this slice was rejected: reuse the shard id
                tar_path.unlink()
                continue
            write_jsonl(sub / "sharded_manifests" / f"manifest_{shard}.json", entries)
            every.extend(entries)
            shard += 1
        write_jsonl(sub / "tarred_audio_manifest.json", every)
        return len(every), secs, shard
