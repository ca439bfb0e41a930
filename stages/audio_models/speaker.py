"""Speaker embeddings and offline diarization from models that ship inside pip packages.

Nothing is downloaded: the Silero VAD weights come with the ``silero-vad`` package and
the GE2E speaker encoder (a 3-layer LSTM d-vector model, 256-d) with ``resemblyzer``.

Pipeline of :func:`diarize`:

1. **Audio**: mono float32 at 16 kHz
   (:func:`speechmill.stages.audio_models.vad.to_mono_16k`).
2. **VAD**: Silero speech regions (:mod:`speechmill.stages.audio_models.vad`).
3. **Embeddings**: sliding windows of ``window_s`` every ``step_s`` inside each speech
   region (a region shorter than a window is one window; the last window is aligned to
   the region end). Each window is volume-normalised like Resemblyzer's
   ``preprocess_wav`` and embedded by ``VoiceEncoder`` (cuda when available, else cpu)
   in batches of :data:`EMBED_BATCH` windows, so features for at most a few minutes of
   audio exist at once; only the 256-d embeddings (1 KiB per window) are kept.
4. **Clustering** on cosine similarity. With ``threshold=None`` (default) the number of
   speakers is chosen automatically by NME-SC (Park et al., 2019: spectral clustering
   on a p-nearest-neighbour binarised affinity, choosing the pruning ``p`` and the
   number of clusters ``k`` jointly by the normalised maximum eigengap of the graph
   Laplacian; ``k = 1`` is a candidate), after which clusters whose average pairwise
   cosine similarity is at least :data:`DEFAULT_AHC_THRESHOLD` are merged (the eigengap
   alone over-splits a single speaker on short audio). With a ``threshold`` (a cosine
   similarity), average-linkage agglomerative clustering is cut where clusters are less
   similar than it. Either way ``k`` is constrained by ``num_speakers`` /
   ``min_speakers`` / ``max_speakers`` (default at most :data:`MAX_AUTO_SPEAKERS`).
   Very few windows (< :data:`MIN_SPECTRAL_WINDOWS`) use agglomerative clustering at
   :data:`DEFAULT_AHC_THRESHOLD`. Long audio clusters at most
   :data:`MAX_CLUSTER_WINDOWS` evenly spread windows and assigns the others to the
   nearest cluster centroid, so the O(N^2) affinity stays bounded.
5. **Smoothing**: a mode (categorical median) filter of :data:`SMOOTH_WINDOWS` windows
   over consecutive windows of the same speech region.
6. **Turns**: each window owns the span between the midpoints to its neighbours' centres;
   consecutive windows with the same label are merged, and turns are always split at
   VAD gaps. Labels are ``SPK0``, ``SPK1``, ... in order of first appearance.

**Overlaps** are estimated from the clustering: a window whose embedding is ambiguous
between its own cluster and another one (cosine to the other centroid at least
:data:`OVERLAP_MIN_SIM` and within :data:`OVERLAP_MARGIN` of the best) gets an extra
turn for that other speaker over its span, so turns overlap there, and ``overlaps`` is
the union of those spans -- exactly where two turns overlap. This is a heuristic (a
GE2E embedding of mixed speech lies between the two voices); it localises overlap to
the ~``step_s`` span of a window and misses much of it (on generated conversations with
0.6-1 s overlaps, 70-80 % of the flagged time is overlapped speech and ~30 % of the
overlapped time is flagged; none is flagged without overlaps); it can also fire at a
speaker change without a pause. With one speaker it is always empty.

Models are loaded once per process (the encoder is shared, guarded by a lock while
loading; the stateful VAD is kept per thread), so :func:`diarize` is thread-safe.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from speechmill.stages.audio_models.vad import (
    CHUNK_S,
    SAMPLE_RATE,
    Reader,
    load_vad,
    speech_regions_16k,
    speech_regions_chunked,
    to_mono_16k,
)

__all__ = [
    "DEFAULT_AHC_THRESHOLD",
    "EMBED_DIM",
    "MAX_AUTO_SPEAKERS",
    "DiarizationResult",
    "diarize",
    "diarize_stream",
    "load_models",
]

#: GE2E embedding size.
EMBED_DIM = 256
#: Upper bound on the automatic number of speakers (``max_speakers`` overrides it).
MAX_AUTO_SPEAKERS = 8
#: Windows per encoder batch (bounds feature memory: 128 x 1.5 s of audio).
EMBED_BATCH = 128
#: Windows clustered directly; beyond this, a subset is clustered, the rest assigned.
MAX_CLUSTER_WINDOWS = 1200
#: Below this many windows spectral clustering is unreliable; use agglomerative.
MIN_SPECTRAL_WINDOWS = 8
#: Average-linkage cosine similarity under which clusters are different speakers: the
#: merge threshold after NME-SC and the cut for few windows (``threshold`` overrides it).
DEFAULT_AHC_THRESHOLD = 0.7
#: Mode-filter length (in windows) for label smoothing.
SMOOTH_WINDOWS = 3
#: Overlap heuristic: second-best centroid similarity floor and best-second margin.
OVERLAP_MIN_SIM = 0.6
OVERLAP_MARGIN = 0.1

_NORM_DBFS = -30.0  # Resemblyzer's audio_norm_target_dBFS


@dataclass
class DiarizationResult:
    """Who spoke when.

    ``turns``: ``(start_s, end_s, label)`` sorted by start, labels ``SPK0``, ``SPK1``, ...
    by first appearance; one speaker's turns never overlap each other, and turns of
    different speakers overlap only inside ``overlaps``. ``overlaps``: ``(start_s,
    end_s)`` regions where a second speaker is likely also talking (heuristic, see the
    module docstring). ``embeddings``: label -> L2-normalised mean GE2E embedding
    (256-d float32) of the speaker's windows (those not flagged as overlapped, if any).
    """

    turns: list[tuple[float, float, str]] = field(default_factory=list)
    overlaps: list[tuple[float, float]] = field(default_factory=list)
    embeddings: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def speakers(self) -> list[str]:
        """Speaker labels in order of first appearance."""
        return list(self.embeddings)

    @property
    def num_speakers(self) -> int:
        return len(self.embeddings)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (times rounded to ms, embeddings as lists of floats)."""
        return {
            "num_speakers": self.num_speakers,
            "turns": [{"start": round(s, 3), "end": round(e, 3), "speaker": lab}
                      for s, e, lab in self.turns],
            "overlaps": [{"start": round(s, 3), "end": round(e, 3)} for s, e in self.overlaps],
            "embeddings": {lab: [float(v) for v in emb] for lab, emb in self.embeddings.items()},
        }


