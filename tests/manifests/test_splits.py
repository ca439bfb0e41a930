from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from speechmill.manifests.splits import assign_splits
from speechmill.pipeline.dag import load as load_dag
from speechmill.pipeline.records import conform, content_id, segment_id
from speechmill.pipeline.runner import run
from testkit.conversations import SENTENCES, synthesize
from tests.manifests.conftest import dag_with

#: Piper's joe voice played back at these speeds (pitch and tempo scaled together) makes
#: six speakers that do not depend on eSpeak NG
SPEEDS = (0.8, 0.88, 0.96, 1.04, 1.12, 1.2)


def _multi_speaker_segments(d: Path, recordings_per_speaker: int = 2,
                            per_recording: int = 2) -> pa.Table:
    """Segment rows over FLAC recordings of six speakers, each speaker in several
    recordings (so keeping a speaker in one split is more than keeping a file in one)."""
    import soxr

    d.mkdir(parents=True, exist_ok=True)
    sr = 16000
    rows, k = [], 0
    for spk, speed in enumerate(SPEEDS):
        for r in range(recordings_per_speaker):
            pieces, spans, t = [np.zeros(int(0.3 * sr), np.float32)], [], 0.3
            for _ in range(per_recording):
                text = SENTENCES[k % len(SENTENCES)]
                k += 1
                x = soxr.resample(synthesize("piper:joe", text, sample_rate=sr), sr,
                                  round(sr / speed)).astype(np.float32)
                spans.append((t, t + len(x) / sr, text))
                pieces += [x, np.zeros(int(0.4 * sr), np.float32)]
                t += len(x) / sr + 0.4
            path = d / f"spk{spk}-rec{r}.flac"
            sf.write(path, np.concatenate(pieces), sr, subtype="PCM_16")
            rid = content_id(hashlib.sha256(path.read_bytes()).hexdigest())
            rows += [{"id": segment_id(rid, a, b), "parent_id": segment_id(rid, a, b),
                      "audio_path": str(path), "offset": round(a, 3),
                      "duration": round(b - a, 3), "sample_rate": sr, "channels": 1,
                      "speaker": f"spk-joe-x{speed}", "language": "en", "text": text}
                     for a, b, text in spans]
    return conform(pa.Table.from_pylist(rows))


def test_assign_is_speaker_disjoint_sized_and_deterministic() -> None:
    hours = {f"spk:{i}": 0.5 + (i % 7) * 0.25 for i in range(200)}
    total = sum(hours.values())
    a = assign_splits(hours, dev_target=0.05 * total, test_target=0.05 * total, seed=1)
    assert a == assign_splits(dict(reversed(list(hours.items()))), 0.05 * total,
                              0.05 * total, seed=1)
    assert set(a) == set(hours) and set(a.values()) == {"train", "dev", "test"}
    for split in ("dev", "test"):
        h = sum(hours[k] for k, v in a.items() if v == split)
        assert 0.05 * total - 2.0 <= h <= 0.05 * total  # filled up to, never past
    b = assign_splits(hours, 0.05 * total, 0.05 * total, seed=2)
    assert a != b  # the seed picks other speakers


def test_adding_a_speaker_moves_only_boundary_speakers() -> None:
    hours = {f"spk:{i}": 1.0 for i in range(50)}
    a = assign_splits(hours, 0, 0, seed=0)
    assert set(a.values()) == {"train"}
    a = assign_splits(hours, 3, 3, seed=0)
    b = assign_splits({**hours, "spk:new": 1.0}, 3, 3, seed=0)
    moved = [k for k in a if a[k] != b[k]]
    assert len(moved) <= 2
    # uneven speakers, absolute targets: adding any one speaker moves at most two others
    rng = __import__("random").Random(0)
    hours = {f"spk:{i}": rng.choice([0.5, 1.0, 1.5, 2.0, 3.0]) for i in range(40)}
    a = assign_splits(hours, 5.0, 5.0, seed=0)
    for j in range(30):
        b = assign_splits({**hours, f"spk:new{j}": rng.choice([0.5, 1.0, 2.0])}, 5.0, 5.0, 0)
        assert sum(a[k] != b[k] for k in a) <= 2


