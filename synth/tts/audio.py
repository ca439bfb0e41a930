"""Audio in and out of TTS backends: voice prompts, WAV bytes, server responses."""

from __future__ import annotations

import io
import struct

import numpy as np

from speechmill.synth.tts.base import TTSError, VoicePrompt


def load_prompt(voice: VoicePrompt, sample_rate: int | None = None,
                max_seconds: float | None = None, min_seconds: float = 0.3,
                ) -> tuple[np.ndarray, int]:
    """The prompt clip (``offset``/``duration`` of ``audio_path``) as mono float32, at
    ``sample_rate`` when given. A missing, unreadable, silent or out-of-bounds clip is a
    :class:`TTSError` (the turn is rejected, the run goes on)."""
    from speechmill.pipeline.audio import AudioError, load_audio

    try:
        x, sr = load_audio(voice.audio_path, offset=voice.offset, duration=voice.duration,
                           sample_rate=sample_rate)
    except (AudioError, OSError, ValueError) as e:
        raise TTSError(f"voice {voice.voice_id!r}: cannot read prompt audio "
                       f"{voice.audio_path!r}: {e}") from None
    dur = x.shape[0] / sr if sr else 0.0
    if dur < min_seconds or not np.any(np.abs(x) > 1e-4):
        raise TTSError(f"voice {voice.voice_id!r}: prompt audio is empty or silent "
                       f"({dur:.2f} s)")
    if max_seconds is not None and dur > max_seconds + 0.05:
        raise TTSError(f"voice {voice.voice_id!r}: prompt is {dur:.1f} s, this backend "
                       f"takes at most {max_seconds:g} s")
    return x.astype(np.float32, copy=False), int(sr)


def wav_bytes(audio: np.ndarray, sample_rate: int) -> bytes:
    """16-bit PCM WAV of mono float audio."""
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, np.clip(np.asarray(audio, np.float32), -1.0, 1.0), sample_rate,
             format="WAV", subtype="PCM_16")
    return buf.getvalue()


def _parse_wav_lenient(data: bytes) -> tuple[np.ndarray, int]:
    """WAV whose RIFF/data sizes are placeholders (0 or 0xFFFFFFFF), as streaming
    servers write them: read the fmt chunk and take the data chunk to the end."""
    if data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise ValueError("not a WAV file")
    pos, fmt = 12, None
    while pos + 8 <= len(data):
        cid, size = data[pos : pos + 4], struct.unpack("<I", data[pos + 4 : pos + 8])[0]
        body = pos + 8
        if cid == b"fmt ":
            fmt = struct.unpack("<HHIIHH", data[body : body + 16])
        elif cid == b"data":
            if fmt is None:
                raise ValueError("WAV data before fmt")
            end = len(data) if size in (0, 0xFFFFFFFF) or body + size > len(data) \
                else body + size
            tag, ch, sr, _, _, bits = fmt
            raw = data[body:end]
            if tag == 3 and bits == 32:
                x = np.frombuffer(raw[: len(raw) // 4 * 4], "<f4").astype(np.float32)
            elif bits == 16:
                x = np.frombuffer(raw[: len(raw) // 2 * 2], "<i2").astype(np.float32) / 32768
            elif bits == 32:
                x = np.frombuffer(raw[: len(raw) // 4 * 4], "<i4").astype(np.float32) / 2**31
            else:
                raise ValueError(f"unsupported WAV sample format (tag {tag}, {bits} bit)")
            x = x[: x.shape[0] // ch * ch].reshape(-1, ch).mean(axis=1)
            return x.astype(np.float32), int(sr)
        pos = body + size + (size & 1)
    raise ValueError("WAV without a data chunk")


def decode_audio(data: bytes, fmt: str, pcm_sample_rate: int | None = None,
                 ) -> tuple[np.ndarray, int]:
    """Mono float32 audio from a response body: ``wav``/``flac`` (any file soundfile
    reads; WAV with streaming placeholder sizes too), ``pcm`` (raw int16 little-endian at
    ``pcm_sample_rate``), or anything else FFmpeg decodes (``mp3``, ``opus``...)."""
    if not data:
        raise TTSError("the server returned no audio (empty body)")
    if fmt == "pcm":
        if not pcm_sample_rate:
            raise TTSError("pcm response without a sample rate")
        x = np.frombuffer(data[: len(data) // 2 * 2], "<i2").astype(np.float32) / 32768
        return x, int(pcm_sample_rate)
    import soundfile as sf

    try:
        x, sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
        return x.mean(axis=1).astype(np.float32), int(sr)
    except Exception:
        pass
    if data[:4] == b"RIFF":
        try:
            return _parse_wav_lenient(data)
        except ValueError as e:
            raise TTSError(f"unreadable WAV response: {e}") from None
    try:
        import av

        with av.open(io.BytesIO(data)) as c:
            st = c.streams.audio[0]
            sr = st.codec_context.sample_rate
            rs = av.AudioResampler(format="fltp", layout="mono", rate=sr)
            parts = [o.to_ndarray()[0] for f in c.decode(st) for o in rs.resample(f)]
            parts += [o.to_ndarray()[0] for o in rs.resample(None)]
        if not parts:
            raise ValueError("no audio frames")
        return np.concatenate(parts).astype(np.float32), int(sr)
    except Exception as e:
        head = data[:80].decode("utf-8", "replace")
        raise TTSError(f"response is not {fmt} audio ({type(e).__name__}); starts with "
                       f"{head!r}") from None


def resample(x: np.ndarray, sr: int, to: int) -> np.ndarray:
    if sr == to or x.shape[0] == 0:
        return np.asarray(x, np.float32)
    import soxr

    return soxr.resample(np.asarray(x, np.float32), sr, to).astype(np.float32)
