"""pipeline/audio.py: many channels, absurd headers, bounded reads, seeks (issue 21).

Decodes that once segfaulted (PyAV's ``to_ndarray`` on planar frames with >= 8 channels)
run in a child process, so a regression is a failed test, not a dead pytest.
"""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf

from speechmill.pipeline import audio
from speechmill.pipeline.audio import AudioError, DecodeStats, decode, load_audio, probe
from tests.conftest import EXPECTED_REASON

_CHILD = r"""
import json, resource, sys

def _peak_mb():  # this process's own peak (ru_maxrss keeps the parent's across exec)
    with open("/proc/self/status") as f:
        return [int(x.split()[1]) for x in f if x.startswith("VmHWM:")][0] / 1024
import numpy as np
from speechmill.pipeline.audio import AudioError, decode
path, out = sys.argv[1], sys.argv[2]
try:
    info, chunks = decode(path, chunk_seconds=0.1)
    x = np.concatenate([c for c in chunks] or [np.zeros(0, np.float32)])
    np.save(out, x)
    r = {"backend": info.backend, "channels": info.channels, "rate": info.sample_rate,
         "dtype": str(x.dtype), "ndim": x.ndim}
except AudioError as e:
    r = {"reason": e.reason}
r["maxrss_mb"] = _peak_mb()
print(json.dumps(r))
"""


