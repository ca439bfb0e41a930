"""Quick checks of the audio fixture factory (testkit/audio.py) with PyAV."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
import soundfile as sf

from testkit.audio import (
    BAD_CATEGORIES,
    GOOD_FILENAMES,
    load_speech,
    make_unreadable,
    speech_samples,
    write_bad_files,
    write_duplicate,
    write_good_files,
    write_long_flac,
)


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, dict[str, Any]]]:
    d = tmp_path_factory.mktemp("good")
    return d, write_good_files(d)


@pytest.fixture(scope="module")
def bad(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    d = tmp_path_factory.mktemp("bad")
    return d, write_bad_files(d)


def _decode(path: Path) -> tuple[int, int, int, int]:
    """(decoded samples per channel, decoded rate, channels, number of video streams)."""
    with av.open(str(path)) as c:
        stream = c.streams.audio[0]
        channels = stream.codec_context.channels
        n_video = len(c.streams.video)
        samples = 0
        rate = 0
        for frame in c.decode(stream):
            samples += frame.samples
            rate = frame.sample_rate
    return samples, rate, channels, n_video


def test_speech_samples_and_load_speech() -> None:
    paths = speech_samples()
    assert paths == sorted(paths)
    assert any(p.parent.name == "en" for p in paths)
    assert all(p.with_suffix(".txt").exists() for p in speech_samples(("en",)))
    x = load_speech(2.5, 22050, seed=3)
    assert x.dtype == np.float32 and x.shape == (round(2.5 * 22050),)
    assert np.isfinite(x).all() and 0.3 < np.abs(x).max() <= 1.0
    assert not np.array_equal(load_speech(1.0, seed=0), load_speech(1.0, seed=1))


@pytest.mark.parametrize("name", GOOD_FILENAMES)
def test_good_file_decodes_as_declared(
    good: tuple[Path, dict[str, dict[str, Any]]], name: str
) -> None:
    d, meta = good
    m = meta[name]
    samples, rate, channels, n_video = _decode(d / name)
    assert rate == m["sample_rate"]
    assert channels == m["channels"]
    assert (n_video > 0) == m["has_video"]
    assert samples / rate == pytest.approx(m["duration"], rel=0.10)
    assert 2.0 <= m["duration"] <= 6.0


def test_good_files_cover_formats_and_differ(
    good: tuple[Path, dict[str, dict[str, Any]]],
) -> None:
    d, meta = good
    assert set(meta) == set(GOOD_FILENAMES)
    assert {m["sample_rate"] for m in meta.values()} >= {8000, 16000, 22050, 44100, 48000}
    assert {m["channels"] for m in meta.values()} == {1, 2}
    digests = {hashlib.sha256((d / n).read_bytes()).hexdigest() for n in meta}
    assert len(digests) == len(meta)


def test_bad_files_exist(bad: tuple[Path, dict[str, str]]) -> None:
    d, cats = bad
    assert set(cats.values()) == set(BAD_CATEGORIES)
    for name in cats:
        assert (d / name).is_file(), name
    assert (d / "empty.wav").stat().st_size == 0
    assert not any(p.name.startswith(".") for p in d.iterdir())  # no leftover temp files


# What PyAV 18 does with each bad file (documented in write_bad_files); pinned here so a
# PyAV/FFmpeg upgrade that changes the behaviour is noticed.
_OPEN_FAILS = ["empty.wav", "episode.mp3", "notes.wav", "header_only.mp3"]


@pytest.mark.parametrize("name", _OPEN_FAILS)
def test_bad_file_fails_to_open(bad: tuple[Path, dict[str, str]], name: str) -> None:
    d, _ = bad
    with pytest.raises(av.error.InvalidDataError):
        av.open(str(d / name))


def test_bad_file_decode_behaviour(bad: tuple[Path, dict[str, str]]) -> None:
    d, _ = bad
    with av.open(str(d / "truncated.flac")) as c:  # declares 4 s, holds ~1.6 s
        assert c.duration == 4_000_000
        got = 0
        with pytest.raises(av.error.InvalidDataError):
            for frame in c.decode(audio=0):
                got += frame.samples
        assert 0 < got < 64000 * 0.6
    assert _decode(d / "truncated.wav")[0] == 16000  # header says 5 s; FFmpeg clamps
    for name in ("zero.wav", "zero.flac"):
        assert _decode(d / name)[0] == 0
    data, _ = sf.read(d / "nan.wav", dtype="float32")
    assert np.isnan(data).any() and np.isposinf(data).any()
    with av.open(str(d / "weird_codec.wav")) as c:
        assert c.streams.audio[0].codec_context is None
        with pytest.raises(av.error.DecoderNotFoundError):
            next(iter(c.decode(audio=0)))


def test_unreadable_is_dangling_symlink(tmp_path: Path) -> None:
    p = make_unreadable(tmp_path)
    assert p.is_symlink() and not p.exists()
    assert p.name in {q.name for q in tmp_path.iterdir()}
    with pytest.raises(FileNotFoundError):
        av.open(str(p))


def test_long_flac_and_duplicate(tmp_path: Path) -> None:
    path = tmp_path / "long.flac"
    write_long_flac(path, 75.0, sample_rate=16000)
    info = sf.info(str(path))
    assert info.frames == 75 * 16000 and info.samplerate == 16000 and info.channels == 1
    dup = write_duplicate(path, tmp_path / "sub" / "copy.flac")
    assert dup.read_bytes() == path.read_bytes()
