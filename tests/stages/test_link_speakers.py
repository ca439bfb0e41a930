"""link_speakers beyond ``exact_max``: chunked parallel clustering recovers the same
speakers as exact clustering, deterministically, on threads and as Ray tasks."""

from __future__ import annotations

import numpy as np
import pytest

from speechmill.stages.link_speakers import _cluster, _exact


def _voices(n_speakers: int, per: int, dim: int = 64, noise: float = 0.35,
            seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((n_speakers, dim))
    truth = np.repeat(np.arange(n_speakers), per)
    x = centers[truth] + noise * rng.standard_normal((len(truth), dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    perm = rng.permutation(len(truth))  # files arrive in no particular order
    return x[perm], truth[perm]


def _same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    pairs = {(int(x), int(y)) for x, y in zip(a, b, strict=True)}
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


def test_chunked_equals_exact_on_separable_voices() -> None:
    x, truth = _voices(40, 50)  # 2000 local speakers
    exact = _exact(x, 0.75)
    assert _same_partition(exact, truth)
    chunked = _cluster(x, 0.75, exact_max=150)
    assert _same_partition(chunked, truth)
    assert np.array_equal(chunked, _cluster(x, 0.75, exact_max=150))  # deterministic


def test_distinct_voices_stay_apart() -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((900, 64))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    assert len(set(_cluster(x, 0.75, exact_max=100).tolist())) == 900


@pytest.mark.ray
def test_ray_tasks_give_the_same_labels() -> None:
    import ray

    x, truth = _voices(30, 40, seed=2)
    local = _cluster(x, 0.75, exact_max=200)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        remote = _cluster(x, 0.75, exact_max=200)
    finally:
        ray.shutdown()
    assert np.array_equal(local, remote) and _same_partition(remote, truth)
