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
from collections import Counter
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
from pydantic import Field

from speechmill.manifests.common import (
    FLAC_RATIO,
    drop_textless,
    dumps_line,
    flat_scores,
    open_tar,
    open_text_out,
    output_rate,
    row_columns,
    shard_bounds,
    split_groups,
    summary_text,
    tar_add_bytes,
    track,
)
from speechmill.pipeline.audio import AudioError, is_url
from speechmill.pipeline.clips import check_span, encode_clips, namer_for
from speechmill.pipeline.publish import abs_audio_path, published_dir, rel_or_abs
from speechmill.pipeline.records import reject, rejects_table
from speechmill.pipeline.row_slices import iter_rows
from speechmill.pipeline.stage import Resources, SinkResult, Stage, StageConfig

#: the entry keys NeMo defines (a score with one of these names becomes ``score_<name>``)
NEMO_KEYS = ("audio_filepath", "duration", "offset", "text", "lang", "speaker", "id",
             "shard_id")


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
