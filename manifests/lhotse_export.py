"""Sink stages ``lhotse`` (Lhotse manifests) and ``lhotse_shar`` (Lhotse Shar shards).

``lhotse`` writes ``recordings.jsonl.gz``, ``supervisions.jsonl.gz`` and ``cuts.jsonl.gz``
built with Lhotse's own classes (``Recording``, ``SupervisionSegment``, ``MonoCut``):

- one Recording per distinct source file (its real ``num_samples``, ``sampling_rate`` and
  ``duration``, probed once per file with soundfile, PyAV as fallback); its id is the
  rows' recording id (the segment id's part before the first ``-``), suffixed with
  ``_<sha256(path)[:8]>`` when rows of one recording id point at different files;
- one SupervisionSegment per row (id = row id, ``start`` = ``offset``, channel 0, ``text``
  (``""`` for rows without a transcript, e.g. straight after ``standardize``),
  ``language``, ``speaker``, word alignment under ``alignment["word"]`` as
  ``AlignmentItem(symbol, start, duration, score=prob)``, and ``custom`` with
  ``source_url``, ``parent_id``, ``split`` and ``scores``; synthetic turn rows (``tts``
  output) add ``dialogue_id``, ``round``, ``role``, ``synthetic``, ``voice_id``,
  ``voice_source``, ``tts_backend``, ``tts_version`` and the parsed provenance JSON
  ``synth`` and ``text_source``);
- one MonoCut per row (id = row id) over its recording, holding its supervision.

Times follow Lhotse 1.33: a supervision's ``start`` is on the recording's timeline in
``supervisions.jsonl.gz`` and relative to the cut (0) inside cuts, while alignment items
stay on the recording's timeline in both (``trim_to_alignments`` subtracts ``cut.start``).
Audio paths are absolute, or relative to the manifest's directory with
``relative_paths: true`` (load those with ``cuts.with_recording_path_prefix(dir)``).
Multi-channel files are referenced as channel 0. Rows whose file cannot be probed, or
whose span lies outside the file (more than ``CLAMP_TOLERANCE_S``; less is clamped),
become rejects.

``lhotse_shar`` writes Lhotse Shar (loads with ``CutSet.from_shar(in_dir=...)``):
``cuts.NNNNNN.jsonl.gz``, ``recording.NNNNNN.tar`` (each row's clip, decoded, downmixed to
mono, optionally resampled, encoded as 16-bit FLAC or WAV) and, when the input carries
tokens, numpy custom fields ``<field>.NNNNNN.tar`` (``np.save`` int32, Lhotse ``Array``
manifests, so ``cut.load_codes()`` returns every frame, never re-sliced by duration):

- ``codes`` = ``[n_codebooks, frames]`` when all codebooks of a row have the same length;
- ``codes_0``, ``codes_1``, ... = one 1-D array per codebook for multi-rate codecs (SNAC),
  chosen by ``codes_layout`` (``auto``: per codebook when any row is ragged or the codec
  declares several ``codebook_frame_rates``);
- ``text_ids`` = 1-D token ids.

The tokenizer identities (``audio_tokenizer`` / ``text_tokenizer`` JSON columns) become the cut's
``custom["codec"]`` / ``custom["text_tokenizer"]``. In Shar each cut starts at 0 on its own
clip, so alignments are relative to the clip start. A Shar cut's id names its tar members
(``<cut id>.flac``, ``<cut id>.json``; Lhotse checks that they match), so it is the row
id made a safe name (:func:`speechmill.pipeline.safe_names.safe_name`, at most
:data:`SHAR_ID_BYTES` bytes): an ordinary id stays as it is; an id such as
``../../escape``, ``/etc/passwd``, ``''`` or ``-rf`` becomes a readable part plus a hash,
and the row id is kept in the supervision's id and in ``custom["origin"]["id"]``. Shards
hold ``shard_size`` exported cuts; every field's tar has the same shards (a missing value
is a ``.nodata`` placeholder).
Rows whose audio cannot be decoded become rejects.

Both write one subdirectory per split when the input has a ``split`` column. Outputs are
byte-identical for the same input: rows are ordered by id, JSON is written by speechmill
(gzip without mtime) and tar members carry no timestamps or owners.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections import defaultdict
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field

from speechmill.manifests.common import (
    dumps_line,
    json_safe,
    open_tar,
    open_text_out,
    scores_dict,
    split_groups,
    tar_add_bytes,
    track,
    write_jsonl,
)
from speechmill.pipeline.audio import AudioError, is_url, local_path, probe
from speechmill.pipeline.clips import encode_audio, read_clip
from speechmill.pipeline.publish import abs_audio_path, rel_or_abs
from speechmill.pipeline.records import recording_id, reject, rejects_table
from speechmill.pipeline.row_slices import iter_rows, iter_slices
from speechmill.pipeline.safe_names import is_safe_name, safe_name
from speechmill.pipeline.stage import Resources, SinkResult, Stage, StageConfig

#: a span ending at most this far past its file's end is clamped to the end, not rejected
CLAMP_TOLERANCE_S = 0.05
#: Shar: decoded audio this much shorter than ``duration`` is a reject, less is zero-padded
SHORT_AUDIO_TOLERANCE_S = 0.05
#: Shar: longest cut id (= tar member name before its extension) in bytes of UTF-8, so a
#: member such as ``<id>.nometa`` stays a valid file name (255 bytes) when extracted
SHAR_ID_BYTES = 200


# ---------------------------------------------------------------------------------------
# configs


class LhotseConfig(StageConfig):
    relative_paths: bool = Field(
        False, description="audio paths relative to the manifest's directory (else absolute)"
    )
    by_split: bool = Field(True, description="one subdirectory per value of `split`")


class LhotseSharConfig(StageConfig):
    shard_size: int = Field(1000, ge=1, description="cuts per shard")
    shard_bytes: int | None = Field(None, ge=1024, description="also start a new shard "
                                    "before a shard's tars would pass this many bytes")
    audio_format: Literal["flac", "wav"] = Field("flac", description="recording.*.tar codec")
    sample_rate: int | None = Field(
        None, ge=8000, le=192000, description="resample clips to this rate (null: keep)"
    )
    codes_layout: Literal["auto", "stacked", "per_codebook"] = Field(
        "auto", description="`codes` [n_codebooks, frames], or `codes_<k>` per codebook "
        "(multi-rate codecs); auto picks per codebook when codebook lengths differ"
    )
    by_split: bool = Field(True, description="one subdirectory per value of `split`")


# ---------------------------------------------------------------------------------------
# shared helpers


class _RowReject(Exception):  # noqa: N818 - a verdict, not an engine failure
    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


#: rows whose (recording, path) pairs are computed at a time
PAIR_SLICE_ROWS = 1 << 20


def _recording_id_column(ids: pa.ChunkedArray) -> pa.ChunkedArray:
    """:func:`recording_id` of every id, as an Arrow string column."""
    import pyarrow.compute as pc

    if pa.types.is_dictionary(ids.type):
        ids = ids.cast(ids.type.value_type)
    if pa.types.is_string(ids.type) or pa.types.is_large_string(ids.type):
        # str(None) == "None"; the part before the first "-"
        parts = pc.split_pattern(pc.fill_null(ids, "None"), "-", max_splits=1)
        return pc.list_element(parts, 0)
    return pa.chunked_array([pa.array([recording_id(x) for x in part.to_pylist()],
                                      pa.string()) for part in iter_slices(ids)],
                            pa.string())


def _recording_ids(table: pa.Table) -> dict[tuple[str, str], str]:
    """(recording id, absolute audio path) -> Lhotse recording id. A recording id whose
    rows point at several files gets ``_<sha256(path)[:8]>`` per file (order-free).
    Computed with Arrow over the distinct (recording id, path) pairs: Python objects per
    recording, never per row."""
    import pyarrow.compute as pc

    if table.num_rows == 0 or "audio_path" not in table.column_names:
        return {}
    audio = table.column("audio_path")
    if pa.types.is_dictionary(audio.type):
        audio = audio.cast(audio.type.value_type)
    if not (pa.types.is_string(audio.type) or pa.types.is_large_string(audio.type)):
        audio = audio.cast(pa.string())
    ids = table.column("id") if "id" in table.column_names \
        else pa.chunked_array([pa.nulls(table.num_rows, pa.string())])
    # distinct pairs a slice at a time, then across slices: Arrow memory per recording
    found = []
    for a in range(0, table.num_rows, PAIR_SLICE_ROWS):
        pairs = pa.table({"rid": _recording_id_column(ids.slice(a, PAIR_SLICE_ROWS)),
                          "path": audio.slice(a, PAIR_SLICE_ROWS)})
        pairs = pairs.filter(pc.fill_null(pc.not_equal(pairs.column("path"), ""), False))
        found.append(pairs.group_by(["rid", "path"], use_threads=False).aggregate([]))
    distinct = pa.concat_tables(found).group_by(["rid", "path"], use_threads=False) \
        .aggregate([])
    paths: dict[str, set[str]] = defaultdict(set)
    for rid, p in zip(distinct.column("rid").to_pylist(), distinct.column("path").to_pylist(),
                      strict=True):
        paths[rid].add(abs_audio_path(str(p)))
    out: dict[tuple[str, str], str] = {}
    for base, ps in paths.items():
        for p in ps:
            out[(base, p)] = base if len(ps) == 1 else \
                f"{base}_{hashlib.sha256(p.encode('utf-8')).hexdigest()[:8]}"
    return out


def _probe_file(path: str) -> tuple[int, int, int]:
    """(sampling_rate, num_samples, channels) of an audio file; raises AudioError."""
    from lhotse.utils import compute_num_samples

    if not is_url(path):
        import soundfile as sf

        try:
            info = sf.info(local_path(path))
            if info.frames > 0 and info.samplerate > 0:
                return int(info.samplerate), int(info.frames), int(info.channels)
        except Exception:  # noqa: BLE001 - not a libsndfile format: ask PyAV
            pass
    info = probe(path)
    if not info.duration or info.duration <= 0:
        raise AudioError("unknown_duration", f"no duration in the header of {path}")
    return info.sample_rate, compute_num_samples(info.duration, info.sample_rate), \
        info.channels


def _span(row: Mapping[str, Any], file_duration: float | None) -> tuple[float, float]:
    """(offset, duration) of a row, checked against its file's duration when known."""
    off = float(row.get("offset") or 0.0)
    dur = row.get("duration")
    if dur is None:
        if file_duration is None:
            raise _RowReject("bad_span", "no duration")
        dur = file_duration - off
    dur = float(dur)
    if not np.isfinite(off) or not np.isfinite(dur) or off < 0 or dur <= 0:
        raise _RowReject("bad_span", f"offset {off} duration {dur}")
    if file_duration is not None and off + dur > file_duration + 1e-3:
        over = off + dur - file_duration
        if over > CLAMP_TOLERANCE_S or file_duration - off <= 0:
            raise _RowReject("out_of_bounds", f"span {off:.3f}+{dur:.3f} s ends {over:.3f} s "
                             f"after the file's end ({file_duration:.3f} s)")
        dur = round(file_duration - off, 6)
    return off, dur


