"""Deterministic k-means for discrete speech units (log-mel units, HuBERT units).

numpy/scipy only. Everything here is a pure function of its inputs and a seed: the same
frames in the same order with the same seed give bit-identical centroids and labels on
the same machine (numpy's default ``PCG64`` generator, no threads of our own, stable
tie-breaking: the lowest centroid index wins).

Shapes: ``frames`` are ``[n, d]`` feature vectors, ``centroids`` are ``[k, d]`` float32,
``labels`` are ``[n]`` int64 in ``[0, k)``.

Numerics: distances are ``||c||^2 - 2 x.c`` (the ``||x||^2`` term does not change the
argmin, so large feature norms cannot cancel away the differences), computed in float32
GEMMs on data centred on the centroids' mean, ``chunk`` rows at a time so memory stays
bounded (about 64 MB of distances) for any number of frames. Centroid sums and inertia
are accumulated in float64.

The tokenize stage's driver-side fit calls :func:`fit_codebook`: it streams the corpus'
clips through the tokenizer's ``features()``, keeps a bounded uniform sample with
:class:`FrameSampler` (``cfg.fit_max_frames``), and fits ``cfg.n_units`` centroids with
``cfg.seed``. Codebooks are saved as ``.npy`` (centroids, meta in a ``.json`` sidecar) or
``.npz`` (``centroids`` + ``meta`` JSON) and named by :func:`codebook_hash`.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

__all__ = [
    "FrameSampler",
    "assign",
    "codebook_hash",
    "dedup_consecutive",
    "fit_codebook",
    "fit_kmeans",
    "load_codebook",
    "save_codebook",
]

#: bytes of float32 distances one assignment chunk may hold
_CHUNK_BYTES = 64 * 1024 * 1024


def _chunk_rows(k: int, chunk: int | None) -> int:
    if chunk is not None:
        return max(1, int(chunk))
    return max(256, _CHUNK_BYTES // (4 * max(1, k)))


def _as_frames(frames: np.ndarray, name: str = "frames") -> np.ndarray:
    x = np.asarray(frames)
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D [n, d], got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.number):
        raise ValueError(f"{name} must be numeric, got {x.dtype}")
    return x


def _assign_chunked(x: np.ndarray, c: np.ndarray, chunk: int | None = None
                    ) -> tuple[np.ndarray, np.ndarray]:
    """``(labels [n] int64, squared distance to the nearest centroid [n] float64)``."""
    n, k = x.shape[0], c.shape[0]
    mu = c.astype(np.float64).mean(axis=0)
    cc = (c.astype(np.float64) - mu).astype(np.float32)
    c2 = np.einsum("kd,kd->k", cc, cc, dtype=np.float64).astype(np.float32)
    labels = np.empty(n, np.int64)
    mind = np.empty(n, np.float64)
    step = _chunk_rows(k, chunk)
    for s in range(0, n, step):
        xc = (x[s : s + step].astype(np.float64) - mu).astype(np.float32)
        d = xc @ cc.T  # [m, k] float32
        d *= -2.0
        d += c2
        lab = np.argmin(d, axis=1)
        labels[s : s + step] = lab
        x2 = np.einsum("md,md->m", xc, xc, dtype=np.float64)
        mind[s : s + step] = np.maximum(d[np.arange(lab.size), lab].astype(np.float64) + x2, 0.0)
    return labels, mind


def assign(frames: np.ndarray, centroids: np.ndarray, chunk: int | None = None) -> np.ndarray:
    """Index of the nearest centroid for each frame: ``[n, d], [k, d] -> [n]`` int64.

    Chunked over rows (``chunk`` rows at a time; default keeps ~64 MB of distances), so
    it runs in bounded memory for millions of frames. Ties go to the lowest index."""
    x = _as_frames(frames)
    c = _as_frames(centroids, "centroids")
    if x.shape[1] != c.shape[1]:
        raise ValueError(f"frames have dimension {x.shape[1]} but centroids {c.shape[1]}")
    if c.shape[0] == 0:
        raise ValueError("centroids is empty")
    if x.shape[0] == 0:
        return np.zeros(0, np.int64)
    return _assign_chunked(x, c, chunk)[0]


def _kmeans_pp(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Greedy k-means++ (``2 + ln k`` candidates per step, as scikit-learn) on ``x``
    (float64, already centred); returns ``[k, d]`` float64."""
    n = x.shape[0]
    trials = 2 + int(math.log(k))
    x2 = np.einsum("nd,nd->n", x, x)
    centers = np.empty((k, x.shape[1]), np.float64)
    first = int(rng.integers(n))
    centers[0] = x[first]
    closest = np.maximum(x2 - 2.0 * (x @ x[first]) + x2[first], 0.0)
    for i in range(1, k):
        total = float(closest.sum())
        if total <= 0.0:  # fewer distinct points than k: duplicate ones (fixed later)
            cand = rng.integers(n, size=trials)
        else:
            cum = np.cumsum(closest)
            cand = np.searchsorted(cum, rng.random(trials) * cum[-1], side="right")
            cand = np.minimum(cand, n - 1)
        xc = x[cand]  # [t, d]
        dc = np.maximum(x2[None, :] - 2.0 * (xc @ x.T) + x2[cand][:, None], 0.0)  # [t, n]
        dc = np.minimum(closest[None, :], dc)
        best = int(np.argmin(dc.sum(axis=1)))
        centers[i] = x[cand[best]]
        closest = dc[best]
    return centers


