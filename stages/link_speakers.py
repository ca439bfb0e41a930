"""Stage ``link_speakers``: run-wide speaker ids from per-file speaker embeddings.

Diarization labels (``SPK0``...) mean nothing across files. Before any batch, the
engine's ``prepare`` pass collects one embedding per (file, local speaker) over the whole
input and clusters them: average-linkage agglomerative clustering on cosine similarity,
cut at ``threshold``, exactly for up to ``exact_max`` local speakers; beyond that in
passes over chunks of ``exact_max`` (similar voices grouped by a random projection),
clustered in parallel -- as Ray tasks across the cluster under the Ray executor -- and
merged until nothing merges (see :func:`_cluster`). Every segment then gets ``speaker`` = the global id
(``spk-`` + a hash of the cluster's first member), ``speaker_local`` keeps the file-level
label, and ``speaker_similarity`` the cosine to its global centroid. The per-row
``speaker_embedding`` (256 floats) is dropped unless ``keep_embeddings``: one table of
global speakers (``speaker``, ``n_local``, ``locals``, centroid ``embedding``) is written
to ``stages/<id>/speakers.parquet`` instead (a voice bank can read it).
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import pyarrow as pa
from pydantic import Field

from speechmill.pipeline.stage import Resources, Stage, StageConfig, StageContext


class LinkSpeakersConfig(StageConfig):
    threshold: float = Field(
        0.75, gt=-1, lt=1, description="cosine similarity above which two local speakers "
        "are the same person"
    )
    exact_max: int = Field(5000, ge=2, description="local speakers clustered exactly at "
                           "once; more are clustered in parallel chunks of this size")
    keep_embeddings: bool = Field(False, description="keep each row's speaker_embedding "
                                  "(2 KB per row); the per-speaker centroids are always in "
                                  "speakers.parquet")


def _exact(emb: np.ndarray, threshold: float) -> np.ndarray:
    """Average-linkage clustering on cosine distance cut at ``1 - threshold``; labels
    numbered by first appearance (deterministic)."""
    if emb.shape[0] == 1:
        return np.zeros(1, np.int64)
    from scipy.cluster.hierarchy import fcluster, linkage

    z = linkage(emb, method="average", metric="cosine")
    raw = fcluster(z, t=1.0 - threshold, criterion="distance")
    _, first, inv = np.unique(raw, return_index=True, return_inverse=True)
    rank = np.empty(len(first), np.int64)
    rank[np.argsort(first)] = np.arange(len(first))
    return rank[inv.ravel()]


def _map_chunks(fn: Any, chunks: list[np.ndarray], threshold: float) -> list[np.ndarray]:
    """``fn(chunk, threshold)`` for every chunk: as Ray tasks across the cluster when
    this process runs Ray (the Ray executor), else on a local thread pool."""
    try:
        import ray

        if ray.is_initialized() and len(chunks) > 1:
            remote = ray.remote(num_cpus=1)(fn)
            return list(ray.get([remote.remote(c, threshold) for c in chunks]))
    except ImportError:
        pass
    import os
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=max(1, min(len(chunks), os.cpu_count() or 1))) as ex:
        return list(ex.map(lambda c: fn(c, threshold), chunks))


def _cluster(emb: np.ndarray, threshold: float, exact_max: int,
             max_passes: int = 8) -> np.ndarray:
    """Cluster unit vectors. Up to ``exact_max`` at once: :func:`_exact`. Beyond that,
    in passes: order the current cluster centroids along a seeded random direction (so
    similar voices sit near each other), cut the order into chunks of ``exact_max``,
    cluster the chunks in parallel, merge, repeat on the new centroids until a pass
    merges nothing or they fit one exact clustering. Memory is O(exact_max^2) per chunk,
    work parallel across chunks; deterministic for the same input."""
    n = emb.shape[0]
    if n <= exact_max:
        return _exact(emb, threshold)
    labels = np.arange(n, dtype=np.int64)  # current cluster of every input vector
    cents = emb.astype(np.float64, copy=True)
    rng = np.random.default_rng(0)
    for _ in range(max_passes):
        m = cents.shape[0]
        if m <= exact_max:
            top = _exact(cents, threshold)
            return top[labels]
        order = np.argsort(cents @ rng.standard_normal(cents.shape[1]), kind="stable")
        chunks = [order[a:a + exact_max] for a in range(0, m, exact_max)]
        sub = _map_chunks(_exact, [cents[c] for c in chunks], threshold)
        new_of = np.empty(m, np.int64)
        base = 0
        for c, lab in zip(chunks, sub, strict=True):
            new_of[c] = lab + base
            base += int(lab.max()) + 1
        if base == m:  # nothing merged in this pass
            break
        sums = np.zeros((base, cents.shape[1]))
        np.add.at(sums, new_of, cents)
        cents = sums / np.maximum(np.linalg.norm(sums, axis=1, keepdims=True), 1e-12)
        labels = new_of[labels]
    # renumber by first appearance
    _, first, inv = np.unique(labels, return_index=True, return_inverse=True)
    rank = np.empty(len(first), np.int64)
    rank[np.argsort(first)] = np.arange(len(first))
    return rank[inv.ravel()]


class LinkSpeakers(Stage):
    name = "link_speakers"
    description = "cluster per-file speakers across the run into global speaker ids"
    Config = LinkSpeakersConfig
    resources = Resources(cpus=1)
    default_batch_size = 512

    config: LinkSpeakersConfig

    prepare_columns = ("speaker", "speaker_embedding")

    @classmethod
    def prepare(cls, config: StageConfig, inputs: pa.Table,
                ctx: StageContext | None = None) -> Any:
        assert isinstance(config, LinkSpeakersConfig)
        if inputs.num_rows == 0 or "speaker_embedding" not in inputs.column_names:
            return {"map": {}}
        firsts: dict[str, list[float]] = {}
        for spk, e in zip(inputs.column("speaker").to_pylist(),
                          inputs.column("speaker_embedding").to_pylist(), strict=True):
            if spk is not None and e is not None and spk not in firsts:
                firsts[spk] = e
        keys = sorted(firsts)  # deterministic order => deterministic ids
        if not keys:
            return {"map": {}}
        emb = np.asarray([firsts[k] for k in keys], dtype=np.float64)
        emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
        labels = _cluster(emb, config.threshold, config.exact_max)
        mapping: dict[str, tuple[str, float]] = {}
        table: dict[str, list[Any]] = {"speaker": [], "n_local": [], "locals": [],
                                       "embedding": []}
        for lab in np.unique(labels):
            idx = np.flatnonzero(labels == lab)
            cent = emb[idx].mean(axis=0)
            cent /= max(float(np.linalg.norm(cent)), 1e-12)
            gid = "spk-" + hashlib.sha256(keys[idx[0]].encode()).hexdigest()[:12]
            for i in idx:
                mapping[keys[i]] = (gid, float(emb[i] @ cent))
            table["speaker"].append(gid)
            table["n_local"].append(len(idx))
            table["locals"].append([keys[i] for i in idx])
            table["embedding"].append(cent.astype(np.float32).tolist())
        if ctx is not None:
            from speechmill.pipeline.store import open_store

            t = pa.table(table).sort_by("speaker")
            open_store(ctx.run_dir).write_stage_table(ctx.stage_id, "speakers.parquet", t)
        return {"map": mapping}

    def process_row(self, row: dict[str, Any]) -> dict[str, Any]:
        local = row.get("speaker")
        gid, sim = (self.ctx.prepared or {}).get("map", {}).get(local, (None, None))
        out = {**row, "parent_id": row["id"]}
        if not self.config.keep_embeddings:
            out.pop("speaker_embedding", None)
        out["speaker_local"] = row.get("speaker_local") or local
        if gid is not None:
            out["speaker"] = gid
            out["speaker_similarity"] = sim
        return out
