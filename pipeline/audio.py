"""The one way speechmill reads audio: probe and stream-decode with PyAV, soundfile fallback.

Inputs are local paths or fsspec URLs. Decoding is streamed in chunks of mono float32
samples so memory stays bounded whatever the duration; resampling is streamed with
soxr. Problems are raised as :class:`AudioError` with a short reason code that stages
turn into reject rows.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import IO, Any

import numpy as np

#: extensions of files that hold audio (alone or as a video's track)
MEDIA_EXTENSIONS: tuple[str, ...] = (
    ".wav", ".flac", ".mp3", ".ogg", ".oga", ".opus", ".m4a", ".aac", ".mp4", ".m4v",
    ".mkv", ".webm", ".mov", ".avi", ".wma", ".aiff", ".aif", ".au", ".caf", ".amr", ".3gp",
)


#: more channels than this is no recording (libsndfile's own limit): ``unsupported_channels``
MAX_CHANNELS = 1024
#: a sample rate outside this range is a broken header, not audio: ``unsupported_sample_rate``
MIN_SAMPLE_RATE = 1000
MAX_SAMPLE_RATE = 1_536_000
#: samples (all channels) read per soundfile call, whatever the rate and channel count
_SF_MAX_BLOCK = 1 << 22
#: libswresample's SWR_CH_MAX: FFmpeg's converter takes no more channels than this, so
#: wider files are read with soundfile (WAV, FLAC, AIFF, CAF, ...) or rejected
_SWR_MAX_CHANNELS = 64


class AudioError(Exception):
    """A per-file problem; ``reason`` is the reject code."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass
class AudioInfo:
    container: str
    codec: str
    duration: float | None  # seconds, as the container/stream header declares
    sample_rate: int
    channels: int
    bit_rate: int | None = None
    has_video: bool = False
    backend: str = "pyav"
    #: the header states the length exactly (PCM, FLAC, ...); for mp3/aac without an
    #: index FFmpeg only estimates it from the bit rate
    exact_duration: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def is_url(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def local_path(path: str) -> str:
    return path[len("file://") :] if path.startswith("file://") else path


@contextlib.contextmanager
def open_binary(path: str, storage_options: dict[str, Any] | None = None
                ) -> Iterator[IO[bytes] | str]:
    """Yield a local path (str) or, for remote URLs, a seekable binary file from fsspec."""
    if not is_url(path):
        p = local_path(path)
        if not os.path.exists(p):
            raise AudioError("unreadable", f"no such file: {p}")
        if not os.path.isfile(p):
            raise AudioError("unreadable", f"not a regular file: {p}")
        if not os.access(p, os.R_OK):
            raise AudioError("unreadable", f"permission denied: {p}")
        yield p
        return
    import fsspec

    try:
        f = fsspec.open(path, "rb", **(storage_options or {})).open()
    except FileNotFoundError as e:
        raise AudioError("unreadable", f"not found: {path} ({e})") from None
    except OSError as e:
        raise AudioError("unreadable", f"{type(e).__name__}: {e}") from None
    try:
        yield f
    finally:
        f.close()


def _av_open(src: IO[bytes] | str) -> Any:
    import av

    try:
        return av.open(src, mode="r", metadata_errors="ignore")
    except av.error.FileNotFoundError as e:
        raise AudioError("unreadable", str(e)) from None
    except av.error.PermissionError as e:
        raise AudioError("unreadable", str(e)) from None
    except (av.error.InvalidDataError, av.error.EOFError) as e:
        raise AudioError("not_audio", f"not a decodable media file ({e})") from None
    except av.error.FFmpegError as e:
        raise AudioError("not_audio", f"{type(e).__name__}: {e}") from None


def _stream_info(container: Any) -> AudioInfo:
    audio = container.streams.audio
    if not audio:
        raise AudioError("no_audio_stream", f"container {container.format.name!r} has no audio")
    st = audio[0]
    cc = st.codec_context
    if cc is None or getattr(cc, "codec", None) is None:
        raise AudioError("unsupported_codec", "no decoder for the audio codec")
    codec = getattr(cc, "name", None) or "unknown"
    rate = int(cc.sample_rate or 0)
    exact = codec.startswith("pcm_") or codec in ("flac", "alac", "wavpack")
    dur = None
    if st.duration is not None and st.time_base is not None:
        tb = st.time_base
        if (container.format.name == "flac" and tb.numerator == 1 and rate > 0
                and tb.denominator != rate):
            # STREAMINFO's rate contradicts the frames': its total still counts samples
            dur = st.duration / rate
        else:
            dur = float(st.duration * tb)
    elif container.duration is not None:
        dur = container.duration / 1_000_000
        exact = False  # FFmpeg's estimate (from the bit rate), not a header's count
    layout = getattr(cc, "layout", None)
    channels = int(getattr(layout, "nb_channels", 0) or getattr(cc, "channels", 0) or 0)
    if rate <= 0 or channels <= 0:
        raise AudioError("not_audio", f"audio stream without rate/channels ({codec})")
    return _checked(AudioInfo(
        container=container.format.name,
        codec=codec,
        duration=dur,
        sample_rate=rate,
        channels=channels,
        bit_rate=int(container.bit_rate) if container.bit_rate else None,
        has_video=bool(container.streams.video),
        exact_duration=exact,
    ))


def _checked(info: AudioInfo) -> AudioInfo:
    """``info`` when its rate and channel count are something we can decode and use."""
    if not MIN_SAMPLE_RATE <= info.sample_rate <= MAX_SAMPLE_RATE:
        raise AudioError("unsupported_sample_rate",
                         f"{info.sample_rate} Hz ({info.container}/{info.codec})")
    if not 1 <= info.channels <= MAX_CHANNELS:
        raise AudioError("unsupported_channels",
                         f"{info.channels} channels ({info.container}/{info.codec})")
    if info.duration is not None and not (math.isfinite(info.duration)
                                          and info.duration >= 0):
        info.duration = None
    return info


def check_wav_header(path: str) -> None:
    """Raise ``truncated`` when a local RIFF/WAVE file holds fewer data bytes than declared.

    FFmpeg silently caps a WAV's declared size at the file size, so this is the only
    place a cut-off WAV is visible.
    """
    import struct

    p = local_path(path)
    try:
        size = os.path.getsize(p)
        with open(p, "rb") as f:
            head = f.read(12)
            if len(head) < 12 or head[:4] not in (b"RIFF", b"RF64") or head[8:12] != b"WAVE":
                return
            pos = 12
            while pos + 8 <= size:
                f.seek(pos)
                hdr = f.read(8)
                if len(hdr) < 8:
                    return
                cid, clen = hdr[:4], struct.unpack("<I", hdr[4:])[0]
                if cid == b"data":
                    if clen in (0, 0xFFFFFFFF) or head[:4] == b"RF64":
                        return  # streaming/unknown sizes are not a promise
                    have = size - (pos + 8)
                    if have < clen:
                        raise AudioError(
                            "truncated",
                            f"WAV data chunk declares {clen} bytes, file holds {have}",
                        )
                    return
                pos += 8 + clen + (clen & 1)
    except OSError:
        return


def probe(path: str, storage_options: dict[str, Any] | None = None) -> AudioInfo:
    """Container, codec, declared duration, rate and channels; raises AudioError."""
    with open_binary(path, storage_options) as src:
        try:
            with _av_open(src) as container:
                info = _stream_info(container)
        except AudioError as e:
            if e.reason != "not_audio":
                raise
            info = _sf_probe(src)  # PyAV cannot open it or finds no rate/channels
            if info is None:
                raise
            return info
        if info.channels > _SWR_MAX_CHANNELS:
            info = _wide_sf_probe(src, info)
    if not is_url(path) and info.container == "wav":
        check_wav_header(path)
    return info


def _wide_sf_probe(src: IO[bytes] | str, info: AudioInfo) -> AudioInfo:
    """soundfile's info for a file with more channels than FFmpeg's converter takes."""
    wide = _sf_probe(src)
    if wide is None:
        raise AudioError("unsupported_channels",
                         f"{info.channels} channels of {info.container}/{info.codec} "
                         f"(FFmpeg converts at most {_SWR_MAX_CHANNELS})")
    return wide


_TEXT_MAGIC = (b"<!doctype", b"<html", b"<?xml", b"{", b"[", b"<head", b"<body")


def looks_like_text(src: IO[bytes] | str) -> bool:
    """True for HTML/XML/JSON/plain-text content (an error page saved as .mp3)."""
    try:
        if isinstance(src, str):
            with open(src, "rb") as f:
                head = f.read(512)
        else:
            src.seek(0)
            head = src.read(512)
            src.seek(0)
    except OSError:
        return False
    h = head.lstrip().lower()
    if h.startswith(_TEXT_MAGIC):
        return True
    printable = sum(32 <= b < 127 or b in (9, 10, 13) for b in head)
    return bool(head) and printable / len(head) > 0.97 and not head.startswith((b"ID3", b"RIFF"))


def _sf_probe(src: IO[bytes] | str) -> AudioInfo | None:
    import soundfile as sf

    if looks_like_text(src):
        return None

    try:
        if not isinstance(src, str):
            src.seek(0)
        with sf.SoundFile(src) as f:
            info = AudioInfo(
                container=f.format.lower(), codec=f.subtype.lower(),
                duration=f.frames / f.samplerate if f.samplerate > 0 else None,
                sample_rate=f.samplerate, channels=f.channels, backend="soundfile",
                exact_duration=True,
            )
    except Exception:
        return None
    return _checked(info)


@dataclass
class DecodeStats:
    samples: int = 0
    decode_errors: int = 0
    last_error: str = ""


class Chunks:
    """Iterator of decoded chunks that always releases its file, even if never started."""

    def __init__(self, gen: Iterator[np.ndarray], closers: list[Any]) -> None:
        self._gen = gen
        self._closers = closers

    def __iter__(self) -> Chunks:
        return self

    def __next__(self) -> np.ndarray:
        return next(self._gen)

    def close(self) -> None:
        self._gen.close()  # type: ignore[attr-defined]
        closers, self._closers = self._closers, []
        for c in closers:
            with contextlib.suppress(Exception):
                c()


def decode(path: str, chunk_seconds: float = 30.0, stats: DecodeStats | None = None,
           storage_options: dict[str, Any] | None = None,
           start: float = 0.0) -> tuple[AudioInfo, Chunks]:
    """Probe ``path`` and return (info, iterator of mono float32 chunks at the native rate).

    Chunks are about ``chunk_seconds`` long. Multichannel audio is averaged to mono.
    Corrupt packets are skipped and counted in ``stats`` (a truncated or damaged file
    then decodes to fewer samples than its header declares: callers compare). Call
    ``close()`` on the iterator when stopping early. ``start`` (seconds) seeks first:
    the first chunk begins exactly there.
    """
    stats = stats if stats is not None else DecodeStats()
    cm = open_binary(path, storage_options)
    src = cm.__enter__()
    done = [False]

    def release() -> None:
        if not done[0]:
            done[0] = True
            cm.__exit__(None, None, None)

    try:
        try:
            with contextlib.ExitStack() as closing:  # the container, unless handed on
                container = _av_open(src)
                closing.callback(container.close)
                info = _stream_info(container)
                if info.channels <= _SWR_MAX_CHANNELS:
                    closing.pop_all()
                    return info, Chunks(_av_chunks(container, release, info, chunk_seconds,
                                                   stats, start, src),
                                        [container.close, release])
            info = _wide_sf_probe(src, info)  # too wide for FFmpeg's converter
        except AudioError as e:
            if e.reason != "not_audio":
                raise
            # PyAV cannot open it or finds no rate/channels: soundfile may
            sf_info = _sf_probe(src)
            if sf_info is None:
                raise
            info = sf_info
    except BaseException:
        release()
        raise
    return info, Chunks(_sf_chunks(src, release, info, chunk_seconds, stats, start),
                        [release])


# codecs whose seeks land on exact timestamps; others (mp3, aac: bit-rate estimates,
# encoder delay) are decoded from the start and the samples before `start` dropped
_EXACT_SEEK = {"flac", "vorbis", "opus", "alac", "wavpack"}


class _Downmix:
    """Decoded PyAV frames -> mono float32 at ``rate``, by way of FFmpeg's converter to
    *packed* float (``flt``).

    PyAV's ``AudioFrame.planes`` (used by ``to_ndarray``) counts planes by walking
    ``frame->extended_data`` until it meets a NULL pointer. That array has exactly one
    pointer per channel for planar audio (the frame's 8 ``data`` slots for <= 8
    channels), so with 8 or more planar channels there is no NULL at the end: the walk
    reads past the array and ``to_ndarray`` dereferences garbage -> SIGSEGV (issue 21;
    PyAV 18.1). A packed frame has one plane and ``data[1]`` is NULL, so packed ``flt``
    is the only layout ever read here; the channel count is checked before a frame is
    handed to the converter (which takes at most 64, see ``_SWR_MAX_CHANNELS``). The
    converter is rebuilt when the stream's format/layout/rate changes mid-stream.
    """

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self._rs: Any = None
        self._key: tuple[Any, ...] | None = None

    def __call__(self, frame: Any) -> list[np.ndarray]:
        import av

        nch = int(frame.layout.nb_channels)
        key = (frame.format.name, nch, frame.layout.name, frame.sample_rate)
        out: list[np.ndarray] = []
        if key != self._key:
            out.extend(self.flush())
            if not 1 <= nch <= MAX_CHANNELS:
                raise AudioError("unsupported_channels", f"a frame with {nch} channels")
            if not MIN_SAMPLE_RATE <= frame.sample_rate <= MAX_SAMPLE_RATE:
                raise AudioError("unsupported_sample_rate",
                                 f"a frame at {frame.sample_rate} Hz")
            self._rs = av.AudioResampler(format="flt", rate=self.rate)
            self._key = key
        out.extend(_packed_mono(o) for o in self._rs.resample(frame))
        return out

    def flush(self) -> list[np.ndarray]:
        rs, self._rs, self._key = self._rs, None, None
        return [_packed_mono(o) for o in rs.resample(None)] if rs is not None else []


def _packed_mono(frame: Any) -> np.ndarray:
    nch = int(frame.layout.nb_channels)
    if frame.format.name != "flt" or not 1 <= nch <= MAX_CHANNELS:
        # never call to_ndarray on a layout it cannot walk safely (planar, >= 8 channels)
        raise AudioError("unsupported_channels",
                         f"cannot convert {nch} channels of {frame.format.name}")
    n = int(frame.samples)
    arr = frame.to_ndarray().reshape(-1)[: n * nch]
    if arr.shape[0] != n * nch:
        raise AudioError("corrupt", f"frame holds {arr.shape[0]} of {n * nch} samples")
    if nch == 1:
        return np.ascontiguousarray(arr, dtype=np.float32)
    return arr.reshape(n, nch).mean(axis=1, dtype=np.float32)


def _av_chunks(container: Any, release: Any, info: AudioInfo, chunk_seconds: float,
               stats: DecodeStats, start: float = 0.0,
               src: IO[bytes] | str | None = None) -> Iterator[np.ndarray]:
    import av

    target = max(1, int(chunk_seconds * (info.sample_rate or 16000)))
    buf: list[np.ndarray] = []
    have = 0
    downmix = _Downmix(info.sample_rate)
    skip: int | None = 0  # samples still to drop before `start`; None: not known yet
    try:
        stream = container.streams.audio[0]
        if start > 0:
            skip = int(round(start * info.sample_rate))
            if info.codec in _EXACT_SEEK or info.codec.startswith("pcm_"):
                try:
                    container.seek(int(start / stream.time_base), stream=stream,
                                   backward=True)
                    skip = None  # known from the first frame's timestamp
                except av.error.FFmpegError:  # unseekable: decode from the top and drop
                    # a failed seek can leave the demuxer at the end (a short FLAC
                    # without a seek table): start again from a fresh open
                    if src is not None:
                        container.close()
                        if not isinstance(src, str):
                            src.seek(0)
                        container = _av_open(src)
                        stream = container.streams.audio[0]
        for packet in container.demux(stream):
            try:
                frames = packet.decode()
            except av.error.FFmpegError as e:
                stats.decode_errors += 1
                stats.last_error = f"{type(e).__name__}: {e}"
                if stats.decode_errors > 100:
                    raise AudioError("corrupt", f"too many decode errors ({e})") from None
                continue
            for frame in frames:
                if skip is None:  # first frame after a seek: where did we land?
                    t = float(frame.pts * frame.time_base) if frame.pts is not None else 0.0
                    skip = max(int(round((start - t) * info.sample_rate)), 0)
                for mono in downmix(frame):
                    if skip:
                        drop = min(skip, mono.shape[0])
                        mono, skip = mono[drop:], skip - drop
                        if not mono.shape[0]:
                            continue
                    buf.append(np.ascontiguousarray(mono, dtype=np.float32))
                    have += mono.shape[0]
                    if have >= target:
                        chunk = np.concatenate(buf)
                        stats.samples += chunk.shape[0]
                        yield chunk
                        buf, have = [], 0
        for mono in downmix.flush():
            if skip:
                drop = min(skip, mono.shape[0])
                mono, skip = mono[drop:], skip - drop
            buf.append(mono)
        if buf:
            chunk = np.concatenate(buf)
            stats.samples += chunk.shape[0]
            yield chunk
    except av.error.FFmpegError as e:
        stats.decode_errors += 1
        stats.last_error = f"{type(e).__name__}: {e}"
    finally:
        container.close()
        release()


def _sf_chunks(src: Any, release: Any, info: AudioInfo, chunk_seconds: float,
               stats: DecodeStats, start: float = 0.0) -> Iterator[np.ndarray]:
    import soundfile as sf

    try:
        if not isinstance(src, str):
            src.seek(0)
        try:
            f = sf.SoundFile(src)
        except Exception as e:  # it opened when probed: changed or damaged since
            raise AudioError("corrupt", f"{type(e).__name__}: {e}") from None
        with f:
            # bounded by samples, not seconds: a header's rate/channels cannot make a
            # read allocate more than _SF_MAX_BLOCK floats
            block = max(1, min(int(chunk_seconds * info.sample_rate),
                               _SF_MAX_BLOCK // max(f.channels, 1)))
            if start > 0:
                try:
                    f.seek(min(int(round(start * info.sample_rate)), f.frames))
                except Exception as e:  # a damaged stream that cannot seek: nothing there
                    stats.decode_errors += 1
                    stats.last_error = f"{type(e).__name__}: {e}"
                    return
            while True:
                try:
                    data = f.read(block, dtype="float32", always_2d=True)
                except Exception as e:  # libsndfile reports damage as generic errors
                    stats.decode_errors += 1
                    stats.last_error = f"{type(e).__name__}: {e}"
                    break
                if data.shape[0] == 0:
                    break
                mono = data.mean(axis=1, dtype=np.float32) if data.shape[1] > 1 else data[:, 0]
                stats.samples += mono.shape[0]
                yield np.ascontiguousarray(mono)
    finally:
        release()


def decoded_duration(path: str, storage_options: dict[str, Any] | None = None) -> float:
    """Decode the whole file (streamed) and return its true duration in seconds."""
    info, chunks = decode(path, storage_options=storage_options)
    try:
        n = sum(c.shape[0] for c in chunks)
    finally:
        chunks.close()
    return n / info.sample_rate if info.sample_rate else 0.0


def load_audio(path: str, offset: float = 0.0, duration: float | None = None,
               sample_rate: int | None = None,
               storage_options: dict[str, Any] | None = None) -> tuple[np.ndarray, int]:
    """Mono float32 samples of ``path`` from ``offset`` for ``duration`` seconds (all when
    None), resampled to ``sample_rate`` when given. Seeks; never decodes the whole file
    for a segment. Raises :class:`AudioError`."""
    info, chunks = decode(path, chunk_seconds=10.0, storage_options=storage_options,
                          start=offset)
    sr = info.sample_rate
    want = None if duration is None else int(round(duration * sr))
    parts: list[np.ndarray] = []
    have = 0
    try:
        for c in chunks:
            if want is not None and have + c.shape[0] >= want:
                parts.append(c[: want - have])
                have = want
                break
            parts.append(c)
            have += c.shape[0]
    finally:
        chunks.close()
    x = np.concatenate(parts) if parts else np.zeros(0, np.float32)
    if sample_rate and sample_rate != sr and x.shape[0]:
        import soxr

        x = soxr.resample(x, sr, sample_rate).astype(np.float32)
        sr = sample_rate
    elif sample_rate:
        sr = sample_rate
    return x, sr


class AudioReader:
    """Samples ``[a, b)`` (mono float32 at ``sample_rate``, counted from ``offset``) of one
    stretch of a file, for code that walks a long recording piece by piece. Reads go
    through :func:`load_audio` (which seeks) and keep the last ``span_s`` seconds read,
    so walking forward in short pieces decodes each part of the file once and memory
    stays at one span however long the file is. ``n`` is the stretch's length in
    samples (from ``duration``); a read past the decoded end comes back short.
    Raises :class:`AudioError` as :func:`load_audio` does."""

    def __init__(self, path: str, offset: float, duration: float, sample_rate: int,
                 span_s: float = 60.0, storage_options: dict[str, Any] | None = None
                 ) -> None:
        self.path = path
        self.offset = float(offset)
        self.sample_rate = int(sample_rate)
        self.n = int(round(float(duration) * self.sample_rate))
        self.span = max(1, int(span_s * self.sample_rate))
        self.storage_options = storage_options
        self._buf = np.zeros(0, np.float32)
        self._at = 0
        #: samples decoded so far (each part of the file once when walked forward)
        self.decoded = 0

    def read(self, a: int, b: int) -> np.ndarray:
        a, b = max(0, int(a)), min(int(b), self.n)
        if b <= a:
            return np.zeros(0, np.float32)
        if not (self._at <= a and b <= self._at + self._buf.shape[0]):
            length = min(max(b - a, self.span), self.n - a)
            self._buf = np.zeros(0, np.float32)  # let the old span go before decoding
            self._buf, _ = load_audio(self.path, self.offset + a / self.sample_rate,
                                      length / self.sample_rate, self.sample_rate,
                                      self.storage_options)
            self._at = a
            self.decoded += self._buf.shape[0]
        return self._buf[a - self._at: b - self._at]


class StreamResampler:
    """Chunked soxr resampling of a mono stream; ``flush()`` returns the tail."""

    def __init__(self, in_rate: int, out_rate: int, quality: str = "HQ") -> None:
        self.in_rate = in_rate
        self.out_rate = out_rate
        self._rs = None
        if in_rate != out_rate:
            import soxr

            self._rs = soxr.ResampleStream(in_rate, out_rate, 1, dtype="float32",
                                           quality=quality)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if self._rs is None:
            return x
        return self._rs.resample_chunk(x, last=False)

    def flush(self) -> np.ndarray:
        if self._rs is None:
            return np.zeros(0, np.float32)
        return self._rs.resample_chunk(np.zeros(0, np.float32), last=True)