def _alignment(words: Any, base: float) -> dict[str, list[Any]] | None:
    """Lhotse word alignment from speechmill ``words`` (times from the segment start),
    shifted by ``base`` seconds. Words without times are left out."""
    from lhotse.supervision import AlignmentItem

    items = []
    for w in words or []:
        if not w or w.get("start") is None or w.get("end") is None:
            continue
        s, e = float(w["start"]), float(w["end"])
        prob = w.get("prob")
        items.append(AlignmentItem(
            symbol=str(w.get("word") or "").strip(), start=round(base + s, 6),
            duration=round(max(0.0, e - s), 6),
            score=None if prob is None or not np.isfinite(prob) else float(prob)))
    return {"word": items} if items else None


#: dialogue and provenance columns of synthetic turn rows (the ``tts`` stage's output)
#: that go into ``custom`` when a row has them
SYNTH_KEYS = ("dialogue_id", "round", "role", "synthetic", "voice_id", "voice_source",
              "tts_backend", "tts_version")


def _sup_custom(row: Mapping[str, Any]) -> dict[str, Any] | None:
    custom: dict[str, Any] = {}
    for key in ("source_url", "parent_id", "split", *SYNTH_KEYS):
        if row.get(key) is not None:
            custom[key] = row[key]
    if row.get("synthetic"):  # provenance JSON columns of synthetic rows, parsed
        for key, name in (("synth", "synth"), ("source", "text_source")):
            v = row.get(key)
            if v is not None:
                custom[name] = _json_col(v) or v
    scores = json_safe(scores_dict(row))
    scores = {k: v for k, v in scores.items() if v is not None}
    if scores:
        custom["scores"] = scores
    return custom or None


