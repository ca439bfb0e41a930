"""Fuzz target: ``speechmill.pipeline.audio`` never crashes, hangs or blows up on any input.

Inputs: random bytes (bare or behind a media magic), hand-built WAV (RIFF/RF64) headers
with absurd fields (sample rate 0/1/2**31, 0-65535 channels, odd bit depths and format
tags, data sizes larger than the file, random truncation), real FLAC files with a
mutated STREAMINFO / damaged frames / truncation, and valid WAV/FLAC files with 1-64
channels whose decode must equal the channel mean.

Every input is probed and decoded (like ingest and standardize do) in a persistent
worker subprocess, so a segfault in a native decoder is a test failure (the worker is
restarted) instead of killing pytest, and each example has a deadline (a hang is a
failure). The worker runs under an address-space limit and reports its peak RSS, so an
allocation sized from a lying header fails too.

Invariant: each input ends as decoded audio (1-D float32 chunks; finite, or a
``nonfinite_samples`` reject as standardize gives) or an :class:`AudioError` (the reject
reason stages write), never another exception, never a crash, never a hang.

Budget: the ``ci`` profile (tests/conftest.py) gives 200 examples, split over the four
targets; ``--hypothesis-profile=long`` runs 100x more.
"""

from __future__ import annotations

import io
import json
import os
import select
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
from hypothesis import example, given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[2]
#: seconds one example may take in the worker (a tiny file decodes in milliseconds)
DEADLINE_S = 20.0
#: the worker's peak RSS may not pass this (a header must not size an allocation)
MAX_RSS_MB = 1024
#: one budget (the profile's max_examples) shared by the four targets below
N_TARGETS = 4
BUDGET = settings(max_examples=max(1, settings.default.max_examples // N_TARGETS))

#: reasons pipeline/audio.py (and the standardize checks it feeds) may give bad input
BAD_AUDIO = {"not_audio", "no_audio_stream", "unsupported_codec", "zero_length",
             "truncated", "corrupt", "nonfinite_samples", "unsupported_channels",
             "unsupported_sample_rate", "unreadable"}

_WORKER = r"""
import json, resource, sys, traceback

def _peak_mb():  # this process's own peak (ru_maxrss keeps the parent's across exec)
    with open("/proc/self/status") as f:
        return [int(x.split()[1]) for x in f if x.startswith("VmHWM:")][0] / 1024
resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))
import numpy as np
from speechmill.pipeline.audio import AudioError, DecodeStats, decode, load_audio, probe

def outcome(fn):
    try:
        return "ok", fn()
    except AudioError as e:
        return "reject:" + e.reason, None
    except BaseException as e:
        return "exception:" + "".join(traceback.format_exception(e))[-3000:], None

def run_decode(path):
    stats = DecodeStats()
    info, chunks = decode(path, chunk_seconds=0.25, stats=stats)
    parts, n, bad = [], 0, None
    try:
        for c in chunks:
            if not isinstance(c, np.ndarray) or c.ndim != 1 or c.dtype != np.float32:
                bad = f"chunk {type(c).__name__} {getattr(c, 'shape', '')} " \
                      f"{getattr(c, 'dtype', '')}"
                break
            if not np.isfinite(c).all():
                raise AudioError("nonfinite_samples")
            n += c.shape[0]
            if len(parts) < 64:
                parts.append(c)
    finally:
        chunks.close()
    r = {"n": n, "rate": info.sample_rate, "channels": info.channels, "codec": info.codec,
         "duration": info.duration, "exact": info.exact_duration,
         "errors": stats.decode_errors, "bad_chunk": bad, "backend": info.backend}
    if n == 0:
        raise AudioError("corrupt" if stats.decode_errors else "zero_length")
    d = info.duration
    if info.exact_duration and d and n / info.sample_rate < d * 0.98 - 0.25:
        raise AudioError("truncated")  # as standardize decides
    return r, parts

print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    req = json.loads(line)
    p = req["path"]
    res = {}
    res["probe"], info = outcome(lambda: probe(p))
    res["decode"], got = outcome(lambda: run_decode(p))
    if got is not None:
        r, parts = got
        res.update(r)
        if req.get("save"):
            np.save(req["save"], np.concatenate(parts) if parts else np.zeros(0, np.float32))
    if req.get("seek"):
        a, d = req["seek"]
        res["seek"], x = outcome(lambda: load_audio(p, offset=a, duration=d)[0])
        if x is not None and req.get("save_seek"):
            np.save(req["save_seek"], x)
    res["maxrss_mb"] = _peak_mb()
    print(json.dumps(res), flush=True)
"""


class Worker:
    """A persistent decode subprocess; a crash or a hang is reported, then restarted."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[str] | None = None

    def _start(self) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _WORKER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, text=True, cwd=ROOT, env=env,
        )
        assert self._read(60.0) == {"ready": True}

    def _read(self, timeout: float) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdout is not None
        end = time.monotonic() + timeout
        while True:
            left = end - time.monotonic()
            if left <= 0:
                self.stop()
                raise AssertionError(f"decode hung (> {timeout:.0f} s)")
            ready, _, _ = select.select([self.proc.stdout], [], [], left)
            if ready:
                line = self.proc.stdout.readline()
                if line:
                    return json.loads(line)
                rc = self.proc.wait()
                self.proc = None
                sig = f" (signal {signal.Signals(-rc).name})" if rc < 0 else ""
                raise AssertionError(f"decode crashed the process: exit {rc}{sig}")

    def run(self, req: dict[str, Any]) -> dict[str, Any]:
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        return self._read(DEADLINE_S)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


@pytest.fixture(scope="module")
def worker() -> Any:
    w = Worker()
    yield w
    w.stop()


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz_audio")


def check(res: dict[str, Any], data: bytes) -> None:
    """The invariant every input must meet."""
    info = f"{res} ({len(data)} bytes, head {data[:48].hex()})"
    for key in ("probe", "decode", "seek"):
        out = res.get(key)
        if out is None or out == "ok":
            continue
        assert out.startswith("reject:"), f"{key}: {out}\n{info}"
        assert out[len("reject:"):] in BAD_AUDIO, f"{key}: unknown reason {out}\n{info}"
    assert res["maxrss_mb"] < MAX_RSS_MB, f"peak RSS {res['maxrss_mb']:.0f} MB\n{info}"
    if res["decode"] == "ok":
        assert res["bad_chunk"] is None, info
        assert res["channels"] >= 1 and res["rate"] >= 1000, info
        # decoded audio is consistent with the duration the header states exactly (a
        # FLAC's STREAMINFO total binds no decoder: its frames number themselves, so a
        # lying total may decode to more; less is the stage's `truncated`)
        if res["exact"] and res["duration"] and res["codec"] != "flac":
            assert res["n"] / res["rate"] <= res["duration"] * 1.02 + 0.25, info


def run_one(worker: Worker, scratch: Path, data: bytes, ext: str,
            seek: tuple[float, float] | None = (0.01, 0.02)) -> dict[str, Any]:
    path = scratch / f"input{ext}"
    path.write_bytes(data)
    res = worker.run({"path": str(path), "seek": seek})
    check(res, data)
    return res


# -- random bytes ------------------------------------------------------------------------

_MAGICS = [b"", b"RIFF", b"RIFF\x24\x00\x00\x00WAVEfmt ", b"RF64\xff\xff\xff\xffWAVEds64",
           b"fLaC", b"fLaC\x00\x00\x00\x22", b"OggS\x00\x02", b"ID3\x03\x00", b"\xff\xfb\x90",
           b"FORM\x00\x00\x00\x00AIFF", b"caff\x00\x01", b"\x1aE\xdf\xa3", b".snd"]


@BUDGET
@given(magic=st.sampled_from(_MAGICS), body=st.binary(max_size=2048),
       ext=st.sampled_from([".wav", ".flac", ".mp3", ".ogg", ".bin"]))
@example(magic=b"", body=b"", ext=".wav")
def test_random_bytes(worker: Worker, scratch: Path, magic: bytes, body: bytes,
                      ext: str) -> None:
    run_one(worker, scratch, magic + body, ext)


# -- WAV headers -------------------------------------------------------------------------

_GUID_TAIL = b"\x00\x00\x00\x00\x10\x00\x80\x00\x00\xaa\x00\x38\x9b\x71"
_U32 = st.integers(0, 2**32 - 1)


def build_wav(spec: dict[str, Any]) -> bytes:
    ch, rate, bits = spec["channels"], spec["rate"], spec["bits"]
    align = spec["block_align"] if spec["block_align"] is not None else (
        ch * ((bits + 7) // 8)) & 0xFFFF
    byte_rate = spec["byte_rate"] if spec["byte_rate"] is not None else (rate * align) & (
        2**32 - 1)
    tag = spec["format_tag"]
    fmt = struct.pack("<HHIIHH", tag, ch & 0xFFFF, rate, byte_rate, align, bits & 0xFFFF)
    if tag == 0xFFFE:
        sub = struct.pack("<H", spec["sub_tag"]) + _GUID_TAIL
        fmt += struct.pack("<HHI", 22, spec["valid_bits"], spec["channel_mask"]) + sub
    elif spec["fmt_extra"]:
        fmt += struct.pack("<H", 0)
    payload = np.random.default_rng(spec["seed"]).integers(
        0, 256, spec["payload_len"], dtype=np.uint8).tobytes()
    if spec["payload_kind"] == "zeros":
        payload = bytes(len(payload))
    data_size = {"exact": len(payload), "zero": 0, "ffff": 0xFFFFFFFF,
                 "huge": 0x7FFFFFF0}.get(spec["data_size"], spec["data_size"])
    chunks = b"fmt " + struct.pack("<I", len(fmt)) + fmt
    if spec["junk_chunk"]:
        chunks += b"LIST" + struct.pack("<I", 5) + b"INFOx\x00"
    chunks += b"data" + struct.pack("<I", data_size) + payload
    riff = spec["riff_size"] if spec["riff_size"] is not None else 4 + len(chunks)
    out = b"RIFF" + struct.pack("<I", riff & 0xFFFFFFFF) + b"WAVE" + chunks
    if spec["truncate"] is not None:
        out = out[: spec["truncate"] % (len(out) + 1)]
    return out


#: absurd values for each header field; a drawn spec is a consistent header with a
#: few of its fields replaced by one of these
_WAV_ABSURD: dict[str, st.SearchStrategy[Any]] = {
    "format_tag": st.sampled_from([6, 7, 2, 0x11, 0x55, 0, 0x1234, 0xFFFF]),
    "channels": st.one_of(st.integers(0, 64),
                          st.sampled_from([0, 255, 256, 511, 512, 513, 1024, 1025, 65535])),
    "rate": st.one_of(st.sampled_from([0, 1, 2, 999, 1000, 768000, 2**31 - 1, 2**31,
                                       2**32 - 1]), _U32),
    "bits": st.one_of(st.sampled_from([0, 1, 4, 12, 20, 48, 64, 65535]),
                      st.integers(0, 65535)),
    "block_align": st.integers(0, 65535),
    "byte_rate": _U32,
    "sub_tag": st.sampled_from([6, 7, 0, 2, 0xFFFF]),
    "valid_bits": st.integers(0, 64),
    "channel_mask": st.one_of(st.sampled_from([0, 3, 0x3F, 0x63F, 0xFF, 0x3FFFF,
                                               0x80000000, 0xFFFFFFFF]), _U32),
    "data_size": st.one_of(st.sampled_from(["zero", "ffff", "huge"]), _U32),
    "riff_size": _U32,
    "truncate": st.integers(0, 10_000),
}


@st.composite
def wav_specs(draw: Any) -> dict[str, Any]:
    tag = draw(st.sampled_from([1, 3, 0xFFFE]))
    sub = draw(st.sampled_from([1, 3])) if tag == 0xFFFE else tag
    bits = draw(st.sampled_from([8, 16, 24, 32] if sub == 1 else [32, 64]))
    ch = draw(st.integers(1, 64))
    spec = {
        "format_tag": tag, "channels": ch,
        "rate": draw(st.sampled_from([8000, 16000, 22050, 44100, 48000, 96000])),
        "bits": bits, "block_align": None, "byte_rate": None, "sub_tag": sub,
        "valid_bits": bits, "channel_mask": draw(st.sampled_from([0, (1 << min(ch, 18)) - 1])),
        "fmt_extra": draw(st.booleans()), "junk_chunk": draw(st.booleans()),
        "payload_len": draw(st.integers(0, 64)) * ch * (bits // 8),
        "payload_kind": draw(st.sampled_from(["random", "zeros"])),
        "seed": draw(st.integers(0, 2**16)), "data_size": "exact", "riff_size": None,
        "truncate": None,
    }
    for field in draw(st.sets(st.sampled_from(sorted(_WAV_ABSURD)), max_size=3)):
        spec[field] = draw(_WAV_ABSURD[field])
    return spec


WAV_SPECS = wav_specs()

_WAV_BASE = {"format_tag": 1, "channels": 8, "rate": 16000, "bits": 16, "block_align": None,
             "byte_rate": None, "sub_tag": 1, "valid_bits": 16, "channel_mask": 0,
             "fmt_extra": False, "junk_chunk": False, "payload_len": 4096,
             "payload_kind": "random", "seed": 0, "data_size": "exact", "riff_size": None,
             "truncate": None}


@BUDGET
@given(spec=WAV_SPECS)
# the issue-21 segfault: a valid 8 / 16 / 64-channel PCM WAV (planar float, >= 8 planes)
@example(spec=_WAV_BASE)
@example(spec={**_WAV_BASE, "channels": 16, "format_tag": 3, "bits": 32})
@example(spec={**_WAV_BASE, "channels": 64, "format_tag": 0xFFFE, "channel_mask": 0xFFFFFFFF})
# absurd headers: rates 0 / 1 / 2**31, 0 and 65535 channels, a 10-hour 64-channel claim
@example(spec={**_WAV_BASE, "rate": 0})
@example(spec={**_WAV_BASE, "rate": 1})
@example(spec={**_WAV_BASE, "rate": 2**31})
@example(spec={**_WAV_BASE, "channels": 0})
@example(spec={**_WAV_BASE, "channels": 65535})
@example(spec={**_WAV_BASE, "channels": 64, "rate": 48000, "bits": 32,
               "data_size": 10 * 3600 * 48000 * 64 * 4 % 2**32, "payload_len": 1024})
@example(spec={**_WAV_BASE, "channels": 64, "data_size": "ffff", "payload_len": 1024})
def test_wav_headers(worker: Worker, scratch: Path, spec: dict[str, Any]) -> None:
    run_one(worker, scratch, build_wav(spec), ".wav")


# -- FLAC ----------------------------------------------------------------------------------


def build_flac(spec: dict[str, Any]) -> bytes:
    rng = np.random.default_rng(spec["seed"])
    x = (rng.standard_normal((spec["frames"], spec["channels"])) * 0.1).astype(np.float32)
    buf = io.BytesIO()
    sf.write(buf, x, spec["rate"], format="FLAC", subtype=spec["subtype"])
    b = bytearray(buf.getvalue())
    # STREAMINFO at 8: min/max block (2+2), min/max frame (3+3), then 64 bits of
    # rate(20) channels-1(3) bps-1(5) total samples(36), then md5
    si = 8
    if spec["min_block"] is not None:
        b[si: si + 2] = struct.pack(">H", spec["min_block"])
    if spec["max_block"] is not None:
        b[si + 2: si + 4] = struct.pack(">H", spec["max_block"])
    packed = int.from_bytes(b[si + 10: si + 18], "big")
    rate = (packed >> 44) & 0xFFFFF
    chm1 = (packed >> 41) & 0x7
    bpsm1 = (packed >> 36) & 0x1F
    total = packed & (2**36 - 1)
    rate = spec["si_rate"] if spec["si_rate"] is not None else rate
    chm1 = spec["si_channels_m1"] if spec["si_channels_m1"] is not None else chm1
    bpsm1 = spec["si_bps_m1"] if spec["si_bps_m1"] is not None else bpsm1
    total = spec["si_total"] if spec["si_total"] is not None else total
    packed = (rate << 44) | (chm1 << 41) | (bpsm1 << 36) | total
    b[si + 10: si + 18] = packed.to_bytes(8, "big")
    for pos, val in spec["flips"]:
        if len(b) > 42:
            b[42 + pos % (len(b) - 42)] = val
    if spec["truncate"] is not None:
        b = b[: spec["truncate"] % (len(b) + 1)]
    return bytes(b)


FLAC_SPECS = st.fixed_dictionaries({
    "channels": st.integers(1, 8),
    "rate": st.sampled_from([8000, 16000, 22050, 44100, 48000, 96000]),
    "subtype": st.sampled_from(["PCM_16", "PCM_24", "PCM_S8"]),
    "frames": st.integers(0, 6000),
    "seed": st.integers(0, 2**16),
    "min_block": st.one_of(st.none(), st.sampled_from([0, 1, 15, 16, 65535])),
    "max_block": st.one_of(st.none(), st.sampled_from([0, 1, 15, 16, 65535])),
    "si_rate": st.one_of(st.none(), st.sampled_from([0, 1, 2, 999, 655350, 0xFFFFF]),
                         st.integers(0, 0xFFFFF)),
    "si_channels_m1": st.one_of(st.none(), st.integers(0, 7)),
    "si_bps_m1": st.one_of(st.none(), st.integers(0, 31)),
    "si_total": st.one_of(st.none(), st.sampled_from([0, 1, 2**36 - 1]),
                          st.integers(0, 2**36 - 1)),
    "flips": st.lists(st.tuples(st.integers(0, 2**20), st.integers(0, 255)), max_size=8),
    "truncate": st.one_of(st.none(), st.integers(0, 20_000)),
})

_FLAC_BASE = {"channels": 8, "rate": 16000, "subtype": "PCM_16", "frames": 4000, "seed": 0,
              "min_block": None, "max_block": None, "si_rate": None, "si_channels_m1": None,
              "si_bps_m1": None, "si_total": None, "flips": [], "truncate": None}


@BUDGET
@given(spec=FLAC_SPECS)
@example(spec=_FLAC_BASE)
@example(spec={**_FLAC_BASE, "si_rate": 0})
@example(spec={**_FLAC_BASE, "si_rate": 1})
@example(spec={**_FLAC_BASE, "si_total": 2**36 - 1})  # a claimed 49-day file of 10 KB
@example(spec={**_FLAC_BASE, "si_channels_m1": 0})  # STREAMINFO says mono, frames say 8
# found: cut after STREAMINFO, PyAV refuses it, soundfile opens it but its seek raised
# LibsndfileError out of load_audio
@example(spec={**_FLAC_BASE, "channels": 1, "rate": 8000, "frames": 81, "truncate": 42})
def test_flac_headers(worker: Worker, scratch: Path, spec: dict[str, Any]) -> None:
    run_one(worker, scratch, build_flac(spec), ".flac")


# -- valid files with 1-64 channels --------------------------------------------------------

_SUBTYPE_TOL = {"PCM_U8": 2 / 128, "PCM_16": 2e-4, "PCM_24": 1e-6, "PCM_32": 1e-6,
                "FLOAT": 1e-6, "DOUBLE": 1e-6}


@BUDGET
@given(channels=st.integers(1, 64), frames=st.integers(0, 5000),
       rate=st.sampled_from([8000, 16000, 22050, 44100, 48000]),
       subtype=st.sampled_from(list(_SUBTYPE_TOL)), flac=st.booleans(),
       seed=st.integers(0, 2**16))
@example(channels=8, frames=4000, rate=16000, subtype="PCM_16", flac=False, seed=0)
@example(channels=9, frames=4000, rate=16000, subtype="PCM_24", flac=False, seed=0)
@example(channels=16, frames=4000, rate=48000, subtype="FLOAT", flac=False, seed=0)
@example(channels=64, frames=4000, rate=16000, subtype="PCM_U8", flac=False, seed=0)
@example(channels=8, frames=4000, rate=16000, subtype="PCM_16", flac=True, seed=0)
# wider than FFmpeg's converter (64): read with soundfile
@example(channels=65, frames=3000, rate=16000, subtype="PCM_16", flac=False, seed=0)
@example(channels=256, frames=3000, rate=16000, subtype="FLOAT", flac=False, seed=0)
@example(channels=1024, frames=1000, rate=16000, subtype="PCM_16", flac=False, seed=0)
# found: a short FLAC without a seek table: the failed seek left the demuxer at the
# end and load_audio returned nothing
@example(channels=1, frames=4000, rate=16000, subtype="PCM_16", flac=True, seed=0)
# found: libsndfile writes a 0-frame FLAC as an empty file (not_audio, not zero_length)
@example(channels=1, frames=0, rate=8000, subtype="PCM_16", flac=True, seed=0)
def test_valid_multichannel(worker: Worker, scratch: Path, channels: int, frames: int,
                            rate: int, subtype: str, flac: bool, seed: int) -> None:
    flac = flac and channels <= 8 and subtype in ("PCM_16", "PCM_24")
    x = np.random.default_rng(seed).uniform(-0.5, 0.5, (frames, channels)).astype(np.float32)
    buf = io.BytesIO()
    sf.write(buf, x, rate, format="FLAC" if flac else "WAV", subtype=subtype)
    data = buf.getvalue()
    ext = ".flac" if flac else ".wav"
    path = scratch / f"valid{ext}"
    path.write_bytes(data)
    a, b = frames // 3, frames // 3 + frames // 4
    seek = (a / rate, (b - a) / rate) if b > a else None
    res = worker.run({"path": str(path), "save": str(scratch / "got.npy"),
                      "seek": seek, "save_seek": str(scratch / "seek.npy")})
    check(res, data)
    if frames == 0:  # (libsndfile writes a 0-frame FLAC as an empty file)
        assert res["decode"] == ("reject:zero_length" if data else "reject:not_audio"), res
        return
    assert res["probe"] == "ok" and res["decode"] == "ok", res
    assert res["channels"] == channels and res["rate"] == rate, res
    assert res["n"] == frames, res
    want = sf.read(io.BytesIO(data), dtype="float64", always_2d=True)[0].mean(axis=1)
    got = np.load(scratch / "got.npy")
    tol = _SUBTYPE_TOL[subtype]
    assert got.shape[0] == frames
    np.testing.assert_allclose(got, want, atol=tol, rtol=0)
    if seek is not None:
        assert res["seek"] == "ok", res
        part = np.load(scratch / "seek.npy")
        assert part.shape[0] == b - a, (part.shape, b - a)
        np.testing.assert_allclose(part, want[a:b], atol=tol, rtol=0)
