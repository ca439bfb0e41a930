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
  ``<id>.<ext>`` made unique and safe: no ``/``, no ``.`` before the extension, no leading
  ``-``, and never ending in ``-sub<N>`` (the suffix NeMo uses for several offsets of one
  file).

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
import pyarrow.compute as pc
from pydantic import Field

from speechmill.manifests.common import (
    abs_audio_path,
    check_span,
    dumps_line,
    encode_audio,
    filter_rows,
    iter_rows,
    iter_slices,
    json_safe,
    open_tar,
    open_text_out,
    read_clip,
    rel_or_abs,
    scores_dict,
    shard_bounds,
    split_groups,
    tar_add_bytes,
    track,
)
from speechmill.pipeline.audio import AudioError, is_url
from speechmill.pipeline.records import reject, rejects_table
from speechmill.pipeline.safe_names import readable_part
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


def clip_stem(row_id: Any) -> str:
    """A clip's file name before any ``_<k>`` suffix and the extension: the id with
    anything outside ``[A-Za-z0-9_-]`` replaced and no leading ``-``
    (:func:`speechmill.pipeline.safe_names.readable_part`, strict), at most 200
    characters, never ending in ``-sub<N>`` (NeMo's offset marker). Not unique on its
    own: :func:`clip_name` / :class:`ClipNamer` make the names of one export unique
    (``_<k>``, names NeMo's readers need stable for ordinary ids)."""
    stem = readable_part(str(row_id or ""), strict=True)[:200]
    if re.search(r"-sub\d+$", stem):
        stem += "_"
    return stem


def _unique_name(stem: str, used: set[str]) -> str:
    name, k = stem, 1
    while name in used:
        k += 1
        name = f"{stem}_{k}"
    used.add(name)
    return name


def clip_name(row_id: str, ext: str, used: set[str]) -> str:
    """A unique, portable file name for a clip: ``<id>.<ext>`` with anything outside
    ``[A-Za-z0-9_-]`` replaced, no ``-sub<N>`` ending (NeMo's offset marker), and a
    ``_<k>`` suffix when two ids map to the same name."""
    return f"{_unique_name(clip_stem(row_id), used)}.{ext}"


class ClipNamer:
    """:func:`clip_name` over one export's clips (same names, in the same order of
    calls), without a set of every name handed out.

    Built over the ids that may be named (a superset is fine), it finds with Arrow the
    only stems whose names can depend on other clips: a stem two ids share, or one that
    reads ``<another stem>_<k>``. Only those go through :func:`clip_name`'s ``used`` set;
    any other clip's name is its own stem (no other clip can have taken it, and it can
    never be the ``<stem>_<k>`` another clip tries), so memory stays per colliding id,
    not per row."""

    _SUFFIX = r"^(?P<base>.*)_(?P<k>[0-9]+)$"

    def __init__(self, ids: pa.Array | pa.ChunkedArray) -> None:
        chunks = [pa.array([clip_stem(i) for i in part.to_pylist()], pa.string())
                  for part in iter_slices(ids)]
        stems = pa.chunked_array(chunks, pa.string())
        self.risky: set[str] = set()
        self.used: set[str] = set()
        if len(stems) == 0:
            return
        counts = pc.value_counts(stems)
        values = counts.field("values")
        self.risky.update(values.filter(pc.greater(counts.field("counts"), 1)).to_pylist())
        base = pc.struct_field(pc.extract_regex(stems, self._SUFFIX), "base")
        suffixed = pc.fill_null(pc.is_in(base, value_set=values), False)
        self.risky.update(pc.unique(stems.filter(suffixed)).to_pylist())

    def name(self, row_id: Any, ext: str) -> str:
        stem = clip_stem(row_id)
        if stem not in self.risky:
            return f"{stem}.{ext}"
        return f"{_unique_name(stem, self.used)}.{ext}"


def namer_for(table: pa.Table) -> ClipNamer:
    """A :class:`ClipNamer` over the ``id`` column of ``table``."""
    ids = table.column("id") if "id" in table.column_names \
        else pa.nulls(table.num_rows, pa.string())
    return ClipNamer(ids)