def supervision(row: Mapping[str, Any], rec_id: str, start: float, duration: float,
                 ali_base: float) -> Any:
    """A Lhotse ``SupervisionSegment`` for ``row`` on recording ``rec_id`` at ``start`` for
    ``duration`` seconds: text, language, speaker, ``custom`` (source, split, synthetic
    provenance, finite scores) and the word alignment shifted by ``ali_base`` seconds."""
    from lhotse import SupervisionSegment

    return SupervisionSegment(
        id=str(row["id"]), recording_id=rec_id, start=start, duration=duration, channel=0,
        text=row.get("text") or "", language=row.get("language") or None,
        speaker=row.get("speaker") or None, custom=_sup_custom(row),
        alignment=_alignment(row.get("words"), ali_base),
    )


def _rows(table: pa.Table, batch: int = 256) -> Iterator[dict[str, Any]]:
    """The rows of ``table`` as dicts, converted a batch at a time (bounded memory)."""
    return iter_rows(table, size=batch)


def _split_dir(out_dir: Path, split: str | None) -> Path:
    d = out_dir / split if split else out_dir
    d.mkdir(parents=True, exist_ok=True)
    return d


def _summary(per_split: dict[str, int], rejects: list[dict[str, Any]],
             **extra: Any) -> dict[str, Any]:
    reasons: dict[str, int] = defaultdict(int)
    for r in rejects:
        reasons[r["reason"]] += 1
    return {"splits": per_split, "rejected": len(rejects),
            "reject_reasons": dict(sorted(reasons.items())), **extra}