def _moments(x: np.ndarray, step: int) -> tuple[np.ndarray, float]:
    """Column means (float64) and the mean per-dimension variance, in chunks (no
    full-size temporaries); raises ValueError on NaN/inf."""
    n, d = x.shape
    s1 = np.zeros(d, np.float64)
    for s in range(0, n, step):
        xc = x[s : s + step].astype(np.float64)
        if not np.all(np.isfinite(xc)):
            raise ValueError("frames contain NaN or infinite values")
        s1 += xc.sum(axis=0)
    mean = s1 / n
    s2 = np.zeros(d, np.float64)
    for s in range(0, n, step):
        xc = x[s : s + step].astype(np.float64) - mean
        s2 += np.einsum("nd,nd->d", xc, xc)
    return mean, float((s2 / n).mean())


def fit_kmeans(frames: np.ndarray, k: int, seed: int = 0, iters: int = 30, *,
               tol: float = 1e-4, init_max_frames: int | None = None,
               chunk: int | None = None) -> np.ndarray:
    """Fit ``k`` centroids to ``frames [n, d]``; returns ``[k, d]`` float32.

    k-means++ initialisation (greedy, seeded ``np.random.default_rng(seed)``) on a seeded
    subsample of at most ``init_max_frames`` frames (default ``max(10_000, 20 k)``), then
    up to ``iters`` full Lloyd iterations over all frames with chunked assignment. Stops
    early when no label changes or the centroids move less than ``tol`` times the data's
    mean variance. An empty cluster is re-seeded with the frame farthest from its
    centroid (then the next farthest, ...), so every centroid is a real one.
    Raises ValueError when ``n < k`` or the frames are not finite."""
    x = _as_frames(frames)
    n, d = x.shape
    k = int(k)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if n < k:
        raise ValueError(f"k-means needs at least k={k} frames, got {n}: give more audio "
                         "or fewer units (n_units)")
    rng = np.random.default_rng(seed)
    mean, var = _moments(x, _chunk_rows(k, chunk))
    tol_abs = tol * var if var > 0 else 0.0

    m = min(n, init_max_frames or max(10_000, 20 * k))
    idx = np.sort(rng.choice(n, size=m, replace=False)) if m < n else np.arange(n)
    centers = _kmeans_pp(x[idx].astype(np.float64) - mean, k, rng) + mean

    labels = np.full(n, -1, np.int64)
    step = _chunk_rows(k, chunk)
    for _ in range(max(1, int(iters))):
        new_labels, mind = _assign_chunked(x, centers.astype(np.float32), chunk)
        changed = int(np.count_nonzero(new_labels != labels))
        labels = new_labels
        if changed == 0:
            break
        sums = np.zeros((k, d), np.float64)
        for s in range(0, n, step):
            lab = labels[s : s + step]
            onehot = sp.csr_matrix((np.ones(lab.size), (lab, np.arange(lab.size))),
                                   shape=(k, lab.size))
            sums += onehot @ x[s : s + step].astype(np.float64)
        counts = np.bincount(labels, minlength=k).astype(np.float64)
        new_centers = centers.copy()
        full = counts > 0
        new_centers[full] = sums[full] / counts[full, None]
        empty = np.flatnonzero(~full)
        if empty.size:
            far = np.argsort(-mind, kind="stable")[: empty.size]
            new_centers[empty] = x[far].astype(np.float64)
        shift = float(((new_centers - centers) ** 2).sum(axis=1).max())
        centers = new_centers
        if shift <= tol_abs and empty.size == 0:
            break
    return np.ascontiguousarray(centers, dtype=np.float32)


