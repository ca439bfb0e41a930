"""standardize -> diarize -> segment -> link_speakers on generated conversations
(Piper + eSpeak NG voices), end to end through the runner."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from speechmill.pipeline import dag as dagmod
from speechmill.pipeline.runner import run
from speechmill.pipeline.store import RunStore
from speechmill.stages.segment import _pieces, _subtract
from testkit.conversations import espeak_available, make_conversation

# only the conversations need eSpeak NG voices: the other tests run everywhere
needs_espeak = pytest.mark.skipif(not espeak_available(), reason="needs espeak-ng (apt)")


def test_pieces_never_merge_across_an_overlap() -> None:
    regions = [(0.0, 3.0), (3.5, 6.0), (6.5, 8.0)]
    assert _pieces(regions, 2.0, 30.0) == [(0.0, 8.0)]
    assert _pieces(regions, 2.0, 30.0, [(3.1, 3.4)]) == [(0.0, 3.0), (3.5, 8.0)]


def test_pieces_follow_emilia_rules() -> None:
    # gaps < 2 s merge; a 40 s group splits at its longest pause; a 70 s region is cut evenly
    regions = [(0.0, 5.0), (6.0, 12.0), (12.5, 20.0), (24.0, 28.0), (29.0, 45.0)]
    assert _pieces(regions, 2.0, 30.0) == [(0.0, 20.0), (24.0, 45.0)]
    long = [(0.0, 10.0), (10.5, 25.0), (27.0, 40.0)]  # one group, 40 s > 30 s
    assert _pieces(long, 2.5, 30.0) == [(0.0, 25.0), (27.0, 40.0)]
    assert _pieces([(0.0, 70.0)], 2.0, 30.0) == [
        (0.0, pytest.approx(70 / 3)), (pytest.approx(70 / 3), pytest.approx(140 / 3)),
        (pytest.approx(140 / 3), 70.0)]
    kept, cut = _subtract([(0.0, 10.0)], [(4.0, 5.0)])
    assert kept == [(0.0, 4.0), (5.0, 10.0)] and cut == [(4.0, 5.0)]


def _no_speech_files(d: Path) -> None:
    """Music-only audio (a 330 Hz tone pulsing 3 times a second) and digital silence."""
    d.mkdir(parents=True, exist_ok=True)
    t = np.arange(16000 * 10) / 16000
    sf.write(d / "music.wav", (0.2 * np.sin(2 * np.pi * 330 * t)
                               * (1 + np.sin(2 * np.pi * 3 * t))).astype(np.float32), 16000)
    sf.write(d / "silence.wav", np.zeros(16000 * 5, np.float32), 16000)


def _chain(inputs: Path, run_dir: Path) -> RunStore:
    dag = dagmod.loads(f"""
name: clean
run_dir: {run_dir}
executor: {{type: local}}
stages:
  - {{id: ingest, uses: ingest, with: {{inputs: ["{inputs}"]}}}}
  - {{id: standardize, uses: standardize, needs: ingest,
      with: {{sample_rate: 16000, silence_dbfs: null}}}}
  - {{id: diarize, uses: diarize, needs: standardize}}
  - {{id: segment, uses: segment, needs: diarize, with: {{min_s: 1.0, max_s: 12.0}}}}
  - {{id: link, uses: link_speakers, needs: segment}}
""")
    res = run(dag, progress=False)
    assert res.status == "succeeded"
    return RunStore(run_dir)


def _rejects(store: RunStore) -> dict[str, tuple[str, str]]:
    """file name -> (stage, reason) of its reject."""
    return {Path(r["source_url"]).name: (sid, r["reason"])
            for sid in ("standardize", "diarize", "segment")
            for r in store.read_rejects(sid).to_pylist() if r["source_url"]}


# the diarizer's VAD finds no speech in music-only audio or silence: rejected there
NO_SPEECH = {"music.wav": ("diarize", "no_speech"), "silence.wav": ("diarize", "no_speech")}


def test_music_and_silence_are_rejected_as_no_speech(tmp_path: Path) -> None:
    _no_speech_files(tmp_path / "in")
    store = _chain(tmp_path / "in", tmp_path / "run")
    assert store.read_outputs("link").num_rows == 0
    assert _rejects(store) == NO_SPEECH


@pytest.fixture(scope="module")
def conversations(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    d = tmp_path_factory.mktemp("convs")
    truth = {
        "a.wav": make_conversation(d / "a.wav", 2, 10, seed=1,
                                   voices=["piper:joe", "espeak:en-us+f3"]),
        "b.wav": make_conversation(d / "b.wav", 2, 10, seed=2,
                                   voices=["piper:joe", "espeak:en-gb+m3"]),
        "c.wav": make_conversation(d / "c.wav", 1, 6, seed=3, voices=["piper:joe"]),
    }
    _no_speech_files(d)
    return d, truth


@needs_espeak
def test_chain_segments_and_links_speakers(conversations, tmp_path: Path) -> None:
    d, truth = conversations
    store = _chain(d, tmp_path / "run")
    segs = store.read_outputs("link").to_pylist()
    by_file: dict[str, list[dict]] = {}
    for s in segs:
        by_file.setdefault(Path(s["source_url"]).name, []).append(s)
    assert set(by_file) == {"a.wav", "b.wav", "c.wav"}
    # music and silence end as rejects with reasons, never as segments
    assert _rejects(store) == NO_SPEECH
    def speakers_in(name: str, s: dict) -> set[str]:
        """Reference speakers whose turns the segment covers by more than 0.3 s."""
        a0, b0 = s["offset"], s["offset"] + s["duration"]
        return {lab for a, b, lab in truth[name] if min(b, b0) - max(a, a0) > 0.3}

    for name, rows in by_file.items():
        for s in rows:
            assert 1.0 <= s["duration"] <= 12.0 + 0.11
            # a segment holds one reference speaker (segment merges a speaker's
            # consecutive turns, never across a speaker change)
            assert len(speakers_in(name, s)) == 1, (name, s["offset"], s["duration"])
        # speech coverage: segments hold most of the reference speech
        ref = sum(b - a for a, b, _ in truth[name])
        got = sum(s["duration"] for s in rows)
        assert got >= 0.7 * ref, (name, got, ref)
    # global ids: joe is one speaker across all three files; the other voices differ
    def majority(name: str, label: str) -> str:
        votes: dict[str, float] = {}
        for s in by_file[name]:
            if speakers_in(name, s) == {label}:
                votes[s["speaker"]] = votes.get(s["speaker"], 0) + s["duration"]
        return max(votes, key=votes.get)

    joe = {majority(n, "joe") for n in ("a.wav", "b.wav", "c.wav")}
    assert len(joe) == 1, joe
    f3, m3 = majority("a.wav", "en-us+f3"), majority("b.wav", "en-gb+m3")
    assert len({*joe, f3, m3}) == 3
    assert all(s["speaker"].startswith("spk-") for s in segs)
    # one centroid per global speaker in speakers.parquet; rows no longer carry 2 KB each
    import pyarrow.parquet as pq

    spk = pq.read_table(tmp_path / "run/stages/link/speakers.parquet").to_pylist()
    assert {r["speaker"] for r in spk} == {s["speaker"] for s in segs}
    assert all(abs(sum(v * v for v in r["embedding"]) - 1) < 1e-3 for r in spk)
    assert sum(r["n_local"] for r in spk) == len({(s["source_url"], s["speaker_local"])
                                                 for s in segs})
    assert "speaker_embedding" not in segs[0]
    m = json.loads((tmp_path / "run/stages/segment/metrics.json").read_text())
    assert m["rows_out"] == len(segs)
