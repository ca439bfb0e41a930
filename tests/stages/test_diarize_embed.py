"""Offline diarization (``speechmill.stages.audio_models.speaker``: Silero VAD + GE2E +
NME-SC) on generated conversations of truly different voices (Piper ``joe`` + eSpeak NG).

Quality is scored frame by frame (10 ms) over reference speech: the hypothesis clusters
are mapped one-to-one to reference speakers with ``linear_sum_assignment``; purity is
the fraction of hypothesis frames whose mapped speaker is right, coverage the fraction of
reference frames covered by the speaker's mapped cluster (both weighted by frames; an
unmapped cluster or speaker counts as wrong, so these are lower bounds of the usual
majority-based purity/coverage, which are printed too). Needs the ``espeak-ng`` CLI
(``apt-get install espeak-ng``); without it the multi-voice tests are skipped.
"""

from __future__ import annotations

import json
import threading
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import soxr
from scipy.optimize import linear_sum_assignment

from speechmill.stages.audio_models import speaker as de
from speechmill.stages.audio_models import vad
from speechmill.stages.audio_models.speaker import DiarizationResult, diarize
from speechmill.stages.audio_models.vad import speech_regions
from testkit.conversations import VOICES, espeak_available, make_conversation

pytest.importorskip("resemblyzer")
pytest.importorskip("silero_vad")

needs_espeak = pytest.mark.skipif(not espeak_available(),
                                  reason="espeak-ng not installed (apt-get install espeak-ng)")

SR = 16000
Turns = list[tuple[float, float, str]]
# name -> (n_speakers, seed)
CONVERSATIONS = {"2spk": (2, 0), "3spk": (3, 1)}


# --------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------


def _frames(turns: Turns, n: int) -> tuple[list[str], np.ndarray]:
    labels = sorted({t[2] for t in turns})
    m = np.zeros((len(labels), n), dtype=bool)
    for s, e, lab in turns:
        m[labels.index(lab), int(round(s * 100)):int(round(e * 100))] = True
    return labels, m


def purity_coverage(ref: Turns, hyp: Turns, duration: float) -> dict:
    """Frame-level (10 ms) purity/coverage over reference speech, one-to-one mapping."""
    n = int(np.ceil(duration * 100)) + 1
    ref_labels, r = _frames(ref, n)
    hyp_labels, h = _frames(hyp, n)
    speech = r.any(axis=0)
    conf = np.zeros((len(ref_labels), len(hyp_labels)))
    for i in range(len(ref_labels)):
        for j in range(len(hyp_labels)):
            conf[i, j] = np.sum(r[i] & h[j] & speech)
    rows, cols = linear_sum_assignment(-conf)
    matched = conf[rows, cols].sum()
    hyp_total, ref_total = conf.sum(), r[:, speech].sum()
    return {
        "purity": matched / hyp_total if hyp_total else 0.0,
        "coverage": matched / ref_total if ref_total else 0.0,
        "purity_majority": conf.max(axis=0).sum() / hyp_total if hyp_total else 0.0,
        "coverage_majority": conf.max(axis=1).sum() / ref_total if ref_total else 0.0,
        "mapping": {hyp_labels[c]: ref_labels[r_] for r_, c in zip(rows, cols, strict=True)},
    }


def _true_overlaps(ref: Turns) -> list[tuple[float, float]]:
    out = []
    for i, a in enumerate(ref):
        for b in ref[i + 1:]:
            s, e = max(a[0], b[0]), min(a[1], b[1])
            if e > s:
                out.append((s, e))
    return out


# --------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def conversations(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """name -> (reference turns, 16 kHz audio, diarization result)."""
    if not espeak_available():
        pytest.skip("espeak-ng not installed (apt-get install espeak-ng)")
    d = tmp_path_factory.mktemp("conv")
    out = {}
    for name, (n, seed) in CONVERSATIONS.items():
        path = d / f"{name}.wav"
        ref = make_conversation(path, n_speakers=n, seed=seed)
        audio, sr = sf.read(path, dtype="float32")
        assert sr == SR
        out[name] = (ref, audio, diarize(audio, sr))
    return out