class FrameSampler:
    """A uniform random sample of at most ``max_frames`` frames from a stream of
    per-utterance feature arrays (reservoir sampling, Vitter's algorithm R, vectorised).

    Memory is bounded by ``max_frames * d`` float32 whatever the corpus size. The sample
    depends only on ``seed`` and the frames in the order they were added, so a driver that
    reads clips in a fixed order fits the same codebook every time.

    >>> s = FrameSampler(max_frames=1000, seed=0)
    >>> for feats in per_utterance_features:  # each [frames_i, d]
    ...     s.add(feats)
    >>> sample = s.frames()                    # [min(seen, 1000), d] float32
    """

    def __init__(self, max_frames: int, seed: int = 0) -> None:
        if max_frames < 1:
            raise ValueError(f"max_frames must be >= 1, got {max_frames}")
        self.max_frames = int(max_frames)
        self._rng = np.random.default_rng(seed)
        self._buf: np.ndarray | None = None
        self.seen = 0  # frames offered so far
        self.utterances = 0  # add() calls with at least one frame

    @property
    def dim(self) -> int | None:
        return None if self._buf is None else int(self._buf.shape[1])

    def add(self, frames: np.ndarray) -> None:
        x = _as_frames(frames)
        if x.shape[0] == 0:
            return
        if self._buf is None:
            self._buf = np.empty((self.max_frames, x.shape[1]), np.float32)
        elif x.shape[1] != self._buf.shape[1]:
            raise ValueError(f"frames have dimension {x.shape[1]}, earlier ones "
                             f"{self._buf.shape[1]}")
        self.utterances += 1
        m, cap, seen = x.shape[0], self.max_frames, self.seen
        fill = max(0, min(m, cap - seen))
        if fill:
            self._buf[seen : seen + fill] = x[:fill]
        if fill < m:
            pos = np.arange(seen + fill, seen + m, dtype=np.int64)  # stream positions
            j = self._rng.integers(0, pos + 1)  # uniform in [0, pos]
            hit = np.flatnonzero(j < cap)
            if hit.size:
                slots = j[hit]
                # the last frame written to a slot wins (sequential algorithm R)
                uniq, first_rev = np.unique(slots[::-1], return_index=True)
                src = hit[::-1][first_rev] + fill
                self._buf[uniq] = x[src]
        self.seen += m

    def frames(self) -> np.ndarray:
        """The sample so far, ``[min(seen, max_frames), d]`` float32 (a copy)."""
        if self._buf is None:
            return np.zeros((0, 0), np.float32)
        return self._buf[: min(self.seen, self.max_frames)].copy()


