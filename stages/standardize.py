"""Stage ``standardize``: decode, downmix, resample, normalise loudness, write FLAC.

Two passes with bounded memory whatever the duration: pass 1 decodes in chunks,
downmixes to mono, resamples with soxr and measures loudness/peak while spooling the
resampled float32 samples to a temporary file; pass 2 applies one gain to the spool
and writes FLAC. Loudness is either Emilia-Pipe's (gain to -20 dBFS RMS, clamped to
+-3 dB) or ITU-R BS.1770 integrated loudness (LUFS). The gain is lowered when needed so
the peak stays under ``peak_ceiling_db`` (peak protection without a limiter).
"""

from __future__ import annotations

import math
import os
import uuid
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from speechmill.pipeline.audio import AudioError, DecodeStats, StreamResampler, decode
from speechmill.pipeline.audio_write import sound_writer
from speechmill.pipeline.loudness import LoudnessMeter, clamp_gain_db
from speechmill.pipeline.stage import Reject, Resources, Stage, StageConfig


class StandardizeConfig(StageConfig):
    sample_rate: int = Field(24000, ge=8000, le=192000, description="output sample rate (Hz)")
    loudness: Literal["dbfs", "lufs", "none"] = Field(
        "dbfs", description="dbfs: Emilia-Pipe RMS gain; lufs: ITU-R BS.1770; none"
    )
    target_dbfs: float = Field(-20.0, le=0, description="RMS target in dbfs mode")
    target_lufs: float = Field(-23.0, le=0, description="integrated loudness in lufs mode")
    max_gain_db: float | None = Field(
        None, ge=0, description="gain clamp (+-dB); default 3 (dbfs) / 30 (lufs)"
    )
    peak_ceiling_db: float = Field(-1.0, le=0, description="peak protection ceiling (dBFS)")
    subtype: Literal["PCM_16", "PCM_24"] = Field("PCM_16", description="FLAC sample format")
    resample_quality: Literal["VHQ", "HQ", "MQ", "LQ", "QQ"] = "HQ"
    chunk_seconds: float = Field(30.0, gt=0, le=600, description="decode chunk length")
    min_duration_s: float = Field(0.0, ge=0, description="shorter audio is rejected")
    max_duration_s: float | None = Field(None, gt=0, description="longer audio is rejected")
    silence_dbfs: float | None = Field(
        -70.0, description="reject audio whose RMS is below this (None: keep silence)"
    )
    storage_options: dict[str, Any] = Field(
        default_factory=dict, description="fsspec options for remote audio_path URLs"
    )
    truncation_tolerance: float = Field(
        0.02, ge=0, le=1, description="reject when decoding yields this fraction less "
        "than the header declares (plus 0.25 s)"
    )


class Standardize(Stage):
    name = "standardize"
    description = "decode any format, mono, resample (soxr), loudness-normalise, write FLAC"
    Config = StandardizeConfig
    resources = Resources(cpus=1, memory_gb=0.5)
    default_batch_size = 4

    config: StandardizeConfig

    def process_row(self, row: dict[str, Any]) -> dict[str, Any]:
        src = row["audio_path"]
        out_path = self.ctx.media_dir / row["id"][:2] / f"{row['id']}.flac"
        result = standardize_file(src, out_path, self.config, tmp_dir=self.ctx.tmp_dir)
        return {
            **row,
            "parent_id": row["id"],
            "audio_path": str(out_path),
            "offset": 0.0,
            "duration": result["duration"],
            "sample_rate": self.config.sample_rate,
            "channels": 1,
            "source_audio_path": src,
            "source_sample_rate": row.get("sample_rate"),
            "source_channels": row.get("channels"),
            "gain_db": result["gain_db"],
            "loudness_in": result["loudness_in"],
            "peak_dbfs_in": result["peak_dbfs_in"],
        }