# ---------------------------------------------------------------------------------------
# lhotse manifests


class LhotseExport(Stage):
    """Lhotse ``recordings`` / ``supervisions`` / ``cuts`` manifests (jsonl.gz)."""

    name = "lhotse"
    description = "Lhotse manifests: recordings, supervisions and cuts (jsonl.gz)"
    Config = LhotseConfig
    resources = Resources(cpus=1)
    is_sink = True
    output_root = "exports"

    def export(self, inputs: pa.Table, out_dir: Path) -> SinkResult:
        from lhotse import AudioSource, MonoCut, Recording
        from lhotse.utils import fastcopy

        cfg: LhotseConfig = self.config  # type: ignore[assignment]
        rec_ids = _recording_ids(inputs)
        probes: dict[str, tuple[int, int, int] | AudioError] = {}
        rejects: list[dict[str, Any]] = []
        per_split: dict[str, int] = {}
        n_rows, seconds, n_recs = 0, 0.0, 0
        groups = split_groups(inputs, cfg.by_split) or [(None, inputs)]
        for split, table in groups:
            d = _split_dir(out_dir, split)
            recs: dict[str, Any] = {}
            n = 0
            # supervisions and cuts stream out; recordings (one per file) are kept
            with open_text_out(d / "supervisions.jsonl.gz") as sup_f, \
                    open_text_out(d / "cuts.jsonl.gz") as cut_f:
                for row in track(_rows(table), table.num_rows, f"lhotse {split or ''}"):
                    try:
                        if not row.get("audio_path"):
                            raise _RowReject("no_audio_path", "row has no audio_path")
                        path = abs_audio_path(str(row["audio_path"]))
                        if path not in probes:
                            try:
                                probes[path] = _probe_file(path)
                            except AudioError as e:
                                probes[path] = e
                            except Exception as e:  # noqa: BLE001 - a bad file is a reject
                                probes[path] = AudioError("unreadable",
                                                          f"{type(e).__name__}: {e}")
                        pr = probes[path]
                        if isinstance(pr, AudioError):
                            raise _RowReject(pr.reason, pr.detail)
                        sr, n_samples, ch = pr
                        off, dur = _span(row, n_samples / sr)
                    except _RowReject as r:
                        rejects.append(reject(row, self.ctx.stage_id, r.reason, r.detail))
                        continue
                    rid = rec_ids[(recording_id(row["id"]), path)]
                    if rid not in recs:
                        src = rel_or_abs(path, d, cfg.relative_paths)
                        recs[rid] = Recording(
                            id=rid,
                            sources=[AudioSource(type="url" if is_url(src) else "file",
                                                 channels=list(range(ch)), source=src)],
                            sampling_rate=sr, num_samples=n_samples, duration=n_samples / sr)
                    sup = supervision(row, rid, off, dur, ali_base=off)
                    cut = MonoCut(id=str(row["id"]), start=off, duration=dur, channel=0,
                                  recording=recs[rid], supervisions=[fastcopy(sup, start=0.0)])
                    sup_f.write(dumps_line(sup.to_dict()) + "\n")
                    cut_f.write(dumps_line(cut.to_dict()) + "\n")
                    n += 1
                    seconds += dur
            write_jsonl(d / "recordings.jsonl.gz", (recs[k].to_dict() for k in sorted(recs)))
            per_split[split or "all"] = n
            n_rows += n
            n_recs += len(recs)
        return SinkResult(
            rows_out=n_rows, seconds_out=seconds, rejects=rejects_table(rejects),
            summary=_summary(per_split, rejects, recordings=n_recs,
                             relative_paths=cfg.relative_paths))

    @classmethod
    def summary_lines(cls, summary: dict[str, Any]) -> list[str]:
        if not summary:
            return []
        splits = ", ".join(f"{k}: {v}" for k, v in summary.get("splits", {}).items())
        return [f"lhotse: {summary.get('recordings', 0)} recordings; cuts {splits}"]