def fit_codebook(tokenizer: Any, clips: Iterable[tuple[np.ndarray, int]], cfg: Any, *,
                 iters: int = 30, meta_out: dict[str, Any] | None = None) -> np.ndarray:
    """Fit a k-means codebook for a :class:`FeatureKMeansTokenizer` on a corpus.

    ``clips`` yields ``(mono float32 audio, sample_rate)`` in a fixed order; each goes
    through ``tokenizer.features(audio, sr) -> [frames, d]``, a :class:`FrameSampler`
    keeps at most ``cfg.fit_max_frames`` of them (seeded with ``cfg.seed``), and
    :func:`fit_kmeans` fits ``cfg.n_units`` centroids on the sample with ``cfg.seed``.

    Returns the centroids ``[n_units, d]`` float32 and also sets ``tokenizer.codebook``
    to them. When ``meta_out`` is a dict it is filled with what to store beside the
    codebook (:func:`save_codebook`): backend, n_units, seed, frames seen/used, clips,
    inertia per frame, the hash, and the tokenizer's ``info.extra`` (feature settings).
    Raises ValueError when there are fewer sampled frames than ``n_units``."""
    sampler = FrameSampler(cfg.fit_max_frames, seed=cfg.seed)
    n_clips = 0
    for audio, sr in clips:
        n_clips += 1
        feats = tokenizer.features(audio, sr)
        sampler.add(feats)
    sample = sampler.frames()
    if sample.shape[0] == 0:
        raise ValueError("no audio frames to fit a k-means codebook on (no clips, or all "
                         "empty)")
    if sample.shape[0] < cfg.n_units:
        raise ValueError(f"only {sample.shape[0]} feature frames from {n_clips} clip(s) to "
                         f"fit n_units={cfg.n_units} centroids: give more audio or lower "
                         "`n_units`")
    centroids = fit_kmeans(sample, cfg.n_units, seed=cfg.seed, iters=iters)
    tokenizer.codebook = centroids
    if meta_out is not None:
        _, mind = _assign_chunked(sample, centroids)
        info = getattr(tokenizer, "info", None)
        meta_out.update({
            "backend": getattr(cfg, "backend", None),
            "n_units": int(cfg.n_units),
            "dim": int(centroids.shape[1]),
            "seed": int(cfg.seed),
            "iters": int(iters),
            "fit_max_frames": int(cfg.fit_max_frames),
            "frames_seen": int(sampler.seen),
            "frames_used": int(sample.shape[0]),
            "clips": n_clips,
            "inertia_per_frame": float(mind.mean()),
            "hash": codebook_hash(centroids),
            "features": dict(getattr(info, "extra", {}) or {}),
        })
    return centroids


def codebook_hash(centroids: np.ndarray) -> str:
    """``"km-"`` + 16 hex digits of sha256 over the float32 little-endian centroids and
    their shape: the codebook's identity (``CodecInfo.version``)."""
    c = np.ascontiguousarray(np.asarray(centroids), dtype="<f4")
    h = hashlib.sha256(f"{c.shape[0]}x{c.shape[1] if c.ndim > 1 else 0}:".encode())
    h.update(c.tobytes())
    return "km-" + h.hexdigest()[:16]


def _is_url(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def _local(path: str) -> str:
    return path[len("file://"):] if path.startswith("file://") else path


def _write_bytes(path: str, data: bytes) -> None:
    if _is_url(path):
        import fsspec

        with fsspec.open(path, "wb") as f:
            f.write(data)
        return
    p = Path(_local(path)).expanduser()
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, p)


def _read_bytes(path: str) -> bytes:
    if _is_url(path):
        import fsspec

        with fsspec.open(path, "rb") as f:
            return f.read()
    with open(Path(_local(path)).expanduser(), "rb") as f:
        return f.read()


def _exists(path: str) -> bool:
    if _is_url(path):
        import fsspec

        fs, p = fsspec.core.url_to_fs(path)
        return bool(fs.exists(p))
    return Path(_local(path)).expanduser().exists()


def _suffix(path: str) -> str:
    s = Path(path.split("?", 1)[0]).suffix.lower()
    if s not in (".npy", ".npz"):
        raise ValueError(f"codebook {path!r}: expected a .npy or .npz file")
    return s


def _check_centroids(c: np.ndarray, where: str) -> np.ndarray:
    c = np.asarray(c)
    if c.ndim != 2 or c.shape[0] < 1 or c.shape[1] < 1:
        raise ValueError(f"codebook {where}: centroids must be [k, d], got shape {c.shape}")
    if not np.issubdtype(c.dtype, np.floating) and not np.issubdtype(c.dtype, np.integer):
        raise ValueError(f"codebook {where}: centroids must be numeric, got {c.dtype}")
    c = np.ascontiguousarray(c, dtype=np.float32)
    if not np.all(np.isfinite(c)):
        raise ValueError(f"codebook {where}: centroids contain NaN or infinite values")
    return c