def published_dir(out_dir: Path, ctx: StageContext, output_root: str) -> Path:
    """Where ``out_dir`` ends up: the engine exports into ``.<id>.partial`` next to
    ``RUN_DIR/<output_root>/<id>`` and renames it afterwards, so absolute paths into the
    export must name the final directory. Any other ``out_dir`` is its own final place.
    A ``file://`` run directory is a local one; on object storage (``s3://``) the export
    is made in a local cache and uploaded, and only paths relative to it (or the media's
    own URLs) resolve there."""
    from speechmill.pipeline.audio import local_path
    from speechmill.pipeline.store import is_url as is_run_url

    run_dir = local_path(ctx.run_dir)
    if is_run_url(run_dir):
        return Path(os.path.abspath(out_dir))
    final = Path(os.path.abspath(Path(run_dir) / output_root / ctx.stage_id))
    if out_dir.name == f".{ctx.stage_id}.partial" and is_run_url(ctx.run_dir):
        return final  # file://: made in the local cache, then copied there
    if (out_dir.name == f".{ctx.stage_id}.partial"
            and out_dir.parent.resolve() == final.parent.resolve()):
        return final  # abspath, not resolve(): relative paths survive moving the run dir
    return Path(os.path.abspath(out_dir))


def input_rows(table: pa.Table) -> list[dict[str, Any]]:
    """Every row of ``table`` as a dict (the exporters' columns only). For small tables:
    exporters iterate with :func:`speechmill.manifests.common.iter_rows` instead."""
    cols = [c for c in ROW_COLUMNS if c in table.column_names]
    return table.select(cols).to_pylist()


def row_columns(table: pa.Table, extras: Iterable[str] = ()) -> pa.Table:
    """``table`` with only the columns exporters read (:data:`ROW_COLUMNS` + ``extras``)."""
    return table.select([c for c in (*ROW_COLUMNS, *extras) if c in table.column_names])


def has_text(row: Mapping[str, Any]) -> bool:
    t = row.get("text")
    return isinstance(t, str) and bool(t.strip())


def text_mask(table: pa.Table) -> np.ndarray:
    """:func:`has_text` of every row (the same test) as a bool array, read a slice at a
    time."""
    out = np.zeros(table.num_rows, dtype=bool)
    if "text" not in table.column_names:
        return out
    a = 0
    for part in iter_slices(table.column("text")):
        vals = part.to_pylist()
        out[a:a + len(vals)] = [isinstance(t, str) and bool(t.strip()) for t in vals]
        a += len(vals)
    return out


