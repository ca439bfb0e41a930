"""Stage ``separate``: keep the voice, drop the music (Demucs source separation).

Each input file (or the ``offset``/``duration`` segment a row names) is run through a
Demucs model (``htdemucs`` by default) in two-stem mode: the ``vocals`` source is kept,
every other source is summed into the *accompaniment*. The vocals are written as mono
FLAC to ``media/separate/<id[:2]>/<id>.vocals.flac`` (atomically: tmp file + rename) and
the output row points at them; ``write_accompaniment`` also writes
``<id>.accompaniment.flac`` (a ready-made music/noise source for augmentation manifests).

Memory stays bounded for any file length: the audio is decoded, resampled (soxr) to the
model's rate and separated in windows of about ``chunk_s`` seconds (the hop is rounded
down to a whole number of demucs segment strides so segments stay on one grid) that
overlap by ``min(segment_s, chunk_s / 4)`` seconds; consecutive windows are crossfaded linearly
over that overlap, and results stream to the FLAC writer as they are produced. Inside a
window Demucs's own ``apply_model(split=True)`` handles its ``segment_s`` segments (with
``overlap``). Each window is normalised like the demucs CLI does per track (subtract the
mean, divide by the standard deviation, undo both on the output); the crossfade hides
the small level differences this could cause between windows.

Music pre-check (``skip_below_music_ratio``): the first ``probe_s`` seconds are
separated and ``music_ratio = sum(accompaniment^2) / sum(vocals^2)`` is computed on
them (an energy ratio; 0 for clean speech, ~1 when music is as loud as the voice). When
it is below the threshold the row passes through unchanged with ``separated: false``
(and ``music_ratio`` recorded), saving the full separation of clean speech. The probe
costs one model pass over ``probe_s`` seconds.

Batching (``batch_files``; default 8 on CUDA, 1 on CPU): a GPU is filled by batches,
and one file's window is fed to demucs one segment at a time, so with ``batch_files``
> 1 the stage runs demucs's split loop itself: every ``segment_s`` segment is cut and
padded exactly as ``apply_model(split=True)`` cuts it from its own file (the last,
shorter one padded around its centre), segments from several files are stacked and go
through the model ``batch_files`` at a time, and each file's outputs are blended with
apply_model's own weights (bags of models weighted as apply_model weights them). A
file's audio is therefore the one-at-a-time result up to float rounding (measured: at
most 1 LSB of the 16-bit output, correlation > 0.99999999), whatever else is in its
batch. What is batched: the music probes of an engine batch, then its rows that fit one
window (``duration`` up to about ``chunk_s``), each decoded, resampled and normalised
on its own (mean/std per file) and grouped until there are ``batch_files`` files or
segments; a longer row streams as above, as many windows per call as fill one forward
(one with the default 60 s windows), so memory stays what it was: at most
``batch_files`` windows (or one) of audio and its ``[sources, C, T]`` outputs on the
host, ``batch_files`` segments of activations on the device. Per-row problems (decode
errors, NaN/inf samples, too long, ...) stay that row's reject; the rest of the batch is
written as usual. ``shifts`` > 0 (random time shifts of whole files) keeps files one at
a time inside a group. On CPU batching brings nothing (torch already spreads one
segment over its threads: 4 htdemucs-sized segments took 10.0 s one by one and 10.8 s as
one batch here, and the activations grow from ~0.8 to ~4.6 GB at 8): ``batch_files: 1``
is the classic row-by-row path. The engine hands the stage up to 8 rows and about 8
minutes of audio per batch (``batch_size`` / ``batch_seconds`` in the DAG change that;
a longer file is a batch of its own).

Models are found with :func:`speechmill.pipeline.models.resolve` (backend ``demucs``):
``model_repo`` (a local demucs repo directory holding ``<name>.yaml`` bags and/or
``<sig>[-<checksum>].th`` files, as ``demucs.pretrained.get_model(name, repo=...)``
reads), then ``$SPEECHMILL_MODELS/demucs/<name>`` (same layout), and finally a
download by demucs itself (HuggingFace hub, then its legacy repo; never with
``offline``). To run offline, put the model files in one of the two directories.
"""

