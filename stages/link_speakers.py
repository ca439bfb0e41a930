"""Stage ``link_speakers``: run-wide speaker ids from per-file speaker embeddings.

Diarization labels (``SPK0``...) mean nothing across files. Before any batch, the
engine's ``prepare`` pass collects one embedding per (file, local speaker) over the whole
input and clusters them: average-linkage agglomerative clustering on cosine similarity,
cut at ``threshold`` (for up to ``exact_max`` speakers), or, beyond that, a leader
(online centroid) clustering in a deterministic order, so memory and time stay linear
in the number of local speakers. Every segment then gets ``speaker`` = the global id
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
    exact_max: int = Field(5000, ge=2, description="above this many local speakers, use "
                           "online leader clustering")
    keep_embeddings: bool = Field(False, description="keep each row's speaker_embedding "
                                  "(2 KB per row); the per-speaker centroids are always in "
                                  "speakers.parquet")


def _cluster(emb: np.ndarray, threshold: float, exact_max: int) -> np.ndarray:
    n = emb.shape[0]
    if n == 1:
        return np.zeros(1, np.int64)
    if n <= exact_max:
        from scipy.cluster.hierarchy import fcluster, linkage

        z = linkage(emb, method="average", metric="cosine")
        return fcluster(z, t=1.0 - threshold, criterion="distance").astype(np.int64) - 1
    labels = np.empty(n, np.int64)
    cents: list[np.ndarray] = []
    counts: list[int] = []
    for i, v in enumerate(emb):
        if cents:
            sims = np.stack(cents) @ v
            j = int(np.argmax(sims))
            if sims[j] >= threshold:
                labels[i] = j
                c = cents[j] * counts[j] + v
                counts[j] += 1
                cents[j] = c / np.linalg.norm(c)
                continue
        labels[i] = len(cents)
        cents.append(v.copy())
        counts.append(1)
    return labels


class LinkSpeakers(Stage):
    name = "link_speakers"
    description = "cluster per-file speakers across the run into global speaker ids"
    Config = LinkSpeakersConfig
    resources = Resources(cpus=1)
    default_batch_size = 512

    config: LinkSpeakersConfig

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
            from pathlib import Path

            from speechmill.pipeline.store import atomic_write_parquet

            t = pa.table(table).sort_by("speaker")
            atomic_write_parquet(Path(ctx.run_dir) / "stages" / ctx.stage_id /
                                 "speakers.parquet", t)
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