# --------------------------------------------------------------------------------------
# The factory
# --------------------------------------------------------------------------------------


@needs_espeak
def test_conversation_factory(tmp_path: Path) -> None:
    ref = make_conversation(tmp_path / "c.wav", n_speakers=3, n_turns=8, seed=5)
    info = sf.info(tmp_path / "c.wav")
    assert info.samplerate == SR and info.channels == 1
    assert len(ref) == 8 and ref == sorted(ref)
    assert {lab for _, _, lab in ref} == {v.split(":")[1] for v in VOICES[:3]}
    gaps = [b[0] - a[1] for a, b in zip(ref, ref[1:], strict=False)]
    assert all(0.29 <= g <= 1.21 for g in gaps)
    assert all(a[2] != b[2] for a, b in zip(ref, ref[1:], strict=False))
    assert ref[0][0] > 0 and ref[-1][1] < info.duration
    # cached: the same conversation again is fast and identical
    t = time.perf_counter()
    again = make_conversation(tmp_path / "d.wav", n_speakers=3, n_turns=8, seed=5)
    assert time.perf_counter() - t < 2.0
    assert again == ref
    assert np.array_equal(sf.read(tmp_path / "c.wav")[0], sf.read(tmp_path / "d.wav")[0])
    # overlapping turns, other sample rate
    ov = make_conversation(tmp_path / "o.wav", n_speakers=2, n_turns=4, seed=1,
                           sample_rate=22050, overlap_s=0.5)
    assert sf.info(tmp_path / "o.wav").samplerate == 22050
    assert all(abs((a[1] - b[0]) - 0.5) < 0.01 for a, b in zip(ov, ov[1:], strict=False))


# --------------------------------------------------------------------------------------
# Diarization quality
# --------------------------------------------------------------------------------------


@needs_espeak
@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_purity_coverage_and_speaker_count(conversations: dict, name: str) -> None:
    ref, audio, res = conversations[name]
    n_true = CONVERSATIONS[name][0]
    m = purity_coverage(ref, res.turns, len(audio) / SR)
    print(f"\n{name}: speakers {res.num_speakers}/{n_true} purity={m['purity']:.3f} "
          f"coverage={m['coverage']:.3f} (majority: {m['purity_majority']:.3f} / "
          f"{m['coverage_majority']:.3f}) turns={len(res.turns)} overlaps={res.overlaps}")
    assert res.num_speakers == n_true
    assert m["purity"] >= 0.9
    assert m["coverage"] >= 0.9
    assert sorted(m["mapping"].values()) == sorted({t[2] for t in ref})


@needs_espeak
@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_result_structure(conversations: dict, name: str) -> None:
    _, audio, res = conversations[name]
    assert isinstance(res, DiarizationResult)
    assert res.turns == sorted(res.turns)
    first_seen: list[str] = []
    for s, e, lab in res.turns:
        assert 0.0 <= s < e <= len(audio) / SR + 1e-6
        if lab not in first_seen:
            first_seen.append(lab)
    assert first_seen == [f"SPK{i}" for i in range(res.num_speakers)] == res.speakers
    for lab in res.speakers:  # one speaker's turns never overlap each other
        own = [t for t in res.turns if t[2] == lab]
        assert all(a[1] <= b[0] + 1e-9 for a, b in zip(own, own[1:], strict=False))
    assert res.overlaps == []  # no overlapping speech in these conversations
    d = json.loads(json.dumps(res.to_dict()))
    assert d["num_speakers"] == res.num_speakers and len(d["turns"]) == len(res.turns)
    assert set(d["embeddings"]) == set(res.speakers)
    assert all(len(v) == 256 for v in d["embeddings"].values())