from __future__ import annotations

import contextlib
import os
import traceback
import uuid
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field

from speechmill.pipeline.audio import AudioError, StreamResampler, decode
from speechmill.pipeline.audio_write import sound_writer
from speechmill.pipeline.errors import is_fatal
from speechmill.pipeline.models import (
    ModelNotFoundError,
    ModelSpec,
    register_downloader,
    resolve,
)
from speechmill.pipeline.records import rejects_table
from speechmill.pipeline.stage import (
    Reject,
    Resources,
    RowOutcome,
    Stage,
    StageConfig,
    StageResult,
)

BACKEND = "demucs"
# models loaded by the downloader (so a download is not followed by a second load)
_LOADED: dict[str, Any] = {}


class SeparateConfig(StageConfig):
    model: str = Field("htdemucs", description="demucs model (bag) name or signature")
    model_repo: str | None = Field(
        None, description="local demucs repo directory (as for get_model(name, repo=...))"
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    two_stems: Literal["vocals"] = Field(
        "vocals", description="source kept; the other sources are summed as accompaniment"
    )
    segment_s: float = Field(7.0, gt=0, description="demucs segment length inside a window")
    overlap: float = Field(0.25, ge=0, lt=1, description="overlap of demucs segments")
    shifts: int = Field(0, ge=0, description="random shift trick (slower, a bit better)")
    chunk_s: float = Field(
        60.0, gt=0, description="window length: the stage never holds more audio than this"
    )
    write_accompaniment: bool = Field(
        False, description="also write <id>.accompaniment.flac (column accompaniment_path)"
    )
    skip_below_music_ratio: float | None = Field(
        None, ge=0, description="pass files whose music/vocals energy ratio on the first "
        "probe_s seconds is below this through unseparated (separated: false)"
    )
    probe_s: float = Field(30.0, gt=0, description="seconds used by the music pre-check")
    sample_rate_out: int | None = Field(
        None, gt=0, description="output rate; default: the input's rate"
    )
    max_duration_s: float = Field(4 * 3600.0, gt=0, description="longer files: rejected")
    batch_files: int | None = Field(
        None, ge=1, description="files (each within one window) separated together and "
        "demucs segments per model forward; default 8 on CUDA, 1 (row by row) on CPU"
    )


# -- model resolution ----------------------------------------------------------------


def _download_demucs(name: str) -> str:
    from demucs.pretrained import get_model

    _LOADED[name] = get_model(name)
    return name


register_downloader(BACKEND, _download_demucs)


def load_model(name: str, repo: str | None, offline: bool) -> tuple[Any, str]:
    """(demucs model or bag, where it came from). Raises :class:`ModelNotFoundError`."""
    spec = ModelSpec(backend=BACKEND, name=name, path=repo)
    res = resolve(spec, offline=offline)
    if res.source == "download":
        return _LOADED.pop(name), "download"
    from demucs.pretrained import get_model

    loc = Path(res.location)
    if not loc.is_dir():
        raise ModelNotFoundError(
            f"demucs model {name!r}: {str(loc)!r} is not a directory (a demucs repo "
            f"holds <name>.yaml and <sig>.th files); set model_repo or put it in "
            f"$SPEECHMILL_MODELS/{BACKEND}/{name}"
        )
    try:
        return get_model(name, repo=loc), res.source
    except Exception as e:  # ModelLoadingError, missing files, bad pickles
        raise ModelNotFoundError(
            f"demucs model {name!r} could not be loaded from repo {str(loc)!r} "
            f"({type(e).__name__}: {e}); provide it with `model_repo:` or in "
            f"$SPEECHMILL_MODELS/{BACKEND}/{name}"
        ) from None


# -- the separator -------------------------------------------------------------------


class Separator:
    """Runs a demucs model over mono audio at the model's rate: one array (:meth:`run`),
    several at once (:meth:`run_many`) or a stream, window by window (:meth:`stream`).

    ``batch``: with 1, every array goes through ``apply_model`` alone (the classic path);
    above 1, up to ``batch`` arrays (files, or windows of one file) are separated
    together, their demucs segments forwarded ``batch`` at a time (:meth:`run_many`)."""

    def __init__(self, model: Any, device: str, cfg: SeparateConfig, batch: int = 1) -> None:
        self.model = model
        self.device = device
        self.cfg = cfg
        self.batch = max(1, int(batch))
        self.sr = int(model.samplerate)
        self.channels = int(model.audio_channels)
        sources = list(model.sources)
        if cfg.two_stems not in sources:
            raise ModelNotFoundError(
                f"demucs model has no {cfg.two_stems!r} source (sources: {sources})")
        self.keep = sources.index(cfg.two_stems)
        # windows advance by a whole number of demucs segment strides, so the segments
        # inside every window sit on the same grid as one pass over the whole file would
        # (apply_model's own arithmetic: int(sr * segment), int((1 - overlap) * that))
        self.seg_len = int(self.sr * cfg.segment_s)
        self.stride = max(1, int((1 - cfg.overlap) * self.seg_len))
        self.xfade = int(round(min(cfg.segment_s, cfg.chunk_s / 4) * self.sr))
        window = max(1, int(round(cfg.chunk_s * self.sr)))
        self.hop = max(1, (window - self.xfade) // self.stride) * self.stride
        self.window = self.hop + self.xfade
        # windows of one stream separated together: as many as it takes to give the
        # model ``batch`` segments (1 with the default 60 s windows: 12 segments each)
        self.windows_per_call = (
            1 if self.batch == 1 else min(self.batch, -(-self.batch // self.segments(self.window))))

    def segments(self, n: int) -> int:
        """Demucs segments apply_model cuts from ``n`` samples."""
        return -(-n // self.stride)

    # -- one model call ----------------------------------------------------------
    def _apply(self, mix: Any) -> Any:
        """apply_model on ``mix`` [B, C, T] -> [B, sources, C, T] (on the CPU)."""
        import torch
        from demucs.apply import apply_model

        with torch.inference_mode():
            return apply_model(self.model, mix, shifts=self.cfg.shifts, split=True,
                               overlap=self.cfg.overlap, segment=self.cfg.segment_s,
                               device=self.device, progress=False)

    @staticmethod
    def _normalised(x: np.ndarray) -> tuple[np.ndarray, float, float]:
        """Per-file normalisation as the demucs CLI does it: (x - mean) / std."""
        mean = float(x.mean())
        std = float(x.std()) + 1e-8
        return ((x - mean) / std).astype(np.float32, copy=False), mean, std

    def _stems(self, out: Any, mean: float, std: float) -> tuple[np.ndarray, np.ndarray]:
        """(vocals, accompaniment) from one item's [sources, C, n] output."""
        import torch

        out = out.mean(dim=1).to("cpu", torch.float32)  # (sources, n), mono
        keep = out[self.keep]
        rest = out.sum(dim=0) - keep
        # each source carries its share of the mean; the demucs CLI adds it to every one
        voc = keep.numpy() * std + mean
        acc = rest.numpy() * std + mean * (len(self.model.sources) - 1)
        return voc.astype(np.float32), acc.astype(np.float32)

    def run(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(vocals, accompaniment), mono float32, same length as ``x``."""
        import torch

        n = x.shape[0]
        if n == 0:
            z = np.zeros(0, np.float32)
            return z, z
        y, mean, std = self._normalised(x)
        t = torch.from_numpy(y)
        mix = t.reshape(1, 1, n).expand(1, self.channels, n).contiguous()
        out = self._apply(mix)
        return self._stems(out[0], mean, std)

    def run_many(self, xs: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
        """:meth:`run` for several arrays, their demucs segments stacked into batched
        model forwards of up to ``batch`` segments (see :meth:`_split_many`): the same
        result as :meth:`run` on each array alone, up to float rounding."""
        import torch

        z = np.zeros(0, np.float32)
        if self.cfg.shifts:  # demucs shifts whole tracks at random before splitting
            return [self.run(x) for x in xs]
        live = [i for i, x in enumerate(xs) if x.shape[0]]
        mixes, norms = [], []
        for i in live:
            y, mean, std = self._normalised(xs[i])
            n = y.shape[0]
            mixes.append(torch.from_numpy(y).reshape(1, 1, n).expand(1, self.channels, n)
                         .contiguous())
            norms.append((mean, std))
        outs = self._model_many(self.model, mixes) if mixes else []
        del mixes
        res: list[tuple[np.ndarray, np.ndarray]] = [(z, z)] * len(xs)
        for b, i in enumerate(live):
            res[i] = self._stems(outs[b], *norms[b])
            outs[b] = None
        return res

    def _model_many(self, model: Any, mixes: list[Any]) -> list[Any]:
        """[sources, C, n] per [1, C, n] mix: ``apply_model(split=True, shifts=0)`` per
        mix, bags of models included (weighted as apply_model weights them)."""
        from demucs.apply import BagOfModels

        if not isinstance(model, BagOfModels):
            return self._split_many(model, mixes)
        est: list[Any] = []
        totals = [0.0] * len(model.sources)
        for sub, weights in zip(model.models, model.weights, strict=True):
            outs = self._split_many(sub, mixes)
            for b, out in enumerate(outs):
                for k, w in enumerate(weights):
                    out[k] *= w
                if len(est) <= b:
                    est.append(out)
                else:
                    est[b] += out
            for k, w in enumerate(weights):
                totals[k] += w
            del outs
        for out in est:
            for k in range(out.shape[0]):
                out[k] /= totals[k]
        return est

    def _split_many(self, model: Any, mixes: list[Any]) -> list[Any]:
        """demucs's ``apply_model(split=True)`` loop for one model over several mixes,
        with the segments of all of them forwarded ``batch`` at a time.

        Each segment is cut and padded exactly as apply_model cuts it from its own
        mix (``TensorChunk(mix, offset, segment).padded(valid_length)``: the last,
        shorter segment of a mix is padded around its centre with the mix's earlier
        samples), and the outputs are blended with apply_model's triangular weights,
        so each mix's result is the one apply_model gives for it alone. (Padding short
        mixes with zeros to a common length and calling apply_model on [B, C, T]
        instead moves their last segment and changes its output.)"""
        import torch
        from demucs.apply import TensorChunk
        from demucs.htdemucs import HTDemucs
        from demucs.utils import center_trim

        device = torch.device(self.device)
        model.to(device)
        model.eval()
        segment = self.cfg.segment_s
        seg_len = int(model.samplerate * segment)
        stride = int((1 - self.cfg.overlap) * seg_len)
        weight = torch.cat([torch.arange(1, seg_len // 2 + 1, device=device),
                            torch.arange(seg_len - seg_len // 2, 0, -1, device=device)])
        weight = (weight / weight.max()) ** 1.0  # apply_model's transition_power=1
        n_src = len(model.sources)
        outs = [torch.zeros(1, n_src, m.shape[1], m.shape[-1]) for m in mixes]
        sums = [torch.zeros(m.shape[-1]) for m in mixes]
        # (mix, offset, chunk): grouped by the length the model sees (for HTDemucs always
        # the segment; older models may see a shorter last segment)
        groups: dict[int, list[tuple[int, int, Any]]] = {}
        for b, mix in enumerate(mixes):
            for offset in range(0, mix.shape[-1], stride):
                chunk = TensorChunk(mix, offset, seg_len)
                if isinstance(model, HTDemucs):
                    valid = int(segment * model.samplerate)
                elif hasattr(model, "valid_length"):
                    valid = int(model.valid_length(chunk.length))
                else:
                    valid = chunk.length
                groups.setdefault(valid, []).append((b, offset, chunk))
        with torch.inference_mode():
            for valid, jobs in groups.items():
                for s in range(0, len(jobs), self.batch):
                    part = jobs[s: s + self.batch]
                    x = torch.cat([c.padded(valid) for _, _, c in part]).to(device)
                    y = model(x)
                    del x
                    for j, (b, offset, chunk) in enumerate(part):
                        n = chunk.length
                        o = center_trim(y[j: j + 1], n)
                        outs[b][..., offset: offset + n] += (weight[:n] * o).to("cpu")
                        sums[b][offset: offset + n] += weight[:n].to("cpu")
                    del y
        for out, w in zip(outs, sums, strict=True):
            assert w.min() > 0
            out /= w
        return [out[0] for out in outs]

    def separate(self, xs: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Several arrays (at most ``batch``): one call when batching, else one by one."""
        if self.batch > 1:
            return self.run_many(xs)
        return [self.run(x) for x in xs]

    def stream(self, chunks: Any):  # noqa: ANN201 - generator of (vocals, accomp)
        """Separate an iterator of mono chunks at the model rate; yields output pieces
        whose lengths add up to the input's length. Up to ``batch`` consecutive windows
        go into one model call when one window has fewer than ``batch`` demucs segments
        (``windows_per_call``; they are read ahead)."""
        k = self.windows_per_call
        need = (k - 1) * self.hop + self.window
        buf = np.zeros(0, np.float32)
        prev_v: np.ndarray | None = None
        prev_a: np.ndarray | None = None
        ramp: np.ndarray | None = None
        it = iter(chunks)
        eof = False
        while True:
            while not eof and buf.shape[0] <= need:
                try:
                    c = next(it)
                except StopIteration:
                    eof = True
                    break
                if c.shape[0]:
                    buf = np.concatenate([buf, c.astype(np.float32, copy=False)])
            if buf.shape[0] == 0 and prev_v is None:
                return
            segs: list[np.ndarray] = []
            pos = 0
            final = False
            while len(segs) < k:
                if eof and buf.shape[0] - pos <= self.window:
                    segs.append(buf[pos:])
                    final = True
                    break
                segs.append(buf[pos: pos + self.window])
                pos += self.hop
            outs = self.separate(segs)
            del segs
            for j, (v, a) in enumerate(outs):
                if prev_v is not None and prev_a is not None:
                    n = prev_v.shape[0]  # == xfade (a window is at least that long)
                    if ramp is None or ramp.shape[0] != n:
                        ramp = ((np.arange(n, dtype=np.float32) + 0.5) / n).astype(np.float32)
                    v[:n] = prev_v * (1 - ramp) + v[:n] * ramp
                    a[:n] = prev_a * (1 - ramp) + a[:n] * ramp
                if final and j == len(outs) - 1:
                    yield v, a
                    return
                cut = self.hop
                yield v[:cut], a[:cut]
                prev_v, prev_a = v[cut:].copy(), a[cut:].copy()
            buf = buf[pos:].copy()


def _limited(chunks: Any, want: int | None):  # noqa: ANN202 - generator
    """The decoded chunks, cut after ``want`` samples (all when None)."""
    have = 0
    for c in chunks:
        if want is not None and have + c.shape[0] >= want:
            yield c[: want - have]
            return
        have += c.shape[0]
        yield c


def _resampled(chunks: Any, rs: StreamResampler):  # noqa: ANN202 - generator
    for c in chunks:
        y = rs(c)
        if y.shape[0]:
            yield y
    y = rs.flush()
    if y.shape[0]:
        yield y


class _Checked:
    """Iterates decoded chunks, rejecting NaN/inf samples and counting samples."""

    def __init__(self, chunks: Any) -> None:
        self.chunks = chunks
        self.n = 0

    def __iter__(self):  # noqa: ANN204 - generator
        for x in self.chunks:
            if not np.isfinite(x).all():
                raise Reject("nonfinite_samples", "NaN/inf samples in the input")
            self.n += x.shape[0]
            yield x


def _guarded(stage: Stage, row: dict[str, Any], fn: Any, *args: Any
             ) -> tuple[Any, RowOutcome | None]:
    """(``fn(*args)``, None), or (None, the row's reject) when it raises: a
    :class:`Reject` keeps its reason, any other exception is ``error`` (as
    :meth:`Stage.run_row` does), so one row's failure never takes its batch down."""
    try:
        return fn(*args), None
    except Reject as r:
        return None, RowOutcome(reject=stage.reject_row(row, r.reason, r.detail))
    except Exception as e:
        if is_fatal(e):  # a full disk or an engine error is no row's fault
            raise
        detail = f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=3)}"
        return None, RowOutcome(reject=stage.reject_row(row, "error", detail))


def _outcome(stage: Stage, row: dict[str, Any], fn: Any, *args: Any) -> RowOutcome:
    """The row's outcome when ``fn(*args)`` returns its one output row."""
    out, bad = _guarded(stage, row, fn, *args)
    if bad is not None:
        return bad
    out.setdefault("parent_id", row.get("id"))
    return RowOutcome(outputs=[out])


class Separate(Stage):
    name = "separate"
    description = "Demucs source separation: keep the vocals (optionally the music too)"
    Config = SeparateConfig
    resources = Resources(cpus=1, memory_gb=2.0)
    uses_model = True
    gpu_when_available = 1.0
    # engine batches: up to 8 files and about 8 min of audio (a longer file is a batch of
    # its own), so a GPU worker has rows to batch; on CPU rows still run one by one
    default_batch_size = 8
    default_batch_seconds = 480.0

    config: SeparateConfig

    @classmethod
    def validate_config(cls, config: StageConfig) -> None:
        assert isinstance(config, SeparateConfig)
        if config.chunk_s < config.segment_s:
            raise ValueError("key 'with.chunk_s': must be >= segment_s")

    def setup(self) -> None:
        c = self.config
        self.validate_config(c)
        model, self.model_source = load_model(c.model, c.model_repo, self.ctx.offline)
        spec = ModelSpec(backend=BACKEND, name=c.model, device=c.device)
        from speechmill.pipeline.models import Resolved

        device = Resolved(spec, "", "").device
        self.batch_files = int(c.batch_files or (8 if device.startswith("cuda") else 1))
        self.sep = Separator(model, device, c, batch=self.batch_files)

    def _decode(self, path: str, offset: float) -> tuple[Any, Any]:
        try:
            return decode(path, chunk_seconds=min(self.config.chunk_s, 30.0), start=offset)
        except AudioError as e:
            raise Reject(e.reason, e.detail) from None

    # -- music pre-check -----------------------------------------------------------
    def _probe(self, path: str, offset: float, duration: float | None) -> np.ndarray:
        """The first ``probe_s`` seconds at the model's rate."""
        c = self.config
        info, chunks = self._decode(path, offset)
        probe = c.probe_s if not duration else min(c.probe_s, duration)
        try:
            parts = list(_Checked(_limited(chunks, int(round(probe * info.sample_rate)))))
        except AudioError as e:
            raise Reject(e.reason, e.detail) from None
        finally:
            chunks.close()
        x = np.concatenate(parts) if parts else np.zeros(0, np.float32)
        rs = StreamResampler(info.sample_rate, self.sep.sr)
        return np.concatenate([rs(x), rs.flush()])

    @staticmethod
    def _ratio(v: np.ndarray, a: np.ndarray) -> float:
        if v.shape[0] == 0:
            return 0.0
        ev = float(np.sum(v.astype(np.float64) ** 2))
        ea = float(np.sum(a.astype(np.float64) ** 2))
        return ea / max(ev, 1e-12)

    def music_ratio(self, path: str, offset: float, duration: float | None) -> float:
        """accompaniment energy / vocals energy over the first ``probe_s`` seconds."""
        x = self._probe(path, offset, duration)
        return self._ratio(*self.sep.separate([x])[0])

    def _passthrough(self, row: dict[str, Any], ratio: float) -> dict[str, Any]:
        return {**row, "parent_id": row["id"], "separated": False,
                "separation_model": self.config.model, "music_ratio": ratio}

    # -- writing -------------------------------------------------------------------
    def _write(self, row: dict[str, Any], sr_in: int, pieces: Any, ratio: float | None,
               n_in: Any) -> dict[str, Any]:
        """Write the (vocals, accompaniment) pieces (model rate) of ``row`` as FLAC at the
        output rate, atomically; ``n_in()`` is the number of input samples decoded."""

        c = self.config
        sr_out = int(c.sample_rate_out or sr_in)
        out_dir = self.ctx.media_dir / row["id"][:2]
        out_dir.mkdir(parents=True, exist_ok=True)
        voc_path = out_dir / f"{row['id']}.vocals.flac"
        acc_path = out_dir / f"{row['id']}.accompaniment.flac"
        tag = uuid.uuid4().hex[:8]
        tmp_v = voc_path.with_name(f".{voc_path.name}.{tag}.tmp")
        tmp_a = acc_path.with_name(f".{acc_path.name}.{tag}.tmp")
        back_v = StreamResampler(self.sep.sr, sr_out)
        back_a = StreamResampler(self.sep.sr, sr_out)
        n_out = 0
        try:
            with contextlib.ExitStack() as stack:
                fv = stack.enter_context(sound_writer(
                    tmp_v, sr_out, format="FLAC", subtype="PCM_16"))
                fa = None
                if c.write_accompaniment:
                    fa = stack.enter_context(sound_writer(
                        tmp_a, sr_out, format="FLAC", subtype="PCM_16"))
                for v, a in pieces:
                    y = back_v(v)
                    fv.write(np.clip(y, -1.0, 1.0))
                    n_out += y.shape[0]
                    if fa is not None:
                        fa.write(np.clip(back_a(a), -1.0, 1.0))
                y = back_v.flush()
                fv.write(np.clip(y, -1.0, 1.0))
                n_out += y.shape[0]
                if fa is not None:
                    fa.write(np.clip(back_a.flush(), -1.0, 1.0))
            if n_in() == 0:
                raise Reject("zero_length", "decoded 0 samples")
            os.replace(tmp_v, voc_path)
            if c.write_accompaniment:
                os.replace(tmp_a, acc_path)
        except AudioError as e:
            raise Reject(e.reason, e.detail) from None
        finally:
            tmp_v.unlink(missing_ok=True)
            tmp_a.unlink(missing_ok=True)
        out = {
            **row,
            "parent_id": row["id"],
            "audio_path": str(voc_path),
            "offset": 0.0,
            "duration": n_out / sr_out,
            "sample_rate": sr_out,
            "channels": 1,
            "separated": True,
            "separation_model": c.model,
            "source_audio_path": row["audio_path"],
        }
        if ratio is not None:
            out["music_ratio"] = ratio
        if c.write_accompaniment:
            out["accompaniment_path"] = str(acc_path)
        return out

    # -- one row, streamed ---------------------------------------------------------
    def _check_length(self, row: dict[str, Any]) -> float | None:
        dur = float(row["duration"]) if row.get("duration") else None
        if dur is not None and dur > self.config.max_duration_s:
            raise Reject("too_long", f"{dur:.0f} s > max_duration_s")
        return dur

    def _stream_row(self, row: dict[str, Any], ratio: float | None) -> dict[str, Any]:
        """Separate ``row`` window by window (any length, bounded memory) and write it."""
        offset = float(row.get("offset") or 0.0)
        dur = float(row["duration"]) if row.get("duration") else None
        info, chunks = self._decode(row["audio_path"], offset)
        sr_in = int(info.sample_rate)
        want = int(round(dur * sr_in)) if dur is not None else None
        try:
            src = _Checked(_limited(chunks, want))
            pieces = self.sep.stream(_resampled(src, StreamResampler(sr_in, self.sep.sr)))
            return self._write(row, sr_in, pieces, ratio, lambda: src.n)
        finally:
            chunks.close()

    def process_row(self, row: dict[str, Any]) -> dict[str, Any]:
        c = self.config
        dur = self._check_length(row)
        ratio: float | None = None
        if c.skip_below_music_ratio is not None:
            ratio = self.music_ratio(row["audio_path"], float(row.get("offset") or 0.0), dur)
            if ratio < c.skip_below_music_ratio:
                return self._passthrough(row, ratio)
        return self._stream_row(row, ratio)

    # -- a batch of rows -----------------------------------------------------------
    def _load_short(self, row: dict[str, Any]) -> tuple[int, np.ndarray, int]:
        """(input rate, whole row at the model's rate, input samples) for a row that
        should fit one window; the same decode -> check -> resample chain as streaming."""
        offset = float(row.get("offset") or 0.0)
        info, chunks = self._decode(row["audio_path"], offset)
        sr_in = int(info.sample_rate)
        want = int(round(float(row["duration"]) * sr_in))
        try:
            src = _Checked(_limited(chunks, want))
            parts = list(_resampled(src, StreamResampler(sr_in, self.sep.sr)))
        except AudioError as e:
            raise Reject(e.reason, e.detail) from None
        finally:
            chunks.close()
        if src.n == 0:
            raise Reject("zero_length", "decoded 0 samples")
        x = np.concatenate(parts) if parts else np.zeros(0, np.float32)
        return sr_in, x, src.n

    def process(self, batch: pa.Table) -> StageResult:
        """With ``batch_files > 1``: the music probes of the batch, then its rows that fit
        one window (``duration`` <= the window), are separated in groups of up to
        ``batch_files`` files (a group closes once it holds ``batch_files`` demucs
        segments), their segments forwarded ``batch_files`` at a time; longer rows (or
        rows without a duration) stream window by window. Per-row problems (decode
        errors, NaN samples, ...) are that row's reject, never an exception. With
        ``batch_files == 1``: row by row (:meth:`process_row`)."""
        if self.batch_files <= 1:
            return super().process(batch)
        c = self.config
        k = self.batch_files
        rows = batch.to_pylist()
        done: dict[int, RowOutcome] = {}
        ratios: dict[int, float | None] = {}
        todo: list[int] = []
        durs: dict[int, float | None] = {}
        for i, row in enumerate(rows):
            durs[i], bad = _guarded(self, row, self._check_length, row)
            if bad is not None:
                done[i] = bad
            else:
                todo.append(i)
                ratios[i] = None

        if c.skip_below_music_ratio is not None:
            probes: list[tuple[int, np.ndarray]] = []

            def probe_group() -> None:
                got = self.sep.separate([x for _, x in probes])
                for (i, _), (v, a) in zip(probes, got, strict=True):
                    ratios[i] = self._ratio(v, a)
                    if ratios[i] < c.skip_below_music_ratio:  # type: ignore[operator]
                        done[i] = _outcome(self, rows[i], self._passthrough, rows[i],
                                           ratios[i])
                probes.clear()

            for i in todo:
                row = rows[i]
                x, bad = _guarded(self, row, self._probe, row["audio_path"],
                                  float(row.get("offset") or 0.0), durs[i])
                if bad is not None:
                    done[i] = bad
                    continue
                probes.append((i, x))
                if len(probes) == k or sum(self.sep.segments(p.shape[0])
                                           for _, p in probes) >= k:
                    probe_group()
            if probes:
                probe_group()
            todo = [i for i in todo if i not in done]

        fits = self.sep.window / self.sep.sr  # seconds of one window at the model rate
        long_rows: list[int] = []
        group: list[tuple[int, int, np.ndarray, int]] = []
        segs = 0

        def short_group() -> None:
            got = self.sep.separate([x for _, _, x, _ in group])
            for (i, sr_in, _, n_in), (v, a) in zip(group, got, strict=True):
                done[i] = _outcome(self, rows[i], self._write, rows[i], sr_in,
                                   iter([(v, a)]), ratios[i], lambda n=n_in: n)
            group.clear()

        for i in todo:
            dur = durs[i]
            if dur is None or dur > fits:
                long_rows.append(i)
                continue
            loaded, bad = _guarded(self, rows[i], self._load_short, rows[i])
            if bad is not None:
                done[i] = bad
                continue
            sr_in, x, n_in = loaded
            if x.shape[0] > self.sep.window:  # the header's duration was short of it
                long_rows.append(i)
                continue
            group.append((i, sr_in, x, n_in))
            segs += self.sep.segments(x.shape[0])
            if len(group) == k or segs >= k:  # enough to fill a model forward
                short_group()
                segs = 0
        if group:
            short_group()
        for i in long_rows:
            done[i] = _outcome(self, rows[i], self._stream_row, rows[i], ratios[i])

        outputs: list[dict[str, Any]] = []
        rejects: list[dict[str, Any]] = []
        for i in range(len(rows)):
            o = done[i]
            outputs.extend(o.outputs)
            if o.reject is not None:
                rejects.append(o.reject)
        return StageResult(self.outputs_table(outputs), rejects_table(rejects))