def drop_textless(table: pa.Table, stage_id: str, rejects: list[dict[str, Any]]
                  ) -> pa.Table:
    """The rows of ``table`` with text; the others (in order) become ``no_text`` rejects."""
    mask = text_mask(table)
    if mask.all():
        return table
    for r in iter_rows(filter_rows(table, ~mask)):
        rejects.append(reject(r, stage_id, "no_text", "empty transcript"))
    return filter_rows(table, mask)


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
        if cfg.materialize and not cfg.tarred and cfg.paths == "absolute":
            from speechmill.pipeline.audio import is_url as is_remote
            from speechmill.pipeline.errors import ConfigError

            if is_remote(self.ctx.run_dir):  # s3://...; file:// is a local directory
                raise ConfigError(
                    "paths: absolute with materialize: true names the clips by local path; "
                    f"the run directory {self.ctx.run_dir!r} is on object storage, where "
                    "the export is made locally and uploaded: use paths: relative",
                    stage=self.ctx.stage_id, key="paths")
        pub_root = published_dir(out_dir, self.ctx, self.output_root)
        relative = cfg.paths == "relative"
        mode = "tarred" if cfg.tarred else "materialized" if cfg.materialize else "reference"
        rejects: list[dict[str, Any]] = []
        splits: dict[str, dict[str, Any]] = {}
        seconds = 0.0
        groups = split_groups(inputs, cfg.by_split) or [(None, inputs)]
        # Python objects exist for one slice of rows at a time: rows are converted
        # slice by slice and manifest lines go to disk as they are made
        for split, group in groups:
            sub = out_dir / split if split else out_dir
            pub = pub_root / split if split else pub_root
            sub.mkdir(parents=True, exist_ok=True)
            table = row_columns(group)
            keep = drop_textless(table, self.ctx.stage_id, rejects) if cfg.require_text \
                else table
            if cfg.tarred:
                n, secs, shards = self._tarred(keep, table, sub, rejects, split)
                splits[split or "all"] = {"rows": n, "hours": secs / 3600.0, "shards": shards}
                seconds += secs
                continue
            if cfg.materialize:
                entries = self._materialized(keep, sub, pub, relative, rejects, split)
            else:
                entries = self._reference(keep, pub, relative, rejects)
            n, secs = 0, 0.0
            with open_text_out(sub / "manifest.json") as f:
                for e in entries:
                    f.write(dumps_line(e) + "\n")
                    n += 1
                    secs += float(e["duration"])
            splits[split or "all"] = {"rows": n, "hours": secs / 3600.0}
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

    def _reference(self, table: pa.Table, pub: Path, relative: bool,
                   rejects: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for r in iter_rows(table):
            path = r.get("audio_path")
            if not path:
                rejects.append(reject(r, self.ctx.stage_id, "no_audio", "no audio_path"))
                continue
            if not is_url(path) and not os.path.isfile(abs_audio_path(path)):
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
            yield self._entry(r, rel_or_abs(path, pub, relative), float(dur or 0.0), off)

    def _materialized(self, table: pa.Table, sub: Path, pub: Path, relative: bool,
                      rejects: list[dict[str, Any]], split: str | None
                      ) -> Iterator[dict[str, Any]]:
        cfg = self.config
        audio_dir = sub / "audio"
        audio_dir.mkdir(parents=True, exist_ok=True)
        namer = namer_for(table)
        clips = encode_clips(iter_rows(table), cfg.audio_format, cfg.sample_rate, cfg.workers)
        for c in track(clips, table.num_rows, f"{self.ctx.stage_id} {split or ''} clips"):
            if c.data is None:
                rejects.append(reject(c.row, self.ctx.stage_id, c.reason or "unreadable",
                                      c.detail))
                continue
            name = namer.name(c.row.get("id"), cfg.audio_format)
            (audio_dir / name).write_bytes(c.data)
            afp = f"audio/{name}" if relative else str(pub / "audio" / name)
            yield self._entry(c.row, afp, c.seconds, None)

    def _tarred(self, keep: pa.Table, table: pa.Table, sub: Path,
                rejects: list[dict[str, Any]], split: str | None) -> tuple[int, float, int]:
        """Shards of ``keep`` (the exported rows of the split ``table``); each entry goes
        to its shard's manifest and to ``tarred_audio_manifest.json`` as it is made."""
        cfg = self.config
        rate = output_rate(table, cfg.sample_rate)
        bps = rate * 2 * (FLAC_RATIO if cfg.audio_format == "flac" else 1.0)
        bounds = shard_bounds(keep, cfg.shard_size, cfg.shard_bytes, bps)
        namer = namer_for(keep)
        shard, n, secs = 0, 0, 0.0
        (sub / "sharded_manifests").mkdir(parents=True, exist_ok=True)
        with open_text_out(sub / "tarred_audio_manifest.json") as every:
            for a, b in bounds:
                chunk = keep.slice(a, b - a)
                tar_path = sub / f"audio_{shard}.tar"
                shard_f = None
                try:
                    with open_tar(tar_path) as tar:
                        clips = encode_clips(iter_rows(chunk), cfg.audio_format,
                                             cfg.sample_rate, cfg.workers)
                        for c in track(clips, chunk.num_rows,
                                       f"{self.ctx.stage_id} shard {shard}"):
                            if c.data is None:
                                rejects.append(reject(c.row, self.ctx.stage_id,
                                                      c.reason or "unreadable", c.detail))
                                continue
                            name = namer.name(c.row.get("id"), cfg.audio_format)
                            tar_add_bytes(tar, name, c.data)
                            line = dumps_line(self._entry(c.row, name, c.seconds, None,
                                                          shard)) + "\n"
                            if shard_f is None:
                                shard_f = open_text_out(
                                    sub / "sharded_manifests" / f"manifest_{shard}.json")
                            shard_f.write(line)
                            every.write(line)
                            n += 1
                            secs += c.seconds
                finally:
                    if shard_f is not None:
                        shard_f.close()
                if shard_f is None:  # every row of this slice was rejected: reuse the id
                    tar_path.unlink()
                    continue
                shard += 1
        return n, secs, shard