# --------------------------------------------------------------------------------------
# Models (the encoder is loaded once per process)
# --------------------------------------------------------------------------------------

_load_lock = threading.Lock()
_encoder: Any = None


def _get_encoder() -> Any:
    global _encoder
    if _encoder is None:
        with _load_lock:
            if _encoder is None:
                import torch
                from resemblyzer import VoiceEncoder

                device = "cuda" if torch.cuda.is_available() else "cpu"
                enc = VoiceEncoder(device=device, verbose=False)
                enc.eval()
                _encoder = enc
    return _encoder


def load_models() -> None:
    """Load (and cache) the VAD for this thread and the shared speaker encoder, and
    import the feature code they use (librosa loads its submodules lazily)."""
    from resemblyzer.audio import wav_to_mel_spectrogram

    load_vad()
    _get_encoder()
    wav_to_mel_spectrogram(np.zeros(SAMPLE_RATE // 10, dtype=np.float32))


# --------------------------------------------------------------------------------------
# Windows and embeddings
# --------------------------------------------------------------------------------------


def _windows(regions: list[tuple[int, int]], win: int,
             step: int) -> tuple[np.ndarray, np.ndarray]:
    """Window ``(start, end)`` sample pairs and the index of the region of each."""
    bounds: list[tuple[int, int]] = []
    region_of: list[int] = []
    for r, (s, e) in enumerate(regions):
        if e - s <= win:
            starts = [s]
        else:
            starts = list(range(s, e - win, step))
            starts.append(e - win)
        for a in starts:
            bounds.append((a, min(a + win, e)))
            region_of.append(r)
    return (np.asarray(bounds, dtype=np.int64).reshape(-1, 2),
            np.asarray(region_of, dtype=np.int64))


def _normalise_volume(w: np.ndarray) -> np.ndarray:
    rms = float(np.sqrt(np.mean(np.square(w, dtype=np.float64))))
    if rms <= 1e-8:
        return w
    gain = 10 ** (_NORM_DBFS / 20) / rms
    return w * np.float32(gain) if gain > 1.0 else w  # increase only, like Resemblyzer


def _embed_windows_chunked(read: Reader, bounds: np.ndarray, chunk: int) -> np.ndarray:
    """:func:`_embed_windows` over windows read a run at a time: consecutive windows
    whose audio spans at most ``chunk`` samples share one read."""
    out = np.zeros((len(bounds), EMBED_DIM), dtype=np.float32)
    i = 0
    while i < len(bounds):
        j = i + 1
        while j < len(bounds) and bounds[j, 1] - bounds[i, 0] <= chunk:
            j += 1
        a = int(bounds[i, 0])
        b = int(bounds[i:j, 1].max())
        out[i:j] = _embed_windows(read(a, b), bounds[i:j] - a)
        i = j
    return out


def _embed_windows(x: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    """GE2E embeddings (N, 256) of the windows, in batches of :data:`EMBED_BATCH`."""
    out = np.zeros((len(bounds), EMBED_DIM), dtype=np.float32)
    if len(bounds) == 0:
        return out
    import torch
    from resemblyzer.audio import wav_to_mel_spectrogram

    enc = _get_encoder()
    for b0 in range(0, len(bounds), EMBED_BATCH):
        groups: dict[int, list[tuple[int, np.ndarray]]] = {}
        for i in range(b0, min(b0 + EMBED_BATCH, len(bounds))):
            a, b = bounds[i]
            mel = wav_to_mel_spectrogram(_normalise_volume(x[a:b]))
            groups.setdefault(mel.shape[0], []).append((i, mel))
        for items in groups.values():
            mels = torch.from_numpy(np.stack([m for _, m in items])).to(enc.device)
            with torch.inference_mode():
                emb = enc(mels).float().cpu().numpy()
            out[[i for i, _ in items]] = emb
    out = np.nan_to_num(out)
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    return out / np.maximum(norms, 1e-8)


# --------------------------------------------------------------------------------------
# Clustering
# --------------------------------------------------------------------------------------


def _kmeans(x: np.ndarray, k: int, seed: int = 0, iters: int = 100,
            restarts: int = 8) -> np.ndarray:
    """Plain k-means (k-means++ init, several restarts); deterministic for a seed."""
    n = len(x)
    if k >= n:
        return np.arange(n) % max(k, 1)
    rng = np.random.default_rng(seed)
    best: tuple[float, np.ndarray] | None = None
    for _ in range(restarts):
        centres = [x[rng.integers(n)]]
        for _ in range(1, k):
            d = np.min(((x[:, None, :] - np.asarray(centres)[None]) ** 2).sum(-1), axis=1)
            total = d.sum()
            centres.append(x[rng.choice(n, p=d / total)] if total > 0 else x[rng.integers(n)])
        c = np.asarray(centres)
        labels = np.zeros(n, dtype=np.int64)
        for _ in range(iters):
            labels = np.argmin(((x[:, None, :] - c[None]) ** 2).sum(-1), axis=1)
            new = np.asarray([x[labels == j].mean(0) if np.any(labels == j) else c[j]
                              for j in range(k)])
            if np.allclose(new, c):
                break
            c = new
        inertia = float(((x - c[labels]) ** 2).sum())
        if best is None or inertia < best[0]:
            best = (inertia, labels)
    assert best is not None
    return best[1]


def _knn_affinity(sim: np.ndarray, p: int) -> np.ndarray:
    a = np.zeros_like(sim)
    idx = np.argsort(-sim, axis=1)[:, :p]
    np.put_along_axis(a, idx, 1.0, axis=1)
    return (a + a.T) / 2


def _nme_sc(sim: np.ndarray, kmin: int, kmax: int) -> np.ndarray:
    """NME-SC: choose pruning p and k by the normalised max eigengap; spectral labels."""
    n = len(sim)
    kmax = min(kmax, n - 1)
    kmin = min(kmin, kmax)
    p_hi = max(3, n // 3)
    candidates = sorted({int(round(v)) for v in np.linspace(2, p_hi, 15)})
    best: tuple[float, int, int] | None = None
    for p in candidates:
        aff = _knn_affinity(sim, p)
        lap = np.diag(aff.sum(axis=1)) - aff
        w = np.linalg.eigvalsh(lap)
        gaps = np.diff(w[:kmax + 1])[kmin - 1:]
        k = int(np.argmax(gaps)) + kmin
        ratio = p / (float(gaps.max()) / (float(w[-1]) + 1e-10) + 1e-10)
        if best is None or ratio < best[0]:
            best = (ratio, p, k)
    assert best is not None
    _, p, k = best
    if k == 1:
        return np.zeros(n, dtype=np.int64)
    aff = _knn_affinity(sim, p)
    lap = np.diag(aff.sum(axis=1)) - aff
    _, vecs = np.linalg.eigh(lap)
    return _kmeans(vecs[:, :k], k)


def _ahc(emb: np.ndarray, kmin: int, kmax: int, threshold: float) -> np.ndarray:
    """Average-linkage clustering on cosine distance, cut at similarity ``threshold``."""
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.spatial.distance import squareform

    dist = np.clip(1.0 - emb @ emb.T, 0.0, 2.0)
    np.fill_diagonal(dist, 0.0)
    z = linkage(squareform(dist, checks=False), method="average")
    labels = fcluster(z, t=1.0 - threshold, criterion="distance") - 1
    k = int(labels.max()) + 1
    if not kmin <= k <= kmax:
        labels = fcluster(z, t=min(max(k, kmin), kmax), criterion="maxclust") - 1
    return labels.astype(np.int64)


def _cluster(emb: np.ndarray, kmin: int, kmax: int, threshold: float | None) -> np.ndarray:
    n = len(emb)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    kmax = min(kmax, n)
    kmin = min(kmin, kmax)
    if kmax <= 1 or n == 1:
        return np.zeros(n, dtype=np.int64)
    if threshold is not None or n < MIN_SPECTRAL_WINDOWS:
        thr = DEFAULT_AHC_THRESHOLD if threshold is None else threshold
        return _ahc(emb, kmin, kmax, thr)
    if kmin == kmax and kmin == n:
        return np.arange(n, dtype=np.int64)
    labels = _nme_sc(emb @ emb.T, kmin, kmax)
    return _merge_similar(emb, labels, DEFAULT_AHC_THRESHOLD, kmin)


def _merge_similar(emb: np.ndarray, labels: np.ndarray, threshold: float,
                   kmin: int) -> np.ndarray:
    """Merge the pair of clusters with the highest average pairwise cosine similarity
    while it is >= ``threshold`` and more than ``kmin`` clusters remain (guards the
    eigengap against over-splitting, e.g. of a single speaker)."""
    _, labels = np.unique(labels, return_inverse=True)
    sums = [emb[labels == j].sum(axis=0) for j in range(int(labels.max()) + 1)]
    counts = [int(np.sum(labels == j)) for j in range(len(sums))]
    groups = [[j] for j in range(len(sums))]
    while len(groups) > max(kmin, 1):
        best, pair = -np.inf, (0, 0)
        for a in range(len(groups)):
            for b in range(a + 1, len(groups)):
                sim = float(sums[a] @ sums[b]) / (counts[a] * counts[b])
                if sim > best:
                    best, pair = sim, (a, b)
        if best < threshold:
            break
        a, b = pair
        sums[a], counts[a] = sums[a] + sums[b], counts[a] + counts[b]
        groups[a] += groups[b]
        del sums[b], counts[b], groups[b]
    remap = np.zeros(len(np.unique(labels)), dtype=np.int64)
    for new, members in enumerate(groups):
        remap[members] = new
    return remap[labels]


def _cluster_bounded(emb: np.ndarray, kmin: int, kmax: int,
                     threshold: float | None) -> np.ndarray:
    """Cluster at most MAX_CLUSTER_WINDOWS windows; assign the rest to centroids."""
    n = len(emb)
    if n <= MAX_CLUSTER_WINDOWS:
        return _cluster(emb, kmin, kmax, threshold)
    pick = np.linspace(0, n - 1, MAX_CLUSTER_WINDOWS).round().astype(np.int64)
    sub = _cluster(emb[pick], kmin, kmax, threshold)
    cents = _centroids(emb[pick], sub)
    return np.argmax(emb @ cents.T, axis=1).astype(np.int64)


def _centroids(emb: np.ndarray, labels: np.ndarray, k: int | None = None) -> np.ndarray:
    """L2-normalised mean embedding per label (zero rows for empty labels)."""
    if k is None:
        k = int(labels.max()) + 1 if len(labels) else 0
    cents = np.zeros((k, emb.shape[1]), dtype=np.float32)
    for j in range(k):
        if np.any(labels == j):
            cents[j] = emb[labels == j].mean(axis=0)
    return cents / np.maximum(np.linalg.norm(cents, axis=1, keepdims=True), 1e-8)


def _mode_filter(labels: np.ndarray, groups: np.ndarray, size: int) -> np.ndarray:
    """Categorical median: each window takes the most common label of its neighbourhood
    (same group only); ties keep the window's own label."""
    if size <= 1 or len(labels) == 0:
        return labels
    half = size // 2
    out = labels.copy()
    for g in np.unique(groups):
        idx = np.flatnonzero(groups == g)
        seq = labels[idx]
        for j in range(len(seq)):
            vals, counts = np.unique(seq[max(0, j - half): j + half + 1], return_counts=True)
            top = counts.max()
            if counts[vals == seq[j]][0] < top:
                out[idx[j]] = vals[np.argmax(counts)]
    return out


# --------------------------------------------------------------------------------------
# Turns
# --------------------------------------------------------------------------------------


def _spans(bounds: np.ndarray, region_of: np.ndarray,
           regions: list[tuple[int, int]]) -> np.ndarray:
    """The part of its region each window owns (midpoints between window centres)."""
    spans = np.zeros_like(bounds)
    centres = bounds.mean(axis=1)
    for r, (rs, re_) in enumerate(regions):
        idx = np.flatnonzero(region_of == r)
        if len(idx) == 0:
            continue
        mids = ((centres[idx][:-1] + centres[idx][1:]) / 2).round().astype(np.int64)
        spans[idx, 0] = np.concatenate([[rs], mids])
        spans[idx, 1] = np.concatenate([mids, [re_]])
    return spans


def _merge_intervals(iv: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for s, e in sorted(iv):
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return out


def _runs(spans: np.ndarray, region_of: np.ndarray, labels: np.ndarray,
          keep: np.ndarray) -> list[tuple[int, int, int]]:
    """Merge consecutive kept windows with the same label in the same region into
    ``(start_sample, end_sample, cluster)`` turns."""
    out: list[tuple[int, int, int]] = []
    cur: list[int] | None = None  # [start, end, label, region, last index]
    for i in np.flatnonzero(keep):
        s, e, lab, r = int(spans[i, 0]), int(spans[i, 1]), int(labels[i]), int(region_of[i])
        if cur is not None and cur[2] == lab and cur[3] == r and cur[4] == i - 1:
            cur[1], cur[4] = e, int(i)
            continue
        if cur is not None:
            out.append((cur[0], cur[1], cur[2]))
        cur = [s, e, lab, r, int(i)]
    if cur is not None:
        out.append((cur[0], cur[1], cur[2]))
    return out


def _speaker_bounds(num_speakers: int | None, min_speakers: int | None,
                    max_speakers: int | None) -> tuple[int, int]:
    for name, v in (("num_speakers", num_speakers), ("min_speakers", min_speakers),
                    ("max_speakers", max_speakers)):
        if v is not None and v < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")
    if num_speakers is not None:
        return num_speakers, num_speakers
    kmin = min_speakers or 1
    kmax = max_speakers if max_speakers is not None else max(MAX_AUTO_SPEAKERS, kmin)
    if kmin > kmax:
        raise ValueError(f"min_speakers ({kmin}) > max_speakers ({kmax})")
    return kmin, kmax


def diarize(audio: np.ndarray, sr: int, *, min_speakers: int | None = None,
            max_speakers: int | None = None, num_speakers: int | None = None,
            window_s: float = 1.5, step_s: float = 0.75,
            threshold: float | None = None) -> DiarizationResult:
    """Diarize ``audio`` (mono, or ``(samples, channels)``; any rate ``sr``).

    ``num_speakers`` fixes the number of clusters; otherwise it is estimated within
    ``[min_speakers, max_speakers]`` (defaults 1 and :data:`MAX_AUTO_SPEAKERS`); both
    are capped by the number of windows, and smoothing can still remove a cluster of
    only one or two isolated windows.
    ``window_s``/``step_s`` set the embedding windows (``0 < step_s <= window_s``).
    ``threshold``: ``None`` picks the number of speakers by the eigengap (NME-SC);
    a cosine similarity in (-1, 1) uses average-linkage clustering cut at it instead.
    Audio without speech gives an empty result. See the module docstring for details.
    """
    if sr <= 0:
        raise ValueError(f"sr must be positive, got {sr}")
    x = to_mono_16k(audio, sr)
    return diarize_stream(lambda a, b: x[a:b], len(x), min_speakers=min_speakers,
                          max_speakers=max_speakers, num_speakers=num_speakers,
                          window_s=window_s, step_s=step_s, threshold=threshold,
                          chunk_s=max(CHUNK_S, len(x) / SAMPLE_RATE))


def diarize_stream(read: Reader, n: int, *, min_speakers: int | None = None,
                   max_speakers: int | None = None, num_speakers: int | None = None,
                   window_s: float = 1.5, step_s: float = 0.75,
                   threshold: float | None = None, chunk_s: float = CHUNK_S
                   ) -> DiarizationResult:
    """:func:`diarize` of ``n`` samples of mono 16 kHz float32 audio that ``read(a, b)``
    returns piece by piece (e.g. :class:`speechmill.pipeline.audio.AudioReader`): the
    VAD and the speaker encoder see at most ``chunk_s`` seconds at once, and only the
    windows' embeddings (1 KiB each) are kept, so memory does not grow with ``n``.
    Audio of at most ``chunk_s`` is read once and gives :func:`diarize`'s result."""
    kmin, kmax = _speaker_bounds(num_speakers, min_speakers, max_speakers)
    if not 0 < step_s <= window_s:
        raise ValueError("need 0 < step_s <= window_s")
    if threshold is not None and not -1.0 < threshold < 1.0:
        raise ValueError("threshold is a cosine similarity in (-1, 1)")
    chunk = max(int(chunk_s * SAMPLE_RATE), SAMPLE_RATE)
    if n <= chunk:  # one read serves the VAD and the embeddings
        x = read(0, n)
        regions = speech_regions_16k(x)

        def read(a: int, b: int) -> np.ndarray:
            return x[a:b]
    else:
        regions = speech_regions_chunked(read, n, chunk)
    if not regions:
        return DiarizationResult()
    win = max(1, int(round(window_s * SAMPLE_RATE)))
    step = max(1, int(round(step_s * SAMPLE_RATE)))
    bounds, region_of = _windows(regions, win, step)
    emb = _embed_windows_chunked(read, bounds, chunk)

    labels = _cluster_bounded(emb, kmin, kmax, threshold)
    labels = _mode_filter(labels, region_of, SMOOTH_WINDOWS)
    _, labels = np.unique(labels, return_inverse=True)
    labels = labels.astype(np.int64)
    cents = _centroids(emb, labels)
    spans = _spans(bounds, region_of, regions)

    # overlap heuristic: the best *other* cluster is nearly as similar as the best one
    flagged = np.zeros(len(labels), dtype=bool)
    other = np.zeros(len(labels), dtype=np.int64)
    if len(cents) >= 2:
        sims = emb @ cents.T
        masked = sims.copy()
        masked[np.arange(len(labels)), labels] = -np.inf
        other = np.argmax(masked, axis=1)
        second = masked[np.arange(len(labels)), other]
        flagged = (second >= OVERLAP_MIN_SIM) & (sims.max(axis=1) - second <= OVERLAP_MARGIN)

    raw = sorted(_runs(spans, region_of, labels, np.ones(len(labels), dtype=bool))
                 + _runs(spans, region_of, other, flagged))
    order: dict[int, int] = {}  # cluster -> rank of first appearance
    for _, _, lab in raw:
        order.setdefault(lab, len(order))
    turns = [(s / SAMPLE_RATE, e / SAMPLE_RATE, f"SPK{order[lab]}") for s, e, lab in raw]
    overlaps = [(s / SAMPLE_RATE, e / SAMPLE_RATE) for s, e in _merge_intervals(
        [(int(spans[i, 0]), int(spans[i, 1])) for i in np.flatnonzero(flagged)])]
    # speaker embeddings from the unambiguous windows (all of them if none are)
    clean = _centroids(emb[~flagged], labels[~flagged], len(cents))
    embeddings: dict[str, np.ndarray] = {}
    for lab, rank in sorted(order.items(), key=lambda kv: kv[1]):
        vec = clean[lab] if np.any(labels[~flagged] == lab) else cents[lab]
        embeddings[f"SPK{rank}"] = vec.astype(np.float32)
    return DiarizationResult(turns=turns, overlaps=overlaps, embeddings=embeddings)
