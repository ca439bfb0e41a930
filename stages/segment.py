"""Stage ``segment``: cut diarized files into single-speaker utterances.

Inside every diarization turn, Silero VAD (the ``silero-vad`` package) finds the speech;
overlapped stretches are cut out (a reject with reason ``overlap`` unless
``keep_overlaps`` is set). Emilia-Pipe's rules then apply to each speaker's pieces over
the whole file, as configurable defaults:

1. pieces of one speaker separated by less than ``merge_gap_s`` (2 s) are merged, also
   across diarization turn boundaries (a diarizer splits a speaker's turn at every pause),
   unless another speaker's turn or an overlap region lies between them;
2. pieces longer than ``max_s`` (30 s) are split at their longest pause that leaves both
   sides at least ``min_s`` long (else at the longest pause; a single region is cut
   evenly);
3. a piece still shorter than ``min_s`` (3 s) joins its nearest same-speaker neighbour
   when the pause between is at most ``short_merge_gap_s``, the result stays within
   ``max_s`` and no other speaker or overlap lies between; only then is it dropped
   (``too_short``).

So a segment never crosses a speaker change nor an overlap region.

Outputs are segment rows ``{audio_id}-{start_ms:08d}-{end_ms:08d}`` that point into the
input recording by ``offset``/``duration`` (no audio is copied), with ``speaker``
(``{audio_id}:{label}`` until ``link_speakers`` assigns run-wide ids) and the speaker's
embedding. Dropped pieces are reject rows with their segment id (``too_short``,
``overlap``); a file left with no segment is rejected (``no_speech`` / ``no_segments``).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import pyarrow as pa
from pydantic import Field

from speechmill.pipeline.audio import AudioError, AudioReader, load_audio
from speechmill.pipeline.errors import is_fatal
from speechmill.pipeline.records import recording_id, reject, rejects_table, segment_id
from speechmill.pipeline.stage import Resources, Stage, StageConfig, StageResult

SR = 16000
Span = tuple[float, float]
#: ``(start, end, speaker label)`` in seconds: a piece of speech or a diarization turn
Seg = tuple[float, float, str]


class SegmentConfig(StageConfig):
    min_s: float = Field(3.0, ge=0, description="shorter pieces are dropped (Emilia: 3 s)")
    max_s: float = Field(30.0, gt=0, description="longer pieces are split (Emilia: 30 s)")
    merge_gap_s: float = Field(
        2.0, ge=0, description="same-speaker pieces closer: merged (across turns too)")
    short_merge_gap_s: float = Field(
        5.0, ge=0, description="a piece shorter than min_s joins a same-speaker neighbour "
        "this close (result <= max_s) before it is dropped")
    keep_overlaps: bool = Field(False, description="keep overlapped speech in segments")
    pad_s: float = Field(0.05, ge=0, description="padding added around each segment")


class Segment(Stage):
    name = "segment"
    description = "VAD inside diarization turns -> 3-30 s single-speaker segments"
    #: 2: same-speaker pieces merge across diarization turns; short pieces join a neighbour
    version: ClassVar[int] = 2
    Config = SegmentConfig
    resources = Resources(cpus=1, memory_gb=1.0)
    uses_model = True
    #: files per batch: a few, so a pool spreads even a small input over its actors
    default_batch_size = 4

    config: SegmentConfig

    @classmethod
    def validate_config(cls, config: StageConfig) -> None:
        assert isinstance(config, SegmentConfig)
        if config.min_s >= config.max_s:
            raise ValueError("key 'with.min_s': must be < max_s")

    #: a recording longer than this (seconds; ``audio_models.vad.CHUNK_S``, set in
    #: ``setup()``) is read turn by turn, not whole
    stream_above_s: float = 300.0

    def setup(self) -> None:
        from speechmill.stages.audio_models import speaker, vad

        speaker.load_models()
        self.vad = vad.speech_regions
        self.stream_above_s = vad.CHUNK_S

    def process(self, batch: pa.Table) -> StageResult:
        outs: list[dict[str, Any]] = []
        rejs: list[dict[str, Any]] = []
        for row in batch.to_pylist():
            try:
                o, r = self._file(row)
            except AudioError as e:
                rejs.append(self.reject_row(row, e.reason, e.detail))
                continue
            except Exception as e:  # isolate the row, keep the batch...
                if is_fatal(e):  # ...but a full disk or an engine error stops the stage
                    raise
                rejs.append(self.reject_row(row, "error", f"{type(e).__name__}: {e}"))
                continue
            outs.extend(o)
            rejs.extend(r)
        return StageResult(self.outputs_table(outs), rejects_table(rejs))

    def _file(self, row: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        c = self.config
        turns = row.get("turns") or []
        if not turns:
            return [], [self.reject_row(row, "no_speech", "no diarization turns")]
        base = float(row.get("offset") or 0.0)
        dur = float(row.get("duration") or 0.0)
        if dur > self.stream_above_s:  # a long recording: one minute in memory at a time
            reader = AudioReader(row["audio_path"], base, dur, SR)
            total = dur
        else:
            audio, _ = load_audio(row["audio_path"], base, row.get("duration"), SR)
            reader = None
            total = audio.shape[0] / SR
        overlaps = [(float(o["start"]), float(o["end"])) for o in row.get("overlaps") or []]
        audio_id = recording_id(row["id"])
        emb = {e["speaker"]: e["embedding"] for e in row.get("speaker_embeddings") or []}
        outs: list[dict[str, Any]] = []
        rejs: list[dict[str, Any]] = []
        spans: list[Seg] = []
        pieces: list[Seg] = []
        for t in turns:
            t0, t1 = max(float(t["start"]), 0.0), min(float(t["end"]), total)
            if t1 - t0 <= 0:
                continue
            spans.append((t0, t1, t["speaker"]))
            piece = (audio[int(t0 * SR): int(t1 * SR)] if reader is None
                     else reader.read(int(t0 * SR), int(t1 * SR)))
            regions = [(t0 + s, t0 + e) for s, e in self.vad(piece, SR)]
            if not c.keep_overlaps:
                regions, cut = _subtract(regions, overlaps)
                for s, e in cut:
                    rejs.append(self._seg_reject(row, audio_id, base, s, e, "overlap",
                                                 f"overlapped speech in turn of {t['speaker']}"))
            pieces.extend((s, e, t["speaker"]) for s, e in regions)
        kept, short = plan_segments(
            pieces, spans, [] if c.keep_overlaps else overlaps, merge_gap_s=c.merge_gap_s,
            min_s=c.min_s, max_s=c.max_s, short_merge_gap_s=c.short_merge_gap_s,
            pad_s=c.pad_s, total=total)
        for s, e, _ in short:
            rejs.append(self._seg_reject(row, audio_id, base, s, e, "too_short",
                                         f"{e - s:.2f} s < min_s={c.min_s}"))
        for s, e, spk in kept:
            outs.append({
                **{k: v for k, v in row.items() if k not in (
                    "turns", "overlaps", "speaker_embeddings")},
                "id": segment_id(audio_id, base + s, base + e),
                "parent_id": row["id"],
                "offset": round(base + s, 3),
                "duration": round(e - s, 3),
                "speaker": f"{audio_id}:{spk}",
                "speaker_local": spk,
                "speaker_embedding": emb.get(spk),
            })
        if not outs:
            reason = "no_speech" if not rejs else "no_segments"
            detail = "VAD found no speech in any turn" if not rejs else (
                f"all {len(rejs)} pieces dropped ({', '.join(sorted({r['reason'] for r in rejs}))})")
            rejs.append(self.reject_row(row, reason, detail))
        return outs, rejs

    def _seg_reject(self, row: dict[str, Any], audio_id: str, base: float, s: float,
                    e: float, reason: str, detail: str) -> dict[str, Any]:
        seg = {**row, "id": segment_id(audio_id, base + s, base + e), "duration": e - s}
        return reject(seg, self.ctx.stage_id, reason, detail)


def _subtract(regions: list[Span], cuts: list[Span]) -> tuple[list[Span], list[Span]]:
    """``regions`` minus ``cuts``; also the removed parts."""
    kept: list[Span] = []
    removed: list[Span] = []
    for s, e in regions:
        pieces = [(s, e)]
        for cs, ce in cuts:
            nxt = []
            for ps, pe in pieces:
                if ce <= ps or cs >= pe:
                    nxt.append((ps, pe))
                    continue
                removed.append((max(ps, cs), min(pe, ce)))
                if cs > ps:
                    nxt.append((ps, cs))
                if ce < pe:
                    nxt.append((ce, pe))
            pieces = nxt
        kept.extend(pieces)
    return kept, removed


class _Others:
    """What is not ``speaker``'s: the other speakers' turns plus the walls (overlap
    regions), sorted, for O(log n) questions about what lies between two pieces."""

    def __init__(self, speaker: str, turns: Sequence[Seg], walls: Sequence[Span]) -> None:
        spans = sorted([(s, e) for s, e, spk in turns if spk != speaker]
                       + [(s, e) for s, e in walls])
        self.starts = [s for s, _ in spans]
        self.ends = sorted(e for _, e in spans)
        self.max_end: list[float] = []  # running max of ends, in start order
        for _, e in spans:
            self.max_end.append(max(e, self.max_end[-1]) if self.max_end else e)

    def between(self, a: float, b: float) -> bool:
        """Does anything lie (partly) inside the open interval ``(a, b)``?"""
        i = bisect.bisect_left(self.starts, b)  # spans starting before b
        return i > 0 and self.max_end[i - 1] > a

    def pad(self, s: float, e: float, pad: float, total: float) -> Span:
        """``(s, e)`` widened by ``pad``, stopping at the file's edges and at the nearest
        other-speaker turn or wall on either side."""
        i = bisect.bisect_right(self.ends, s)
        lo = max(0.0, self.ends[i - 1] if i else 0.0)
        j = bisect.bisect_left(self.starts, e)
        hi = min(total, self.starts[j] if j < len(self.starts) else total)
        return max(s - pad, min(lo, s)), min(e + pad, max(hi, e))


def _join(regions: Sequence[Span], merge_gap: float,
          blocked: Callable[[float, float], bool]) -> list[list[Span]]:
    """Group sorted regions whose pause is below ``merge_gap`` and not ``blocked``."""
    groups: list[list[Span]] = []
    end = -math.inf
    for r in regions:
        if groups and r[0] - end < merge_gap and not blocked(end, r[0]):
            groups[-1].append(r)
        else:
            groups.append([r])
        end = max(end, r[1]) if len(groups[-1]) > 1 else r[1]
    return groups


def _split(g: list[Span], max_s: float, min_s: float = 0.0) -> list[Span]:
    """A group's span, or, when longer than ``max_s``, its parts: split at the longest
    pause that leaves both sides at least ``min_s`` long (else at the longest pause),
    recursively; a single region longer than ``max_s`` is cut evenly."""
    s, e = g[0][0], max(r[1] for r in g)
    if e - s <= max_s:
        return [(s, e)]
    if len(g) == 1:
        n = math.ceil((e - s) / max_s)
        step = (e - s) / n
        return [(s + i * step, s + (i + 1) * step) for i in range(n)]
    gaps = [g[i + 1][0] - g[i][1] for i in range(len(g) - 1)]
    ok = [i for i in range(len(gaps))
          if g[i][1] - s >= min_s and e - g[i + 1][0] >= min_s] or list(range(len(gaps)))
    k = max(ok, key=lambda i: gaps[i])
    return _split(g[: k + 1], max_s, min_s) + _split(g[k + 1:], max_s, min_s)


def _pieces(regions: list[Span], merge_gap: float, max_s: float,
            walls: list[Span] | None = None) -> list[Span]:
    """One speaker's regions merged when closer than ``merge_gap`` unless a wall (an
    overlap region) lies between them, then split to at most ``max_s`` (:func:`_split`)."""
    others = _Others("", [], walls or [])
    out: list[Span] = []
    for g in _join(sorted(regions), merge_gap, others.between):
        out.extend(_split(g, max_s))
    return out


def plan_segments(pieces: Sequence[Seg], turns: Sequence[Seg], walls: Sequence[Span], *,
                  merge_gap_s: float = 2.0, min_s: float = 3.0, max_s: float = 30.0,
                  short_merge_gap_s: float = 5.0, pad_s: float = 0.0,
                  total: float = math.inf) -> tuple[list[Seg], list[Seg]]:
    """Emilia-style segments from speech ``pieces`` (VAD regions inside diarization turns,
    overlaps already cut out), as ``(kept, too_short)`` lists of padded ``(start, end,
    speaker)`` sorted by time.

    Per speaker: pieces whose pause is below ``merge_gap_s`` merge -- across turn
    boundaries -- unless another speaker's turn (from ``turns``) or a wall (an overlap
    region) lies inside the pause; groups longer than ``max_s`` are split (:func:`_split`);
    a piece whose padded length is below ``min_s`` then joins its nearest same-speaker
    neighbour (the smaller pause wins, the earlier on ties) when that pause is at most
    ``short_merge_gap_s``, nothing lies in it and the result is at most ``max_s``,
    repeatedly; pieces still short are returned as ``too_short``. Padding of ``pad_s``
    stops at ``0``/``total`` and at other speakers' turns and walls.
    """
    kept: list[Seg] = []
    short: list[Seg] = []
    for spk in sorted({p[2] for p in pieces}):
        others = _Others(spk, turns, walls)
        regions = sorted((s, e) for s, e, who in pieces if who == spk and e > s)
        parts: list[Span] = []
        for g in _join(regions, merge_gap_s, others.between):
            parts.extend(_split(g, max_s, min_s))

        i = 0
        while i < len(parts):
            s, e = parts[i]
            ps, pe = others.pad(s, e, pad_s, total)
            if pe - ps >= min_s:
                i += 1
                continue
            options = []  # (pause, index of the neighbour)
            for j in (i - 1, i + 1):
                if not 0 <= j < len(parts):
                    continue
                a, b = (parts[j][1], s) if j < i else (e, parts[j][0])
                lo, hi = min(s, parts[j][0]), max(e, parts[j][1])
                if b - a <= short_merge_gap_s and hi - lo <= max_s \
                        and not others.between(a, b):
                    options.append((b - a, j))
            if not options:
                i += 1
                continue
            _, j = min(options)
            k = min(i, j)
            parts[k: k + 2] = [(min(parts[k][0], parts[k + 1][0]),
                                max(parts[k][1], parts[k + 1][1]))]
            i = k  # the merged piece may still be short: look at it again
        for p in parts:
            s, e = others.pad(p[0], p[1], pad_s, total)
            (kept if e - s >= min_s else short).append((s, e, spk))
    return sorted(kept), sorted(short)