def decode_in_child(path: Path, tmp_path: Path) -> tuple[dict, np.ndarray | None]:
    out = tmp_path / "decoded.npy"
    r = subprocess.run([sys.executable, "-c", _CHILD, str(path), str(out)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"decode crashed: exit {r.returncode}\n{r.stderr[-2000:]}"
    res = json.loads(r.stdout.strip().splitlines()[-1])
    return res, (np.load(out) if "reason" not in res else None)


@pytest.mark.parametrize("channels,subtype", [
    (8, "PCM_16"), (9, "PCM_24"), (16, "FLOAT"), (64, "PCM_U8"), (65, "PCM_16"),
    (300, "PCM_16"),
])
def test_many_channel_wav_is_the_channel_mean(tmp_path: Path, channels: int,
                                              subtype: str) -> None:
    x = np.random.default_rng(channels).uniform(-0.5, 0.5, (4000, channels))
    p = tmp_path / "many.wav"
    sf.write(p, x.astype(np.float32), 16000, subtype=subtype)
    res, y = decode_in_child(p, tmp_path)
    assert res["channels"] == channels and res["rate"] == 16000, res
    assert res["dtype"] == "float32" and res["ndim"] == 1
    # > 64 channels is more than FFmpeg's converter takes: soundfile reads those
    assert res["backend"] == ("pyav" if channels <= 64 else "soundfile")
    want = sf.read(p, dtype="float64", always_2d=True)[0].mean(axis=1)
    assert y is not None and y.shape == want.shape
    np.testing.assert_allclose(y, want, atol=2 / 128 if subtype == "PCM_U8" else 2e-4)


def test_planar_decoder_output_with_8_channels(tmp_path: Path) -> None:
    """Opus decodes to planar float: 8 planes went straight to to_ndarray before."""
    p = tmp_path / "eight.opus"
    rate, n = 48000, 48000
    x = (np.random.default_rng(0).standard_normal((n, 8)) * 0.1).astype(np.float32)
    with av.open(str(p), "w") as c:
        st = c.add_stream("libopus", rate=rate)
        st.layout = "7.1"
        st.format = "flt"
        fs = st.codec_context.frame_size or 960
        for i in range(0, n, fs):
            fr = av.AudioFrame.from_ndarray(
                np.ascontiguousarray(x[i: i + fs]).reshape(1, -1), format="flt",
                layout="7.1")
            fr.sample_rate = rate
            for pkt in st.encode(fr):
                c.mux(pkt)
        for pkt in st.encode(None):
            c.mux(pkt)
    with av.open(str(p)) as c:
        assert c.streams.audio[0].codec_context.format.is_planar
    res, y = decode_in_child(p, tmp_path)
    assert res["channels"] == 8 and res["backend"] == "pyav", res
    assert y is not None and abs(y.shape[0] - n) < 2 * 960


def _wav(channels: int = 1, rate: int = 16000, bits: int = 16, data_size: int | None = None,
         payload: bytes = b"\x00" * 3200) -> bytes:
    align = (channels * bits // 8) & 0xFFFF
    fmt = struct.pack("<HHIIHH", 1, channels, rate, (rate * align) & 0xFFFFFFFF, align, bits)
    size = len(payload) if data_size is None else data_size
    body = b"fmt " + struct.pack("<I", 16) + fmt + b"data" + struct.pack("<I", size) + payload
    return b"RIFF" + struct.pack("<I", 4 + len(body)) + b"WAVE" + body


@pytest.mark.parametrize("name,data,reasons", [
    ("rate0", _wav(rate=0), {"not_audio"}),
    ("rate1", _wav(rate=1), {"unsupported_sample_rate"}),
    ("rate2e31", _wav(rate=2**31 - 1), {"unsupported_sample_rate"}),
    ("rate2e32", _wav(rate=2**32 - 1), {"not_audio", "unsupported_sample_rate"}),
    ("ch0", _wav(channels=0), {"not_audio"}),
    ("ch65535", _wav(channels=65535), {"not_audio", "unsupported_channels"}),
    # a claimed 10-hour 64-channel float file that is really 1 KB
    ("10h", _wav(channels=64, rate=48000, bits=32, data_size=0xFFFFFFF0,
                 payload=b"\x00" * 1024), {"truncated"}),
])
def test_absurd_headers_are_rejected(tmp_path: Path, name: str, data: bytes,
                                     reasons: set[str]) -> None:
    p = tmp_path / f"{name}.wav"
    p.write_bytes(data)
    with pytest.raises(AudioError) as e:
        probe(str(p))
    assert e.value.reason in reasons, e.value
    res, _ = decode_in_child(p, tmp_path)
    assert res["maxrss_mb"] < 512, res  # nothing sized from the header's claims
    if "reason" in res:
        assert res["reason"] in reasons | {"not_audio"}, res


def test_soundfile_reads_are_bounded_by_samples(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    p = tmp_path / "wide.wav"
    x = np.random.default_rng(1).uniform(-0.5, 0.5, (3000, 32)).astype(np.float32)
    sf.write(p, x, 16000, subtype="FLOAT")

    def no_pyav(src: object) -> None:
        raise AudioError("not_audio", "forced")

    monkeypatch.setattr(audio, "_av_open", no_pyav)
    monkeypatch.setattr(audio, "_SF_MAX_BLOCK", 32 * 500)
    info, chunks = decode(str(p), chunk_seconds=600.0)
    parts = list(chunks)
    assert info.backend == "soundfile"
    assert max(c.shape[0] for c in parts) <= 500
    np.testing.assert_allclose(np.concatenate(parts), x.mean(axis=1), atol=1e-6)


@pytest.mark.parametrize("channels", [1, 8])
def test_seek_in_a_short_flac(tmp_path: Path, channels: int) -> None:
    """A short FLAC has no seek table; the failed seek must not lose the stream."""
    p = tmp_path / "short.flac"
    x = np.random.default_rng(2).uniform(-0.5, 0.5, (4000, channels)).astype(np.float32)
    sf.write(p, x, 16000, subtype="PCM_16")
    want = sf.read(p, dtype="float32", always_2d=True)[0].mean(axis=1)
    y, sr = load_audio(str(p), offset=1333 / 16000, duration=1000 / 16000)
    assert sr == 16000 and y.shape == (1000,)
    np.testing.assert_allclose(y, want[1333:2333], atol=1e-6)


def test_soundfile_seek_failure_is_no_exception(tmp_path: Path) -> None:
    """Found by the fuzz target: a FLAC cut after STREAMINFO; libsndfile's seek raised."""
    buf = io.BytesIO()
    sf.write(buf, np.zeros((81, 1), np.float32), 8000, format="FLAC", subtype="PCM_16")
    p = tmp_path / "cut.flac"
    p.write_bytes(buf.getvalue()[:42])
    try:
        y, _ = load_audio(str(p), offset=0.01, duration=0.02)
    except AudioError:
        return
    assert y.shape[0] == 0


def test_streaminfo_rate_contradicting_the_frames(tmp_path: Path) -> None:
    """STREAMINFO's total counts samples even when its rate disagrees with the frames'."""
    buf = io.BytesIO()
    sf.write(buf, np.zeros((8000, 1), np.float32) + 0.1, 8000, format="FLAC",
             subtype="PCM_16")
    b = bytearray(buf.getvalue())
    packed = int.from_bytes(b[18:26], "big")
    packed = (packed & ~(0xFFFFF << 44)) | (44100 << 44)
    b[18:26] = packed.to_bytes(8, "big")
    p = tmp_path / "liar.flac"
    p.write_bytes(bytes(b))
    info = probe(str(p))
    assert info.sample_rate == 8000
    assert info.duration == pytest.approx(1.0)


def _reason(path: Path) -> str | None:
    """What ingest + standardize make of ``path`` (None: kept)."""
    try:
        info = probe(str(path))
        if info.duration is not None and info.duration <= 0:
            return "zero_length"
        stats = DecodeStats()
        info, chunks = decode(str(path), stats=stats)
        n = 0
        with_nonfinite = False
        try:
            for c in chunks:
                with_nonfinite |= not np.isfinite(c).all()
                n += c.shape[0]
        finally:
            chunks.close()
    except AudioError as e:
        return e.reason
    if with_nonfinite:
        return "nonfinite_samples"
    if n == 0:
        return "corrupt" if stats.decode_errors else "zero_length"
    trust = info.exact_duration or stats.decode_errors > 0
    if trust and info.duration and n / info.sample_rate < info.duration * 0.98 - 0.25:
        return "truncated"
    return None


def test_factory_inputs_keep_their_outcomes(media_dir) -> None:
    d, good, bad = media_dir
    for name, meta in good.items():
        assert _reason(d / "good" / name) is None, name
        info = probe(str(d / "good" / name))
        assert info.channels == meta.get("channels", info.channels), name
    for name, cat in bad.items():
        if cat in ("empty_file", "unreadable"):  # ingest's own checks, before any decode
            continue
        assert _reason(d / "bad" / name) in EXPECTED_REASON[cat], name
