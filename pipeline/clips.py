"""Clips of audio rows: read a row's span, encode it, and name it.

:func:`read_clip` reads a row's ``audio_path`` from ``offset`` for ``duration``;
:func:`encode_clip` / :func:`encode_clips` cut and encode rows into :class:`Clip` objects
whose problems are returned as reject reasons, never raised; :func:`clip_name`,
:class:`ClipNamer` and :func:`namer_for` give clips unique, portable file names (the ones
NeMo's tarred readers can index).
"""

from __future__ import annotations

import io
import math
import re
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from speechmill.pipeline.audio import AudioError, load_audio
from speechmill.pipeline.row_slices import iter_slices
from speechmill.pipeline.safe_names import readable_part

#: a clip may come out this much shorter than its ``duration`` (codec frame padding)
SHORT_CLIP_TOLERANCE_S = 0.05


def check_span(row: Mapping[str, Any]) -> tuple[float, float | None]:
    """``(offset, duration)`` of a row; raises ``AudioError("bad_span")`` when either is
    not finite, the offset is negative or the duration is not positive."""
    off_v, dur_v = row.get("offset"), row.get("duration")
    off = 0.0 if off_v is None else float(off_v)
    dur = None if dur_v is None else float(dur_v)
    if not math.isfinite(off) or off < 0:
        raise AudioError("bad_span", f"offset {off_v!r}")
    if dur is not None and (not math.isfinite(dur) or dur <= 0):
        raise AudioError("bad_span", f"duration {dur_v!r}")
    return off, dur


def read_clip(row: Mapping[str, Any], sample_rate: int | None = None) -> tuple[np.ndarray, int]:
    """The row's audio (``audio_path`` from ``offset`` for ``duration``), mono float32.
    Raises :class:`speechmill.pipeline.audio.AudioError` on unreadable audio, a bad span
    (``bad_span``) or a file that ends before the span does (``short_audio``)."""
    off, dur = check_span(row)
    x, sr = load_audio(str(row["audio_path"]), offset=off, duration=dur,
                       sample_rate=sample_rate)
    if dur is not None and x.shape[0] < (dur - SHORT_CLIP_TOLERANCE_S) * sr:
        raise AudioError("short_audio", f"{x.shape[0] / sr:.3f} s of audio for a "
                         f"{dur:.3f} s span at {off:.3f} s")
    return x, sr


def encode_audio(x: np.ndarray, sr: int, fmt: str = "flac") -> bytes:
    """Encode mono float32 samples as FLAC (16-bit) or WAV (16-bit PCM) bytes."""
    import soundfile as sf

    buf = io.BytesIO()
    fmt_u = fmt.upper()
    sf.write(buf, np.clip(x, -1.0, 1.0), sr, format=fmt_u, subtype="PCM_16")
    return buf.getvalue()



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
