"""A full disk under a stage's media is a run failure, not a reject: libsndfile drops the
errno of a failed write, ``audio_write`` keeps it. ``/dev/full`` is a real device whose
every write fails with ENOSPC."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from speechmill.pipeline.audio_write import sound_writer, write_audio
from speechmill.pipeline.errors import is_fatal
from speechmill.pipeline.stage import Reject
from speechmill.stages import standardize as std_mod
from testkit.audio import load_speech

needs_dev_full = pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full")


@needs_dev_full
@pytest.mark.parametrize("fmt", ["WAV", "FLAC"])
@pytest.mark.parametrize("seconds", [0.01, 20.0])
def test_full_disk_raises_enospc(fmt: str, seconds: float) -> None:
    x = np.zeros(int(16000 * seconds), np.float32)
    with pytest.raises(OSError) as ei:
        write_audio("/dev/full", x, 16000, format=fmt)
    assert ei.value.errno == errno.ENOSPC
    assert is_fatal(ei.value)


def test_written_file_matches_soundfile(tmp_path: Path) -> None:
    sr = 16000
    x = load_speech(3.0, sr)
    with sound_writer(tmp_path / "a.flac", sr, subtype="PCM_16") as out:
        out.write(x[: sr])
        out.write(x[sr:])
    sf.write(tmp_path / "b.flac", x, sr, subtype="PCM_16")
    a, sra = sf.read(tmp_path / "a.flac", dtype="float32")
    b, _ = sf.read(tmp_path / "b.flac", dtype="float32")
    assert sra == sr and np.array_equal(a, b)


@needs_dev_full
def test_standardize_full_disk_is_fatal_not_a_reject(tmp_path: Path, monkeypatch) -> None:
    src = tmp_path / "in.wav"
    sf.write(src, load_speech(2.0, 16000), 16000)

    def to_dev_full(path, *a, **kw):  # the stage's FLAC goes to a device that is full
        return sound_writer("/dev/full", *a, **kw)

    monkeypatch.setattr(std_mod, "sound_writer", to_dev_full)
    cfg = std_mod.StandardizeConfig(sample_rate=16000)
    try:
        std_mod.standardize_file(str(src), tmp_path / "out.flac", cfg)
    except Reject as e:  # what it was before: a reject row for a full disk
        pytest.fail(f"a full disk became a reject: {e}")
    except OSError as e:
        assert e.errno == errno.ENOSPC and is_fatal(e)
    else:
        pytest.fail("writing to a full disk raised nothing")
