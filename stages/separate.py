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
import uuid
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from speechmill.pipeline.audio import AudioError, StreamResampler, decode
from speechmill.pipeline.models import (
    ModelNotFoundError,
    ModelSpec,
    register_downloader,
    resolve,
)
from speechmill.pipeline.stage import Reject, Resources, Stage, StageConfig

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
    """Runs a demucs model over a mono stream at the model's rate, window by window."""

    def __init__(self, model: Any, device: str, cfg: SeparateConfig) -> None:
        self.model = model
        self.device = device
        self.cfg = cfg
        self.sr = int(model.samplerate)
        self.channels = int(model.audio_channels)
        sources = list(model.sources)
        if cfg.two_stems not in sources:
            raise ModelNotFoundError(
                f"demucs model has no {cfg.two_stems!r} source (sources: {sources})")
        self.keep = sources.index(cfg.two_stems)
        # windows advance by a whole number of demucs segment strides, so the segments
        # inside every window sit on the same grid as one pass over the whole file would
        seg_len = int(self.sr * cfg.segment_s)
        stride = max(1, int((1 - cfg.overlap) * seg_len))
        self.xfade = int(round(min(cfg.segment_s, cfg.chunk_s / 4) * self.sr))
        window = max(1, int(round(cfg.chunk_s * self.sr)))
        self.hop = max(1, (window - self.xfade) // stride) * stride
        self.window = self.hop + self.xfade

    def run(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(vocals, accompaniment), mono float32, same length as ``x``."""
        import torch
        from demucs.apply import apply_model

        n = x.shape[0]
        if n == 0:
            z = np.zeros(0, np.float32)
            return z, z
        mean = float(x.mean())
        std = float(x.std()) + 1e-8
        t = torch.from_numpy(((x - mean) / std).astype(np.float32, copy=False))
        mix = t.reshape(1, 1, n).expand(1, self.channels, n).contiguous()
        with torch.inference_mode():
            out = apply_model(self.model, mix, shifts=self.cfg.shifts, split=True,
                              overlap=self.cfg.overlap, segment=self.cfg.segment_s,
                              device=self.device, progress=False)
        out = out[0].mean(dim=1).to("cpu", torch.float32)  # (sources, n), mono
        keep = out[self.keep]
        rest = out.sum(dim=0) - keep
        del out
        # each source carries its share of the mean; the demucs CLI adds it to every one
        voc = keep.numpy() * std + mean
        acc = rest.numpy() * std + mean * (len(self.model.sources) - 1)
        return voc.astype(np.float32), acc.astype(np.float32)

    def stream(self, chunks: Any):  # noqa: ANN201 - generator of (vocals, accomp)
        """Separate an iterator of mono chunks at the model rate; yields output pieces
        whose lengths add up to the input's length."""
        buf = np.zeros(0, np.float32)
        prev_v: np.ndarray | None = None
        prev_a: np.ndarray | None = None
        ramp: np.ndarray | None = None
        it = iter(chunks)
        eof = False
        while True:
            while not eof and buf.shape[0] <= self.window:
                try:
                    c = next(it)
                except StopIteration:
                    eof = True
                    break
                if c.shape[0]:
                    buf = np.concatenate([buf, c.astype(np.float32, copy=False)])
            if buf.shape[0] == 0 and prev_v is None:
                return
            final = eof and buf.shape[0] <= self.window
            seg = buf if final else buf[: self.window]
            v, a = self.run(seg)
            if prev_v is not None and prev_a is not None:
                k = prev_v.shape[0]  # == xfade (seg is at least that long)
                if ramp is None or ramp.shape[0] != k:
                    ramp = ((np.arange(k, dtype=np.float32) + 0.5) / k).astype(np.float32)
                v[:k] = prev_v * (1 - ramp) + v[:k] * ramp
                a[:k] = prev_a * (1 - ramp) + a[:k] * ramp
            if final:
                yield v, a
                return
            cut = self.hop
            yield v[:cut], a[:cut]
            prev_v, prev_a = v[cut:].copy(), a[cut:].copy()
            buf = buf[cut:].copy()


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


class Separate(Stage):
    name = "separate"
    description = "Demucs source separation: keep the vocals (optionally the music too)"
    Config = SeparateConfig
    resources = Resources(cpus=1, memory_gb=2.0)
    uses_model = True
    default_batch_size = 1

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
        self.sep = Separator(model, device, c)

    def _decode(self, path: str, offset: float) -> tuple[Any, Any]:
        try:
            return decode(path, chunk_seconds=min(self.config.chunk_s, 30.0), start=offset)
        except AudioError as e:
            raise Reject(e.reason, e.detail) from None

    def music_ratio(self, path: str, offset: float, duration: float | None) -> float:
        """accompaniment energy / vocals energy over the first ``probe_s`` seconds."""
        c = self.config
        info, chunks = self._decode(path, offset)
        probe = c.probe_s if not duration else min(c.probe_s, duration)
        try:
            parts = list(_limited(chunks, int(round(probe * info.sample_rate))))
        finally:
            chunks.close()
        x = np.concatenate(parts) if parts else np.zeros(0, np.float32)
        rs = StreamResampler(info.sample_rate, self.sep.sr)
        x = np.concatenate([rs(x), rs.flush()])
        if x.shape[0] == 0:
            return 0.0
        v, a = self.sep.run(x)
        ev = float(np.sum(v.astype(np.float64) ** 2))
        ea = float(np.sum(a.astype(np.float64) ** 2))
        return ea / max(ev, 1e-12)

    def process_row(self, row: dict[str, Any]) -> dict[str, Any]:
        import soundfile as sf

        c = self.config
        src = row["audio_path"]
        offset = float(row.get("offset") or 0.0)
        dur = float(row["duration"]) if row.get("duration") else None
        if dur is not None and dur > c.max_duration_s:
            raise Reject("too_long", f"{dur:.0f} s > max_duration_s")
        model_name = c.model
        ratio: float | None = None
        if c.skip_below_music_ratio is not None:
            ratio = self.music_ratio(src, offset, dur)
            if ratio < c.skip_below_music_ratio:
                return {**row, "parent_id": row["id"], "separated": False,
                        "separation_model": model_name, "music_ratio": ratio}

        info, chunks = self._decode(src, offset)
        sr_in = int(info.sample_rate)
        sr_out = int(c.sample_rate_out or sr_in)
        want = int(round(dur * sr_in)) if dur is not None else None
        out_dir = self.ctx.media_dir / row["id"][:2]
        out_dir.mkdir(parents=True, exist_ok=True)
        voc_path = out_dir / f"{row['id']}.vocals.flac"
        acc_path = out_dir / f"{row['id']}.accompaniment.flac"
        tag = uuid.uuid4().hex[:8]
        tmp_v = voc_path.with_name(f".{voc_path.name}.{tag}.tmp")
        tmp_a = acc_path.with_name(f".{acc_path.name}.{tag}.tmp")
        n_in = 0

        def counted(it: Any):  # noqa: ANN202 - generator
            nonlocal n_in
            for x in it:
                if not np.isfinite(x).all():
                    raise Reject("nonfinite_samples", "NaN/inf samples in the input")
                n_in += x.shape[0]
                yield x

        to_model = StreamResampler(sr_in, self.sep.sr)
        back_v = StreamResampler(self.sep.sr, sr_out)
        back_a = StreamResampler(self.sep.sr, sr_out)
        n_out = 0
        try:
            with contextlib.ExitStack() as stack:
                fv = stack.enter_context(sf.SoundFile(
                    tmp_v, "w", samplerate=sr_out, channels=1, format="FLAC",
                    subtype="PCM_16"))
                fa = None
                if c.write_accompaniment:
                    fa = stack.enter_context(sf.SoundFile(
                        tmp_a, "w", samplerate=sr_out, channels=1, format="FLAC",
                        subtype="PCM_16"))
                pieces = self.sep.stream(
                    _resampled(counted(_limited(chunks, want)), to_model))
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
            if n_in == 0:
                raise Reject("zero_length", "decoded 0 samples")
            os.replace(tmp_v, voc_path)
            if c.write_accompaniment:
                os.replace(tmp_a, acc_path)
        except AudioError as e:
            raise Reject(e.reason, e.detail) from None
        finally:
            chunks.close()
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
            "separation_model": model_name,
            "source_audio_path": src,
        }
        if ratio is not None:
            out["music_ratio"] = ratio
        if c.write_accompaniment:
            out["accompaniment_path"] = str(acc_path)
        return out
