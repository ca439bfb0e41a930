"""Real-speech audio fixtures in many containers and codecs, for tests and benchmarks.

Everything here builds on the recorded speech clips shipped by ``pytest_audioeval``
(16 kHz mono FLOAT wavs with a ``.txt`` transcript beside each). Nothing in the project
itself is imported; ``from testkit.audio import ...`` works wherever the repository root is
on ``sys.path``.

Public helpers:

* :func:`speech_samples` -- the recorded wavs, sorted.
* :func:`load_speech` -- float32 mono speech of a given length at any sample rate.
* :func:`write_good_files` -- the same kind of speech in every supported format.
* :func:`write_bad_files` -- broken / hostile inputs, each with its expected category.
* :func:`make_unreadable` -- a path that exists in the directory listing but cannot be read.
* :func:`write_long_flac` -- an hour-scale FLAC, streamed in blocks (small memory).
* :func:`write_duplicate` -- a byte-identical copy (for dedup tests).

Run ``python testkit/audio.py`` to execute :func:`_selfcheck`, which writes every
fixture to a temporary directory and checks it with PyAV.
"""

from __future__ import annotations

import functools
import math
import os
import shutil
import struct
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np
import soundfile as sf

try:  # optional, faster/better resampler
    import soxr
except ImportError:  # pragma: no cover - depends on the environment
    soxr = None

__all__ = [
    "BAD_CATEGORIES",
    "GOOD_FILENAMES",
    "NATIVE_RATE",
    "load_speech",
    "make_unreadable",
    "speech_samples",
    "write_bad_files",
    "write_duplicate",
    "write_good_files",
    "write_long_flac",
]

#: Sample rate of the recorded clips shipped by pytest_audioeval.
NATIVE_RATE = 16000

#: Every category :func:`write_bad_files` can return.
BAD_CATEGORIES = (
    "empty_file",
    "not_audio",
    "truncated",
    "truncated_header",
    "nonfinite",
    "zero_length",
    "unsupported_codec",
)


# --------------------------------------------------------------------------------------
# Source speech
# --------------------------------------------------------------------------------------


def _samples_root() -> Path:
    import pytest_audioeval

    return Path(pytest_audioeval.__path__[0]) / "samples" / "audio"


def speech_samples(languages: tuple[str, ...] | None = None) -> list[Path]:
    """Return the recorded speech wavs from ``pytest_audioeval``, sorted by path.

    ``languages`` restricts the result to those language folders (e.g. ``("en",)``);
    by default all languages are returned (en, es, fr, hi, it, ja, pl, pt, zh).
    Each wav has a ``.txt`` transcript beside it (``path.with_suffix(".txt")``).
    """
    root = _samples_root()
    paths = sorted(root.glob("*/*.wav"))
    if languages is not None:
        paths = [p for p in paths if p.parent.name in languages]
    if not paths:
        raise FileNotFoundError(f"no speech samples found under {root} for {languages!r}")
    return paths


