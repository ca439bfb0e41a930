"""k-means units: the numpy k-means, the frame sampler, codebook files, dedup, and the
offline ``kmeans-mel`` tokenizer on real speech, a tone and noise."""

from __future__ import annotations

import numpy as np
import pytest

from speechmill.manifests.tokenizers import base
from speechmill.manifests.tokenizers import kmeans_mel as km
from speechmill.manifests.tokenizers.base import AudioTokenizerConfig
from speechmill.manifests.tokenizers.kmeans import (
    FrameSampler,
    assign,
    codebook_hash,
    dedup_consecutive,
    fit_codebook,
    fit_kmeans,
    load_codebook,
    save_codebook,
)
from testkit.audio import load_speech

SR = 16000


def _blobs(seed: int = 0, n_per: int = 300, k: int = 6, d: int = 5):
    rng = np.random.default_rng(seed)
    centers = rng.uniform(-50, 50, size=(k, d))
    x = np.concatenate([c + rng.standard_normal((n_per, d)) for c in centers])
    truth = np.repeat(np.arange(k), n_per)
    perm = rng.permutation(x.shape[0])
    return x[perm].astype(np.float32), truth[perm], centers


def _assert_bijection(lab: np.ndarray, truth: np.ndarray, k: int) -> None:
    """The found labels and the true groups correspond one to one: k distinct labels,
    k distinct groups, and k distinct (label, group) pairs (so no label spans two groups
    and no group is split over two labels)."""
    pairs = set(zip(lab.tolist(), truth.tolist(), strict=True))
    assert len(set(lab.tolist())) == k, sorted(set(lab.tolist()))
    assert len(set(truth.tolist())) == k
    assert len(pairs) == k, sorted(pairs)


# -- k-means ------------------------------------------------------------------------------


def test_kmeans_deterministic_for_seed_and_data():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((3000, 8)).astype(np.float32)
    c1 = fit_kmeans(x, 16, seed=7, iters=10)
    c2 = fit_kmeans(x.copy(), 16, seed=7, iters=10)
    assert c1.dtype == np.float32 and c1.shape == (16, 8)
    assert np.array_equal(c1, c2)
    assert np.array_equal(assign(x, c1), assign(x, c2))
    assert codebook_hash(c1) == codebook_hash(c2)
    c3 = fit_kmeans(x, 16, seed=8, iters=10)
    assert not np.array_equal(c1, c3)  # another seed: another local optimum
    # chunk size does not change the labels
    assert np.array_equal(assign(x, c1), assign(x, c1, chunk=97))


def test_kmeans_recovers_separated_blobs():
    x, truth, centers = _blobs()
    for seed in (0, 1, 2):
        c = fit_kmeans(x, 6, seed=seed, iters=50)
        lab = assign(x, c)
        # each found cluster is exactly one true blob (a bijection)
        _assert_bijection(lab, truth, 6)
        # and each centroid sits at a blob centre
        dist = np.linalg.norm(c[:, None, :] - centers[None], axis=2).min(axis=1)
        assert dist.max() < 0.5


def test_kmeans_large_offset_and_float64_input():
    """Features far from the origin (cancellation risk in ||x||^2 - 2x.c) and float64
    input still give the right clusters."""
    x, truth, _ = _blobs(seed=5, k=4)
    x64 = x.astype(np.float64) + 1e4
    lab = assign(x64, fit_kmeans(x64, 4, seed=0))
    _assert_bijection(lab, truth, 4)


def test_kmeans_empty_clusters_and_too_few_frames():
    # 3 distinct points, 5 clusters: duplicates are re-seeded, nothing NaN
    x = np.repeat(np.array([[0.0, 0], [10, 0], [0, 10]], np.float32), 20, axis=0)
    c = fit_kmeans(x, 5, seed=0)
    assert np.all(np.isfinite(c))
    lab = assign(x, c)
    _assert_bijection(lab, np.repeat([0, 1, 2], 20), 3)
    with pytest.raises(ValueError, match="at least k=10"):
        fit_kmeans(x[:5], 10)
    with pytest.raises(ValueError, match="NaN"):
        fit_kmeans(np.full((20, 2), np.nan), 2)
    with pytest.raises(ValueError, match="dimension"):
        assign(np.zeros((3, 4)), c)


