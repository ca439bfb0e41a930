"""Stage ``segment``: cut diarized files into single-speaker utterances.

Inside every diarization turn, Silero VAD (the ``silero-vad`` package) finds the speech;
Emilia-Pipe's rules then apply, as configurable defaults: pieces of one speaker separated
by less than ``merge_gap_s`` (2 s) are merged, pieces longer than ``max_s`` (30 s) are
split at their longest pause, pieces shorter than ``min_s`` (3 s) are dropped. A segment
never crosses a speaker change (it lives inside one turn) nor an overlap region: the
overlapped stretch is cut out and becomes a reject with reason ``overlap`` unless
``keep_overlaps`` is set.

Outputs are segment rows ``{audio_id}-{start_ms:08d}-{end_ms:08d}`` that point into the
input recording by ``offset``/``duration`` (no audio is copied), with ``speaker``
(``{audio_id}:{label}`` until ``link_speakers`` assigns run-wide ids) and the speaker's
embedding. Dropped pieces are reject rows with their segment id (``too_short``,
``overlap``); a file left with no segment is rejected (``no_speech`` / ``no_segments``).
"""

from __future__ import annotations

import math
from typing import Any

import pyarrow as pa
from pydantic import Field

from speechmill.pipeline.audio import AudioError, load_audio
from speechmill.pipeline.records import recording_id, reject, rejects_table, segment_id
from speechmill.pipeline.stage import Resources, Stage, StageConfig, StageResult

SR = 16000
Span = tuple[float, float]


class SegmentConfig(StageConfig):
    min_s: float = Field(3.0, ge=0, description="shorter pieces are dropped (Emilia: 3 s)")
    max_s: float = Field(30.0, gt=0, description="longer pieces are split (Emilia: 30 s)")
    merge_gap_s: float = Field(2.0, ge=0, description="same-speaker pieces closer: merged")
    keep_overlaps: bool = Field(False, description="keep overlapped speech in segments")
    pad_s: float = Field(0.05, ge=0, description="padding added around each segment")


class Segment(Stage):
    name = "segment"
    description = "VAD inside diarization turns -> 3-30 s single-speaker segments"
    Config = SegmentConfig
    resources = Resources(cpus=1, memory_gb=1.0)
    uses_model = True
    default_batch_size = 8

    config: SegmentConfig

    @classmethod
    def validate_config(cls, config: StageConfig) -> None:
        assert isinstance(config, SegmentConfig)
        if config.min_s >= config.max_s:
            raise ValueError("key 'with.min_s': must be < max_s")

    def setup(self) -> None:
        from speechmill.stages import diarize_embed

        diarize_embed.load_models()
        self.vad = diarize_embed.speech_regions

    def process(self, batch: pa.Table) -> StageResult:
        outs: list[dict[str, Any]] = []
        rejs: list[dict[str, Any]] = []
        for row in batch.to_pylist():
            try:
                o, r = self._file(row)
            except AudioError as e:
                rejs.append(self.reject_row(row, e.reason, e.detail))
                continue
            except Exception as e:  # isolate the row, keep the batch
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
        audio, _ = load_audio(row["audio_path"], base, row.get("duration"), SR)
        total = audio.shape[0] / SR
        overlaps = [(float(o["start"]), float(o["end"])) for o in row.get("overlaps") or []]
        audio_id = recording_id(row["id"])
        emb = {e["speaker"]: e["embedding"] for e in row.get("speaker_embeddings") or []}
        outs: list[dict[str, Any]] = []
        rejs: list[dict[str, Any]] = []
        for t in turns:
            t0, t1 = max(float(t["start"]), 0.0), min(float(t["end"]), total)
            if t1 - t0 <= 0:
                continue
            regions = [(t0 + s, t0 + e) for s, e in
                       self.vad(audio[int(t0 * SR): int(t1 * SR)], SR)]
            if not c.keep_overlaps:
                regions, cut = _subtract(regions, overlaps)
                for s, e in cut:
                    rejs.append(self._seg_reject(row, audio_id, base, s, e, "overlap",
                                                 f"overlapped speech in turn of {t['speaker']}"))
            walls = [] if c.keep_overlaps else overlaps
            for s, e in _pieces(regions, c.merge_gap_s, c.max_s, walls):
                # padding stops at the turn's edges and at overlap regions
                lo = max([t0] + [oe for _, oe in walls if oe <= s])
                hi = min([t1] + [os_ for os_, _ in walls if os_ >= e])
                s, e = max(s - c.pad_s, lo), min(e + c.pad_s, hi)
                if e - s < c.min_s:
                    rejs.append(self._seg_reject(row, audio_id, base, s, e, "too_short",
                                                 f"{e - s:.2f} s < min_s={c.min_s}"))
                    continue
                outs.append({
                    **{k: v for k, v in row.items() if k not in (
                        "turns", "overlaps", "speaker_embeddings")},
                    "id": segment_id(audio_id, base + s, base + e),
                    "parent_id": row["id"],
                    "offset": round(base + s, 3),
                    "duration": round(e - s, 3),
                    "speaker": f"{audio_id}:{t['speaker']}",
                    "speaker_local": t["speaker"],
                    "speaker_embedding": emb.get(t["speaker"]),
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


def _pieces(regions: list[Span], merge_gap: float, max_s: float,
            walls: list[Span] | None = None) -> list[Span]:
    """Merge regions closer than ``merge_gap`` unless a wall (an overlap region) lies
    between them; split groups longer than ``max_s`` at their longest pause (a single
    region longer than ``max_s`` is cut evenly)."""
    regions = sorted(regions)
    walls = walls or []
    groups: list[list[Span]] = []
    for r in regions:
        prev_end = groups[-1][-1][1] if groups else None
        if prev_end is not None and r[0] - prev_end < merge_gap and not any(
                ws < r[0] and we > prev_end for ws, we in walls):
            groups[-1].append(r)
        else:
            groups.append([r])
    out: list[Span] = []

    def split(g: list[Span]) -> None:
        s, e = g[0][0], g[-1][1]
        if e - s <= max_s:
            out.append((s, e))
            return
        if len(g) == 1:
            n = math.ceil((e - s) / max_s)
            step = (e - s) / n
            out.extend((s + i * step, s + (i + 1) * step) for i in range(n))
            return
        gaps = [g[i + 1][0] - g[i][1] for i in range(len(g) - 1)]
        k = max(range(len(gaps)), key=lambda i: gaps[i])
        split(g[: k + 1])
        split(g[k + 1:])

    for g in groups:
        split(g)
    return out