def _resample(x: np.ndarray, sr_in: int, sr_out: int) -> np.ndarray:
    """Resample a 1-D float32 signal (soxr if available, else scipy polyphase)."""
    if sr_in == sr_out:
        return x.astype(np.float32, copy=False)
    if soxr is not None:
        return np.asarray(soxr.resample(x, sr_in, sr_out, quality="HQ"), dtype=np.float32)
    from scipy.signal import resample_poly

    g = math.gcd(sr_in, sr_out)
    return resample_poly(x, sr_out // g, sr_in // g).astype(np.float32)


@functools.cache
def _clip(path: Path) -> np.ndarray:
    """One recorded clip as float32 mono at :data:`NATIVE_RATE` (cached, read-only)."""
    data, sr = sf.read(path, dtype="float32", always_2d=True)
    mono = data.mean(axis=1)
    mono = _resample(mono, sr, NATIVE_RATE)
    mono.setflags(write=False)
    return mono


def load_speech(seconds: float, sample_rate: int = 16000, seed: int = 0) -> np.ndarray:
    """Float32 mono real speech, exactly ``round(seconds * sample_rate)`` samples long.

    Built by concatenating the recorded clips in a seed-dependent order, each with a
    random gain (0.6-1.0), separated by 0.12-0.4 s of silence, starting with a short
    lead-in of silence; the result is resampled to ``sample_rate`` and cut to length.
    Peak level is about 0.5-0.8. Different seeds give different content.
    """
    if seconds < 0:
        raise ValueError("seconds must be >= 0")
    n_out = round(seconds * sample_rate)
    if n_out == 0:
        return np.zeros(0, dtype=np.float32)
    rng = np.random.default_rng(seed)
    clips = speech_samples()
    need = int(math.ceil(seconds * NATIVE_RATE)) + NATIVE_RATE // 10  # margin for resampling
    parts: list[np.ndarray] = [np.zeros(int(rng.uniform(0.03, 0.2) * NATIVE_RATE), np.float32)]
    total = parts[0].size
    while total < need:
        for idx in rng.permutation(len(clips)):
            clip = _clip(clips[idx]) * np.float32(rng.uniform(0.6, 1.0))
            gap = np.zeros(int(rng.uniform(0.12, 0.4) * NATIVE_RATE), np.float32)
            parts += [clip, gap]
            total += clip.size + gap.size
            if total >= need:
                break
    native = np.concatenate(parts)
    out = _resample(native, NATIVE_RATE, sample_rate)
    if out.size < n_out:  # resampler rounding; cannot happen with the margin, but be safe
        out = np.pad(out, (0, n_out - out.size))
    out = out[:n_out]
    peak = float(np.max(np.abs(out))) or 1.0
    out = out * np.float32(rng.uniform(0.5, 0.8) / peak)
    return np.ascontiguousarray(out, dtype=np.float32)


def _stereo(mono: np.ndarray, sample_rate: int, seed: int) -> np.ndarray:
    """(n, 2) float32: speech in both channels, right slightly delayed/quieter/noisier."""
    rng = np.random.default_rng(seed + 10_000)
    delay = max(1, int(0.0007 * sample_rate))  # ~0.7 ms inter-channel delay
    right = np.concatenate([np.zeros(delay, np.float32), mono[:-delay]]) * np.float32(0.85)
    right = right + rng.normal(0.0, 1e-3, mono.size).astype(np.float32)
    return np.ascontiguousarray(np.stack([mono, right], axis=1), dtype=np.float32)


def _speech(seconds: float, sample_rate: int, channels: int, seed: int) -> np.ndarray:
    """(n, channels) float32 speech."""
    mono = load_speech(seconds, sample_rate, seed=seed)
    if channels == 1:
        return mono[:, None]
    if channels == 2:
        return _stereo(mono, sample_rate, seed)
    raise ValueError("channels must be 1 or 2")


# --------------------------------------------------------------------------------------
# Encoding with PyAV
# --------------------------------------------------------------------------------------


def _av_write(
    path: Path,
    audio: np.ndarray,
    sample_rate: int,
    *,
    container_format: str,
    audio_codec: str,
    bit_rate: int | None = None,
    video_codec: str | None = None,
    fps: int = 5,
    size: int = 64,
) -> None:
    """Encode (n, ch) float32 ``audio`` (plus an optional tiny video track) with PyAV.

    Audio and video are fed in presentation order so the muxer interleaves them.
    """
    n, channels = audio.shape
    layout = "mono" if channels == 1 else "stereo"
    with av.open(str(path), mode="w", format=container_format) as out:
        astream: Any = out.add_stream(audio_codec, rate=sample_rate)
        astream.codec_context.layout = layout
        if bit_rate is not None:
            astream.codec_context.bit_rate = bit_rate
        if audio_codec == "vorbis":  # native encoder is flagged experimental
            astream.codec_context.options = {"strict": "experimental"}
        vstream: Any = None
        if video_codec is not None:
            vstream = out.add_stream(video_codec, rate=fps)
            vstream.width = size
            vstream.height = size
            vstream.pix_fmt = "yuv420p"
            if video_codec == "libx264":
                vstream.codec_context.options = {"preset": "ultrafast"}
        audio_fmt = "fltp"
        for name in (f.name for f in (astream.codec_context.codec.audio_formats or [])):
            if name in ("fltp", "flt"):
                audio_fmt = name
                break

        n_video = math.ceil(n / sample_rate * fps) if vstream is not None else 0
        yy, xx = np.mgrid[0:size, 0:size]
        v_next = 0
        block = 1024
        for start in range(0, n, block):
            while v_next < n_video and v_next / fps <= start / sample_rate:
                luma = ((xx + yy + 8 * v_next) % 256).astype(np.uint8)
                rgb = np.stack([luma, np.flipud(luma), np.full_like(luma, 96)], axis=-1)
                vframe = av.VideoFrame.from_ndarray(rgb, format="rgb24")
                vframe.pts = v_next
                vframe.time_base = Fraction(1, fps)
                out.mux(vstream.encode(vframe))
                v_next += 1
            chunk = audio[start : start + block]
            if audio_fmt == "fltp":
                arr = np.ascontiguousarray(chunk.T)
            else:
                arr = np.ascontiguousarray(chunk.reshape(1, -1))
            aframe = av.AudioFrame.from_ndarray(arr, format=audio_fmt, layout=layout)
            aframe.sample_rate = sample_rate
            aframe.pts = start
            aframe.time_base = Fraction(1, sample_rate)
            out.mux(astream.encode(aframe))
        out.mux(astream.encode(None))
        if vstream is not None:
            while v_next < n_video:  # cannot normally happen; keeps video as long as audio
                luma = np.full((size, size), v_next % 256, np.uint8)
                vframe = av.VideoFrame.from_ndarray(np.stack([luma] * 3, axis=-1), format="rgb24")
                vframe.pts = v_next
                vframe.time_base = Fraction(1, fps)
                out.mux(vstream.encode(vframe))
                v_next += 1
            out.mux(vstream.encode(None))


# (filename, kind, codec/subtype, source rate, channels, seconds, seed)
_GOOD_SPECS: tuple[tuple[str, str, str, int, int, float, int], ...] = (
    ("speech.wav", "wav", "PCM_16", 16000, 1, 3.0, 101),
    ("speech_float.wav", "wav", "FLOAT", 48000, 2, 2.5, 102),
    ("speech.flac", "flac", "PCM_16", 22050, 1, 4.0, 103),
    ("speech.mp3", "mp3", "libmp3lame", 44100, 2, 3.5, 104),
    ("speech.ogg", "ogg", "VORBIS", 8000, 1, 5.0, 105),
    ("speech.opus", "opus", "OPUS", 48000, 1, 3.0, 106),
    ("speech.m4a", "m4a", "aac", 44100, 1, 4.5, 107),
    ("speech_video.mp4", "mp4", "aac", 48000, 2, 4.0, 108),
    ("speech_video.mkv", "mkv", "libopus", 48000, 2, 3.5, 109),
    ("speech.webm", "webm", "libopus", 48000, 1, 2.2, 110),
)

#: Every filename :func:`write_good_files` writes.
GOOD_FILENAMES: tuple[str, ...] = tuple(spec[0] for spec in _GOOD_SPECS)


def write_good_files(dirpath: Path) -> dict[str, dict[str, Any]]:
    """Write real speech in every supported format; return filename -> metadata.

    Metadata keys: ``format`` (short container/codec tag, e.g. ``"mp3"``), ``codec``
    (audio codec as PyAV names it when decoding), ``sample_rate`` (source rate, which is
    also the rate PyAV decodes at -- Opus files are written at 48 kHz so this holds),
    ``channels``, ``duration`` (seconds of source audio; lossy codecs add a few ms of
    encoder priming/padding), ``has_video``.

    Files (each different speech content, so content hashes differ):

    ===================  ===========================================  ======  ==  ====
    file                 codec / container                            rate    ch  sec
    ===================  ===========================================  ======  ==  ====
    speech.wav           PCM16 WAV (soundfile)                        16000   1   3.0
    speech_float.wav     32-bit float WAV (soundfile)                 48000   2   2.5
    speech.flac          FLAC 16-bit (soundfile)                      22050   1   4.0
    speech.mp3           MP3 via libmp3lame (PyAV)                    44100   2   3.5
    speech.ogg           Ogg Vorbis (soundfile)                       8000    1   5.0
    speech.opus          Ogg Opus (soundfile)                         48000   1   3.0
    speech.m4a           AAC in MP4/M4A (PyAV, ipod muxer)            44100   1   4.5
    speech_video.mp4     mpeg4 64x64 @5 fps + AAC (PyAV)              48000   2   4.0
    speech_video.mkv     H.264 64x64 @5 fps + Opus, Matroska (PyAV)   48000   2   3.5
    speech.webm          VP8 64x64 @5 fps + Opus, WebM (PyAV)         48000   1   2.2
    ===================  ===========================================  ======  ==  ====
    """
    dirpath = Path(dirpath)
    dirpath.mkdir(parents=True, exist_ok=True)
    result: dict[str, dict[str, Any]] = {}
    for name, kind, codec, rate, channels, seconds, seed in _GOOD_SPECS:
        path = dirpath / name
        audio = _speech(seconds, rate, channels, seed)
        has_video = False
        if kind in ("wav", "flac", "ogg", "opus"):
            sf_format = {"wav": "WAV", "flac": "FLAC", "ogg": "OGG", "opus": "OGG"}[kind]
            sf.write(path, audio, rate, format=sf_format, subtype=codec)
            av_codec = {"PCM_16": "pcm_s16le", "FLOAT": "pcm_f32le"}.get(codec, codec.lower())
            if kind == "flac":
                av_codec = "flac"
        elif kind == "mp3":
            _av_write(
                path, audio, rate, container_format="mp3", audio_codec=codec, bit_rate=128_000
            )
            av_codec = "mp3"
        elif kind == "m4a":
            _av_write(
                path, audio, rate, container_format="ipod", audio_codec=codec, bit_rate=96_000
            )
            av_codec = "aac"
        elif kind == "mp4":
            _av_write(
                path,
                audio,
                rate,
                container_format="mp4",
                audio_codec=codec,
                bit_rate=96_000,
                video_codec="mpeg4",
            )
            av_codec, has_video = "aac", True
        elif kind == "mkv":
            _av_write(
                path,
                audio,
                rate,
                container_format="matroska",
                audio_codec=codec,
                bit_rate=64_000,
                video_codec="libx264",
            )
            av_codec, has_video = "opus", True
        elif kind == "webm":
            _av_write(
                path,
                audio,
                rate,
                container_format="webm",
                audio_codec=codec,
                bit_rate=48_000,
                video_codec="libvpx",
            )
            av_codec, has_video = "opus", True
        else:  # pragma: no cover
            raise AssertionError(kind)
        result[name] = {
            "format": kind,
            "codec": av_codec,
            "sample_rate": rate,
            "channels": channels,
            "duration": seconds,
            "has_video": has_video,
        }
    return result


# --------------------------------------------------------------------------------------
# Bad inputs
# --------------------------------------------------------------------------------------

_HTML_ERROR_PAGE = b"""<!DOCTYPE html>
<html lang="en">
<head><meta charset="utf-8"><title>404 Not Found</title></head>
<body>
<h1>Not Found</h1>
<p>The requested URL /podcasts/episode-42.mp3 was not found on this server.</p>
<hr><address>nginx/1.24.0</address>
</body>
</html>
"""

_NOTES_TEXT = b"""Interview notes - episode 42
- guest intro at 00:30
- discussion of speech datasets
- outro and credits
This is a plain text file that happens to have a .wav extension.
"""


def _wav_header(
    *,
    format_tag: int,
    channels: int,
    sample_rate: int,
    bits: int,
    data_bytes: int,
    block_align: int | None = None,
    riff_bytes: int | None = None,
) -> bytes:
    """A canonical 44-byte RIFF/WAVE header (fmt chunk of 16 bytes + data chunk header)."""
    block_align = block_align if block_align is not None else channels * bits // 8
    riff_bytes = riff_bytes if riff_bytes is not None else 36 + data_bytes
    return (
        b"RIFF"
        + struct.pack("<I", riff_bytes)
        + b"WAVE"
        + b"fmt "
        + struct.pack(
            "<IHHIIHH",
            16,
            format_tag,
            channels,
            sample_rate,
            sample_rate * block_align,
            block_align,
            bits,
        )
        + b"data"
        + struct.pack("<I", data_bytes)
    )


def write_bad_files(dirpath: Path) -> dict[str, str]:
    """Write broken inputs; return filename -> expected category (see :data:`BAD_CATEGORIES`).

    Observed with PyAV 18.1 (bundled FFmpeg 8.1.2) using :func:`_probe`: ``av.open(path)``,
    then ``container.decode(stream)``. Exception classes (all subclasses of
    ``av.FFmpegError``): ``av.error.InvalidDataError`` (also a ``ValueError``, errno
    1094995529, message ``Invalid data found when processing input: '<path>'``),
    ``av.error.DecoderNotFoundError`` (also a ``LookupError``), ``av.error.FileNotFoundError``
    (also a builtin ``FileNotFoundError``), ``av.error.EOFError`` (also a builtin
    ``EOFError``). Durations: ``container.duration`` is in microseconds,
    ``stream.duration`` in ``stream.time_base`` units.

    ``empty.wav`` -> empty_file
        0 bytes. ``av.open`` raises ``InvalidDataError``. Beware: the outcome of a 0-byte
        file depends on its *extension* -- ``.ogg``/``.aac`` raise ``av.error.EOFError``
        ("End of file") and an empty ``.flac`` *opens without error* (one flac stream with
        sample_rate 0, channels 0, durations None) and decodes 0 samples. Check
        ``st_size == 0`` before opening.
    ``episode.mp3`` -> not_audio
        An nginx-style HTML 404 page. ``av.open`` raises ``InvalidDataError``.
    ``notes.wav`` -> not_audio
        Plain text. ``av.open`` raises ``InvalidDataError``.
    ``truncated.flac`` -> truncated
        4 s 16 kHz mono FLAC (~64 kB) cut to 40 %. Opens fine and still *declares the
        full length* (STREAMINFO): ``container.duration`` 4_000_000, ``stream.duration``
        64000 (time_base 1/16000), ``stream.frames`` 0. Decoding yields 28672 samples
        (1.792 s, 7 whole 4096-sample frames) and then raises ``InvalidDataError`` with
        message ``Invalid data found when processing input: 'avcodec_send_packet()'`` on
        the partial last packet -- so a decode loop must catch it to keep the partial
        audio. (soundfile: ``info`` says 64000 frames, ``read`` raises ``LibsndfileError``
        "flac decoder lost sync".)
    ``truncated.wav`` -> truncated
        PCM16 16 kHz mono; the data chunk declares 160000 bytes (5 s) but the body holds
        32000 bytes (1 s). FFmpeg clamps the data size to the file size, so the declared
        5 s is *invisible*: ``container.duration`` 1_000_000, ``stream.duration`` 16000,
        decoding yields exactly 16000 samples, no exception (soundfile likewise reports
        16000 frames). Only parsing the RIFF header (data size vs. bytes present) tells.
    ``header_only.mp3`` -> truncated_header
        First 30 bytes of a real PyAV/LAME mp3 (only part of its ID3v2 tag). ``av.open``
        raises ``InvalidDataError``. (The same happens for 30 or 200 bytes starting at the
        first MPEG frame header; at 1000 bytes the file opens, declares the full 2 s via
        the Xing/Info header, and decodes 1199 samples.)
    ``nan.wav`` -> nonfinite
        32-bit float WAV, 3 s 16 kHz speech with 0.1 s NaN then 0.1 s +inf from 1.3 s.
        Opens and decodes all 48000 samples without error; the 1600 NaN + 1600 inf values
        arrive unchanged in the ``flt`` frames -- only an ``np.isfinite`` check catches it.
    ``zero.wav`` -> zero_length
        Valid 44-byte PCM16 16 kHz WAV with an empty data chunk. Opens fine (codec
        ``pcm_s16le``, 16000 Hz, 1 ch); ``container.duration`` and ``stream.duration`` are
        ``None`` (not 0); decoding yields no frames, no exception.
    ``zero.flac`` -> zero_length
        fLaC + STREAMINFO (total_samples 0) + padding, no frames (8288 bytes, written with
        PyAV because libsndfile writes a 0-byte file for 0 frames). Opens fine (flac,
        16000 Hz, 1 ch); both durations ``None``; decoding yields 0 samples, no exception.
        (soundfile: ``info().frames`` is 2**63-1 -- "unknown" -- and ``read()`` fails.)
    ``weird_codec.wav`` -> unsupported_codec
        RIFF/WAVE, format tag 0x7A7A, 1 ch, 16 kHz, 16 bit, 64000 random data bytes.
        ``av.open`` succeeds with one audio stream: ``container.duration`` 2_000_000,
        ``stream.duration`` 32000, but ``stream.codec_context`` is ``None`` -- so
        ``stream.codec_context.sample_rate`` raises ``AttributeError`` and so does
        ``stream.sample_rate`` ("'AudioStream' object has no attribute 'sample_rate'").
        ``container.decode(stream)`` / ``decode(audio=0)`` raises
        ``av.error.DecoderNotFoundError: [Errno 1128613112] Decoder not found``;
        ``container.demux()`` still yields packets. (soundfile: "Malformed 'fmt ' chunk".)

    :func:`make_unreadable` (``unreadable.wav``, a dangling symlink): ``av.open`` raises
    ``av.error.FileNotFoundError: [Errno 2] No such file or directory: '<path>'``.
    """
    dirpath = Path(dirpath)
    dirpath.mkdir(parents=True, exist_ok=True)
    cats: dict[str, str] = {}

    (dirpath / "empty.wav").write_bytes(b"")
    cats["empty.wav"] = "empty_file"

    (dirpath / "episode.mp3").write_bytes(_HTML_ERROR_PAGE)
    cats["episode.mp3"] = "not_audio"
    (dirpath / "notes.wav").write_bytes(_NOTES_TEXT)
    cats["notes.wav"] = "not_audio"

    # truncated.flac: a ~4 s FLAC cut to 40 % of its bytes.
    full_flac = dirpath / ".full_for_truncation.flac"
    sf.write(full_flac, load_speech(4.0, 16000, seed=201), 16000, format="FLAC", subtype="PCM_16")
    blob = full_flac.read_bytes()
    full_flac.unlink()
    (dirpath / "truncated.flac").write_bytes(blob[: int(len(blob) * 0.4)])
    cats["truncated.flac"] = "truncated"

    # truncated.wav: header says 5 s of PCM16 data, body has 1 s.
    sr = 16000
    body = (np.clip(load_speech(1.0, sr, seed=202), -1, 1) * 32767).astype("<i2").tobytes()
    header = _wav_header(format_tag=1, channels=1, sample_rate=sr, bits=16, data_bytes=5 * sr * 2)
    (dirpath / "truncated.wav").write_bytes(header + body)
    cats["truncated.wav"] = "truncated"

    # header_only.mp3: the first 30 bytes of a real mp3.
    full_mp3 = dirpath / ".full_for_header.mp3"
    _av_write(
        full_mp3,
        load_speech(2.0, 44100, seed=203)[:, None],
        44100,
        container_format="mp3",
        audio_codec="libmp3lame",
        bit_rate=128_000,
    )
    (dirpath / "header_only.mp3").write_bytes(full_mp3.read_bytes()[:30])
    full_mp3.unlink()
    cats["header_only.mp3"] = "truncated_header"

    # nan.wav: FLOAT wav with NaN then +inf in the middle.
    speech = load_speech(3.0, sr, seed=204)
    a, b, c = int(1.3 * sr), int(1.4 * sr), int(1.5 * sr)
    speech[a:b] = np.nan
    speech[b:c] = np.inf
    sf.write(dirpath / "nan.wav", speech, sr, format="WAV", subtype="FLOAT")
    cats["nan.wav"] = "nonfinite"

    # zero-length but valid files.
    sf.write(dirpath / "zero.wav", np.zeros((0, 1), np.float32), sr, format="WAV", subtype="PCM_16")
    cats["zero.wav"] = "zero_length"
    # libsndfile writes a 0-byte file for a 0-frame FLAC, so use PyAV's flac muxer, which
    # writes fLaC + STREAMINFO (total_samples = 0) + padding and no audio frames.
    _write_zero_flac(dirpath / "zero.flac", sr)
    cats["zero.flac"] = "zero_length"

    # weird_codec.wav: unknown format tag 0x7A7A, plausible fields, random data.
    rng = np.random.default_rng(205)
    payload = rng.integers(0, 256, size=2 * sr * 2, dtype=np.uint8).tobytes()
    header = _wav_header(
        format_tag=0x7A7A, channels=1, sample_rate=sr, bits=16, data_bytes=len(payload)
    )
    (dirpath / "weird_codec.wav").write_bytes(header + payload)
    cats["weird_codec.wav"] = "unsupported_codec"
    return cats


def _write_zero_flac(path: Path, sample_rate: int) -> None:
    """A structurally valid FLAC with 0 samples (STREAMINFO only, via PyAV)."""
    with av.open(str(path), mode="w", format="flac") as out:
        stream: Any = out.add_stream("flac", rate=sample_rate)
        stream.codec_context.layout = "mono"
        stream.codec_context.format = "s16"
        out.mux(stream.encode(None))


def make_unreadable(dirpath: Path) -> Path:
    """Create ``dirpath/unreadable.wav`` that cannot be opened for reading; return it.

    Tests run as root, where ``chmod 000`` does not stop reads, so the path is instead a
    *dangling symlink* to a file that does not exist: it appears in ``os.listdir``/
    ``Path.iterdir``/``glob`` and ``Path.is_symlink()`` is True, but ``Path.exists()`` is
    False, ``stat()``/``open()`` raise ``FileNotFoundError`` and ``av.open`` raises
    ``av.error.FileNotFoundError`` (errno 2, also a builtin ``FileNotFoundError``).
    For a non-root user the permission-based variant also applies
    (``os.chmod(path, 0)`` -> ``PermissionError``), but it is not used here.
    """
    dirpath = Path(dirpath)
    dirpath.mkdir(parents=True, exist_ok=True)
    link = dirpath / "unreadable.wav"
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(dirpath / ".missing" / "gone.wav")
    return link


# --------------------------------------------------------------------------------------
# Long files and duplicates
# --------------------------------------------------------------------------------------


def write_long_flac(path: Path, seconds: float, sample_rate: int = 16000) -> None:
    """Write ``seconds`` of mono 16-bit FLAC speech, streamed in blocks (bounded memory).

    A 60 s speech tile is generated once and written repeatedly, each repetition with a
    slightly different gain, so memory stays at a few MB regardless of ``seconds``.
    The file has exactly ``round(seconds * sample_rate)`` frames.
    """
    total = round(seconds * sample_rate)
    tile = load_speech(min(60.0, max(seconds, 1.0)), sample_rate, seed=301)
    rng = np.random.default_rng(302)
    written = 0
    with sf.SoundFile(
        path, mode="w", samplerate=sample_rate, channels=1, format="FLAC", subtype="PCM_16"
    ) as f:
        while written < total:
            n = min(tile.size, total - written)
            f.write(tile[:n] * np.float32(rng.uniform(0.8, 1.0)))
            written += n


def write_duplicate(src: Path, dst: Path) -> Path:
    """Byte-identical copy of ``src`` at ``dst`` (for dedup tests); returns ``dst``."""
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    return Path(dst)


# --------------------------------------------------------------------------------------
# Self-check
# --------------------------------------------------------------------------------------


def _probe(path: Path) -> dict[str, Any]:
    """Open ``path`` with PyAV and decode its first audio stream; report what happened."""
    info: dict[str, Any] = {"path": str(path)}
    try:
        container = av.open(str(path))
    except Exception as exc:  # noqa: BLE001 - we want to record whatever happens
        info["open_error"] = f"{type(exc).__module__}.{type(exc).__name__}: {exc}"
        return info
    with container:
        info["container_duration"] = container.duration
        info["format"] = container.format.name
        if not container.streams.audio:
            info["audio_streams"] = 0
            return info
        stream = container.streams.audio[0]
        ctx = stream.codec_context  # None when FFmpeg has no decoder for the codec
        info["codec"] = ctx.name if ctx is not None else None
        info["stream_duration"] = stream.duration
        info["time_base"] = stream.time_base
        info["stream_frames"] = stream.frames
        info["sample_rate"] = ctx.sample_rate if ctx is not None else None
        info["channels"] = ctx.channels if ctx is not None else None
        info["video_streams"] = len(container.streams.video)
        samples = 0
        nonfinite = 0
        rate = None
        try:
            for frame in container.decode(stream):
                samples += frame.samples
                rate = frame.sample_rate
                arr = frame.to_ndarray()
                if arr.dtype.kind == "f":
                    nonfinite += int(np.count_nonzero(~np.isfinite(arr)))
        except Exception as exc:  # noqa: BLE001
            info["decode_error"] = f"{type(exc).__module__}.{type(exc).__name__}: {exc}"
        info["decoded_samples"] = samples
        info["decoded_rate"] = rate
        info["decoded_seconds"] = samples / rate if rate else 0.0
        info["nonfinite"] = nonfinite
    return info


def _selfcheck() -> None:
    """Write every fixture into a temp dir and verify it with PyAV (run manually)."""
    import tempfile
    import time

    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        good = write_good_files(d / "good")
        for name, meta in good.items():
            info = _probe(d / "good" / name)
            print(name, info)
            assert "open_error" not in info and "decode_error" not in info, info
            assert info["decoded_rate"] == meta["sample_rate"], (name, info)
            assert info["channels"] == meta["channels"], (name, info)
            assert abs(info["decoded_seconds"] - meta["duration"]) < 0.1 * meta["duration"]
            assert (info["video_streams"] > 0) == meta["has_video"], (name, info)
        hashes = {(d / "good" / n).read_bytes() for n in good}
        assert len(hashes) == len(good)

        bad = write_bad_files(d / "bad")
        for name, cat in bad.items():
            print(name, cat, _probe(d / "bad" / name))
        print("unreadable.wav", _probe(make_unreadable(d / "bad")))

        dup = write_duplicate(d / "good" / "speech.flac", d / "dup" / "copy.flac")
        assert dup.read_bytes() == (d / "good" / "speech.flac").read_bytes()

        t0 = time.perf_counter()
        write_long_flac(d / "long.flac", 600.0)
        dt = time.perf_counter() - t0
        i = sf.info(str(d / "long.flac"))
        print(f"long.flac 600 s: {dt:.2f} s to write, {os.path.getsize(d / 'long.flac')} bytes")
        assert i.frames == 600 * 16000
    print("selfcheck OK")


if __name__ == "__main__":
    _selfcheck()