# ---------------------------------------------------------------------------------------
# lhotse shar


def _json_col(v: Any) -> dict[str, Any] | None:
    """A tokenizer identity column value (JSON text or struct) as a dict, else None."""
    if isinstance(v, Mapping):
        return dict(v)
    if isinstance(v, str) and v.lstrip().startswith("{"):
        try:
            d = json.loads(v)
        except ValueError:
            return None
        return d if isinstance(d, dict) else None
    return None


def _codes_plan(table: pa.Table, layout: str) -> tuple[str | None, int]:
    """('stacked' | 'per_codebook' | None, max codebooks) over the whole input, computed
    with Arrow (no Python lists of codes)."""
    import pyarrow.compute as pc

    if "codes" not in table.column_names or table.num_rows == 0:
        return None, 0
    codes = table.column("codes")
    n_cb, nulls, ragged = 0, 0, False
    # chunk by chunk: a mapped input stays mapped (no combined copy of every code)
    for col in codes.chunks:
        nulls += col.null_count
        n_cb = max(n_cb, pc.max(pc.list_value_length(col)).as_py() or 0)
        inner = pc.list_flatten(col)  # one entry per codebook of every row
        if ragged or not len(inner):
            continue
        parents = np.asarray(pc.list_parent_indices(col).to_numpy(zero_copy_only=False))
        lens = np.asarray(pc.fill_null(pc.list_value_length(inner), 0)
                          .to_numpy(zero_copy_only=False), dtype=np.int64)
        hi = np.full(len(col), -1, np.int64)
        lo = np.full(len(col), np.iinfo(np.int64).max, np.int64)
        np.maximum.at(hi, parents, lens)
        np.minimum.at(lo, parents, lens)
        ragged = bool(np.any((hi >= 0) & (hi != lo)))
    if nulls == len(codes) or n_cb == 0:
        return None, 0
    if layout == "auto" and not ragged and "audio_tokenizer" in table.column_names:
        for v in table.column("audio_tokenizer").unique().to_pylist():
            rates = (_json_col(v) or {}).get("codebook_frame_rates")
            if rates and len({float(r) for r in rates}) > 1:
                ragged = True
    if layout == "auto":
        layout = "per_codebook" if ragged else "stacked"
    return layout, n_cb