@needs_espeak
def test_embeddings_identify_speakers_across_conversations(conversations: dict) -> None:
    per_conv: dict[str, dict[str, np.ndarray]] = {}
    for name, (ref, audio, res) in conversations.items():
        for emb in res.embeddings.values():
            assert emb.shape == (256,) and emb.dtype == np.float32
            assert abs(float(np.linalg.norm(emb)) - 1.0) < 1e-4
        mapping = purity_coverage(ref, res.turns, len(audio) / SR)["mapping"]
        per_conv[name] = {mapping[h]: e for h, e in res.embeddings.items()}
    a, b = per_conv["2spk"], per_conv["3spk"]
    shared = sorted(set(a) & set(b))
    assert len(shared) == 2
    for spk in shared:
        same = float(a[spk] @ b[spk])
        cross = max(float(a[spk] @ b[o]) for o in b if o != spk)
        print(f"\n{spk}: same-speaker cosine {same:.3f} > best cross-speaker {cross:.3f}")
        assert same > cross


@pytest.mark.parametrize("voice", [VOICES[0], VOICES[1]])
def test_single_speaker_gives_one_speaker(tmp_path: Path, voice: str) -> None:
    if voice.startswith("espeak:") and not espeak_available():
        pytest.skip("espeak-ng not installed")
    ref = make_conversation(tmp_path / "one.wav", n_speakers=1, n_turns=8, seed=3,
                            voices=[voice])
    audio, sr = sf.read(tmp_path / "one.wav", dtype="float32")
    res = diarize(audio, sr)
    m = purity_coverage(ref, res.turns, len(audio) / sr)
    print(f"\n{voice}: speakers={res.num_speakers} coverage={m['coverage']:.3f}")
    assert res.num_speakers == 1 and res.speakers == ["SPK0"]
    assert m["coverage"] >= 0.9
    assert res.overlaps == []


def test_silence_and_empty_give_no_turns() -> None:
    rng = np.random.default_rng(0)
    for audio in (np.zeros(10 * SR, np.float32),
                  (rng.standard_normal(10 * SR) * 1e-3).astype(np.float32),
                  np.zeros(0, np.float32)):
        res = diarize(audio, SR)
        assert res.turns == [] and res.overlaps == [] and res.embeddings == {}
        assert res.to_dict()["num_speakers"] == 0


# --------------------------------------------------------------------------------------
# Options, inputs, implementation paths
# --------------------------------------------------------------------------------------


@needs_espeak
def test_speaker_count_constraints(conversations: dict) -> None:
    ref, audio, _ = conversations["3spk"]
    assert diarize(audio, SR, num_speakers=2).num_speakers == 2
    assert diarize(audio, SR, max_speakers=2).num_speakers <= 2
    res = diarize(audio, SR, threshold=de.DEFAULT_AHC_THRESHOLD)
    m = purity_coverage(ref, res.turns, len(audio) / SR)
    print(f"\nthreshold={de.DEFAULT_AHC_THRESHOLD}: speakers={res.num_speakers} "
          f"purity={m['purity']:.3f} coverage={m['coverage']:.3f}")
    assert res.num_speakers == 3 and m["purity"] >= 0.9 and m["coverage"] >= 0.9
    assert diarize(audio, SR, num_speakers=1).num_speakers == 1


def test_invalid_arguments() -> None:
    x = np.zeros(SR, np.float32)
    for kwargs in ({"num_speakers": 0}, {"min_speakers": 3, "max_speakers": 2},
                   {"step_s": 2.0, "window_s": 1.0}, {"step_s": 0.0}, {"threshold": 1.5}):
        with pytest.raises(ValueError):
            diarize(x, SR, **kwargs)
    with pytest.raises(ValueError):
        diarize(x, 0)
    with pytest.raises(ValueError):
        diarize(np.zeros((2, 2, 2), np.float32), SR)


@needs_espeak
def test_resampled_stereo_input(conversations: dict) -> None:
    ref, audio, _ = conversations["2spk"]
    x44 = np.asarray(soxr.resample(audio, SR, 44100), np.float32)
    stereo = np.stack([x44, 0.8 * x44], axis=1)
    res = diarize(stereo, 44100)
    m = purity_coverage(ref, res.turns, len(audio) / SR)
    print(f"\n44.1 kHz stereo: purity={m['purity']:.3f} coverage={m['coverage']:.3f}")
    assert res.num_speakers == 2 and m["purity"] >= 0.9 and m["coverage"] >= 0.9