def test_split_never_empty_when_asked_even_if_speakers_are_big() -> None:
    hours = {"spk:a": 10.0, "spk:b": 20.0, "spk:c": 30.0}
    a = assign_splits(hours, dev_target=1.0, test_target=1.0, seed=0)
    assert sorted(a.values()) == ["dev", "test", "train"]
    assert a["spk:c"] == "train"


@pytest.mark.parametrize("executor", ["local"])
def test_split_stage_in_a_dag(tmp_path: Path, executor: str) -> None:
    seg = _multi_speaker_segments(tmp_path / "audio")
    pq.write_table(seg, tmp_path / "segments.parquet")
    dag = dag_with(tmp_path, tmp_path / "segments.parquet", """
  - id: split
    uses: split
    needs: [src]
    with: {dev_fraction: 0.2, test_fraction: 0.2, seed: 3}
""", executor)
    res = run(load_dag(dag), progress=False)
    assert res.status == "succeeded"
    out = pq.read_table(sorted((tmp_path / "run/stages/split").glob("part-*.parquet")))
    assert out.num_rows == seg.num_rows
    by_spk: dict[str, set[str]] = {}
    files: dict[str, set[str]] = {}
    for spk, s, path in zip(out.column("speaker").to_pylist(),
                            out.column("split").to_pylist(),
                            out.column("audio_path").to_pylist(), strict=True):
        by_spk.setdefault(spk, set()).add(s)
        files.setdefault(spk, set()).add(path)
    assert len(by_spk) == len(SPEEDS) and all(len(f) == 2 for f in files.values())
    assert all(len(v) == 1 for v in by_spk.values()), by_spk  # no speaker in two splits
    assert {next(iter(v)) for v in by_spk.values()} == {"train", "dev", "test"}


def test_arrow_group_keys_match_rows_and_hours_sum_per_group() -> None:
    import pyarrow as pa

    from speechmill.manifests import splits

    rows = [
        {"id": "abc-00000000-00001000", "speaker": "spk-1", "duration": 1.0},
        {"id": "abc-00002000-00004000", "speaker": "", "duration": 2.0},
        {"id": "abc-00005000-00008000", "speaker": None, "duration": None},
        {"id": "def", "speaker": None, "duration": 4.0},
        {"id": "xyz-1", "speaker": "spk-1", "duration": 8.0},
    ]
    t = pa.Table.from_pylist(rows)
    assert splits.group_keys(t).to_pylist() == [splits.group_key(r) for r in rows]
    assert splits.group_keys(t.drop(["speaker"])).to_pylist() == [
        "rec:abc", "rec:abc", "rec:abc", "rec:def", "rec:xyz"]
    old = splits.SLICE_ROWS
    try:
        splits.SLICE_ROWS = 2  # groups span slices
        got = splits._seconds_by(t, ())
    finally:
        splits.SLICE_ROWS = old
    assert got == {"spk:spk-1": 9.0, "rec:abc": 2.0, "rec:def": 4.0}


def test_group_keys_of_non_string_columns_match_python() -> None:
    import pyarrow as pa

    from speechmill.manifests import splits

    rows = [{"id": 1.0, "speaker": 0}, {"id": 2.5, "speaker": 7}, {"id": None, "speaker": None}]
    t = pa.Table.from_pylist(rows)
    assert splits.group_keys(t).to_pylist() == [splits.group_key(r) for r in rows]
    b = pa.Table.from_pylist([{"id": "a-1", "speaker": True}, {"id": "b", "speaker": False}])
    assert splits.group_keys(b).to_pylist() == ["spk:True", "rec:b"]