class _SharShards:
    """Writes Shar shards: one cuts jsonl.gz plus one tar per field, rotated together
    every ``shard_size`` cuts. Tar members: ``<cut id>.<ext>`` then ``<cut id>.json``, or
    ``<cut id>.nodata`` + ``<cut id>.nometa`` where a cut has no value. A cut id must be
    a safe name already (``LhotseShar._row`` makes it one)."""

    def __init__(self, out: Path, fields: list[str], shard_size: int,
                 shard_bytes: int | None = None) -> None:
        self.out = out
        self.fields = fields
        self.shard_size = shard_size
        self.shard_bytes = shard_bytes
        self.shard = -1
        self.count = 0
        self.bytes = 0
        self.cuts_f: IO[str] | None = None
        self.tars: dict[str, Any] = {}

    def _rotate(self) -> None:
        self.close()
        self.shard += 1
        self.count = 0
        self.bytes = 0
        self.cuts_f = open_text_out(self.out / f"cuts.{self.shard:06d}.jsonl.gz")
        self.tars = {f: open_tar(self.out / f"{f}.{self.shard:06d}.tar") for f in self.fields}

    def write(self, cut: Mapping[str, Any],
              members: Mapping[str, tuple[str, bytes, Mapping[str, Any]] | None]) -> None:
        size = sum(len(m[1]) for m in members.values() if m is not None)
        if self.cuts_f is None or self.count >= self.shard_size or (
                self.shard_bytes is not None and self.count
                and self.bytes + size > self.shard_bytes):
            self._rotate()
        self.bytes += size
        cid = str(cut["id"])
        if not is_safe_name(cid, max_bytes=SHAR_ID_BYTES):
            raise ValueError(f"cut id {cid!r} is not a safe tar member name")
        for f in self.fields:
            m = members.get(f)
            if m is None:
                tar_add_bytes(self.tars[f], f"{cid}.nodata", b"")
                tar_add_bytes(self.tars[f], f"{cid}.nometa", b"")
            else:
                ext, data, meta = m
                tar_add_bytes(self.tars[f], f"{cid}.{ext}", data)
                tar_add_bytes(self.tars[f], f"{cid}.json",
                              (dumps_line(meta) + "\n").encode("utf-8"))
        assert self.cuts_f is not None
        self.cuts_f.write(dumps_line(cut) + "\n")
        self.count += 1

    @property
    def n_shards(self) -> int:
        return self.shard + 1

    def close(self) -> None:
        if self.cuts_f is not None:
            self.cuts_f.close()
            self.cuts_f = None
        for t in self.tars.values():
            t.close()
        self.tars = {}


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