def save_codebook(path: str | os.PathLike[str], centroids: np.ndarray,
                  meta: dict[str, Any] | None = None) -> str:
    """Write ``centroids [k, d]`` (as float32) atomically to ``path``; returns the hash.

    ``.npz``: arrays ``centroids`` and ``meta`` (a JSON string, ``{}`` when none).
    ``.npy``: the centroids, and the meta JSON in a ``<path>.json`` sidecar when given.
    The meta always gets ``hash`` (:func:`codebook_hash`), ``k`` and ``dim``. Local paths
    and fsspec URLs (``s3://...``) work."""
    path = os.fspath(path)
    suffix = _suffix(path)
    c = _check_centroids(centroids, repr(path))
    h = codebook_hash(c)
    full = {**(meta or {}), "hash": h, "k": int(c.shape[0]), "dim": int(c.shape[1])}
    text = json.dumps(full, sort_keys=True, default=_json_default)
    buf = io.BytesIO()
    if suffix == ".npz":
        np.savez(buf, centroids=c, meta=np.array(text))
        _write_bytes(path, buf.getvalue())
    else:
        np.save(buf, c)
        _write_bytes(path, buf.getvalue())
        if meta is not None:
            _write_bytes(path + ".json", text.encode())
    return h


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, os.PathLike):
        return os.fspath(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def load_codebook(path: str | os.PathLike[str]) -> tuple[np.ndarray, dict[str, Any]]:
    """``(centroids [k, d] float32, meta dict)`` from a file written by
    :func:`save_codebook` (or any ``.npy`` of shape ``[k, d]``, e.g. a fairseq/sklearn
    k-means ``cluster_centers_`` saved with numpy). Raises FileNotFoundError when missing
    and ValueError when malformed. Never unpickles."""
    path = os.fspath(path)
    suffix = _suffix(path)
    if not _exists(path):
        raise FileNotFoundError(f"codebook {path!r} does not exist")
    data = io.BytesIO(_read_bytes(path))
    meta: dict[str, Any] = {}
    try:
        if suffix == ".npz":
            with np.load(data, allow_pickle=False) as z:
                if "centroids" not in z.files:
                    raise ValueError(f"codebook {path!r}: no 'centroids' array "
                                     f"(has {sorted(z.files)})")
                c = z["centroids"]
                if "meta" in z.files:
                    meta = json.loads(str(z["meta"][()]))
        else:
            c = np.load(data, allow_pickle=False)
            side = path + ".json"
            if _exists(side):
                meta = json.loads(_read_bytes(side).decode())
    except (OSError, EOFError, json.JSONDecodeError) as e:
        raise ValueError(f"codebook {path!r}: unreadable ({type(e).__name__}: {e})") from None
    c = _check_centroids(c, repr(path))
    h = codebook_hash(c)
    if meta.get("hash") not in (None, h):
        raise ValueError(f"codebook {path!r}: centroids hash {h} does not match the "
                         f"recorded {meta['hash']} (file changed or mixed up)")
    meta.setdefault("hash", h)
    return c, meta


def dedup_consecutive(units: Any, return_counts: bool = False) -> Any:
    """Drop consecutive repeats (SpeechGPT's "merged" units): ``[5, 5, 7, 5] -> [5, 7, 5]``.

    ``units``: a 1-D sequence/array, or ``[1, T]`` (one codebook; the result keeps that
    shape). Returns the same kind (list in, list out; array in, array out). With
    ``return_counts`` returns ``(units, counts)``, the run length of each kept unit
    (SpeechGPT's durations), so ``np.repeat(units, counts)`` restores the input."""
    as_list = isinstance(units, list | tuple)
    a = np.asarray(units)
    two_d = a.ndim == 2
    if two_d:
        if a.shape[0] != 1:
            raise ValueError(f"dedup_consecutive works on one codebook; got shape {a.shape}")
        a = a[0]
    elif a.ndim != 1:
        raise ValueError(f"units must be 1-D or [1, T], got shape {a.shape}")
    if a.size == 0:
        keep = np.zeros(0, bool)
    else:
        keep = np.empty(a.size, bool)
        keep[0] = True
        np.not_equal(a[1:], a[:-1], out=keep[1:])
    out = a[keep]
    starts = np.flatnonzero(keep)
    counts = np.diff(np.append(starts, a.size)).astype(np.int64)
    if as_list:
        res: Any = out.tolist()
        cnt: Any = counts.tolist()
    else:
        res = out[None, :] if two_d else out
        cnt = counts
    return (res, cnt) if return_counts else res