def standardize_file(src: str, out_path: Path, cfg: StandardizeConfig,
                     tmp_dir: Path | None = None) -> dict[str, Any]:
    """Standardize ``src`` into ``out_path`` (FLAC). Raises :class:`Reject` on bad input."""
    tmp_dir = Path(tmp_dir or out_path.parent)
    tmp_dir.mkdir(parents=True, exist_ok=True)
    spool = tmp_dir / f"{out_path.stem}.{uuid.uuid4().hex[:8]}.f32"
    stats = DecodeStats()
    try:
        try:
            info, chunks = decode(src, chunk_seconds=cfg.chunk_seconds, stats=stats,
                                  storage_options=cfg.storage_options)
        except AudioError as e:
            raise Reject(e.reason, e.detail) from None
        if (cfg.max_duration_s and info.exact_duration and info.duration
                and info.duration > cfg.max_duration_s):
            chunks.close()
            raise Reject("too_long", f"{info.duration:.1f} s > max_duration_s")
        rs = StreamResampler(info.sample_rate, cfg.sample_rate, cfg.resample_quality)
        meter = LoudnessMeter(cfg.sample_rate)
        n_in = 0
        with open(spool, "wb") as f:
            try:
                for chunk in chunks:
                    if not np.isfinite(chunk).all():
                        badmask = ~np.isfinite(chunk)
                        at = (n_in + int(np.argmax(badmask))) / info.sample_rate
                        raise Reject("nonfinite_samples", f"{int(badmask.sum())} NaN/inf "
                                     f"samples, the first at {at:.2f} s")
                    n_in += chunk.shape[0]
                    if cfg.max_duration_s and n_in / info.sample_rate > cfg.max_duration_s:
                        raise Reject("too_long", f"> max_duration_s={cfg.max_duration_s}")
                    y = rs(chunk)
                    meter.update(y)
                    f.write(y.astype(np.float32, copy=False).tobytes())
                y = rs.flush()
                meter.update(y)
                f.write(y.astype(np.float32, copy=False).tobytes())
            except AudioError as e:
                raise Reject(e.reason, e.detail) from None
            finally:
                chunks.close()

        decoded_s = n_in / info.sample_rate if info.sample_rate else 0.0
        if n_in == 0:
            if stats.decode_errors:
                raise Reject("corrupt", f"nothing decodable ({stats.last_error})")
            raise Reject("zero_length", "decoded 0 samples")
        # an estimated header length (mp3/aac by bit rate) only counts with decode errors
        trust = info.exact_duration or stats.decode_errors > 0
        short = info.duration and decoded_s < info.duration * (1 - cfg.truncation_tolerance) - 0.25
        if trust and short:
            raise Reject(
                "truncated",
                f"decoded {decoded_s:.2f} s of {info.duration:.2f} s declared"
                + (f" ({stats.decode_errors} decode errors: {stats.last_error})"
                   if stats.decode_errors else ""),
            )
        n_out = meter.n_samples
        duration = n_out / cfg.sample_rate
        if duration < cfg.min_duration_s or n_out == 0:
            raise Reject("too_short", f"{duration:.2f} s < min_duration_s")
        rms = meter.rms_dbfs
        if cfg.silence_dbfs is not None and rms < cfg.silence_dbfs:
            raise Reject("silent", f"RMS {rms:.1f} dBFS < {cfg.silence_dbfs} dBFS")

        if cfg.loudness == "dbfs":
            measured = rms
            gain = clamp_gain_db(cfg.target_dbfs - rms,
                                 3.0 if cfg.max_gain_db is None else cfg.max_gain_db)
        elif cfg.loudness == "lufs":
            measured = meter.integrated_lufs
            gain = clamp_gain_db(cfg.target_lufs - measured,
                                 30.0 if cfg.max_gain_db is None else cfg.max_gain_db)
        else:
            measured, gain = rms, 0.0
        peak = meter.peak_dbfs
        if math.isfinite(peak) and peak + gain > cfg.peak_ceiling_db:
            gain = cfg.peak_ceiling_db - peak
        g = np.float32(10.0 ** (gain / 20.0))

        out_path.parent.mkdir(parents=True, exist_ok=True)
        tmp_out = out_path.with_name(f".{out_path.name}.{uuid.uuid4().hex[:8]}.tmp")
        block = int(cfg.chunk_seconds * cfg.sample_rate)
        with open(spool, "rb") as fin, sound_writer(
            tmp_out, cfg.sample_rate, format="FLAC", subtype=cfg.subtype,
        ) as fout:
            while True:
                buf = fin.read(block * 4)
                if not buf:
                    break
                x = np.frombuffer(buf, dtype=np.float32) * g
                np.clip(x, -1.0, 1.0, out=x)
                fout.write(x)
        os.replace(tmp_out, out_path)
        return {
            "duration": duration,
            "gain_db": float(gain),
            "loudness_in": float(measured) if math.isfinite(measured) else None,
            "peak_dbfs_in": float(peak) if math.isfinite(peak) else None,
            "decoded_seconds_in": decoded_s,
        }
    finally:
        spool.unlink(missing_ok=True)