class LhotseShar(Stage):
    """Lhotse Shar shards: cuts + FLAC recordings + numpy token fields."""

    name = "lhotse_shar"
    description = "Lhotse Shar: cuts.NNNNNN.jsonl.gz, recording.NNNNNN.tar, token fields"
    Config = LhotseSharConfig
    resources = Resources(cpus=1)
    is_sink = True
    output_root = "exports"

    def export(self, inputs: pa.Table, out_dir: Path) -> SinkResult:
        cfg: LhotseSharConfig = self.config  # type: ignore[assignment]
        layout, n_cb = _codes_plan(inputs, cfg.codes_layout)
        fields = ["recording"]
        if layout == "stacked":
            fields.append("codes")
        elif layout == "per_codebook":
            fields += [f"codes_{k}" for k in range(n_cb)]
        if "text_ids" in inputs.column_names and inputs.column("text_ids").null_count \
                < inputs.num_rows:
            fields.append("text_ids")
        rec_ids = _recording_ids(inputs)
        rejects: list[dict[str, Any]] = []
        per_split: dict[str, int] = {}
        n_rows, n_shards, seconds = 0, 0, 0.0
        for split, table in split_groups(inputs, cfg.by_split):
            d = _split_dir(out_dir, split)
            w = _SharShards(d, fields, cfg.shard_size, cfg.shard_bytes)
            n = 0
            try:
                for row in track(_rows(table), table.num_rows, f"shar {split or ''}"):
                    try:
                        cut, members, dur = self._row(row, rec_ids, layout, n_cb, cfg)
                    except _RowReject as r:
                        rejects.append(reject(row, self.ctx.stage_id, r.reason, r.detail))
                        continue
                    w.write(cut, members)
                    n += 1
                    seconds += dur
            finally:
                w.close()
            per_split[split or "all"] = n
            n_rows += n
            n_shards += w.n_shards
        return SinkResult(
            rows_out=n_rows, seconds_out=seconds, rejects=rejects_table(rejects),
            summary=_summary(per_split, rejects, shards=n_shards, fields=fields,
                             codes_layout=layout, shard_size=cfg.shard_size))

    def _row(self, row: dict[str, Any], rec_ids: Mapping[tuple[str, str], str],
             layout: str | None, n_cb: int, cfg: LhotseSharConfig
             ) -> tuple[dict[str, Any], dict[str, Any], float]:
        from lhotse import AudioSource, MonoCut, Recording
        from lhotse.array import Array
        from lhotse.utils import compute_num_samples

        if not row.get("audio_path"):
            raise _RowReject("no_audio_path", "row has no audio_path")
        path = abs_audio_path(str(row["audio_path"]))
        has_dur = row.get("duration") is not None
        if has_dur:
            _span(row, None)  # a bad span is rejected before any decoding
        try:
            x, sr = read_clip(row, sample_rate=cfg.sample_rate)
        except AudioError as e:
            raise _RowReject(e.reason, e.detail) from None
        except Exception as e:  # noqa: BLE001 - a bad file is a reject
            raise _RowReject("unreadable", f"{type(e).__name__}: {e}") from None
        # no duration: the clip runs to the end of the file
        off, dur = _span(row, None if has_dur
                         else float(row.get("offset") or 0.0) + x.shape[0] / sr)
        want = compute_num_samples(dur, sr)
        if want <= 0 or x.shape[0] == 0:
            raise _RowReject("empty_audio", f"no samples decoded from {path} at {off:.3f} s")
        if x.shape[0] < want - SHORT_AUDIO_TOLERANCE_S * sr:
            raise _RowReject("short_audio", f"decoded {x.shape[0] / sr:.3f} s of "
                             f"{dur:.3f} s from {path} at {off:.3f} s")
        if x.shape[0] != want:
            x = np.pad(x[:want], (0, max(0, want - x.shape[0])))
        rid = rec_ids[(recording_id(row["id"]), path)]
        fmt = cfg.audio_format
        rec = Recording(id=rid, sources=[AudioSource(type="shar", channels=[0], source="")],
                        sampling_rate=sr, num_samples=want, duration=dur)
        members: dict[str, Any] = {
            "recording": (fmt, encode_audio(x, sr, fmt), rec.to_dict())}
        row_id = "" if row.get("id") is None else str(row["id"])
        cut_id = safe_name(row_id, max_bytes=SHAR_ID_BYTES)
        origin: dict[str, Any] = {"audio_path": path, "offset": off}
        if cut_id != row_id:
            origin["id"] = row_id
        custom: dict[str, Any] = {"origin": origin}
        arrays: dict[str, np.ndarray] = {}
        codes = row.get("codes") if layout else None
        if codes:
            if layout == "stacked":
                if len({len(c or []) for c in codes}) > 1:
                    raise _RowReject("ragged_codes", "codebooks of different lengths cannot "
                                     "be stacked (codes_layout: per_codebook)")
                arrays["codes"] = np.asarray(codes, dtype=np.int32).reshape(len(codes), -1)
            else:
                for k, c in enumerate(codes[:n_cb]):
                    if c is not None:
                        arrays[f"codes_{k}"] = np.asarray(c, dtype=np.int32).reshape(-1)
            codec = _json_col(row.get("audio_tokenizer"))
            if codec is not None:
                custom["codec"] = codec
        if row.get("text_ids") is not None:
            arrays["text_ids"] = np.asarray(row["text_ids"], dtype=np.int32).reshape(-1)
            tok = _json_col(row.get("text_tokenizer"))
            if tok is not None:
                custom["text_tokenizer"] = tok
        for f, arr in arrays.items():
            placeholder = Array(storage_type="shar", storage_path="", storage_key="",
                                shape=list(arr.shape))
            members[f] = ("npy", _npy(arr), placeholder.to_dict())
            custom[f] = placeholder
        sup = supervision(row, rid, 0.0, dur, ali_base=0.0)
        cut = MonoCut(id=cut_id, start=0.0, duration=dur, channel=0, recording=rec,
                      supervisions=[sup], custom=custom)
        return cut.to_dict(), members, dur

    @classmethod
    def summary_lines(cls, summary: dict[str, Any]) -> list[str]:
        if not summary:
            return []
        splits = ", ".join(f"{k}: {v}" for k, v in summary.get("splits", {}).items())
        return [f"lhotse shar: {summary.get('shards', 0)} shards of "
                f"{', '.join(summary.get('fields', []))}; cuts {splits}"]
