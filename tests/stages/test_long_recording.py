"""A recording longer than audio_models.vad.CHUNK_S goes through the diarize and segment
stages a piece at a time (``AudioReader``): no decode is longer than a chunk, and the
segments are the ones the in-memory path cuts. ``CHUNK_S`` is lowered to 40 s here so a
3-minute file proves it (the shipped 300 s bounds a 2-hour file to ~5 minutes of audio in
memory; ``benchmarks/fused_memory.py`` measures that)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import soundfile as sf

from speechmill.pipeline import audio as audio_mod
from speechmill.pipeline.stage import StageContext
from speechmill.stages import diarize as diarize_mod
from speechmill.stages import segment as segment_mod
from speechmill.stages.audio_models import vad as de
from speechmill.stages.diarize import Diarize, DiarizeConfig
from speechmill.stages.segment import Segment, SegmentConfig
from testkit.conversations import espeak_available, make_conversation

pytest.importorskip("resemblyzer")
pytest.importorskip("silero_vad")
pytestmark = pytest.mark.skipif(not espeak_available(), reason="needs espeak-ng (apt)")

SR = 16000


@pytest.fixture(scope="module")
def long_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, float]:
    d = tmp_path_factory.mktemp("long")
    make_conversation(d / "conv.wav", n_speakers=3, seed=1)
    x, sr = sf.read(d / "conv.wav", dtype="float32")
    assert sr == SR
    long = np.tile(x, 3)
    path = d / "long.flac"
    sf.write(path, long, SR, subtype="PCM_16")
    return path, len(long) / SR


def _run(path: Path, dur: float, tmp: Path) -> list[dict[str, Any]]:
    row = {"id": "rec0000000000000", "audio_path": str(path), "offset": 0.0,
           "duration": dur, "source_audio_path": str(path)}
    ctx = StageContext(stage_id="diarize", run_dir=str(tmp))
    dia = Diarize(DiarizeConfig(), ctx)
    dia.setup()
    turns = dia.process_row(row)
    seg = Segment(SegmentConfig(min_s=1.0, max_s=30.0),
                  StageContext(stage_id="segment", run_dir=str(tmp)))
    seg.setup()
    res = seg.process(pa.Table.from_pylist([turns]))
    assert res.outputs is not None
    return res.outputs.to_pylist()


def test_long_recording_is_read_in_chunks(long_file: tuple[Path, float], tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    path, dur = long_file
    whole = _run(path, dur, tmp_path / "whole")

    decodes: list[float] = []
    real = audio_mod.load_audio

    def counting(p: str, offset: float = 0.0, duration: float | None = None,
                 *a: Any, **k: Any) -> Any:
        decodes.append(dur - offset if duration is None else duration)
        return real(p, offset, duration, *a, **k)

    for mod in (audio_mod, diarize_mod, segment_mod):
        monkeypatch.setattr(mod, "load_audio", counting)
    monkeypatch.setattr(de, "CHUNK_S", 40.0)
    streamed = _run(path, dur, tmp_path / "streamed")

    print(f"\n{dur:.0f} s file: {len(decodes)} decodes, longest {max(decodes):.1f} s; "
          f"segments whole {len(whole)}, streamed {len(streamed)}")
    # diarize reads 40 s chunks, segment one minute at a time: never the whole file
    assert max(decodes) <= 60.0 + 1e-6 and len(decodes) >= dur / 60
    # each part decoded about three times: diarize's VAD pass and embedding pass, segment
    assert sum(decodes) <= 3.5 * dur
    # the same segments as the in-memory path (chunk boundaries may move one by a hair)
    assert abs(len(streamed) - len(whole)) <= 1
    matched = [s for s in streamed if any(
        abs(s["offset"] - w["offset"]) <= 0.1 and abs(s["duration"] - w["duration"]) <= 0.2
        for w in whole)]
    assert len(matched) >= 0.9 * len(whole)
    assert len({s["speaker_local"] for s in streamed}) == 3