@needs_espeak
def test_bounded_memory_paths(conversations: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """Small encoder batches and clustering a subset + centroid assignment (the long-audio
    path) give the same quality."""
    ref, audio, _ = conversations["3spk"]
    monkeypatch.setattr(de, "EMBED_BATCH", 7)
    monkeypatch.setattr(de, "MAX_CLUSTER_WINDOWS", 40)
    res = diarize(audio, SR)
    m = purity_coverage(ref, res.turns, len(audio) / SR)
    print(f"\nsubset clustering: purity={m['purity']:.3f} coverage={m['coverage']:.3f}")
    assert res.num_speakers == 3 and m["purity"] >= 0.9 and m["coverage"] >= 0.9


@needs_espeak
def test_long_audio_bounded_memory(conversations: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """~10 minutes (the 3-speaker conversation 10x): same quality, and the Python/numpy
    memory diarize allocates stays far below the size of the audio it is given."""
    ref, audio, _ = conversations["3spk"]
    reps, dur = 10, len(audio) / SR
    long_audio = np.tile(audio, reps)
    long_ref = [(s + i * dur, e + i * dur, lab) for i in range(reps) for s, e, lab in ref]
    monkeypatch.setattr(de, "MAX_CLUSTER_WINDOWS", 400)  # subset clustering + assignment
    de.load_models()  # keep one-time imports out of the measurement
    tracemalloc.start()
    try:
        res = diarize(long_audio, SR)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    m = purity_coverage(long_ref, res.turns, len(long_audio) / SR)
    print(f"\n{len(long_audio) / SR / 60:.1f} min: speakers={res.num_speakers} "
          f"purity={m['purity']:.3f} coverage={m['coverage']:.3f} "
          f"peak={peak / 2**20:.1f} MiB (audio {long_audio.nbytes / 2**20:.1f} MiB)")
    assert res.num_speakers == 3 and m["purity"] >= 0.9 and m["coverage"] >= 0.9
    assert peak < 0.5 * long_audio.nbytes


@needs_espeak
def test_streamed_long_audio_reads_bounded_chunks(conversations: dict) -> None:
    """``diarize_stream`` (how the diarize stage reads a long recording) over 3.5 min
    with 20 s chunks: no read is longer than a chunk, the VAD regions cut by chunk
    boundaries are joined again, and the result is the in-memory one's (speakers,
    purity/coverage against the truth and against the whole-audio result)."""
    ref, audio, _ = conversations["3spk"]
    reps, dur = 3, len(audio) / SR
    long_audio = np.tile(audio, reps)
    long_ref = [(s + i * dur, e + i * dur, lab) for i in range(reps) for s, e, lab in ref]
    reads: list[int] = []

    def read(a: int, b: int) -> np.ndarray:
        reads.append(b - a)
        return long_audio[a:b]

    whole = diarize(long_audio, SR)
    res = de.diarize_stream(read, len(long_audio), chunk_s=20.0)
    total = len(long_audio) / SR
    m = purity_coverage(long_ref, res.turns, total)
    same = purity_coverage(whole.turns, res.turns, total)
    print(f"\n{total:.0f} s in {len(reads)} reads (longest {max(reads) / SR:.1f} s): "
          f"purity={m['purity']:.3f} coverage={m['coverage']:.3f}; vs in-memory "
          f"{same['purity']:.3f}/{same['coverage']:.3f}")
    assert max(reads) <= 20 * SR and len(reads) >= 2 * total / 20
    assert res.num_speakers == whole.num_speakers == 3
    assert m["purity"] >= 0.9 and m["coverage"] >= 0.9
    assert same["purity"] >= 0.95 and same["coverage"] >= 0.95
    # a region is never left split at a chunk boundary: the chunked VAD's regions are the
    # whole signal's, give or take the VAD's own padding
    whole_regions = vad.speech_regions_16k(long_audio)
    chunked = vad.speech_regions_chunked(lambda a, b: long_audio[a:b], len(long_audio),
                                         20 * SR)
    assert abs(len(chunked) - len(whole_regions)) <= 2
    speech = sum(e - s for s, e in whole_regions)
    assert abs(sum(e - s for s, e in chunked) - speech) <= 0.02 * speech


@needs_espeak
def test_speech_regions(conversations: dict) -> None:
    import torch

    ref, audio, _ = conversations["2spk"]
    n_threads = torch.get_num_threads()
    regions = speech_regions(audio, SR)
    assert torch.get_num_threads() == n_threads  # silero's import side effect is undone
    ref_mask = _frames(ref, len(audio) // 160 + 1)[1].any(axis=0)
    vad_mask = _frames([(s, e, "x") for s, e in regions], len(audio) // 160 + 1)[1][0]
    assert regions == sorted(regions) and all(s < e for s, e in regions)
    assert (ref_mask & vad_mask).sum() >= 0.95 * ref_mask.sum()  # speech found
    assert (vad_mask & ~ref_mask).sum() <= 0.1 * vad_mask.sum()  # little else


@needs_espeak
def test_thread_safe(conversations: dict) -> None:
    results: dict[str, DiarizationResult] = {}
    errors: list[BaseException] = []

    def work(name: str) -> None:
        try:
            results[name] = diarize(conversations[name][1], SR)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in CONVERSATIONS]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for name, (_, _, expected) in conversations.items():
        got = results[name]
        assert [t[2] for t in got.turns] == [t[2] for t in expected.turns]
        assert np.allclose([t[:2] for t in got.turns], [t[:2] for t in expected.turns],
                           atol=0.01)


@needs_espeak
def test_overlapping_speech_is_flagged(tmp_path: Path) -> None:
    ref = make_conversation(tmp_path / "ov.wav", n_speakers=2, seed=0, overlap_s=0.8)
    audio, sr = sf.read(tmp_path / "ov.wav", dtype="float32")
    res = diarize(audio, sr)
    m = purity_coverage(ref, res.turns, len(audio) / sr)
    true_ov = _true_overlaps(ref)
    n = int(np.ceil(len(audio) / sr * 100)) + 1
    near = np.zeros(n, dtype=bool)  # true overlaps, +-0.5 s tolerance
    for s, e in true_ov:
        near[max(0, int((s - 0.5) * 100)):int((e + 0.5) * 100)] = True
    flagged = np.zeros(n, dtype=bool)
    for s, e in res.overlaps:
        flagged[int(round(s * 100)):int(round(e * 100))] = True
    hits = sum(any(min(e, b) > max(s, a) for s, e in res.overlaps) for a, b in true_ov)
    print(f"\noverlap 0.8 s: speakers={res.num_speakers} purity={m['purity']:.3f} "
          f"coverage={m['coverage']:.3f} flagged={flagged.sum() / 100:.1f}s "
          f"true overlaps hit {hits}/{len(true_ov)}")
    assert res.num_speakers == 2
    assert m["purity"] >= 0.75 and m["coverage"] >= 0.75
    assert res.overlaps and hits >= 1
    assert (flagged & near).sum() >= 0.9 * flagged.sum()
    first_seen: list[str] = []
    for _, _, lab in res.turns:
        if lab not in first_seen:
            first_seen.append(lab)
    assert first_seen == ["SPK0", "SPK1"] == res.speakers
    for lab in res.speakers:  # overlap adds turns of the other speaker, never of oneself
        own = [t for t in res.turns if t[2] == lab]
        assert all(a[1] <= b[0] + 1e-9 for a, b in zip(own, own[1:], strict=False))
    for s, e in res.overlaps:  # every overlap region is where two speakers' turns overlap
        mid = (s + e) / 2
        assert len({lab for a, b, lab in res.turns if a <= mid <= b}) == 2
