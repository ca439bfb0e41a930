"""`segment` turns a row's own failure into an `error` reject but lets what is not the
row's fault (a full disk, an engine error) stop the stage, as the other stages do."""

from __future__ import annotations

import errno
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import soundfile as sf

from speechmill.pipeline.errors import SpeechmillError
from speechmill.pipeline.stage import StageContext
from speechmill.stages.segment import Segment, SegmentConfig

SR = 16000


def _segmenter(tmp_path: Path, exc: Exception) -> tuple[Segment, pa.Table]:
    path = tmp_path / "a.flac"
    sf.write(path, np.zeros(2 * SR, np.float32), SR)
    st = Segment(SegmentConfig(), StageContext("segment", str(tmp_path)))

    def vad(audio: np.ndarray, sr: int) -> list[tuple[float, float]]:
        raise exc

    st.vad = vad  # the VAD call inside each turn fails
    row = {"id": "rec", "audio_path": str(path), "offset": 0.0, "duration": 2.0,
           "turns": [{"start": 0.0, "end": 2.0, "speaker": "A"}]}
    return st, pa.Table.from_pylist([row])


def test_a_rows_failure_is_an_error_reject(tmp_path: Path) -> None:
    st, batch = _segmenter(tmp_path, ValueError("bad turn"))
    res = st.process(batch)
    assert res.outputs.num_rows == 0
    assert res.rejects.column("reason").to_pylist() == ["error"]
    assert "ValueError: bad turn" in res.rejects.column("detail")[0].as_py()


@pytest.mark.parametrize("exc", [OSError(errno.ENOSPC, "No space left on device"),
                                 SpeechmillError("engine failure")])
def test_a_full_disk_or_engine_error_stops_the_stage(tmp_path: Path, exc: Exception) -> None:
    st, batch = _segmenter(tmp_path, exc)
    with pytest.raises(type(exc)):
        st.process(batch)