# -- sampler ------------------------------------------------------------------------------


def test_frame_sampler_bounded_deterministic_uniform():
    rng = np.random.default_rng(0)
    utts = [np.arange(s, s + n, dtype=np.float32)[:, None].repeat(2, 1)
            for s, n in zip(np.cumsum([0, 700, 30, 2500, 1]), (700, 30, 2500, 1, 1800),
                            strict=True)]
    total = sum(u.shape[0] for u in utts)

    def sample(seed: int) -> np.ndarray:
        s = FrameSampler(max_frames=1000, seed=seed)
        for u in utts:
            s.add(u)
        s.add(np.zeros((0, 2), np.float32))  # empty utterance: ignored
        assert s.seen == total and s.utterances == 5
        return s.frames()

    a, b, c = sample(1), sample(1), sample(2)
    assert a.shape == (1000, 2) and a.dtype == np.float32
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    ids = a[:, 0].astype(int)
    assert len(set(ids.tolist())) == 1000  # each frame at most once
    assert ids.min() >= 0 and ids.max() < total
    # roughly uniform over the stream: each fifth of it holds 200 +- 60 samples
    counts = np.bincount(ids * 5 // total, minlength=5)
    assert np.all(np.abs(counts - 200) < 60), counts
    # under the bound everything is kept, in order
    s = FrameSampler(max_frames=10_000, seed=0)
    for u in utts:
        s.add(u)
    assert np.array_equal(s.frames()[:, 0], np.arange(total, dtype=np.float32))
    with pytest.raises(ValueError, match="dimension"):
        s.add(rng.standard_normal((4, 3)))


# -- codebook files -----------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".npy", ".npz"])
def test_codebook_save_load_round_trip(tmp_path, suffix):
    c = np.random.default_rng(0).standard_normal((12, 7)).astype(np.float32)
    p = tmp_path / "sub" / f"codebook{suffix}"
    h = save_codebook(p, c, {"backend": "kmeans-mel", "n_mels": 7, "seed": np.int64(3)})
    c2, meta = load_codebook(p)
    assert np.array_equal(c, c2) and c2.dtype == np.float32
    assert h == codebook_hash(c) == meta["hash"]
    assert meta["backend"] == "kmeans-mel" and meta["k"] == 12 and meta["dim"] == 7
    assert meta["seed"] == 3
    assert not list(p.parent.glob(".*tmp*"))  # atomic write left nothing behind
    # a plain .npy without meta (e.g. exported from another tool) loads too
    save_codebook(tmp_path / "bare.npy", c)
    assert load_codebook(tmp_path / "bare.npy")[1] == {"hash": h}
    with pytest.raises(FileNotFoundError):
        load_codebook(tmp_path / "missing.npy")
    with pytest.raises(ValueError, match=".npy or .npz"):
        save_codebook(tmp_path / "c.txt", c)
    np.save(tmp_path / "bad.npy", np.zeros(5))
    with pytest.raises(ValueError, match=r"\[k, d\]"):
        load_codebook(tmp_path / "bad.npy")


def test_codebook_hash_changes_with_content():
    c = np.ones((4, 3), np.float32)
    d = c.copy()
    d[2, 1] = np.nextafter(np.float32(1), np.float32(2))
    assert codebook_hash(c) != codebook_hash(d)
    assert codebook_hash(c) != codebook_hash(c.reshape(3, 4))
    assert codebook_hash(c) == codebook_hash(c.astype(np.float64))
    assert codebook_hash(c).startswith("km-") and len(codebook_hash(c)) == 19


# -- dedup --------------------------------------------------------------------------------


def test_dedup_consecutive():
    assert dedup_consecutive([5, 5, 7, 7, 7, 5, 1, 1]) == [5, 7, 5, 1]
    assert dedup_consecutive([]) == []
    a = np.array([[3, 3, 3, 4, 3]])
    out, counts = dedup_consecutive(a, return_counts=True)
    assert out.shape == (1, 3) and out.tolist() == [[3, 4, 3]]
    assert counts.tolist() == [3, 1, 1]
    assert np.array_equal(np.repeat(out[0], counts), a[0])
    assert dedup_consecutive(dedup_consecutive(np.array([1, 1, 2]))).tolist() == [1, 2]
    with pytest.raises(ValueError):
        dedup_consecutive(np.zeros((2, 3), int))


# -- kmeans-mel ---------------------------------------------------------------------------


def _tone(seconds: float, hz: float = 440.0, sr: int = SR) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    return (0.5 * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def _noise(seconds: float, seed: int = 0, sr: int = SR) -> np.ndarray:
    return (0.3 * np.random.default_rng(seed).standard_normal(int(seconds * sr))).astype(
        np.float32)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A kmeans-mel codebook fitted on 30 s of real speech plus a tone and noise."""
    speech = load_speech(30.0, SR, seed=0)
    clips = [(speech, SR), (_tone(6.0), SR), (_noise(6.0), SR)]
    cfg = AudioTokenizerConfig(backend="kmeans-mel", n_units=32, n_mels=40,
                               fit_max_frames=1200, seed=0)
    tok = km.load(cfg, offline=True)
    meta: dict = {}
    centroids = fit_codebook(tok, clips, cfg, meta_out=meta)
    path = tmp_path_factory.mktemp("cb") / "kmeans_mel.npz"
    save_codebook(path, centroids, meta)
    return tok, cfg, centroids, meta, path


def test_kmeans_mel_fit_records_identity(fitted):
    tok, cfg, centroids, meta, _ = fitted
    assert centroids.shape == (32, 40)
    assert tok.codebook is not None and np.array_equal(tok.codebook, centroids)
    assert meta["frames_used"] == 1200 and meta["frames_seen"] > 2000  # bounded sample
    assert meta["clips"] == 3 and meta["features"]["n_mels"] == 40
    info = tok.info
    assert info.name == "kmeans-mel" and info.version == codebook_hash(centroids)
    assert info.sample_rate == 16000 and info.frame_rate == 50.0
    assert info.codebook_sizes == [32] and info.n_codebooks == 1
    assert info.extra["hop_length"] == 320
    # the same clips again give the same codebook
    again = km.load(cfg)
    clips = [(load_speech(30.0, SR, seed=0), SR), (_tone(6.0), SR), (_noise(6.0), SR)]
    assert np.array_equal(fit_codebook(again, clips, cfg), centroids)


def test_kmeans_mel_separates_tone_noise_speech(fitted):
    tok = fitted[0]
    speech = load_speech(12.0, SR, seed=4)  # other content than the fit's
    tone = _tone(3.0)
    noise = _noise(3.0, seed=9)  # other noise than the fit's
    u_speech, u_tone, u_noise = (tok.encode(a, SR)[0] for a in (speech, tone, noise))

    def top(u: np.ndarray, share: float = 0.9) -> set[int]:
        vals, cnt = np.unique(u, return_counts=True)
        order = np.argsort(-cnt, kind="stable")
        keep = np.cumsum(cnt[order]) <= share * u.size + cnt[order][0]
        return set(vals[order][keep].tolist())

    t_units, n_units = top(u_tone), top(u_noise)
    assert len(t_units) <= 3 and len(n_units) <= 4  # stationary sounds: few units
    assert not t_units & n_units  # the tone and the noise share no unit
    # speech is mostly other units than the tone's and the noise's
    assert np.isin(u_speech, list(t_units | n_units)).mean() < 0.2
    assert len(np.unique(u_speech)) >= 12  # speech uses many units


def test_kmeans_mel_encode_shape_rate_and_determinism(fitted):
    tok = fitted[0]
    for seconds, sr in ((3.0, 16000), (2.37, 44100), (1.0, 8000), (5.0, 24000)):
        audio = load_speech(seconds, sr, seed=1)
        u = tok.encode(audio, sr)
        assert u.shape[0] == 1 and u.dtype == np.int64
        assert abs(u.shape[1] - seconds * tok.info.frame_rate) <= 1, (seconds, sr, u.shape)
        assert u.min() >= 0 and u.max() < 32
        assert np.array_equal(u, tok.encode(audio.copy(), sr))  # same audio, same units
    assert tok.encode(np.zeros(0, np.float32), SR).shape == (1, 0)
    assert tok.encode(np.zeros(100, np.float32), SR).shape == (1, 1)
    assert km.expected_frames(3.0) == 149 and km.n_frames(16000) == 49
    with pytest.raises(ValueError, match="NaN"):
        tok.encode(np.array([0.0, np.nan] * 400, np.float32), SR)
    with pytest.raises(ValueError, match="mono"):
        tok.encode(np.zeros((2, 800), np.float32), SR)


def test_kmeans_mel_loader_codebook_key(fitted, tmp_path):
    tok, cfg, centroids, _, path = fitted
    assert base._AUDIO["kmeans-mel"] is km.load  # registered at import
    # through the public entry point the tokenize stage uses
    loaded = base.load_audio_tokenizer(
        AudioTokenizerConfig(backend="kmeans-mel", n_mels=40, codebook=str(path)), offline=True)
    assert isinstance(loaded, km.KMeansMelTokenizer)
    assert np.array_equal(loaded.codebook, centroids)
    assert loaded.info.version == tok.info.version and loaded.info.codebook_sizes == [32]
    audio = load_speech(2.0, SR, seed=2)
    assert np.array_equal(loaded.encode(audio, SR), tok.encode(audio, SR))
    # dedup: consecutive repeats dropped in encode, recorded in the identity
    dd = km.load(AudioTokenizerConfig(n_mels=40, codebook=str(path), dedup=True))
    full, short = tok.encode(audio, SR)[0], dd.encode(audio, SR)[0]
    assert short.tolist() == dedup_consecutive(full.tolist()) and short.size < full.size
    assert dd.info.extra["dedup"] is True and tok.info.extra["dedup"] is False
    # missing file: a ValueError naming the key
    with pytest.raises(ValueError, match="`codebook`.*does not exist"):
        km.load(AudioTokenizerConfig(codebook=str(tmp_path / "nope.npy")))
    # n_mels that does not match the codebook's features
    with pytest.raises(ValueError, match="n_mels"):
        km.load(AudioTokenizerConfig(n_mels=80, codebook=str(path)))
    # unfitted: features work, encode says what to do
    bare = km.load(AudioTokenizerConfig(n_units=64, n_mels=40))
    assert bare.codebook is None and bare.info.version == "unfitted"
    assert bare.info.codebook_sizes == [64]
    assert bare.features(audio, SR).shape == (99, 40)
    with pytest.raises(RuntimeError, match="codebook"):
        bare.encode(audio, SR)
    bare.codebook = centroids  # the stage's fit may also set it directly
    assert bare.info.version == tok.info.version
    with pytest.raises(ValueError, match="dimension"):
        bare.codebook = np.zeros((8, 80), np.float32)
    # too little audio for the codebook size
    with pytest.raises(ValueError, match="n_units"):
        fit_codebook(km.load(AudioTokenizerConfig(n_units=500, n_mels=40)),
                     [(audio, SR)], AudioTokenizerConfig(n_units=500, n_mels=40))
    with pytest.raises(ValueError, match="no audio"):
        fit_codebook(bare, [], cfg)
